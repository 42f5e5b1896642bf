//! SPEC §7 over real gRPC on loopback: the Gateway API against WebSocket clients, and fake
//! Business and Auth backends that are real tonic servers.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use imgate::grpc::pb;
use imgate::grpc::pb::gateway_client::GatewayClient;
use parking_lot::Mutex;
use serde_json::json;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status};

use crate::common::{token, Kind, TestGateway, WAIT};
use crate::over_transports;

#[derive(Clone)]
struct Key(Option<String>);

impl Interceptor for Key {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(k) = &self.0 {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {k}").parse().unwrap());
        }
        Ok(req)
    }
}

type Client = GatewayClient<InterceptedService<Channel, Key>>;

async fn client(gw: &TestGateway, key: Option<&str>) -> Client {
    let channel = Channel::from_shared(format!("http://{}", gw.grpc.unwrap()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    GatewayClient::with_interceptor(channel, Key(key.map(str::to_string)))
}

fn message(body: &str) -> Option<pb::Message> {
    Some(pb::Message {
        body: Bytes::from(body.to_string()),
        ..Default::default()
    })
}

fn push(user: &str, body: &str, delivery: pb::Delivery) -> pb::PushToUserRequest {
    pb::PushToUserRequest {
        user_id: user.into(),
        message: message(body),
        delivery: delivery as i32,
    }
}

fn invalid(status: Status, field: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with(field),
        "{:?} should name {field}",
        status.message()
    );
}

#[tokio::test]
async fn credentials_are_required() {
    let gw = TestGateway::start().await;
    let err = client(&gw, None)
        .await
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = client(&gw, Some("wrong"))
        .await
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    client(&gw, Some("dev-key"))
        .await
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap();
    // Health checking needs no key, so standard probes work.
    let channel = Channel::from_shared(format!("http://{}", gw.grpc.unwrap()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "imgate.v1.Gateway".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        r.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

over_transports!(push_to_user_reaches_the_client, |kind: Kind| async move {
    let gw = TestGateway::start().await;
    let mut api = client(&gw, Some("dev-key")).await;
    let mut c = gw.login(kind, "ana", "d1").await;
    let r = api
        .push_to_user(push("ana", r#"{"n":1}"#, pb::Delivery::Durable))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.online, r.delivered, r.seq), (true, 1, 1));
    assert!(!r.message_id.is_empty() && !r.epoch.is_empty());
    let p = c.expect("push").await;
    assert_eq!(
        (p["body"].clone(), p["seq"].as_u64(), p["id"].as_str()),
        (json!({"n": 1}), Some(1), Some(r.message_id.as_str()))
    );
    let t = api
        .push_to_user(push("ana", "\"typing\"", pb::Delivery::Transient))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((t.seq, t.delivered), (0, 1));
    let p = c.expect("push").await;
    assert!(p.get("seq").is_none());
    // Offline: stored, online=false, replayed on connect.
    let off = api
        .push_to_user(push("bea", "1", pb::Delivery::Durable))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((off.online, off.delivered, off.seq), (false, 0, 1));
    let mut b = gw
        .connect(
            kind,
            &format!(
                "token={}",
                token("bea", None, None, Duration::from_secs(60))
            ),
            &[],
        )
        .await
        .unwrap();
    b.expect("welcome").await;
    assert_eq!(b.expect("push").await["seq"], 1);
});

#[tokio::test]
async fn invalid_arguments_name_the_field() {
    let gw = TestGateway::with(|c| {
        c.limits.max_batch_users = 3;
        c.limits.max_push_body = 16;
    })
    .await;
    let mut api = client(&gw, Some("dev-key")).await;
    invalid(
        api.push_to_user(push("", "1", pb::Delivery::Durable))
            .await
            .unwrap_err(),
        "user_id",
    );
    invalid(
        api.push_to_user(push("bad id", "1", pb::Delivery::Durable))
            .await
            .unwrap_err(),
        "user_id",
    );
    invalid(
        api.push_to_user(push("u", &"x".repeat(17), pb::Delivery::Durable))
            .await
            .unwrap_err(),
        "message.body",
    );
    invalid(
        api.push_to_user(pb::PushToUserRequest {
            user_id: "u".into(),
            message: None,
            delivery: 0,
        })
        .await
        .unwrap_err(),
        "message",
    );
    invalid(
        api.push_to_user(pb::PushToUserRequest {
            user_id: "u".into(),
            message: message("1"),
            delivery: 7,
        })
        .await
        .unwrap_err(),
        "delivery",
    );
    let many = |n: usize| (0..n).map(|i| format!("u{i}")).collect::<Vec<_>>();
    invalid(
        api.push_to_users(pb::PushToUsersRequest {
            user_ids: many(4),
            message: message("1"),
            delivery: 0,
        })
        .await
        .unwrap_err(),
        "user_ids",
    );
    invalid(
        api.push_to_users(pb::PushToUsersRequest {
            user_ids: vec!["a".into(), "".into()],
            message: message("1"),
            delivery: 0,
        })
        .await
        .unwrap_err(),
        "user_ids[1]",
    );
    invalid(
        api.set_group_members(pb::SetGroupMembersRequest {
            group_id: "g".into(),
            op: 0,
            user_ids: many(1),
        })
        .await
        .unwrap_err(),
        "op",
    );
    invalid(
        api.set_group_members(pb::SetGroupMembersRequest {
            group_id: "g".into(),
            op: 9,
            user_ids: many(1),
        })
        .await
        .unwrap_err(),
        "op",
    );
    invalid(
        api.push_to_group(pb::PushToGroupRequest {
            group_id: "".into(),
            message: message("1"),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        "group_id",
    );
    invalid(
        api.kick_user(pb::KickUserRequest {
            user_id: "".into(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        "user_id",
    );
    invalid(
        api.invalidate_tokens(pb::InvalidateTokensRequest { user_id: "".into() })
            .await
            .unwrap_err(),
        "user_id",
    );
    invalid(
        api.get_user_status(pb::GetUserStatusRequest { user_ids: many(4) })
            .await
            .unwrap_err(),
        "user_ids",
    );
}

#[tokio::test]
async fn batches_groups_status_stats_and_idempotency() {
    let gw = TestGateway::start().await;
    let mut api = client(&gw, Some("dev-key")).await;
    let mut a = gw.login(Kind::Ws, "a", "phone").await;
    let mut b = gw.login(Kind::Wss, "b", "laptop").await;

    let r = api
        .push_to_users(pb::PushToUsersRequest {
            user_ids: vec!["b".into(), "a".into(), "z".into()],
            message: message("1"),
            delivery: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let order: Vec<_> = r
        .results
        .iter()
        .map(|r| (r.user_id.as_str(), r.online))
        .collect();
    assert_eq!(order, vec![("b", true), ("a", true), ("z", false)]);
    a.expect("push").await;
    b.expect("push").await;

    let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let set = |op: pb::GroupOp, users: Vec<String>| pb::SetGroupMembersRequest {
        group_id: "team".into(),
        op: op as i32,
        user_ids: users,
    };
    assert_eq!(
        api.set_group_members(set(pb::GroupOp::Replace, ids(&["a", "b", "c"])))
            .await
            .unwrap()
            .into_inner()
            .members,
        3
    );
    assert_eq!(
        api.set_group_members(set(pb::GroupOp::Add, ids(&["d"])))
            .await
            .unwrap()
            .into_inner()
            .members,
        4
    );
    assert_eq!(
        api.set_group_members(set(pb::GroupOp::Remove, ids(&["d"])))
            .await
            .unwrap()
            .into_inner()
            .members,
        3
    );
    let g = api
        .push_to_group(pb::PushToGroupRequest {
            group_id: "team".into(),
            message: message("\"hi team\""),
            delivery: 0,
            exclude_user_ids: ids(&["a"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((g.members, g.online, g.delivered), (2, 1, 1));
    assert_eq!(b.expect("push").await["body"], "hi team");

    let s = api
        .get_user_status(pb::GetUserStatusRequest {
            user_ids: ids(&["a", "nobody"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(s.statuses[0].online && !s.statuses[1].online);
    let d = &s.statuses[0].devices[0];
    assert_eq!(
        (
            d.device_id.as_str(),
            d.transport.as_str(),
            d.instance_id.as_str()
        ),
        ("phone", "ws", "test-1")
    );
    let st = api
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((st.online_users, st.connections, st.instances), (2, 2, 1));
    assert_eq!(
        (
            st.connections_by_transport["ws"],
            st.connections_by_transport["wss"]
        ),
        (1, 1)
    );

    assert_eq!(
        api.broadcast(pb::BroadcastRequest {
            message: message("\"all\"")
        })
        .await
        .unwrap()
        .into_inner()
        .delivered,
        2
    );
    a.expect("push").await;
    b.expect("push").await;

    // The same message id twice: stored once, the original seq returned, delivered once.
    let m = |id: &str| pb::PushToUserRequest {
        user_id: "a".into(),
        message: Some(pb::Message {
            id: id.into(),
            body: Bytes::from_static(b"1"),
            ..Default::default()
        }),
        delivery: 0,
    };
    let first = api.push_to_user(m("order-7")).await.unwrap().into_inner();
    let again = api.push_to_user(m("order-7")).await.unwrap().into_inner();
    assert_eq!(
        (again.seq, again.message_id.as_str(), again.delivered),
        (first.seq, "order-7", 0)
    );
    assert_eq!(a.expect("push").await["id"], "order-7");
    assert_eq!(a.ping("next").await["id"], "next");
}

#[tokio::test]
async fn kick_and_invalidate_revoke_tokens() {
    let gw = TestGateway::start().await;
    let mut api = client(&gw, Some("dev-key")).await;
    let t = token("kim", Some("d1"), None, Duration::from_secs(60));
    let mut c = gw
        .connect(Kind::Ws, &format!("token={t}"), &[])
        .await
        .unwrap();
    c.expect("welcome").await;
    let k = api
        .kick_user(pb::KickUserRequest {
            user_id: "kim".into(),
            device_id: String::new(),
            reason: "banned".into(),
        })
        .await
        .unwrap();
    assert_eq!(k.into_inner().kicked, 1);
    let closed = c.closed().await;
    assert_eq!((closed.kick, closed.code), (Some(4502), Some(4502)));
    let mut again = gw
        .connect(Kind::Ws, &format!("token={t}"), &[])
        .await
        .unwrap();
    again.expect_kick(4500).await;

    let t2 = token("lou", None, None, Duration::from_secs(60));
    let mut c = gw
        .connect(Kind::Ws, &format!("token={t2}"), &[])
        .await
        .unwrap();
    c.expect("welcome").await;
    api.invalidate_tokens(pb::InvalidateTokensRequest {
        user_id: "lou".into(),
    })
    .await
    .unwrap();
    // The live session stays; the token no longer opens new ones.
    assert_eq!(c.ping("still").await["id"], "still");
    gw.connect(Kind::Ws, &format!("token={t2}"), &[])
        .await
        .unwrap()
        .expect_kick(4500)
        .await;
}

#[tokio::test]
async fn push_stream_answers_in_order_and_items_fail_alone() {
    let gw = TestGateway::start().await;
    let mut api = client(&gw, Some("dev-key")).await;
    let mut c = gw.login(Kind::Ws, "sam", "d").await;
    const N: usize = 1000;
    let reqs: Vec<_> = (0..N)
        .map(|i| {
            if i == 500 {
                push("bad id", "1", pb::Delivery::Durable)
            } else {
                push("sam", &i.to_string(), pb::Delivery::Durable)
            }
        })
        .collect();
    let mut results = api
        .push_stream(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    let mut seq = 0;
    while let Some(r) = results.message().await.unwrap() {
        if n == 500 {
            assert_eq!(
                (r.user_id.as_str(), r.error_code.as_str()),
                ("bad id", "INVALID_ARGUMENT")
            );
            assert!(r.error_message.starts_with("user_id"));
        } else {
            assert!(r.error_code.is_empty(), "{r:?}");
            seq += 1;
            assert_eq!(r.seq, seq, "results come in request order");
        }
        n += 1;
    }
    assert_eq!(n, N);
    for i in (0..N).filter(|i| *i != 500) {
        let p = c.expect("push").await;
        assert_eq!(p["body"], i);
    }
}

/// A request stream that breaks (here an item over the decoding limit) ends the response with
/// that error, not with OK: a pusher must not take the missing results for success.
#[tokio::test]
async fn push_stream_ends_with_the_error_that_broke_it() {
    let gw = TestGateway::start().await;
    let mut api = client(&gw, Some("dev-key")).await;
    let huge = "x".repeat(1024 * 1024);
    let reqs = vec![
        push("sam", "1", pb::Delivery::Transient),
        push("sam", &huge, pb::Delivery::Transient),
        push("sam", "3", pb::Delivery::Transient),
    ];
    let mut results = api
        .push_stream(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(WAIT, results.message()).await.unwrap();
    assert!(first.unwrap().unwrap().error_code.is_empty());
    let end = tokio::time::timeout(WAIT, results.message()).await.unwrap();
    let status = end.expect_err("the stream ends with an error status");
    assert_ne!(status.code(), Code::Ok, "{status:?}");
}

/// A pusher much faster than one client: that client is closed with 4100, the stream is
/// never held back by it, and the client is made whole on reconnect.
#[tokio::test]
async fn push_stream_is_not_held_back_by_a_slow_client() {
    let gw = TestGateway::with(|c| c.sessions.outbound_queue = 16).await;
    let mut api = client(&gw, Some("dev-key")).await;
    let _slow = gw.login(Kind::Ws, "slow", "d").await; // never reads again
    let mut fast = gw.login(Kind::Ws, "fast", "d").await;
    let body = format!("\"{}\"", "x".repeat(30_000));
    const N: usize = 600;
    let reqs: Vec<_> = (0..N)
        .map(|_| push("slow", &body, pb::Delivery::Durable))
        .chain([push("fast", "1", pb::Delivery::Durable)])
        .collect();
    let mut results = api
        .push_stream(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(r) = tokio::time::timeout(WAIT, results.message())
        .await
        .expect("results keep coming")
        .unwrap()
    {
        assert!(r.error_code.is_empty());
        n += 1;
    }
    assert_eq!(n, N + 1);
    assert_eq!(fast.expect("push").await["body"], 1);
    crate::common::eventually(|| !gw.gw().hub.is_online("slow")).await;
    let mut back = gw
        .connect(
            Kind::Ws,
            &format!(
                "token={}",
                token("slow", Some("d"), None, Duration::from_secs(60))
            ),
            &[],
        )
        .await
        .unwrap();
    back.expect("welcome").await;
    let mut got = 0;
    loop {
        let v = back.recv().await;
        match v["type"].as_str() {
            Some("push") => {
                got += 1;
                back.send(json!({"type": "ack", "seq": v["seq"], "epoch": v["epoch"]}))
                    .await;
            }
            Some("synced") => break,
            _ => {}
        }
    }
    assert_eq!(got, N, "everything missed is replayed");
}

#[tokio::test]
async fn push_stream_ends_unavailable_when_draining() {
    let mut gw = TestGateway::start().await;
    let mut api = client(&gw, Some("dev-key")).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut results = api
        .push_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(push("u", "1", pb::Delivery::Durable))
        .await
        .unwrap();
    assert!(results.message().await.unwrap().is_some());
    let running = gw.running.take().unwrap();
    let drain = tokio::spawn(running.drain());
    let end = tokio::time::timeout(WAIT, results.message())
        .await
        .expect("stream ends");
    assert_eq!(end.unwrap_err().code(), Code::Unavailable);
    drain.await.unwrap();
}

/// Review F12: when a connection goes, its sends are not forwarded any more: the one in
/// flight is cancelled and the queued ones are dropped (the client retries them on its next
/// connection, so forwarding them too would duplicate them).
#[tokio::test]
async fn sends_of_a_connection_that_went_are_not_forwarded() {
    let (backend, endpoint, _stop) = backend().await;
    *backend.delay.lock() = Duration::from_secs(30);
    let gw = TestGateway::with(|c| {
        c.upstream.mode = imgate::config::UpstreamMode::Grpc;
        c.upstream.endpoint = endpoint.clone();
        c.upstream.timeout = Duration::from_secs(60);
    })
    .await;
    let mut c = gw.login(Kind::Ws, "gone", "d").await;
    for i in 0..5 {
        c.send(json!({"type": "send", "id": i.to_string(), "to": "x", "body": i}))
            .await;
    }
    crate::common::eventually(|| *backend.started.lock() == 1).await;
    drop(c);
    crate::common::eventually(|| *backend.cancelled.lock() == 1).await;
    crate::common::eventually(|| gw.running().lifecycle.sessions.is_empty()).await;
    assert!(backend.messages.lock().is_empty());
}

/// Review F9: presence changes name their connection, so a device that reconnects before
/// its old connection ends (a network change) is not taken for offline; and a drain sends
/// the last changes before the process exits.
#[tokio::test]
async fn status_changes_name_their_connection_and_survive_the_drain() {
    let (backend, endpoint, _stop) = backend().await;
    let mut gw = TestGateway::with(|c| {
        c.upstream.mode = imgate::config::UpstreamMode::Grpc;
        c.upstream.endpoint = endpoint.clone();
    })
    .await;
    let t = token("roam", Some("phone"), None, Duration::from_secs(60));
    let mut old = gw
        .connect(Kind::Ws, &format!("token={t}"), &[])
        .await
        .unwrap();
    let old_session = old.expect("welcome").await["session"]
        .as_str()
        .unwrap()
        .to_string();
    let mut new = gw
        .connect(Kind::Ws, &format!("token={t}"), &[])
        .await
        .unwrap();
    let new_session = new.expect("welcome").await["session"]
        .as_str()
        .unwrap()
        .to_string();
    old.close().await;
    crate::common::eventually(|| backend.changes.lock().iter().any(|s| !s.online)).await;
    {
        let changes = backend.changes.lock();
        let offline: Vec<_> = changes.iter().filter(|s| !s.online).collect();
        assert_eq!(offline.len(), 1);
        assert_eq!(
            offline[0].session_id, old_session,
            "the old connection went"
        );
        assert!(changes
            .iter()
            .any(|s| s.online && s.session_id == new_session));
    }
    // The drain's last offline change reaches the backend before the drain returns (the
    // client answers the close at once, so the drain ends right after its session).
    let reader = tokio::spawn(async move { new.closed().await });
    let running = gw.running.take().unwrap();
    running.drain().await;
    let sent = backend
        .changes
        .lock()
        .iter()
        .any(|s| !s.online && s.session_id == new_session);
    assert!(sent, "the drained connection's offline change was sent");
    reader.await.unwrap();
}

// ---- fake backends ------------------------------------------------------------------

#[derive(Default)]
struct Backend {
    messages: Mutex<Vec<pb::ClientMessage>>,
    changes: Mutex<Vec<pb::StatusChange>>,
    delay: Mutex<Duration>,
    auth_calls: Mutex<usize>,
    /// Answer UNAVAILABLE to everything, as a backend in trouble does.
    down: Mutex<bool>,
    /// `HandleMessage` calls begun, and those given up by the gateway before their answer.
    started: Mutex<usize>,
    cancelled: Mutex<usize>,
}

/// Counts a call dropped before it finished (the caller cancelled it).
struct CancelGuard(Arc<Backend>, bool);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.1 {
            *self.0.cancelled.lock() += 1;
        }
    }
}

#[derive(Clone)]
struct Fake(Arc<Backend>);

#[tonic::async_trait]
impl pb::business_server::Business for Fake {
    async fn handle_message(
        &self,
        req: Request<pb::ClientMessage>,
    ) -> Result<Response<pb::ClientReply>, Status> {
        if *self.0.down.lock() {
            return Err(Status::unavailable("down"));
        }
        let m = req.into_inner();
        let delay = *self.0.delay.lock();
        *self.0.started.lock() += 1;
        let mut guard = CancelGuard(self.0.clone(), false);
        tokio::time::sleep(delay).await;
        guard.1 = true;
        let body = Bytes::from(format!("{{\"echo\":{}}}", String::from_utf8_lossy(&m.body)));
        let reject = m.kind == "reject";
        self.0.messages.lock().push(m);
        if reject {
            return Ok(Response::new(pb::ClientReply {
                ok: false,
                code: "forbidden".into(),
                message: "no".into(),
                ..Default::default()
            }));
        }
        Ok(Response::new(pb::ClientReply {
            ok: true,
            body,
            ..Default::default()
        }))
    }

    async fn on_status_change(
        &self,
        req: Request<pb::StatusChangeBatch>,
    ) -> Result<Response<pb::StatusChangeAck>, Status> {
        self.0.changes.lock().extend(req.into_inner().changes);
        Ok(Response::new(pb::StatusChangeAck {}))
    }
}

#[tonic::async_trait]
impl pb::auth_server::Auth for Fake {
    async fn validate_token(
        &self,
        req: Request<pb::ValidateTokenRequest>,
    ) -> Result<Response<pb::ValidateTokenResponse>, Status> {
        *self.0.auth_calls.lock() += 1;
        if *self.0.down.lock() {
            return Err(Status::unavailable("down"));
        }
        let t = req.into_inner().token;
        Ok(Response::new(match t.strip_prefix("good-") {
            Some(user) => pb::ValidateTokenResponse {
                valid: true,
                user_id: user.into(),
                device_id: "dev".into(),
                platform: "web".into(),
                expires_at_ms: imgate::now_ms() + 60_000,
            },
            None => pb::ValidateTokenResponse::default(),
        }))
    }
}

/// Start the fake Business and Auth services; returns their endpoint and a stop handle.
async fn backend() -> (Arc<Backend>, String, tokio::sync::oneshot::Sender<()>) {
    let state = Arc::new(Backend::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let fake = Fake(state.clone());
    tokio::spawn(
        Server::builder()
            .add_service(pb::business_server::BusinessServer::new(fake.clone()))
            .add_service(pb::auth_server::AuthServer::new(fake))
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                let _ = stopped.await;
            }),
    );
    (state, format!("http://{addr}"), stop)
}

#[tokio::test]
async fn business_upstream_gets_sends_in_order_and_answers_them() {
    let (backend, endpoint, _stop) = backend().await;
    let gw = TestGateway::with(|c| {
        c.upstream.mode = imgate::config::UpstreamMode::Grpc;
        c.upstream.endpoint = endpoint.clone();
    })
    .await;
    let mut c = gw.login(Kind::Ws, "ivy", "tab").await;
    for i in 0..20 {
        c.send(json!({"type": "send", "id": i.to_string(), "to": "bob", "kind": "text", "body": {"i": i}})).await;
    }
    for i in 0..20 {
        let r = c.expect("reply").await;
        assert_eq!(
            (r["id"].as_str(), r["ok"].as_bool()),
            (Some(i.to_string().as_str()), Some(true))
        );
        assert_eq!(r["body"], json!({"echo": {"i": i}}));
    }
    {
        let msgs = backend.messages.lock();
        let ids: Vec<_> = msgs
            .iter()
            .map(|m| m.request_id.parse::<i32>().unwrap())
            .collect();
        assert_eq!(ids, (0..20).collect::<Vec<_>>(), "in the order sent");
        let m = &msgs[0];
        assert_eq!(
            (
                m.user_id.as_str(),
                m.device_id.as_str(),
                m.to_user_id.as_str(),
                m.kind.as_str(),
                m.instance_id.as_str()
            ),
            ("ivy", "tab", "bob", "text", "test-1")
        );
        assert_eq!(&m.body[..], br#"{"i":0}"#);
    }
    c.send(json!({"type": "send", "id": "r", "group": "g", "kind": "reject", "body": 1}))
        .await;
    let r = c.expect("reply").await;
    assert_eq!(
        (r["ok"].as_bool(), r["code"].as_str()),
        (Some(false), Some("forbidden"))
    );
    // Presence changes reach the backend in batches.
    c.close().await;
    crate::common::eventually(|| {
        backend
            .changes
            .lock()
            .iter()
            .any(|s| s.user_id == "ivy" && !s.online)
    })
    .await;
    let changes = backend.changes.lock();
    let ivy: Vec<_> = changes
        .iter()
        .filter(|s| s.user_id == "ivy")
        .map(|s| (s.online, s.device_id.as_str(), s.transport.as_str()))
        .collect();
    assert_eq!(ivy, vec![(true, "tab", "ws"), (false, "tab", "ws")]);
}

#[tokio::test]
async fn slow_or_down_backend_gives_upstream_unavailable_and_the_client_stays() {
    let (backend, endpoint, _stop) = backend().await;
    *backend.delay.lock() = Duration::from_secs(2);
    let gw = TestGateway::with(|c| {
        c.upstream.mode = imgate::config::UpstreamMode::Grpc;
        c.upstream.endpoint = endpoint.clone();
        c.upstream.timeout = Duration::from_millis(300);
    })
    .await;
    let mut c = gw.login(Kind::Ws, "ned", "d").await;
    c.send(json!({"type": "send", "id": "slow", "to": "x", "body": 1}))
        .await;
    // While the backend sits on the send, pushes still reach the client.
    gw.gw().delivery.push_transient(
        "ned",
        imgate::delivery::OutMessage {
            body: "\"live\"".into(),
            ..Default::default()
        },
    );
    assert_eq!(c.expect("push").await["body"], "live");
    let r = c.expect("reply").await;
    assert_eq!(
        (r["id"].as_str(), r["code"].as_str()),
        (Some("slow"), Some("upstream_unavailable"))
    );
    // Failing: the same answer, and the connection lives on.
    *backend.down.lock() = true;
    *backend.delay.lock() = Duration::ZERO;
    c.send(json!({"type": "send", "id": "down", "to": "x", "body": 1}))
        .await;
    let r = c.expect("reply").await;
    assert_eq!(
        (r["id"].as_str(), r["code"].as_str()),
        (Some("down"), Some("upstream_unavailable"))
    );
    assert_eq!(c.ping("alive").await["id"], "alive");
}

#[tokio::test]
async fn remote_auth_with_negative_caching_and_outages() {
    let (backend, endpoint, _stop) = backend().await;
    let gw = TestGateway::with(|c| {
        c.auth.mode = imgate::config::AuthMode::Grpc;
        c.auth.endpoint = endpoint.clone();
    })
    .await;
    let mut ok = gw.connect(Kind::Ws, "token=good-olga", &[]).await.unwrap();
    let w = ok.expect("welcome").await;
    assert_eq!(
        (
            w["user"].as_str(),
            w["device"].as_str(),
            w["platform"].as_str()
        ),
        (Some("olga"), Some("dev"), Some("web"))
    );
    for _ in 0..5 {
        gw.connect(Kind::Ws, "token=forged", &[])
            .await
            .unwrap()
            .expect_kick(4500)
            .await;
    }
    assert_eq!(
        *backend.auth_calls.lock(),
        2,
        "the bad token is asked about once"
    );
    // The auth service fails: new sessions are refused with a retryable code, connected
    // users stay.
    *backend.down.lock() = true;
    let mut refused = gw.connect(Kind::Ws, "token=good-pia", &[]).await.unwrap();
    refused.expect_kick(4103).await;
    assert_eq!(ok.ping("still").await["id"], "still");
}

/// Nothing listens at the backend's address: sends get `upstream_unavailable`, tokens are
/// refused with the retryable 4103, and the gateway keeps serving.
#[tokio::test]
async fn unreachable_backends() {
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let gw = TestGateway::with(|c| {
        c.upstream.mode = imgate::config::UpstreamMode::Grpc;
        c.upstream.endpoint = endpoint.clone();
        c.upstream.timeout = Duration::from_millis(500);
    })
    .await;
    let mut c = gw.login(Kind::Ws, "uma", "d").await;
    c.send(json!({"type": "send", "id": "1", "to": "x", "body": 1}))
        .await;
    assert_eq!(c.expect("reply").await["code"], "upstream_unavailable");
    assert_eq!(c.ping("ok").await["id"], "ok");

    let gw = TestGateway::with(|c| {
        c.auth.mode = imgate::config::AuthMode::Grpc;
        c.auth.endpoint = endpoint.clone();
        c.upstream.timeout = Duration::from_millis(500);
    })
    .await;
    gw.connect(Kind::Ws, "token=good-x", &[])
        .await
        .unwrap()
        .expect_kick(4103)
        .await;
}

/// The per-frame and per-push series (kept as registered handles on the hot path) move with
/// the traffic they count. The recorder is shared by every test in this process, so the
/// test compares against a scrape taken before its own traffic.
#[tokio::test]
async fn pushes_and_frames_move_their_metrics() {
    use crate::common::metric;
    let gw = TestGateway::start().await;
    let scrape = || async { gw.http_get(gw.ops, "/metrics").await.1 };
    let series: [(&str, &[(&str, &str)]); 8] = [
        (
            "imgate_frames_sent_total",
            &[("transport", "ws"), ("type", "push")],
        ),
        (
            "imgate_frames_received_total",
            &[("transport", "ws"), ("type", "ping")],
        ),
        ("imgate_bytes_sent_total", &[("transport", "ws")]),
        ("imgate_bytes_received_total", &[("transport", "ws")]),
        (
            "imgate_push_requests_total",
            &[("method", "PushToUser"), ("result", "ok")],
        ),
        (
            "imgate_push_requests_total",
            &[("method", "PushStream"), ("result", "ok")],
        ),
        ("imgate_push_delivery_seconds_count", &[]),
        (
            "imgate_state_seconds_count",
            &[("backend", "memory"), ("op", "append")],
        ),
    ];
    let before_text = scrape().await;
    let before: Vec<f64> = series
        .iter()
        .map(|(name, labels)| metric(&before_text, name, labels))
        .collect();

    let mut api = client(&gw, Some("dev-key")).await;
    let mut c = gw.login(Kind::Ws, "counted", "d").await;
    c.ping("1").await;
    api.push_to_user(push("counted", "1", pb::Delivery::Durable))
        .await
        .unwrap();
    let mut results = api
        .push_stream(tokio_stream::iter([push(
            "counted",
            "2",
            pb::Delivery::Durable,
        )]))
        .await
        .unwrap()
        .into_inner();
    assert!(results
        .message()
        .await
        .unwrap()
        .unwrap()
        .error_code
        .is_empty());
    c.expect("push").await;
    c.expect("push").await;

    // At least: two pushes written, one ping read, two appends, one call per method.
    let moved = [2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0];
    crate::common::eventually_async(|| async {
        let text = scrape().await;
        series
            .iter()
            .zip(before.iter().zip(moved))
            .all(|((name, labels), (b, m))| metric(&text, name, labels) >= b + m)
    })
    .await;
}

/// Reflection answers over both versions clients use, and lists only what is served here
/// (`grpcurl list` must not advertise `Business` or `Auth`, which answer UNIMPLEMENTED).
#[tokio::test]
async fn reflection_over_v1_and_v1alpha_lists_the_served_services() {
    use tonic_reflection::pb::{v1, v1alpha};
    let gw = TestGateway::start().await;
    let channel = Channel::from_shared(format!("http://{}", gw.grpc.unwrap()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let want = vec![
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "imgate.v1.Gateway",
    ];

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut answers = tokio::time::timeout(
        WAIT,
        client.server_reflection_info(tokio_stream::iter([req])),
    )
    .await
    .expect("in time")
    .unwrap()
    .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answer.message_response
    else {
        panic!("not a service list: {answer:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(names, want);

    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "imgate.v1.Gateway".into(),
            ),
        ),
    };
    let mut answers = tokio::time::timeout(
        WAIT,
        client.server_reflection_info(tokio_stream::iter([req])),
    )
    .await
    .expect("in time")
    .unwrap()
    .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    assert!(
        matches!(
            answer.message_response,
            Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
        ),
        "{answer:?}"
    );
}
