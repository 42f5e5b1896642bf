//! SPEC §3 bad input and limits: each gets its code, is counted, and costs no one else.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::common::{metric, status, token, ConnectError, Kind, TestGateway, WAIT};
use crate::over_transports;

over_transports!(frame_too_large_4505, |kind: Kind| async move {
    let gw = TestGateway::with(|c| c.limits.max_frame = 1024).await;
    let mut bystander = gw.login(kind, "calm", "d").await;
    let mut c = gw.login(kind, "big", "d").await;
    c.send(json!({"type": "ping", "id": "x".repeat(2000)}))
        .await;
    c.expect_kick(4505).await;
    assert_eq!(bystander.ping("ok").await["id"], "ok");
});

over_transports!(malformed_json_4504, |kind: Kind| async move {
    let gw = TestGateway::start().await;
    let mut c = gw.login(kind, "u", "d").await;
    c.send_raw(Message::Text("{not json".into())).await;
    c.expect_kick(4504).await;
});

over_transports!(binary_on_json_codec_4504, |kind: Kind| async move {
    let gw = TestGateway::start().await;
    let mut c = gw.login(kind, "u", "d").await;
    c.send_raw(Message::Binary(vec![1u8, 2, 3].into())).await;
    c.expect_kick(4504).await;
});

over_transports!(
    unknown_type_and_bad_send_keep_the_connection,
    |kind: Kind| async move {
        let gw = TestGateway::start().await;
        let mut c = gw.login(kind, "u", "d").await;
        c.send(json!({"type": "teleport"})).await;
        let e = c.expect("error").await;
        assert_eq!(e["code"], "unknown_type");
        assert!(e.get("id").is_none(), "{e}");
        // With an id, the error says which frame it is about.
        c.send(json!({"type": "frobnicate", "id": "u1"})).await;
        let e = c.expect("error").await;
        assert_eq!(
            (e["code"].as_str(), e["id"].as_str()),
            (Some("unknown_type"), Some("u1"))
        );
        c.send(json!({"type": "send", "id": "r1", "body": "no target"}))
            .await;
        let r = c.expect("reply").await;
        assert_eq!(
            (r["id"].as_str(), r["ok"].as_bool(), r["code"].as_str()),
            (Some("r1"), Some(false), Some("bad_request"))
        );
        c.send(json!({"type": "send", "id": "r2", "to": "bad id!", "body": 1}))
            .await;
        assert_eq!(c.expect("reply").await["code"], "bad_request");
        assert_eq!(c.ping("alive").await["id"], "alive");
    }
);

over_transports!(rate_limit_then_4104, |kind: Kind| async move {
    let gw = TestGateway::with(|c| {
        c.limits.rate_per_sec = 5;
        // A WebTransport client's first frame (the `ping` announcing its control stream)
        // takes a token too.
        c.limits.rate_burst = if kind == Kind::Wt { 6 } else { 5 };
        c.limits.rate_close_after = Duration::from_millis(300);
    })
    .await;
    let mut bystander = gw.login(kind, "calm", "d").await;
    let mut c = gw.login(kind, "noisy", "d").await;
    for i in 0..6 {
        c.send(json!({"type": "ping", "id": i.to_string()})).await;
    }
    for i in 0..5 {
        assert_eq!(c.expect("pong").await["id"], i.to_string());
    }
    let e = c.expect("error").await;
    // The error names the first frame over the limit.
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("rate_limited"), Some("5"))
    );
    // Keep flooding until the server gives up on us.
    let flood = async {
        loop {
            if !c.send_raw(Message::Text(r#"{"type":"ping"}"#.into())).await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    let _ = tokio::time::timeout(WAIT, flood).await;
    let closed = c.closed().await;
    assert_eq!(closed.code, Some(4104), "{closed:?}");
    assert_eq!(bystander.ping("ok").await["id"], "ok");
});

/// Open TCP, send nothing: dropped after `handshake_timeout`, and counted.
#[tokio::test]
async fn silent_tcp_is_dropped() {
    let gw = TestGateway::with(|c| c.limits.handshake_timeout = Duration::from_millis(200)).await;
    for addr in [gw.http, gw.https.unwrap()] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("server hangs up")
            .unwrap_or(0);
        assert_eq!(n, 0, "nothing is sent to a silent client");
    }
    let (_, text) = gw.http_get(gw.ops, "/metrics").await;
    assert!(
        metric(
            &text,
            "imgate_connections_rejected_total",
            &[("reason", "handshake_timeout")]
        ) >= 2.0
    );
}

#[tokio::test]
async fn node_limit_503() {
    let gw = TestGateway::with(|c| c.limits.max_connections = 2).await;
    let _a = gw.login(Kind::Ws, "a", "d").await;
    let _b = gw.login(Kind::Ws, "b", "d").await;
    let t = token("c", None, None, Duration::from_secs(60));
    assert_eq!(
        gw.refused(Kind::Ws, &format!("token={t}"), &[]).await,
        Some(503)
    );
}

#[tokio::test]
async fn per_ip_limit_429_and_trusted_proxies() {
    let gw = TestGateway::with(|c| {
        c.limits.max_per_ip = 1;
        c.net.trusted_proxies = vec!["127.0.0.1/32".into()];
    })
    .await;
    let t = token("a", None, None, Duration::from_secs(60));
    let q = format!("token={t}");
    let mut first = gw
        .connect(Kind::Ws, &q, &[("x-forwarded-for", "203.0.113.7")])
        .await
        .unwrap();
    first.expect("welcome").await;
    assert_eq!(
        gw.refused(Kind::Ws, &q, &[("x-forwarded-for", "203.0.113.7")])
            .await,
        Some(429)
    );
    // Another client behind the same proxy is another address.
    let mut other = gw
        .connect(Kind::Ws, &q, &[("x-forwarded-for", "203.0.113.8")])
        .await
        .unwrap();
    other.expect("welcome").await;
}

#[tokio::test]
async fn forwarded_for_is_ignored_from_untrusted_peers() {
    let gw = TestGateway::with(|c| c.limits.max_per_ip = 1).await;
    let t = token("a", None, None, Duration::from_secs(60));
    let q = format!("token={t}");
    let mut first = gw
        .connect(Kind::Ws, &q, &[("x-forwarded-for", "203.0.113.7")])
        .await
        .unwrap();
    first.expect("welcome").await;
    // A spoofed header does not buy a new slot: the peer address counts.
    assert_eq!(
        gw.refused(Kind::Ws, &q, &[("x-forwarded-for", "203.0.113.9")])
            .await,
        Some(429)
    );
}

#[tokio::test]
async fn unauthenticated_sessions_are_capped() {
    let gw = TestGateway::with(|c| c.limits.max_unauthenticated = 1).await;
    let _waiting = gw.connect(Kind::Ws, "", &[]).await.unwrap();
    assert_eq!(gw.refused(Kind::Ws, "", &[]).await, Some(503));
    // Clients with a token are not held back by strangers that never authenticate.
    let _ok = gw.login(Kind::Ws, "u", "d").await;
}

#[tokio::test]
async fn origin_allow_list() {
    let gw =
        TestGateway::with(|c| c.net.allowed_origins = vec!["https://chat.example".into()]).await;
    let t = token("u", None, None, Duration::from_secs(60));
    let q = format!("token={t}");
    for kind in [Kind::Ws, Kind::Wt] {
        assert_eq!(
            gw.refused(kind, &q, &[("origin", "https://evil.example")])
                .await,
            status(kind, 403)
        );
        let mut ok = gw
            .connect(kind, &q, &[("origin", "https://chat.example")])
            .await
            .unwrap();
        ok.expect("welcome").await;
    }
}

#[tokio::test]
async fn dev_allows_localhost_origins_only() {
    let gw = TestGateway::start().await;
    let t = token("u", None, None, Duration::from_secs(60));
    let q = format!("token={t}");
    for kind in [Kind::Ws, Kind::Wt] {
        let mut ok = gw
            .connect(kind, &q, &[("origin", "http://localhost:5173")])
            .await
            .unwrap();
        ok.expect("welcome").await;
        assert_eq!(
            gw.refused(kind, &q, &[("origin", "https://evil.example")])
                .await,
            status(kind, 403)
        );
    }
}

/// A client that completes the handshake and then neither reads nor writes: it answers no
/// ping, so it is closed with 4102 after the idle timeout.
#[tokio::test]
async fn idle_client_closed_4102() {
    let gw = TestGateway::with(|c| {
        c.sessions.heartbeat = Duration::from_millis(100);
        c.sessions.idle_timeout = Duration::from_millis(400);
    })
    .await;
    let t = token("sleepy", None, None, Duration::from_secs(60));
    let mut s = TcpStream::connect(gw.http).await.unwrap();
    let req = format!(
        "GET /ws?token={t} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    // Read everything until the server hangs up; never answer its pings.
    let mut all = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut all))
        .await
        .expect("closed in time")
        .ok();
    // The close frame (opcode 0x8) carries 4102 = 0x1006 big-endian.
    let close_at = all
        .windows(2)
        .rposition(|w| w[0] == 0x88)
        .expect("a close frame");
    assert_eq!(&all[close_at + 2..close_at + 4], &4102u16.to_be_bytes());
    assert!(
        String::from_utf8_lossy(&all).contains("\"code\":4102"),
        "kick before close"
    );
}

/// A client that stops reading while pushes pile up is closed with 4100; others are not slowed.
#[tokio::test]
async fn slow_consumer_4100() {
    let gw = TestGateway::with(|c| c.sessions.outbound_queue = 8).await;
    let mut slow = gw.login(Kind::Ws, "slow", "d").await;
    let mut fast = gw.login(Kind::Ws, "fast", "d").await;
    let body = bytes::Bytes::from(format!("\"{}\"", "x".repeat(60_000)));
    let delivery = gw.gw().delivery.clone();
    let before = {
        let (_, t) = gw.http_get(gw.ops, "/metrics").await;
        metric(&t, "imgate_slow_consumer_total", &[])
    };
    // Far more than socket buffers and the queue hold, never awaiting the slow client.
    for _ in 0..400 {
        delivery.push_transient(
            "slow",
            imgate::delivery::OutMessage {
                body: body.clone(),
                ..Default::default()
            },
        );
    }
    delivery.push_transient(
        "fast",
        imgate::delivery::OutMessage {
            body: "1".into(),
            ..Default::default()
        },
    );
    assert_eq!(fast.expect("push").await["body"], 1);
    crate::common::eventually(|| gw.gw().hub.connections("slow").is_empty()).await;
    let (_, t) = gw.http_get(gw.ops, "/metrics").await;
    assert!(metric(&t, "imgate_slow_consumer_total", &[]) > before);
    let closed = slow.closed().await;
    assert_eq!(closed.kick, Some(4100), "{closed:?}");
}

/// Behind a load balancer speaking PROXY protocol v2, the per-IP limit applies to the
/// client addresses it reports; a trusted peer that sends no header is refused.
#[tokio::test]
async fn proxy_protocol_v2_client_addresses() {
    use imgate::transport::proxy::encode_header;
    let gw = TestGateway::with(|c| {
        c.net.proxy_protocol = true;
        c.net.trusted_proxies = vec!["127.0.0.1/32".into()];
        c.limits.max_per_ip = 1;
    })
    .await;
    let t = token("p", None, None, Duration::from_secs(60));
    let q = format!("token={t}");
    let from = |ip: &str| encode_header(format!("{ip}:40000").parse().unwrap(), gw.http);
    for kind in [Kind::Ws, Kind::Wss] {
        let dst = if kind == Kind::Ws {
            gw.http
        } else {
            gw.https.unwrap()
        };
        let header = encode_header("198.51.100.1:40000".parse().unwrap(), dst);
        let mut first = gw.connect_after(kind, &q, &[], &header).await.unwrap();
        first.expect("welcome").await;
        match gw.connect_after(kind, &q, &[], &header).await {
            Err(ConnectError::Refused(status)) => assert_eq!(status, Some(429)),
            other => panic!(
                "the same client address is limited: {other:?}",
                other = other.map(|_| ())
            ),
        }
    }
    let mut other = gw
        .connect_after(Kind::Ws, &q, &[], &from("198.51.100.2"))
        .await
        .unwrap();
    other.expect("welcome").await;
    // No header from a trusted peer: not served.
    assert!(gw.connect(Kind::Ws, &q, &[]).await.is_err());
}
