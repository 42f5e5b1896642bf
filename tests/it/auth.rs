//! SPEC §2: token sources, refusals, refresh, expiry, revocation.

use std::time::Duration;

use serde_json::json;

use crate::common::{status, token, Kind, TestGateway};
use crate::over_transports;

fn hour() -> Duration {
    Duration::from_secs(3600)
}

/// A token with arbitrary claims signed with the dev secret.
fn raw_token(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(imgate::config::DEV_JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

over_transports!(header_token, |kind: Kind| async move {
    let gw = TestGateway::start().await;
    let t = token("alice", Some("phone"), Some("ios"), hour());
    let mut c = gw
        .connect(kind, "", &[("authorization", &format!("Bearer {t}"))])
        .await
        .unwrap();
    let w = c.expect("welcome").await;
    assert_eq!(w["user"], "alice");
    assert_eq!(w["device"], "phone");
    assert_eq!(w["platform"], "ios");
    assert_eq!(w["transport"], kind.name());
    assert_eq!(w["instance"], "test-1");
    assert!(w["token_expires_at_ms"].as_i64().unwrap() > imgate::now_ms());
});

over_transports!(subprotocol_token, |kind: Kind| async move {
    let gw = TestGateway::start().await;
    let t = token("bob", None, None, hour());
    let protos = format!("imgate.v1.json, bearer.{t}");
    let mut c = gw
        .connect(
            kind,
            "device=tab1&platform=web",
            &[("sec-websocket-protocol", &protos)],
        )
        .await
        .unwrap();
    // The bearer entry is never echoed: only the codec's subprotocol (WebTransport has no
    // subprotocol to answer with; the header still carries the token for non-browser clients).
    if kind != Kind::Wt {
        assert_eq!(c.subprotocol.as_deref(), Some("imgate.v1.json"));
    }
    let w = c.expect("welcome").await;
    assert_eq!(w["user"], "bob");
    assert_eq!(w["device"], "tab1");
    assert_eq!(w["platform"], "web");
});

over_transports!(query_token_and_claims_win, |kind: Kind| async move {
    let gw = TestGateway::start().await;
    let t = token("carol", Some("claimed"), Some("android"), hour());
    let mut c = gw
        .connect(kind, &format!("token={t}&device=asked&platform=web"), &[])
        .await
        .unwrap();
    let w = c.expect("welcome").await;
    assert_eq!(w["device"], "claimed");
    assert_eq!(w["platform"], "android");
});

over_transports!(auth_frame, |kind: Kind| async move {
    let gw = TestGateway::start().await;
    let mut c = gw.connect(kind, "", &[]).await.unwrap();
    // ping is allowed before auth
    let pong = c.ping("p1").await;
    assert_eq!(pong["id"], "p1");
    c.send(json!({"type": "auth", "token": token("dave", None, None, hour())}))
        .await;
    let w = c.expect("welcome").await;
    assert_eq!(w["user"], "dave");
    assert_eq!(w["platform"], "other");
    assert!(
        w["device"].as_str().unwrap().len() > 2,
        "a device id is generated"
    );
});

over_transports!(bad_header_token_is_401, |kind: Kind| async move {
    let gw = TestGateway::start().await;
    for value in ["Bearer not-a-jwt", "Basic abc", "Bearer "] {
        assert_eq!(
            gw.refused(kind, "", &[("authorization", value)]).await,
            status(kind, 401),
            "{value}"
        );
    }
});

over_transports!(bad_query_token_is_kicked_4500, |kind: Kind| async move {
    let gw = TestGateway::start().await;
    let mut c = gw.connect(kind, "token=garbage", &[]).await.unwrap();
    c.expect_kick(4500).await;
    let forged = token("eve", None, None, hour()) + "x";
    // A browser offers a codec subprotocol with the bearer entry: the server must select one.
    let offer = format!("bearer.{forged}, imgate.v1.json");
    let mut c = gw
        .connect(kind, "", &[("sec-websocket-protocol", &offer)])
        .await
        .unwrap();
    c.expect_kick(4500).await;
});

over_transports!(expired_token_is_kicked_4501, |kind: Kind| async move {
    let gw = TestGateway::start().await;
    let now = imgate::now_ms() / 1000;
    let t = raw_token(json!({"sub": "frank", "iat": now - 7200, "exp": now - 3600}));
    let mut c = gw.connect(kind, &format!("token={t}"), &[]).await.unwrap();
    c.expect_kick(4501).await;
});

over_transports!(frames_before_auth_are_refused, |kind: Kind| async move {
    let gw = TestGateway::start().await;
    let mut c = gw.connect(kind, "", &[]).await.unwrap();
    c.send(json!({"type": "send", "id": "1", "to": "x", "body": 1}))
        .await;
    c.expect_kick(4500).await;
});

over_transports!(auth_timeout_4102, |kind: Kind| async move {
    let gw = TestGateway::with(|c| c.auth.auth_timeout = Duration::from_millis(300)).await;
    let mut c = gw.connect(kind, "", &[]).await.unwrap();
    c.expect_kick(4102).await;
});

over_transports!(refresh_in_place, |kind: Kind| async move {
    let gw = TestGateway::start().await;
    let mut c = gw.login(kind, "gina", "d1").await;
    let longer = token("gina", None, None, Duration::from_secs(7200));
    c.send(json!({"type": "auth", "token": longer})).await;
    let r = c.expect("reauth").await;
    assert!(r["token_expires_at_ms"].as_i64().unwrap() > imgate::now_ms() + 3600 * 1000);
    // Another user's token does not refresh this session, which lives on.
    c.send(json!({"type": "auth", "token": token("other", None, None, hour())}))
        .await;
    let e = c.expect("error").await;
    assert_eq!(e["code"], "reauth_failed");
    c.send(json!({"type": "auth", "token": "garbage"})).await;
    assert_eq!(c.expect("error").await["code"], "reauth_failed");
    assert_eq!(c.ping("still").await["id"], "still");
});

// Review F11: after a refused refresh the next ones are not checked for a while (each check
// of a forged signature costs CPU), even with a good token; the session lives on.
over_transports!(refused_refreshes_back_off, |kind: Kind| async move {
    let gw = TestGateway::start().await;
    let mut c = gw.login(kind, "hal", "d1").await;
    c.send(json!({"type": "auth", "token": "forged"})).await;
    assert_eq!(c.expect("error").await["code"], "reauth_failed");
    let good = token("hal", None, None, Duration::from_secs(7200));
    c.send(json!({"type": "auth", "token": good})).await;
    let e = c.expect("error").await;
    assert_eq!(e["code"], "reauth_failed");
    assert!(
        e["message"].as_str().unwrap().contains("retry later"),
        "{e}"
    );
    assert_eq!(c.ping("still").await["id"], "still");
});

over_transports!(
    token_expiry_closes_4501_after_the_leeway,
    |kind: Kind| async move {
        let gw = TestGateway::with(|c| c.auth.leeway = Duration::from_secs(1)).await;
        // exp one second ahead: the session is closed once exp + leeway has passed.
        let now = imgate::now_ms() / 1000;
        let t = raw_token(json!({"sub": "hank", "iat": now, "exp": now + 1}));
        let mut c = gw.connect(kind, &format!("token={t}"), &[]).await.unwrap();
        let w = c.expect("welcome").await;
        // `welcome` tells the token's own `exp`: what a client schedules its refresh by.
        assert_eq!(w["token_expires_at_ms"], (now + 1) * 1000);
        c.expect("synced").await;
        // Timed at the kick: over WebTransport the close itself may wait for the client.
        let k = c.expect("kick").await;
        assert_eq!(k["code"], 4501);
        assert!(
            imgate::now_ms() >= (now + 2) * 1000,
            "kicked before exp + leeway"
        );
        assert_eq!(c.closed().await.code, Some(4501));
    }
);

over_transports!(
    leeway_admits_a_token_that_just_expired,
    |kind: Kind| async move {
        // The default leeway (30 s) tolerates a gateway clock ahead of the issuer's.
        let gw = TestGateway::start().await;
        let now = imgate::now_ms() / 1000;
        let t = raw_token(json!({"sub": "hope", "iat": now - 600, "exp": now - 1}));
        let mut c = gw.connect(kind, &format!("token={t}"), &[]).await.unwrap();
        let w = c.expect("welcome").await;
        assert_eq!(w["token_expires_at_ms"], (now - 1) * 1000);
        assert_eq!(c.ping("alive").await["id"], "alive");
        // Past the leeway it is refused as expired.
        let t = raw_token(json!({"sub": "hope", "iat": now - 600, "exp": now - 31}));
        let mut c = gw.connect(kind, &format!("token={t}"), &[]).await.unwrap();
        c.expect_kick(4501).await;
    }
);

#[tokio::test]
async fn nbf_is_honoured_with_the_leeway() {
    let gw = TestGateway::start().await;
    let now = imgate::now_ms() / 1000;
    let early = raw_token(json!({"sub": "nell", "iat": now, "nbf": now + 3600, "exp": now + 7200}));
    let mut c = gw
        .connect(Kind::Ws, &format!("token={early}"), &[])
        .await
        .unwrap();
    c.expect_kick(4500).await;
    let skewed = raw_token(json!({"sub": "nell", "iat": now, "nbf": now + 10, "exp": now + 7200}));
    let mut c = gw
        .connect(Kind::Ws, &format!("token={skewed}"), &[])
        .await
        .unwrap();
    c.expect("welcome").await;
}

over_transports!(kick_revokes_tokens, |kind: Kind| async move {
    let gw = TestGateway::start().await;
    let t = token("ivan", Some("d1"), None, hour());
    let mut c = gw.connect(kind, &format!("token={t}"), &[]).await.unwrap();
    c.expect("welcome").await;
    let kicked = gw.gw().kick_user("ivan", None, "bye").await.unwrap();
    assert_eq!(kicked, 1);
    c.expect_kick(4502).await;
    // The same token no longer gets in.
    let mut again = gw.connect(kind, &format!("token={t}"), &[]).await.unwrap();
    again.expect_kick(4500).await;
});

#[tokio::test]
async fn bad_codec_and_device_are_400() {
    let gw = TestGateway::start().await;
    for q in ["codec=xml", "device=bad%20id", "platform=toaster"] {
        assert_eq!(gw.refused(Kind::Ws, q, &[]).await, Some(400), "{q}");
    }
}
