//! Forwards one connection's sends to the business backend, off the connection's task.

use super::*;

/// Sends in flight to the business backend per connection; more get `upstream_unavailable`.
const SENDS_IN_FLIGHT: usize = 32;

/// Forwards one connection's sends to the business backend in order, off the connection's
/// task, and hands the replies back.
pub(super) struct UpstreamWorker {
    pub(super) sends: mpsc::Sender<crate::protocol::SendFrame>,
    pub(super) replies: mpsc::Receiver<Reply>,
}

impl UpstreamWorker {
    pub(super) fn spawn(env: &Arc<SessionEnv>, sender: &Arc<ConnInfo>) -> UpstreamWorker {
        let (sends, mut rx) = mpsc::channel(SENDS_IN_FLIGHT);
        let (tx, replies) = mpsc::channel(SENDS_IN_FLIGHT);
        let tracker = env.lifecycle.sessions.clone();
        let (env, sender) = (env.clone(), sender.clone());
        // Ends with its connection (review F12): the sends still queued are dropped and the
        // one in flight is cancelled, rather than forwarded for a client that is gone (which
        // would retry them on its next connection) with no bound on such orphans.
        tracker.spawn(async move {
            loop {
                let send = tokio::select! {
                    s = rx.recv() => match s {
                        Some(s) => s,
                        None => return,
                    },
                    _ = tx.closed() => return,
                };
                let reply = tokio::select! {
                    r = env.services.upstream.handle(&sender, send) => r,
                    _ = tx.closed() => return,
                };
                if tx.send(reply).await.is_err() {
                    return;
                }
            }
        });
        UpstreamWorker { sends, replies }
    }
}

/// The next reply from the upstream worker; pending forever when there is none.
pub(super) async fn next_reply(worker: &mut Option<UpstreamWorker>) -> Option<Reply> {
    match worker {
        Some(w) => w.replies.recv().await,
        None => std::future::pending().await,
    }
}
