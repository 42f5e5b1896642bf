//! Frames from the client: size and rate limits, decoding, and what each frame does; the
//! heartbeat that notices a silent client.

use super::*;

impl<S: Session> Conn<S> {
    /// Liveness, size/kind checks and the rate limit; the frame bytes when there is one to decode.
    pub(super) fn inbound_frame(&mut self, inbound: Option<Inbound>) -> Result<Option<Bytes>, End> {
        let now = Instant::now();
        self.last_inbound = now;
        let t = self.transport.as_str();
        let data = match inbound {
            None => return Err(End::Gone(true)),
            Some(Inbound::Alive) => {
                // WebSocket control frames count against the rate too (review F19): the
                // WebSocket layer answers a ping by itself, so a flood of them is closed once
                // it is sustained, like any other.
                if matches!(self.rate.check(now), Verdict::Close) {
                    return Err(End::kick(CloseCode::RateLimited));
                }
                return Ok(None);
            }
            Some(Inbound::Text(d)) if self.codec == Codec::Json => d,
            Some(Inbound::Binary(d)) if self.codec == Codec::Proto => d,
            Some(Inbound::Frame(d)) => d,
            Some(_) => {
                return Err(End::Kick(
                    CloseCode::ProtocolError,
                    format!(
                        "the {} codec takes {} messages",
                        self.codec.as_str(),
                        match self.codec {
                            Codec::Json => "text",
                            Codec::Proto => "binary",
                        }
                    ),
                ))
            }
        };
        metrics::bytes_received(t, data.len() as u64);
        Ok(Some(data))
    }

    /// The inbound rate limit (SPEC §3): whether to handle this frame. The one `error`
    /// sent per window carries the id of the frame that went over, when it had one.
    pub(super) fn within_rate(
        &mut self,
        frame: &Result<ClientFrame, DecodeError>,
    ) -> Result<bool, End> {
        let t = self.transport.as_str();
        match self.rate.check(Instant::now()) {
            Verdict::Allow => Ok(true),
            Verdict::Warn => {
                metrics::rate_limited(t);
                self.queue(ServerFrame::Error {
                    code: "rate_limited".into(),
                    message: format!(
                        "more than {} frames per second",
                        self.env.limits.rate_per_sec
                    ),
                    id: frame_id(frame),
                });
                Ok(false)
            }
            Verdict::Drop => {
                metrics::frame_dropped(t, "rate_limited");
                Ok(false)
            }
            Verdict::Close => Err(End::kick(CloseCode::RateLimited)),
        }
    }

    pub(super) async fn on_inbound(
        &mut self,
        inbound: Option<Inbound>,
        sync: &mut InboxProgress,
        info: &Arc<ConnInfo>,
        identity: &Identity,
    ) -> Result<(), End> {
        let Some(data) = self.inbound_frame(inbound)? else {
            return Ok(());
        };
        let decoded = self.codec.decode(&data);
        // An ack that moves this device forward is never rate limited: dropping one would
        // stall a replay paced by acks. Everything else counts.
        let useful_ack = matches!(&decoded, Ok(ClientFrame::Ack { seq, .. }) if *seq > sync.acked && *seq <= sync.last_sent);
        if !useful_ack && !self.within_rate(&decoded)? {
            return Ok(());
        }
        let frame = match decoded {
            Ok(f) => f,
            Err(DecodeError::Malformed(m)) => return Err(End::Kick(CloseCode::ProtocolError, m)),
            Err(DecodeError::UnknownType { ty, id }) => {
                self.count_received("unknown");
                self.queue(ServerFrame::Error {
                    code: "unknown_type".into(),
                    message: format!("unknown frame type {ty:?}"),
                    id,
                });
                return Ok(());
            }
            Err(DecodeError::BadSend { id, message }) => {
                self.count_received("send");
                self.queue(ServerFrame::Reply(Reply::err(id, "bad_request", message)));
                return Ok(());
            }
        };
        self.count_received(frame.type_name());
        match frame {
            ClientFrame::Ping { id } => self.queue(ServerFrame::Pong {
                id,
                ts: crate::now_ms(),
            }),
            ClientFrame::Send(send) => match &self.env.services.upstream {
                Upstream::Relay(_) => {
                    let reply = Box::pin(self.env.services.upstream.handle(info, send)).await;
                    self.queue(ServerFrame::Reply(reply));
                }
                Upstream::Grpc(_) => {
                    let env = &self.env;
                    let worker = self
                        .upstream
                        .get_or_insert_with(|| UpstreamWorker::spawn(env, info));
                    if let Err(e) = worker.sends.try_send(send) {
                        let id = match e {
                            mpsc::error::TrySendError::Full(s)
                            | mpsc::error::TrySendError::Closed(s) => s.id,
                        };
                        let reply = Reply::err(
                            id,
                            "upstream_unavailable",
                            "too many sends waiting for the backend",
                        );
                        self.queue(ServerFrame::Reply(reply));
                    }
                }
            },
            ClientFrame::Ack { seq, epoch } => {
                if epoch == sync.epoch && seq > sync.acked {
                    // A device cannot hold what it was not sent: an ack beyond it would
                    // skip those entries at its next resume.
                    sync.acked = seq.min(sync.last_sent);
                    let device = sync.keeps_cursor.then_some(info.device.as_str());
                    if let Err(e) = self
                        .env
                        .services
                        .state
                        .ack(&info.user, device, &epoch, sync.acked)
                        .await
                    {
                        debug!(error = %e.chain(), "ack not recorded");
                    }
                    if sync.awaiting_ack.is_some_and(|upto| seq >= upto) {
                        Box::pin(self.replay_next(sync, info)).await?;
                    }
                }
            }
            ClientFrame::Auth { token, .. } => Box::pin(self.reauth(&token, identity)).await,
        }
        Ok(())
    }

    pub(super) async fn on_heartbeat(&mut self) -> Result<(), End> {
        if self.last_inbound.elapsed() >= self.env.sessions.idle_timeout {
            return Err(End::Kick(
                CloseCode::Timeout,
                "no traffic from the client".into(),
            ));
        }
        let limit = self.env.limits.write_timeout;
        bounded(limit, self.control.as_deref(), self.session.ping()).await
    }

    pub(super) fn count_received(&self, ty: &'static str) {
        metrics::frame_received(self.transport.as_str(), ty);
    }
}

/// The client's `id` of a frame, when it has one, for an `error` about that frame.
pub(super) fn frame_id(frame: &Result<ClientFrame, DecodeError>) -> Option<String> {
    match frame {
        Ok(ClientFrame::Ping { id }) => id.clone(),
        Ok(ClientFrame::Send(s)) => Some(s.id.clone()),
        Err(DecodeError::UnknownType { id, .. }) => id.clone(),
        Err(DecodeError::BadSend { id, .. }) => Some(id.clone()),
        Ok(ClientFrame::Auth { .. } | ClientFrame::Ack { .. }) | Err(DecodeError::Malformed(_)) => {
            None
        }
    }
    .filter(|id| !id.is_empty())
}
