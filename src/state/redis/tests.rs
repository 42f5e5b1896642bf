//! The contract against a real `redis-server` and a real three-master Redis Cluster, both
//! started by the tests; and what only a remote store can do wrong.

use super::server::{RedisCluster, RedisServer};
use super::*;
use crate::state::contract::{self, Fixture};

async fn single(mut s: Settings) -> Fixture {
    let server = RedisServer::start();
    s.state.redis_url = server.url();
    let state = RedisState::connect(&s).await.expect("connects");
    Fixture::new(state, server)
}

async fn cluster(mut s: Settings) -> Fixture {
    let cluster = RedisCluster::start();
    s.state.redis_url = cluster.url();
    let state = RedisState::connect(&s)
        .await
        .expect("connects to the cluster");
    Fixture::new(state, cluster)
}

mod on_one_server {
    use super::*;
    crate::state_contract_tests!(single);
}

mod on_a_cluster {
    use super::*;
    crate::state_contract_tests!(cluster);
}

fn msg(id: &str) -> NewMessage {
    contract::msg(id, "x")
}

#[tokio::test]
async fn a_dead_server_answers_unavailable_within_the_timeout_and_recovers() {
    let mut server = RedisServer::start();
    let mut s = Settings::default();
    s.state.redis_url = server.url();
    s.state.timeout = Duration::from_millis(300);
    let state = RedisState::connect(&s).await.unwrap();
    state.append("u", msg("a")).await.unwrap();
    server.kill();
    let started = std::time::Instant::now();
    let err = state.append("u", msg("b")).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        matches!(
            err,
            StateError::Unavailable { op: "append", .. } | StateError::Timeout { op: "append", .. }
        ),
        "{err:?}"
    );
    server.restart();
    // The manager reconnects by itself; the restarted server is empty: a new epoch.
    let again = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(a) = state.append("u", msg("c")).await {
                return a;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("recovers without a new client");
    assert_eq!(again.seq, 1);
}

#[tokio::test]
async fn a_server_that_does_not_answer_times_out_within_the_timeout() {
    let server = RedisServer::start();
    let mut s = Settings::default();
    s.state.redis_url = server.url();
    s.state.timeout = Duration::from_millis(200);
    let state = RedisState::connect(&s).await.unwrap();
    state.head("u").await.unwrap();
    server.freeze(true);
    let started = std::time::Instant::now();
    let err = state.append("u", msg("a")).await.unwrap_err();
    let took = started.elapsed();
    server.freeze(false);
    assert!(
        matches!(err, StateError::Timeout { op: "append", .. }),
        "{err:?}"
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(err.chain().contains("200ms"), "{}", err.chain());
}

#[tokio::test]
async fn presence_of_an_instance_that_stops_refreshing_disappears() {
    let server = RedisServer::start();
    let mut s = Settings::default();
    s.state.redis_url = server.url();
    s.instance_ttl = Duration::from_millis(300);
    let state = RedisState::connect(&s).await.unwrap();
    let p = |conn: &str, instance: &str| Presence {
        user: "u".into(),
        conn: conn.into(),
        device: "d".into(),
        platform: "web".into(),
        transport: "ws".into(),
        instance: instance.into(),
        connected_at_ms: 1,
    };
    state.maintain("alive").await.unwrap();
    state.maintain("dies").await.unwrap();
    state.add_presence(&p("c1", "alive")).await.unwrap();
    state.add_presence(&p("c2", "dies")).await.unwrap();
    assert_eq!(state.routes("u").await.unwrap(), vec!["alive", "dies"]);
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            state.maintain("alive").await.unwrap();
            if state.routes("u").await.unwrap() == vec!["alive"] {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the silent instance's presence goes");
    // What a survivor then removes of the dead instance: nothing left to report.
    assert_eq!(state.remove_instance("dies").await.unwrap(), 0);
    assert_eq!(state.presence("u").await.unwrap(), vec![p("c1", "alive")]);
}

#[tokio::test]
async fn keys_carry_the_prefix_and_one_hash_tag_per_user() {
    let server = RedisServer::start();
    let mut s = Settings::default();
    s.state.redis_url = server.url();
    s.state.key_prefix = "tenant-a:".into();
    let state = RedisState::connect(&s).await.unwrap();
    let epoch = state.append("alice", msg("m")).await.unwrap().epoch;
    state.ack("alice", Some("phone"), &epoch, 1).await.unwrap();
    state.revoke("alice", None, 5).await.unwrap();
    state.revoke("alice", Some("phone"), 7).await.unwrap();
    let mut c = state.conn();
    let mut keys: Vec<String> = ::redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut c)
        .await
        .unwrap();
    keys.sort();
    assert_eq!(
        keys,
        [
            "tenant-a:{u:alice}:c",
            "tenant-a:{u:alice}:co",
            "tenant-a:{u:alice}:dd",
            "tenant-a:{u:alice}:dt",
            "tenant-a:{u:alice}:m",
            "tenant-a:{u:alice}:q",
            "tenant-a:{u:alice}:r",
        ]
    );
    // Revocations are per device, the whole user under "".
    let mut r: Vec<(String, i64)> = ::redis::cmd("HGETALL")
        .arg("tenant-a:{u:alice}:r")
        .query_async(&mut c)
        .await
        .unwrap();
    r.sort();
    assert_eq!(r, vec![(String::new(), 5), ("phone".to_string(), 7)]);
    // Revocations are forgotten once no token they refuse can still be valid.
    let ttl: i64 = ::redis::cmd("PTTL")
        .arg("tenant-a:{u:alice}:r")
        .query_async(&mut c)
        .await
        .unwrap();
    let lifetime = (s.revocation_ttl.as_millis()) as i64;
    assert!(
        ttl > lifetime - 60_000 && ttl <= lifetime,
        "{ttl} vs {lifetime}"
    );
    // Everything of the inbox expires with it.
    for k in &keys[..6] {
        let ttl: i64 = ::redis::cmd("PTTL")
            .arg(k)
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(ttl > 0, "{k} has no ttl");
    }
}

#[test]
fn urls() {
    assert_eq!(
        parse_urls("redis://a:1, redis://b:2").unwrap(),
        vec!["redis://a:1", "redis://b:2"]
    );
    assert!(parse_urls("").is_err());
    let e = parse_urls("http://x:1").unwrap_err();
    assert!(e.contains("redis://"), "{e}");
    let e = parse_urls("rediss://user:secret@host:6380,nope").unwrap_err();
    assert!(!e.contains("secret"), "{e}");
    assert_eq!(url::redacted("rediss://u:secret@h:1"), "rediss://…@h:1");
}

/// Calls of `cmd` Redis executed (from `INFO commandstats`, which also counts the
/// commands scripts run: the tests pick commands the scripts at hand do not).
async fn calls(state: &RedisState, cmd: &str) -> u64 {
    let mut c = state.conn();
    let info: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

async fn reset_stats(state: &RedisState) {
    let mut c = state.conn();
    let _: () = ::redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut c)
        .await
        .unwrap();
}

#[tokio::test]
async fn one_command_per_durable_push_three_per_login() {
    let server = RedisServer::start();
    let mut s = Settings::default();
    s.state.redis_url = server.url();
    let state = RedisState::connect(&s).await.unwrap();
    let presence = Presence {
        user: "u".into(),
        conn: "c".into(),
        device: "d".into(),
        platform: "web".into(),
        transport: "ws".into(),
        instance: "i".into(),
        connected_at_ms: 1,
    };
    // Scripts are loaded once per server (EVALSHA falls back to loading them).
    state.append("warm", msg("w")).await.unwrap();
    state.resume("warm", Some("d"), None, 10).await.unwrap();
    reset_stats(&state).await;

    state.append("u", msg("a")).await.unwrap();
    assert_eq!(
        calls(&state, "evalsha").await,
        1,
        "an append is one script call"
    );
    reset_stats(&state).await;
    // A login: presence (two commands, sent together) and resume (one script call).
    state.add_presence(&presence).await.unwrap();
    state.resume("u", Some("d"), None, 10).await.unwrap();
    assert_eq!(
        (
            calls(&state, "hset").await,
            calls(&state, "sadd").await,
            calls(&state, "evalsha").await
        ),
        (1, 1, 1)
    );
    reset_stats(&state).await;
    let users: Vec<String> = (0..100).map(|i| format!("u{i}")).collect();
    state.append_many(&users, &msg("b")).await;
    assert_eq!(
        calls(&state, "evalsha").await,
        100,
        "one script call per user"
    );
}

#[tokio::test]
async fn rediss_with_a_private_ca() {
    crate::tls::install_crypto_provider();
    let dir = std::env::temp_dir().join(format!("imgate-redis-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let path = |name: &str| dir.join(name);
    std::fs::write(path("ca.pem"), ca.pem()).unwrap();
    std::fs::write(path("cert.pem"), cert.pem()).unwrap();
    std::fs::write(path("key.pem"), key.serialize_pem()).unwrap();
    let server = RedisServer::start_tls(path("cert.pem"), path("key.pem"), path("ca.pem"));

    let mut s = Settings::default();
    s.state.redis_url = server.url();
    assert!(s.state.redis_url.starts_with("rediss://"));
    // Not a public CA: refused with the system's roots...
    let untrusted = RedisState::connect(&s).await.unwrap();
    assert!(untrusted.ping().await.is_err());
    // ...accepted with the CA configured.
    s.state.redis_ca_file = path("ca.pem").to_string_lossy().into_owned();
    let state = RedisState::connect(&s).await.unwrap();
    state.ping().await.unwrap();
    assert_eq!(state.append("u", msg("a")).await.unwrap().seq, 1);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_master_restarted_is_found_again() {
    let mut cluster = RedisCluster::start();
    let mut s = Settings::default();
    s.state.redis_url = cluster.url();
    s.state.timeout = Duration::from_millis(300);
    let state = RedisState::connect(&s).await.unwrap();
    // Users spread over the three masters' slots.
    let users: Vec<String> = (0..30).map(|i| format!("user-{i}")).collect();
    for r in state.append_many(&users, &msg("before")).await {
        r.unwrap();
    }
    cluster.nodes[0].kill();
    let started = std::time::Instant::now();
    let out = state.append_many(&users, &msg("during")).await;
    let took = started.elapsed();
    let failed = out.iter().filter(|r| r.is_err()).count();
    assert!(failed > 0, "some users live on the dead master");
    assert!(
        took < Duration::from_secs(2),
        "{failed} failures took {took:?}: each is bounded by state.timeout"
    );
    cluster.nodes[0].restart();
    // The same client finds the master again (its slots, empty now: those users get a
    // new epoch, the others keep theirs).
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let out = state.append_many(&users, &msg("after")).await;
            if out.iter().all(|r| r.is_ok()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("every user is served again");
}

#[tokio::test]
async fn an_append_returns_the_instances_holding_the_user() {
    let server = RedisServer::start();
    let mut s = Settings::default();
    s.state.redis_url = server.url();
    let state = RedisState::connect(&s).await.unwrap();
    let msg = |id: &str| NewMessage {
        id: id.into(),
        from: String::new(),
        kind: String::new(),
        body: Bytes::from_static(b"x"),
        ts_ms: 0,
    };
    assert!(state
        .append("u", msg("m0"))
        .await
        .unwrap()
        .routes
        .is_empty());
    for (conn, instance) in [("c1", "gw-a"), ("c2", "gw-b"), ("c3", "gw-a")] {
        state
            .add_presence(&Presence {
                user: "u".into(),
                conn: conn.into(),
                device: "d".into(),
                platform: "web".into(),
                transport: "ws".into(),
                instance: instance.into(),
                connected_at_ms: 1,
            })
            .await
            .unwrap();
    }
    let mut routes = state.append("u", msg("m1")).await.unwrap().routes;
    routes.sort();
    assert_eq!(routes, ["gw-a", "gw-b"], "each instance once");
    // A record the script cannot read (written by something else) is skipped.
    let mut c = state.connection();
    let _: i64 = ::redis::cmd("HSET")
        .arg(state.keys.presence("u"))
        .arg("junk")
        .arg("\x01\x02")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(state.append("u", msg("m2")).await.unwrap().routes.len(), 2);
}
