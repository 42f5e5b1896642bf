//! The `imgate.v1.Gateway` service: pushes, kicks, status and groups for business services
//! (SPEC §7). `api.rs` serves it.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::pb::gateway_server::Gateway as GatewayApi;
use super::pb::*;
use super::{check_id, code_name};
use crate::config::LimitsConfig;
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
        // A cluster answers from what every live instance published with its last
        // heartbeat (at most `cluster.heartbeat` old); `online_users` sums each instance's
        // users, so a user connected to two instances counts twice.
        if let Some(view) = self.env.services.cluster.as_ref().and_then(|c| c.view()) {
            let total = view.total();
            return Ok(Response::new(GetStatsResponse {
                online_users: total.users,
                connections: total.connections,
                connections_by_transport: crate::transport::Transport::ALL
                    .iter()
                    .zip(total.by_transport)
                    .map(|(t, n)| (t.as_str().to_string(), n))
                    .collect(),
                instances: view.instances.len() as u32,
            }));
        }
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
            Ok(GroupOp::Replace) => crate::state::GroupEdit::Replace,
            Ok(GroupOp::Add) => crate::state::GroupEdit::Add,
            Ok(GroupOp::Remove) => crate::state::GroupEdit::Remove,
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
