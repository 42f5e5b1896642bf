//! SPEC §6: login policies.

use std::time::Duration;

use imgate::config::LoginPolicy;

use crate::common::{token, Kind, TestGateway};

async fn connect_as(gw: &TestGateway, user: &str, platform: &str) -> crate::common::Client {
    let t = token(user, None, Some(platform), Duration::from_secs(3600));
    gw.connect(Kind::Ws, &format!("token={t}"), &[])
        .await
        .unwrap()
}

#[tokio::test]
async fn multi_caps_connections_per_user() {
    let gw = TestGateway::with(|c| c.sessions.max_per_user = 2).await;
    let mut a = connect_as(&gw, "u", "ios").await;
    a.expect("welcome").await;
    let mut b = connect_as(&gw, "u", "ios").await;
    b.expect("welcome").await;
    let mut c = connect_as(&gw, "u", "web").await;
    c.expect_kick(4507).await;
    // The first two are untouched; another user is not limited by this one.
    assert_eq!(a.ping("a").await["id"], "a");
    assert_eq!(b.ping("b").await["id"], "b");
    let mut other = connect_as(&gw, "v", "ios").await;
    other.expect("welcome").await;
    // A slot frees when one leaves.
    b.close().await;
    crate::common::eventually(|| gw.gw().hub.connections("u").len() == 1).await;
    let mut d = connect_as(&gw, "u", "web").await;
    d.expect("welcome").await;
    assert_eq!(d.ping("d").await["id"], "d");
}

#[tokio::test]
async fn one_per_platform_replaces_same_platform() {
    let gw = TestGateway::with(|c| c.sessions.policy = LoginPolicy::OnePerPlatform).await;
    let mut ios1 = connect_as(&gw, "u", "ios").await;
    ios1.expect("welcome").await;
    let mut web = connect_as(&gw, "u", "web").await;
    web.expect("welcome").await;
    let mut ios2 = connect_as(&gw, "u", "ios").await;
    ios2.expect("welcome").await;
    ios1.expect_kick(4503).await;
    assert_eq!(web.ping("w").await["id"], "w");
    assert_eq!(ios2.ping("i").await["id"], "i");
}

#[tokio::test]
async fn one_per_user_replaces_everything() {
    let gw = TestGateway::with(|c| c.sessions.policy = LoginPolicy::OnePerUser).await;
    let mut a = connect_as(&gw, "u", "ios").await;
    a.expect("welcome").await;
    let mut b = connect_as(&gw, "u", "web").await;
    b.expect("welcome").await;
    a.expect_kick(4503).await;
    assert_eq!(b.ping("b").await["id"], "b");
    assert_eq!(gw.gw().hub.connections("u").len(), 1);
}
