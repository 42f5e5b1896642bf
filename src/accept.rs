//! The accept loop every TCP listener runs (the public HTTP(S) listener and the ops
//! listener; tonic runs the gRPC one). A failed accept (out of file descriptors and the
//! like) is counted and backed off, never spun on; each connection is handed over at once,
//! so a slow one never holds up the next.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::ops::metrics;

const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Accept until `stop`, handing each connection to `on_conn`. `listener` names the
/// listener in `imgate_accept_errors_total`.
pub async fn serve<F>(
    listener: TcpListener,
    name: &'static str,
    stop: CancellationToken,
    mut on_conn: F,
) where
    F: FnMut(TcpStream, SocketAddr),
{
    let mut backoff = FIRST_BACKOFF;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = FIRST_BACKOFF;
                on_conn(stream, peer);
            }
            Err(e) => {
                metrics::accept_failed(name);
                debug!(listener = name, error = %e, "accept failed");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
