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
    // Counted once: the connection closed, not each of the pushes it refused.
    assert_eq!(metric(&t, "imgate_slow_consumer_total", &[]), before + 1.0);
    let closed = slow.closed().await;
    assert_eq!(closed.kick, Some(4100), "{closed:?}");
}

// SPEC §5: slow is bytes queued, so a client that reads as fast as it can is not closed by
// a burst that fits the byte budget, even one far longer than the old 256-frame queue.
over_transports!(a_burst_is_not_a_slow_consumer, |kind: Kind| async move {
    let gw = TestGateway::start().await;
    let mut c = gw.login(kind, "burst", "d").await;
    let delivery = gw.gw().delivery.clone();
    const N: usize = 1000;
    for i in 0..N {
        delivery.push_transient(
            "burst",
            imgate::delivery::OutMessage {
                body: i.to_string().into(),
                ..Default::default()
            },
        );
    }
    for i in 0..N {
        assert_eq!(c.expect("push").await["body"], i);
    }
    assert_eq!(c.ping("still-here").await["id"], "still-here");
});

/// A WebSocket dropped without a close frame went away (1006); it did not speak bad
/// WebSocket (4504).
#[tokio::test]
async fn a_dropped_socket_counts_as_1006() {
    let gw = TestGateway::start().await;
    let c = gw.login(Kind::Ws, "gone", "d").await;
    let closed = |t: &str, code: &str| {
        metric(
            t,
            "imgate_connections_closed_total",
            &[("transport", "ws"), ("code", code)],
        )
    };
    let (_, before) = gw.http_get(gw.ops, "/metrics").await;
    drop(c); // the TCP connection goes without a close frame
    crate::common::eventually(|| gw.gw().hub.connections("gone").is_empty()).await;
    crate::common::eventually_async(|| async {
        let (_, t) = gw.http_get(gw.ops, "/metrics").await;
        closed(&t, "1006") > closed(&before, "1006")
    })
    .await;
    let (_, after) = gw.http_get(gw.ops, "/metrics").await;
    assert_eq!(closed(&after, "4504"), closed(&before, "4504"));
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
        // Counted when the PROXY header names it: plain HTTP is told 429, TLS is dropped
        // before the handshake it would cost.
        match (kind, gw.connect_after(kind, &q, &[], &header).await) {
            (Kind::Ws, Err(ConnectError::Refused(status))) => assert_eq!(status, Some(429)),
            (Kind::Wss, Err(_)) => {}
            (_, other) => panic!(
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

/// Read until the server closes or answers; what it sent (empty: closed without a word).
async fn first_answer(s: &mut TcpStream) -> String {
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .expect("the server answers or closes in time")
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// SPEC §9: `max_per_ip` counts connections from accept, whatever they ask for, so one
/// address cannot hold connections that never reach `/ws` (here: idle ones, with a
/// handshake timeout long enough that it is not what ends them).
#[tokio::test]
async fn per_ip_counts_from_accept() {
    let gw = TestGateway::with(|c| {
        c.limits.max_per_ip = 2;
        c.limits.handshake_timeout = Duration::from_secs(60);
    })
    .await;
    let idle1 = TcpStream::connect(gw.http).await.unwrap();
    let _idle2 = TcpStream::connect(gw.https.unwrap()).await.unwrap();
    let mut third = TcpStream::connect(gw.http).await.unwrap();
    assert!(first_answer(&mut third).await.starts_with("HTTP/1.1 429"));
    // Over TLS the connection is dropped before the TLS handshake it would cost.
    let mut fourth = TcpStream::connect(gw.https.unwrap()).await.unwrap();
    assert_eq!(first_answer(&mut fourth).await, "");
    let (_, text) = gw.http_get(gw.ops, "/metrics").await;
    assert!(
        metric(
            &text,
            "imgate_connections_rejected_total",
            &[("reason", "ip_limit")]
        ) >= 2.0
    );
    // A slot comes back when its connection goes.
    drop(idle1);
    crate::common::eventually_async(|| async {
        let mut s = TcpStream::connect(gw.http).await.unwrap();
        s.write_all(b"GET /favicon.ico HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        first_answer(&mut s).await.starts_with("HTTP/1.1 204")
    })
    .await;
}

/// Connections still in their handshake are capped per node: beyond it they are dropped at
/// once, counted as `handshake_limit`.
#[tokio::test]
async fn handshakes_in_flight_are_capped() {
    let gw = TestGateway::with(|c| {
        c.limits.max_handshakes = 2;
        c.limits.handshake_timeout = Duration::from_secs(60);
    })
    .await;
    let _a = TcpStream::connect(gw.http).await.unwrap();
    let _b = TcpStream::connect(gw.http).await.unwrap();
    let mut c = TcpStream::connect(gw.http).await.unwrap();
    assert_eq!(first_answer(&mut c).await, "");
    let (_, text) = gw.http_get(gw.ops, "/metrics").await;
    assert_eq!(
        metric(
            &text,
            "imgate_connections_rejected_total",
            &[("reason", "handshake_limit")]
        ),
        1.0
    );
}

/// A client that pipelines requests and never reads its responses is cut off at
/// `limits.handshake_timeout` (before, hyper waited on the write forever).
#[tokio::test]
async fn a_client_that_never_reads_is_cut_off() {
    let gw = TestGateway::with(|c| c.limits.handshake_timeout = Duration::from_secs(1)).await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(gw.http).await.unwrap();
    const N: usize = 2000;
    let reqs = "GET /imgate.js HTTP/1.1\r\nHost: x\r\n\r\n".repeat(N);
    s.write_all(reqs.as_bytes()).await.unwrap();
    // The event: the gateway gives up on the connection.
    crate::common::eventually_async(|| async {
        let (_, text) = gw.http_get(gw.ops, "/metrics").await;
        metric(
            &text,
            "imgate_connections_rejected_total",
            &[("reason", "handshake_timeout")],
        ) >= 1.0
    })
    .await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut got))
        .await
        .expect("closed, not left open");
    let responses = String::from_utf8_lossy(&got)
        .matches("HTTP/1.1 200")
        .count();
    assert!(responses < N, "{responses} of {N} responses: not cut off");
}

/// Review F5, SPEC §9 `limits.write_timeout`: a client with a small receive buffer that
/// fills it and stops reading, while heartbeat pings keep being due, cannot outlive a kick:
/// whichever write it blocks (frames, a ping, the kick, the close) is bounded.
#[tokio::test]
async fn a_client_that_stops_reading_cannot_outlive_a_kick() {
    let gw = TestGateway::with(|c| {
        c.limits.write_timeout = Duration::from_millis(500);
        c.sessions.heartbeat = Duration::from_millis(20);
        c.sessions.idle_timeout = Duration::from_secs(60);
    })
    .await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(gw.http).await.unwrap();
    let t = token("stuck", Some("d"), None, Duration::from_secs(60));
    let url = format!("ws://{}/ws?token={t}", gw.http);
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, stream))
        .await
        .unwrap()
        .unwrap();
    use futures_util::StreamExt;
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if m.to_text().unwrap_or("").contains("\"synced\"") {
            break;
        }
    }
    // Fill the socket, then stop reading (the client keeps its TCP stack alive).
    let body = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
    for _ in 0..200 {
        gw.gw().delivery.push_transient(
            "stuck",
            imgate::delivery::OutMessage {
                body: body.clone(),
                ..Default::default()
            },
        );
    }
    gw.gw().kick_user("stuck", None, "").await.unwrap();
    // Gone from the hub, and its task ended: the node slot it held is free, within a few
    // write timeouts (the kick and the close are writes too), not the 5 s a final write
    // used to be allowed.
    let freed = tokio::time::timeout(Duration::from_secs(3), async {
        while !(gw.gw().hub.connections("stuck").is_empty() && gw.running().limits.open() == 0) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    assert!(
        freed.await.is_ok(),
        "the stuck connection outlived its kick"
    );
    drop(ws);
}

/// Review F18: a push as large as `limits.max_push_body` allows reaches a json WebSocket
/// client (a binary body grows by a third in base64), however small `limits.max_frame`
/// (which bounds what clients send) is; it used to be dropped with 1006 on every reconnect.
#[tokio::test]
async fn the_largest_push_reaches_a_json_client() {
    let gw = TestGateway::with(|c| c.limits.max_push_body = 512 * 1024).await;
    let mut c = gw.login(Kind::Ws, "big", "d").await;
    let body: Vec<u8> = (0..400 * 1024).map(|i| (i % 251) as u8).collect();
    let out = gw
        .gw()
        .delivery
        .push_durable(
            "big",
            imgate::delivery::OutMessage {
                body: body.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let p = c.expect("push").await;
    assert_eq!(p["seq"].as_u64(), Some(out.seq));
    assert_eq!(c.ping("after").await["id"], "after");
}

/// Review F11: a refused header token closes the connection after its 401, so a client that
/// loops over bad tokens pays a new connection (counted per IP) for each.
#[tokio::test]
async fn a_401_closes_the_connection() {
    let gw = TestGateway::with(|c| c.limits.handshake_timeout = Duration::from_secs(60)).await;
    let mut s = TcpStream::connect(gw.http).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Authorization: Bearer forged.token.here\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut got))
        .await
        .expect("closed after the answer")
        .unwrap();
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 401"));
}

/// Review F19: an unauthenticated client that sends pings but never reads their pongs is
/// closed at the auth deadline, not held until a write times out.
#[tokio::test]
async fn an_unauthenticated_client_that_never_reads_goes_at_the_auth_deadline() {
    let gw = TestGateway::with(|c| {
        c.auth.auth_timeout = Duration::from_millis(500);
        c.limits.write_timeout = Duration::from_secs(30);
        c.limits.rate_per_sec = 1_000_000;
        c.limits.rate_burst = 1_000_000;
    })
    .await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(gw.http).await.unwrap();
    let url = format!("ws://{}/ws", gw.http);
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, stream))
        .await
        .unwrap()
        .unwrap();
    use futures_util::SinkExt;
    let id = "p".repeat(200);
    let ping = Message::Text(json!({"type": "ping", "id": id}).to_string().into());
    // Enough pongs to fill both socket buffers; the writes may stall, which is the point.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        for _ in 0..20_000 {
            if ws.feed(ping.clone()).await.is_err() {
                break;
            }
        }
        let _ = ws.flush().await;
    })
    .await;
    let freed = tokio::time::timeout(Duration::from_secs(5), async {
        while gw.running().limits.open() != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    assert!(freed.await.is_ok(), "held past the auth deadline");
    drop(ws);
}

/// Review F19: WebSocket ping control frames count against the frame rate, so a sustained
/// flood of them is closed with 4104 like any other.
#[tokio::test]
async fn a_flood_of_control_frames_is_rate_limited() {
    let gw = TestGateway::with(|c| {
        c.limits.rate_per_sec = 5;
        c.limits.rate_burst = 5;
        c.limits.rate_close_after = Duration::from_millis(300);
    })
    .await;
    let mut c = gw.login(Kind::Ws, "pinger", "d").await;
    let flood = async {
        loop {
            if !c.send_raw(Message::Ping(bytes::Bytes::new())).await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    let _ = tokio::time::timeout(WAIT, flood).await;
    let closed = c.closed().await;
    assert_eq!(closed.code, Some(4104), "{closed:?}");
}
