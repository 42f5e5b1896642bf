//! The per-connection driver: authentication, the read loop, the writer, heartbeats,
//! limits and resume, for any [`Session`]. One task per connection owns everything here.

pub mod rate;
mod sync;

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

use rate::{RateLimiter, Verdict};
use sync::Sync;

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

/// How long a connection waits after a refused refresh before its next one is checked.
const REAUTH_BACKOFF: Duration = Duration::from_secs(10);

/// Sends in flight to the business backend per connection; more get `upstream_unavailable`.
const SENDS_IN_FLIGHT: usize = 32;

/// Forwards one connection's sends to the business backend in order, off the connection's
/// task, and hands the replies back.
struct UpstreamWorker {
    sends: mpsc::Sender<crate::protocol::SendFrame>,
    replies: mpsc::Receiver<Reply>,
}

impl UpstreamWorker {
    fn spawn(env: &Arc<SessionEnv>, sender: &Arc<ConnInfo>) -> UpstreamWorker {
        let (sends, mut rx) = mpsc::channel(SENDS_IN_FLIGHT);
        let (tx, replies) = mpsc::channel(SENDS_IN_FLIGHT);
        let tracker = env.lifecycle.sessions.clone();
        let (env, sender) = (env.clone(), sender.clone());
        // Ends with its connection (review F12): the sends still queued are dropped and the
        // one in flight is cancelled, rather than forwarded for a client that is gone (which
        // would retry them on its next connection) with no bound on such orphans.
        tracker.spawn(async move {
            loop {
                let send = tokio::select! {
                    s = rx.recv() => match s {
                        Some(s) => s,
                        None => return,
                    },
                    _ = tx.closed() => return,
                };
                let reply = tokio::select! {
                    r = env.services.upstream.handle(&sender, send) => r,
                    _ = tx.closed() => return,
                };
                if tx.send(reply).await.is_err() {
                    return;
                }
            }
        });
        UpstreamWorker { sends, replies }
    }
}

/// The next reply from the upstream worker; pending forever when there is none.
async fn next_reply(worker: &mut Option<UpstreamWorker>) -> Option<Reply> {
    match worker {
        Some(w) => w.replies.recv().await,
        None => std::future::pending().await,
    }
}

/// How long the final writes (queued frames, `kick`) may take before the socket is dropped.
const FINAL_WRITE: Duration = Duration::from_secs(5);

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
                    if let Err(e) = state.remove_presence(&info.user, &info.session).await {
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

    async fn authenticate(
        &mut self,
        adm: &mut Admission,
    ) -> Result<(Identity, Option<String>), End> {
        if let Some(result) = adm.handshake_auth.take() {
            return result.map(|id| (id, None)).map_err(auth_end);
        }
        let deadline = Instant::now() + self.env.auth_timeout;
        loop {
            // Pongs to a client that does not read must not hold its unauthenticated slot
            // past the auth deadline (review F19).
            match tokio::time::timeout_at(deadline, self.flush()).await {
                Ok(r) => r?,
                Err(_) => return Err(End::Gone(false)),
            }
            let inbound = tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(End::Kick(CloseCode::Timeout, "no auth frame in time".into()));
                }
                _ = self.env.lifecycle.shutdown.cancelled() => return Err(End::kick(CloseCode::Draining)),
                r = self.session.recv() => r?,
            };
            let Some(data) = self.inbound_frame(inbound)? else {
                continue;
            };
            let decoded = self.codec.decode(&data);
            if !self.within_rate(&decoded)? {
                continue;
            }
            match decoded {
                Ok(ClientFrame::Auth { token, since }) => {
                    self.count_received("auth");
                    let id = self
                        .env
                        .services
                        .auth
                        .authenticate(&token)
                        .await
                        .map_err(auth_end)?;
                    return Ok((id, since));
                }
                Ok(ClientFrame::Ping { id }) => {
                    self.count_received("ping");
                    self.queue(ServerFrame::Pong {
                        id,
                        ts: crate::now_ms(),
                    });
                }
                Ok(_) | Err(DecodeError::UnknownType { .. }) | Err(DecodeError::BadSend { .. }) => {
                    return Err(End::Kick(
                        CloseCode::Unauthorized,
                        "authenticate first".into(),
                    ));
                }
                Err(DecodeError::Malformed(m)) => {
                    return Err(End::Kick(CloseCode::ProtocolError, m))
                }
            }
        }
    }

    // ---- the authenticated session ------------------------------------------------------

    async fn serve(&mut self, identity: Identity, since: Option<String>, adm: &Admission) -> End {
        let env = self.env.clone();
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
        tracing::Span::current().record("user", identity.user.as_str());
        let info = Arc::new(ConnInfo {
            id: env.services.hub.next_conn_id(),
            session: format!("{:016x}", rand::random::<u64>()),
            user: identity.user.clone(),
            device,
            platform,
            transport: self.transport,
            connected_at_ms: crate::now_ms(),
        });
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
            conn: info.session.clone(),
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

    async fn welcome(
        &mut self,
        info: &ConnInfo,
        identity: &Identity,
        since: Option<&str>,
        keeps_cursor: bool,
    ) -> Result<Sync, End> {
        let env = self.env.clone();
        let limit = env.replay_limit.max(1);
        // Head, cursors and the first replay batch in one call: one round trip to a remote
        // store (presence was the other).
        let resumed = env
            .services
            .state
            .resume(
                &info.user,
                keeps_cursor.then_some(info.device.as_str()),
                since,
                limit,
            )
            .await?;
        let mut sync = Sync::start(resumed.head.clone(), resumed.cursors, since);
        sync.keeps_cursor = keeps_cursor;
        self.queue(ServerFrame::Welcome(Welcome {
            session: info.session.clone(),
            user: info.user.clone(),
            device: info.device.clone(),
            platform: info.platform.clone(),
            transport: self.transport.as_str().into(),
            instance: env.services.instance_id.clone(),
            heartbeat_ms: env.sessions.heartbeat.as_millis() as u64,
            max_frame: env.limits.max_frame as u64,
            epoch: resumed.head.epoch,
            head_seq: resumed.head.head_seq,
            cursor: resumed.cursors.device.unwrap_or(0),
            token_expires_at_ms: identity.expires_at_ms,
        }));
        if resumed.after != sync.last_sent {
            // Not expected (both follow `resume_point`); read from where the session stands.
            self.replay_next(&mut sync, info).await?;
        } else {
            self.replay_batch(&mut sync, info, resumed.range).await?;
        }
        Ok(sync)
    }

    // ---- delivery -----------------------------------------------------------------------

    async fn on_pushes(
        &mut self,
        sync: &mut Sync,
        info: &ConnInfo,
        items: &mut Vec<Arc<PushItem>>,
    ) -> Result<(), End> {
        for item in items.drain(..) {
            match (item.push.seq, item.push.epoch.as_deref()) {
                (Some(seq), Some(epoch)) => {
                    if epoch != sync.epoch {
                        // The inbox was lost under a live session: have the client resync.
                        return Err(End::Kick(CloseCode::Internal, "inbox epoch changed".into()));
                    }
                    if !sync.live {
                        // Replay will reach it (no live durable push before `synced`).
                        sync.max_live_seen = sync.max_live_seen.max(seq);
                        continue;
                    }
                    if seq <= sync.last_sent {
                        continue;
                    }
                    if seq > sync.last_sent + 1 {
                        Box::pin(self.fill_gap(sync, info, seq - 1)).await?;
                    }
                    self.queue_push(&item);
                    sync.last_sent = seq;
                }
                _ => self.queue_push(&item),
            }
        }
        Ok(())
    }

    /// Send stored entries up to `upto` that this device has not been sent yet.
    async fn fill_gap(&mut self, sync: &mut Sync, info: &ConnInfo, upto: u64) -> Result<(), End> {
        let limit = self.env.replay_limit.max(1);
        while sync.last_sent < upto {
            let range = self
                .env
                .services
                .state
                .read_after(&info.user, sync.last_sent, limit)
                .await?;
            let mut progressed = false;
            for m in range.messages.into_iter().take_while(|m| m.seq <= upto) {
                sync.last_sent = m.seq;
                self.queue_stored(m, &range.epoch);
                progressed = true;
            }
            if !progressed {
                break; // trimmed or expired meanwhile: nothing more to send
            }
            // Paced like replay: write each batch before reading the next, so a large gap
            // is never held in memory whole.
            if sync.last_sent < upto {
                self.flush().await?;
            }
        }
        Ok(())
    }

    /// Send the next replay batch; ends with `synced` once nothing is left.
    async fn replay_next(&mut self, sync: &mut Sync, info: &ConnInfo) -> Result<(), End> {
        let limit = self.env.replay_limit.max(1);
        let range = self
            .env
            .services
            .state
            .read_after(&info.user, sync.last_sent, limit)
            .await?;
        self.replay_batch(sync, info, range).await
    }

    /// Send one replay batch read after `sync.last_sent`; ends with `synced` once nothing
    /// is left.
    async fn replay_batch(
        &mut self,
        sync: &mut Sync,
        info: &ConnInfo,
        range: crate::state::InboxRange,
    ) -> Result<(), End> {
        let limit = self.env.replay_limit.max(1);
        if range.epoch != sync.epoch {
            return Err(End::Kick(CloseCode::Internal, "inbox epoch changed".into()));
        }
        if range.trimmed {
            sync.complete = false;
        }
        let n = range.messages.len();
        // A batch is bounded in bytes too (the connection's outbound budget): 200 large
        // entries would otherwise be one multi-megabyte write per reconnecting device.
        let budget = self.env.sessions.outbound_queue_bytes;
        let mut bytes = 0;
        let mut cut = false;
        for m in range.messages {
            if bytes >= budget {
                cut = true;
                break;
            }
            bytes += m.body.len();
            sync.last_sent = m.seq;
            sync.replayed += 1;
            self.queue_stored(m, &range.epoch);
        }
        if (cut || n >= limit) && sync.last_sent < range.head_seq {
            sync.awaiting_ack = Some(sync.last_sent);
            return Ok(());
        }
        sync.awaiting_ack = None;
        sync.live = true;
        self.queue(ServerFrame::Synced {
            epoch: sync.epoch.clone(),
            seq: sync.last_sent,
            replayed: sync.replayed,
            complete: sync.complete,
        });
        if sync.max_live_seen > sync.last_sent {
            let upto = sync.max_live_seen;
            Box::pin(self.fill_gap(sync, info, upto)).await?;
        }
        Ok(())
    }

    fn queue_stored(&mut self, m: crate::state::StoredMessage, epoch: &str) {
        let push = crate::protocol::Push {
            id: m.id,
            from: (!m.from.is_empty()).then_some(m.from),
            kind: (!m.kind.is_empty()).then_some(m.kind),
            body: m.body,
            ts: m.ts_ms,
            seq: Some(m.seq),
            epoch: Some(epoch.to_string()),
        };
        self.queue(ServerFrame::Push(push));
    }

    fn queue_push(&mut self, item: &PushItem) {
        self.out.push(item.encoded(self.codec));
        self.out_types.push("push");
        self.out_pushes.push(item.accepted);
    }

    // ---- inbound ------------------------------------------------------------------------

    /// Liveness, size/kind checks and the rate limit; the frame bytes when there is one to decode.
    fn inbound_frame(&mut self, inbound: Option<Inbound>) -> Result<Option<Bytes>, End> {
        let now = Instant::now();
        self.last_inbound = now;
        let t = self.transport.as_str();
        let data = match inbound {
            None => return Err(End::Gone(true)),
            Some(Inbound::Alive) => {
                // WebSocket control frames count against the rate too (review F19): the
                // WebSocket layer answers a ping by itself, so a flood of them is closed once
                // it is sustained, like any other.
                if matches!(self.rate.check(now), Verdict::Close) {
                    return Err(End::kick(CloseCode::RateLimited));
                }
                return Ok(None);
            }
            Some(Inbound::Text(d)) if self.codec == Codec::Json => d,
            Some(Inbound::Binary(d)) if self.codec == Codec::Proto => d,
            Some(Inbound::Frame(d)) => d,
            Some(_) => {
                return Err(End::Kick(
                    CloseCode::ProtocolError,
                    format!(
                        "the {} codec takes {} messages",
                        self.codec.as_str(),
                        match self.codec {
                            Codec::Json => "text",
                            Codec::Proto => "binary",
                        }
                    ),
                ))
            }
        };
        metrics::bytes_received(t, data.len() as u64);
        Ok(Some(data))
    }

    /// The inbound rate limit (SPEC §3): whether to handle this frame. The one `error`
    /// sent per window carries the id of the frame that went over, when it had one.
    fn within_rate(&mut self, frame: &Result<ClientFrame, DecodeError>) -> Result<bool, End> {
        let t = self.transport.as_str();
        match self.rate.check(Instant::now()) {
            Verdict::Allow => Ok(true),
            Verdict::Warn => {
                metrics::rate_limited(t);
                self.queue(ServerFrame::Error {
                    code: "rate_limited".into(),
                    message: format!(
                        "more than {} frames per second",
                        self.env.limits.rate_per_sec
                    ),
                    id: frame_id(frame),
                });
                Ok(false)
            }
            Verdict::Drop => {
                metrics::frame_dropped(t, "rate_limited");
                Ok(false)
            }
            Verdict::Close => Err(End::kick(CloseCode::RateLimited)),
        }
    }

    async fn on_inbound(
        &mut self,
        inbound: Option<Inbound>,
        sync: &mut Sync,
        info: &Arc<ConnInfo>,
        identity: &Identity,
    ) -> Result<(), End> {
        let Some(data) = self.inbound_frame(inbound)? else {
            return Ok(());
        };
        let decoded = self.codec.decode(&data);
        // An ack that moves this device forward is never rate limited: dropping one would
        // stall a replay paced by acks. Everything else counts.
        let useful_ack = matches!(&decoded, Ok(ClientFrame::Ack { seq, .. }) if *seq > sync.acked && *seq <= sync.last_sent);
        if !useful_ack && !self.within_rate(&decoded)? {
            return Ok(());
        }
        let frame = match decoded {
            Ok(f) => f,
            Err(DecodeError::Malformed(m)) => return Err(End::Kick(CloseCode::ProtocolError, m)),
            Err(DecodeError::UnknownType { ty, id }) => {
                self.count_received("unknown");
                self.queue(ServerFrame::Error {
                    code: "unknown_type".into(),
                    message: format!("unknown frame type {ty:?}"),
                    id,
                });
                return Ok(());
            }
            Err(DecodeError::BadSend { id, message }) => {
                self.count_received("send");
                self.queue(ServerFrame::Reply(Reply::err(id, "bad_request", message)));
                return Ok(());
            }
        };
        self.count_received(frame.type_name());
        match frame {
            ClientFrame::Ping { id } => self.queue(ServerFrame::Pong {
                id,
                ts: crate::now_ms(),
            }),
            ClientFrame::Send(send) => match &self.env.services.upstream {
                Upstream::Relay(_) => {
                    let reply = Box::pin(self.env.services.upstream.handle(info, send)).await;
                    self.queue(ServerFrame::Reply(reply));
                }
                Upstream::Grpc(_) => {
                    let env = &self.env;
                    let worker = self
                        .upstream
                        .get_or_insert_with(|| UpstreamWorker::spawn(env, info));
                    if let Err(e) = worker.sends.try_send(send) {
                        let id = match e {
                            mpsc::error::TrySendError::Full(s)
                            | mpsc::error::TrySendError::Closed(s) => s.id,
                        };
                        let reply = Reply::err(
                            id,
                            "upstream_unavailable",
                            "too many sends waiting for the backend",
                        );
                        self.queue(ServerFrame::Reply(reply));
                    }
                }
            },
            ClientFrame::Ack { seq, epoch } => {
                if epoch == sync.epoch && seq > sync.acked {
                    // A device cannot hold what it was not sent: an ack beyond it would
                    // skip those entries at its next resume.
                    sync.acked = seq.min(sync.last_sent);
                    let device = sync.keeps_cursor.then_some(info.device.as_str());
                    if let Err(e) = self
                        .env
                        .services
                        .state
                        .ack(&info.user, device, &epoch, sync.acked)
                        .await
                    {
                        debug!(error = %e.chain(), "ack not recorded");
                    }
                    if sync.awaiting_ack.is_some_and(|upto| seq >= upto) {
                        Box::pin(self.replay_next(sync, info)).await?;
                    }
                }
            }
            ClientFrame::Auth { token, .. } => Box::pin(self.reauth(&token, identity)).await,
        }
        Ok(())
    }

    /// Refresh in place: same user, new expiry. A failure is reported and the session lives
    /// on until the old token expires.
    async fn reauth(&mut self, token: &str, identity: &Identity) {
        if self.reauth_after.is_some_and(|t| Instant::now() < t) {
            self.queue(ServerFrame::Error {
                code: "reauth_failed".into(),
                message: "a refresh was refused less than 10 s ago: retry later".into(),
                id: None,
            });
            return;
        }
        let checked = self.env.services.auth.authenticate(token).await;
        if !matches!(&checked, Ok(new) if new.user == identity.user) {
            self.reauth_after = Some(Instant::now() + REAUTH_BACKOFF);
        }
        match checked {
            Ok(new) if new.user == identity.user => {
                self.arm_expiry(self.env.services.auth.session_deadline_ms(&new));
                self.queue(ServerFrame::Reauth {
                    token_expires_at_ms: new.expires_at_ms,
                });
            }
            Ok(_) => self.queue(ServerFrame::Error {
                code: "reauth_failed".into(),
                message: "the new token is for another user".into(),
                id: None,
            }),
            Err(e) => self.queue(ServerFrame::Error {
                code: "reauth_failed".into(),
                message: e.to_string(),
                id: None,
            }),
        }
    }

    async fn on_heartbeat(&mut self) -> Result<(), End> {
        if self.last_inbound.elapsed() >= self.env.sessions.idle_timeout {
            return Err(End::Kick(
                CloseCode::Timeout,
                "no traffic from the client".into(),
            ));
        }
        let limit = self.env.limits.write_timeout;
        bounded(limit, self.control.as_deref(), self.session.ping()).await
    }

    // ---- output -------------------------------------------------------------------------

    fn arm_expiry(&mut self, expires_at_ms: i64) {
        let left = (expires_at_ms - crate::now_ms()).max(0) as u64;
        self.expiry
            .as_mut()
            .reset(Instant::now() + Duration::from_millis(left));
    }

    fn count_received(&self, ty: &'static str) {
        metrics::frame_received(self.transport.as_str(), ty);
    }

    fn queue(&mut self, frame: ServerFrame) {
        self.out_types.push(frame.type_name());
        self.out.push(self.codec.encode(&frame));
    }

    /// Write everything queued in one batch, bounded (SPEC §9 `limits.write_timeout`): a
    /// client that does not take a write in time is treated as gone.
    async fn flush(&mut self) -> Result<(), End> {
        if self.out.is_empty() {
            return Ok(());
        }
        let limit = self.env.limits.write_timeout;
        let written = bounded(limit, self.control.as_deref(), self.session.send(&self.out)).await;
        if let Err(end) = written {
            if matches!(end, End::Kick(..)) {
                // What was not handed to the socket is dropped: a slow consumer is made
                // whole by replay, and a partly written frame completes before the kick.
                self.out.clear();
                self.out_types.clear();
                self.out_pushes.clear();
            }
            return Err(end);
        }
        let t = self.transport.as_str();
        metrics::bytes_sent(t, self.out.iter().map(|b| b.len() as u64).sum());
        for ty in self.out_types.drain(..) {
            metrics::frames_sent(t, ty, 1);
        }
        for accepted in self.out_pushes.drain(..) {
            metrics::push_delivery(accepted.elapsed().as_secs_f64());
        }
        self.out.clear();
        Ok(())
    }

    /// Send the kick when one is due, close, and say which code for metrics.
    async fn finish(&mut self, end: End) -> &'static str {
        self.control = None;
        match end {
            End::Kick(code, reason) => {
                self.queue(ServerFrame::Kick {
                    code: code.code(),
                    reason: reason.clone(),
                });
                if let Ok(Ok(())) = tokio::time::timeout(FINAL_WRITE, self.flush()).await {
                    // The close frame is a write too: a client that stopped reading right
                    // after the kick must not hold the connection (and its slots) open.
                    let _ =
                        tokio::time::timeout(FINAL_WRITE, self.session.close(code.code(), &reason))
                            .await;
                }
                code.as_str()
            }
            End::Gone(true) => "1000",
            End::Gone(false) => "1006",
        }
    }
}

/// The client's `id` of a frame, when it has one, for an `error` about that frame.
fn frame_id(frame: &Result<ClientFrame, DecodeError>) -> Option<String> {
    match frame {
        Ok(ClientFrame::Ping { id }) => id.clone(),
        Ok(ClientFrame::Send(s)) => Some(s.id.clone()),
        Err(DecodeError::UnknownType { id, .. }) => id.clone(),
        Err(DecodeError::BadSend { id, .. }) => Some(id.clone()),
        Ok(ClientFrame::Auth { .. } | ClientFrame::Ack { .. }) | Err(DecodeError::Malformed(_)) => {
            None
        }
    }
    .filter(|id| !id.is_empty())
}

/// What `items` weighed in their connection's outbound byte budget.
fn queued_bytes(items: &[Arc<PushItem>], codec: Codec) -> usize {
    items.iter().map(|i| i.encoded(codec).len()).sum()
}

/// A write to the client, bounded by `limit` and given up when the connection is asked to
/// close meanwhile (a 4100 from a full queue, a kick, the drain): a write blocked on a client
/// that does not read must hide neither.
async fn bounded(
    limit: Duration,
    control: Option<&Control>,
    write: impl std::future::Future<Output = Result<(), SessionError>>,
) -> Result<(), End> {
    let write = tokio::time::timeout(limit, write);
    let written = match control {
        Some(control) => tokio::select! {
            r = write => r,
            (code, reason) = control.requested() => return Err(End::Kick(code, reason)),
        },
        None => write.await,
    };
    match written {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(End::from(e)),
        Err(_) => Err(End::Gone(false)),
    }
}

fn auth_end(e: AuthError) -> End {
    End::Kick(e.close_code(), e.to_string())
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
