//! Load generator: starts `imgate serve` as a child process on loopback, drives it with real
//! WebSocket clients from this process, and prints figures.
//!
//! ```text
//! cargo build --release && cargo run --release --example bench -- idle --conns 10000 [--tls]
//! cargo run --release --example bench -- chat --conns 1000 --rate 10000 --secs 10
//! ```
//! `idle`: gateway RSS growth per idle authenticated connection.
//! `chat`: relay chat between pairs of clients at a total rate; send → receive latency.
//! `push-unary`: durable `PushToUser` calls to `--conns` connected clients, BENCH_CALLS in
//! flight (default 64) over BENCH_CHANNELS HTTP/2 connections (default 4).
//! `push-stream`: durable pushes over one `PushStream` to `--conns` connected clients.
//! `push-latency`: `PushToUser` at `--rate`; push accepted → client receive latency.
//! `--offline` (push-unary, push-stream): transient pushes to users nobody is connected as,
//! which measures the gRPC path alone.
//! `chat` and the push modes start 2 s after the last client connected (BENCH_SETTLE_MS).
//! `wt-idle`: gateway RSS growth per idle authenticated WebTransport session.
//! `wt-connect`: WebTransport sessions established per second (QUIC + TLS + auth + welcome),
//! `--inflight` at a time (default 100).
//! `--redis URL` (push modes): cluster mode. Two instances on that Redis (a: the usual
//! ports, b: ports + 1); users whose name ends in an odd digit connect to b, the others to
//! a, so half the pushes cross the bus; unary and latency pushes alternate their gRPC
//! connections between a and b (push-stream goes through a). Prints the Redis commands
//! per login and per durable push (`INFO commandstats` before and after).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

mod common;
use common::{env_or, quantile_ms, ws_config, Flags};

struct Opts {
    mode: String,
    conns: usize,
    rate: u64,
    secs: u64,
    tls: bool,
    gateway: String,
    /// An already running gateway (e.g. under a profiler) instead of starting one.
    pid: Option<u32>,
    /// Handshakes in flight at once (`wt-connect`).
    inflight: usize,
    /// Push modes: transient pushes to users nobody is connected as, to measure the gRPC
    /// path alone.
    offline: bool,
    /// Cluster mode: two instances on this Redis.
    redis: Option<String>,
}

fn opts() -> Opts {
    let f = Flags::parse(
        &[
            "--conns",
            "--rate",
            "--secs",
            "--gateway",
            "--pid",
            "--inflight",
            "--redis",
        ],
        &["--tls", "--offline"],
    );
    Opts {
        conns: f.get("--conns", 1000),
        rate: f.get("--rate", 10_000),
        secs: f.get("--secs", 10),
        tls: f.has("--tls"),
        gateway: f.get("--gateway", "target/release/imgate".to_string()),
        pid: f.opt("--pid"),
        inflight: f.get("--inflight", 100),
        offline: f.has("--offline"),
        redis: f.opt("--redis"),
        mode: f.mode,
    }
}

/// The load generator's addresses, all moved by BENCH_PORT_OFFSET (default 0) so two runs
/// (or someone else's gateway on the defaults) can share the machine.
macro_rules! addr {
    ($name:ident, $port:expr) => {
        #[allow(non_snake_case)]
        fn $name() -> &'static str {
            static A: std::sync::OnceLock<String> = std::sync::OnceLock::new();
            A.get_or_init(|| {
                format!(
                    "127.0.0.1:{}",
                    $port + env_or::<u16>("BENCH_PORT_OFFSET", 0)
                )
            })
        }
    };
}
addr!(HTTP, 18080);
addr!(HTTPS, 18443);
addr!(OPS, 19090);
addr!(GRPC, 15051);
addr!(WT, 14433);
// The second instance in cluster mode.
addr!(HTTP_B, 18081);
addr!(OPS_B, 19091);
addr!(GRPC_B, 15052);

/// Cluster mode (`--redis`): set once at start.
static CLUSTER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Where `user` connects: in cluster mode, names ending in an odd digit go to b.
fn http_for(user: &str) -> &'static str {
    match (CLUSTER.get(), user.bytes().last()) {
        (Some(_), Some(d)) if d % 2 == 1 => HTTP_B(),
        _ => HTTP(),
    }
}

/// The gateway processes (for CPU accounting in cluster mode).
static PIDS: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();

/// CPU seconds (user + system) a process used so far.
fn cpu_secs(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// CPU seconds Redis used so far (`INFO cpu`).
async fn redis_cpu() -> Option<f64> {
    let url = CLUSTER.get()?;
    let client = redis::Client::open(url.as_str()).ok()?;
    let mut c = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(&mut c)
        .await
        .ok()?;
    Some(
        info.lines()
            .filter(|l| l.starts_with("used_cpu_sys:") || l.starts_with("used_cpu_user:"))
            .filter_map(|l| l.split_once(':')?.1.trim().parse::<f64>().ok())
            .sum(),
    )
}

/// CPU seconds of each gateway process and of Redis, so far.
async fn cpu_snapshot() -> (Vec<f64>, Option<f64>) {
    let g = PIDS
        .get()
        .map(|p| p.iter().map(|&p| cpu_secs(p)).collect())
        .unwrap_or_default();
    (g, redis_cpu().await)
}

/// Every command Redis has run so far (`INFO commandstats`), by command.
async fn redis_calls() -> Option<std::collections::BTreeMap<String, u64>> {
    let url = CLUSTER.get()?;
    let client = redis::Client::open(url.as_str()).ok()?;
    let mut c = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
        .ok()?;
    Some(
        info.lines()
            .filter_map(|l| {
                let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = rest
                    .strip_prefix("calls=")?
                    .split(',')
                    .next()?
                    .parse()
                    .ok()?;
                Some((name.to_string(), calls))
            })
            .collect(),
    )
}

/// Commands run between two `redis_calls`, per `n` (what per login or per push costs).
fn per(
    before: &Option<std::collections::BTreeMap<String, u64>>,
    after: &Option<std::collections::BTreeMap<String, u64>>,
    n: u64,
) -> Option<String> {
    let (b, a) = (before.as_ref()?, after.as_ref()?);
    let mut parts = Vec::new();
    let mut total = 0;
    for (cmd, calls) in a {
        // INFO is the bench asking.
        let d = calls - b.get(cmd).copied().unwrap_or(0);
        if d > 0 && cmd != "info" {
            total += d;
            parts.push(format!("{cmd} {:.2}", d as f64 / n.max(1) as f64));
        }
    }
    Some(format!(
        "{:.2} ({})",
        total as f64 / n.max(1) as f64,
        parts.join(", ")
    ))
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap()
}

async fn http_get(addr: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    Some(buf)
}

fn start_gateway(o: &Opts) -> Vec<std::process::Child> {
    let mut a = gateway_command(o);
    a.env("IMGATE__LISTEN__HTTP", HTTP())
        .env("IMGATE__LISTEN__HTTPS", HTTPS())
        .env("IMGATE__LISTEN__OPS", OPS())
        .env("IMGATE__LISTEN__GRPC", GRPC())
        .env("IMGATE__LISTEN__WEBTRANSPORT", WT());
    let Some(url) = &o.redis else {
        return vec![a
            .spawn()
            .expect("start the gateway (cargo build --release first)")];
    };
    let mut b = gateway_command(o);
    b.env("IMGATE__LISTEN__HTTP", HTTP_B())
        .env("IMGATE__LISTEN__HTTPS", "")
        .env("IMGATE__LISTEN__OPS", OPS_B())
        .env("IMGATE__LISTEN__GRPC", GRPC_B())
        .env("IMGATE__LISTEN__WEBTRANSPORT", "");
    [(a, "bench-a"), (b, "bench-b")]
        .into_iter()
        .map(|(mut c, id)| {
            c.env("IMGATE__STATE__BACKEND", "redis")
                .env("IMGATE__STATE__REDIS_URL", url)
                .env("IMGATE__INSTANCE__ID", id)
                .spawn()
                .expect("start the gateway (cargo build --release first)")
        })
        .collect()
}

fn gateway_command(o: &Opts) -> std::process::Command {
    let mut c = std::process::Command::new(&o.gateway);
    c.arg("serve")
        .env("IMGATE__LIMITS__MAX_PER_IP", "1000000")
        .env("IMGATE__LIMITS__MAX_CONNECTIONS", "1000000")
        .env("IMGATE__LIMITS__RATE_PER_SEC", "100000")
        .env("IMGATE__LIMITS__RATE_BURST", "100000")
        .env("IMGATE__LOG__LEVEL", "warn");
    c
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}
type Ws = tokio_tungstenite::WebSocketStream<Box<dyn Io>>;

/// A dev-secret token for `user` on the device "bench".
fn token(user: &str) -> String {
    imgate::auth::jwt::issue_hs256(
        imgate::config::DEV_JWT_SECRET,
        user,
        Some("bench"),
        None,
        Duration::from_secs(3600),
    )
    .unwrap()
}

async fn connect(user: &str, tls: bool, pin: Option<[u8; 32]>) -> Ws {
    let t = token(user);
    let (url, addr) = if tls {
        (format!("wss://localhost/ws?token={t}"), HTTPS())
    } else {
        let http = http_for(user);
        (format!("ws://{http}/ws?token={t}"), http)
    };
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let io: Box<dyn Io> = if tls {
        let c = tokio_rustls::TlsConnector::from(imgate::tls::pinned_client_config(pin.unwrap()));
        Box::new(
            c.connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap(),
        )
    } else {
        Box::new(tcp)
    };
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(
        url.into_client_request().unwrap(),
        io,
        Some(ws_config()),
    )
    .await
    .unwrap();
    // welcome, then synced
    for _ in 0..2 {
        ws.next().await.unwrap().unwrap();
    }
    ws
}

async fn pin() -> Option<[u8; 32]> {
    let r = http_get(HTTP(), "/cert-hash").await?;
    let v: Value = serde_json::from_str(r.split_once("\r\n\r\n")?.1).ok()?;
    let hex = v["sha256_hex"].as_str()?;
    let mut p = [0u8; 32];
    for (i, b) in p.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(p)
}

fn main() {
    // BENCH_THREADS sets the load generator's worker threads (default 2). It shares the cores
    // with the gateway; one thread cannot drive `chat` at 10k messages per second.
    let threads: usize = env_or("BENCH_THREADS", 2);
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    rt.expect("runtime").block_on(run());
}

async fn run() {
    imgate::tls::install_crypto_provider();
    let o = opts();
    if let Some(url) = &o.redis {
        let _ = CLUSTER.set(url.clone());
    }
    let children = if o.pid.is_none() {
        start_gateway(&o)
    } else {
        Vec::new()
    };
    let pid = o.pid.or(children.first().map(|c| c.id())).unwrap();
    let _ = PIDS.set(children.iter().map(|c| c.id()).collect());
    let t0 = Instant::now();
    let ops: &[&str] = if o.redis.is_some() {
        &[OPS(), OPS_B()]
    } else {
        &[OPS()]
    };
    for ops in ops {
        while http_get(ops, "/readyz")
            .await
            .is_none_or(|r| !r.starts_with("HTTP/1.1 200"))
        {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "gateway did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let pin = pin().await;
    match o.mode.as_str() {
        "idle" => idle(&o, pid, pin).await,
        "chat" => chat(&o, pin).await,
        "push-unary" | "push-stream" | "push-latency" => push(&o, pin).await,
        "wt-idle" => wt::idle(&o, pid, pin.expect("cert")).await,
        "wt-connect" => wt::connect_rate(&o, pin.expect("cert")).await,
        m => eprintln!(
            "unknown mode {m:?}: idle | chat | push-unary | push-stream | push-latency | wt-idle | wt-connect"
        ),
    }
    for mut child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
}

async fn idle(o: &Opts, pid: u32, pin: Option<[u8; 32]>) {
    // Warm up allocator arenas and lazy statics with a first batch, then measure.
    let warm: Vec<Ws> = futures_util::future::join_all(
        (0..100).map(|i| connect_owned(format!("w{i}"), o.tls, pin)),
    )
    .await;
    let before = rss_kib(pid);
    let conns = connect_many(o, pin).await; // held open while measuring
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid);
    let per = (after - before) as f64 / o.conns as f64;
    println!(
        "idle {}: {} connections, gateway RSS {} KiB -> {} KiB: {:.2} KiB per connection",
        if o.tls { "wss" } else { "ws" },
        o.conns,
        before,
        after,
        per
    );
    drop((warm, conns));
}

/// How long the measuring modes wait after the last client connected (BENCH_SETTLE_MS).
fn settle_ms() -> u64 {
    env_or("BENCH_SETTLE_MS", 2000)
}

async fn connect_owned(user: String, tls: bool, pin: Option<[u8; 32]>) -> Ws {
    connect(&user, tls, pin).await
}

async fn chat(o: &Opts, pin: Option<[u8; 32]>) {
    let pairs = o.conns / 2;
    let per_conn_rate = o.rate as f64 / pairs as f64; // senders are half the clients
    let lat = Arc::new(parking_lot::Mutex::new(Vec::<u64>::with_capacity(
        (o.rate * o.secs) as usize,
    )));
    let received = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let epoch_ns = move || start.elapsed().as_nanos() as u64;
    // Every client connects first; sending starts once the connects have settled.
    let mut clients = Vec::with_capacity(pairs);
    for p in 0..pairs {
        let a = connect(&format!("a{p}"), o.tls, pin).await;
        let b = connect(&format!("b{p}"), o.tls, pin).await;
        clients.push((p, a, b));
    }
    tokio::time::sleep(Duration::from_millis(settle_ms())).await;
    let mut tasks = Vec::new();
    for (p, a, b) in clients {
        let (lat, received, sent) = (lat.clone(), received.clone(), sent.clone());
        let secs = o.secs;
        tasks.push(tokio::spawn(async move {
            let (mut atx, mut arx) = a.split();
            let (mut btx, mut brx) = b.split();
            let interval = Duration::from_secs_f64(1.0 / per_conn_rate);
            // Stagger senders over one interval.
            tokio::time::sleep(interval.mul_f64(rand::random::<f64>())).await;
            let sender = async {
                let mut tick = tokio::time::interval(interval);
                let deadline = Instant::now() + Duration::from_secs(secs);
                let mut id = 0u64;
                while Instant::now() < deadline {
                    tick.tick().await;
                    id += 1;
                    let frame = format!(
                        "{{\"type\":\"send\",\"id\":\"{id}\",\"to\":\"b{p}\",\"body\":{}}}",
                        epoch_ns()
                    );
                    atx.send(Message::Text(frame.into())).await.unwrap();
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            };
            let replies = async { while let Some(Ok(_)) = arx.next().await {} };
            let receiver = async {
                while let Some(Ok(m)) = brx.next().await {
                    if let Message::Text(t) = m {
                        // A light scan instead of a JSON parse: the load generator shares the
                        // two cores with the gateway and must not be the bottleneck.
                        if !t.starts_with("{\"type\":\"push\"") {
                            continue;
                        }
                        let now = epoch_ns();
                        let sent_at = field(&t, "\"body\":").parse::<u64>().unwrap();
                        lat.lock().push(now - sent_at);
                        received.fetch_add(1, Ordering::Relaxed);
                        let (seq, epoch) = (field(&t, "\"seq\":"), field(&t, "\"epoch\":"));
                        let ack = format!("{{\"type\":\"ack\",\"seq\":{seq},\"epoch\":{epoch}}}");
                        btx.send(Message::Text(ack.into())).await.unwrap();
                    }
                }
            };
            tokio::select! {
                _ = async { sender.await; tokio::time::sleep(Duration::from_secs(2)).await } => {}
                _ = replies => {}
                _ = receiver => {}
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut l = lat.lock().clone();
    l.sort_unstable();
    let q = |p: f64| quantile_ms(&l, p);
    if let Some(p99) = gateway_delivery_p99().await {
        println!("gateway's own share (imgate_push_delivery_seconds, push accepted -> written): p99 <= {:.3} ms", p99 * 1e3);
    }
    println!(
        "chat {}: {} clients, {} sent, {} received in {} s ({:.0}/s): p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
        if o.tls { "wss" } else { "ws" },
        pairs * 2,
        sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
        o.secs,
        received.load(Ordering::Relaxed) as f64 / o.secs as f64,
        q(0.5),
        q(0.99),
        q(0.999),
        l.last().copied().unwrap_or(0) as f64 / 1e6
    );
}

/// The raw JSON value after `key` in a flat object: a number or a quoted string.
fn field<'a>(text: &'a str, key: &str) -> &'a str {
    let rest = &text[text.find(key).map(|i| i + key.len()).unwrap_or(text.len())..];
    let end = if let Some(quoted) = rest.strip_prefix('"') {
        quoted.find('"').map(|i| i + 2).unwrap_or(rest.len())
    } else {
        rest.find([',', '}']).unwrap_or(rest.len())
    };
    &rest[..end]
}

type Api = imgate::grpc::pb::gateway_client::GatewayClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
    >,
>;

fn with_key(mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    req.metadata_mut()
        .insert("authorization", "Bearer dev-key".parse().unwrap());
    Ok(req)
}

/// HTTP/2 connections a pusher uses (BENCH_CHANNELS, default 4).
fn channels() -> usize {
    env_or("BENCH_CHANNELS", 4)
}

async fn api() -> Api {
    // Cluster mode: connections alternate between a and b (pushes through either).
    static N: AtomicU64 = AtomicU64::new(0);
    let grpc = if CLUSTER.get().is_some() && N.fetch_add(1, Ordering::Relaxed) % 2 == 1 {
        GRPC_B()
    } else {
        GRPC()
    };
    let ch = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    imgate::grpc::pb::gateway_client::GatewayClient::with_interceptor(ch, with_key as fn(_) -> _)
}

fn push_req(user: String, body: String) -> imgate::grpc::pb::PushToUserRequest {
    imgate::grpc::pb::PushToUserRequest {
        user_id: user,
        message: Some(imgate::grpc::pb::Message {
            body: body.into(),
            ..Default::default()
        }),
        delivery: 0,
    }
}

/// The `i`th push of a throughput mode: durable to a connected client, or with `--offline`
/// transient to nobody (the gRPC path alone: no inbox, no WebSocket write).
fn nth_push(offline: bool, i: usize, conns: usize) -> imgate::grpc::pb::PushToUserRequest {
    if offline {
        let mut r = push_req(format!("offline{i}"), "\"x\"".into());
        r.delivery = imgate::grpc::pb::Delivery::Transient as i32;
        r
    } else {
        push_req(format!("u{}", i % conns), "\"x\"".into())
    }
}

/// The worst push -> receive latency of the pushes sent in each second of the run: tells a
/// stall (one bad second) from a slow path (every second bad).
static MAX_BY_SECOND: [AtomicU64; 120] = [const { AtomicU64::new(0) }; 120];

/// Connected clients that count (and, for latency, time) the pushes they receive and ack them.
async fn receivers(
    o: &Opts,
    pin: Option<[u8; 32]>,
    received: Arc<AtomicU64>,
    lat: Arc<parking_lot::Mutex<Vec<(u64, u64)>>>,
    start: Instant,
) {
    {
        for ws in connect_many(o, pin).await {
            let (received, lat) = (received.clone(), lat.clone());
            tokio::spawn(async move {
                let (mut tx, mut rx) = ws.split();
                let mut held = 0u64;
                let ack_every: u64 = env_or("BENCH_ACK_EVERY", 32);
                while let Some(Ok(m)) = rx.next().await {
                    // The gateway's pings come through too (tungstenite answers them): a
                    // loop that stopped at the first non-text frame stopped counting 25 s
                    // after connecting, which looked like lost pushes in long runs.
                    let Message::Text(t) = m else { continue };
                    if !t.starts_with("{\"type\":\"push\"") {
                        continue;
                    }
                    let now = start.elapsed().as_nanos() as u64;
                    if let Ok(sent) = field(&t, "\"body\":").parse::<u64>() {
                        let l = now.saturating_sub(sent);
                        lat.lock().push((sent, l));
                        if let Some(m) = MAX_BY_SECOND.get((sent / 1_000_000_000) as usize) {
                            m.fetch_max(l, Ordering::Relaxed);
                        }
                    }
                    received.fetch_add(1, Ordering::Relaxed);
                    // Acks are cumulative: a client acks every so often, not every push.
                    held += 1;
                    if held % ack_every == 0 {
                        let ack = format!(
                            "{{\"type\":\"ack\",\"seq\":{},\"epoch\":{}}}",
                            field(&t, "\"seq\":"),
                            field(&t, "\"epoch\":")
                        );
                        if tx.send(Message::Text(ack.into())).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    }
}

async fn push(o: &Opts, pin: Option<[u8; 32]>) {
    let received = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let start = Instant::now();
    let before_logins = redis_calls().await;
    receivers(o, pin, received.clone(), lat.clone(), start).await;
    let after_logins = redis_calls().await;
    if let Some(p) = per(&before_logins, &after_logins, o.conns as u64) {
        println!("Redis commands per login: {p}");
    }
    // Measure the steady state, not the tail of the connection storm.
    tokio::time::sleep(Duration::from_millis(settle_ms())).await;
    let before_pushes = redis_calls().await;
    let cpu_before = cpu_snapshot().await;
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let (conns, offline) = (o.conns, o.offline);
    let deadline = Instant::now() + Duration::from_secs(o.secs);
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    match o.mode.as_str() {
        "push-unary" => {
            // Calls in flight (BENCH_CALLS) over a few HTTP/2 connections (BENCH_CHANNELS),
            // as a business service with a client pool would push.
            let mut apis = Vec::new();
            for _ in 0..channels() {
                apis.push(api().await);
            }
            let mut tasks = Vec::new();
            let calls: usize = env_or("BENCH_CALLS", 64);
            for w in 0..calls {
                let sent = sent.clone();
                let mut api = apis[w % apis.len()].clone();
                tasks.push(tokio::spawn(async move {
                    let mut i = w;
                    while Instant::now() < deadline {
                        api.push_to_user(nth_push(offline, i, conns)).await.unwrap();
                        sent.fetch_add(1, Ordering::Relaxed);
                        i += calls;
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        }
        "push-stream" => {
            let mut api = api().await;
            let (tx, rx) = tokio::sync::mpsc::channel(1024);
            let feeder = tokio::spawn(async move {
                let mut i = 0usize;
                while Instant::now() < deadline {
                    for _ in 0..256 {
                        if tx.send(nth_push(offline, i, conns)).await.is_err() {
                            return;
                        }
                        i += 1;
                    }
                }
            });
            let mut results = api
                .push_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            while let Some(r) = results.message().await.unwrap() {
                assert!(r.error_code.is_empty(), "{r:?}");
                sent.fetch_add(1, Ordering::Relaxed);
            }
            feeder.await.unwrap();
        }
        _ => {
            // A few connections and a bounded number of calls in flight, as a real pusher.
            let mut apis = Vec::new();
            for _ in 0..channels() {
                apis.push(api().await);
            }
            let in_flight = Arc::new(tokio::sync::Semaphore::new(512));
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / o.rate as f64));
            let mut i = 0usize;
            while Instant::now() < deadline {
                tick.tick().await;
                let permit = in_flight.clone().acquire_owned().await.unwrap();
                let body = (start.elapsed().as_nanos() as u64).to_string();
                // In cluster mode the connections alternate a, b, a, b and user `u<i>` is on
                // b when i is odd: the next connection is the other instance, so every push
                // crosses the bus.
                let via = if CLUSTER.get().is_some() { i + 1 } else { i };
                let mut api = apis[via % apis.len()].clone();
                let (sent, failed) = (sent.clone(), failed.clone());
                let user = format!("u{}", i % conns);
                tokio::spawn(async move {
                    match api.push_to_user(push_req(user, body)).await {
                        Ok(_) => sent.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    drop(permit);
                });
                i += 1;
            }
            let _ = in_flight.acquire_many(512).await;
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    // Let the last pushes land.
    let target = sent.load(Ordering::Relaxed);
    let settle = Instant::now();
    while !offline
        && received.load(Ordering::Relaxed) < target
        && settle.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !offline && received.load(Ordering::Relaxed) < target {
        // Say why: a client closed by the gateway stops counting.
        let text = http_get(OPS(), "/metrics").await.unwrap_or_default();
        for l in text.lines().filter(|l| {
            (l.starts_with("imgate_connections_closed_total")
                || l.starts_with("imgate_slow_consumer_total"))
                && !l.ends_with(" 0")
        }) {
            println!("gateway: {l}");
        }
    }
    if let Some(p) = per(&before_pushes, &redis_calls().await, target) {
        // Includes the instances' heartbeats and inbox-head checks over the run.
        println!("Redis commands per durable push: {p}");
        let cpu_after = cpu_snapshot().await;
        let gw: Vec<String> = cpu_before
            .0
            .iter()
            .zip(&cpu_after.0)
            .map(|(b, a)| format!("{:.1}", a - b))
            .collect();
        println!(
            "CPU seconds over the run ({elapsed:.1} s): gateways {}, redis {:.1}; load average before: {}",
            gw.join(" + "),
            cpu_after.1.unwrap_or(0.0) - cpu_before.1.unwrap_or(0.0),
            load_before.trim()
        );
    }
    if let Some(p99) = gateway_delivery_p99().await {
        println!(
            "gateway's own share (push accepted -> written): p99 <= {:.3} ms",
            p99 * 1e3
        );
    }
    let samples = lat.lock().clone();
    let mut l: Vec<u64> = samples.iter().map(|&(_, l)| l).collect();
    l.sort_unstable();
    let q = |p: f64| quantile_ms(&l, p);
    // The same without the pushes of the first second, sent while 10k freshly connected
    // clients settle (see MAX_BY_SECOND).
    let first = samples.iter().map(|&(s, _)| s).min().unwrap_or(0);
    let mut steady: Vec<u64> = samples
        .iter()
        .filter(|&&(s, _)| s >= first + 1_000_000_000)
        .map(|&(_, l)| l)
        .collect();
    steady.sort_unstable();
    println!(
        "{} to {} {} clients: {} pushes in {:.1} s = {:.0}/s ({} failed); {} received{}",
        o.mode,
        conns,
        if o.tls { "wss" } else { "ws" },
        target,
        elapsed,
        target as f64 / elapsed,
        failed.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
        if o.mode == "push-latency" {
            format!(
                "; push -> receive p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms; after the first second: p99 {:.3} ms, max {:.3} ms",
                q(0.5),
                q(0.99),
                l.last().copied().unwrap_or(0) as f64 / 1e6,
                quantile_ms(&steady, 0.99),
                steady.last().copied().unwrap_or(0) as f64 / 1e6
            )
        } else {
            String::new()
        }
    );
    if o.mode == "push-latency" {
        let worst: Vec<String> = MAX_BY_SECOND
            .iter()
            .map(|m| m.load(Ordering::Relaxed))
            .skip_while(|&m| m == 0)
            .take_while(|&m| m > 0)
            .map(|m| format!("{:.1}", m as f64 / 1e6))
            .collect();
        println!(
            "worst latency (ms) of the pushes sent in each second: {}",
            worst.join(" ")
        );
    }
}

/// The upper bound of the bucket holding the 99th percentile of the gateway's
/// `imgate_push_delivery_seconds` histogram.
async fn gateway_delivery_p99() -> Option<f64> {
    let text = http_get(OPS(), "/metrics").await?;
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with("imgate_push_delivery_seconds_bucket{"))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    let total = buckets.last()?.1;
    buckets
        .iter()
        .find(|(_, n)| *n >= total * 0.99)
        .map(|(le, _)| *le)
}

/// `--conns` clients u0, u1, … connected 500 at a time.
async fn connect_many(o: &Opts, pin: Option<[u8; 32]>) -> Vec<Ws> {
    let mut conns = Vec::with_capacity(o.conns);
    for chunk in (0..o.conns).collect::<Vec<_>>().chunks(500) {
        let batch = chunk
            .iter()
            .map(|i| connect_owned(format!("u{i}"), o.tls, pin));
        conns.extend(futures_util::future::join_all(batch).await);
    }
    conns
}

/// WebTransport clients (wtransport), a few UDP endpoints shared by all sessions.
mod wt {
    use super::*;
    use wtransport::{ClientConfig, Connection, Endpoint};

    pub struct Session {
        _conn: Connection,
        _send: wtransport::SendStream,
        _recv: wtransport::RecvStream,
    }

    pub fn endpoints(
        n: usize,
        pin: [u8; 32],
    ) -> Vec<Endpoint<wtransport::endpoint::endpoint_side::Client>> {
        (0..n)
            .map(|_| {
                let cfg = ClientConfig::builder()
                    .with_bind_default()
                    .with_server_certificate_hashes([wtransport::tls::Sha256Digest::new(pin)])
                    .build();
                Endpoint::client(cfg).unwrap()
            })
            .collect()
    }

    /// Open a session as `user`, announce the control stream with a `ping`, and read until
    /// `synced` (welcome, then synced).
    pub async fn connect(
        ep: &Endpoint<wtransport::endpoint::endpoint_side::Client>,
        user: &str,
    ) -> Result<Session, String> {
        let t = token(user);
        let conn = ep
            .connect(format!("https://{}/wt?token={t}", WT()))
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let ping = br#"{"type":"ping"}"#;
        let mut frame = (ping.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(ping);
        send.write_all(&frame).await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 2048];
        loop {
            let n = recv
                .read(&mut chunk)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("control stream closed")?;
            buf.extend_from_slice(&chunk[..n]);
            let mut at = 0;
            while buf.len() >= at + 4 {
                let len = u32::from_be_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
                if buf.len() < at + 4 + len {
                    break;
                }
                if std::str::from_utf8(&buf[at + 4..at + 4 + len])
                    .is_ok_and(|f| f.contains(r#""type":"synced""#))
                {
                    return Ok(Session {
                        _conn: conn,
                        _send: send,
                        _recv: recv,
                    });
                }
                at += 4 + len;
            }
            buf.drain(..at);
        }
    }

    /// `--conns` sessions, `--inflight` handshakes at a time; users named `prefix0`, ….
    pub async fn connect_many(o: &Opts, pin: [u8; 32], prefix: &str) -> (Vec<Session>, Duration) {
        let eps = Arc::new(endpoints(4, pin));
        let next = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let workers = (0..o.inflight.max(1)).map(|_| {
            let (eps, next) = (eps.clone(), next.clone());
            let (total, prefix) = (o.conns as u64, prefix.to_string());
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return mine;
                    }
                    let ep = &eps[i as usize % eps.len()];
                    match connect(ep, &format!("{prefix}{i}")).await {
                        Ok(s) => mine.push(s),
                        Err(e) => eprintln!("session {i} failed: {e}"),
                    }
                }
            })
        });
        let mut all = Vec::with_capacity(o.conns);
        for w in futures_util::future::join_all(workers).await {
            all.extend(w.unwrap());
        }
        (all, started.elapsed())
    }

    pub async fn idle(o: &Opts, pid: u32, pin: [u8; 32]) {
        let warm = connect_many(
            &Opts {
                conns: 100,
                mode: String::new(),
                gateway: String::new(),
                pid: None,
                redis: None,
                ..*o
            },
            pin,
            "w",
        )
        .await;
        let before = rss_kib(pid);
        let (sessions, _) = connect_many(o, pin, "u").await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = rss_kib(pid);
        println!(
            "idle wt: {} sessions, gateway RSS {} KiB -> {} KiB: {:.2} KiB per session",
            o.conns,
            before,
            after,
            (after - before) as f64 / o.conns as f64
        );
        drop((warm, sessions));
    }

    pub async fn connect_rate(o: &Opts, pin: [u8; 32]) {
        let (sessions, took) = connect_many(o, pin, "c").await;
        println!(
            "wt-connect: {} sessions (QUIC + TLS + auth + welcome) in {:.2} s with {} in flight: {:.0} sessions/s",
            sessions.len(),
            took.as_secs_f64(),
            o.inflight,
            sessions.len() as f64 / took.as_secs_f64()
        );
    }
}
