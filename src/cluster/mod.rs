//! Several instances on one Redis behave as one gateway (SPEC §11): the bus that carries
//! pushes, kicks, revocations and login-policy replacements to the instance holding the
//! connection (`bus`), the instance registry (`registry`), and the heartbeat that keeps
//! both honest: it registers this instance, removes dead instances' presence, and checks
//! the inbox heads of the users held here, so a lost bus message delays a durable push by
//! at most two heartbeats and never loses it.
//!
//! Only the Redis backend has a cluster; with the memory backend there is one instance and
//! none of this runs.

pub(crate) mod bus;
pub mod envelope;
pub(crate) mod registry;

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::stream::{self, StreamExt};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::{ClusterConfig, StateConfig};
use crate::hub::{Hub, PushItem};
use crate::ops::metrics;
use crate::protocol::{CloseCode, Push};
use crate::state::redis::conn::Conn;
use crate::state::redis::RedisState;
use crate::state::{InboxHead, Presence, State};
use bus::Bus;
pub use bus::To;
use envelope::{Envelope, Message};
pub use registry::Load;
use registry::Registry;

/// Heads read at once by the inbox-head check (pipelined on the multiplexed connection).
const HEAD_DEPTH: usize = 256;

/// What the cluster acts on when another instance speaks: this instance's connections and
/// its authenticator.
pub struct Local {
    pub hub: Arc<Hub>,
    pub state: Arc<dyn State>,
    /// Record a revocation learned from another instance (`Authenticator::set_revoked`).
    pub revoke: Box<Revoker>,
}

/// `(user, device, at_ms)`: see `Authenticator::revoke`.
pub type Revoker = dyn Fn(&str, Option<&str>, i64) + Send + Sync;

/// The cluster as the last heartbeat saw it.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Live instances and what each holds (this one included).
    pub instances: Vec<(String, Load)>,
}

impl View {
    /// Every live instance's load, summed.
    pub fn total(&self) -> Load {
        let mut t = Load::default();
        for (_, l) in &self.instances {
            t.connections += l.connections;
            t.users += l.users;
            for (a, b) in t.by_transport.iter_mut().zip(l.by_transport) {
                *a += b;
            }
        }
        t
    }
}

pub struct Cluster {
    me: String,
    cfg: ClusterConfig,
    state_cfg: StateConfig,
    conn: Conn,
    bus: Arc<Bus>,
    bus_rx: Mutex<Option<bus::Outbox>>,
    registry: Registry,
    view: Mutex<Option<View>>,
    /// Check the inbox heads now (the bus was resubscribed: what it carried meanwhile is
    /// lost).
    check_now: Notify,
    /// True once the bus is subscribed (the first time).
    subscribed: tokio::sync::watch::Sender<bool>,
}

impl Cluster {
    pub fn new(
        me: &str,
        cfg: &ClusterConfig,
        state_cfg: &StateConfig,
        redis: &RedisState,
    ) -> Arc<Cluster> {
        let (bus, rx) = Bus::new(&state_cfg.key_prefix);
        Arc::new(Cluster {
            me: me.to_string(),
            cfg: cfg.clone(),
            state_cfg: state_cfg.clone(),
            conn: redis.connection(),
            bus,
            bus_rx: Mutex::new(Some(rx)),
            registry: Registry::new(&state_cfg.key_prefix),
            view: Mutex::new(None),
            check_now: Notify::new(),
            subscribed: tokio::sync::watch::Sender::new(false),
        })
    }

    pub fn instance(&self) -> &str {
        &self.me
    }

    fn send(&self, to: To, body: Message) {
        self.bus.send(
            to,
            &Envelope {
                origin: self.me.clone(),
                body,
            },
        );
    }

    /// A push stored for `user` reaches its connections on the other instances that hold
    /// it (`routes`, as the append found them).
    pub fn route(&self, user: &str, push: &Push, routes: &[String]) -> bool {
        let mut any = false;
        for r in routes.iter().filter(|r| **r != self.me) {
            any = true;
            self.send(
                To::Instance(r.clone()),
                Message::Push {
                    user: user.to_string(),
                    push: push.clone(),
                },
            );
        }
        any
    }

    /// A transient push to `user` wherever it is connected. Sent to every instance: a
    /// route lookup would cost a round trip per push, and an instance that does not hold
    /// the user drops it after one map lookup.
    pub fn push_everywhere(&self, user: &str, push: &Push) {
        self.send(
            To::All,
            Message::Push {
                user: user.to_string(),
                push: push.clone(),
            },
        );
    }

    pub fn broadcast(&self, push: &Push) {
        self.send(To::All, Message::Broadcast { push: push.clone() });
    }

    /// Every instance refuses the tokens concerned; with `kick`, closes the connections too.
    pub fn revoke(&self, user: &str, device: Option<&str>, at_ms: i64, kick: Option<&str>) {
        self.send(
            To::All,
            Message::Revoke {
                user: user.to_string(),
                device: device.map(str::to_string),
                at_ms,
                kick: kick.map(str::to_string),
            },
        );
    }

    /// A connection registered here replaces the user's connections elsewhere (SPEC §6).
    pub fn replaced(&self, user: &str, platform: Option<&str>) {
        self.send(
            To::All,
            Message::Replace {
                user: user.to_string(),
                platform: platform.map(str::to_string),
            },
        );
    }

    /// The cluster as the last heartbeat saw it; `None` before the first one succeeded.
    pub fn view(&self) -> Option<View> {
        self.view.lock().clone()
    }

    /// Start the bus and the heartbeat; they stop with `stop`.
    pub fn start(self: &Arc<Self>, tracker: &TaskTracker, stop: CancellationToken, local: Local) {
        let local = Arc::new(local);
        if let Some(rx) = self.bus_rx.lock().take() {
            tracker.spawn(self.bus.clone().run_publisher(
                rx,
                self.conn.clone(),
                self.state_cfg.timeout,
                stop.clone(),
            ));
        }
        let (me, l, this) = (self.me.clone(), local.clone(), self.clone());
        tracker.spawn(bus::run_subscriber(
            self.state_cfg.clone(),
            me,
            self.cfg.heartbeat,
            stop.clone(),
            move |env| inbound(&l, env),
            move || {
                this.subscribed.send_replace(true);
                this.check_now.notify_one();
            },
        ));
        tracker.spawn(self.clone().heartbeat(local, stop));
    }

    /// Wait (at most `within`) until the bus listens: an instance that serves before it
    /// would miss the kicks, revocations and replacements meant for its first clients.
    /// `false` when Redis does not answer yet (the instance serves anyway; the subscriber
    /// keeps trying).
    pub async fn listening(&self, within: std::time::Duration) -> bool {
        let mut rx = self.subscribed.subscribe();
        tokio::time::timeout(within, rx.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Leave the registry (end of a drain): the others stop counting this instance at once
    /// instead of after `cluster.instance_ttl`.
    pub async fn leave(&self) {
        let forget = self.registry.forget(&self.conn, &self.me);
        match tokio::time::timeout(self.state_cfg.timeout, forget).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "instance not removed from the registry"),
            Err(_) => warn!("instance not removed from the registry: timeout"),
        }
    }

    async fn heartbeat(self: Arc<Self>, local: Arc<Local>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.cfg.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heads: HashMap<String, InboxHead> = HashMap::new();
        // After a failed heartbeat this instance may have been taken for dead, or Redis
        // may have restarted empty: its presence is written again once it is heard again.
        let mut restore = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                _ = self.check_now.notified() => {}
            }
            match self.beat(&local, restore).await {
                Ok(()) => restore = false,
                Err(e) => {
                    debug!(error = %e, "cluster heartbeat failed");
                    restore = true;
                    continue;
                }
            }
            self.check_heads(&local, &mut heads).await;
        }
    }

    async fn beat(&self, local: &Local, restore: bool) -> ::redis::RedisResult<()> {
        let hub = &local.hub;
        let mut by_transport = [0u64; 3];
        for (t, n) in hub.connections_by_transport() {
            by_transport[crate::transport::Transport::ALL
                .iter()
                .position(|x| *x == t)
                .unwrap_or(0)] = n as u64;
        }
        let load = Load {
            connections: hub.connection_count() as u64,
            users: hub.online_users() as u64,
            by_transport,
        };
        let timeout = self.state_cfg.timeout;
        let bounded = |f| async move {
            match tokio::time::timeout(timeout, f).await {
                Ok(r) => r,
                Err(_) => Err(::redis::RedisError::from(std::io::Error::from(
                    std::io::ErrorKind::TimedOut,
                ))),
            }
        };
        let now = crate::now_ms();
        bounded(Box::pin(
            self.registry.heartbeat(&self.conn, &self.me, now, load),
        ))
        .await?;
        if restore {
            // Routes and GetUserStatus must find this instance's connections again.
            info!("the cluster hears this instance again: writing its presence again");
            self.restore_presence(local).await;
        }
        let (live, dead) = match tokio::time::timeout(
            timeout,
            self.registry.scan(&self.conn, now, self.cfg.instance_ttl),
        )
        .await
        {
            Ok(r) => r?,
            Err(_) => {
                return Err(::redis::RedisError::from(std::io::Error::from(
                    std::io::ErrorKind::TimedOut,
                )))
            }
        };
        for d in dead.iter().filter(|d| **d != self.me) {
            // Every survivor may do this at once: both steps are idempotent.
            match local.state.remove_instance(d).await {
                Ok(n) => {
                    info!(instance = %d, removed = n, "instance dead: its presence and routes removed");
                    let _ =
                        tokio::time::timeout(timeout, self.registry.forget(&self.conn, d)).await;
                }
                Err(e) => {
                    debug!(instance = %d, error = %e.chain(), "dead instance not removed yet")
                }
            }
        }
        metrics::instances(live.len());
        *self.view.lock() = Some(View { instances: live });
        Ok(())
    }

    async fn restore_presence(&self, local: &Local) {
        for c in local.hub.all() {
            let p = Presence {
                user: c.info.user.clone(),
                conn: c.info.session_id.clone(),
                device: c.info.device.clone(),
                platform: c.info.platform.clone(),
                transport: c.info.transport.as_str().into(),
                instance: self.me.clone(),
                connected_at_ms: c.info.connected_at_ms,
            };
            if let Err(e) = local.state.add_presence(&p).await {
                debug!(error = %e.chain(), "presence not restored");
                return;
            }
        }
    }

    /// The safety net under the bus: read the inbox head of every user held here; a head
    /// that moved since the last check is handed to the user's connections as a live push,
    /// and each session fills the gap before it from the inbox (session/), dropping what it
    /// already sent. So a durable push whose notification was lost arrives within two
    /// heartbeats. One read per local user per heartbeat, pipelined.
    async fn check_heads(&self, local: &Local, heads: &mut HashMap<String, InboxHead>) {
        let users = local.hub.users();
        let reads: Vec<_> = users
            .iter()
            .map(|u| {
                let state = local.state.clone();
                let u = u.clone();
                async move {
                    let h = state.head(&u).await;
                    (u, h)
                }
            })
            .collect();
        let got: Vec<_> = stream::iter(reads)
            .buffer_unordered(HEAD_DEPTH)
            .collect()
            .await;
        let mut next = HashMap::with_capacity(got.len());
        for (user, head) in got {
            let Ok(head) = head else {
                // The store does not answer: keep what we knew, check again next time.
                if let Some(h) = heads.remove(&user) {
                    next.insert(user, h);
                }
                continue;
            };
            let moved = match heads.get(&user) {
                None => head.head_seq > 0,
                Some(before) => before.epoch != head.epoch || head.head_seq > before.head_seq,
            };
            if moved {
                self.wake(local, &user, &head).await;
            }
            next.insert(user, head);
        }
        *heads = next;
    }

    /// Hand the newest stored message of `user` to its local connections.
    async fn wake(&self, local: &Local, user: &str, head: &InboxHead) {
        let range = match local
            .state
            .read_after(user, head.head_seq.saturating_sub(1), 1)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e.chain(), "inbox head not read");
                return;
            }
        };
        if let Some(m) = range.messages.into_iter().last() {
            let item = PushItem::new(Push {
                id: m.id,
                from: (!m.from.is_empty()).then_some(m.from),
                kind: (!m.kind.is_empty()).then_some(m.kind),
                body: m.body,
                ts: m.ts_ms,
                seq: Some(m.seq),
                epoch: Some(range.epoch),
            });
            local.hub.deliver(user, &item);
        }
    }
}

/// What another instance said, acted on here.
fn inbound(local: &Local, env: Envelope) {
    match env.body {
        Message::Push { user, push } => {
            local.hub.deliver(&user, &PushItem::new(push));
        }
        Message::Broadcast { push } => {
            local.hub.broadcast(&PushItem::new(push));
        }
        Message::Revoke {
            user,
            device,
            at_ms,
            kick,
        } => {
            (local.revoke)(&user, device.as_deref(), at_ms);
            if let Some(reason) = kick {
                local
                    .hub
                    .kick(&user, device.as_deref(), CloseCode::Kicked, &reason);
            }
        }
        Message::Replace { user, platform } => {
            local.hub.replaced_elsewhere(&user, platform.as_deref());
        }
    }
}
