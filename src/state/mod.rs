//! Shared state behind one trait: per-user inbox with seq/epoch, device and user cursors,
//! message-id dedupe, group members, token revocation. `memory` is the embedded default
//! (single node); a Redis implementation runs the same contract tests (`contract`).

pub mod contract;
pub mod instrumented;
pub mod memory;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::config::{Config, StateConfig};

/// A failed state operation. Pushes that hit one fail with UNAVAILABLE; the cause is kept
/// for logs and for the gRPC status message.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StateError {
    /// The store could not be reached or answered an error.
    #[error("state store unavailable ({op})")]
    Unavailable {
        op: &'static str,
        /// `Arc` so the error stays `Clone` (a batch reports one cause for many users).
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// The store did not answer within `state.timeout`.
    #[error("state store did not answer within {after:?} ({op})")]
    Timeout { op: &'static str, after: Duration },
}

impl StateError {
    pub fn unavailable(
        op: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> StateError {
        StateError::Unavailable {
            op,
            source: Arc::new(source),
        }
    }

    /// This error and its causes, `: `-separated (for the gRPC status and logs).
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            out.push_str(": ");
            out.push_str(&c.to_string());
            cause = c.source();
        }
        out
    }
}

/// What a backend is built from: the `[state]` section, plus what other sections say the
/// store enforces (`sessions.max_devices`, how long a revocation matters).
#[derive(Debug, Clone)]
pub struct Settings {
    pub state: StateConfig,
    pub max_devices: usize,
    /// How long a revocation matters: no accepted token lives longer
    /// (`auth.max_token_lifetime` plus the leeway).
    pub revocation_ttl: Duration,
    /// Redis: the presence of an instance that stopped refreshing its liveness (it died)
    /// is not reported after this long (`cluster.instance_ttl`).
    pub instance_ttl: Duration,
}

impl Settings {
    pub fn from_config(cfg: &Config) -> Settings {
        Settings {
            state: cfg.state.clone(),
            max_devices: cfg.sessions.max_devices,
            revocation_ttl: cfg.auth.max_token_lifetime + cfg.auth.leeway,
            instance_ttl: cfg.cluster.instance_ttl,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings::from_config(&Config::default())
    }
}

/// A message to append to a user's inbox.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    /// Message id, already made non-empty by the caller.
    pub id: String,
    pub from: String,
    pub kind: String,
    pub body: Bytes,
    pub ts_ms: i64,
}

/// A retained inbox entry.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    pub seq: u64,
    pub id: String,
    pub from: String,
    pub kind: String,
    pub body: Bytes,
    pub ts_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub seq: u64,
    pub epoch: String,
    /// The id was already stored within the dedupe window: nothing was appended and `seq`
    /// is the original one.
    pub duplicate: bool,
    /// The instances that held connections of the user when the message was stored, as
    /// the store can tell in the same call (Redis: read by the append script; memory:
    /// empty, there is one instance). Where the cluster routes the push.
    pub routes: Vec<String>,
}

/// The head of a user's inbox: its epoch and newest seq (0 when nothing was ever stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxHead {
    pub epoch: String,
    pub head_seq: u64,
}

/// Entries after a position, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct InboxRange {
    pub epoch: String,
    pub head_seq: u64,
    pub messages: Vec<StoredMessage>,
    /// Entries right after the requested position are gone (trimmed by `inbox_max` or
    /// expired by `inbox_ttl`): the first returned seq is not `after + 1`.
    pub trimmed: bool,
}

/// Acked positions within the current epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursors {
    /// This device's cursor; `None` when the device never acked in this epoch.
    pub device: Option<u64>,
    /// The highest seq any device of the user acked in this epoch (0 if none).
    pub user: u64,
}

/// How `set_group_members` changes a group (named apart from `pb::GroupOp`, its wire form).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupEdit {
    Replace,
    Add,
    Remove,
}

/// The revocation times (ms) that apply to one device of a user: tokens issued at or before
/// either are refused. `user` is the latest user-wide revocation (`KickUser` without a
/// device, `InvalidateTokens`); `device` the latest revocation of that device alone
/// (`KickUser` with a `device_id`), which only tokens whose `did` is that device fall to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Revocation {
    pub user: Option<i64>,
    pub device: Option<i64>,
}

impl Revocation {
    /// The latest of the two: what a token of that device is compared with.
    pub fn latest(&self) -> Option<i64> {
        self.user.max(self.device)
    }
}

/// One connection, as presence records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub user: String,
    /// Unique per connection (the session id).
    pub conn: String,
    pub device: String,
    pub platform: String,
    pub transport: String,
    pub instance: String,
    pub connected_at_ms: i64,
}

#[async_trait::async_trait]
pub trait State: Send + Sync + 'static {
    /// Backend name for metrics labels: "memory" or "redis".
    fn backend(&self) -> &'static str;

    /// Append under the next seq (strictly +1 per user within an epoch), trimming to
    /// `inbox_max` and expiring entries older than `inbox_ttl`. A message id already stored
    /// for this user within `dedupe_window` is not stored again.
    async fn append(&self, user: &str, msg: NewMessage) -> Result<Appended, StateError>;

    /// Up to `limit` retained entries with seq > `after`, oldest first, in the current epoch.
    async fn read_after(
        &self,
        user: &str,
        after: u64,
        limit: usize,
    ) -> Result<InboxRange, StateError>;

    /// The user's epoch and newest seq. A user never seen gets an epoch too.
    async fn head(&self, user: &str) -> Result<InboxHead, StateError>;

    /// Device and user cursors in the current epoch.
    async fn cursors(&self, user: &str, device: &str) -> Result<Cursors, StateError>;

    /// Record a cumulative ack. Ignored when `epoch` is not the current one; cursors only
    /// move forward and never past the head. The user cursor always moves; the device's
    /// only for a device that keeps one (`None`: a device id the gateway made up). At most
    /// `sessions.max_devices` device cursors are kept per user: beyond it the least
    /// recently acked device's cursor is forgotten.
    async fn ack(
        &self,
        user: &str,
        device: Option<&str>,
        epoch: &str,
        seq: u64,
    ) -> Result<(), StateError>;

    /// Change a group's members; returns the member count after the change.
    async fn set_group_members(
        &self,
        group: &str,
        op: GroupEdit,
        users: &[String],
    ) -> Result<usize, StateError>;

    /// A group's members (empty for an unknown group).
    async fn group_members(&self, group: &str) -> Result<Vec<String>, StateError>;

    /// Tokens of `user` issued at or before `at_ms` are refused from now on: every token
    /// of the user (`device` `None`), or only those whose `did` is `device`. Each time only
    /// moves forward.
    async fn revoke(&self, user: &str, device: Option<&str>, at_ms: i64) -> Result<(), StateError>;

    /// The latest user-wide revocation of `user` and, when `device` is given, the latest
    /// revocation of that device.
    async fn revoked_at(&self, user: &str, device: Option<&str>) -> Result<Revocation, StateError>;

    /// Record a connection: the user is online, and reachable on its instance.
    async fn add_presence(&self, p: &Presence) -> Result<(), StateError>;

    /// Forget a connection (no-op when unknown).
    async fn remove_presence(&self, user: &str, conn: &str) -> Result<(), StateError>;

    /// The user's connections on every instance.
    async fn presence(&self, user: &str) -> Result<Vec<Presence>, StateError>;

    /// The instances holding connections of `user` (each once): where to route a push.
    async fn routes(&self, user: &str) -> Result<Vec<String>, StateError> {
        let mut instances: Vec<String> = self
            .presence(user)
            .await?
            .into_iter()
            .map(|p| p.instance)
            .collect();
        instances.sort_unstable();
        instances.dedup();
        Ok(instances)
    }

    /// Forget every connection of an instance (after its drain, or when it died); returns
    /// how many.
    async fn remove_instance(&self, instance: &str) -> Result<usize, StateError>;

    /// Whether the store answers (feeds `imgate_state_up`).
    async fn ping(&self) -> Result<(), StateError>;

    /// Periodic upkeep, run by every instance (every few seconds, and once at start before
    /// it serves): the memory backend drops expired entries and idle users; the Redis one
    /// marks `instance` alive, which keeps its presence visible (presence of an instance
    /// that stops calling this disappears after `cluster.instance_ttl`).
    async fn maintain(&self, _instance: &str) -> Result<(), StateError> {
        Ok(())
    }

    /// Everything a connecting device needs, in one call (one round trip on a remote
    /// store): the head, the cursors, and the first replay batch after the resume point
    /// (`since` when given, else the device cursor, else the user cursor; see
    /// [`resume_point`]).
    async fn resume(
        &self,
        user: &str,
        device: Option<&str>,
        since: Option<&str>,
        limit: usize,
    ) -> Result<Resumed, StateError> {
        let head = self.head(user).await?;
        // A device without a cursor of its own (a generated id) still resumes after the
        // user's cursor.
        let mut cursors = self.cursors(user, device.unwrap_or("")).await?;
        if device.is_none() {
            cursors.device = None;
        }
        let (after, _) = resume_point(&head, cursors, since);
        let range = self.read_after(user, after, limit).await?;
        let revoked = self.revoked_at(user, device).await?;
        let connections = self.presence(user).await?.len();
        Ok(Resumed {
            head,
            cursors,
            after,
            range,
            revoked,
            connections,
        })
    }

    /// Append the same message to many users' inboxes (PushToUsers, PushToGroup). One
    /// result per user, in order. The default loops; a remote store pipelines.
    async fn append_many(
        &self,
        users: &[String],
        msg: &NewMessage,
    ) -> Vec<Result<Appended, StateError>> {
        let mut out = Vec::with_capacity(users.len());
        for u in users {
            out.push(self.append(u, msg.clone()).await);
        }
        out
    }

    /// The connections of many users (GetUserStatus), in order. The default loops; a remote
    /// store pipelines.
    async fn presence_many(&self, users: &[String]) -> Result<Vec<Vec<Presence>>, StateError> {
        let mut out = Vec::with_capacity(users.len());
        for u in users {
            out.push(self.presence(u).await?);
        }
        Ok(out)
    }
}

/// What [`State::resume`] answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Resumed {
    pub head: InboxHead,
    pub cursors: Cursors,
    /// The resume point `range` was read after.
    pub after: u64,
    pub range: InboxRange,
    /// The user's revocations (and the device's, for a device that keeps a cursor), as
    /// the store has them: an instance that missed one on the bus learns it here.
    pub revoked: Revocation,
    /// The user's connections on every instance, as presence records them (this one
    /// included when its presence was recorded first): `sessions.max_per_user` across a
    /// cluster.
    pub connections: usize,
}

/// Where a connecting device resumes (SPEC §5), and whether the replay can be complete:
/// after `since` when it names the current epoch; from the start of the current epoch,
/// incomplete, when it names another; else after the device cursor, else after the user
/// cursor (offline messages reach whichever device connects first; a new device does not
/// get the whole history).
pub fn resume_point(head: &InboxHead, cursors: Cursors, since: Option<&str>) -> (u64, bool) {
    match since.map(parse_position) {
        Some(Some((epoch, seq))) if epoch == head.epoch => (seq.min(head.head_seq), true),
        Some(_) => (0, false),
        None => (cursors.device.unwrap_or(cursors.user), true),
    }
}

/// `<epoch>:<seq>`. The epoch is opaque and may itself hold colons, so split at the last.
pub fn parse_position(s: &str) -> Option<(&str, u64)> {
    let (epoch, seq) = s.rsplit_once(':')?;
    Some((epoch, seq.parse().ok()?))
}
