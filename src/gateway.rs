//! Builds the gateway from its config, binds the listeners, and runs it until a graceful
//! drain (SPEC §10).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::auth::handshake::{OriginPolicy, TrustedProxies};
use crate::auth::Authenticator;
use crate::cluster::{Cluster, Local};
use crate::config::{Config, Profile, StateBackend};
use crate::delivery::Delivery;
use crate::hub::Hub;
use crate::limits::Limits;
use crate::ops::metrics;
use crate::protocol::CloseCode;
use crate::state::instrumented::Instrumented;
use crate::state::memory::MemoryState;
use crate::state::redis::RedisState;
use crate::state::State;
use crate::tls::CertStore;
use crate::transport::Transport;
use crate::upstream::Upstream;

/// Everything a connection needs, shared by all of them.
pub struct Gateway {
    pub cfg: Config,
    pub instance_id: String,
    pub auth: Authenticator,
    pub hub: Arc<Hub>,
    pub state: Arc<dyn State>,
    pub delivery: Arc<Delivery>,
    /// With Redis: the other instances (bus, registry).
    pub cluster: Option<Arc<Cluster>>,
    pub upstream: Upstream,
    /// Presence changes for the business backend (`upstream.mode = "grpc"`).
    pub status: Option<crate::grpc::business::StatusNotifier>,
    pub certs: Option<Arc<CertStore>>,
    /// The UDP port WebTransport sessions are served on (the demo page points browsers at it).
    pub webtransport_port: Option<u16>,
    pub limits: Arc<Limits>,
    pub trusted: TrustedProxies,
    pub origins: OriginPolicy,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Cancelled when the drain begins: accept loops stop, unauthenticated sessions end.
    pub shutdown: CancellationToken,
    /// Every session task, so the drain can wait for them.
    pub sessions: TaskTracker,
    draining: AtomicBool,
    state_up: AtomicBool,
    next_id: AtomicU64,
}

impl Gateway {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Ready: started and not draining (`/readyz`).
    pub fn is_ready(&self) -> bool {
        !self.is_draining()
    }

    pub fn state_up(&self) -> bool {
        self.state_up.load(Ordering::Relaxed)
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Close a user's connections with 4502 and revoke their tokens issued until now, so
    /// a kicked client cannot simply reconnect (SPEC §2). With `device`, only that device:
    /// its connections and the tokens whose `did` is that device; the user's other devices
    /// keep their sessions and tokens.
    pub async fn kick_user(
        &self,
        user: &str,
        device: Option<&str>,
        reason: &str,
    ) -> Result<u32, crate::state::StateError> {
        let reason = if reason.is_empty() {
            CloseCode::Kicked.reason()
        } else {
            reason
        };
        // The revocation is recorded before the hub is asked for the connections: a session
        // that registers after `hub.kick` looked checks it (session::serve).
        self.revoke(user, device, Some(reason)).await?;
        Ok(self.hub.kick(user, device, CloseCode::Kicked, reason))
    }

    /// Refuse from now on every token of `user` issued until now (of its device `device`
    /// only, when given); returns the cache entries evicted.
    pub async fn revoke_tokens(
        &self,
        user: &str,
        device: Option<&str>,
    ) -> Result<u32, crate::state::StateError> {
        self.revoke(user, device, None).await
    }

    /// Record a revocation in the store, here, and on every other instance (which also
    /// kicks the connections concerned when `kick` gives a reason).
    async fn revoke(
        &self,
        user: &str,
        device: Option<&str>,
        kick: Option<&str>,
    ) -> Result<u32, crate::state::StateError> {
        let now = crate::now_ms();
        self.state.revoke(user, device, now).await?;
        if let Some(c) = &self.cluster {
            c.revoke(user, device, now, kick);
        }
        Ok(self.auth.revoke(user, device, now))
    }
}

/// The addresses the listeners actually bound (port 0 in tests).
#[derive(Debug, Clone, Default)]
pub struct BoundAddrs {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub webtransport: Option<SocketAddr>,
    pub grpc: Option<SocketAddr>,
    pub ops: Option<SocketAddr>,
}

/// A started gateway.
pub struct Running {
    pub gw: Arc<Gateway>,
    pub addrs: BoundAddrs,
    /// Background tasks (listeners, maintenance); stopped after the drain.
    background: TaskTracker,
    stop_background: CancellationToken,
}

async fn bind(value: &str, what: &str) -> anyhow::Result<Option<TcpListener>> {
    let Some(addr) = crate::config::ListenConfig::addr(value) else {
        return Ok(None);
    };
    let l = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind listen.{what} on {addr}"))?;
    Ok(Some(l))
}

/// Build and start a gateway: bind every configured listener and begin serving.
pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    crate::tls::install_crypto_provider();
    let metrics_handle = metrics::install();
    metrics::build_info();

    let instance_id = cfg.instance_id();
    let auth = match cfg.auth.mode {
        crate::config::AuthMode::Jwt => {
            Authenticator::from_config(&cfg.auth, cfg.profile).context("auth")?
        }
        crate::config::AuthMode::Grpc => {
            let channel =
                crate::grpc::business::channel(&cfg.auth.endpoint).context("auth.endpoint")?;
            let verifier = crate::grpc::auth::GrpcVerifier::new(channel, cfg.upstream.timeout);
            Authenticator::new(Arc::new(verifier), &cfg.auth)
        }
    };
    let hub = Arc::new(Hub::new(
        cfg.sessions.policy,
        cfg.sessions.max_per_user,
        cfg.sessions.outbound_queue_bytes,
    ));
    let settings = crate::state::Settings::from_config(&cfg);
    let (state, cluster): (Arc<dyn State>, _) = match cfg.state.backend {
        StateBackend::Memory => (
            Arc::new(Instrumented::new(Arc::new(MemoryState::new(&settings)))),
            None,
        ),
        StateBackend::Redis => {
            let redis = RedisState::connect(&settings)
                .await
                .map_err(|e| anyhow::anyhow!(e.chain()))
                .context("state.redis_url")?;
            let cluster = Cluster::new(&instance_id, &cfg.cluster, &cfg.state, &redis);
            let c = cluster.clone();
            hub.on_replacing(move |user, platform| c.replaced(user, platform));
            (Arc::new(Instrumented::new(Arc::new(redis))), Some(cluster))
        }
    };
    // Mark this instance alive before it serves, so its connections' presence shows.
    let state_up_at_start = match state.maintain(&instance_id).await {
        Ok(()) => true,
        Err(e) => {
            warn!(error = %e.chain(), "the state store does not answer yet: durable pushes fail until it does");
            false
        }
    };
    metrics::state_up(state_up_at_start);
    let delivery = Delivery::new(hub.clone(), state.clone());
    let delivery = Arc::new(match &cluster {
        Some(c) => delivery.with_cluster(c.clone()),
        None => delivery,
    });
    let (upstream, status) = match cfg.upstream.mode {
        crate::config::UpstreamMode::Relay => (Upstream::Relay(delivery.clone()), None),
        crate::config::UpstreamMode::Grpc => {
            use crate::grpc::business::{channel, BusinessUpstream, StatusNotifier};
            let channel = channel(&cfg.upstream.endpoint).context("upstream.endpoint")?;
            let business =
                BusinessUpstream::new(channel.clone(), cfg.upstream.timeout, instance_id.clone());
            (
                Upstream::Grpc(Arc::new(business)),
                Some(StatusNotifier::spawn(channel)),
            )
        }
    };
    let certs = if cfg.listen.https.is_empty() && cfg.listen.webtransport.is_empty() {
        None
    } else if !cfg.tls.cert_file.is_empty() {
        Some(Arc::new(CertStore::from_files(
            &cfg.tls.cert_file,
            &cfg.tls.key_file,
        )?))
    } else if cfg.profile == Profile::Dev {
        Some(Arc::new(CertStore::dev()?))
    } else {
        None
    };
    let trusted = TrustedProxies::parse(&cfg.net.trusted_proxies).map_err(anyhow::Error::msg)?;
    let origins = OriginPolicy::new(&cfg.net.allowed_origins, cfg.profile == Profile::Dev);
    let limits = Arc::new(Limits::new(&cfg));

    let http = bind(&cfg.listen.http, "http").await?;
    let https = match (&certs, cfg.listen.https.is_empty()) {
        (Some(_), false) => bind(&cfg.listen.https, "https").await?,
        (None, false) => {
            warn!("listen.https is set but no TLS certificate is configured: HTTPS disabled");
            None
        }
        _ => None,
    };
    let webtransport = match (
        &certs,
        crate::config::ListenConfig::addr(&cfg.listen.webtransport),
    ) {
        (Some(certs), Some(addr)) => Some(
            crate::transport::wt::bind(&cfg, certs, addr)
                .with_context(|| format!("cannot bind listen.webtransport on {addr} (UDP)"))?,
        ),
        (None, Some(_)) => {
            warn!("listen.webtransport is set but no TLS certificate is configured: WebTransport disabled");
            None
        }
        _ => None,
    };
    let grpc = bind(&cfg.listen.grpc, "grpc").await?;
    let ops = bind(&cfg.listen.ops, "ops").await?;
    let addrs = BoundAddrs {
        http: http.as_ref().and_then(|l| l.local_addr().ok()),
        https: https.as_ref().and_then(|l| l.local_addr().ok()),
        webtransport: webtransport.as_ref().and_then(|e| e.local_addr().ok()),
        grpc: grpc.as_ref().and_then(|l| l.local_addr().ok()),
        ops: ops.as_ref().and_then(|l| l.local_addr().ok()),
    };

    let gw = Arc::new(Gateway {
        cfg,
        instance_id,
        auth,
        hub,
        state,
        delivery,
        cluster,
        upstream,
        status,
        certs,
        webtransport_port: addrs.webtransport.map(|a| a.port()),
        limits,
        trusted,
        origins,
        metrics: metrics_handle,
        shutdown: CancellationToken::new(),
        sessions: TaskTracker::new(),
        draining: AtomicBool::new(false),
        state_up: AtomicBool::new(state_up_at_start),
        next_id: AtomicU64::new(1),
    });

    // Built before anything is spawned: a gRPC API that cannot start stops the start.
    let grpc = match grpc {
        Some(l) => Some((crate::grpc::server::Api::build(gw.clone()).await?, l)),
        None => None,
    };
    let background = TaskTracker::new();
    let stop_background = CancellationToken::new();
    if let Some(l) = http {
        background.spawn(crate::transport::http::serve(
            gw.clone(),
            l,
            None,
            Transport::Ws,
        ));
    }
    if let (Some(l), Some(certs)) = (https, &gw.certs) {
        let tls = tokio_rustls::TlsAcceptor::from(certs.server_config(&[b"http/1.1"]));
        background.spawn(crate::transport::http::serve(
            gw.clone(),
            l,
            Some(tls),
            Transport::Wss,
        ));
    }
    if let Some(endpoint) = webtransport {
        background.spawn(crate::transport::wt::serve(
            gw.clone(),
            endpoint,
            stop_background.clone(),
        ));
    }
    if let Some((api, l)) = grpc {
        background.spawn(api.serve(l, stop_background.clone()));
    }
    if let Some(l) = ops {
        background.spawn(crate::ops::server::serve(
            gw.clone(),
            l,
            stop_background.clone(),
        ));
    }
    if let Some(certs) = &gw.certs {
        // Exported from start, like every series; each scrape refreshes it.
        certs.publish_expiry();
        background.spawn(certs.spawn_maintenance(stop_background.clone()));
    }
    background.spawn(maintenance(gw.clone(), stop_background.clone()));
    if let Some(cluster) = &gw.cluster {
        // Weak: the tasks stop with the gateway, they do not keep it alive.
        let weak = Arc::downgrade(&gw);
        cluster.start(
            &background,
            stop_background.clone(),
            Local {
                hub: gw.hub.clone(),
                state: gw.state.clone(),
                revoke: Box::new(move |user, device, at_ms| {
                    if let Some(gw) = weak.upgrade() {
                        gw.auth.revoke(user, device, at_ms);
                    }
                }),
            },
        );
        if !cluster.listening(gw.cfg.state.timeout * 2).await {
            warn!("the cluster bus is not subscribed yet: serving anyway, it keeps trying");
        }
    }
    metrics::draining(false);
    info!(
        instance = %gw.instance_id,
        http = %shown(addrs.http), https = %shown(addrs.https),
        webtransport = %shown(addrs.webtransport), grpc = %shown(addrs.grpc), ops = %shown(addrs.ops),
        profile = %gw.cfg.profile.as_str(),
        "imgate started"
    );
    Ok(Running {
        gw,
        addrs,
        background,
        stop_background,
    })
}

/// A listener's address for the logs: `127.0.0.1:8080`, or `off`.
fn shown(addr: Option<SocketAddr>) -> String {
    addr.map_or_else(|| "off".to_string(), |a| a.to_string())
}

/// How often the state store's upkeep runs: every `cluster.heartbeat`, which keeps this
/// instance's presence alive well within `cluster.instance_ttl` and notices the store
/// going down or coming back.
fn maintenance_period(cfg: &Config) -> Duration {
    cfg.cluster
        .heartbeat
        .clamp(Duration::from_millis(100), Duration::from_secs(5))
}

/// Periodic work: the backend's upkeep (memory: expiry; Redis: this instance's presence
/// stays alive) and the state-store health gauge.
async fn maintenance(gw: Arc<Gateway>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(maintenance_period(&gw.cfg));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let up = match gw.state.maintain(&gw.instance_id).await {
            Ok(()) => gw.state.ping().await.is_ok(),
            Err(e) => {
                debug!(error = %e.chain(), "state store upkeep failed");
                false
            }
        };
        if up != gw.state_up.swap(up, Ordering::Relaxed) {
            if up {
                info!("the state store answers again");
            } else {
                warn!("the state store does not answer: durable pushes fail with UNAVAILABLE");
            }
        }
        metrics::state_up(up);
    }
}

impl Running {
    /// Wait for SIGTERM or SIGINT, then drain.
    pub async fn run_until_signal(self) -> anyhow::Result<()> {
        wait_for_signal().await;
        info!("signal received: draining");
        self.drain().await;
        Ok(())
    }

    /// Graceful drain (SPEC §10): not ready, stop accepting, `kick` 4101 to every client
    /// spread over `drain_window`, flush, wait for sessions (bounded by `shutdown.timeout`).
    pub async fn drain(self) {
        let gw = &self.gw;
        let started = tokio::time::Instant::now();
        gw.draining.store(true, Ordering::Relaxed);
        metrics::draining(true);
        gw.shutdown.cancel();
        gw.sessions.close();

        let mut conns = gw.hub.all();
        // Spread the kicks with jitter so reconnects do not stampede the other instances.
        use rand::seq::SliceRandom;
        conns.shuffle(&mut rand::rng());
        let window = gw.cfg.shutdown.drain_window;
        let n = conns.len().max(1) as u32;
        let deadline = started + gw.cfg.shutdown.timeout;
        for (i, c) in conns.iter().enumerate() {
            let at = started + window * (i as u32) / n;
            tokio::time::sleep_until(at.min(deadline)).await;
            c.control
                .close(CloseCode::Draining, CloseCode::Draining.reason());
        }
        if tokio::time::timeout_at(deadline, gw.sessions.wait())
            .await
            .is_err()
        {
            warn!(
                left = gw.hub.connection_count(),
                "shutdown timeout: exiting with sessions open"
            );
        }
        if let Some(status) = &gw.status {
            status.flush_and_stop(Duration::from_secs(2)).await;
        }
        self.stop_background.cancel();
        self.background.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.background.wait()).await;
        // Sessions removed their own presence; whatever is left (a session that outlived
        // the timeout, a removal that failed) goes with the instance (SPEC §10), after the
        // upkeep stopped (it would mark the instance alive again).
        match gw.state.remove_instance(&gw.instance_id).await {
            Ok(0) => {}
            Ok(n) => info!(removed = n, "presence left by this instance removed"),
            Err(e) => warn!(error = %e.chain(), "presence of this instance not removed"),
        }
        if let Some(c) = &gw.cluster {
            c.leave().await;
        }
        info!(elapsed_ms = started.elapsed().as_millis() as u64, "drained");
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
