//! What only WebTransport has: the control stream's framing, extra streams, datagrams, the
//! session that never opens its control stream, the close sequence, certificate rotation.
//! The behaviour shared with WebSocket runs over `wt` from the same test bodies elsewhere.

use std::time::Duration;

use serde_json::{json, Value};
use wtransport::error::ConnectionError;

use crate::common::{metric, token, Kind, TestGateway, WAIT};

fn hour() -> Duration {
    Duration::from_secs(3600)
}

/// The QUIC application error code a session was closed with.
async fn close_code(conn: &wtransport::Connection) -> Option<u64> {
    match tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("closed in time")
    {
        ConnectionError::ApplicationClosed(c) => Some(c.code().into_inner()),
        _ => None,
    }
}

async fn metrics(gw: &TestGateway) -> String {
    gw.http_get(gw.ops, "/metrics").await.1
}

/// Wait until a counter (summed over series with these labels) reaches `min`.
async fn metric_reaches(gw: &TestGateway, name: &str, labels: &[(&str, &str)], min: f64) {
    crate::common::eventually_async(|| async { metric(&metrics(gw).await, name, labels) >= min })
        .await;
}

#[tokio::test]
async fn a_length_over_max_frame_is_4505_before_the_body() {
    let gw = TestGateway::with(|c| c.limits.max_frame = 1024).await;
    let mut c = gw.login(Kind::Wt, "big", "d").await;
    // Only the prefix: the gateway must not wait for (or buffer) a megabyte.
    c.send_wt_bytes(&(1u32 << 20).to_be_bytes()).await;
    c.expect_kick(4505).await;
}

#[tokio::test]
async fn a_truncated_frame_is_4504() {
    let gw = TestGateway::start().await;
    let mut c = gw.login(Kind::Wt, "cut", "d").await;
    // Two bytes of a length prefix, then the client finishes its side of the stream.
    c.send_wt_bytes(&[0, 0]).await;
    c.wt().finish().await;
    c.expect_kick(4504).await;
}

#[tokio::test]
async fn garbage_on_the_control_stream_is_4504() {
    let gw = TestGateway::start().await;
    let mut bystander = gw.login(Kind::Wt, "calm", "d").await;
    let mut c = gw.login(Kind::Wt, "junk", "d").await;
    c.send_wt_bytes(&[0, 0, 0, 5, 0xff, 0xfe, 0x00, 0x01, 0x02])
        .await;
    c.expect_kick(4504).await;
    assert_eq!(bystander.ping("ok").await["id"], "ok");
}

#[tokio::test]
async fn extra_streams_are_refused_and_counted() {
    let gw = TestGateway::start().await;
    let before = metric(
        &metrics(&gw).await,
        "imgate_webtransport_streams_refused_total",
        &[],
    );
    let mut c = gw.login(Kind::Wt, "many", "d").await;
    for i in 0..20u8 {
        let (mut send, mut recv) = c.wt().conn.open_bi().await.unwrap().await.unwrap();
        // Announce the stream with a write; the gateway stops it.
        let _ = send.write_all(&[0, 0, 0, 1, i]).await;
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(WAIT, recv.read(&mut buf))
            .await
            .expect("the stream is refused in time");
        assert!(
            !matches!(read, Ok(Some(_))),
            "no data on a refused stream: {read:?}"
        );
    }
    let mut uni = c.wt().conn.open_uni().await.unwrap().await.unwrap();
    let _ = uni.write_all(b"hello").await;
    // The session goes on.
    assert_eq!(c.ping("still here").await["id"], "still here");
    metric_reaches(
        &gw,
        "imgate_webtransport_streams_refused_total",
        &[],
        before + 21.0,
    )
    .await;
}

#[tokio::test]
async fn datagram_ping_gets_a_datagram_pong() {
    let gw = TestGateway::start().await;
    let mut c = gw.login(Kind::Wt, "dg", "d").await;
    let conn = c.wt().conn.clone();
    conn.send_datagram(json!({"type": "ping", "id": "d1"}).to_string())
        .unwrap();
    let d = tokio::time::timeout(WAIT, conn.receive_datagram())
        .await
        .expect("a pong datagram in time")
        .unwrap();
    let v: Value = serde_json::from_slice(&d.payload()).unwrap();
    assert_eq!(
        (v["type"].as_str(), v["id"].as_str()),
        (Some("pong"), Some("d1"))
    );
    assert!(v["ts"].as_i64().unwrap() > 0);

    // Not a ping: dropped and counted; the session lives on.
    conn.send_datagram(b"not a frame").unwrap();
    metric_reaches(
        &gw,
        "imgate_webtransport_datagrams_dropped_total",
        &[("reason", "invalid")],
        1.0,
    )
    .await;
    assert_eq!(c.ping("alive").await["id"], "alive");
}

#[tokio::test]
async fn a_datagram_flood_is_dropped_over_the_rate() {
    let gw = TestGateway::with(|c| {
        c.limits.rate_per_sec = 5;
        c.limits.rate_burst = 5;
    })
    .await;
    let mut c = gw.login(Kind::Wt, "flood", "d").await;
    let conn = c.wt().conn.clone();
    let ping = json!({"type": "ping"}).to_string();
    for _ in 0..200 {
        let _ = conn.send_datagram(&ping);
    }
    metric_reaches(
        &gw,
        "imgate_webtransport_datagrams_dropped_total",
        &[("reason", "rate")],
        1.0,
    )
    .await;
    // Datagrams do not use up the control stream's rate: frames still get answers.
    assert_eq!(c.ping("framed").await["id"], "framed");
}

#[tokio::test]
async fn no_control_stream_is_closed_4102() {
    let gw = TestGateway::with(|c| c.auth.auth_timeout = Duration::from_millis(300)).await;
    let t = token("mute", None, None, hour());
    let conn = gw.wt_session(&format!("token={t}"), &[]).await.unwrap();
    assert_eq!(close_code(&conn).await, Some(4102));
    let text = metrics(&gw).await;
    assert!(
        metric(
            &text,
            "imgate_connections_rejected_total",
            &[("reason", "no_control_stream")]
        ) >= 1.0
    );
}

#[tokio::test]
async fn the_close_sequence_waits_for_the_client_not_a_timer() {
    let gw = TestGateway::start().await;
    let t = token("kim", Some("d"), None, hour());
    let mut c = gw
        .connect(Kind::Wt, &format!("token={t}"), &[])
        .await
        .unwrap();
    c.expect("welcome").await;
    c.expect("synced").await;
    gw.gw().kick_user("kim", None, "bye").await.unwrap();
    let kick = c.expect("kick").await;
    assert_eq!(kick["code"], 4502);
    // The control stream is finished after the kick.
    assert!(c.wt().control_finished().await);
    // A client that closes at once is not kept waiting for the 1 s bound: the session ends
    // as soon as the close arrives.
    let closed_at = std::time::Instant::now();
    c.wt().conn.close(wtransport::VarInt::from_u32(4502), b"");
    crate::common::eventually(|| gw.running().limits.open() == 0).await;
    assert!(
        closed_at.elapsed() < Duration::from_millis(900),
        "the session waited {:?} after the client closed",
        closed_at.elapsed()
    );
}

#[tokio::test]
async fn a_client_that_does_not_close_is_closed_with_the_code() {
    let gw = TestGateway::start().await;
    let mut c = gw.login(Kind::Wt, "lin", "d").await;
    gw.gw().kick_user("lin", None, "bye").await.unwrap();
    assert_eq!(c.expect("kick").await["code"], 4502);
    assert_eq!(close_code(&c.wt().conn).await, Some(4502));
}

#[tokio::test]
async fn wrong_path_and_limits_are_refused() {
    let gw = TestGateway::with(|c| c.limits.max_per_ip = 1).await;
    let t = token("p", None, None, hour());
    let _held = gw.login(Kind::Wt, "p", "d").await;
    // The per-IP limit: wtransport can answer 429 only; its client reports a refusal.
    assert!(gw
        .connect(Kind::Wt, &format!("token={t}"), &[])
        .await
        .is_err());
    let text = metrics(&gw).await;
    assert!(
        metric(
            &text,
            "imgate_connections_rejected_total",
            &[("reason", "ip_limit")]
        ) >= 1.0
    );
}

#[tokio::test]
async fn rotation_keeps_open_sessions() {
    let gw = TestGateway::start().await;
    let mut old = gw.login(Kind::Wt, "rot", "a").await;
    let certs = gw.running().certs.clone().unwrap();
    certs.rotate_now().unwrap();
    let fresh = certs.current().sha256;
    assert_ne!(Some(fresh), gw.cert_sha256);
    // The session established with the old certificate is untouched.
    assert_eq!(old.ping("after rotation").await["id"], "after rotation");
    // New sessions get the new certificate: a client pinned to it connects.
    let mut pinned = TestGateway {
        running: None,
        http: gw.http,
        https: gw.https,
        wt: gw.wt,
        grpc: gw.grpc,
        ops: gw.ops,
        cert_sha256: Some(fresh),
    };
    let mut c = pinned.login(Kind::Wt, "rot", "b").await;
    assert_eq!(c.ping("new").await["id"], "new");
    // One pinned to the old certificate alone is refused.
    pinned.cert_sha256 = gw.cert_sha256;
    let t = token("rot", Some("c"), None, hour());
    assert!(pinned
        .connect(Kind::Wt, &format!("token={t}"), &[])
        .await
        .is_err());
}

/// Under load (half the handshake slots taken, here by an idle TCP connection), a new QUIC
/// client must prove its address with a Retry before it costs a TLS handshake; a real
/// client does so and gets its session.
#[tokio::test]
async fn address_validation_under_load() {
    let gw = TestGateway::with(|c| {
        c.limits.max_handshakes = 2;
        c.limits.handshake_timeout = Duration::from_secs(60);
    })
    .await;
    let _busy = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    crate::common::eventually(|| gw.running().limits.handshaking() == 1).await;
    let mut c = gw.login(Kind::Wt, "val", "d").await;
    assert_eq!(c.ping("after-retry").await["id"], "after-retry");
    let text = metrics(&gw).await;
    assert!(
        metric(
            &text,
            "imgate_connections_rejected_total",
            &[("reason", "quic_retry")]
        ) >= 1.0
    );
}
