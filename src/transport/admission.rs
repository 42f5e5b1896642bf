//! The one admission step every transport runs once its handshake has the request in hand:
//! draining → origin → client address → token extraction → limits → authentication.
//! It answers with a typed [`Refusal`]; each transport maps that onto its own wire answer
//! (an HTTP status for WebSocket; 403, 404 or 429 for WebTransport, which can say no more).

use std::net::SocketAddr;

use http::HeaderMap;

use super::edge::Edge;
use crate::auth::handshake::{self, HandshakeError, TokenSource};
use crate::limits::{IpSlot, Rejection};
use crate::session::Admission;

/// What a transport knows of a client's request when it asks to be admitted.
pub struct Request<'a> {
    pub headers: &'a HeaderMap,
    pub origin: Option<&'a str>,
    pub query: Option<&'a str>,
    /// The address the connection came from (a trusted proxy's, or the client's).
    pub peer: SocketAddr,
    /// The per-IP slot taken at accept, if the transport took one. Taken from here only
    /// at the limits step: a request refused before it leaves the slot with its connection.
    pub slot: &'a mut Option<IpSlot>,
}

/// Why a request is not admitted.
#[derive(Debug)]
pub enum Refusal {
    Draining,
    Origin,
    /// An `Authorization` header that is not `Bearer <token>`.
    BadAuthorization,
    /// Bad handshake parameters, with the message for the client.
    BadRequest(String),
    /// Over a node, per-IP or unauthenticated-session limit.
    Limit(Rejection),
    /// A token in the `Authorization` header was refused (a client that can read the answer).
    Unauthorized,
}

impl Refusal {
    /// The `reason` label of `imgate_connections_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Draining => "draining",
            Refusal::Origin => "origin",
            Refusal::BadAuthorization | Refusal::Unauthorized => "unauthorized",
            Refusal::BadRequest(_) => "bad_request",
            Refusal::Limit(r) => r.reason(),
        }
    }
}

impl Edge {
    /// The first check, which a transport may run before its own protocol checks.
    pub fn check_open(&self) -> Result<(), Refusal> {
        if self.lifecycle.is_draining() {
            return Err(Refusal::Draining);
        }
        Ok(())
    }

    /// Admit a session request, or say why not. A token in the handshake is checked here;
    /// one sent later in an `auth` frame is the session's to check.
    pub async fn admit(&self, req: Request<'_>) -> Result<Admission, Refusal> {
        self.check_open()?;
        if !self.origins.allows(req.origin) {
            return Err(Refusal::Origin);
        }
        let ip = handshake::client_ip(req.peer.ip(), req.headers, &self.trusted);
        let mut params = handshake::parse(req.headers, req.query).map_err(|e| match e {
            HandshakeError::BadAuthorization => Refusal::BadAuthorization,
            HandshakeError::BadRequest(m) => Refusal::BadRequest(m),
        })?;
        let token = params.token.take();
        let permits = self
            .limits
            .admit(ip, req.slot.take(), token.is_none())
            .map_err(Refusal::Limit)?;
        let handshake_auth = match token {
            None => None,
            Some((token, source)) => {
                let result = self.auth.authenticate(&token).await;
                // Clients that can read a refused handshake (a header token) are told so;
                // browsers cannot, so a subprotocol or query token is refused with `kick`
                // once the session is open.
                if source == TokenSource::Header && result.is_err() {
                    return Err(Refusal::Unauthorized);
                }
                Some(result)
            }
        };
        Ok(Admission {
            params,
            ip,
            handshake_auth,
            permits,
        })
    }
}
