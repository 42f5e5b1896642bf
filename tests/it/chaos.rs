//! Faults with real processes (SPEC §11): an instance killed with -9 during a stream of
//! durable pushes, a graceful drain of one of three instances, Redis down and back, a
//! Redis Cluster master restarted during traffic. Clients behave as real ones do: they
//! resume with `since`, ack what they hold and drop seqs they already have; the tests count
//! what each user sees, and require every message exactly once, in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::cluster::{instance, msg};
use crate::common::token;
use crate::state::redis_server::{RedisCluster, RedisServer};

/// Bound on a whole scenario.
const SCENARIO: Duration = Duration::from_secs(60);

/// Each user with what it saw.
type Users = Vec<(String, Arc<Mutex<Seen>>)>;

/// What one user saw: the bodies of the durable pushes it accepted, in order.
#[derive(Default)]
struct Seen {
    bodies: Vec<String>,
    /// Seqs beyond the next expected one: a gap the gateway let through.
    gaps: Vec<(u64, u64)>,
    /// Pushes dropped as already held (at-least-once on the wire).
    wire_duplicates: usize,
    connects: usize,
}

/// A client of `user` that stays connected to one of `backends` (what a load balancer
/// would offer: the test removes a backend it killed), resuming after what it holds.
fn follow(
    user: String,
    backends: Arc<Mutex<Vec<SocketAddr>>>,
    seen: Arc<Mutex<Seen>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let t = token(&user, Some("phone"), None, Duration::from_secs(3600));
        let mut position: Option<(String, u64)> = None;
        let mut attempt = 0usize;
        loop {
            let addr = {
                let b = backends.lock();
                b[attempt % b.len()]
            };
            attempt += 1;
            let since = position
                .as_ref()
                .map(|(e, s)| format!("&since={e}:{s}"))
                .unwrap_or_default();
            let url = format!("ws://{addr}/ws?token={t}{since}");
            let Ok(Ok((mut ws, _))) = tokio::time::timeout(
                Duration::from_secs(2),
                tokio_tungstenite::connect_async(url),
            )
            .await
            else {
                // A backend that is gone: the next one (a client's reconnect backoff).
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            seen.lock().connects += 1;
            while let Some(Ok(m)) = ws.next().await {
                let Message::Text(t) = m else { continue };
                let v: Value = serde_json::from_str(&t).unwrap();
                match v["type"].as_str() {
                    Some("welcome") => {
                        let epoch = v["epoch"].as_str().unwrap().to_string();
                        if position.as_ref().is_none_or(|(e, _)| *e != epoch) {
                            position = Some((epoch, 0));
                        }
                    }
                    Some("push") if v.get("seq").is_some() => {
                        let seq = v["seq"].as_u64().unwrap();
                        let (epoch, last) = position.as_mut().unwrap();
                        if seq <= *last {
                            seen.lock().wire_duplicates += 1;
                            continue;
                        }
                        {
                            let mut s = seen.lock();
                            if seq != *last + 1 {
                                s.gaps.push((*last, seq));
                            }
                            let body = v["body"].as_str().unwrap_or_default();
                            s.bodies.push(body.to_string());
                        }
                        *last = seq;
                        let ack = json!({"type": "ack", "seq": seq, "epoch": epoch});
                        if ws.send(Message::text(ack.to_string())).await.is_err() {
                            break;
                        }
                    }
                    _ => {}
                }
            }
        }
    })
}

/// Wait until every user saw `n` messages, then check they are exactly `<user>-0..n` in
/// order, with no gap.
async fn all_seen(users: &[(String, Arc<Mutex<Seen>>)], n: usize) {
    let done = tokio::time::timeout(SCENARIO, async {
        loop {
            if users.iter().all(|(_, s)| s.lock().bodies.len() >= n) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    for (user, s) in users {
        let s = s.lock();
        let want: Vec<String> = (0..n).map(|i| format!("{user}-{i}")).collect();
        assert!(
            done.is_ok() || s.bodies.len() >= n,
            "{user}: saw {} of {n} (lost), connects {}",
            s.bodies.len(),
            s.connects
        );
        assert_eq!(s.bodies, want, "{user}: lost, duplicated or out of order");
        assert!(s.gaps.is_empty(), "{user}: gaps {:?}", s.gaps);
    }
}

/// Durable pushes `<user>-i` for i in `range`, through `gw`, retried while the store is
/// unavailable (the same message id: the dedupe makes a retry safe).
async fn push_range(
    gw: &crate::common::TestGateway,
    users: &[String],
    range: std::ops::Range<usize>,
) {
    for i in range {
        for u in users {
            let mut m = msg("");
            m.body = bytes::Bytes::from(format!("\"{u}-{i}\""));
            m.id = format!("{u}-{i}");
            tokio::time::timeout(SCENARIO, async {
                while gw.gw().delivery.push_durable(u, m.clone()).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
            .expect("the push is taken in time");
        }
    }
}

/// An `imgate serve` process on the Redis at `url`; returns it and its WebSocket address.
async fn child_instance(url: &str, id: &str) -> (std::process::Child, SocketAddr) {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_imgate"))
        .arg("serve")
        .env("RUST_LOG", "info")
        .env("IMGATE__INSTANCE__ID", id)
        .env("IMGATE__STATE__BACKEND", "redis")
        .env("IMGATE__STATE__REDIS_URL", url)
        .env("IMGATE__CLUSTER__HEARTBEAT", "200ms")
        .env("IMGATE__CLUSTER__INSTANCE_TTL", "1s")
        .env("IMGATE__LISTEN__HTTP", "127.0.0.1:0")
        .env("IMGATE__LISTEN__HTTPS", "")
        .env("IMGATE__LISTEN__WEBTRANSPORT", "")
        .env("IMGATE__LISTEN__GRPC", "")
        .env("IMGATE__LISTEN__OPS", "")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.contains("imgate started") {
                let _ = tx.send(line);
            }
        }
    });
    let line = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(20)))
        .await
        .unwrap()
        .expect("the child gateway starts in time");
    let at = line.find(" http=").expect("http address") + 6;
    let http = line[at..].split(' ').next().unwrap().parse().unwrap();
    (child, http)
}

fn users(n: usize, tag: &str) -> Vec<String> {
    (0..n).map(|i| format!("{tag}{i}")).collect()
}

fn followers(
    names: &[String],
    backends: &Arc<Mutex<Vec<SocketAddr>>>,
) -> (Users, Vec<tokio::task::JoinHandle<()>>) {
    let mut seen = Vec::new();
    let mut tasks = Vec::new();
    for u in names {
        let s = Arc::new(Mutex::new(Seen::default()));
        tasks.push(follow(u.clone(), backends.clone(), s.clone()));
        seen.push((u.clone(), s));
    }
    (seen, tasks)
}

/// Wait until every user has a connection (its first welcome was handled).
async fn all_connected(seen: &[(String, Arc<Mutex<Seen>>)]) {
    tokio::time::timeout(SCENARIO, async {
        while !seen.iter().all(|(_, s)| s.lock().connects > 0) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("every user connected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_with_sigkill_loses_nothing() {
    let redis = RedisServer::start();
    sigkill_during_a_stream(&redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_with_sigkill_loses_nothing_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    sigkill_during_a_stream(&cluster.url()).await;
}

async fn sigkill_during_a_stream(url: &str) {
    let a = instance(url, "a", |_| {}).await;
    let (mut b, b_addr) = child_instance(url, "b").await;
    // Every user starts on b (the balancer's first pick), and comes to a after the kill.
    let backends = Arc::new(Mutex::new(vec![b_addr, a.http]));
    let names = users(6, "k");
    let (seen, tasks) = followers(&names, &backends);
    all_connected(&seen).await;
    const N: usize = 150;
    // A third of the stream reaches them on b over the bus...
    push_range(&a, &names, 0..N / 3).await;
    // ...then b dies mid-stream, without a word to anyone.
    b.kill().unwrap();
    b.wait().unwrap();
    backends.lock().retain(|x| *x != b_addr);
    push_range(&a, &names, N / 3..N).await;
    all_seen(&seen, N).await;
    assert!(
        seen.iter().all(|(_, s)| s.lock().connects >= 2),
        "every user moved to a"
    );
    // a noticed b is dead: one instance left.
    let mut api = crate::cluster::api(&a).await;
    tokio::time::timeout(SCENARIO, async {
        loop {
            let st = api
                .get_stats(imgate::grpc::pb::GetStatsRequest {})
                .await
                .unwrap()
                .into_inner();
            if st.instances == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the dead instance is dropped from the registry");
    for t in tasks {
        t.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_one_of_three_instances_moves_its_clients_without_loss() {
    let redis = RedisServer::start();
    let a = instance(&redis.url(), "a", |_| {}).await;
    let b = instance(&redis.url(), "b", |_| {}).await;
    let mut c = instance(&redis.url(), "c", |_| {}).await;
    let backends = Arc::new(Mutex::new(vec![c.http]));
    let names = users(6, "d");
    let (seen, tasks) = followers(&names, &backends);
    all_connected(&seen).await;
    // From now on the balancer sends new connections to a and b.
    *backends.lock() = vec![a.http, b.http];
    const N: usize = 120;
    let pushing = async {
        push_range(&a, &names, 0..N / 2).await;
        push_range(&b, &names, N / 2..N).await;
    };
    let draining = async {
        c.running.take().unwrap().drain().await;
    };
    tokio::join!(pushing, draining);
    all_seen(&seen, N).await;
    assert!(seen.iter().all(|(_, s)| s.lock().connects >= 2));
    for t in tasks {
        t.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_then_back_keeps_clients_and_resubscribes_without_duplicates() {
    let redis = RedisServer::start();
    let a = instance(&redis.url(), "a", |_| {}).await;
    let b = instance(&redis.url(), "b", |_| {}).await;
    let backends = Arc::new(Mutex::new(vec![b.http]));
    let names = users(4, "r");
    let (seen, tasks) = followers(&names, &backends);
    all_connected(&seen).await;
    push_range(&a, &names, 0..20).await;
    // Redis stops answering (stuck, or the network to it drops packets).
    redis.freeze(true);
    let mut next = msg("");
    next.id = "r0-20".into();
    next.body = bytes::Bytes::from("\"r0-20\"");
    let err = a.gw().delivery.push_durable("r0", next).await;
    // UNAVAILABLE on a timeout means "maybe stored": the command may still run once Redis
    // answers. The caller retries with the same message id (push_range does), and the
    // dedupe keeps the user from seeing it twice.
    assert!(err.is_err(), "durable pushes fail while Redis is down");
    for gw in [&a, &b] {
        tokio::time::timeout(SCENARIO, async {
            loop {
                let (_, body) = crate::common::http_get(gw.ops, "/healthz").await;
                let v: Value = serde_json::from_str(&body).unwrap();
                if v["state"]["up"] == false {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the health check reports the store down");
    }
    // Clients stay, and transient pushes to local connections still work.
    let out = b.gw().delivery.push_transient("r0", msg("typing"));
    assert_eq!(out.delivered, 1);
    redis.freeze(false);
    // After Redis is back, pushes through a reach the clients on b again: b resubscribed.
    push_range(&a, &names, 20..40).await;
    all_seen(&seen, 40).await;
    // Both registered again: each counts two live instances.
    crate::cluster::until_instances(&a, 2).await;
    crate::cluster::until_instances(&b, 2).await;
    assert!(
        seen.iter().all(|(_, s)| s.lock().connects == 1),
        "nobody was disconnected"
    );
    for t in tasks {
        t.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_master_restarted_during_traffic_loses_nothing() {
    let mut cluster = RedisCluster::start_persistent();
    let url = cluster.url();
    let a = instance(&url, "a", |c| c.state.timeout = Duration::from_secs(1)).await;
    let b = instance(&url, "b", |c| c.state.timeout = Duration::from_secs(1)).await;
    let backends = Arc::new(Mutex::new(vec![b.http]));
    let names = users(6, "m");
    let (seen, tasks) = followers(&names, &backends);
    all_connected(&seen).await;
    const N: usize = 60;
    push_range(&a, &names, 0..N / 3).await;
    cluster.nodes[0].restart();
    push_range(&a, &names, N / 3..N).await;
    all_seen(&seen, N).await;
    for t in tasks {
        t.abort();
    }
}
