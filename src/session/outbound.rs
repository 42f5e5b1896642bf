//! Frames to the client: queued in one turn of the loop, written with one flush, each write
//! bounded by `limits.write_timeout` and by close requests; the close sequence.

use super::*;

/// How long the final writes (queued frames, `kick`) may take before the socket is dropped.
pub(super) const FINAL_WRITE: Duration = Duration::from_secs(5);

impl<S: Session> Conn<S> {
    pub(super) fn queue(&mut self, frame: ServerFrame) {
        self.out_types.push(frame.type_name());
        self.out.push(self.codec.encode(&frame));
    }

    /// Write everything queued in one batch, bounded (SPEC §9 `limits.write_timeout`): a
    /// client that does not take a write in time is treated as gone.
    pub(super) async fn flush(&mut self) -> Result<(), End> {
        if self.out.is_empty() {
            return Ok(());
        }
        let limit = self.env.limits.write_timeout;
        let written = bounded(limit, self.control.as_deref(), self.session.send(&self.out)).await;
        if let Err(end) = written {
            if matches!(end, End::Kick(..)) {
                // What was not handed to the socket is dropped: a slow consumer is made
                // whole by replay, and a partly written frame completes before the kick.
                self.out.clear();
                self.out_types.clear();
                self.out_pushes.clear();
            }
            return Err(end);
        }
        let t = self.transport.as_str();
        metrics::bytes_sent(t, self.out.iter().map(|b| b.len() as u64).sum());
        for ty in self.out_types.drain(..) {
            metrics::frames_sent(t, ty, 1);
        }
        for accepted in self.out_pushes.drain(..) {
            metrics::push_delivery(accepted.elapsed().as_secs_f64());
        }
        self.out.clear();
        Ok(())
    }

    /// Send the kick when one is due, close, and say which code for metrics.
    pub(super) async fn finish(&mut self, end: End) -> &'static str {
        self.control = None;
        match end {
            End::Kick(code, reason) => {
                self.queue(ServerFrame::Kick {
                    code: code.code(),
                    reason: reason.clone(),
                });
                if let Ok(Ok(())) = tokio::time::timeout(FINAL_WRITE, self.flush()).await {
                    // The close frame is a write too: a client that stopped reading right
                    // after the kick must not hold the connection (and its slots) open.
                    let _ =
                        tokio::time::timeout(FINAL_WRITE, self.session.close(code.code(), &reason))
                            .await;
                }
                code.as_str()
            }
            End::Gone(true) => "1000",
            End::Gone(false) => "1006",
        }
    }
}

/// What `items` weighed in their connection's outbound byte budget.
pub(super) fn queued_bytes(items: &[Arc<PushItem>], codec: Codec) -> usize {
    items.iter().map(|i| i.encoded(codec).len()).sum()
}

/// A write to the client, bounded by `limit` and given up when the connection is asked to
/// close meanwhile (a 4100 from a full queue, a kick, the drain): a write blocked on a client
/// that does not read must hide neither.
pub(super) async fn bounded(
    limit: Duration,
    control: Option<&Control>,
    write: impl std::future::Future<Output = Result<(), SessionError>>,
) -> Result<(), End> {
    let write = tokio::time::timeout(limit, write);
    let written = match control {
        Some(control) => tokio::select! {
            r = write => r,
            (code, reason) = control.requested() => return Err(End::Kick(code, reason)),
        },
        None => write.await,
    };
    match written {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(End::from(e)),
        Err(_) => Err(End::Gone(false)),
    }
}
