//! Redis-backed state: the store a cluster of instances shares (SPEC §11).
//!
//! One server (`redis://` or `rediss://`, through a `ConnectionManager` that reconnects by
//! itself) or Redis Cluster (comma-separated seed URLs, through the async cluster client).
//! Every operation on one user's inbox is one Lua script on that user's shard (the keys
//! share the hash tag `{u:<user>}`, see `keys`): one round trip, atomic. Every operation is
//! bounded by `state.timeout`, so a dead Redis answers UNAVAILABLE fast.

mod codec;
pub(crate) mod conn;
mod keys;
mod presence;
mod reply;
#[cfg(test)]
pub mod server;
#[cfg(test)]
mod tests;
pub mod url;

use std::future::Future;
use std::time::Duration;

use ::redis::{RedisResult, Script, Value};
use async_trait::async_trait;
use futures_util::stream::{self, StreamExt};

use super::*;
use conn::Conn;
use keys::Keys;
use reply::{array, entries, int, text};
pub use url::parse_urls;

/// Requests in flight at once for a batch (PushToUsers, GetUserStatus): the multiplexed
/// connection writes them back to back, so a batch costs a few round trips, not N.
const BATCH_DEPTH: usize = 256;

struct Scripts {
    append: Script,
    read: Script,
    cursors: Script,
    ack: Script,
    resume: Script,
    group: Script,
    revoke: Script,
    presence_remove: Script,
}

macro_rules! inbox_script {
    ($file:literal) => {
        Script::new(concat!(include_str!("lua/inbox.lua"), include_str!($file)))
    };
}

impl Scripts {
    fn new() -> Scripts {
        Scripts {
            append: inbox_script!("lua/append.lua"),
            read: inbox_script!("lua/read.lua"),
            cursors: inbox_script!("lua/cursors.lua"),
            ack: inbox_script!("lua/ack.lua"),
            resume: inbox_script!("lua/resume.lua"),
            group: Script::new(include_str!("lua/group.lua")),
            revoke: Script::new(include_str!("lua/revoke.lua")),
            presence_remove: Script::new(include_str!("lua/presence_remove.lua")),
        }
    }
}

pub struct RedisState {
    conn: Conn,
    keys: Keys,
    scripts: Scripts,
    inbox_max: usize,
    ttl_ms: u64,
    window_ms: u64,
    presence_ttl_ms: u64,
    revocation_ttl_ms: u64,
    max_devices: usize,
    timeout: Duration,
}

/// A fresh epoch, offered to the scripts: used only when the user's inbox does not exist.
fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn ms(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

impl RedisState {
    /// Connect as `state.redis_url` says. A single server is connected lazily (the gateway
    /// starts, and reports the store down, while Redis is away); a cluster needs its slot
    /// map, so at least one seed must answer now.
    pub async fn connect(settings: &Settings) -> Result<RedisState, StateError> {
        let cfg = &settings.state;
        let conn = conn::open(cfg).await?;
        Ok(RedisState {
            conn,
            keys: Keys::new(&cfg.key_prefix),
            scripts: Scripts::new(),
            inbox_max: cfg.inbox_max.max(1),
            ttl_ms: ms(cfg.inbox_ttl),
            window_ms: ms(cfg.dedupe_window),
            presence_ttl_ms: ms(settings.instance_ttl),
            revocation_ttl_ms: ms(settings.revocation_ttl),
            max_devices: settings.max_devices.max(1),
            timeout: cfg.timeout,
        })
    }

    /// Run one operation under `state.timeout`, keeping the cause of a failure.
    async fn run<T>(
        &self,
        op: &'static str,
        f: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, StateError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            // The client's own response timeout (the same bound) is the same event.
            Ok(Err(e)) if e.is_timeout() => Err(StateError::Timeout {
                op,
                after: self.timeout,
            }),
            Ok(Err(e)) => Err(StateError::unavailable(op, e)),
            Err(_) => Err(StateError::Timeout {
                op,
                after: self.timeout,
            }),
        }
    }

    fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// The multiplexed connection, for the cluster bus and registry (they publish and keep
    /// their keys over the same connection as the state).
    pub(crate) fn connection(&self) -> Conn {
        self.conn.clone()
    }
}

#[async_trait]
impl State for RedisState {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn append(&self, user: &str, msg: NewMessage) -> Result<Appended, StateError> {
        let keys = self.keys.inbox(user);
        let presence = self.keys.presence(user);
        let payload = codec::encode_entry(&msg);
        let mut c = self.conn();
        let (epoch, seq, duplicate, routes): (String, u64, u8, Vec<String>) = self
            .run(
                "append",
                self.scripts
                    .append
                    .key(&keys[..])
                    .key(&presence)
                    .arg(&msg.id)
                    .arg(payload)
                    .arg(new_epoch())
                    .arg(self.inbox_max)
                    .arg(self.ttl_ms)
                    .arg(self.window_ms)
                    .invoke_async(&mut c),
            )
            .await?;
        Ok(Appended {
            seq,
            epoch,
            duplicate: duplicate == 1,
            routes,
        })
    }

    async fn read_after(
        &self,
        user: &str,
        after: u64,
        limit: usize,
    ) -> Result<InboxRange, StateError> {
        let keys = self.keys.inbox(user);
        let mut c = self.conn();
        let after = after.min(i64::MAX as u64 / 2);
        self.run("read", async {
            let v: Value = self
                .scripts
                .read
                .key(&keys[..])
                .arg(after)
                .arg(limit)
                .arg(new_epoch())
                .arg(self.ttl_ms)
                .invoke_async(&mut c)
                .await?;
            let a = array(v, 5)?;
            Ok(InboxRange {
                epoch: text(&a[0])?,
                head_seq: int(&a[1])? as u64,
                messages: entries(int(&a[2])?, &a[4])?,
                trimmed: int(&a[3])? == 1,
            })
        })
        .await
    }

    async fn head(&self, user: &str) -> Result<InboxHead, StateError> {
        // A read of nothing: creates the epoch when missing, like every inbox script.
        let r = self.read_after(user, u64::MAX, 0).await?;
        Ok(InboxHead {
            epoch: r.epoch,
            head_seq: r.head_seq,
        })
    }

    async fn cursors(&self, user: &str, device: &str) -> Result<Cursors, StateError> {
        let keys = self.keys.inbox(user);
        let mut c = self.conn();
        let (device, user): (i64, u64) = self
            .run(
                "cursors",
                self.scripts
                    .cursors
                    .key(&keys[..])
                    .arg(device)
                    .invoke_async(&mut c),
            )
            .await?;
        Ok(Cursors {
            device: (device >= 0).then_some(device as u64),
            user,
        })
    }

    async fn ack(
        &self,
        user: &str,
        device: Option<&str>,
        epoch: &str,
        seq: u64,
    ) -> Result<(), StateError> {
        let keys = self.keys.inbox(user);
        let mut c = self.conn();
        let seq = seq.min(i64::MAX as u64 / 2);
        let _: i64 = self
            .run(
                "ack",
                self.scripts
                    .ack
                    .key(&keys[..])
                    .arg(device.unwrap_or(""))
                    .arg(epoch)
                    .arg(seq)
                    .arg(self.max_devices)
                    .arg(self.ttl_ms)
                    .invoke_async(&mut c),
            )
            .await?;
        Ok(())
    }

    async fn resume(
        &self,
        user: &str,
        device: Option<&str>,
        since: Option<&str>,
        limit: usize,
    ) -> Result<Resumed, StateError> {
        let keys = self.keys.inbox(user);
        let mut c = self.conn();
        let (mode, since_epoch, since_seq) = match since.map(parse_position) {
            None => ("0", "", 0),
            Some(Some((e, s))) => ("1", e, s.min(i64::MAX as u64 / 2)),
            Some(None) => ("2", "", 0),
        };
        let revoked = self.keys.revoked(user);
        let presence = self.keys.presence(user);
        self.run("resume", async {
            let v: Value = self
                .scripts
                .resume
                .key(&keys[..])
                .key(&revoked)
                .key(&presence)
                .arg(device.unwrap_or(""))
                .arg(mode)
                .arg(since_epoch)
                .arg(since_seq)
                .arg(limit)
                .arg(new_epoch())
                .arg(self.ttl_ms)
                .invoke_async(&mut c)
                .await?;
            let a = array(v, 11)?;
            let at = |v: &Value| int(v).map(|t| (t >= 0).then_some(t));
            let epoch = text(&a[0])?;
            let head_seq = int(&a[1])? as u64;
            let device = int(&a[2])?;
            Ok(Resumed {
                head: InboxHead {
                    epoch: epoch.clone(),
                    head_seq,
                },
                cursors: Cursors {
                    device: (device >= 0).then_some(device as u64),
                    user: int(&a[3])? as u64,
                },
                after: int(&a[4])? as u64,
                range: InboxRange {
                    epoch,
                    head_seq,
                    messages: entries(int(&a[5])?, &a[7])?,
                    trimmed: int(&a[6])? == 1,
                },
                revoked: Revocation {
                    user: at(&a[8])?,
                    device: at(&a[9])?,
                },
                connections: int(&a[10])? as usize,
            })
        })
        .await
    }

    async fn append_many(
        &self,
        users: &[String],
        msg: &NewMessage,
    ) -> Vec<Result<Appended, StateError>> {
        // Built a chunk at a time (a huge group does not allocate all its futures at once),
        // then polled BATCH_DEPTH at a time. Built before the stream: a closure inside it
        // would trip the compiler's Send inference for async_trait futures.
        let mut out = Vec::with_capacity(users.len());
        for chunk in users.chunks(BATCH_DEPTH * 16) {
            let appends: Vec<_> = chunk.iter().map(|u| self.append(u, msg.clone())).collect();
            out.extend(
                stream::iter(appends)
                    .buffered(BATCH_DEPTH)
                    .collect::<Vec<_>>()
                    .await,
            );
        }
        out
    }

    async fn set_group_members(
        &self,
        group: &str,
        op: GroupEdit,
        users: &[String],
    ) -> Result<usize, StateError> {
        let op = match op {
            GroupEdit::Replace => "replace",
            GroupEdit::Add => "add",
            GroupEdit::Remove => "remove",
        };
        let mut c = self.conn();
        self.run(
            "group_set",
            self.scripts
                .group
                .key(self.keys.group(group))
                .arg(op)
                .arg(users)
                .invoke_async(&mut c),
        )
        .await
    }

    async fn group_members(&self, group: &str) -> Result<Vec<String>, StateError> {
        let mut c = self.conn();
        let mut members: Vec<String> = self
            .run(
                "group_get",
                ::redis::cmd("SMEMBERS")
                    .arg(self.keys.group(group))
                    .query_async(&mut c),
            )
            .await?;
        members.sort_unstable();
        Ok(members)
    }

    async fn revoke(&self, user: &str, device: Option<&str>, at_ms: i64) -> Result<(), StateError> {
        let mut c = self.conn();
        let _: i64 = self
            .run(
                "revoke",
                self.scripts
                    .revoke
                    .key(self.keys.revoked(user))
                    // The whole user under the empty field: device ids are never empty.
                    .arg(device.unwrap_or(""))
                    .arg(at_ms)
                    .arg(self.revocation_ttl_ms)
                    .invoke_async(&mut c),
            )
            .await?;
        Ok(())
    }

    async fn revoked_at(&self, user: &str, device: Option<&str>) -> Result<Revocation, StateError> {
        let mut c = self.conn();
        let (user, device_at): (Option<i64>, Option<i64>) = self
            .run(
                "revoke",
                ::redis::cmd("HMGET")
                    .arg(self.keys.revoked(user))
                    .arg("")
                    .arg(device.unwrap_or(""))
                    .query_async(&mut c),
            )
            .await?;
        Ok(Revocation {
            user,
            device: device.and(device_at),
        })
    }

    async fn add_presence(&self, p: &Presence) -> Result<(), StateError> {
        self.add_connection(p).await
    }

    async fn remove_presence(&self, user: &str, conn: &str) -> Result<(), StateError> {
        self.remove_connection(user, conn).await
    }

    async fn presence(&self, user: &str) -> Result<Vec<Presence>, StateError> {
        Ok(self
            .presence_many(std::slice::from_ref(&user.to_string()))
            .await?
            .pop()
            .unwrap_or_default())
    }

    async fn presence_many(&self, users: &[String]) -> Result<Vec<Vec<Presence>>, StateError> {
        self.connections_of(users).await
    }

    async fn remove_instance(&self, instance: &str) -> Result<usize, StateError> {
        self.forget_instance(instance).await
    }

    async fn ping(&self) -> Result<(), StateError> {
        let mut c = self.conn();
        let _: String = self
            .run("ping", ::redis::cmd("PING").query_async(&mut c))
            .await?;
        Ok(())
    }

    async fn maintain(&self, instance: &str) -> Result<(), StateError> {
        self.mark_alive(instance).await
    }
}
