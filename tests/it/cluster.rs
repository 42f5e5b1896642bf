//! Several instances on one Redis behave as one gateway (SPEC §11): pushes, kicks,
//! revocations and login-policy replacements cross instances; a lost bus message delays a
//! durable push but never loses it; the registry counts live instances.

use std::time::Duration;

use bytes::Bytes;
use imgate::config::{LoginPolicy, StateBackend};
use imgate::delivery::OutMessage;
use imgate::grpc::pb;
use imgate::grpc::pb::gateway_client::GatewayClient;
use imgate::state::NewMessage;

use crate::common::{token, Client, Kind, TestGateway, WAIT};

use crate::state::redis_server::RedisServer;

pub(crate) fn msg(body: &str) -> OutMessage {
    OutMessage {
        body: Bytes::from(format!("\"{body}\"")),
        ..Default::default()
    }
}

/// An instance named `id` on the Redis at `url`, heartbeating every 200 ms.
pub(crate) async fn instance(
    url: &str,
    id: &str,
    tweak: impl FnOnce(&mut imgate::config::Config),
) -> TestGateway {
    let (url, id) = (url.to_string(), id.to_string());
    TestGateway::with(move |c| {
        c.instance.id = id;
        c.state.backend = StateBackend::Redis;
        c.state.redis_url = url;
        c.state.timeout = Duration::from_millis(500);
        c.cluster.heartbeat = Duration::from_millis(200);
        c.cluster.instance_ttl = Duration::from_millis(1000);
        tweak(c);
    })
    .await
}

pub(crate) async fn api(
    gw: &TestGateway,
) -> GatewayClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        impl tonic::service::Interceptor,
    >,
> {
    GatewayClient::with_interceptor(
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
    )
}

async fn connect(gw: &TestGateway, user: &str, device: &str, platform: Option<&str>) -> Client {
    let t = token(user, Some(device), platform, Duration::from_secs(3600));
    let mut c = gw
        .connect(Kind::Ws, &format!("token={t}"), &[])
        .await
        .unwrap();
    c.expect("welcome").await;
    c.expect("synced").await;
    c
}

/// Wait until instance `gw` counts `n` live instances (its registry view).
pub(crate) async fn until_instances(gw: &TestGateway, n: u32) {
    let mut api = api(gw).await;
    tokio::time::timeout(WAIT, async {
        loop {
            let s = api
                .get_stats(pb::GetStatsRequest {})
                .await
                .unwrap()
                .into_inner();
            if s.instances == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{n} instances seen in time"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_taken_by_one_instance_reach_a_user_on_another() {
    let redis = RedisServer::start();
    // Heartbeats far apart: the durable push must come over the bus, not from the
    // inbox-head check.
    let slow = |c: &mut imgate::config::Config| {
        c.cluster.heartbeat = Duration::from_secs(20);
        c.cluster.instance_ttl = Duration::from_secs(60);
    };
    let a = instance(&redis.url(), "a", slow).await;
    let b = instance(&redis.url(), "b", slow).await;
    let mut bob = connect(&b, "bob", "phone", None).await;
    let mut carol = connect(&a, "carol", "phone", None).await;
    // Presence is written once the session is up: the durable push below is routed by it.
    bob.ping("registered").await;

    let out = a
        .gw()
        .delivery
        .push_durable("bob", msg("d1"))
        .await
        .unwrap();
    assert!(out.online, "the user is online on another instance");
    let p = tokio::time::timeout(Duration::from_secs(3), bob.expect("push"))
        .await
        .expect("over the bus, well before a heartbeat");
    assert_eq!(
        (p["seq"].as_u64(), p["body"].as_str()),
        (Some(1), Some("d1"))
    );

    a.gw().delivery.push_transient("bob", msg("typing"));
    let p = bob.expect("push").await;
    assert_eq!((p["body"].as_str(), p.get("seq")), (Some("typing"), None));

    b.gw().delivery.broadcast(msg("all"));
    assert_eq!(bob.expect("push").await["body"], "all");
    assert_eq!(carol.expect("push").await["body"], "all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kick_on_one_instance_closes_the_device_on_another_and_its_token_stays_refused() {
    let redis = RedisServer::start();
    let a = instance(&redis.url(), "a", |_| {}).await;
    let b = instance(&redis.url(), "b", |_| {}).await;
    let t = token("kim", Some("phone"), None, Duration::from_secs(3600));
    let mut kim = b
        .connect(Kind::Ws, &format!("token={t}"), &[])
        .await
        .unwrap();
    kim.expect("welcome").await;
    kim.expect("synced").await;
    // Let the token be cached on b: a cached result must not outlive the revocation.
    a.gw().kick_user("kim", None, "").await.unwrap();
    kim.expect_kick(4502).await;
    // The same token on b (which learned the revocation over the bus, and had the token
    // cached) is refused.
    let mut again = b
        .connect(Kind::Ws, &format!("token={t}"), &[])
        .await
        .unwrap();
    again.expect_kick(4500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_per_user_holds_across_instances() {
    let redis = RedisServer::start();
    let policy = |c: &mut imgate::config::Config| c.sessions.policy = LoginPolicy::OnePerUser;
    let a = instance(&redis.url(), "a", policy).await;
    let b = instance(&redis.url(), "b", policy).await;
    let mut first = connect(&a, "lee", "phone", None).await;
    let mut second = connect(&b, "lee", "laptop", None).await;
    first.expect_kick(4503).await;
    second.ping("still-here").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_push_whose_notification_is_lost_arrives_within_two_heartbeats() {
    let redis = RedisServer::start();
    let a = instance(&redis.url(), "a", |_| {}).await;
    let b = instance(&redis.url(), "b", |_| {}).await;
    let mut bob = connect(&b, "bob", "phone", None).await;
    bob.ping("registered").await;
    // Stored by instance a without telling anyone: as if the bus lost the notification.
    for i in 1..=3 {
        a.gw()
            .state
            .append(
                "bob",
                NewMessage {
                    id: format!("m{i}"),
                    from: String::new(),
                    kind: String::new(),
                    body: Bytes::from(format!("{i}")),
                    ts_ms: 0,
                },
            )
            .await
            .unwrap();
    }
    let started = std::time::Instant::now();
    for seq in 1..=3 {
        assert_eq!(bob.expect("push").await["seq"], seq);
    }
    // Two heartbeats (400 ms), plus room for a loaded machine.
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "arrived after {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_stats_and_get_user_status_answer_for_the_cluster() {
    let redis = RedisServer::start();
    let a = instance(&redis.url(), "a", |_| {}).await;
    let b = instance(&redis.url(), "b", |_| {}).await;
    let mut bob = connect(&b, "bob", "phone", None).await;
    let mut ann = connect(&a, "ann", "phone", None).await;
    bob.ping("up").await;
    ann.ping("up").await;
    until_instances(&a, 2).await;
    let mut api = api(&a).await;
    tokio::time::timeout(WAIT, async {
        loop {
            let s = api
                .get_stats(pb::GetStatsRequest {})
                .await
                .unwrap()
                .into_inner();
            if (s.instances, s.connections, s.online_users) == (2, 2, 2) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("stats summed over both instances");
    let st = api
        .get_user_status(pb::GetUserStatusRequest {
            user_ids: vec!["bob".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(st.statuses[0].online, "{st:?}");

    // b leaves gracefully: a counts one instance again at once, not after instance_ttl.
    let mut b = b;
    b.running.take().unwrap().drain().await;
    until_instances(&a, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_made_before_an_instance_started_holds_there() {
    let redis = RedisServer::start();
    let a = instance(&redis.url(), "a", |_| {}).await;
    let t = token("kim", Some("phone"), None, Duration::from_secs(3600));
    a.gw().kick_user("kim", Some("phone"), "").await.unwrap();
    // b never heard it on the bus: it learns it from the store at login.
    let b = instance(&redis.url(), "b", |_| {}).await;
    let mut kim = b
        .connect(Kind::Ws, &format!("token={t}"), &[])
        .await
        .unwrap();
    kim.expect_kick(4502).await;
    // Another device's token is untouched by a device revocation.
    connect(&b, "kim", "laptop", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_per_user_counts_the_connections_of_every_instance() {
    let redis = RedisServer::start();
    let two = |c: &mut imgate::config::Config| c.sessions.max_per_user = 2;
    let a = instance(&redis.url(), "a", two).await;
    let b = instance(&redis.url(), "b", two).await;
    let _first = connect(&a, "lee", "phone", None).await;
    let _second = connect(&b, "lee", "laptop", None).await;
    let t = token("lee", Some("tablet"), None, Duration::from_secs(3600));
    let mut third = a
        .connect(Kind::Ws, &format!("token={t}"), &[])
        .await
        .unwrap();
    third.expect_kick(4507).await;
}
