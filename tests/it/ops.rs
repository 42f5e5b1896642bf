//! Ops: metrics, health, readiness, graceful drain, cert-hash, dev token.

use std::time::Duration;

use crate::common::{metric, Kind, TestGateway, WAIT};

#[tokio::test]
async fn metrics_exposition_has_every_spec_name() {
    let gw = TestGateway::start().await;
    let mut c = gw.login(Kind::Ws, "m", "d").await;
    c.ping("1").await;
    let (status, text) = gw.http_get(gw.ops, "/metrics").await;
    assert_eq!(status, 200);
    for name in imgate::ops::metrics::SPEC_NAMES {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("# TYPE {name} "))),
            "{name} missing from /metrics"
        );
    }
    assert!(metric(&text, "imgate_connections", &[("transport", "ws")]) >= 1.0);
    assert!(
        metric(
            &text,
            "imgate_frames_received_total",
            &[("transport", "ws"), ("type", "ping")]
        ) >= 1.0
    );
    assert!(metric(&text, "imgate_auth_total", &[("result", "ok")]) >= 1.0);
    // No user, device or message ids in labels.
    assert!(!text.contains("\"m\""));
}

#[tokio::test]
async fn health_and_readiness() {
    let gw = TestGateway::start().await;
    let (s, body) = gw.http_get(gw.ops, "/healthz").await;
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["state"]["up"], true);
    assert_eq!(gw.http_get(gw.ops, "/readyz").await.0, 200);
}

#[tokio::test]
async fn drain_kicks_everyone_4101_and_exits() {
    let mut gw = TestGateway::with(|c| c.shutdown.drain_window = Duration::from_millis(500)).await;
    let mut clients = Vec::new();
    for (i, kind) in [Kind::Ws, Kind::Wss, Kind::Wt, Kind::Ws]
        .into_iter()
        .enumerate()
    {
        clients.push(gw.login(kind, &format!("u{i}"), "d").await);
    }
    let ops = gw.ops;
    let running = gw.running.take().unwrap();
    let state = running.gw.state.clone();
    assert_eq!(
        state.presence("u0").await.unwrap().len(),
        1,
        "connections are in presence"
    );
    let drain = tokio::spawn(running.drain());
    // Not ready while draining.
    let (status, _) = tokio::time::timeout(WAIT, async {
        loop {
            let r = crate::common::http_get(ops, "/readyz").await;
            if r.0 == 503 {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("readyz turns 503");
    assert_eq!(status, 503);
    for c in &mut clients {
        c.expect_kick(4101).await;
    }
    tokio::time::timeout(WAIT, drain)
        .await
        .expect("drain ends")
        .unwrap();
    // New connections are refused once the listeners stopped.
    assert!(
        tokio::net::TcpStream::connect(gw.http).await.is_err()
            || gw.connect(Kind::Ws, "", &[]).await.is_err()
    );
}

#[tokio::test]
async fn demo_page_and_client_library() {
    let gw = TestGateway::start().await;
    let (s, page) = gw.http_get(gw.http, "/").await;
    assert_eq!(s, 200);
    let port = gw.wt.unwrap().port();
    assert!(
        page.contains(&format!(
            "name=\"imgate-webtransport-port\" content=\"{port}\""
        )),
        "the page names the WebTransport port"
    );
    assert!(page.contains("from \"/imgate.js\""));
    let (s, js) = gw.http_get(gw.http, "/imgate.js").await;
    assert_eq!(s, 200);
    assert!(js.contains("export class ImgateClient"));
    // Without a WebTransport listener the page leaves the port empty: WebSocket only.
    let ws_only = TestGateway::with(|c| c.listen.webtransport = String::new()).await;
    let (_, page) = ws_only.http_get(ws_only.http, "/").await;
    assert!(page.contains("name=\"imgate-webtransport-port\" content=\"\""));
}

#[tokio::test]
async fn cert_hash_and_dev_token() {
    let gw = TestGateway::start().await;
    let (s, body) = gw.http_get(gw.http, "/cert-hash").await;
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let hex: String = gw
        .cert_sha256
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(v["sha256_hex"], hex);
    assert!(v["hashes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h["sha256_hex"] == hex));
    assert!(v["expires_at_ms"].as_i64().unwrap() > imgate::now_ms());

    let (s, body) = gw.http_get(gw.http, "/dev/token?user=zed&device=d9").await;
    assert_eq!(s, 200);
    let t = serde_json::from_str::<serde_json::Value>(&body).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let mut c = gw
        .connect(Kind::Ws, &format!("token={t}"), &[])
        .await
        .unwrap();
    let w = c.expect("welcome").await;
    assert_eq!(
        (w["user"].as_str(), w["device"].as_str()),
        (Some("zed"), Some("d9"))
    );
    assert_eq!(
        gw.http_get(gw.http, "/dev/token?user=bad%20id").await.0,
        400
    );
    assert_eq!(
        gw.http_get(gw.http, "/dev/token?user=a&platform=toaster")
            .await
            .0,
        400
    );
}

/// `/dev/token` signs anyone in as anyone: only clients on the gateway's machine get one,
/// also when a proxy on that machine forwards a remote client.
#[tokio::test]
async fn dev_token_answers_loopback_clients_only() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = TestGateway::with(|c| c.net.trusted_proxies = vec!["127.0.0.1/32".into()]).await;
    let get = |forwarded_for: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
        s.write_all(
            format!(
                "GET /dev/token?user=mal HTTP/1.1\r\nHost: localhost\r\n\
                 X-Forwarded-For: {forwarded_for}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
            .await
            .expect("response in time")
            .unwrap();
        String::from_utf8_lossy(&buf)[9..12].to_string()
    };
    assert_eq!(get("203.0.113.7").await, "403");
    assert_eq!(get("127.0.0.1").await, "200");
}

#[tokio::test]
async fn dev_token_is_404_in_prod() {
    // A prod profile without TLS listeners (terminated upstream) and with real secrets.
    let gw = TestGateway::with(|c| {
        c.profile = imgate::config::Profile::Prod;
        c.auth.jwt_secret = "a-real-secret-of-enough-length-0123456789".into();
        c.grpc.api_keys = vec!["k".into()];
        c.tls.terminated_upstream = true;
        c.listen.https = String::new();
    })
    .await;
    assert_eq!(gw.http_get(gw.http, "/dev/token?user=a").await.0, 404);
}

/// Every metric the Grafana dashboard queries is one the gateway exports.
#[tokio::test]
async fn dashboard_queries_exported_metrics() {
    let gw = TestGateway::start().await;
    let (_, text) = gw.http_get(gw.ops, "/metrics").await;
    let dash = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dashboards/imgate.json"
    ))
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&dash).expect("valid JSON");
    let mut names = std::collections::BTreeSet::new();
    for panel in v["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("imgate_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                let base = ["_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(&name)
                    .to_string();
                names.insert(base);
            }
        }
    }
    assert!(names.len() > 15, "{names:?}");
    for name in names {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "the dashboard queries {name}, which is not exported"
        );
    }
}

/// The metrics table in docs/operations.md lists every metric the gateway exports, and the
/// `reason` values of every `reason` label that is exported.
#[tokio::test]
async fn operations_doc_lists_every_exported_metric_and_reason() {
    let gw = TestGateway::start().await;
    let (_, text) = gw.http_get(gw.ops, "/metrics").await;
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .unwrap();
    let table: Vec<&str> = doc
        .lines()
        .filter(|l| l.starts_with("| `imgate_"))
        .collect();
    let mut exported = 0;
    for name in text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
    {
        exported += 1;
        let row = table
            .iter()
            // The first cell names the metric (or two that share a row).
            .find(|r| r.split('|').nth(1).unwrap().contains(&format!("`{name}`")))
            .unwrap_or_else(|| panic!("{name} is exported but not in the metrics table"));
        for line in text.lines().filter(|l| l.starts_with(&format!("{name}{{"))) {
            if let Some(at) = line.find("reason=\"") {
                let value = line[at + 8..].split('"').next().unwrap();
                assert!(
                    row.contains(&format!("`{value}`")),
                    "{name}: reason {value} is not documented"
                );
            }
        }
    }
    assert!(exported > 20, "{exported} metrics exported");
}
