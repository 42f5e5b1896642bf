//! Authentication of a connection: the token at the handshake or in the `auth` frame, the
//! refresh of a live session (`auth` again, SPEC §2), and the token-expiry timer.

use super::*;

/// How long a connection waits after a refused refresh before its next one is checked.
pub(super) const REAUTH_BACKOFF: Duration = Duration::from_secs(10);

impl<S: Session> Conn<S> {
    pub(super) async fn authenticate(
        &mut self,
        adm: &mut Admission,
    ) -> Result<(Identity, Option<String>), End> {
        if let Some(result) = adm.handshake_auth.take() {
            return result.map(|id| (id, None)).map_err(auth_end);
        }
        let deadline = Instant::now() + self.env.auth_timeout;
        loop {
            // Pongs to a client that does not read must not hold its unauthenticated slot
            // past the auth deadline (review F19).
            match tokio::time::timeout_at(deadline, self.flush()).await {
                Ok(r) => r?,
                Err(_) => return Err(End::Gone(false)),
            }
            let inbound = tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(End::Kick(CloseCode::Timeout, "no auth frame in time".into()));
                }
                _ = self.env.lifecycle.shutdown.cancelled() => return Err(End::kick(CloseCode::Draining)),
                r = self.session.recv() => r?,
            };
            let Some(data) = self.inbound_frame(inbound)? else {
                continue;
            };
            let decoded = self.codec.decode(&data);
            if !self.within_rate(&decoded)? {
                continue;
            }
            match decoded {
                Ok(ClientFrame::Auth { token, since }) => {
                    self.count_received("auth");
                    let id = self
                        .env
                        .services
                        .auth
                        .authenticate(&token)
                        .await
                        .map_err(auth_end)?;
                    return Ok((id, since));
                }
                Ok(ClientFrame::Ping { id }) => {
                    self.count_received("ping");
                    self.queue(ServerFrame::Pong {
                        id,
                        ts: crate::now_ms(),
                    });
                }
                Ok(_) | Err(DecodeError::UnknownType { .. }) | Err(DecodeError::BadSend { .. }) => {
                    return Err(End::Kick(
                        CloseCode::Unauthorized,
                        "authenticate first".into(),
                    ));
                }
                Err(DecodeError::Malformed(m)) => {
                    return Err(End::Kick(CloseCode::ProtocolError, m))
                }
            }
        }
    }

    /// Refresh in place: same user, new expiry. A failure is reported and the session lives
    /// on until the old token expires.
    pub(super) async fn reauth(&mut self, token: &str, identity: &Identity) {
        if self.reauth_after.is_some_and(|t| Instant::now() < t) {
            self.queue(ServerFrame::Error {
                code: "reauth_failed".into(),
                message: "a refresh was refused less than 10 s ago: retry later".into(),
                id: None,
            });
            return;
        }
        let checked = self.env.services.auth.authenticate(token).await;
        if !matches!(&checked, Ok(new) if new.user == identity.user) {
            self.reauth_after = Some(Instant::now() + REAUTH_BACKOFF);
        }
        match checked {
            Ok(new) if new.user == identity.user => {
                self.arm_expiry(self.env.services.auth.session_deadline_ms(&new));
                self.queue(ServerFrame::Reauth {
                    token_expires_at_ms: new.expires_at_ms,
                });
            }
            Ok(_) => self.queue(ServerFrame::Error {
                code: "reauth_failed".into(),
                message: "the new token is for another user".into(),
                id: None,
            }),
            Err(e) => self.queue(ServerFrame::Error {
                code: "reauth_failed".into(),
                message: e.to_string(),
                id: None,
            }),
        }
    }

    pub(super) fn arm_expiry(&mut self, expires_at_ms: i64) {
        let left = (expires_at_ms - crate::now_ms()).max(0) as u64;
        self.expiry
            .as_mut()
            .reset(Instant::now() + Duration::from_millis(left));
    }
}

pub(super) fn auth_end(e: AuthError) -> End {
    End::Kick(e.close_code(), e.to_string())
}
