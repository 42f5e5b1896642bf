//! The state store seen from clients: cursors that belong to real devices, and a gateway
//! on a real redis-server that dies and comes back.

use std::time::Duration;

use bytes::Bytes;
use imgate::config::StateBackend;
use imgate::delivery::OutMessage;
use imgate::grpc::pb;
use imgate::grpc::pb::gateway_client::GatewayClient;
use serde_json::{json, Value};
use tonic::Code;

use crate::common::{eventually_async, metric, token, Client, Kind, TestGateway, WAIT};

#[path = "../../src/state/redis/server.rs"]
pub(crate) mod redis_server;
use redis_server::{RedisCluster, RedisServer};

fn msg(body: &str) -> OutMessage {
    OutMessage {
        body: Bytes::from(body.to_string()),
        ..Default::default()
    }
}

/// Connect as `user`, on `device` (None: the gateway makes a device id up); returns the
/// welcome and the pushes replayed before `synced`.
async fn connect(gw: &TestGateway, user: &str, device: Option<&str>) -> (Client, Value, Vec<u64>) {
    let t = token(user, device, None, Duration::from_secs(3600));
    let mut c = gw
        .connect(Kind::Ws, &format!("token={t}"), &[])
        .await
        .unwrap();
    let welcome = c.expect("welcome").await;
    let mut seqs = Vec::new();
    loop {
        let v = c.recv().await;
        match v["type"].as_str() {
            Some("push") => seqs.push(v["seq"].as_u64().unwrap()),
            Some("synced") => return (c, welcome, seqs),
            _ => panic!("unexpected frame during replay: {v}"),
        }
    }
}

/// Ack `seq`, and wait until the gateway handled it (a ping is answered after it).
async fn ack(c: &mut Client, epoch: &Value, seq: u64) {
    c.send(json!({"type": "ack", "seq": seq, "epoch": epoch}))
        .await;
    c.ping("after-ack").await;
}

#[tokio::test]
async fn a_made_up_device_id_does_not_crowd_out_a_real_devices_cursor() {
    let gw = TestGateway::with(|c| c.sessions.max_devices = 1).await;
    for i in 1..=3 {
        gw.gw()
            .delivery
            .push_durable("u", msg(&i.to_string()))
            .await
            .unwrap();
    }
    let (mut phone, w, seqs) = connect(&gw, "u", Some("phone")).await;
    assert_eq!(seqs, vec![1, 2, 3]);
    ack(&mut phone, &w["epoch"], 2).await;
    phone.close().await;
    // No `did`, no `device`: an id made up for this connection, which can never resume.
    let (mut anon, w, seqs) = connect(&gw, "u", None).await;
    assert!(w["device"].as_str().unwrap().starts_with("d-"));
    assert_eq!(seqs, vec![3], "it starts after the user's cursor");
    ack(&mut anon, &w["epoch"], 3).await;
    anon.close().await;
    // The phone still has its cursor: it gets what it did not ack.
    let (_phone, w, seqs) = connect(&gw, "u", Some("phone")).await;
    assert_eq!(w["cursor"], 2);
    assert_eq!(seqs, vec![3]);
    // What the made-up device acked counts for the user: a new device starts after it.
    let (_tablet, w, seqs) = connect(&gw, "u", Some("tablet")).await;
    assert_eq!((w["cursor"].as_u64(), seqs.len()), (Some(0), 0));
}

#[tokio::test]
async fn an_ack_beyond_what_was_sent_does_not_skip_the_rest() {
    let gw = TestGateway::with(|c| c.state.replay_limit = 2).await;
    for i in 1..=5 {
        gw.gw()
            .delivery
            .push_durable("u", msg(&i.to_string()))
            .await
            .unwrap();
    }
    let t = token("u", Some("phone"), None, Duration::from_secs(3600));
    let mut phone = gw
        .connect(Kind::Ws, &format!("token={t}"), &[])
        .await
        .unwrap();
    let w = phone.expect("welcome").await;
    assert_eq!(phone.expect("push").await["seq"], 1);
    assert_eq!(phone.expect("push").await["seq"], 2);
    // A buggy client acks the head while it holds 1 and 2 only, then goes.
    ack(&mut phone, &w["epoch"], 5).await;
    phone.close().await;
    // Its cursor is what it was sent: the replay starts at 3 (2 per batch).
    let mut phone = gw
        .connect(Kind::Ws, &format!("token={t}"), &[])
        .await
        .unwrap();
    assert_eq!(phone.expect("welcome").await["cursor"], 2);
    assert_eq!(phone.expect("push").await["seq"], 3);
    assert_eq!(phone.expect("push").await["seq"], 4);
}

/// `imgate_state_up`. The metrics recorder is one per process and tests run gateways side
/// by side, so a test also checks its own gateway's view (`store_up`).
async fn state_up(gw: &TestGateway) -> f64 {
    let (_, text) = gw.http_get(gw.ops, "/metrics").await;
    metric(&text, "imgate_state_up", &[])
}

/// This gateway's view of the store, from `/healthz`.
async fn store_up(gw: &TestGateway) -> bool {
    let (_, body) = gw.http_get(gw.ops, "/healthz").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    v["state"]["up"].as_bool().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_then_back_without_a_gateway_restart() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let gw = TestGateway::with(|c| {
        c.state.backend = StateBackend::Redis;
        c.state.redis_url = url;
        c.state.timeout = Duration::from_millis(300);
        // Upkeep (and so the health gauge) every 300 ms.
        c.cluster.instance_ttl = Duration::from_millis(900);
        c.cluster.heartbeat = Duration::from_millis(300);
    })
    .await;
    let mut api = GatewayClient::with_interceptor(
        tonic::transport::Channel::from_shared(format!("http://{}", gw.grpc.unwrap()))
            .unwrap()
            .connect()
            .await
            .unwrap(),
        |mut req: tonic::Request<()>| {
            req.metadata_mut()
                .insert("authorization", "Bearer dev-key".parse().unwrap());
            Ok(req)
        },
    );
    let push = |body: &str, delivery: pb::Delivery| pb::PushToUserRequest {
        user_id: "u".into(),
        message: Some(pb::Message {
            body: Bytes::from(body.to_string()),
            ..Default::default()
        }),
        delivery: delivery as i32,
    };
    let (mut phone, _, _) = connect(&gw, "u", Some("phone")).await;
    let r = api
        .push_to_user(push("\"one\"", pb::Delivery::Durable))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.seq, r.online), (1, true));
    assert_eq!(phone.expect("push").await["body"], "one");
    assert!(store_up(&gw).await);

    redis.kill();
    let started = std::time::Instant::now();
    let err = api
        .push_to_user(push("\"lost?\"", pb::Delivery::Durable))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "UNAVAILABLE took {:?}",
        started.elapsed()
    );
    // Connected clients stay, and transient pushes to them still work.
    let r = api
        .push_to_user(push("\"typing\"", pb::Delivery::Transient))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.delivered, 1);
    let p = phone.expect("push").await;
    assert_eq!((p["body"].as_str(), p.get("seq")), (Some("typing"), None));
    phone.ping("still-here").await;
    eventually_async(|| async { !store_up(&gw).await }).await;
    eventually_async(|| async { state_up(&gw).await == 0.0 }).await;

    redis.restart();
    eventually_async(|| async { store_up(&gw).await }).await;
    let r = tokio::time::timeout(WAIT, async {
        loop {
            match api
                .push_to_user(push("\"two\"", pb::Delivery::Durable))
                .await
            {
                Ok(r) => return r.into_inner(),
                Err(e) => {
                    assert_eq!(e.code(), Code::Unavailable);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
    .await
    .expect("durable pushes work again");
    // The restarted Redis kept nothing: a new inbox, so a new epoch. The connected device
    // is told to resync (its positions belong to the lost inbox) and gets the push on
    // its way back.
    assert_eq!(r.seq, 1);
    phone.expect_kick(4103).await;
    let (_phone, w, seqs) = connect(&gw, "u", Some("phone")).await;
    assert_eq!(w["epoch"].as_str(), Some(r.epoch.as_str()));
    assert_eq!(seqs, vec![1]);
}

/// The keys a Redis holds, by plain-text `KEYS *`.
fn redis_keys(redis: &RedisServer) -> Vec<String> {
    let reply = redis_server::command(redis.port, "KEYS *").expect("redis answers");
    let mut keys: Vec<String> = reply
        .lines()
        .filter(|l| !l.starts_with(['*', '$']))
        .map(str::to_string)
        .collect();
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_instance_leaves_no_presence_in_redis() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut gw = TestGateway::with(|c| {
        c.state.backend = StateBackend::Redis;
        c.state.redis_url = url;
    })
    .await;
    let (mut phone, _, _) = connect(&gw, "u", Some("phone")).await;
    let state = gw.gw().state.clone();
    assert_eq!(state.routes("u").await.unwrap(), vec!["test-1"]);
    assert!(redis_keys(&redis).contains(&"imgate:{i:test-1}:alive".to_string()));
    let running = gw.running.take().unwrap();
    let drain = tokio::spawn(running.drain());
    phone.expect_kick(4101).await;
    tokio::time::timeout(WAIT, drain).await.unwrap().unwrap();
    assert!(state.presence("u").await.unwrap().is_empty());
    let left: Vec<String> = redis_keys(&redis)
        .into_iter()
        .filter(|k| k.contains("{i:") || k.ends_with(":p"))
        .collect();
    assert!(left.is_empty(), "left in Redis: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_on_a_redis_cluster_resumes_devices() {
    let cluster = RedisCluster::start();
    let url = cluster.url();
    let gw = TestGateway::with(|c| {
        c.state.backend = StateBackend::Redis;
        c.state.redis_url = url;
    })
    .await;
    // Users on every master's slots, offline: their pushes wait in their inboxes.
    let users: Vec<String> = (0..12).map(|i| format!("user-{i}")).collect();
    for round in 1..=3 {
        for r in gw
            .gw()
            .delivery
            .push_durable_many(&users, msg(&round.to_string()))
            .await
        {
            assert_eq!(r.unwrap().seq, round);
        }
    }
    let mut online = Vec::new();
    for user in &users {
        let (mut c, w, seqs) = connect(&gw, user, Some("phone")).await;
        assert_eq!(
            (w["head_seq"].as_u64(), seqs),
            (Some(3), vec![1, 2, 3]),
            "{user}"
        );
        ack(&mut c, &w["epoch"], 3).await;
        c.close().await;
        let (c, w, seqs) = connect(&gw, user, Some("phone")).await;
        assert_eq!((w["cursor"].as_u64(), seqs.len()), (Some(3), 0), "{user}");
        online.push(c);
    }
    // GetUserStatus's batched lookup, once each closed session removed its record.
    let state = gw.gw().state.clone();
    eventually_async(|| async {
        let status = state.presence_many(&users).await.unwrap();
        status.iter().all(|p| p.len() == 1)
    })
    .await;
    drop(online);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prod_example_starts_against_a_reachable_redis() {
    let redis = RedisServer::start();
    // What the production host provides (key files, a private network, its Redis) is
    // replaced through the environment; everything else is config/prod.toml as shipped.
    let env: Vec<(String, String)> = [
        ("IMGATE__STATE__REDIS_URL", redis.url().as_str()),
        ("IMGATE__LISTEN__HTTP", "127.0.0.1:0"),
        ("IMGATE__LISTEN__HTTPS", ""),
        ("IMGATE__LISTEN__WEBTRANSPORT", ""),
        ("IMGATE__LISTEN__GRPC", "127.0.0.1:0"),
        ("IMGATE__LISTEN__OPS", "127.0.0.1:0"),
        ("IMGATE__TLS__CERT_FILE", ""),
        ("IMGATE__TLS__KEY_FILE", ""),
        ("IMGATE__TLS__TERMINATED_UPSTREAM", "true"),
        ("IMGATE__GRPC__TLS_CERT", ""),
        ("IMGATE__GRPC__TLS_KEY", ""),
        ("IMGATE__AUTH__JWT_PUBLIC_KEYS", "[]"),
        ("IMGATE__AUTH__ALGORITHMS", "[\"HS256\"]"),
        (
            "IMGATE__AUTH__JWT_SECRET",
            "a-test-secret-of-at-least-32-bytes!!",
        ),
        (
            "IMGATE__GRPC__API_KEYS",
            "[\"a-test-api-key-of-some-length\"]",
        ),
        ("IMGATE__INSTANCE__ID", "prod-1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/prod.toml");
    let cfg = imgate::config::Config::load(Some(std::path::Path::new(path)), env).unwrap();
    assert_eq!(cfg.state.backend, StateBackend::Redis);
    cfg.validate().expect("valid");
    let running = imgate::app::start(cfg).await.expect("starts");
    let ops = running.addrs.ops.unwrap();
    let (status, body) = crate::common::http_get(ops, "/healthz").await;
    assert_eq!(status, 200);
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["state"], json!({"backend": "redis", "up": true}));
    assert!(redis_keys(&redis).contains(&"imgate:{i:prod-1}:alive".to_string()));
    running.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_starts_while_redis_is_away_and_catches_up() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    redis.kill();
    let gw = TestGateway::with(|c| {
        c.state.backend = StateBackend::Redis;
        c.state.redis_url = url;
        c.state.timeout = Duration::from_millis(300);
        c.cluster.instance_ttl = Duration::from_millis(900);
        c.cluster.heartbeat = Duration::from_millis(300);
    })
    .await;
    assert!(!store_up(&gw).await);
    let err = gw
        .gw()
        .delivery
        .push_durable("u", msg("x"))
        .await
        .unwrap_err();
    assert!(err.chain().contains("append"), "{}", err.chain());
    redis.restart();
    eventually_async(|| async { store_up(&gw).await }).await;
    // Marked alive again by its upkeep: its connections show in presence.
    let (_phone, _, _) = connect(&gw, "u", Some("phone")).await;
    assert_eq!(gw.gw().state.routes("u").await.unwrap(), vec!["test-1"]);
}
