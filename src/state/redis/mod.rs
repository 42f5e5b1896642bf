//! Redis-backed state: the store a cluster of instances shares (SPEC §11).
//!
//! One server (`redis://` or `rediss://`, through a `ConnectionManager` that reconnects by
//! itself) or Redis Cluster (comma-separated seed URLs, through the async cluster client).
//! Every operation on one user's inbox is one Lua script on that user's shard (the keys
//! share the hash tag `{u:<user>}`, see `keys`): one round trip, atomic. Every operation is
//! bounded by `state.timeout`, so a dead Redis answers UNAVAILABLE fast.

mod codec;
mod keys;
#[cfg(test)]
pub mod server;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Cmd, IntoConnectionInfo, Pipeline, RedisFuture, RedisResult, Script, Value};
use async_trait::async_trait;
use futures_util::stream::{self, StreamExt};

use super::*;
use keys::Keys;

/// Requests in flight at once for a batch (PushToUsers, GetUserStatus): the multiplexed
/// connection writes them back to back, so a batch costs a few round trips, not N.
const BATCH_DEPTH: usize = 256;

/// The seed URLs of `state.redis_url`: one URL for a single server, several
/// (comma-separated) for Redis Cluster.
pub fn parse_urls(urls: &str) -> Result<Vec<String>, String> {
    let list: Vec<String> = urls
        .split(',')
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect();
    if list.is_empty() {
        return Err("required with backend = \"redis\": redis://host:port, rediss:// for TLS, comma-separated seed URLs for Redis Cluster".into());
    }
    for u in &list {
        if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
            return Err(format!(
                "{}: redis:// or rediss:// URLs (comma-separated for a cluster)",
                redacted(u)
            ));
        }
        if let Err(e) = u.as_str().into_connection_info() {
            return Err(format!("{}: {e}", redacted(u)));
        }
    }
    Ok(list)
}

/// A URL without its password, for messages.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// A connection to a single server or to a cluster; cheap to clone (both multiplex).
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

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

/// A script's reply was not what it returns (a bug, or a foreign key under our prefix):
/// reported as a store error rather than a panic.
fn bad(what: &'static str) -> ::redis::RedisError {
    ::redis::RedisError::from((
        ::redis::ErrorKind::UnexpectedReturnType,
        "unexpected reply",
        what.to_string(),
    ))
}

fn int(v: &Value) -> RedisResult<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        _ => Err(bad("integer")),
    }
}

fn text(v: &Value) -> RedisResult<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).map_err(|_| bad("utf-8 string")),
        Value::SimpleString(s) => Ok(s.clone()),
        _ => Err(bad("string")),
    }
}

fn entries(first_seq: i64, v: &Value) -> RedisResult<Vec<StoredMessage>> {
    let Value::Array(items) = v else {
        return Err(bad("entries"));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::BulkString(b) => {
                codec::decode_entry(first_seq as u64 + i as u64, b).ok_or_else(|| bad("entry"))
            }
            _ => Err(bad("entry")),
        })
        .collect()
}

fn array(v: Value, n: usize) -> RedisResult<Vec<Value>> {
    match v {
        Value::Array(a) if a.len() >= n => Ok(a),
        _ => Err(bad("array")),
    }
}

impl RedisState {
    /// Connect as `state.redis_url` says. A single server is connected lazily (the gateway
    /// starts, and reports the store down, while Redis is away); a cluster needs its slot
    /// map, so at least one seed must answer now.
    pub async fn connect(settings: &Settings) -> Result<RedisState, StateError> {
        let cfg = &settings.state;
        let urls = parse_urls(&cfg.redis_url)
            .map_err(|e| StateError::unavailable("connect", BadUrl(e)))?;
        let certs = if cfg.redis_ca_file.is_empty() {
            None
        } else {
            let pem = std::fs::read(&cfg.redis_ca_file)
                .map_err(|e| StateError::unavailable("connect", e))?;
            Some(::redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            })
        };
        let conn = if urls.len() == 1 {
            let client = match certs {
                Some(certs) => ::redis::Client::build_with_tls(urls[0].as_str(), certs),
                None => ::redis::Client::open(urls[0].as_str()),
            }
            .map_err(|e| StateError::unavailable("connect", e))?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(cfg.timeout))
                .set_response_timeout(Some(cfg.timeout))
                // Reconnect attempts back off up to a second, and keep going: the store
                // coming back must be noticed without a restart.
                .set_number_of_retries(3)
                .set_max_delay(Duration::from_secs(1));
            Conn::Single(
                ConnectionManager::new_lazy_with_config(client, config)
                    .map_err(|e| StateError::unavailable("connect", e))?,
            )
        } else {
            let mut builder = ::redis::cluster::ClusterClient::builder(urls)
                .connection_timeout(cfg.timeout)
                .response_timeout(cfg.timeout)
                .retries(2);
            if let Some(certs) = certs {
                builder = builder.certs(certs);
            }
            let client = builder
                .build()
                .map_err(|e| StateError::unavailable("connect", e))?;
            let conn = tokio::time::timeout(cfg.timeout * 5, client.get_async_connection())
                .await
                .map_err(|_| StateError::Timeout {
                    op: "connect",
                    after: cfg.timeout * 5,
                })?
                .map_err(|e| StateError::unavailable("connect", e))?;
            Conn::Cluster(conn)
        };
        Ok(RedisState {
            conn,
            keys: Keys::new(&cfg.key_prefix),
            scripts: Scripts::new(),
            inbox_max: cfg.inbox_max.max(1),
            ttl_ms: ms(cfg.inbox_ttl),
            window_ms: ms(cfg.dedupe_window),
            presence_ttl_ms: ms(cfg.presence_ttl),
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

    /// Keep only connections whose instance is alive (it refreshed its key within
    /// `presence_ttl`), and forget the others' records.
    async fn alive_only(&self, lists: &mut [Vec<Presence>]) -> RedisResult<()> {
        let mut instances: Vec<String> =
            lists.iter().flatten().map(|p| p.instance.clone()).collect();
        instances.sort_unstable();
        instances.dedup();
        if instances.is_empty() {
            return Ok(());
        }
        let lookups: Vec<_> = instances
            .iter()
            .map(|i| {
                let mut c = self.conn();
                let key = self.keys.instance_alive(i);
                async move {
                    ::redis::cmd("EXISTS")
                        .arg(key)
                        .query_async::<bool>(&mut c)
                        .await
                }
            })
            .collect();
        let alive: Vec<bool> = stream::iter(lookups)
            .buffered(BATCH_DEPTH)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<RedisResult<_>>()?;
        let dead: Vec<&String> = instances
            .iter()
            .zip(&alive)
            .filter(|(_, a)| !**a)
            .map(|(i, _)| i)
            .collect();
        if dead.is_empty() {
            return Ok(());
        }
        for list in lists.iter_mut() {
            let (gone, kept): (Vec<Presence>, Vec<Presence>) = std::mem::take(list)
                .into_iter()
                .partition(|p| dead.contains(&&p.instance));
            *list = kept;
            // Records of a dead instance that nobody removed: drop them on the way.
            for p in gone {
                let mut c = self.conn();
                let _: RedisResult<i64> = ::redis::cmd("HDEL")
                    .arg(self.keys.presence(&p.user))
                    .arg(&p.conn)
                    .query_async(&mut c)
                    .await;
            }
        }
        Ok(())
    }

    async fn presence_records(&self, user: &str) -> RedisResult<Vec<Presence>> {
        let mut c = self.conn();
        let map: Vec<(Vec<u8>, Vec<u8>)> = ::redis::cmd("HGETALL")
            .arg(self.keys.presence(user))
            .query_async(&mut c)
            .await?;
        let mut out: Vec<Presence> = map
            .iter()
            .filter_map(|(_, v)| codec::decode_presence(v))
            .collect();
        out.sort_by_key(|p| (p.connected_at_ms, p.conn.clone()));
        Ok(out)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BadUrl(String);

#[async_trait]
impl State for RedisState {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn append(&self, user: &str, msg: NewMessage) -> Result<Appended, StateError> {
        let keys = self.keys.inbox(user);
        let payload = codec::encode_entry(&msg);
        let mut c = self.conn();
        let (epoch, seq, duplicate): (String, u64, u8) = self
            .run(
                "append",
                self.scripts
                    .append
                    .key(&keys[..])
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
        self.run("resume", async {
            let v: Value = self
                .scripts
                .resume
                .key(&keys[..])
                .arg(device.unwrap_or(""))
                .arg(mode)
                .arg(since_epoch)
                .arg(since_seq)
                .arg(limit)
                .arg(new_epoch())
                .arg(self.ttl_ms)
                .invoke_async(&mut c)
                .await?;
            let a = array(v, 8)?;
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
        op: GroupOp,
        users: &[String],
    ) -> Result<usize, StateError> {
        let op = match op {
            GroupOp::Replace => "replace",
            GroupOp::Add => "add",
            GroupOp::Remove => "remove",
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
        let (mut c1, mut c2) = (self.conn(), self.conn());
        let mut record = ::redis::cmd("HSET");
        record
            .arg(self.keys.presence(&p.user))
            .arg(&p.conn)
            .arg(codec::encode_presence(p));
        let mut index = ::redis::cmd("SADD");
        index
            .arg(self.keys.instance_conns(&p.instance))
            .arg(codec::encode_index(&p.user, &p.conn));
        let record = record.query_async::<i64>(&mut c1);
        let index = index.query_async::<i64>(&mut c2);
        // Two shards in a cluster: sent together, one round trip of latency.
        self.run("presence", async {
            let (a, b) = futures_util::future::join(record, index).await;
            a.and(b).map(|_| ())
        })
        .await
    }

    async fn remove_presence(&self, user: &str, conn: &str) -> Result<(), StateError> {
        let mut c = self.conn();
        self.run("presence", async {
            let record: Option<Vec<u8>> = self
                .scripts
                .presence_remove
                .key(self.keys.presence(user))
                .arg(conn)
                .invoke_async(&mut c)
                .await?;
            if let Some(p) = record.as_deref().and_then(codec::decode_presence) {
                let _: i64 = ::redis::cmd("SREM")
                    .arg(self.keys.instance_conns(&p.instance))
                    .arg(codec::encode_index(user, conn))
                    .query_async(&mut c)
                    .await?;
            }
            Ok(())
        })
        .await
    }

    async fn presence(&self, user: &str) -> Result<Vec<Presence>, StateError> {
        Ok(self
            .presence_many(std::slice::from_ref(&user.to_string()))
            .await?
            .pop()
            .unwrap_or_default())
    }

    async fn presence_many(&self, users: &[String]) -> Result<Vec<Vec<Presence>>, StateError> {
        self.run("presence", async {
            let reads: Vec<_> = users.iter().map(|u| self.presence_records(u)).collect();
            let mut lists: Vec<Vec<Presence>> = stream::iter(reads)
                .buffered(BATCH_DEPTH)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<RedisResult<_>>()?;
            self.alive_only(&mut lists).await?;
            Ok(lists)
        })
        .await
    }

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

    async fn remove_instance(&self, instance: &str) -> Result<usize, StateError> {
        let index = self.keys.instance_conns(instance);
        let mut c = self.conn();
        let mut removed = 0;
        let mut cursor: u64 = 0;
        loop {
            let (next, members): (u64, Vec<Vec<u8>>) = self
                .run(
                    "presence",
                    ::redis::cmd("SSCAN")
                        .arg(&index)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut c),
                )
                .await?;
            let removals: Vec<_> = members
                .iter()
                .filter_map(|m| codec::decode_index(m))
                .map(|(user, conn)| {
                    let mut c = self.conn();
                    let key = self.keys.presence(&user);
                    async move {
                        ::redis::cmd("HDEL")
                            .arg(key)
                            .arg(conn)
                            .query_async::<i64>(&mut c)
                            .await
                    }
                })
                .collect();
            let gone: Vec<i64> = self
                .run("presence", async {
                    stream::iter(removals)
                        .buffered(BATCH_DEPTH)
                        .collect::<Vec<_>>()
                        .await
                        .into_iter()
                        .collect::<RedisResult<Vec<i64>>>()
                })
                .await?;
            removed += gone.iter().sum::<i64>() as usize;
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let _: i64 = self
            .run(
                "presence",
                ::redis::cmd("DEL").arg(&index).query_async(&mut c),
            )
            .await?;
        let _: i64 = self
            .run(
                "presence",
                ::redis::cmd("DEL")
                    .arg(self.keys.instance_alive(instance))
                    .query_async(&mut c),
            )
            .await?;
        Ok(removed)
    }

    async fn ping(&self) -> Result<(), StateError> {
        let mut c = self.conn();
        let _: String = self
            .run("ping", ::redis::cmd("PING").query_async(&mut c))
            .await?;
        Ok(())
    }

    async fn maintain(&self, instance: &str) -> Result<(), StateError> {
        let mut c = self.conn();
        let _: () = self
            .run(
                "maintain",
                ::redis::cmd("SET")
                    .arg(self.keys.instance_alive(instance))
                    .arg(1)
                    .arg("PX")
                    .arg(self.presence_ttl_ms)
                    .query_async(&mut c),
            )
            .await?;
        Ok(())
    }
}
