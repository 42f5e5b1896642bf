//! Shared state behind one trait: per-user inbox with seq/epoch, device and user cursors,
//! message-id dedupe, group members, token revocation. `memory` is the embedded default
//! (single node); a Redis implementation runs the same contract tests (`contract`).

pub mod contract;
pub mod instrumented;
pub mod memory;

use bytes::Bytes;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StateError {
    /// The store could not be reached or answered an error: pushes fail with UNAVAILABLE.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupOp {
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
    /// move forward and never past the head.
    async fn ack(&self, user: &str, device: &str, epoch: &str, seq: u64) -> Result<(), StateError>;

    /// Change a group's members; returns the member count after the change.
    async fn set_group_members(
        &self,
        group: &str,
        op: GroupOp,
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
    async fn routes(&self, user: &str) -> Result<Vec<String>, StateError>;

    /// Forget every connection of an instance (after its drain, or when it died); returns
    /// how many.
    async fn remove_instance(&self, instance: &str) -> Result<usize, StateError>;

    /// Whether the store answers (feeds `imgate_state_up`).
    async fn ping(&self) -> Result<(), StateError>;
}
