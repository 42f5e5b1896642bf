//! Floors for the gateway's benchmarks: the same traffic through a bare tokio-tungstenite
//! server that does nothing but move frames (no auth, no inbox, no gRPC, no metrics), on the
//! same machine and with the same process layout as `bench` (server in a child process with
//! two worker threads, clients in this one with two).
//!
//! ```text
//! cargo run --release --example bare -- relay --conns 1000 --rate 10000 --secs 10
//! cargo run --release --example bare -- fanout --conns 10000 --secs 10
//! ```
//! `relay`: pairs of clients; `a` sends to the server, which hands the frame to `b`'s
//! connection task, which writes it (what a relayed chat message does in the gateway, minus
//! the gateway); send → receive latency. The floor under `bench chat`.
//! `fanout`: the server writes a push-sized frame to each client in turn, as fast as the
//! clients take them, with up to 1024 in flight. The floor under `bench push-stream`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

mod common;
use common::{quantile_ms, ws_config, Flags};

struct Opts {
    mode: String,
    conns: usize,
    rate: u64,
    secs: u64,
    serve: bool,
}

fn opts() -> Opts {
    let f = Flags::parse(&["--conns", "--rate", "--secs"], &["--serve"]);
    Opts {
        conns: f.get("--conns", 1000),
        rate: f.get("--rate", 10_000),
        secs: f.get("--secs", 10),
        serve: f.has("--serve"),
        mode: f.mode,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn main() {
    let o = opts();
    if !["relay", "fanout"].contains(&o.mode.as_str()) {
        eprintln!("usage: bare relay|fanout [--conns N] [--rate R] [--secs S]");
        std::process::exit(2);
    }
    if o.serve {
        return runtime().block_on(serve(o));
    }
    // The server is a child process, as the gateway is (and one process could not hold both
    // ends of 10k connections under the usual descriptor limit).
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            o.mode.as_str(),
            "--serve",
            "--conns",
            &o.conns.to_string(),
            "--secs",
            &o.secs.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the server");
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let addr: std::net::SocketAddr = line.trim().parse().expect("the server's address");
    let rt = runtime();
    match o.mode.as_str() {
        "relay" => rt.block_on(relay(&o, addr)),
        _ => rt.block_on(fanout(&o, addr, out)),
    }
    let _ = child.kill();
    let _ = child.wait();
}

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

async fn connect(addr: std::net::SocketAddr, path: String) -> Ws {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        format!("ws://{addr}{path}"),
        tcp,
        Some(ws_config()),
    )
    .await
    .unwrap();
    ws
}

// ---- server ---------------------------------------------------------------------------

/// Every connection gets a writer task fed by a channel, as in the gateway. `relay`: what a
/// `/a/N` client sends goes to `/b/N`'s channel. `fanout`: once `conns` clients are in, push
/// round-robin for `secs` and print how many were sent.
#[allow(clippy::result_large_err)] // tungstenite's handshake callback type
async fn serve(o: Opts) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    println!("{}", listener.local_addr().unwrap());
    let writers: Arc<Mutex<HashMap<String, mpsc::Sender<Message>>>> = Arc::default();
    let in_flight = Arc::new(Semaphore::new(1024));
    let (joined_tx, mut joined) = mpsc::unbounded_channel::<String>();
    {
        let (writers, in_flight) = (writers.clone(), in_flight.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                tcp.set_nodelay(true).unwrap();
                let (writers, in_flight, joined) =
                    (writers.clone(), in_flight.clone(), joined_tx.clone());
                tokio::spawn(async move {
                    let mut path = String::new();
                    let ws = tokio_tungstenite::accept_hdr_async_with_config(
                        tcp,
                        |req: &Request, resp: Response| {
                            path = req.uri().path().to_string();
                            Ok(resp)
                        },
                        Some(ws_config()),
                    )
                    .await
                    .unwrap();
                    let (mut sink, mut stream) = ws.split();
                    let (tx, mut rx) = mpsc::channel::<Message>(64);
                    writers.lock().insert(path.clone(), tx);
                    let _ = joined.send(path.clone());
                    let writer = async {
                        while let Some(m) = rx.recv().await {
                            let _ = sink.send(m).await;
                            in_flight.add_permits(1);
                        }
                    };
                    let peer = path.replacen("/a/", "/b/", 1);
                    let reader = async {
                        while let Some(Ok(m)) = stream.next().await {
                            if path.starts_with("/a/") {
                                let to = writers.lock().get(&peer).cloned();
                                if let Some(to) = to {
                                    let _ = to.send(m).await;
                                }
                            }
                        }
                    };
                    tokio::select! {
                        _ = writer => {}
                        _ = reader => {}
                    }
                });
            }
        });
    }
    if o.mode != "fanout" {
        return std::future::pending().await;
    }
    let mut senders = Vec::with_capacity(o.conns);
    while senders.len() < o.conns {
        let path = joined.recv().await.unwrap();
        senders.push(writers.lock()[&path].clone());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A frame the size of a gateway push.
    let frame = format!(
        "{{\"type\":\"push\",\"id\":\"{:032x}\",\"body\":\"x\",\"ts\":1795000000000,\"seq\":1,\"epoch\":\"k3j2h1\"}}",
        0u128
    );
    let deadline = Instant::now() + Duration::from_secs(o.secs);
    let (mut i, mut n) = (0usize, 0u64);
    while Instant::now() < deadline {
        for _ in 0..256 {
            in_flight.acquire().await.unwrap().forget();
            let queued = senders[i % o.conns]
                .try_send(Message::text(frame.clone()))
                .is_ok();
            i += 1;
            if queued {
                n += 1;
            } else {
                in_flight.add_permits(1); // that connection's queue is full: skip it
            }
        }
    }
    println!("{n}");
    std::future::pending().await
}

// ---- clients --------------------------------------------------------------------------

async fn relay(o: &Opts, addr: std::net::SocketAddr) {
    let pairs = o.conns / 2;
    let per_pair = o.rate as f64 / pairs as f64;
    let start = Instant::now();
    let lat = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::with_capacity(pairs);
    for p in 0..pairs {
        let b = connect(addr, format!("/b/{p}")).await;
        let a = connect(addr, format!("/a/{p}")).await;
        clients.push((a, b));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut tasks = Vec::new();
    for (a, b) in clients {
        let (lat, secs) = (lat.clone(), o.secs);
        tasks.push(tokio::spawn(async move {
            let interval = Duration::from_secs_f64(1.0 / per_pair);
            tokio::time::sleep(interval.mul_f64(rand::random::<f64>())).await;
            let (mut atx, _arx) = a.split();
            let (_btx, mut brx) = b.split();
            let sender = async {
                let mut tick = tokio::time::interval(interval);
                let deadline = Instant::now() + Duration::from_secs(secs);
                while Instant::now() < deadline {
                    tick.tick().await;
                    let body = start.elapsed().as_nanos().to_string();
                    atx.send(Message::text(body)).await.unwrap();
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            };
            let receiver = async {
                while let Some(Ok(m)) = brx.next().await {
                    let Message::Text(t) = m else { continue };
                    let sent: u64 = t.parse().unwrap();
                    lat.lock().push(start.elapsed().as_nanos() as u64 - sent);
                }
            };
            tokio::select! {
                _ = sender => {}
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
    println!(
        "bare relay: {} clients, {} received in {} s: p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
        pairs * 2,
        l.len(),
        o.secs,
        q(0.5),
        q(0.99),
        q(0.999),
        q(1.0)
    );
}

async fn fanout(
    o: &Opts,
    addr: std::net::SocketAddr,
    mut out: impl std::io::BufRead + Send + 'static,
) {
    let received = Arc::new(AtomicU64::new(0));
    for chunk in (0..o.conns).collect::<Vec<_>>().chunks(500) {
        let batch = chunk.iter().map(|i| connect(addr, format!("/c/{i}")));
        for ws in futures_util::future::join_all(batch).await {
            let received = received.clone();
            tokio::spawn(async move {
                let (_tx, mut rx) = ws.split();
                while let Some(Ok(_)) = rx.next().await {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    }
    let sent: u64 = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        line.trim().parse().expect("the count sent")
    })
    .await
    .unwrap();
    let t0 = Instant::now();
    while received.load(Ordering::Relaxed) < sent && t0.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "bare fan-out to {} ws clients: {sent} frames in {} s = {:.0}/s; {} received",
        o.conns,
        o.secs,
        sent as f64 / o.secs as f64,
        received.load(Ordering::Relaxed)
    );
}
