//! The business backend (`upstream.mode = "grpc"`): each client `send` becomes
//! `HandleMessage`, and presence changes go out as `OnStatusChange` batches.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, warn};

use super::pb::business_client::BusinessClient;
use super::pb::{ClientMessage, StatusChange, StatusChangeBatch};
use crate::hub::{ConnInfo, PresenceEvents};
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
            session_id: from.session_id.clone(),
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
/// changes wait in a bounded buffer; past it the oldest are dropped and counted (the newest
/// say where each device is now). The drain flushes what is left before the process exits.
pub struct StatusNotifier {
    shared: Arc<Pending>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// Changes waiting to be sent, shared by every connection and the sender task.
#[derive(Default)]
struct Pending {
    queue: Mutex<Queue>,
    wake: Notify,
    closed: AtomicBool,
}

#[derive(Default)]
struct Queue {
    changes: VecDeque<StatusChange>,
    /// How many were dropped from the front so far: a batch in flight knows how many of
    /// its changes are no longer at the front when it is acknowledged.
    dropped: u64,
}

pub const STATUS_BATCH: usize = 500;
pub const STATUS_FLUSH: Duration = Duration::from_millis(200);
pub const STATUS_BUFFER: usize = 100_000;

impl StatusNotifier {
    /// Start the sender task on `tracker` (the drain's: it flushes with `flush_and_stop`).
    pub fn spawn(channel: Channel, tracker: &TaskTracker) -> StatusNotifier {
        let shared = Arc::new(Pending::default());
        let task = tracker.spawn(run(BusinessClient::new(channel), shared.clone()));
        StatusNotifier {
            shared,
            task: Mutex::new(Some(task)),
        }
    }

    /// Never waits: past `STATUS_BUFFER` the oldest waiting change is dropped (counted).
    pub fn notify(&self, change: StatusChange) {
        let dropped = {
            let mut queue = self.shared.queue.lock();
            queue.changes.push_back(change);
            let over = queue.changes.len() > STATUS_BUFFER && queue.changes.pop_front().is_some();
            queue.dropped += over as u64;
            over
        };
        if dropped {
            metrics::status_change_dropped(1);
        }
        self.shared.wake.notify_one();
    }

    /// Send what is waiting and stop, within `limit` (the end of a drain: the last offline
    /// changes must reach the backend, or those users stay online there).
    pub async fn flush_and_stop(&self, limit: Duration) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
        let task = self.task.lock().take();
        if let Some(task) = task {
            if tokio::time::timeout(limit, task).await.is_err() {
                let left = self.shared.queue.lock().changes.len();
                warn!(left, "status changes not delivered before the exit");
            }
        }
    }
}

impl PresenceEvents for StatusNotifier {
    fn changed(&self, info: &ConnInfo, instance: &str, online: bool) {
        self.notify(change(info, instance, online));
    }
}

async fn run(mut client: BusinessClient<Channel>, shared: Arc<Pending>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        // Wait for a full batch, the flush interval, or the end.
        let deadline = tokio::time::Instant::now() + STATUS_FLUSH;
        loop {
            let closed = shared.closed.load(Ordering::Acquire);
            if closed || shared.queue.lock().changes.len() >= STATUS_BATCH {
                break;
            }
            tokio::select! {
                _ = shared.wake.notified() => {}
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let (batch, dropped_before): (Vec<StatusChange>, u64) = {
            let queue = shared.queue.lock();
            let batch = queue.changes.iter().take(STATUS_BATCH).cloned().collect();
            (batch, queue.dropped)
        };
        if batch.is_empty() {
            if shared.closed.load(Ordering::Acquire) {
                return;
            }
            continue;
        }
        let n = batch.len();
        let request = StatusChangeBatch { changes: batch };
        match tokio::time::timeout(Duration::from_secs(5), client.on_status_change(request)).await {
            Ok(Ok(_)) => {
                // The sent changes still at the front: some may have been dropped as the
                // oldest meanwhile; nothing unsent is removed, nothing sent is sent again.
                let mut queue = shared.queue.lock();
                let gone = (queue.dropped - dropped_before) as usize;
                let sent = n.saturating_sub(gone).min(queue.changes.len());
                queue.changes.drain(..sent);
                backoff = Duration::from_millis(100);
            }
            _ => {
                warn!(
                    pending = shared.queue.lock().changes.len(),
                    "status changes not delivered; retrying"
                );
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
        session_id: info.session_id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review F9: while the backend is away, a full buffer drops the oldest changes (the
    /// newest say where each device is now), and counts them.
    #[tokio::test]
    async fn a_full_buffer_drops_the_oldest() {
        let notifier =
            StatusNotifier::spawn(channel("http://127.0.0.1:9").unwrap(), &TaskTracker::new());
        let change = |i: usize| StatusChange {
            user_id: format!("u{i}"),
            ..Default::default()
        };
        for i in 0..STATUS_BUFFER + 2 {
            notifier.notify(change(i));
        }
        let queue = notifier.shared.queue.lock();
        assert_eq!(queue.changes.len(), STATUS_BUFFER);
        assert_eq!(queue.dropped, 2);
        assert_eq!(queue.changes.front().unwrap().user_id, "u2");
        assert_eq!(
            queue.changes.back().unwrap().user_id,
            format!("u{}", STATUS_BUFFER + 1)
        );
    }
}
