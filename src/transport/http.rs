//! The public HTTP(S) listener: `GET /ws` (WebSocket upgrade), `GET /cert-hash`,
//! `GET /dev/token` (dev profile), `GET /`. Each TCP connection is counted at accept (per IP,
//! and among connections in their handshake), then gets its own task, so a slow handshake
//! never blocks the accept loop; everything before the upgrade must complete within
//! `limits.handshake_timeout`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tracing::debug;

use super::admission::{self, Refusal};
use super::edge::Edge;
use crate::auth::handshake;
use crate::config::Profile;
use crate::http_util::respond;
use crate::limits::{Handshaking, IpSlot, Rejection};
use crate::ops::metrics;
use crate::protocol::Codec;
use crate::session;
use crate::transport::ws::WsSession;
use crate::transport::Transport;

type Body = Full<Bytes>;

/// Accept connections until the drain begins.
pub async fn serve(
    edge: Arc<Edge>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    transport: Transport,
) {
    let name = transport.as_str();
    let stop = edge.lifecycle.shutdown.clone();
    crate::accept::serve(listener, name, stop, |stream, peer| {
        let Some(admitted) = accept(&edge, stream, peer, tls.is_some()) else {
            return;
        };
        let conn_edge = edge.clone();
        let tls = tls.clone();
        // Tracked with the background services; bounded by the handshake timeout.
        edge.lifecycle.spawn_background(async move {
            let edge = conn_edge;
            let deadline = tokio::time::Instant::now() + edge.cfg.limits.handshake_timeout;
            let conn = handshake(edge, admitted, tls, transport);
            if tokio::time::timeout_at(deadline, conn).await.is_err() {
                metrics::rejected("handshake_timeout");
            }
        });
    })
    .await;
}

/// A connection accepted and counted, in its handshake.
struct Accepted {
    stream: TcpStream,
    peer: SocketAddr,
    /// The per-IP slot, taken at accept unless a trusted proxy speaks for the client.
    slot: Option<IpSlot>,
    _handshaking: Handshaking,
}

/// The limits a connection meets before anything is read from it (SPEC §9): the cap on
/// connections in their handshake, then the per-IP count. Over the per-IP limit, a plain
/// HTTP client is told 429 (one small write, never waited on); a TLS client is dropped, since
/// answering would cost the TLS handshake the limit is there to spare.
fn accept(edge: &Arc<Edge>, stream: TcpStream, peer: SocketAddr, tls: bool) -> Option<Accepted> {
    let handshaking = match edge.limits.begin_handshake() {
        Ok(h) => h,
        Err(r) => {
            metrics::rejected(r.reason());
            return None;
        }
    };
    // A trusted proxy carries many clients: each is counted once its PROXY header or its
    // X-Forwarded-For names it.
    let slot = if edge.trusted.contains(peer.ip()) {
        None
    } else {
        match edge.limits.take_ip(peer.ip()) {
            Ok(slot) => Some(slot),
            Err(r) => {
                metrics::rejected(r.reason());
                if !tls {
                    let _ = stream.try_write(TOO_MANY);
                }
                return None;
            }
        }
    };
    let _ = stream.set_nodelay(true);
    Some(Accepted {
        stream,
        peer,
        slot,
        _handshaking: handshaking,
    })
}

const TOO_MANY: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 21\r\nconnection: close\r\n\r\ntoo many connections\n";

/// PROXY header, TLS, then HTTP until the upgrade; the caller bounds all of it.
async fn handshake(
    edge: Arc<Edge>,
    mut conn: Accepted,
    tls: Option<TlsAcceptor>,
    transport: Transport,
) {
    if edge.cfg.net.proxy_protocol && conn.slot.is_none() {
        match super::proxy::read_header(&mut conn.stream).await {
            Ok(Some(client)) => conn.peer = client,
            Ok(None) => {}
            Err(e) => {
                debug!(error = %e, "refused a connection from a trusted proxy");
                metrics::rejected("bad_request");
                return;
            }
        }
        match edge.limits.take_ip(conn.peer.ip()) {
            Ok(slot) => conn.slot = Some(slot),
            Err(r) => {
                metrics::rejected(r.reason());
                if tls.is_none() {
                    let _ = conn.stream.write_all(TOO_MANY).await;
                }
                return;
            }
        }
    }
    let Accepted {
        stream,
        peer,
        slot,
        _handshaking,
    } = conn;
    let slot = Arc::new(Mutex::new(slot));
    match tls {
        None => serve_conn(edge, stream, peer, slot, transport).await,
        Some(acceptor) => match acceptor.accept(stream).await {
            Ok(tls_stream) => serve_conn(edge, tls_stream, peer, slot, transport).await,
            Err(e) => debug!(error = %e, "TLS handshake failed"),
        },
    }
}

/// The per-IP slot of a connection, handed to the session its upgrade starts.
type HeldSlot = Arc<Mutex<Option<IpSlot>>>;

async fn serve_conn<I>(
    edge: Arc<Edge>,
    io: I,
    peer: SocketAddr,
    slot: HeldSlot,
    transport: Transport,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limit = edge.cfg.limits.handshake_timeout;
    let svc = service_fn(move |req| {
        let edge = edge.clone();
        let slot = slot.clone();
        async move { Ok::<_, Infallible>(route(edge, req, peer, slot, transport).await) }
    });
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limit)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades()
        .await;
    if let Err(e) = result {
        if e.is_timeout() {
            metrics::rejected("handshake_timeout");
        } else {
            debug!(error = %e, "http connection error");
        }
    }
}

async fn route(
    edge: Arc<Edge>,
    req: Request<Incoming>,
    peer: SocketAddr,
    slot: HeldSlot,
    transport: Transport,
) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET here\n");
    }
    match req.uri().path() {
        "/ws" => upgrade(edge, req, peer, slot, transport).await,
        "/cert-hash" => match &edge.certs {
            Some(certs) => json(StatusCode::OK, certs.cert_hash_json().to_string()),
            None => plain(StatusCode::NOT_FOUND, "no certificate is served\n"),
        },
        "/dev/token" if edge.cfg.profile == Profile::Dev => {
            // Dev tokens are for the developer's own machine (SPEC §9): a dev instance
            // reachable from elsewhere must not hand out tokens for any user.
            let ip = handshake::client_ip(peer.ip(), req.headers(), &edge.trusted);
            if ip.to_canonical().is_loopback() {
                dev_token(&edge, &req)
            } else {
                plain(
                    StatusCode::FORBIDDEN,
                    "dev tokens are handed out to loopback clients only\n",
                )
            }
        }
        "/" => respond(
            StatusCode::OK,
            "text/html; charset=utf-8",
            demo_page(edge.webtransport_port),
        ),
        "/favicon.ico" => respond(StatusCode::NO_CONTENT, "image/x-icon", String::new()),
        "/imgate.js" => respond(
            StatusCode::OK,
            "text/javascript; charset=utf-8",
            CLIENT_JS.to_string(),
        ),
        _ => plain(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The demo page and the browser client it is built on (clients/js/), served as they are.
const DEMO_HTML: &str = include_str!("../../clients/js/demo.html");
const CLIENT_JS: &str = include_str!("../../clients/js/imgate.js");

/// The demo page, told which UDP port WebTransport listens on (none: WebSocket only).
fn demo_page(webtransport_port: Option<u16>) -> String {
    let port = webtransport_port.map(|p| p.to_string()).unwrap_or_default();
    DEMO_HTML.replace("{{WEBTRANSPORT_PORT}}", &port)
}

fn plain(status: StatusCode, body: &'static str) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", body.to_string())
}

fn json(status: StatusCode, body: String) -> Response<Body> {
    let mut r = respond(status, "application/json", body);
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // The demo page and browser clients fetch this across origins (http page, https API).
    r.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    r
}

/// `GET /dev/token?user=U[&device=D][&platform=P]` (dev profile only): `{"token": …}`, HS256 with the
/// configured (or dev) secret, valid 1 h (loopback clients only: see `route`).
fn dev_token(edge: &Edge, req: &Request<Incoming>) -> Response<Body> {
    let mut user = None;
    let mut device = None;
    let mut platform = None;
    for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        match &*k {
            "user" => user = Some(v.into_owned()),
            "device" => device = Some(v.into_owned()),
            "platform" => platform = Some(v.into_owned()),
            _ => {}
        }
    }
    let Some(user) = user.filter(|u| crate::protocol::valid_id(u)) else {
        return plain(
            StatusCode::BAD_REQUEST,
            "user must be 1-128 chars of A-Z a-z 0-9 . _ : @ -\n",
        );
    };
    if device
        .as_deref()
        .is_some_and(|d| !crate::protocol::valid_id(d))
    {
        return plain(
            StatusCode::BAD_REQUEST,
            "device must be 1-128 chars of A-Z a-z 0-9 . _ : @ -\n",
        );
    }
    if platform
        .as_deref()
        .is_some_and(|p| !crate::auth::jwt::PLATFORMS.contains(&p))
    {
        return plain(
            StatusCode::BAD_REQUEST,
            "platform must be ios, android, web, desktop or other\n",
        );
    }
    let secret = edge.cfg.jwt_secret().unwrap_or_default();
    match crate::auth::jwt::issue_hs256(
        &secret,
        &user,
        device.as_deref(),
        platform.as_deref(),
        Duration::from_secs(3600),
    ) {
        Ok(token) => json(
            StatusCode::OK,
            serde_json::json!({ "token": token }).to_string(),
        ),
        Err(e) => {
            debug!(error = %e, "dev token");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot issue a token\n")
        }
    }
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn reject(reason: &'static str, status: StatusCode, body: &'static str) -> Response<Body> {
    metrics::rejected(reason);
    plain(status, body)
}

/// A refused upgrade, as HTTP: the status a WebSocket client can read.
fn refused(refusal: Refusal) -> Response<Body> {
    metrics::rejected(refusal.reason());
    match refusal {
        Refusal::Draining => plain(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        Refusal::Origin => plain(StatusCode::FORBIDDEN, "origin not allowed\n"),
        Refusal::BadAuthorization => plain(StatusCode::UNAUTHORIZED, "bad Authorization header\n"),
        Refusal::BadRequest(m) => respond(
            StatusCode::BAD_REQUEST,
            "text/plain; charset=utf-8",
            format!("{m}\n"),
        ),
        Refusal::Limit(r) => {
            let status = match r {
                Rejection::IpLimit => StatusCode::TOO_MANY_REQUESTS,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            plain(status, "too many connections\n")
        }
        Refusal::Unauthorized => {
            // And close the connection (review F11): a client retrying bad tokens pays a
            // new connection, counted per IP, for each.
            let mut r = plain(StatusCode::UNAUTHORIZED, "invalid token\n");
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            r
        }
    }
}

/// Validate, authenticate (a token in the handshake), admit, then upgrade.
async fn upgrade(
    edge: Arc<Edge>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    slot: HeldSlot,
    transport: Transport,
) -> Response<Body> {
    if let Err(refusal) = edge.check_open() {
        return refused(refusal);
    }
    let headers = req.headers();
    let key = match headers.get(header::SEC_WEBSOCKET_KEY) {
        Some(k)
            if has_token(headers, header::CONNECTION, "upgrade")
                && has_token(headers, header::UPGRADE, "websocket")
                && headers
                    .get(header::SEC_WEBSOCKET_VERSION)
                    .map(|v| v.as_bytes())
                    == Some(b"13") =>
        {
            k.clone()
        }
        _ => {
            return reject(
                "bad_request",
                StatusCode::BAD_REQUEST,
                "expected a WebSocket upgrade (version 13)\n",
            )
        }
    };
    // The slot goes back to the connection unless the limits step took it.
    let mut held = slot.lock().take();
    let admitted = edge
        .admit(admission::Request {
            headers,
            origin: headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()),
            query: req.uri().query(),
            peer,
            slot: &mut held,
        })
        .await;
    if held.is_some() {
        *slot.lock() = held;
    }
    let adm = match admitted {
        Ok(adm) => adm,
        Err(refusal) => return refused(refusal),
    };
    let params = &adm.params;

    let mut resp = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            derive_accept_key(key.as_bytes()),
        );
    if let Some(proto) = &params.subprotocol {
        resp = resp.header(header::SEC_WEBSOCKET_PROTOCOL, *proto);
    }
    let resp = resp.body(Body::default()).expect("valid upgrade response");

    let on_upgrade = hyper::upgrade::on(&mut req);
    let text = params.codec == Codec::Json;
    let max_frame = edge.cfg.limits.max_frame;
    // A binary body grows by a third in base64, a text one by its escapes: twice the body
    // and room for the envelope bounds any push frame.
    let max_out = edge.cfg.limits.max_push_body.saturating_mul(2) + 16 * 1024;
    // Boxed until the upgrade completes, so the waiting task stays small.
    let adm = Box::new(adm);
    edge.lifecycle.sessions.clone().spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let ws = WsSession::from_upgraded(
                    TokioIo::new(upgraded),
                    transport,
                    text,
                    max_frame,
                    max_out,
                )
                .await;
                session::run(edge.session_env.clone(), ws, *adm).await;
            }
            Err(e) => debug!(error = %e, "upgrade failed"),
        }
    });
    resp
}
