//! The connection manager: user → devices → connections, sharded behind sync mutexes that
//! are never held across an await. Delivering never awaits a client: an outbound queue over
//! its byte budget (or its frame cap) closes that connection with 4100 (it is made whole by
//! replay when it comes back).

use std::collections::HashMap;
use std::hash::BuildHasher;

use foldhash::fast::RandomState;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::LoginPolicy;
use crate::protocol::{CloseCode, Codec, Push, ServerFrame};
use crate::transport::Transport;

const SHARDS: usize = 64;

/// A push on its way to connections: encoded at most once per codec, shared by every
/// recipient (a broadcast to 100k connections encodes once).
#[derive(Debug)]
pub struct PushItem {
    pub push: Push,
    /// When the gateway accepted the push: `imgate_push_delivery_seconds` starts here.
    pub accepted: Instant,
    json: OnceLock<Bytes>,
    proto: OnceLock<Bytes>,
}

impl PushItem {
    pub fn new(push: Push) -> Arc<PushItem> {
        Arc::new(PushItem {
            push,
            accepted: Instant::now(),
            json: OnceLock::new(),
            proto: OnceLock::new(),
        })
    }

    pub fn encoded(&self, codec: Codec) -> Bytes {
        let cell = match codec {
            Codec::Json => &self.json,
            Codec::Proto => &self.proto,
        };
        cell.get_or_init(|| codec.encode(&ServerFrame::Push(self.push.clone())))
            .clone()
    }
}

/// What every part of the gateway may know about a connection.
#[derive(Debug)]
pub struct ConnInfo {
    pub id: u64,
    /// This connection's id in presence (`Welcome.session` on the wire).
    pub session_id: String,
    pub user: String,
    pub device: String,
    pub platform: String,
    pub transport: Transport,
    pub connected_at_ms: i64,
}

/// Where a connection's presence changes go besides the state store (the business
/// backend's status stream, `upstream.mode = "grpc"`). Never waits.
pub trait PresenceEvents: Send + Sync {
    fn changed(&self, info: &ConnInfo, instance: &str, online: bool);
}

/// A request to close a connection, from outside its task. Only the connection's own task
/// waits on it, so one waker slot is enough (cheaper to poll on every wake-up than a Notify).
#[derive(Debug, Default)]
pub struct Control {
    close: Mutex<Option<(CloseCode, String)>>,
    requested: AtomicBool,
    waker: AtomicWaker,
    /// Encoded bytes of the pushes queued for the connection and not yet taken by its task.
    queued: AtomicUsize,
}

impl Control {
    /// Ask the connection to close. The first request wins: `true` when this one did.
    pub fn close(&self, code: CloseCode, reason: &str) -> bool {
        let mut slot = self.close.lock();
        if slot.is_some() {
            return false;
        }
        *slot = Some((code, reason.to_string()));
        drop(slot);
        self.requested.store(true, Ordering::Release);
        self.waker.wake();
        true
    }

    /// The connection's task took pushes of `bytes` encoded bytes off its queue.
    pub fn dequeued(&self, bytes: usize) {
        self.queued.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Resolves once a close was requested. Cancel-safe: a request made while nobody waits
    /// is kept.
    pub async fn requested(&self) -> (CloseCode, String) {
        std::future::poll_fn(|cx| {
            if !self.requested.load(Ordering::Acquire) {
                self.waker.register(cx.waker());
                // A request between the check and the registration woke nobody.
                if !self.requested.load(Ordering::Acquire) {
                    return Poll::Pending;
                }
            }
            Poll::Ready(self.close.lock().clone().expect("set before the flag"))
        })
        .await
    }
}

/// The hub's handle on one connection.
#[derive(Debug, Clone)]
pub struct ConnHandle {
    pub info: Arc<ConnInfo>,
    pub codec: Codec,
    pub tx: mpsc::Sender<Arc<PushItem>>,
    pub control: Arc<Control>,
}

impl ConnHandle {
    /// Queue a push without waiting. A queue that would hold more than `max_bytes` of
    /// encoded frames (SPEC §5 `sessions.outbound_queue_bytes`), or is at its frame cap,
    /// closes the connection with 4100. A frame alone in the queue is always taken, so a
    /// push larger than the budget still reaches a client that keeps up.
    fn offer(&self, item: &Arc<PushItem>, max_bytes: usize) -> bool {
        let size = item.encoded(self.codec).len();
        let before = self.control.queued.fetch_add(size, Ordering::Relaxed);
        if before > 0 && before + size > max_bytes {
            self.control.dequeued(size);
            self.slow();
            return false;
        }
        match self.tx.try_send(item.clone()) {
            Ok(()) => true,
            Err(e) => {
                self.control.dequeued(size);
                if matches!(e, mpsc::error::TrySendError::Full(_)) {
                    self.slow();
                }
                false
            }
        }
    }

    /// Close with 4100; counted once per connection closed, not per push refused.
    fn slow(&self) {
        let closing = self
            .control
            .close(CloseCode::SlowConsumer, CloseCode::SlowConsumer.reason());
        if closing {
            crate::ops::metrics::slow_consumer(self.info.transport.as_str());
        }
    }
}

/// One shard of the user map: user id → that user's connections on this instance.
type Shard = Mutex<HashMap<String, Vec<ConnHandle>>>;

pub struct Hub {
    shards: Box<[Shard]>,
    hasher: RandomState,
    policy: LoginPolicy,
    max_per_user: usize,
    max_queue_bytes: usize,
    by_transport: [AtomicUsize; Transport::ALL.len()],
    users: AtomicUsize,
    /// Told of every registration that replaces connections under the login policy, so
    /// the cluster can replace the user's connections on other instances too (SPEC §6):
    /// the user, and the platform when only that platform's connections go.
    on_replacing: OnceLock<ReplaceHook>,
    next_id: AtomicU64,
}

type ReplaceHook = Box<dyn Fn(&str, Option<&str>) + Send + Sync>;

fn transport_index(t: Transport) -> usize {
    t.index()
}

impl Hub {
    /// `max_queue_bytes`: the outbound byte budget of each connection.
    pub fn new(policy: LoginPolicy, max_per_user: usize, max_queue_bytes: usize) -> Hub {
        Hub {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::default(),
            policy,
            max_per_user,
            max_queue_bytes,
            by_transport: Default::default(),
            users: AtomicUsize::new(0),
            on_replacing: OnceLock::new(),
            next_id: AtomicU64::new(1),
        }
    }

    /// A new connection id, unique in this process (`ConnInfo::id`).
    pub fn next_conn_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn shard(&self, user: &str) -> &Shard {
        &self.shards[(self.hasher.hash_one(user) as usize) % SHARDS]
    }

    /// Add a connection under the login policy (SPEC §6). Connections it replaces are
    /// removed and asked to close with 4503; `Err(4507)` when the user is at
    /// `max_per_user` under the `multi` policy.
    pub fn register(&self, handle: ConnHandle) -> Result<(), CloseCode> {
        let (user, platform) = if self.on_replacing.get().is_some() {
            (handle.info.user.clone(), handle.info.platform.clone())
        } else {
            Default::default()
        };
        let replaced = {
            let mut shard = self.shard(&handle.info.user).lock();
            let conns = shard.entry(handle.info.user.clone()).or_default();
            let replaced: Vec<ConnHandle> = match self.policy {
                LoginPolicy::Multi => {
                    if conns.len() >= self.max_per_user {
                        if conns.is_empty() {
                            shard.remove(&handle.info.user);
                        }
                        return Err(CloseCode::TooManyConnections);
                    }
                    Vec::new()
                }
                LoginPolicy::OnePerPlatform => {
                    let (gone, kept) = conns
                        .drain(..)
                        .partition(|c| c.info.platform == handle.info.platform);
                    *conns = kept;
                    gone
                }
                LoginPolicy::OnePerUser => std::mem::take(conns),
            };
            if conns.is_empty() && replaced.is_empty() {
                self.users.fetch_add(1, Ordering::Relaxed);
            }
            for r in &replaced {
                self.by_transport[transport_index(r.info.transport)]
                    .fetch_sub(1, Ordering::Relaxed);
            }
            self.by_transport[transport_index(handle.info.transport)]
                .fetch_add(1, Ordering::Relaxed);
            conns.push(handle);
            replaced
        };
        for r in replaced {
            r.control
                .close(CloseCode::Replaced, CloseCode::Replaced.reason());
        }
        if let Some(hook) = self.on_replacing.get() {
            match self.policy {
                LoginPolicy::Multi => {}
                LoginPolicy::OnePerPlatform => hook(&user, Some(&platform)),
                LoginPolicy::OnePerUser => hook(&user, None),
            }
        }
        Ok(())
    }

    /// Set once, by the cluster (see `on_replacing`).
    pub fn on_replacing(&self, hook: impl Fn(&str, Option<&str>) + Send + Sync + 'static) {
        let _ = self.on_replacing.set(Box::new(hook));
    }

    /// A connection of `user` opened on another instance replaces the ones here (all of
    /// them, or those on `platform`): they are closed with 4503.
    pub fn replaced_elsewhere(&self, user: &str, platform: Option<&str>) -> u32 {
        let gone: Vec<ConnHandle> = {
            let shard = self.shard(user).lock();
            shard
                .get(user)
                .map(|conns| {
                    conns
                        .iter()
                        .filter(|c| platform.is_none_or(|p| c.info.platform == p))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default()
        };
        for c in &gone {
            c.control
                .close(CloseCode::Replaced, CloseCode::Replaced.reason());
        }
        gone.len() as u32
    }

    /// The users with a connection here.
    pub fn users(&self) -> Vec<String> {
        let mut out = Vec::with_capacity(self.online_users());
        for shard in self.shards.iter() {
            out.extend(shard.lock().keys().cloned());
        }
        out
    }

    /// Remove a connection (no-op when the policy already removed it).
    pub fn unregister(&self, info: &ConnInfo) {
        let mut shard = self.shard(&info.user).lock();
        if let Some(conns) = shard.get_mut(&info.user) {
            if let Some(pos) = conns.iter().position(|c| c.info.id == info.id) {
                conns.swap_remove(pos);
                self.by_transport[transport_index(info.transport)].fetch_sub(1, Ordering::Relaxed);
            }
            if conns.is_empty() {
                shard.remove(&info.user);
                self.users.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Queue a push to every connection of `user`: how many took it, or `None` when the
    /// user has no connection here (one lookup answers both, on the push path).
    pub fn deliver(&self, user: &str, item: &Arc<PushItem>) -> Option<u32> {
        let shard = self.shard(user).lock();
        shard.get(user).map(|conns| {
            conns
                .iter()
                .filter(|c| c.offer(item, self.max_queue_bytes))
                .count() as u32
        })
    }

    /// Queue a push to every connection on this instance.
    pub fn broadcast(&self, item: &Arc<PushItem>) -> u32 {
        let mut n = 0;
        for shard in self.shards.iter() {
            let shard = shard.lock();
            for conns in shard.values() {
                n += conns
                    .iter()
                    .filter(|c| c.offer(item, self.max_queue_bytes))
                    .count() as u32;
            }
        }
        n
    }

    /// Close the connections of `user` (all, or one device's) with `code`.
    pub fn kick(&self, user: &str, device: Option<&str>, code: CloseCode, reason: &str) -> u32 {
        let targets: Vec<ConnHandle> = {
            let shard = self.shard(user).lock();
            shard
                .get(user)
                .map(|conns| {
                    conns
                        .iter()
                        .filter(|c| device.is_none_or(|d| c.info.device == d))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default()
        };
        for t in &targets {
            t.control.close(code, reason);
        }
        targets.len() as u32
    }

    /// Whether `user` has a connection on this instance (no allocation: on the push path).
    pub fn is_online(&self, user: &str) -> bool {
        self.shard(user).lock().contains_key(user)
    }

    /// The connections of `user` on this instance.
    pub fn connections(&self, user: &str) -> Vec<Arc<ConnInfo>> {
        let shard = self.shard(user).lock();
        shard
            .get(user)
            .map(|conns| conns.iter().map(|c| c.info.clone()).collect())
            .unwrap_or_default()
    }

    /// Every connection handle (for drain).
    pub fn all(&self) -> Vec<ConnHandle> {
        let mut all = Vec::with_capacity(self.connection_count());
        for shard in self.shards.iter() {
            for conns in shard.lock().values() {
                all.extend(conns.iter().cloned());
            }
        }
        all
    }

    pub fn connection_count(&self) -> usize {
        self.by_transport
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    pub fn connections_by_transport(&self) -> Vec<(Transport, usize)> {
        Transport::ALL
            .iter()
            .map(|t| {
                (
                    *t,
                    self.by_transport[transport_index(*t)].load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    pub fn online_users(&self) -> usize {
        self.users.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_close_request_wakes_its_waiter_and_is_kept() {
        let control = Arc::new(Control::default());
        let waiter = tokio::spawn({
            let control = control.clone();
            async move { control.requested().await }
        });
        // The waiter is parked on the request (not polling in a loop) before it comes.
        tokio::task::yield_now().await;
        control.close(CloseCode::SlowConsumer, "queue full");
        control.close(CloseCode::Draining, "later"); // the first request wins
        let (code, reason) = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter was woken")
            .unwrap();
        assert_eq!(
            (code, reason.as_str()),
            (CloseCode::SlowConsumer, "queue full")
        );
        // A wait that starts after the request sees it at once.
        let (code, _) = tokio::time::timeout(Duration::from_secs(5), control.requested())
            .await
            .expect("kept");
        assert_eq!(code, CloseCode::SlowConsumer);
    }

    fn push(body: usize) -> Arc<PushItem> {
        PushItem::new(Push {
            id: "m".into(),
            from: None,
            kind: None,
            body: Bytes::from(vec![b'x'; body]),
            ts: 0,
            seq: None,
            epoch: None,
        })
    }

    fn handle(hub: &Hub, user: &str, cap: usize) -> (mpsc::Receiver<Arc<PushItem>>, Arc<Control>) {
        let (tx, rx) = mpsc::channel(cap);
        let control = Arc::new(Control::default());
        let info = Arc::new(ConnInfo {
            id: 1,
            session_id: "s".into(),
            user: user.into(),
            device: "d".into(),
            platform: "web".into(),
            transport: Transport::Ws,
            connected_at_ms: 0,
        });
        hub.register(ConnHandle {
            info,
            codec: Codec::Json,
            tx,
            control: control.clone(),
        })
        .unwrap();
        (rx, control)
    }

    /// SPEC §5: slow is bytes queued, not frames: a burst of small pushes fits, a backlog
    /// over the byte budget closes with 4100, and what the task takes off frees the budget.
    #[test]
    fn the_outbound_queue_is_bounded_in_bytes() {
        let hub = Hub::new(LoginPolicy::Multi, 10, 64 * 1024);
        let (mut rx, control) = handle(&hub, "u", 10_000);
        let small = push(40);
        for _ in 0..200 {
            assert_eq!(hub.deliver("u", &small), Some(1));
        }
        assert!(!control.requested.load(Ordering::Acquire));
        // The task takes them off: the budget is free again.
        let mut taken = 0;
        while let Ok(item) = rx.try_recv() {
            taken += item.encoded(Codec::Json).len();
        }
        control.dequeued(taken);
        assert_eq!(control.queued.load(Ordering::Relaxed), 0);
        // A frame larger than the whole budget still goes to an empty queue...
        let big = push(100 * 1024);
        assert_eq!(hub.deliver("u", &big), Some(1));
        // ...but nothing more fits behind it: 4100.
        assert_eq!(hub.deliver("u", &small), Some(0));
        assert!(control.requested.load(Ordering::Acquire));
    }
}
