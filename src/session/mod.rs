//! The per-connection driver: authentication, the read loop, the writer, heartbeats,
//! limits and resume, for any [`Session`]. One task per connection owns everything here.

mod auth;
mod inbound;
mod outbound;
mod progress;
pub mod rate;
mod replay;
mod upstream;

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval, MissedTickBehavior, Sleep};
use tracing::{debug, Instrument};

use crate::auth::handshake::HandshakeParams;
use crate::auth::{AuthError, Identity};
use crate::config::{Config, LimitsConfig, SessionsConfig};
use crate::hub::{ConnHandle, ConnInfo, Control, PushItem};
use crate::lifecycle::Lifecycle;
use crate::limits::Permits;
use crate::ops::metrics;
use crate::protocol::{ClientFrame, CloseCode, Codec, DecodeError, Reply, ServerFrame, Welcome};
use crate::services::Services;
use crate::state::StateError;
use crate::transport::{Inbound, Session, SessionError, Transport};
use crate::upstream::Upstream;

use outbound::{bounded, queued_bytes};
use progress::InboxProgress;
use rate::{RateLimiter, Verdict};
use upstream::{next_reply, UpstreamWorker};

/// What a session uses of the gateway: the shared services, the drain, and the settings of
/// a connection. Built once by the composition root; every session holds one `Arc` of it.
pub struct SessionEnv {
    pub services: Arc<Services>,
    pub lifecycle: Arc<Lifecycle>,
    pub sessions: SessionsConfig,
    pub limits: LimitsConfig,
    /// `auth.auth_timeout`: how long a connection may stay unauthenticated.
    pub auth_timeout: Duration,
    /// `state.replay_limit`: stored messages sent per replay page.
    pub replay_limit: usize,
}

impl SessionEnv {
    pub fn new(cfg: &Config, services: Arc<Services>, lifecycle: Arc<Lifecycle>) -> SessionEnv {
        SessionEnv {
            services,
            lifecycle,
            sessions: cfg.sessions.clone(),
            limits: cfg.limits.clone(),
            auth_timeout: cfg.auth.auth_timeout,
            replay_limit: cfg.state.replay_limit,
        }
    }
}

/// What a transport hands over with an open session.
pub struct Admission {
    pub params: HandshakeParams,
    pub ip: IpAddr,
    /// The outcome of a token presented at the handshake; `None`: the client must send `auth`.
    pub handshake_auth: Option<Result<Identity, AuthError>>,
    /// Node, per-IP and unauthenticated-session permits, released when the session ends.
    pub permits: Permits,
}

/// Why a connection ends.
#[derive(Debug)]
enum End {
    /// Send `kick` with this code, then close.
    Kick(CloseCode, String),
    /// The peer closed (`true`: cleanly) or the connection broke.
    Gone(bool),
}

impl End {
    fn kick(code: CloseCode) -> End {
        End::Kick(code, code.reason().to_string())
    }
}

impl From<SessionError> for End {
    fn from(e: SessionError) -> End {
        match e {
            SessionError::TooLarge => End::kick(CloseCode::FrameTooLarge),
            SessionError::Protocol(m) => End::Kick(CloseCode::ProtocolError, m),
            SessionError::Io(_) => End::Gone(false),
        }
    }
}

impl From<StateError> for End {
    fn from(_: StateError) -> End {
        End::Kick(CloseCode::Internal, "state store unavailable".into())
    }
}

/// Run a session to its end.
///
/// Built so that the connection's state lives once in the task: the returned future owns
/// `Conn` and `Admission`, and everything below borrows them (a by-value `self` at each
/// level would store a copy per level, and the task is most of an idle connection's memory).
pub fn run<S: Session>(
    env: Arc<SessionEnv>,
    session: S,
    adm: Admission,
) -> impl std::future::Future<Output = ()> + Send {
    let transport = session.transport();
    let span = tracing::debug_span!("conn", transport = transport.as_str(), ip = %adm.ip, user = tracing::field::Empty);
    let mut conn = Conn::new(env, session, &adm);
    let mut adm = adm;
    async move {
        let t = transport.as_str();
        metrics::connection_opened(t);
        metrics::connections_delta(t, 1);
        let code = conn.run(&mut adm).await;
        metrics::connections_delta(t, -1);
        metrics::connection_closed(t, code);
        debug!(code, "connection closed");
    }
    .instrument(span)
}

struct Conn<S> {
    env: Arc<SessionEnv>,
    session: S,
    transport: Transport,
    codec: Codec,
    /// Frames encoded and waiting for the next flush, with their `type` for metrics.
    out: Vec<Bytes>,
    out_types: Vec<&'static str>,
    /// Accept times of the pushes in `out`, for `imgate_push_delivery_seconds`.
    out_pushes: Vec<Instant>,
    last_inbound: Instant,
    rate: RateLimiter,
    heartbeat: Interval,
    expiry: Pin<Box<Sleep>>,
    /// Close requests from outside (set once registered), also watched while a write is
    /// blocked on a client that does not read.
    control: Option<Arc<Control>>,
    /// The business upstream worker of this connection, started by its first `send`.
    upstream: Option<UpstreamWorker>,
    /// Set while the connection is recorded in presence.
    presence: Option<Arc<ConnInfo>>,
    /// After a refused refresh, further refreshes are not checked until then (review F11:
    /// each check of a bogus signature costs CPU).
    reauth_after: Option<Instant>,
}

impl<S: Session> Conn<S> {
    fn new(env: Arc<SessionEnv>, session: S, adm: &Admission) -> Self {
        let now = Instant::now();
        let cfg = &*env;
        let mut heartbeat =
            tokio::time::interval_at(now + cfg.sessions.heartbeat, cfg.sessions.heartbeat);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Conn {
            transport: session.transport(),
            codec: adm.params.codec,
            out: Vec::new(),
            out_types: Vec::new(),
            out_pushes: Vec::new(),
            last_inbound: now,
            rate: RateLimiter::new(
                cfg.limits.rate_per_sec,
                cfg.limits.rate_burst,
                cfg.limits.rate_close_after,
                now,
            ),
            heartbeat,
            // Armed for real once a token is accepted.
            expiry: Box::pin(tokio::time::sleep(Duration::from_secs(86400 * 365))),
            control: None,
            upstream: None,
            presence: None,
            reauth_after: None,
            session,
            env,
        }
    }

    /// The whole life of the connection; returns the close code label for metrics.
    async fn run(&mut self, adm: &mut Admission) -> &'static str {
        // Rarely taken paths are boxed so they do not inflate the per-connection task.
        let end = match Box::pin(self.authenticate(adm)).await {
            Ok((identity, since)) => {
                // Authenticated: no longer counts against `max_unauthenticated`.
                adm.permits.authenticated();
                let since = since.or(adm.params.since.take());
                let end = self.serve(identity, since, adm).await;
                if let Some(info) = self.presence.take() {
                    let state = self.env.services.state.clone();
                    if let Err(e) = state.remove_presence(&info.user, &info.session_id).await {
                        debug!(error = %e, "presence not removed");
                    }
                }
                end
            }
            Err(end) => end,
        };
        Box::pin(self.finish(end)).await
    }

    // ---- authentication ---------------------------------------------------------------

    // ---- the authenticated session ------------------------------------------------------

    /// Who this connection is, from its token and its handshake parameters; and whether its
    /// device keeps a cursor.
    fn conn_info(&self, identity: &Identity, adm: &Admission) -> (Arc<ConnInfo>, bool) {
        let device = identity
            .device
            .clone()
            .or_else(|| adm.params.device.clone());
        // A device id made up here names this connection only: it can never resume, so it
        // keeps no cursor (which would only crowd out real devices' cursors).
        let keeps_cursor = device.is_some();
        let device = device.unwrap_or_else(|| format!("d-{:016x}", rand::random::<u64>()));
        let platform = identity
            .platform
            .clone()
            .or_else(|| adm.params.platform.clone())
            .unwrap_or_else(|| "other".into());
        let info = Arc::new(ConnInfo {
            id: self.env.services.hub.next_conn_id(),
            session_id: format!("{:016x}", rand::random::<u64>()),
            user: identity.user.clone(),
            device,
            platform,
            transport: self.transport,
            connected_at_ms: crate::now_ms(),
        });
        (info, keeps_cursor)
    }

    async fn serve(&mut self, identity: Identity, since: Option<String>, adm: &Admission) -> End {
        let env = self.env.clone();
        tracing::Span::current().record("user", identity.user.as_str());
        let (info, keeps_cursor) = self.conn_info(&identity, adm);
        let (tx, mut rx) = mpsc::channel(env.sessions.outbound_queue);
        let control = Arc::new(Control::default());
        let handle = ConnHandle {
            info: info.clone(),
            codec: self.codec,
            tx,
            control: control.clone(),
        };
        if let Err(code) = env.services.hub.register(handle) {
            return End::kick(code);
        }
        let _registered = Registered {
            env: env.clone(),
            info: info.clone(),
        };
        // The token was checked before registration: a `KickUser` or `InvalidateTokens`
        // that ran in between found nothing to close (WebTransport stretches that gap to
        // the time the client takes to open its control stream). Revocations are recorded
        // before the hub is searched, so looking again now that the session is in the hub
        // closes the gap (SPEC §2).
        if env.services.auth.is_revoked(&identity) {
            return End::kick(CloseCode::Kicked);
        }
        if let Some(status) = &env.services.status {
            status.changed(&info, &env.services.instance_id, true);
        }
        Box::pin(self.add_presence(&info)).await;
        self.control = Some(control.clone());
        if env.lifecycle.is_draining() {
            return End::kick(CloseCode::Draining);
        }
        self.arm_expiry(env.services.auth.session_deadline_ms(&identity));

        let mut sync =
            match Box::pin(self.welcome(&info, &identity, since.as_deref(), keeps_cursor)).await {
                Ok(sync) => sync,
                Err(end) => return end,
            };
        if let Err(end) = self.flush().await {
            return end;
        }
        // The welcome and the first replay batch are the largest burst most connections
        // get: do not keep their buffers for the connection's whole life.
        self.out = Vec::new();
        self.out_types = Vec::new();
        self.out_pushes = Vec::new();
        let batch = env.sessions.write_batch.max(1);
        let mut items: Vec<Arc<PushItem>> = Vec::new();

        let end = loop {
            if let Err(end) = self.flush().await {
                break end;
            }
            let step = tokio::select! {
                biased;
                (code, reason) = control.requested() => Err(End::Kick(code, reason)),
                n = rx.recv_many(&mut items, batch) => {
                    control.dequeued(queued_bytes(&items, self.codec));
                    if n == 0 {
                        Err(End::kick(CloseCode::Internal))
                    } else {
                        let r = self.on_pushes(&mut sync, &info, &mut items).await;
                        // Idle connections keep no batch buffer.
                        items = Vec::new();
                        r
                    }
                }
                r = self.session.recv() => match r {
                    Ok(inbound) => self.on_inbound(inbound, &mut sync, &info, &identity).await,
                    Err(e) => Err(End::from(e)),
                },
                Some(reply) = next_reply(&mut self.upstream) => {
                    self.queue(ServerFrame::Reply(reply));
                    Ok(())
                }
                _ = self.heartbeat.tick() => self.on_heartbeat().await,
                _ = &mut self.expiry => Err(End::kick(CloseCode::TokenExpired)),
            };
            if let Err(end) = step {
                break end;
            }
        };
        // Flush what is queued before a kick (drain, backend kick...), except for a slow
        // consumer whose queue is the problem: it is made whole by replay instead.
        if let End::Kick(code, _) = &end {
            if *code != CloseCode::SlowConsumer {
                rx.close();
                while let Ok(item) = rx.try_recv() {
                    items.push(item);
                }
                control.dequeued(queued_bytes(&items, self.codec));
                let _ = self.on_pushes(&mut sync, &info, &mut items).await;
            }
        }
        end
    }

    /// Record the connection in presence. A store hiccup does not refuse the session:
    /// presence serves routing and status queries.
    async fn add_presence(&mut self, info: &Arc<ConnInfo>) {
        let presence = crate::state::Presence {
            user: info.user.clone(),
            conn: info.session_id.clone(),
            device: info.device.clone(),
            platform: info.platform.clone(),
            transport: info.transport.as_str().into(),
            instance: self.env.services.instance_id.clone(),
            connected_at_ms: info.connected_at_ms,
        };
        match self.env.services.state.add_presence(&presence).await {
            Ok(()) => self.presence = Some(info.clone()),
            Err(e) => debug!(error = %e.chain(), "presence not recorded"),
        }
    }

    // ---- delivery -----------------------------------------------------------------------

    // ---- inbound ------------------------------------------------------------------------

    // ---- output -------------------------------------------------------------------------
}

/// Removes the connection from the hub however the task ends.
struct Registered {
    env: Arc<SessionEnv>,
    info: Arc<ConnInfo>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.env.services.hub.unregister(&self.info);
        if let Some(status) = &self.env.services.status {
            status.changed(&self.info, &self.env.services.instance_id, false);
        }
    }
}
