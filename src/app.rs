//! The composition root: builds every part of the gateway from its config, binds the
//! listeners, spawns the services and drains them (SPEC §10). Nothing below imports this
//! file; each consumer is handed only what it uses (`SessionEnv`, `Edge`, `ApiEnv`,
//! `OpsView`).
//!
//! Adding a long-lived service (the cluster bus, say) is one `lifecycle.spawn_background`
//! call in `start`; adding a transport is one `bind_…` step and one spawn.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wtransport::endpoint::endpoint_side::Server;
use wtransport::Endpoint;

use crate::auth::handshake::{OriginPolicy, TrustedProxies};
use crate::auth::Authenticator;
use crate::cluster::{Cluster, Local};
use crate::config::{AuthMode, Config, ListenConfig, Profile, StateBackend, UpstreamMode};
use crate::delivery::Deliverer;
use crate::grpc::business::StatusNotifier;
use crate::hub::{Hub, PresenceEvents};
use crate::lifecycle::Lifecycle;
use crate::limits::Limits;
use crate::ops::metrics;
use crate::ops::server::OpsView;
use crate::protocol::CloseCode;
use crate::services::Services;
use crate::session::SessionEnv;
use crate::state::instrumented::Instrumented;
use crate::state::memory::MemoryState;
use crate::state::redis::RedisState;
use crate::state::State;
use crate::tls::CertStore;
use crate::transport::edge::Edge;
use crate::transport::Transport;
use crate::upstream::Upstream;

/// The addresses the listeners actually bound (port 0 in tests).
#[derive(Debug, Clone, Default)]
pub struct BoundAddrs {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub webtransport: Option<SocketAddr>,
    pub grpc: Option<SocketAddr>,
    pub ops: Option<SocketAddr>,
}

/// A started gateway: what it built, for the drain (and for tests to look at).
pub struct Running {
    pub cfg: Arc<Config>,
    pub services: Arc<Services>,
    pub lifecycle: Arc<Lifecycle>,
    pub limits: Arc<Limits>,
    pub certs: Option<Arc<CertStore>>,
    pub addrs: BoundAddrs,
    status: Option<Arc<StatusNotifier>>,
}

/// The listeners, bound before anything is spawned.
struct Listeners {
    http: Option<TcpListener>,
    https: Option<TcpListener>,
    webtransport: Option<Endpoint<Server>>,
    grpc: Option<TcpListener>,
    ops: Option<TcpListener>,
}

impl Listeners {
    fn addrs(&self) -> BoundAddrs {
        let tcp = |l: &Option<TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
        BoundAddrs {
            http: tcp(&self.http),
            https: tcp(&self.https),
            webtransport: self.webtransport.as_ref().and_then(|e| e.local_addr().ok()),
            grpc: tcp(&self.grpc),
            ops: tcp(&self.ops),
        }
    }
}

async fn bind(value: &str, what: &str) -> anyhow::Result<Option<TcpListener>> {
    let Some(addr) = ListenConfig::addr(value) else {
        return Ok(None);
    };
    let l = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind listen.{what} on {addr}"))?;
    Ok(Some(l))
}

async fn bind_all(cfg: &Config, certs: &Option<Arc<CertStore>>) -> anyhow::Result<Listeners> {
    let http = bind(&cfg.listen.http, "http").await?;
    let https = match (certs, cfg.listen.https.is_empty()) {
        (Some(_), false) => bind(&cfg.listen.https, "https").await?,
        (None, false) => {
            warn!("listen.https is set but no TLS certificate is configured: HTTPS disabled");
            None
        }
        _ => None,
    };
    let webtransport = match (certs, ListenConfig::addr(&cfg.listen.webtransport)) {
        (Some(certs), Some(addr)) => Some(
            crate::transport::wt::bind(cfg, certs, addr)
                .with_context(|| format!("cannot bind listen.webtransport on {addr} (UDP)"))?,
        ),
        (None, Some(_)) => {
            warn!("listen.webtransport is set but no TLS certificate is configured: WebTransport disabled");
            None
        }
        _ => None,
    };
    Ok(Listeners {
        http,
        https,
        webtransport,
        grpc: bind(&cfg.listen.grpc, "grpc").await?,
        ops: bind(&cfg.listen.ops, "ops").await?,
    })
}

fn build_auth(cfg: &Config) -> anyhow::Result<Authenticator> {
    Ok(match cfg.auth.mode {
        AuthMode::Jwt => Authenticator::from_config(&cfg.auth, cfg.profile).context("auth")?,
        AuthMode::Grpc => {
            let channel =
                crate::grpc::business::channel(&cfg.auth.endpoint).context("auth.endpoint")?;
            let verifier = crate::grpc::auth::GrpcVerifier::new(channel, cfg.upstream.timeout);
            Authenticator::new(Arc::new(verifier), &cfg.auth)
        }
    })
}

/// The state backend `state.backend` names, and with Redis the cluster of instances on
/// it. A new backend is one arm here.
async fn build_state(
    cfg: &Config,
    instance_id: &str,
) -> anyhow::Result<(Arc<dyn State>, Option<Arc<Cluster>>)> {
    let settings = crate::state::Settings::from_config(cfg);
    Ok(match cfg.state.backend {
        StateBackend::Memory => (
            Arc::new(Instrumented::new(Arc::new(MemoryState::new(&settings)))),
            None,
        ),
        StateBackend::Redis => {
            let redis = RedisState::connect(&settings)
                .await
                .map_err(|e| anyhow::anyhow!(e.chain()))
                .context("state.redis_url")?;
            let cluster = Cluster::new(instance_id, &cfg.cluster, &cfg.state, &redis);
            (Arc::new(Instrumented::new(Arc::new(redis))), Some(cluster))
        }
    })
}

fn build_upstream(
    cfg: &Config,
    instance_id: &str,
    delivery: &Arc<Deliverer>,
    lifecycle: &Lifecycle,
) -> anyhow::Result<(Upstream, Option<Arc<StatusNotifier>>)> {
    Ok(match cfg.upstream.mode {
        UpstreamMode::Relay => (Upstream::Relay(delivery.clone()), None),
        UpstreamMode::Grpc => {
            use crate::grpc::business::{channel, BusinessUpstream};
            let channel = channel(&cfg.upstream.endpoint).context("upstream.endpoint")?;
            let business =
                BusinessUpstream::new(channel.clone(), cfg.upstream.timeout, instance_id.into());
            // A background task: it outlives the sessions, and the drain flushes it last.
            let status = StatusNotifier::spawn(channel, lifecycle.background());
            (Upstream::Grpc(Arc::new(business)), Some(Arc::new(status)))
        }
    })
}

fn build_certs(cfg: &Config) -> anyhow::Result<Option<Arc<CertStore>>> {
    Ok(
        if cfg.listen.https.is_empty() && cfg.listen.webtransport.is_empty() {
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
        },
    )
}

/// Build and start a gateway: bind every configured listener and begin serving.
pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    crate::tls::install_crypto_provider();
    let metrics_handle = metrics::install();
    metrics::build_info();
    let cfg = Arc::new(cfg);
    let instance_id = cfg.instance_id();

    let auth = Arc::new(build_auth(&cfg)?);
    let hub = Arc::new(Hub::new(
        cfg.sessions.policy,
        cfg.sessions.max_per_user,
        cfg.sessions.outbound_queue_bytes,
    ));
    let (state, cluster) = build_state(&cfg, &instance_id).await?;
    if let Some(c) = &cluster {
        // Login-policy replacements reach the user's connections on the other instances.
        let c = c.clone();
        hub.on_replacing(move |user, platform| c.replaced(user, platform));
    }
    // Mark this instance alive before it serves, so its connections' presence shows.
    let state_up = match state.maintain(&instance_id).await {
        Ok(()) => true,
        Err(e) => {
            warn!(error = %e.chain(), "the state store does not answer yet: durable pushes fail until it does");
            false
        }
    };
    metrics::state_up(state_up);
    let lifecycle = Arc::new(Lifecycle::new(state_up));
    let delivery = Deliverer::new(hub.clone(), state.clone());
    let delivery = Arc::new(match &cluster {
        Some(c) => delivery.with_cluster(c.clone()),
        None => delivery,
    });
    let (upstream, status) = build_upstream(&cfg, &instance_id, &delivery, &lifecycle)?;
    let certs = build_certs(&cfg)?;
    let trusted = TrustedProxies::parse(&cfg.net.trusted_proxies).map_err(anyhow::Error::msg)?;
    let origins = OriginPolicy::new(&cfg.net.allowed_origins, cfg.profile == Profile::Dev);
    let limits = Arc::new(Limits::new(&cfg));
    let listeners = bind_all(&cfg, &certs).await?;
    let addrs = listeners.addrs();

    let services = Arc::new(Services {
        instance_id,
        auth: auth.clone(),
        hub,
        state,
        delivery,
        upstream,
        status: status.clone().map(|s| s as Arc<dyn PresenceEvents>),
        cluster,
    });
    let session = Arc::new(SessionEnv::new(&cfg, services.clone(), lifecycle.clone()));
    let edge = Arc::new(Edge {
        cfg: cfg.clone(),
        auth,
        limits: limits.clone(),
        trusted,
        origins,
        certs: certs.clone(),
        webtransport_port: addrs.webtransport.map(|a| a.port()),
        lifecycle: lifecycle.clone(),
        session_env: session,
    });
    // Built before anything is spawned: a gRPC API that cannot start stops the start.
    let grpc = match listeners.grpc {
        Some(l) => {
            let env = crate::grpc::server::ApiEnv {
                services: services.clone(),
                lifecycle: lifecycle.clone(),
                limits: cfg.limits.clone(),
            };
            Some((crate::grpc::api::Api::build(&cfg, env).await?, l))
        }
        None => None,
    };
    let ops = OpsView {
        metrics: metrics_handle,
        services: services.clone(),
        lifecycle: lifecycle.clone(),
        certs: certs.clone(),
    };
    spawn_services(
        &lifecycle,
        &edge,
        listeners.http,
        listeners.https,
        listeners.webtransport,
    );
    let stop = lifecycle.stop_background();
    if let Some((api, l)) = grpc {
        lifecycle.spawn_background(api.serve(l, stop.clone()));
    }
    if let Some(l) = listeners.ops {
        lifecycle.spawn_background(crate::ops::server::serve(Arc::new(ops), l, stop.clone()));
    }
    if let Some(certs) = &certs {
        // Exported from start, like every series; each scrape refreshes it.
        certs.publish_expiry();
        lifecycle.spawn_background(certs.clone().maintain(stop.clone()));
    }
    lifecycle.spawn_background(maintenance(
        services.clone(),
        lifecycle.clone(),
        maintenance_period(&cfg),
        stop.clone(),
    ));
    if let Some(cluster) = &services.cluster {
        let auth = services.auth.clone();
        cluster.start(
            lifecycle.background(),
            stop,
            Local {
                hub: services.hub.clone(),
                state: services.state.clone(),
                revoke: Box::new(move |user, device, at_ms| {
                    auth.revoke(user, device, at_ms);
                }),
            },
        );
        if !cluster.listening(cfg.state.timeout * 2).await {
            warn!("the cluster bus is not subscribed yet: serving anyway, it keeps trying");
        }
    }
    metrics::draining(false);
    info!(
        instance = %services.instance_id,
        http = %shown(addrs.http), https = %shown(addrs.https),
        webtransport = %shown(addrs.webtransport), grpc = %shown(addrs.grpc), ops = %shown(addrs.ops),
        profile = %cfg.profile.as_str(),
        "imgate started"
    );
    Ok(Running {
        cfg,
        services,
        lifecycle,
        limits,
        certs,
        addrs,
        status,
    })
}

/// The client-facing listeners. A new transport is one more spawn here.
fn spawn_services(
    lifecycle: &Lifecycle,
    edge: &Arc<Edge>,
    http: Option<TcpListener>,
    https: Option<TcpListener>,
    webtransport: Option<Endpoint<Server>>,
) {
    if let Some(l) = http {
        lifecycle.spawn_background(crate::transport::http::serve(
            edge.clone(),
            l,
            None,
            Transport::Ws,
        ));
    }
    if let (Some(l), Some(certs)) = (https, &edge.certs) {
        let tls = tokio_rustls::TlsAcceptor::from(certs.server_config(&[b"http/1.1"]));
        lifecycle.spawn_background(crate::transport::http::serve(
            edge.clone(),
            l,
            Some(tls),
            Transport::Wss,
        ));
    }
    if let Some(endpoint) = webtransport {
        lifecycle.spawn_background(crate::transport::wt::serve(
            edge.clone(),
            endpoint,
            lifecycle.stop_background(),
        ));
    }
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
async fn maintenance(
    services: Arc<Services>,
    lifecycle: Arc<Lifecycle>,
    period: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let state = &services.state;
        let up = match state.maintain(&services.instance_id).await {
            Ok(()) => state.ping().await.is_ok(),
            Err(e) => {
                debug!(error = %e.chain(), "state store upkeep failed");
                false
            }
        };
        if up != lifecycle.set_state_up(up) {
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
        let started = tokio::time::Instant::now();
        let (hub, lifecycle) = (&self.services.hub, &self.lifecycle);
        lifecycle.begin_drain();
        metrics::draining(true);

        let mut conns = hub.all();
        // Spread the kicks with jitter so reconnects do not stampede the other instances.
        use rand::seq::SliceRandom;
        conns.shuffle(&mut rand::rng());
        let window = self.cfg.shutdown.drain_window;
        let n = conns.len().max(1) as u32;
        let deadline = started + self.cfg.shutdown.timeout;
        for (i, c) in conns.iter().enumerate() {
            let at = started + window * (i as u32) / n;
            tokio::time::sleep_until(at.min(deadline)).await;
            c.control
                .close(CloseCode::Draining, CloseCode::Draining.reason());
        }
        if tokio::time::timeout_at(deadline, lifecycle.sessions.wait())
            .await
            .is_err()
        {
            warn!(
                left = hub.connection_count(),
                "shutdown timeout: exiting with sessions open"
            );
        }
        if let Some(status) = &self.status {
            status.flush_and_stop(Duration::from_secs(2)).await;
        }
        lifecycle
            .stop_background_tasks(Duration::from_secs(2))
            .await;
        // Sessions removed their own presence; whatever is left (a session that outlived
        // the timeout, a removal that failed) goes with the instance (SPEC §10), after the
        // upkeep stopped (it would mark the instance alive again).
        let state = &self.services.state;
        match state.remove_instance(&self.services.instance_id).await {
            Ok(0) => {}
            Ok(n) => info!(removed = n, "presence left by this instance removed"),
            Err(e) => warn!(error = %e.chain(), "presence of this instance not removed"),
        }
        if let Some(c) = &self.services.cluster {
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
