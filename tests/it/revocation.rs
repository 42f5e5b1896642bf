//! SPEC §2 revocation: per-device sign-out, and sessions caught mid-handshake by a kick
//! (a token checked before the revocation, the session registered after it), with JWTs and
//! with a remote Auth service.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use imgate::grpc::pb;
use imgate::grpc::pb::gateway_client::GatewayClient;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};

use crate::common::{token, Kind, TestGateway, WAIT};
use crate::over_transports;

fn hour() -> Duration {
    Duration::from_secs(3600)
}

/// `KickUser` over the gateway's gRPC API with the dev key.
async fn kick(gw: &TestGateway, user: &str, device: &str) -> u32 {
    let channel = Channel::from_shared(format!("http://{}", gw.grpc.unwrap()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut api = GatewayClient::with_interceptor(channel, |mut req: Request<()>| {
        req.metadata_mut()
            .insert("authorization", "Bearer dev-key".parse().unwrap());
        Ok(req)
    });
    api.kick_user(pb::KickUserRequest {
        user_id: user.into(),
        device_id: device.into(),
        reason: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .kicked
}

over_transports!(
    a_device_kick_signs_out_that_device_only,
    |kind: Kind| async move {
        let gw = TestGateway::start().await;
        let phone = token("dora", Some("phone"), None, hour());
        let laptop = token("dora", Some("laptop"), None, hour());
        // A token without `did`, its device named by the query parameter.
        let bare = token("dora", None, None, hour());
        let mut p = gw
            .connect(kind, &format!("token={phone}"), &[])
            .await
            .unwrap();
        p.expect("welcome").await;
        let mut l = gw
            .connect(kind, &format!("token={laptop}"), &[])
            .await
            .unwrap();
        l.expect("welcome").await;

        assert_eq!(kick(&gw, "dora", "phone").await, 1);
        p.expect_kick(4502).await;
        assert_eq!(l.ping("laptop stays").await["id"], "laptop stays");

        // The phone's token is revoked; the laptop reconnects with the token it holds (after
        // a drain or a network blip, say), and so does a token without `did`.
        gw.connect(kind, &format!("token={phone}"), &[])
            .await
            .unwrap()
            .expect_kick(4500)
            .await;
        let mut l2 = gw
            .connect(kind, &format!("token={laptop}"), &[])
            .await
            .unwrap();
        assert_eq!(l2.expect("welcome").await["device"], "laptop");
        let mut b = gw
            .connect(kind, &format!("token={bare}&device=phone"), &[])
            .await
            .unwrap();
        b.expect("welcome").await;

        // Without a device: every connection and every token of the user.
        assert_eq!(kick(&gw, "dora", "").await, 3);
        for c in [&mut l, &mut l2, &mut b] {
            c.expect_kick(4502).await;
        }
        for t in [&laptop, &bare] {
            gw.connect(kind, &format!("token={t}"), &[])
                .await
                .unwrap()
                .expect_kick(4500)
                .await;
        }
    }
);

/// WebTransport: the token in the URL is checked when the session is requested, and the
/// session registers only once the client opens its control stream, which it may delay.
#[tokio::test]
async fn a_webtransport_session_checked_before_a_kick_is_kicked_when_it_registers() {
    let gw = TestGateway::start().await;
    let t = token("eve", Some("d1"), None, hour());
    let query = format!("token={t}");
    let conn = gw.wt_session(&query, &[]).await.unwrap();
    // The token has been checked (the session was accepted); nothing is registered yet.
    assert_eq!(gw.gw().hub.connection_count(), 0);
    assert_eq!(gw.gw().kick_user("eve", None, "").await.unwrap(), 0);
    let mut c = TestGateway::open_control(conn, &query, &[], true)
        .await
        .unwrap();
    c.expect_kick(4502).await;
    crate::common::eventually(|| gw.gw().hub.connection_count() == 0).await;
}

/// A per-device kick catches a delayed session of that device, not of another.
#[tokio::test]
async fn a_device_kick_catches_that_device_mid_handshake() {
    let gw = TestGateway::start().await;
    let mine = format!("token={}", token("fay", Some("d1"), None, hour()));
    let other = format!("token={}", token("fay", Some("d2"), None, hour()));
    let c1 = gw.wt_session(&mine, &[]).await.unwrap();
    let c2 = gw.wt_session(&other, &[]).await.unwrap();
    gw.gw().kick_user("fay", Some("d1"), "").await.unwrap();
    let mut c1 = TestGateway::open_control(c1, &mine, &[], true)
        .await
        .unwrap();
    c1.expect_kick(4502).await;
    let mut c2 = TestGateway::open_control(c2, &other, &[], true)
        .await
        .unwrap();
    c2.expect("welcome").await;
    c2.expect("synced").await;
}

// ---- auth.mode = "grpc" -------------------------------------------------------------------

/// A fake identity backend: `good-<user>` is valid (device `dev`). While `hold` is set,
/// each question waits for a permit of `gate`, so a test can keep one in flight.
struct AuthBackend {
    calls: AtomicUsize,
    hold: AtomicBool,
    gate: Semaphore,
    asked: parking_lot::Mutex<Option<mpsc::UnboundedSender<()>>>,
}

#[derive(Clone)]
struct FakeAuth(Arc<AuthBackend>);

#[tonic::async_trait]
impl pb::auth_server::Auth for FakeAuth {
    async fn validate_token(
        &self,
        req: Request<pb::ValidateTokenRequest>,
    ) -> Result<Response<pb::ValidateTokenResponse>, Status> {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(tx) = &*self.0.asked.lock() {
            let _ = tx.send(());
        }
        if self.0.hold.load(Ordering::SeqCst) {
            let _ = self.0.gate.acquire().await;
            // A service that takes a moment to answer once it is let go: the answer lands
            // in a later millisecond than the revocation that came while it was held.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let t = req.into_inner().token;
        Ok(Response::new(match t.strip_prefix("good-") {
            Some(user) => pb::ValidateTokenResponse {
                valid: true,
                user_id: user.into(),
                device_id: "dev".into(),
                platform: "web".into(),
                expires_at_ms: imgate::now_ms() + 600_000,
            },
            None => pb::ValidateTokenResponse::default(),
        }))
    }
}

/// A gateway with `auth.mode = "grpc"` in front of a fake Auth service; the receiver tells
/// each question the service gets.
async fn with_remote_auth() -> (
    TestGateway,
    Arc<AuthBackend>,
    mpsc::UnboundedReceiver<()>,
    tokio::sync::oneshot::Sender<()>,
) {
    let (tx, asked) = mpsc::unbounded_channel();
    let backend = Arc::new(AuthBackend {
        calls: AtomicUsize::new(0),
        hold: AtomicBool::new(false),
        gate: Semaphore::new(0),
        asked: parking_lot::Mutex::new(Some(tx)),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        Server::builder()
            .add_service(pb::auth_server::AuthServer::new(FakeAuth(backend.clone())))
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                let _ = stopped.await;
            }),
    );
    let gw = TestGateway::with(|c| {
        c.auth.mode = imgate::config::AuthMode::Grpc;
        c.auth.endpoint = format!("http://{addr}");
    })
    .await;
    (gw, backend, asked, stop)
}

async fn next_question(asked: &mut mpsc::UnboundedReceiver<()>) {
    tokio::time::timeout(WAIT, asked.recv())
        .await
        .expect("the auth service is asked in time")
        .expect("the fake service runs");
}

over_transports!(
    an_auth_answer_in_flight_during_a_kick_is_refused,
    |kind: Kind| async move {
        let (gw, backend, mut asked, _stop) = with_remote_auth().await;
        backend.hold.store(true, Ordering::SeqCst);
        let url_gw = Arc::new(gw);
        let connecting = {
            let gw = url_gw.clone();
            tokio::spawn(async move { gw.connect(kind, "token=good-gus", &[]).await.unwrap() })
        };
        next_question(&mut asked).await;
        // The service has the question; the user is kicked before it answers "valid".
        url_gw.gw().kick_user("gus", None, "").await.unwrap();
        backend.gate.add_permits(1);
        let mut c = tokio::time::timeout(WAIT, connecting)
            .await
            .expect("handshake in time")
            .unwrap();
        let k = c.recv().await;
        assert_eq!(
            (k["type"].as_str(), k["code"].as_u64()),
            (Some("kick"), Some(4500)),
            "{k}"
        );
        assert_eq!(k["reason"], "token revoked");
        assert_eq!(c.closed().await.code, Some(4500));

        // That answer came back after the revocation had cleared the cache. The next attempt
        // asks the service again, whose word now stands (it must revoke on its side too).
        backend.hold.store(false, Ordering::SeqCst);
        let calls = backend.calls.load(Ordering::SeqCst);
        let mut again = url_gw.connect(kind, "token=good-gus", &[]).await.unwrap();
        again.expect("welcome").await;
        assert_eq!(
            backend.calls.load(Ordering::SeqCst),
            calls + 1,
            "asked again"
        );
    }
);

/// WebTransport with a remote Auth service: an answer obtained before the kick, used by a
/// session that registers after it.
#[tokio::test]
async fn a_remote_answer_given_before_a_kick_does_not_register_after_it() {
    let (gw, _backend, mut asked, _stop) = with_remote_auth().await;
    let query = "token=good-hal";
    let conn = gw.wt_session(query, &[]).await.unwrap();
    next_question(&mut asked).await;
    gw.gw().kick_user("hal", None, "").await.unwrap();
    let mut c = TestGateway::open_control(conn, query, &[], true)
        .await
        .unwrap();
    c.expect_kick(4502).await;
}
