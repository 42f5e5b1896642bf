//! The business backend (`upstream.mode = "grpc"`): each client `send` becomes
//! `HandleMessage`, and presence changes go out as `OnStatusChange` batches.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, warn};

use super::pb::business_client::BusinessClient;
use super::pb::{ClientMessage, StatusChange, StatusChangeBatch};
use crate::hub::ConnInfo;
use crate::ops::metrics;
use crate::protocol::{Reply, SendFrame};

/// A lazily connected channel: it connects on first use and reconnects with backoff by
/// itself, so a backend that is down at start or restarts is picked up again.
pub fn channel(endpoint: &str) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(endpoint.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

pub struct BusinessUpstream {
    client: BusinessClient<Channel>,
    timeout: Duration,
    instance: String,
}

impl BusinessUpstream {
    pub fn new(channel: Channel, timeout: Duration, instance: String) -> BusinessUpstream {
        BusinessUpstream {
            client: BusinessClient::new(channel),
            timeout,
            instance,
        }
    }

    /// One `send`, under `upstream.timeout`. A down or slow backend gives the client
    /// `upstream_unavailable`; the connection stays up.
    pub async fn handle(&self, from: &ConnInfo, send: SendFrame) -> Reply {
        let req = ClientMessage {
            user_id: from.user.clone(),
            device_id: from.device.clone(),
            platform: from.platform.clone(),
            session_id: from.session.clone(),
            request_id: send.id.clone(),
            kind: send.kind.unwrap_or_default(),
            to_user_id: send.to.unwrap_or_default(),
            group_id: send.group.unwrap_or_default(),
            body: send.body,
            instance_id: self.instance.clone(),
        };
        let started = tokio::time::Instant::now();
        let mut client = self.client.clone();
        let (reply, result) =
            match tokio::time::timeout(self.timeout, client.handle_message(req)).await {
                Ok(Ok(resp)) => {
                    let r = resp.into_inner();
                    if r.ok {
                        let body = (!r.body.is_empty()).then_some(r.body);
                        (Reply::ok(send.id, body), "ok")
                    } else {
                        let code = if r.code.is_empty() {
                            "rejected".to_string()
                        } else {
                            r.code
                        };
                        (Reply::err(send.id, &code, r.message), "ok")
                    }
                }
                Ok(Err(status)) => {
                    debug!(code = ?status.code(), "business backend error");
                    let result = if status.code() == tonic::Code::Unavailable {
                        "unavailable"
                    } else {
                        "error"
                    };
                    (
                        Reply::err(
                            send.id,
                            "upstream_unavailable",
                            "the backend could not take the message",
                        ),
                        result,
                    )
                }
                Err(_) => (
                    Reply::err(
                        send.id,
                        "upstream_unavailable",
                        "the backend did not answer in time",
                    ),
                    "timeout",
                ),
            };
        metrics::upstream(result, started.elapsed().as_secs_f64());
        reply
    }
}

/// Sends presence changes in batches by size and by time. While the backend is away the
/// changes wait in a bounded buffer; past it the oldest are dropped and counted.
#[derive(Clone)]
pub struct StatusNotifier {
    tx: mpsc::Sender<StatusChange>,
}

pub const STATUS_BATCH: usize = 500;
pub const STATUS_FLUSH: Duration = Duration::from_millis(200);
pub const STATUS_BUFFER: usize = 100_000;

impl StatusNotifier {
    /// Start the sender task; it ends when every notifier is dropped.
    pub fn spawn(channel: Channel) -> StatusNotifier {
        let (tx, rx) = mpsc::channel(STATUS_BUFFER);
        tokio::spawn(run(BusinessClient::new(channel), rx));
        StatusNotifier { tx }
    }

    /// Never waits: a full channel drops the change (counted).
    pub fn notify(&self, change: StatusChange) {
        if self.tx.try_send(change).is_err() {
            metrics::status_change_dropped(1);
        }
    }
}

async fn run(mut client: BusinessClient<Channel>, mut rx: mpsc::Receiver<StatusChange>) {
    let mut pending: VecDeque<StatusChange> = VecDeque::new();
    let mut backoff = Duration::from_millis(100);
    loop {
        // Collect until a batch is full or the flush interval passes.
        let deadline = tokio::time::Instant::now() + STATUS_FLUSH;
        while pending.len() < STATUS_BATCH {
            tokio::select! {
                c = rx.recv() => match c {
                    Some(c) => pending.push_back(c),
                    None if pending.is_empty() => return,
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        if pending.is_empty() {
            continue;
        }
        let n = pending.len().min(STATUS_BATCH);
        let batch = StatusChangeBatch {
            changes: pending.iter().take(n).cloned().collect(),
        };
        match tokio::time::timeout(Duration::from_secs(5), client.on_status_change(batch)).await {
            Ok(Ok(_)) => {
                pending.drain(..n);
                backoff = Duration::from_millis(100);
            }
            _ => {
                warn!(
                    pending = pending.len(),
                    "status changes not delivered; retrying"
                );
                if pending.len() > STATUS_BUFFER {
                    let drop = pending.len() - STATUS_BUFFER;
                    pending.drain(..drop);
                    metrics::status_change_dropped(drop as u64);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Presence change record for a connection.
pub fn change(info: &ConnInfo, instance: &str, online: bool) -> StatusChange {
    StatusChange {
        user_id: info.user.clone(),
        device_id: info.device.clone(),
        platform: info.platform.clone(),
        online,
        instance_id: instance.to_string(),
        transport: info.transport.as_str().to_string(),
        at_ms: crate::now_ms(),
    }
}
