//! The `imgate.v1.Gateway` service on the gRPC listener, with API-key (and optional mTLS)
//! authentication, gRPC health checking and server reflection.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::service::Interceptor;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};
use tracing::{error, info};

use super::pb::gateway_server::{Gateway as GatewayApi, GatewayServer};
use super::pb::*;
use super::{check_id, code_name};
use crate::config::{Config, LimitsConfig};
use crate::delivery::{OutMessage, PushOutcome};
use crate::lifecycle::Lifecycle;
use crate::ops::metrics;
use crate::services::Services;
use crate::state::StateError;
use futures_util::stream::{FuturesOrdered, StreamExt};

/// Results a `PushStream` may have produced and not yet sent: a pusher that does not read
/// its results stops being read, and HTTP/2 flow control slows it down.
const STREAM_WINDOW: usize = 256;
/// `PushStream` items in flight at once: their appends go to the store together (one
/// round trip for many, on a remote store) while results still go out in request order.
const STREAM_DEPTH: usize = 64;
/// Fan-outs yield to the scheduler this often, so a huge group does not hog a worker.
const YIELD_EVERY: usize = 512;

/// Checks `authorization: Bearer <key>` against the configured keys in constant time.
#[derive(Clone)]
pub struct ApiKeys {
    keys: Arc<Vec<Vec<u8>>>,
}

impl ApiKeys {
    pub fn new(keys: Vec<String>) -> ApiKeys {
        ApiKeys {
            keys: Arc::new(keys.into_iter().map(String::into_bytes).collect()),
        }
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    // Length is not secret; the content comparison does not stop at the first difference.
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Interceptor for ApiKeys {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let presented = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::as_bytes);
        match presented {
            Some(key) if self.keys.iter().fold(false, |ok, k| ok | ct_eq(k, key)) => Ok(req),
            Some(_) => Err(Status::unauthenticated("invalid api key")),
            None => Err(Status::unauthenticated(
                "missing `authorization: Bearer <api key>`",
            )),
        }
    }
}

/// What the push API uses of the gateway.
pub struct ApiEnv {
    pub services: Arc<Services>,
    pub lifecycle: Arc<Lifecycle>,
    /// `[limits]`: push body and batch sizes.
    pub limits: LimitsConfig,
}

pub struct GatewayService {
    env: Arc<ApiEnv>,
}

impl GatewayService {
    pub fn new(env: Arc<ApiEnv>) -> GatewayService {
        GatewayService { env }
    }

    fn message(&self, m: Option<Message>) -> Result<OutMessage, Status> {
        let m = m.ok_or_else(|| Status::invalid_argument("message: required"))?;
        let max = self.env.limits.max_push_body;
        if m.body.len() > max {
            return Err(Status::invalid_argument(format!(
                "message.body: {} bytes is over the limit of {max} (limits.max_push_body)",
                m.body.len()
            )));
        }
        for (field, v, limit) in [
            ("message.id", &m.id, 128),
            ("message.from", &m.from, 128),
            ("message.kind", &m.kind, 64),
        ] {
            if v.len() > limit || v.chars().any(char::is_control) {
                return Err(Status::invalid_argument(format!(
                    "{field}: at most {limit} bytes, no control characters"
                )));
            }
        }
        Ok(OutMessage {
            id: m.id,
            from: m.from,
            kind: m.kind,
            body: m.body,
        })
    }

    fn batch(&self, field: &str, ids: &[String]) -> Result<(), Status> {
        let max = self.env.limits.max_batch_users;
        if ids.len() > max {
            return Err(Status::invalid_argument(format!(
                "{field}: {} ids is over the limit of {max} (limits.max_batch_users)",
                ids.len()
            )));
        }
        for (i, id) in ids.iter().enumerate() {
            check_id(&format!("{field}[{i}]"), id)?;
        }
        Ok(())
    }

    /// Push one validated message to one user.
    async fn push(
        &self,
        user: &str,
        msg: OutMessage,
        durable: bool,
    ) -> Result<PushOutcome, StateError> {
        if durable {
            self.env.services.delivery.push_durable(user, msg).await
        } else {
            Ok(self.env.services.delivery.push_transient(user, msg))
        }
    }

    async fn push_to_user_inner(&self, req: PushToUserRequest) -> Result<PushResult, Status> {
        check_id("user_id", &req.user_id)?;
        let durable = durable(req.delivery)?;
        let msg = self.message(req.message)?;
        let out = self
            .push(&req.user_id, msg, durable)
            .await
            .map_err(unavailable)?;
        Ok(result(req.user_id, out))
    }
}

fn durable(delivery: i32) -> Result<bool, Status> {
    match Delivery::try_from(delivery) {
        Ok(Delivery::Durable) => Ok(true),
        Ok(Delivery::Transient) => Ok(false),
        Err(_) => Err(Status::invalid_argument(format!(
            "delivery: unknown value {delivery}"
        ))),
    }
}

fn unavailable(e: StateError) -> Status {
    // The cause (refused, timed out...) tells the caller whether to retry now or later.
    Status::unavailable(e.chain())
}

fn result(user_id: String, out: PushOutcome) -> PushResult {
    PushResult {
        user_id,
        online: out.online,
        delivered: out.delivered,
        seq: out.seq,
        message_id: out.message_id,
        error_code: String::new(),
        error_message: String::new(),
        epoch: out.epoch,
    }
}

fn failed(user_id: String, status: &Status) -> PushResult {
    PushResult {
        user_id,
        error_code: code_name(status.code()).into(),
        error_message: status.message().into(),
        ..Default::default()
    }
}

/// Count a unary push call by its outcome.
fn counted<T>(method: &'static str, r: Result<T, Status>) -> Result<Response<T>, Status> {
    let label = match &r {
        Ok(_) => "ok",
        Err(s) if s.code() == tonic::Code::InvalidArgument => "invalid_argument",
        Err(_) => "unavailable",
    };
    metrics::push_request(method, label);
    r.map(Response::new)
}

#[tonic::async_trait]
impl GatewayApi for GatewayService {
    async fn push_to_user(
        &self,
        req: Request<PushToUserRequest>,
    ) -> Result<Response<PushResult>, Status> {
        counted(
            "PushToUser",
            self.push_to_user_inner(req.into_inner()).await,
        )
    }

    async fn push_to_users(
        &self,
        req: Request<PushToUsersRequest>,
    ) -> Result<Response<PushToUsersResponse>, Status> {
        let r = async {
            let req = req.into_inner();
            if req.user_ids.is_empty() {
                return Err(Status::invalid_argument("user_ids: required"));
            }
            self.batch("user_ids", &req.user_ids)?;
            let durable = durable(req.delivery)?;
            let msg = self.message(req.message)?;
            let results = if durable {
                let outs = self
                    .env
                    .services
                    .delivery
                    .push_durable_many(&req.user_ids, msg)
                    .await;
                req.user_ids
                    .into_iter()
                    .zip(outs)
                    .map(|(user, out)| match out {
                        Ok(out) => result(user, out),
                        Err(e) => failed(user, &unavailable(e)),
                    })
                    .collect()
            } else {
                let mut results = Vec::with_capacity(req.user_ids.len());
                for (i, user) in req.user_ids.into_iter().enumerate() {
                    if i % YIELD_EVERY == YIELD_EVERY - 1 {
                        tokio::task::yield_now().await;
                    }
                    let out = self
                        .env
                        .services
                        .delivery
                        .push_transient(&user, msg.clone());
                    results.push(result(user, out));
                }
                results
            };
            Ok(PushToUsersResponse { results })
        }
        .await;
        counted("PushToUsers", r)
    }

    async fn push_to_group(
        &self,
        req: Request<PushToGroupRequest>,
    ) -> Result<Response<PushToGroupResponse>, Status> {
        let r = async {
            let req = req.into_inner();
            check_id("group_id", &req.group_id)?;
            let durable = durable(req.delivery)?;
            let msg = self.message(req.message)?;
            let members = self
                .env
                .services
                .state
                .group_members(&req.group_id)
                .await
                .map_err(unavailable)?;
            let members: Vec<String> = members
                .into_iter()
                .filter(|m| !req.exclude_user_ids.contains(m))
                .collect();
            let mut resp = PushToGroupResponse::default();
            let outs = if durable {
                self.env
                    .services
                    .delivery
                    .push_durable_many(&members, msg)
                    .await
            } else {
                let mut outs = Vec::with_capacity(members.len());
                for (i, user) in members.iter().enumerate() {
                    if i % YIELD_EVERY == YIELD_EVERY - 1 {
                        tokio::task::yield_now().await;
                    }
                    outs.push(Ok(self
                        .env
                        .services
                        .delivery
                        .push_transient(user, msg.clone())));
                }
                outs
            };
            for out in outs {
                let out = out.map_err(unavailable)?;
                resp.members += 1;
                resp.online += u32::from(out.online);
                resp.delivered += out.delivered;
            }
            Ok(resp)
        }
        .await;
        counted("PushToGroup", r)
    }

    async fn broadcast(
        &self,
        req: Request<BroadcastRequest>,
    ) -> Result<Response<BroadcastResponse>, Status> {
        let r = self
            .message(req.into_inner().message)
            .map(|msg| BroadcastResponse {
                delivered: self.env.services.delivery.broadcast(msg),
            });
        counted("Broadcast", r)
    }

    async fn kick_user(
        &self,
        req: Request<KickUserRequest>,
    ) -> Result<Response<KickUserResponse>, Status> {
        let req = req.into_inner();
        check_id("user_id", &req.user_id)?;
        let device = (!req.device_id.is_empty()).then_some(req.device_id.as_str());
        if let Some(d) = device {
            check_id("device_id", d)?;
        }
        if req.reason.len() > 123 {
            // A WebSocket close reason holds at most 123 bytes.
            return Err(Status::invalid_argument("reason: at most 123 bytes"));
        }
        let kicked = self
            .env
            .services
            .kick_user(&req.user_id, device, &req.reason)
            .await
            .map_err(unavailable)?;
        Ok(Response::new(KickUserResponse { kicked }))
    }

    async fn get_user_status(
        &self,
        req: Request<GetUserStatusRequest>,
    ) -> Result<Response<GetUserStatusResponse>, Status> {
        let req = req.into_inner();
        self.batch("user_ids", &req.user_ids)?;
        // Presence spans every instance (with a shared store), not only this one's hub; one
        // batched lookup for all users.
        let lists = self
            .env
            .services
            .state
            .presence_many(&req.user_ids)
            .await
            .map_err(unavailable)?;
        let statuses = req
            .user_ids
            .into_iter()
            .zip(lists)
            .map(|(user, list)| {
                let devices: Vec<DeviceStatus> = list
                    .into_iter()
                    .map(|p| DeviceStatus {
                        device_id: p.device,
                        platform: p.platform,
                        transport: p.transport,
                        instance_id: p.instance,
                        connected_at_ms: p.connected_at_ms,
                    })
                    .collect();
                UserStatus {
                    user_id: user,
                    online: !devices.is_empty(),
                    devices,
                }
            })
            .collect();
        Ok(Response::new(GetUserStatusResponse { statuses }))
    }

    async fn get_stats(
        &self,
        _req: Request<GetStatsRequest>,
    ) -> Result<Response<GetStatsResponse>, Status> {
        let hub = &self.env.services.hub;
        Ok(Response::new(GetStatsResponse {
            online_users: hub.online_users() as u64,
            connections: hub.connection_count() as u64,
            connections_by_transport: hub
                .connections_by_transport()
                .into_iter()
                .map(|(t, n)| (t.as_str().to_string(), n as u64))
                .collect(),
            instances: 1,
        }))
    }

    async fn set_group_members(
        &self,
        req: Request<SetGroupMembersRequest>,
    ) -> Result<Response<SetGroupMembersResponse>, Status> {
        let req = req.into_inner();
        check_id("group_id", &req.group_id)?;
        let op = match GroupOp::try_from(req.op) {
            Ok(GroupOp::Replace) => crate::state::GroupOp::Replace,
            Ok(GroupOp::Add) => crate::state::GroupOp::Add,
            Ok(GroupOp::Remove) => crate::state::GroupOp::Remove,
            Ok(GroupOp::Unspecified) => {
                return Err(Status::invalid_argument(
                    "op: GROUP_OP_UNSPECIFIED; use REPLACE, ADD or REMOVE",
                ))
            }
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "op: unknown value {}",
                    req.op
                )))
            }
        };
        self.batch("user_ids", &req.user_ids)?;
        let members = self
            .env
            .services
            .state
            .set_group_members(&req.group_id, op, &req.user_ids)
            .await
            .map_err(unavailable)?;
        Ok(Response::new(SetGroupMembersResponse {
            members: members as u32,
        }))
    }

    async fn invalidate_tokens(
        &self,
        req: Request<InvalidateTokensRequest>,
    ) -> Result<Response<InvalidateTokensResponse>, Status> {
        let req = req.into_inner();
        check_id("user_id", &req.user_id)?;
        let evicted = self
            .env
            .services
            .revoke_tokens(&req.user_id, None)
            .await
            .map_err(unavailable)?;
        Ok(Response::new(InvalidateTokensResponse { evicted }))
    }

    type PushStreamStream = ReceiverStream<Result<PushResult, Status>>;

    async fn push_stream(
        &self,
        req: Request<Streaming<PushToUserRequest>>,
    ) -> Result<Response<Self::PushStreamStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_WINDOW);
        let svc = GatewayService {
            env: self.env.clone(),
        };
        // Tracked with the sessions: the drain waits for its in-flight answers.
        let tracker = self.env.lifecycle.sessions.clone();
        tracker.spawn(async move {
            let svc = &svc;
            let mut inflight = FuturesOrdered::new();
            // Users with an item in flight: a user's next item waits for it, so one user's
            // pushes are stored in request order whatever the store does with retries.
            let mut busy: HashMap<String, usize> = HashMap::new();
            let mut held: Option<PushToUserRequest> = None;
            let mut reading = true;
            let mut draining = false;
            let mut broken: Option<Status> = None;
            loop {
                if held
                    .as_ref()
                    .is_some_and(|r| !busy.contains_key(&r.user_id))
                {
                    let req = held.take().expect("checked");
                    *busy.entry(req.user_id.clone()).or_default() += 1;
                    let user = req.user_id.clone();
                    inflight.push_back(async move { (user, svc.push_to_user_inner(req).await) });
                }
                tokio::select! {
                    biased;
                    _ = svc.env.lifecycle.shutdown.cancelled(), if reading => {
                        // Stop reading; what is in flight still gets its answer.
                        reading = false;
                        draining = true;
                    }
                    Some((user, r)) = inflight.next(), if !inflight.is_empty() => {
                        if let Some(n) = busy.get_mut(&user) {
                            *n -= 1;
                            if *n == 0 {
                                busy.remove(&user);
                            }
                        }
                        // One result per request, in request order; a failing item fails alone.
                        let item = match r {
                            Ok(r) => {
                                metrics::push_request("PushStream", "ok");
                                r
                            }
                            Err(status) => {
                                let status: Status = status;
                                let label = if status.code() == tonic::Code::InvalidArgument {
                                    "invalid_argument"
                                } else {
                                    "unavailable"
                                };
                                metrics::push_request("PushStream", label);
                                failed(user, &status)
                            }
                        };
                        if tx.send(Ok(item)).await.is_err() {
                            return; // the caller went away
                        }
                    }
                    next = inbound.message(), if reading && held.is_none() && inflight.len() < STREAM_DEPTH => {
                        match next {
                            Ok(Some(req)) => held = Some(req),
                            Ok(None) => reading = false,
                            Err(status) => {
                                // A broken request stream must not end with OK: the pusher
                                // would take the missing results for success.
                                reading = false;
                                broken = Some(status);
                            }
                        }
                    }
                    else => {
                        if held.is_some() {
                            continue; // started at the top of the loop
                        }
                        if let Some(status) = broken.take() {
                            let _ = tx.send(Err(status)).await;
                        } else if draining {
                            let _ = tx
                                .send(Err(Status::unavailable("the instance is draining: reconnect")))
                                .await;
                        }
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The services this listener serves, and only those: proto/ also describes `Business` and
/// `Auth`, which the gateway calls but does not serve, and listing them would advertise
/// methods that answer UNIMPLEMENTED.
pub const SERVED: [&str; 4] = [
    "imgate.v1.Gateway",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Reflection over the served services, with the descriptors of both reflection versions,
/// since both are served.
fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    let mut b = tonic_reflection::server::Builder::configure()
        .include_reflection_service(false)
        .register_encoded_file_descriptor_set(super::pb::DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET);
    for name in SERVED {
        b = b.with_service_name(name);
    }
    b
}

/// The gRPC API, built before the gateway reports itself started: TLS material that cannot
/// be read, or a configuration that would serve the API without credentials, stops the start
/// instead of leaving a bound port that never answers (or answers anyone).
pub struct Api {
    router: tonic::transport::server::Router,
}

impl Api {
    pub async fn build(config: &Config, env: ApiEnv) -> anyhow::Result<Api> {
        let cfg = &config.grpc;
        let mut builder = Server::builder().tcp_nodelay(true);
        let tls = !cfg.tls_cert.is_empty();
        if tls {
            let cert = std::fs::read(&cfg.tls_cert).context("grpc.tls_cert")?;
            let key = std::fs::read(&cfg.tls_key).context("grpc.tls_key")?;
            let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
            if !cfg.client_ca.is_empty() {
                let ca = std::fs::read(&cfg.client_ca).context("grpc.client_ca")?;
                tls = tls.client_ca_root(Certificate::from_pem(ca));
            }
            builder = builder.tls_config(tls).context("grpc TLS")?;
        }
        let keys = config.api_keys();
        // The client certificate is the credential only when TLS actually asks for one.
        let mtls_only = keys.is_empty() && tls && !cfg.client_ca.is_empty();
        if keys.is_empty() && !mtls_only {
            anyhow::bail!("the gRPC API needs grpc.api_keys, or grpc.client_ca with grpc.tls_cert");
        }
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<GatewayServer<GatewayService>>().await;
        let reflection = reflection_builder().build_v1()?;
        // Older clients (grpcurl before 1.8.8, many language tools) speak only v1alpha.
        let reflection_v1alpha = reflection_builder().build_v1alpha()?;
        let max_message = env.limits.max_push_body.max(64 * 1024) * 2 + 64 * 1024;
        let gateway = GatewayServer::new(GatewayService::new(Arc::new(env)))
            .max_decoding_message_size(max_message);
        let builder = builder
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha);
        let router = if mtls_only {
            builder.add_service(gateway)
        } else {
            builder.add_service(tonic::service::interceptor::InterceptedService::new(
                gateway,
                ApiKeys::new(keys),
            ))
        };
        Ok(Api { router })
    }

    /// Serve the gRPC listener until `stop` (after the drain: unary calls are served while
    /// draining, open streams end with UNAVAILABLE when it begins).
    pub async fn serve(self, listener: TcpListener, stop: CancellationToken) {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "gRPC listening");
        }
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        if let Err(e) = self
            .router
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await
        {
            error!(error = %format!("{e:#}"), "gRPC listener failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_check() {
        let mut keys = ApiKeys::new(vec!["k1".into(), "longer-key".into()]);
        let with = |v: &str| {
            let mut r = Request::new(());
            r.metadata_mut().insert("authorization", v.parse().unwrap());
            r
        };
        assert!(keys.call(with("Bearer k1")).is_ok());
        assert!(keys.call(with("Bearer longer-key")).is_ok());
        assert_eq!(
            keys.call(with("Bearer k2")).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            keys.call(with("k1")).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            keys.call(Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
