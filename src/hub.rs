//! The connection manager: user → devices → connections, sharded behind sync mutexes that
//! are never held across an await. Delivering never awaits a client: a full outbound queue
//! closes that connection with 4100 (it is made whole by replay when it comes back).

use std::collections::HashMap;
use std::hash::BuildHasher;

use foldhash::fast::RandomState;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
    pub session: String,
    pub user: String,
    pub device: String,
    pub platform: String,
    pub transport: Transport,
    pub connected_at_ms: i64,
}

/// A request to close a connection, from outside its task. Only the connection's own task
/// waits on it, so one waker slot is enough (cheaper to poll on every wake-up than a Notify).
#[derive(Debug, Default)]
pub struct Control {
    close: Mutex<Option<(CloseCode, String)>>,
    requested: AtomicBool,
    waker: AtomicWaker,
}

impl Control {
    /// Ask the connection to close. The first request wins.
    pub fn close(&self, code: CloseCode, reason: &str) {
        let mut slot = self.close.lock();
        if slot.is_none() {
            *slot = Some((code, reason.to_string()));
            drop(slot);
            self.requested.store(true, Ordering::Release);
            self.waker.wake();
        }
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
    pub tx: mpsc::Sender<Arc<PushItem>>,
    pub control: Arc<Control>,
}

impl ConnHandle {
    /// Queue a push without waiting; a full queue closes the connection with 4100.
    fn offer(&self, item: &Arc<PushItem>) -> bool {
        match self.tx.try_send(item.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                crate::ops::metrics::slow_consumer(self.info.transport.as_str());
                self.control
                    .close(CloseCode::SlowConsumer, CloseCode::SlowConsumer.reason());
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
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
    by_transport: [AtomicUsize; 3],
    users: AtomicUsize,
}

fn transport_index(t: Transport) -> usize {
    match t {
        Transport::Ws => 0,
        Transport::Wss => 1,
        Transport::Wt => 2,
    }
}

impl Hub {
    pub fn new(policy: LoginPolicy, max_per_user: usize) -> Hub {
        Hub {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::default(),
            policy,
            max_per_user,
            by_transport: Default::default(),
            users: AtomicUsize::new(0),
        }
    }

    fn shard(&self, user: &str) -> &Shard {
        &self.shards[(self.hasher.hash_one(user) as usize) % SHARDS]
    }

    /// Add a connection under the login policy (SPEC §6). Connections it replaces are
    /// removed and asked to close with 4503; `Err(4507)` when the user is at
    /// `max_per_user` under the `multi` policy.
    pub fn register(&self, handle: ConnHandle) -> Result<(), CloseCode> {
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
        Ok(())
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
        shard
            .get(user)
            .map(|conns| conns.iter().filter(|c| c.offer(item)).count() as u32)
    }

    /// Queue a push to every connection on this instance.
    pub fn broadcast(&self, item: &Arc<PushItem>) -> u32 {
        let mut n = 0;
        for shard in self.shards.iter() {
            let shard = shard.lock();
            for conns in shard.values() {
                n += conns.iter().filter(|c| c.offer(item)).count() as u32;
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
}
