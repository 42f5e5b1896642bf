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
    let state = running.services.state.clone();
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

#[tokio::test]
async fn dev_token_is_404_in_prod() {
    // A prod profile without TLS listeners (terminated upstream) and with real secrets.
    let gw = TestGateway::with(|c| {
        c.profile = imgate::config::Profile::Prod;
        c.auth.jwt_secret = "a-real-secret-of-enough-length-0123456789".into();
        c.grpc.api_keys = vec!["k".into()];
        c.tls.terminated_upstream = true;
        c.listen.https = String::new();
        c.upstream.mode = imgate::config::UpstreamMode::Grpc;
        c.upstream.endpoint = "http://127.0.0.1:9".into();
        c.state.memory_in_prod = true;
    })
    .await;
    assert_eq!(gw.http_get(gw.http, "/dev/token?user=a").await.0, 404);
}

/// Dev tokens are for the developer's own machine: a dev instance reached from another
/// address (here through a trusted proxy) does not mint tokens for any user.
#[tokio::test]
async fn dev_token_answers_loopback_only() {
    let gw = TestGateway::with(|c| c.net.trusted_proxies = vec!["127.0.0.1/32".into()]).await;
    let get = |xff: &'static str| {
        let addr = gw.http;
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let req = format!(
                "GET /dev/token?user=a HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {xff}\r\nConnection: close\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await.unwrap();
            let mut buf = String::new();
            tokio::time::timeout(WAIT, s.read_to_string(&mut buf))
                .await
                .expect("answer in time")
                .unwrap();
            buf
        }
    };
    let remote = get("203.0.113.7").await;
    assert!(remote.starts_with("HTTP/1.1 403"), "{remote}");
    assert!(!remote.contains("token\""), "{remote}");
    let local = get("127.0.0.1").await;
    assert!(local.starts_with("HTTP/1.1 200"), "{local}");
}

/// A gRPC API that cannot start (unreadable TLS material, or mTLS asked for without TLS,
/// which would serve it in plaintext to anyone) stops the start instead of leaving a
/// listener that never answers, or answers without credentials.
#[tokio::test]
async fn grpc_api_that_cannot_start_stops_the_start() {
    let dir = std::env::temp_dir().join(format!("imgate-grpc-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(
        &ca,
        "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
    )
    .unwrap();

    let mut cfg = crate::common::test_config();
    cfg.grpc.tls_cert = dir.join("missing.crt").display().to_string();
    cfg.grpc.tls_key = dir.join("missing.key").display().to_string();
    let e = imgate::app::start(cfg).await.err().expect("refused");
    assert!(format!("{e:#}").contains("grpc.tls_cert"), "{e:#}");

    // prod, no api keys, a client CA but no TLS: validation refuses it, and so does the
    // start for anyone who skips validation.
    let mut cfg = crate::common::test_config();
    cfg.profile = imgate::config::Profile::Prod;
    cfg.auth.jwt_secret = "a-real-secret-of-enough-length-0123456789".into();
    cfg.tls.terminated_upstream = true;
    cfg.listen.https = String::new();
    cfg.listen.webtransport = String::new();
    cfg.grpc.client_ca = ca.display().to_string();
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .contains("grpc.client_ca"));
    let e = imgate::app::start(cfg).await.err().expect("refused");
    assert!(format!("{e:#}").contains("gRPC API needs"), "{e:#}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Every metric a dashboard (each JSON under dashboards/) or an alert rule
/// (dashboards/alerts.yml) reads is one a running gateway exports: a renamed metric breaks
/// this test, not an SRE's panel or page.
#[tokio::test]
async fn dashboards_and_rules_query_exported_metrics() {
    let gw = TestGateway::start().await;
    let (_, text) = gw.http_get(gw.ops, "/metrics").await;
    let mut sources = Vec::new();
    let dashboards = crate::grafana::dashboards();
    assert!(dashboards.len() >= 2, "imgate.json and cluster.json");
    for (file, dash) in dashboards {
        let exprs = crate::grafana::exprs(&dash);
        assert!(exprs.len() > 10, "{file}: {} queries", exprs.len());
        sources.extend(exprs.into_iter().map(|e| (file.clone(), e)));
    }
    for rule in crate::alerts::rules() {
        let name = rule["alert"].as_str().or(rule["record"].as_str()).unwrap();
        let expr = rule["expr"].as_str().expect("every rule has an expr");
        sources.push((format!("alerts.yml {name}"), expr.to_string()));
    }
    let mut names = std::collections::BTreeSet::new();
    for (source, expr) in &sources {
        for name in crate::alerts::imgate_names(expr) {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{source} queries {name}, which is not exported: {expr}"
            );
            names.insert(name);
        }
    }
    assert!(names.len() > 20, "{names:?}");
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

/// `imgate_certificate_expiry_seconds` tells an SRE how long the certificate a client is
/// served now has left: the generated dev certificate (rotated by the gateway, under 14
/// days) and configured files each under their own `source`.
#[tokio::test]
async fn certificate_expiry_counts_down_to_the_served_certificate() {
    let day = 86400.0;
    let gw = TestGateway::start().await;
    let (_, text) = gw.http_get(gw.ops, "/metrics").await;
    let left = metric(
        &text,
        "imgate_certificate_expiry_seconds",
        &[("source", "generated")],
    );
    let served = gw.running().certs.as_ref().unwrap().current();
    let expected = served.seconds_left(std::time::SystemTime::now());
    assert!(
        (left - expected).abs() < 60.0 && left > 12.0 * day && left < 14.0 * day,
        "generated certificate: {left} s left, expected {expected}"
    );

    let dir = std::env::temp_dir().join(format!("imgate-cert-expiry-{}", std::process::id()));
    let (cert, key) = imgate::tls::write_dev_cert(&dir).unwrap();
    let files = TestGateway::with(|c| {
        c.tls.cert_file = cert.display().to_string();
        c.tls.key_file = key.display().to_string();
    })
    .await;
    let served = files.running().certs.as_ref().unwrap().current();
    let (_, text) = files.http_get(files.ops, "/metrics").await;
    let left = metric(
        &text,
        "imgate_certificate_expiry_seconds",
        &[("source", "file")],
    );
    let expected = served.seconds_left(std::time::SystemTime::now());
    assert!(
        (left - expected).abs() < 60.0 && left > 12.0 * day,
        "certificate files: {left} s left, expected {expected}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
