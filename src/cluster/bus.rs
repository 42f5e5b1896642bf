//! The bus between instances: Redis pub/sub, one channel per instance plus one broadcast
//! channel (docs/architecture.md says why not Streams, with figures).
//!
//! Publishing never waits on Redis from the push path: messages go through a bounded queue
//! to one task that writes whatever is queued as one pipeline (one round trip for a burst).
//! Subscribing uses a dedicated connection (a subscribed connection cannot run other
//! commands) that this module reconnects itself, trying the seed URLs in turn: in Redis
//! Cluster a classic PUBLISH reaches every node, so any one node will do.
//!
//! Pub/sub is at most once: a message published while the subscriber is reconnecting is
//! lost. Nothing durable depends on it (the inbox-head check in `cluster::Cluster` finds
//! what a lost notification would have said); transient pushes and broadcasts are lost, as
//! their contract allows.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::envelope::Envelope;
use crate::config::StateConfig;
use crate::ops::metrics;
use crate::state::redis::conn::Conn;

/// Messages waiting to be published. Beyond it the newest are dropped (and counted): the
/// bus is best effort, and a burst must not grow memory without bound.
const QUEUE: usize = 65_536;
/// Most messages written as one pipeline.
const BATCH: usize = 512;

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum To {
    Instance(String),
    All,
}

/// What `Bus::run_publisher` drains.
pub type Outbox = mpsc::Receiver<(To, Vec<u8>)>;

pub struct Bus {
    prefix: String,
    tx: mpsc::Sender<(To, Vec<u8>)>,
}

impl Bus {
    fn channel(prefix: &str, to: &To) -> String {
        match to {
            To::Instance(i) => format!("{prefix}bus:i:{i}"),
            // `*` cannot start an instance id's channel name: no clash with an instance
            // called "all".
            To::All => format!("{prefix}bus:*"),
        }
    }

    /// A bus that publishes over `conn`; `run_publisher` must be spawned with the receiver.
    pub fn new(prefix: &str) -> (Arc<Bus>, Outbox) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            Arc::new(Bus {
                prefix: prefix.to_string(),
                tx,
            }),
            rx,
        )
    }

    /// Queue a message; never waits.
    pub fn send(&self, to: To, env: &Envelope) {
        if self.tx.try_send((to, env.encode())).is_err() {
            debug!("bus queue full: message dropped");
        }
    }

    /// Write queued messages to Redis, a pipeline per burst.
    pub async fn run_publisher(
        self: Arc<Bus>,
        mut rx: Outbox,
        conn: Conn,
        timeout: Duration,
        stop: CancellationToken,
    ) {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                n = rx.recv_many(&mut batch, BATCH) => if n == 0 { return },
            }
            let mut pipe = ::redis::pipe();
            for (to, bytes) in &batch {
                pipe.cmd("PUBLISH")
                    .arg(Self::channel(&self.prefix, to))
                    .arg(bytes)
                    .ignore();
            }
            let mut c = conn.clone();
            match tokio::time::timeout(timeout, pipe.query_async::<()>(&mut c)).await {
                Ok(Ok(())) => {
                    for _ in 0..batch.len() {
                        metrics::cluster_message("out");
                    }
                }
                // Lost: durable pushes are found by the inbox-head check; the rest is at
                // most once by contract.
                Ok(Err(e)) => debug!(error = %e, lost = batch.len(), "bus publish failed"),
                Err(_) => debug!(lost = batch.len(), "bus publish timed out"),
            }
            batch.clear();
        }
    }
}

fn client(url: &str, cfg: &StateConfig) -> ::redis::RedisResult<::redis::Client> {
    let url = crate::state::redis::conn::info(url)?;
    if cfg.redis_ca_file.is_empty() {
        return ::redis::Client::open(url);
    }
    let pem = std::fs::read(&cfg.redis_ca_file).map_err(::redis::RedisError::from)?;
    ::redis::Client::build_with_tls(
        url,
        ::redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        },
    )
}

/// Receive this instance's and the broadcast channel's messages until `stop`, reconnecting
/// (seed after seed) whenever the connection drops or stops answering. `on_subscribed` runs
/// after every (re)subscription: what was published meanwhile is lost, and the caller
/// checks the inbox heads at once rather than at the next heartbeat.
#[allow(clippy::too_many_arguments)]
pub async fn run_subscriber(
    cfg: StateConfig,
    me: String,
    heartbeat: Duration,
    stop: CancellationToken,
    on_message: impl Fn(Envelope) + Send + Sync,
    on_subscribed: impl Fn() + Send + Sync,
) {
    let urls = crate::state::redis::parse_urls(&cfg.redis_url).unwrap_or_default();
    let prefix = cfg.key_prefix.clone();
    let mine = Bus::channel(&prefix, &To::Instance(me.clone()));
    let all = Bus::channel(&prefix, &To::All);
    let mut attempt: u32 = 0;
    let mut subscribed_once = false;
    'reconnect: while !stop.is_cancelled() {
        if attempt > 0 {
            // Back off up to a second between attempts: Redis coming back is noticed
            // within a second, and a dead Redis is not hammered.
            let delay = Duration::from_millis(50 * u64::from(attempt.min(20)));
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        let url = &urls[(attempt as usize) % urls.len().max(1)];
        attempt += 1;
        let connect = async {
            let mut ps = client(url, &cfg)?.get_async_pubsub().await?;
            ps.subscribe(&[mine.as_str(), all.as_str()]).await?;
            ::redis::RedisResult::Ok(ps)
        };
        let ps = match tokio::time::timeout(cfg.timeout * 2, connect).await {
            Ok(Ok(ps)) => ps,
            Ok(Err(e)) => {
                debug!(error = %e, "bus subscribe failed");
                continue;
            }
            Err(_) => continue,
        };
        attempt = 0;
        if subscribed_once {
            info!("bus subscribed again");
        }
        subscribed_once = true;
        on_subscribed();
        let (mut sink, mut stream) = ps.split();
        let mut check = tokio::time::interval(heartbeat);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                m = stream.next() => {
                    let Some(m) = m else {
                        warn!("bus connection lost: resubscribing");
                        continue 'reconnect;
                    };
                    metrics::cluster_message("in");
                    match Envelope::decode(m.get_payload_bytes()) {
                        Some(env) if env.origin != me => on_message(env),
                        Some(_) => {} // our own broadcast: acted on before publishing
                        None => debug!("unreadable bus message dropped"),
                    }
                }
                _ = check.tick() => {
                    // A connection that hangs (a frozen Redis, a silent network) never ends
                    // the stream by itself.
                    // Any answer will do (subscribed, RESP2 answers PING with an array).
                    let ping = sink.ping::<::redis::Value>();
                    if !matches!(tokio::time::timeout(cfg.timeout, ping).await, Ok(Ok(_))) {
                        warn!("bus connection does not answer: resubscribing");
                        continue 'reconnect;
                    }
                }
            }
        }
    }
}
