//! Where client `send`s go (SPEC §7): the business backend over gRPC, or, in the dev
//! default `relay` mode, straight to the addressed user or group as durable pushes.

use std::sync::Arc;

use bytes::Bytes;

use crate::delivery::{Deliverer, OutMessage};
use crate::hub::ConnInfo;
use crate::protocol::{Reply, SendFrame};

pub enum Upstream {
    /// Dev default: a `send` is a durable push to its addressee (fast, answered inline).
    Relay(Arc<Deliverer>),
    /// The business backend over gRPC: each connection's sends go through a worker task so
    /// that a slow backend never holds up that connection's deliveries.
    Grpc(Arc<crate::grpc::business::BusinessUpstream>),
}

impl Upstream {
    /// Handle one `send`; always produces the one `reply` the client is owed.
    pub async fn handle(&self, from: &ConnInfo, send: SendFrame) -> Reply {
        match self {
            Upstream::Relay(delivery) => relay(delivery, from, send).await,
            Upstream::Grpc(business) => business.handle(from, send).await,
        }
    }
}

async fn relay(delivery: &Deliverer, from: &ConnInfo, send: SendFrame) -> Reply {
    let msg = OutMessage {
        id: String::new(),
        from: from.user.clone(),
        kind: send.kind.unwrap_or_default(),
        body: send.body,
    };
    let started = tokio::time::Instant::now();
    let reply = if let Some(to) = send.to {
        match delivery.push_durable(&to, msg).await {
            Ok(out) => Reply::ok(
                send.id,
                Some(Bytes::from(format!("{{\"seq\":{}}}", out.seq))),
            ),
            Err(e) => Reply::err(send.id, "unavailable", e.to_string()),
        }
    } else if let Some(group) = send.group {
        match delivery.state().group_members(&group).await {
            Ok(members) => {
                let mut failed = None;
                for member in &members {
                    if let Err(e) = delivery.push_durable(member, msg.clone()).await {
                        failed = Some(e);
                        break;
                    }
                }
                match failed {
                    None => Reply::ok(
                        send.id,
                        Some(Bytes::from(format!("{{\"members\":{}}}", members.len()))),
                    ),
                    Some(e) => Reply::err(send.id, "unavailable", e.to_string()),
                }
            }
            Err(e) => Reply::err(send.id, "unavailable", e.to_string()),
        }
    } else {
        Reply::err(send.id, "bad_request", "send needs `to` or `group`")
    };
    let result = if reply.ok { "ok" } else { "error" };
    crate::ops::metrics::push_request("relay", if reply.ok { "ok" } else { "unavailable" });
    crate::ops::metrics::upstream(result, started.elapsed().as_secs_f64());
    reply
}
