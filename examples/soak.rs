//! Soak and abuse runs against a real gateway (`imgate serve`, started as a child process on
//! loopback), printing figures. Not tests: they run for minutes and measure.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example soak -- soak --conns 10000 --minutes 30
//! cargo run --release --example soak -- abuse --secs 20 --devices 1000000
//! ```
//! `soak`: `--conns` clients that ack what they get and reconnect now and then (each lives
//! a random time around `--lifetime` seconds, default 300), durable pushes at `--rate` per
//! second to random users (default 200) and a broadcast every 10 s, a kick storm (KickUser
//! for a tenth of the users) every 5 minutes, then a drain. Gateway RSS every 10 s; the
//! growth after warm-up (10 minutes, or a third of a longer run) is the figure. Inbox entries
//! and dedupe ids are kept 2 minutes here, so that retained state is at its steady size after
//! warm-up. Every durable push must
//! reach its user: the run ends by comparing what each user received with what was sent.
//! `abuse`: bystander clients ping from 127.0.0.1 while an attacker on 127.0.0.2 runs, one
//! phase after the other: a 401 loop, a bad-token flood, slowloris on every route, a re-auth
//! flood, and `--devices` distinct device ids for one user. Each phase prints the
//! bystanders' ping p99, the gateway's RSS and the counters that moved.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;

mod common;
use common::{quantile_ms, ws_config, Flags};

const HTTP: &str = "127.0.0.1:28080";
const HTTPS: &str = "127.0.0.1:28443";
const OPS: &str = "127.0.0.1:29090";
const GRPC: &str = "127.0.0.1:25051";
/// The attacker's address in `abuse`: its own per-IP bucket, apart from the bystanders.
const ATTACKER: &str = "127.0.0.2";

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;
type Api = imgate::grpc::pb::gateway_client::GatewayClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
    >,
>;

fn main() {
    let f = Flags::parse(
        &[
            "--conns",
            "--minutes",
            "--rate",
            "--lifetime",
            "--secs",
            "--devices",
            "--gateway",
        ],
        &[],
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        imgate::tls::install_crypto_provider();
        let gateway: String = f.get("--gateway", "target/release/imgate".to_string());
        match f.mode.as_str() {
            "soak" => {
                soak(
                    &gateway,
                    f.get("--conns", 10_000),
                    f.get("--minutes", 30),
                    f.get("--rate", 200),
                    f.get("--lifetime", 300),
                )
                .await
            }
            "abuse" => abuse(&gateway, f.get("--secs", 20), f.get("--devices", 100_000)).await,
            m => panic!("mode {m:?}: use soak or abuse"),
        }
    });
}

// ---- the gateway and its figures ----------------------------------------------------------

fn start_gateway(bin: &str, extra: &[(&str, &str)]) -> std::process::Child {
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("serve")
        .env("IMGATE__LISTEN__HTTP", HTTP)
        .env("IMGATE__LISTEN__HTTPS", HTTPS)
        .env("IMGATE__LISTEN__OPS", OPS)
        .env("IMGATE__LISTEN__GRPC", GRPC)
        .env("IMGATE__LISTEN__WEBTRANSPORT", "")
        .env("IMGATE__LOG__LEVEL", "error");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.spawn()
        .expect("start the gateway (cargo build --release first)")
}

fn rss_mib(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

async fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    Some(buf)
}

/// The gateway's counters, summed per name and label set as written.
async fn metrics() -> HashMap<String, f64> {
    let text = http_get(OPS, "/metrics").await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("imgate_"))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Counters that moved between two scrapes (histogram buckets left out).
fn moved(before: &HashMap<String, f64>, after: &HashMap<String, f64>) -> Vec<String> {
    let mut out: Vec<String> = after
        .iter()
        .filter(|(k, _)| !k.contains("_bucket") && k.contains("_total"))
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0.0);
            (d > 0.0).then(|| format!("{k} +{d}"))
        })
        .collect();
    out.sort();
    out
}

async fn wait_ready() {
    let t = Instant::now();
    while http_get(OPS, "/readyz")
        .await
        .is_none_or(|r| !r.contains(" 200 "))
    {
        assert!(t.elapsed() < Duration::from_secs(20), "gateway not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn token(user: &str, device: &str) -> String {
    imgate::auth::jwt::issue_hs256(
        imgate::config::DEV_JWT_SECRET,
        user,
        Some(device),
        None,
        Duration::from_secs(3600),
    )
    .unwrap()
}

async fn api() -> Api {
    let ch = tonic::transport::Channel::from_shared(format!("http://{GRPC}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    fn with_key(mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut()
            .insert("authorization", "Bearer dev-key".parse().unwrap());
        Ok(req)
    }
    imgate::grpc::pb::gateway_client::GatewayClient::with_interceptor(ch, with_key as fn(_) -> _)
}

/// A WebSocket to `/ws?query` from `from` (a loopback address), or the error.
async fn ws(from: &str, query: &str, headers: &[(&str, &str)]) -> anyhow::Result<Ws> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(from.parse()?, 0))?;
    let tcp = sock.connect(HTTP.parse()?).await?;
    tcp.set_nodelay(true)?;
    let mut req = format!("ws://{HTTP}/ws?{query}").into_client_request()?;
    for (k, v) in headers {
        let name = http::HeaderName::from_bytes(k.as_bytes())?;
        req.headers_mut().insert(name, v.parse()?);
    }
    let (ws, _) = tokio_tungstenite::client_async_with_config(req, tcp, Some(ws_config())).await?;
    Ok(ws)
}

fn text(m: &Message) -> Option<serde_json::Value> {
    match m {
        Message::Text(t) => serde_json::from_str(t).ok(),
        _ => None,
    }
}

// ---- soak ---------------------------------------------------------------------------------

/// One user's durable pushes: those stored (their epoch and seq, as PushToUser answered) and
/// those received. An inbox whose entries all expired starts a new epoch, so a seq alone
/// does not name a push.
#[derive(Default)]
struct User {
    stored: parking_lot::Mutex<Vec<(String, u64)>>,
    received: parking_lot::Mutex<std::collections::HashSet<(String, u64)>>,
    /// The newest position held, for `since` on reconnect.
    held: parking_lot::Mutex<(String, u64)>,
}

impl User {
    fn missing(&self) -> u64 {
        let received = self.received.lock();
        let stored = self.stored.lock();
        stored.iter().filter(|p| !received.contains(*p)).count() as u64
    }
}

async fn soak(bin: &str, conns: usize, minutes: u64, rate: u64, lifetime: u64) {
    let mut child = start_gateway(
        bin,
        &[
            ("IMGATE__LIMITS__MAX_PER_IP", "1000000"),
            ("IMGATE__LIMITS__RATE_PER_SEC", "1000"),
            ("IMGATE__LIMITS__RATE_BURST", "1000"),
            // Retained state reaches its steady size within the warm-up: inbox entries and
            // dedupe ids are kept 2 minutes (7 days and 10 minutes by default would make
            // the whole run a warm-up, growing by design, not by a leak).
            ("IMGATE__STATE__INBOX_TTL", "2m"),
            ("IMGATE__STATE__DEDUPE_WINDOW", "2m"),
        ],
    );
    let pid = child.id();
    wait_ready().await;
    let users: Arc<Vec<User>> = Arc::new((0..conns).map(|_| User::default()).collect());
    // `stop` ends the pushes and kicks; the clients go on until the drain, so that what
    // they missed while away reaches them.
    let stop = Arc::new(AtomicBool::new(false));
    let clients_stop = Arc::new(AtomicBool::new(false));
    let reconnects = Arc::new(AtomicUsize::new(0));
    for i in 0..conns {
        tokio::spawn(client(
            i,
            users.clone(),
            clients_stop.clone(),
            reconnects.clone(),
            lifetime,
        ));
        if i % 200 == 199 {
            tokio::task::yield_now().await;
        }
    }
    let sent = Arc::new(AtomicU64::new(0));
    let pusher = tokio::spawn(pushes(users.clone(), sent.clone(), stop.clone(), rate));
    let kicker = tokio::spawn(kick_storms(conns, stop.clone()));

    let total = Duration::from_secs(minutes * 60);
    // Retained state is steady after twice its longest lifetime: the token cache's (5 min)
    // and the kick storms' period (5 min) are the longest here.
    let warm = (total / 3).max(Duration::from_secs(600)).min(total / 2);
    let start = Instant::now();
    let mut samples: Vec<(u64, f64)> = Vec::new();
    println!(
        "{:>6} {:>9} {:>8} {:>10} {:>10}",
        "t(s)", "rss(MiB)", "conns", "reconnects", "pushes"
    );
    while start.elapsed() < total {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let m = metrics().await;
        let open: f64 = m
            .iter()
            .filter(|(k, _)| k.starts_with("imgate_connections{"))
            .map(|(_, v)| v)
            .sum();
        let rss = rss_mib(pid);
        let t = start.elapsed().as_secs();
        samples.push((t, rss));
        println!(
            "{t:>6} {rss:>9.1} {open:>8} {:>10} {:>10}",
            reconnects.load(Ordering::Relaxed),
            sent.load(Ordering::Relaxed)
        );
    }
    stop.store(true, Ordering::Relaxed);
    let _ = pusher.await;
    let _ = kicker.await;
    // Everything sent must arrive: give reconnecting clients time to replay.
    let deadline = Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let missing: u64 = users.iter().map(User::missing).sum();
        if missing == 0 || Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let after_warm: Vec<f64> = samples
        .iter()
        .filter(|(t, _)| *t >= warm.as_secs())
        .map(|(_, r)| *r)
        .collect();
    let first = after_warm.first().copied().unwrap_or(0.0);
    let last = after_warm.last().copied().unwrap_or(0.0);
    let max = after_warm.iter().copied().fold(0.0, f64::max);
    println!(
        "RSS after warm-up ({}s): {first:.1} MiB, at the end {last:.1} MiB, max {max:.1} MiB: growth {:+.2}%",
        warm.as_secs(),
        (last - first) / first * 100.0
    );
    let total_sent = sent.load(Ordering::Relaxed);
    println!("durable pushes: {total_sent} stored, {missing} of them not received");

    // The drain: SIGTERM, every client told 4101, exit 0 within shutdown.timeout.
    clients_stop.store(true, Ordering::Relaxed);
    let t = Instant::now();
    terminate(pid);
    let status = child.wait().unwrap();
    println!(
        "drain: exited {:?} after {:.1} s",
        status.code(),
        t.elapsed().as_secs_f64()
    );
}

fn terminate(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

/// One user's client: connect, ack what arrives, reconnect after a random lifetime or when
/// closed (a kick revokes its token: the next one is issued a second later).
async fn client(
    i: usize,
    users: Arc<Vec<User>>,
    stop: Arc<AtomicBool>,
    reconnects: Arc<AtomicUsize>,
    lifetime: u64,
) {
    let user = format!("s{i}");
    // A thread-local generator cannot be held across an await on a multi-threaded runtime.
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_os_rng();
    let mut epoch = String::new();
    while !stop.load(Ordering::Relaxed) {
        let since = {
            let (e, seq) = &*users[i].held.lock();
            if e.is_empty() {
                String::new()
            } else {
                format!("&since={e}:{seq}")
            }
        };
        let q = format!("token={}{since}", token(&user, "d"));
        let Ok(mut c) = ws("127.0.0.1", &q, &[]).await else {
            tokio::time::sleep(Duration::from_millis(rng.random_range(200..1000))).await;
            continue;
        };
        let life = Duration::from_secs(rng.random_range(lifetime / 2..lifetime * 3 / 2 + 1));
        let until = tokio::time::Instant::now() + life;
        let mut unacked = 0;
        loop {
            let m = tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                m = c.next() => m,
            };
            let Some(Ok(m)) = m else { break };
            let Some(v) = text(&m) else { continue };
            match v["type"].as_str() {
                Some("welcome") => {
                    epoch = v["epoch"].as_str().unwrap_or_default().to_string();
                }
                Some("push") => {
                    if let Some(seq) = v["seq"].as_u64() {
                        let e = v["epoch"].as_str().unwrap_or_default().to_string();
                        {
                            let mut held = users[i].held.lock();
                            if held.0 != e || held.1 < seq {
                                *held = (e.clone(), seq);
                            }
                        }
                        users[i].received.lock().insert((e, seq));
                        unacked += 1;
                        if unacked >= 8 {
                            unacked = 0;
                            let ack = format!(r#"{{"type":"ack","seq":{seq},"epoch":"{epoch}"}}"#);
                            let _ = c.send(Message::Text(ack.into())).await;
                        }
                    }
                }
                Some("synced") => {
                    let seq = v["seq"].as_u64().unwrap_or(0);
                    let ack = format!(r#"{{"type":"ack","seq":{seq},"epoch":"{epoch}"}}"#);
                    let _ = c.send(Message::Text(ack.into())).await;
                }
                Some("kick") => {}
                _ => {}
            }
        }
        let _ = c.close(None).await;
        reconnects.fetch_add(1, Ordering::Relaxed);
        // A kicked token is revoked up to its second: the next token must be newer.
        tokio::time::sleep(Duration::from_millis(rng.random_range(1100..2000))).await;
    }
}

async fn pushes(users: Arc<Vec<User>>, sent: Arc<AtomicU64>, stop: Arc<AtomicBool>, rate: u64) {
    let mut api = api().await;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1) as u32);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        n += 1;
        let i = rand::rng().random_range(0..users.len());
        let req = imgate::grpc::pb::PushToUserRequest {
            user_id: format!("s{i}"),
            message: Some(imgate::grpc::pb::Message {
                body: format!("{n}").into(),
                ..Default::default()
            }),
            delivery: 0,
        };
        if let Ok(r) = api.push_to_user(req).await {
            let r = r.into_inner();
            users[i].stored.lock().push((r.epoch, r.seq));
            sent.fetch_add(1, Ordering::Relaxed);
        }
        if n % (rate * 10).max(1) == 0 {
            let _ = api
                .broadcast(imgate::grpc::pb::BroadcastRequest {
                    message: Some(imgate::grpc::pb::Message {
                        body: "\"notice\"".into(),
                        ..Default::default()
                    }),
                })
                .await;
        }
    }
}

async fn kick_storms(conns: usize, stop: Arc<AtomicBool>) {
    let api = api().await;
    let mut next = Instant::now() + Duration::from_secs(300);
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if Instant::now() < next {
            continue;
        }
        next += Duration::from_secs(300);
        let t = Instant::now();
        let mut calls = Vec::new();
        for i in (0..conns).step_by(10) {
            let mut api = api.clone();
            calls.push(tokio::spawn(async move {
                let _ = api
                    .kick_user(imgate::grpc::pb::KickUserRequest {
                        user_id: format!("s{i}"),
                        ..Default::default()
                    })
                    .await;
            }));
        }
        for c in calls {
            let _ = c.await;
        }
        println!(
            "kick storm: {} users in {:.2} s",
            conns / 10,
            t.elapsed().as_secs_f64()
        );
    }
}

// ---- abuse --------------------------------------------------------------------------------

async fn abuse(bin: &str, secs: u64, devices: usize) {
    let mut child = start_gateway(bin, &[]);
    let pid = child.id();
    wait_ready().await;
    // Bystanders: ordinary clients on another address, pinging 10 times a second.
    let rtts = Arc::new(parking_lot::Mutex::new(Vec::<u64>::new()));
    for i in 0..100 {
        let rtts = rtts.clone();
        tokio::spawn(async move {
            let mut c = ws(
                "127.0.0.1",
                &format!("token={}", token(&format!("b{i}"), "d")),
                &[],
            )
            .await
            .expect("a bystander connects");
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let t = Instant::now();
                let ping = r#"{"type":"ping","id":"p"}"#;
                if c.send(Message::Text(ping.into())).await.is_err() {
                    return;
                }
                while let Some(Ok(m)) = c.next().await {
                    if text(&m).is_some_and(|v| v["type"] == "pong") {
                        rtts.lock().push(t.elapsed().as_nanos() as u64);
                        break;
                    }
                }
            }
        });
    }
    let phases: [(&str, Phase); 6] = [
        ("baseline (no attack)", Phase::Idle),
        ("401 loop (bad Authorization header)", Phase::Loop401),
        ("bad-token flood (query tokens)", Phase::BadTokens),
        ("slowloris on every route", Phase::Slowloris),
        ("re-auth flood (forged tokens)", Phase::Reauth),
        ("distinct device ids", Phase::Devices(devices)),
    ];
    for (name, phase) in phases {
        tokio::time::sleep(Duration::from_secs(2)).await;
        rtts.lock().clear();
        let before = metrics().await;
        let rss0 = rss_mib(pid);
        let t = Instant::now();
        let detail = run_phase(phase, Duration::from_secs(secs)).await;
        let took = t.elapsed().as_secs_f64();
        let rss1 = rss_mib(pid);
        let mut v = std::mem::take(&mut *rtts.lock());
        v.sort_unstable();
        let after = metrics().await;
        println!(
            "== {name}: {took:.0} s; bystander ping p50 {:.2} ms p99 {:.2} ms max {:.2} ms ({} pings); gateway RSS {rss0:.1} -> {rss1:.1} MiB; {detail}",
            quantile_ms(&v, 0.5),
            quantile_ms(&v, 0.99),
            v.last().copied().unwrap_or(0) as f64 / 1e6,
            v.len(),
        );
        for m in moved(&before, &after) {
            println!("   {m}");
        }
    }
    terminate(pid);
    let _ = child.wait();
}

#[derive(Clone, Copy)]
enum Phase {
    Idle,
    Loop401,
    BadTokens,
    Slowloris,
    Reauth,
    Devices(usize),
}

/// A token shaped like a real ES256 JWT whose signature is random.
fn forged() -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut sig = [0u8; 64];
    rand::rng().fill(&mut sig[..]);
    let now = imgate::now_ms() / 1000;
    format!(
        "{}.{}.{}",
        b64.encode(r#"{"alg":"ES256","typ":"JWT"}"#),
        b64.encode(format!(
            r#"{{"sub":"victim","iat":{now},"exp":{}}}"#,
            now + 3600
        )),
        b64.encode(sig)
    )
}

async fn run_phase(phase: Phase, secs: Duration) -> String {
    let until = Instant::now() + secs;
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    match phase {
        Phase::Idle => tokio::time::sleep(secs).await,
        Phase::Loop401 | Phase::BadTokens => {
            for _ in 0..32 {
                let done = done.clone();
                tasks.push(tokio::spawn(async move {
                    while Instant::now() < until {
                        let t = forged();
                        if matches!(phase, Phase::Loop401) {
                            // Refused with 401 (and the connection closed).
                            let bearer = format!("Bearer {t}");
                            let _ = ws(ATTACKER, "", &[("authorization", &bearer)]).await;
                        } else if let Ok(mut c) = ws(ATTACKER, &format!("token={t}"), &[]).await {
                            // Kicked with 4500: read until it is gone.
                            while let Some(Ok(_)) = c.next().await {}
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
        }
        Phase::Slowloris => {
            // As many half-open requests as the gateway lets one address hold, over every
            // route and over TLS, a byte every second.
            for i in 0..2000 {
                let done = done.clone();
                tasks.push(tokio::spawn(async move {
                    let sock = TcpSocket::new_v4().unwrap();
                    sock.bind(SocketAddr::new(ATTACKER.parse().unwrap(), 0))
                        .unwrap();
                    let to = if i % 5 == 4 { HTTPS } else { HTTP };
                    let Ok(mut s) = sock.connect(to.parse().unwrap()).await else {
                        return;
                    };
                    let path = ["/", "/ws", "/cert-hash", "/dev/token?user=a"][i % 4];
                    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nX-Slow: ");
                    let mut held = Duration::ZERO;
                    for b in req.bytes().chain(std::iter::repeat(b'a')) {
                        if Instant::now() > until || s.write_all(&[b]).await.is_err() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        held += Duration::from_secs(1);
                    }
                    done.fetch_max(held.as_secs(), Ordering::Relaxed);
                }));
            }
        }
        Phase::Reauth => {
            for i in 0..50 {
                let done = done.clone();
                tasks.push(tokio::spawn(async move {
                    let q = format!("token={}", token(&format!("attacker{i}"), "d"));
                    let Ok(mut c) = ws(ATTACKER, &q, &[]).await else {
                        return;
                    };
                    while Instant::now() < until {
                        let auth = format!(r#"{{"type":"auth","token":"{}"}}"#, forged());
                        if c.send(Message::Text(auth.into())).await.is_err() {
                            break;
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                        // Drain what came back without waiting for it.
                        while let Ok(Some(Ok(_))) =
                            tokio::time::timeout(Duration::from_millis(1), c.next()).await
                        {
                        }
                    }
                }));
            }
        }
        Phase::Devices(n) => {
            // One user with an inbox entry; each connection names a new device and acks it.
            let mut api = api().await;
            let _ = api
                .push_to_user(imgate::grpc::pb::PushToUserRequest {
                    user_id: "many".into(),
                    message: Some(imgate::grpc::pb::Message {
                        body: "1".into(),
                        ..Default::default()
                    }),
                    delivery: 0,
                })
                .await;
            // Fewer at once than sessions.max_per_user, so that none is refused with 4507.
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..8 {
                let (done, next) = (done.clone(), next.clone());
                tasks.push(tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return;
                        }
                        let q = format!("token={}&device=x{i}", token("many", &format!("x{i}")));
                        let Ok(mut c) = ws(ATTACKER, &q, &[]).await else {
                            continue;
                        };
                        let mut epoch = String::new();
                        while let Some(Ok(m)) = c.next().await {
                            let Some(v) = text(&m) else { continue };
                            match v["type"].as_str() {
                                Some("welcome") => {
                                    epoch = v["epoch"].as_str().unwrap_or_default().into()
                                }
                                Some("synced") => {
                                    let ack = format!(
                                        r#"{{"type":"ack","seq":{},"epoch":"{epoch}"}}"#,
                                        v["seq"]
                                    );
                                    let _ = c.send(Message::Text(ack.into())).await;
                                    let _ = c.close(None).await;
                                    break;
                                }
                                _ => {}
                            }
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let n = done.load(Ordering::Relaxed);
    match phase {
        Phase::Idle => String::new(),
        Phase::Loop401 | Phase::BadTokens => format!("{n} attempts"),
        Phase::Slowloris => format!("the longest half-open request lived {n} s"),
        Phase::Reauth => format!("{n} forged re-auth frames sent"),
        Phase::Devices(_) => format!("{n} devices connected and acked"),
    }
}
