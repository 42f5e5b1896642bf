//! WebTransport sessions (HTTP/3 over QUIC, wtransport): the UDP listener, the session
//! handshake and the control stream of SPEC §3.
//!
//! A session carries one client-opened bidirectional stream, the control stream, on which
//! every frame travels as a 4-byte big-endian length and the encoded frame. Streams beyond it
//! are stopped and counted; a datagram holds one `ping`, answered with a `pong` datagram here,
//! below the core (datagrams do not count for liveness, SPEC §3).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;
use wtransport::endpoint::endpoint_side::Server;
use wtransport::endpoint::IncomingSession;
use wtransport::quinn;
use wtransport::{Connection, Endpoint, RecvStream, SendStream, VarInt};

use super::admission::{self, Refusal};
use super::edge::Edge;
use super::framing::{take_frame, PREFIX};
use super::{Inbound, Session, SessionError, Transport};
use crate::config::Config;
use crate::limits::{Handshaking, IpSlot};
use crate::ops::metrics;
use crate::protocol::{ClientFrame, Codec, ServerFrame};
use crate::session::rate::{RateLimiter, Verdict};
use crate::session::{self, Admission};
use crate::tls::CertStore;

/// The path WebTransport sessions are served on.
pub const PATH: &str = "/wt";
/// The length prefix of a control-stream frame.
/// How long a close waits for the client to close the session after `kick`.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// The stream error code used when refusing extra streams.
const STREAM_REFUSED: u32 = 0;

/// The QUIC endpoint config: TLS 1.3 with the certificate store's current identity (so a
/// rotation applies to new sessions without touching open ones), and transport limits from
/// `[quic]` and `[sessions]`.
pub fn server_config(cfg: &Config, certs: &Arc<CertStore>) -> anyhow::Result<quinn::ServerConfig> {
    crate::tls::install_crypto_provider();
    let mut tls = rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_no_client_auth()
        .with_cert_resolver(certs.clone());
    tls.alpn_protocols = vec![wtransport::tls::WEBTRANSPORT_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;

    let q = &cfg.quic;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(q.max_streams.into())
        // HTTP/3 needs three unidirectional streams of the client's (control, QPACK encoder
        // and decoder); WebTransport ones beyond are refused like extra bidirectional streams.
        .max_concurrent_uni_streams(4u32.into())
        .stream_receive_window(q.stream_window.into())
        .receive_window(q.receive_window.into())
        .send_window(q.send_window)
        .datagram_receive_buffer_size(Some(q.datagram_buffer))
        .datagram_send_buffer_size(q.datagram_buffer)
        .keep_alive_interval(Some(cfg.sessions.heartbeat))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(cfg.sessions.idle_timeout)
                .map_err(|_| anyhow::anyhow!("sessions.idle_timeout is too long for QUIC"))?,
        ));
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport));
    Ok(server)
}

/// Bind the WebTransport endpoint on `addr`.
pub fn bind(
    cfg: &Config,
    certs: &Arc<CertStore>,
    addr: SocketAddr,
) -> anyhow::Result<Endpoint<Server>> {
    let config = wtransport::ServerConfig::builder()
        .with_bind_address(addr)
        .build_with_quic_config(server_config(cfg, certs)?);
    Ok(Endpoint::server(config)?)
}

/// Accept sessions until `stop` (after the drain). Each gets its own task at once, so a slow
/// handshake never holds up the accept loop. While draining, new sessions are refused and the
/// endpoint stays up for the sessions being drained (closing it would cut them off).
pub async fn serve(edge: Arc<Edge>, endpoint: Endpoint<Server>, stop: CancellationToken) {
    loop {
        let incoming = tokio::select! {
            _ = stop.cancelled() => break,
            i = endpoint.accept() => i,
        };
        if edge.lifecycle.is_draining() {
            metrics::rejected("draining");
            incoming.refuse();
            continue;
        }
        if let Some((incoming, slot, handshaking)) = count(&edge, incoming) {
            let edge2 = edge.clone();
            edge.lifecycle
                .sessions
                .spawn(handshake(edge2, incoming, slot, handshaking));
        }
    }
    endpoint.close(VarInt::from_u32(0), b"shutdown");
    // Let the close reach the clients still connected (a shutdown timeout) before exiting.
    let _ = tokio::time::timeout(CLOSE_WAIT, endpoint.wait_idle()).await;
}

/// The limits a QUIC connection meets before a task or a TLS handshake is spent on it (SPEC
/// §9): the cap on handshakes in flight, address validation (a Retry) under load, the per-IP
/// count. Refused ones get a QUIC refusal.
fn count(
    edge: &Arc<Edge>,
    incoming: IncomingSession,
) -> Option<(IncomingSession, IpSlot, Handshaking)> {
    let Ok(handshaking) = edge.limits.begin_handshake() else {
        metrics::rejected("handshake_limit");
        incoming.refuse();
        return None;
    };
    if !incoming.remote_address_validated() && edge.limits.under_load() {
        // The client comes back with a token proving it owns its address: a spoofed
        // flood costs one stateless packet each, not a TLS handshake.
        metrics::rejected("quic_retry");
        incoming.retry();
        return None;
    }
    match edge.limits.take_ip(incoming.remote_address().ip()) {
        Ok(slot) => Some((incoming, slot, handshaking)),
        Err(r) => {
            metrics::rejected(r.reason());
            incoming.refuse();
            None
        }
    }
}

/// One session from its first packet to its end. The handshake runs boxed and is freed once
/// done, so an open session's task holds only the session.
async fn handshake(
    edge: Arc<Edge>,
    incoming: IncomingSession,
    slot: IpSlot,
    handshaking: Handshaking,
) {
    if let Some((session, adm)) = Box::pin(establish(&edge, incoming, slot, handshaking)).await {
        session::run(edge.session_env.clone(), session, adm).await;
    }
}

/// QUIC and TLS, the session request and its checks (all within `limits.handshake_timeout`),
/// then the control stream.
async fn establish(
    edge: &Arc<Edge>,
    incoming: IncomingSession,
    slot: IpSlot,
    handshaking: Handshaking,
) -> Option<(WtSession, Admission)> {
    let peer = incoming.remote_address();
    let limit = edge.cfg.limits.handshake_timeout;
    let deadline = tokio::time::Instant::now() + limit;
    let request = match tokio::time::timeout_at(deadline, incoming).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            debug!(error = %e, %peer, "WebTransport handshake failed");
            return None;
        }
        Err(_) => {
            metrics::rejected("handshake_timeout");
            return None;
        }
    };
    let (path, query) = match request.path().split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (request.path(), None),
    };
    let headers = header_map(request.headers());
    let admitted = if path != PATH {
        metrics::rejected("not_found");
        Err(Answer::NotFound)
    } else {
        let mut slot = Some(slot);
        let ask = admission::Request {
            headers: &headers,
            origin: request.origin(),
            query,
            peer,
            slot: &mut slot,
        };
        edge.admit(ask).await.map_err(|refusal| {
            metrics::rejected(refusal.reason());
            answer(&refusal)
        })
    };
    let adm = match admitted {
        Ok(adm) => adm,
        Err(answer) => {
            // The answer is bounded too: a client that never reads it costs a timer.
            let answer = async {
                match answer {
                    Answer::NotFound => request.not_found().await,
                    Answer::Forbidden => request.forbidden().await,
                    Answer::TooMany => request.too_many_requests().await,
                }
            };
            let _ = tokio::time::timeout(limit, answer).await;
            return None;
        }
    };
    let conn = match tokio::time::timeout_at(deadline, request.accept()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            debug!(error = %e, "WebTransport session not established");
            return None;
        }
        Err(_) => {
            metrics::rejected("handshake_timeout");
            return None;
        }
    };
    drop(handshaking);
    // The control stream: the client's first bidirectional stream, announced by its first
    // write (SPEC §3). A session that never opens one is closed with 4102.
    let opened = tokio::select! {
        _ = edge.lifecycle.shutdown.cancelled() => Err(crate::protocol::codes::CloseCode::Draining),
        r = tokio::time::timeout(edge.cfg.auth.auth_timeout, conn.accept_bi()) => match r {
            Ok(Ok(streams)) => Ok(streams),
            Ok(Err(e)) => {
                debug!(error = %e, "WebTransport session ended before its control stream");
                return None;
            }
            Err(_) => {
                metrics::rejected("no_control_stream");
                Err(crate::protocol::codes::CloseCode::Timeout)
            }
        },
    };
    match opened {
        Ok((send, recv)) => {
            let session = WtSession::new(conn, send, recv, &edge.cfg, adm.params.codec);
            Some((session, adm))
        }
        Err(code) => {
            conn.close(VarInt::from_u32(code.code().into()), b"no control stream");
            let _ = tokio::time::timeout(CLOSE_WAIT, conn.closed()).await;
            None
        }
    }
}

/// WebTransport's answer to a refused request: wtransport can say only 403, 404 or 429.
enum Answer {
    Forbidden,
    NotFound,
    TooMany,
}

fn answer(refusal: &Refusal) -> Answer {
    match refusal {
        Refusal::Draining | Refusal::Limit(_) => Answer::TooMany,
        Refusal::BadRequest(m) => {
            debug!(error = %m, "bad WebTransport request");
            Answer::Forbidden
        }
        // No 401 here: a refused token is a 403.
        Refusal::Origin | Refusal::BadAuthorization | Refusal::Unauthorized => Answer::Forbidden,
    }
}

/// wtransport hands headers over as strings; the handshake parser reads an `http` map.
/// Pseudo-headers (`:path`, …) are not valid names and are left out.
fn header_map(headers: &std::collections::HashMap<String, String>) -> HeaderMap {
    headers
        .iter()
        .filter_map(|(k, v)| {
            Some((
                HeaderName::from_bytes(k.as_bytes()).ok()?,
                HeaderValue::from_str(v).ok()?,
            ))
        })
        .collect()
}

pub struct WtSession {
    conn: Connection,
    send: SendStream,
    recv: RecvStream,
    /// Control-stream bytes read but not yet a whole frame.
    buf: BytesMut,
    /// Bytes of an earlier `send` not yet taken by quinn: that send was cancelled (a close
    /// request while the client did not read). They go out first, so no frame is ever cut.
    pending: Vec<Bytes>,
    max_frame: usize,
    codec: Codec,
    /// Datagram pings answered per second (the inbound frame rate).
    datagrams: RateLimiter,
}

impl WtSession {
    pub fn new(
        conn: Connection,
        send: SendStream,
        recv: RecvStream,
        cfg: &Config,
        codec: Codec,
    ) -> WtSession {
        WtSession {
            conn,
            send,
            recv,
            buf: BytesMut::new(),
            pending: Vec::new(),
            max_frame: cfg.limits.max_frame,
            codec,
            datagrams: RateLimiter::new(
                cfg.limits.rate_per_sec,
                cfg.limits.rate_burst,
                Duration::MAX,
                Instant::now(),
            ),
        }
    }

    /// Answer a `ping` datagram with a `pong` datagram.
    fn datagram(&mut self, payload: &[u8]) {
        metrics::wt_datagram("in");
        if self.datagrams.check(Instant::now()) != Verdict::Allow {
            metrics::wt_datagram_dropped("rate");
            return;
        }
        let id = match self.codec.decode(payload) {
            Ok(ClientFrame::Ping { id }) => id,
            _ => {
                metrics::wt_datagram_dropped("invalid");
                return;
            }
        };
        let pong = self.codec.encode(&ServerFrame::Pong {
            id,
            ts: crate::now_ms(),
        });
        if self.conn.send_datagram(pong).is_ok() {
            metrics::wt_datagram("out");
        }
    }
}

fn write_err(e: quinn::WriteError) -> SessionError {
    SessionError::lost(e)
}

impl Session for WtSession {
    fn transport(&self) -> Transport {
        Transport::Wt
    }

    async fn recv(&mut self) -> Result<Option<Inbound>, SessionError> {
        loop {
            if let Some(frame) = take_frame(&mut self.buf, self.max_frame)? {
                return Ok(Some(Inbound::Frame(frame)));
            }
            // Every branch is cancel-safe: a chunk, stream or datagram not yet returned
            // stays queued in quinn or wtransport.
            tokio::select! {
                chunk = self.recv.quic_stream_mut().read_chunk(usize::MAX, true) => match chunk {
                    Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk.bytes),
                    Ok(None) if self.buf.is_empty() => return Ok(None),
                    Ok(None) => {
                        return Err(SessionError::Protocol("control stream ended inside a frame".into()))
                    }
                    Err(quinn::ReadError::ConnectionLost(_)) => return Ok(None),
                    Err(e) => return Err(SessionError::lost(e)),
                },
                streams = self.conn.accept_bi() => match streams {
                    Ok((mut send, recv)) => {
                        metrics::wt_stream_refused();
                        let _ = send.reset(VarInt::from_u32(STREAM_REFUSED));
                        recv.stop(VarInt::from_u32(STREAM_REFUSED));
                    }
                    Err(_) => return Ok(None),
                },
                stream = self.conn.accept_uni() => match stream {
                    Ok(recv) => {
                        metrics::wt_stream_refused();
                        recv.stop(VarInt::from_u32(STREAM_REFUSED));
                    }
                    Err(_) => return Ok(None),
                },
                datagram = self.conn.receive_datagram() => match datagram {
                    Ok(d) => self.datagram(d.payload().as_ref()),
                    Err(_) => return Ok(None),
                },
            }
        }
    }

    async fn send(&mut self, frames: &[Bytes]) -> Result<(), SessionError> {
        let len: usize = frames.iter().map(|f| PREFIX + f.len()).sum();
        let mut out = BytesMut::with_capacity(len);
        for f in frames {
            out.put_u32(f.len() as u32);
            out.extend_from_slice(f);
        }
        self.pending.push(out.freeze());
        // Handed to quinn without another copy. `write_chunks` is cancel-safe and leaves what
        // it did not take in `pending`.
        while !self.pending.is_empty() {
            let written = self
                .send
                .quic_stream_mut()
                .write_chunks(&mut self.pending)
                .await
                .map_err(write_err)?;
            self.pending.drain(..written.chunks);
        }
        self.pending = Vec::new();
        Ok(())
    }

    /// QUIC keeps the path alive itself (`keep_alive_interval`).
    async fn ping(&mut self) -> Result<(), SessionError> {
        Ok(())
    }

    async fn close(&mut self, code: u16, reason: &str) {
        // SPEC §4: `kick` was written; finish the control stream, give the client up to a
        // second to close the session itself, then close with the code.
        let _ = self.send.quic_stream_mut().finish();
        let _ = tokio::time::timeout(CLOSE_WAIT, self.conn.closed()).await;
        self.conn
            .close(VarInt::from_u32(code.into()), reason.as_bytes());
    }
}
