//! The test harness: an in-process gateway on port 0 and real clients: WebSocket (plain and
//! TLS, tokio-tungstenite) and WebTransport (wtransport's client). Every wait is bounded by a
//! timeout; nothing sleeps to synchronise.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use imgate::app::{self, Running};
use imgate::config::Config;
use imgate::protocol::proto::pb;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// How long any single expected event may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// The transports a behaviour test runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ws,
    Wss,
    Wt,
}

impl Kind {
    /// The `transport` a `welcome` names.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Ws => "ws",
            Kind::Wss => "wss",
            Kind::Wt => "wt",
        }
    }
}

/// A config for tests: every listener on an ephemeral loopback port.
pub fn test_config() -> Config {
    let mut cfg = Config::default();
    cfg.listen.http = "127.0.0.1:0".into();
    cfg.listen.https = "127.0.0.1:0".into();
    cfg.listen.ops = "127.0.0.1:0".into();
    cfg.listen.grpc = "127.0.0.1:0".into();
    cfg.listen.webtransport = "127.0.0.1:0".into();
    cfg.instance.id = "test-1".into();
    cfg.shutdown.drain_window = Duration::from_millis(200);
    cfg.shutdown.timeout = Duration::from_secs(5);
    cfg
}

pub struct TestGateway {
    pub running: Option<Running>,
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
    pub wt: Option<SocketAddr>,
    pub grpc: Option<SocketAddr>,
    pub ops: SocketAddr,
    pub cert_sha256: Option<[u8; 32]>,
}

impl TestGateway {
    pub async fn start() -> TestGateway {
        Self::with(|_| {}).await
    }

    pub async fn with(tweak: impl FnOnce(&mut Config)) -> TestGateway {
        let mut cfg = test_config();
        tweak(&mut cfg);
        cfg.validate().expect("test config is valid");
        let running = app::start(cfg).await.expect("gateway starts");
        let cert_sha256 = running.certs.as_ref().map(|c| c.current().sha256);
        TestGateway {
            http: running.addrs.http.expect("http bound"),
            https: running.addrs.https,
            wt: running.addrs.webtransport,
            grpc: running.addrs.grpc,
            ops: running.addrs.ops.expect("ops bound"),
            cert_sha256,
            running: Some(running),
        }
    }

    /// The services of the running gateway (hub, state, delivery, kick).
    pub fn gw(&self) -> &Arc<imgate::services::Services> {
        &self.running().services
    }

    /// What the composition root built: limits, certificates, lifecycle.
    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("running")
    }

    pub fn url(&self, kind: Kind, query: &str) -> String {
        let q = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        match kind {
            Kind::Ws => format!("ws://{}/ws{q}", self.http),
            Kind::Wss => format!(
                "wss://localhost:{}/ws{q}",
                self.https.expect("https bound").port()
            ),
            Kind::Wt => format!(
                "https://127.0.0.1:{}/wt{q}",
                self.wt.expect("webtransport bound").port()
            ),
        }
    }

    /// Connect with a token in the query string and read `welcome` and `synced`.
    pub async fn login(&self, kind: Kind, user: &str, device: &str) -> Client {
        let t = token(user, Some(device), None, Duration::from_secs(3600));
        let mut c = self
            .connect(kind, &format!("token={t}"), &[])
            .await
            .expect("handshake");
        let w = c.expect("welcome").await;
        assert_eq!(w["user"], user);
        c.expect("synced").await;
        c
    }

    /// Open a WebSocket with the given query and extra request headers.
    pub async fn connect(
        &self,
        kind: Kind,
        query: &str,
        headers: &[(&str, &str)],
    ) -> Result<Client, ConnectError> {
        self.connect_after(kind, query, headers, &[]).await
    }

    /// Like `connect`, writing `prefix` on the TCP connection first (a PROXY header).
    pub async fn connect_after(
        &self,
        kind: Kind,
        query: &str,
        headers: &[(&str, &str)],
        prefix: &[u8],
    ) -> Result<Client, ConnectError> {
        if kind == Kind::Wt {
            assert!(prefix.is_empty(), "no PROXY protocol over QUIC");
            return self.connect_wt(query, headers, true).await;
        }
        let mut req = self.url(kind, query).into_client_request()?;
        for (k, v) in headers {
            req.headers_mut().insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        let mut tcp = match kind {
            Kind::Ws => TcpStream::connect(self.http).await?,
            Kind::Wss => TcpStream::connect(self.https.unwrap()).await?,
            Kind::Wt => unreachable!(),
        };
        tokio::io::AsyncWriteExt::write_all(&mut tcp, prefix).await?;
        let stream: Box<dyn Io> = match kind {
            Kind::Ws => Box::new(tcp),
            Kind::Wss => {
                let cfg = imgate::tls::pinned_client_config(self.cert_sha256.expect("dev cert"));
                let connector = tokio_rustls::TlsConnector::from(cfg);
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                Box::new(connector.connect(name, tcp).await?)
            }
            Kind::Wt => unreachable!(),
        };
        let (ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(req, stream))
            .await
            .expect("handshake in time")?;
        Ok(Client {
            link: Link::Ws(Box::new(ws)),
            subprotocol: resp
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap().to_string()),
        })
    }

    /// A WebTransport session, its control stream opened. `announce`: when the token came
    /// with the request, write a `ping` at once as SPEC §3 asks (browsers do not announce a
    /// stream before its first write); its `pong` is not shown to the test.
    pub async fn connect_wt(
        &self,
        query: &str,
        headers: &[(&str, &str)],
        announce: bool,
    ) -> Result<Client, ConnectError> {
        let conn = self.wt_session(query, headers).await?;
        Self::open_control(conn, query, headers, announce).await
    }

    /// Open the control stream of a session from `wt_session` (given the same query and
    /// headers), as `connect_wt` does.
    pub async fn open_control(
        conn: wtransport::Connection,
        query: &str,
        headers: &[(&str, &str)],
        announce: bool,
    ) -> Result<Client, ConnectError> {
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| ConnectError::Other(e.to_string()))?
            .await
            .map_err(|e| ConnectError::Other(e.to_string()))?;
        let token_given = query.split('&').any(|p| p.starts_with("token="))
            || headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("authorization"));
        let mut c = Client {
            link: Link::Wt(Box::new(WtLink {
                conn,
                send,
                recv,
                buf: bytes::BytesMut::new(),
                binary: query.contains("codec=proto")
                    || headers.iter().any(|(_, v)| v.contains("imgate.v1.proto")),
                hidden_pong: false,
                ended: false,
            })),
            subprotocol: None,
        };
        if announce && token_given {
            c.send_announce().await;
        }
        Ok(c)
    }

    /// A WebTransport session with no control stream yet.
    pub async fn wt_session(
        &self,
        query: &str,
        headers: &[(&str, &str)],
    ) -> Result<wtransport::Connection, ConnectError> {
        let sha = self.cert_sha256.expect("dev cert");
        let cfg = wtransport::ClientConfig::builder()
            .with_bind_default()
            .with_server_certificate_hashes([wtransport::tls::Sha256Digest::new(sha)])
            .build();
        let endpoint = wtransport::Endpoint::client(cfg).expect("client endpoint");
        let mut opts = wtransport::endpoint::ConnectOptions::builder(self.url(Kind::Wt, query));
        for (k, v) in headers {
            opts = opts.add_header(*k, *v);
        }
        match tokio::time::timeout(WAIT, endpoint.connect(opts.build()))
            .await
            .expect("WebTransport handshake in time")
        {
            Ok(conn) => Ok(conn),
            Err(wtransport::error::ConnectingError::SessionRejected) => {
                Err(ConnectError::Refused(None))
            }
            Err(e) => Err(ConnectError::Other(e.to_string())),
        }
    }

    /// A handshake the server must refuse: its HTTP status (`None` over WebTransport, whose
    /// client does not expose it).
    pub async fn refused(&self, kind: Kind, query: &str, headers: &[(&str, &str)]) -> Option<u16> {
        match self.connect(kind, query, headers).await {
            Err(ConnectError::Refused(status)) => status,
            Err(ConnectError::Other(e)) => panic!("expected a refusal, got {e}"),
            Ok(_) => panic!("the handshake was accepted"),
        }
    }

    pub async fn http_get(&self, addr: SocketAddr, path: &str) -> (u16, String) {
        http_get(addr, path).await
    }
}

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A token signed with the dev secret.
pub fn token(user: &str, device: Option<&str>, platform: Option<&str>, ttl: Duration) -> String {
    imgate::auth::jwt::issue_hs256(imgate::config::DEV_JWT_SECRET, user, device, platform, ttl)
        .unwrap()
}

#[derive(Debug)]
pub enum ConnectError {
    /// The server answered the handshake with this HTTP status (`None`: not known).
    Refused(Option<u16>),
    Other(String),
}

impl From<tokio_tungstenite::tungstenite::Error> for ConnectError {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        match e {
            tokio_tungstenite::tungstenite::Error::Http(resp) => {
                ConnectError::Refused(Some(resp.status().as_u16()))
            }
            other => ConnectError::Other(other.to_string()),
        }
    }
}

impl From<std::io::Error> for ConnectError {
    fn from(e: std::io::Error) -> Self {
        ConnectError::Other(e.to_string())
    }
}

pub struct Client {
    link: Link,
    pub subprotocol: Option<String>,
}

enum Link {
    Ws(Box<WebSocketStream<Box<dyn Io>>>),
    Wt(Box<WtLink>),
}

/// A WebTransport session seen from the client: the control stream with SPEC §3 framing.
pub struct WtLink {
    pub conn: wtransport::Connection,
    send: wtransport::SendStream,
    recv: wtransport::RecvStream,
    buf: bytes::BytesMut,
    /// The proto codec: frames show as binary messages, else as text.
    binary: bool,
    /// The `pong` answering the harness's announcing `ping` is still to be skipped.
    hidden_pong: bool,
    /// The session's end was reported.
    ended: bool,
}

const ANNOUNCE_ID: &str = "harness-announce";

fn is_announce_pong(frame: &[u8], binary: bool) -> bool {
    if binary {
        use prost::Message as _;
        matches!(
            pb::Frame::decode(frame).ok().and_then(|f| f.frame),
            Some(pb::frame::Frame::Pong(p)) if p.id.as_deref() == Some(ANNOUNCE_ID)
        )
    } else {
        let v: Value = serde_json::from_slice(frame).unwrap_or_default();
        v["type"] == "pong" && v["id"] == ANNOUNCE_ID
    }
}

impl WtLink {
    async fn write_frame(&mut self, frame: &[u8]) -> bool {
        let mut out = (frame.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(frame);
        self.send.write_all(&out).await.is_ok()
    }

    /// Finish the client's side of the control stream.
    pub async fn finish(&mut self) {
        let _ = self.send.quic_stream_mut().finish();
    }

    /// Read the control stream to its end: true when the server finished it cleanly with
    /// no frame left unread.
    pub async fn control_finished(&mut self) -> bool {
        let mut chunk = [0u8; 64];
        let read = tokio::time::timeout(WAIT, self.recv.read(&mut chunk))
            .await
            .expect("the control stream ends in time");
        self.buf.is_empty() && matches!(read, Ok(None))
    }

    /// The next message as a WebSocket client would see it; the session's end shows as a
    /// close frame carrying the QUIC application error code.
    async fn next(&mut self) -> Option<Message> {
        use bytes::Buf;
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes(self.buf[..4].try_into().unwrap()) as usize;
                if self.buf.len() >= 4 + len {
                    self.buf.advance(4);
                    let frame = self.buf.split_to(len).freeze();
                    if self.hidden_pong && is_announce_pong(&frame, self.binary) {
                        self.hidden_pong = false;
                        continue;
                    }
                    return Some(if self.binary {
                        Message::Binary(frame)
                    } else {
                        Message::Text(String::from_utf8(frame.to_vec()).unwrap().into())
                    });
                }
            }
            if self.ended {
                return None;
            }
            let mut chunk = [0u8; 4096];
            match self.recv.read(&mut chunk).await {
                Ok(Some(n)) => self.buf.extend_from_slice(&chunk[..n]),
                // The control stream ended or broke: the session's close says how.
                Ok(None) | Err(_) => {
                    self.ended = true;
                    let code = match self.conn.closed().await {
                        wtransport::error::ConnectionError::ApplicationClosed(c) => {
                            u16::try_from(c.code().into_inner()).ok()
                        }
                        _ => None,
                    };
                    return code.map(|c| {
                        Message::Close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                            code: CloseCode::from(c),
                            reason: "".into(),
                        }))
                    });
                }
            }
        }
    }
}

/// How a connection ended, as the client saw it.
#[derive(Debug, PartialEq)]
pub struct Closed {
    pub kick: Option<u16>,
    pub code: Option<u16>,
}

impl Client {
    pub async fn send(&mut self, v: Value) {
        self.send_raw(Message::Text(v.to_string().into())).await;
    }

    /// Send a message as is: over WebTransport a text or binary message becomes one framed
    /// frame, anything else is ignored. False once the connection is gone.
    pub async fn send_raw(&mut self, m: Message) -> bool {
        match &mut self.link {
            Link::Ws(ws) => ws.send(m).await.is_ok(),
            Link::Wt(wt) => match m {
                Message::Text(t) => wt.write_frame(t.as_bytes()).await,
                Message::Binary(b) => wt.write_frame(&b).await,
                _ => true,
            },
        }
    }

    /// Raw bytes on the WebTransport control stream (bad framing tests).
    pub async fn send_wt_bytes(&mut self, bytes: &[u8]) {
        match &mut self.link {
            Link::Wt(wt) => wt.send.write_all(bytes).await.expect("write"),
            Link::Ws(_) => panic!("not a WebTransport client"),
        }
    }

    /// The WebTransport session under this client.
    pub fn wt(&mut self) -> &mut WtLink {
        match &mut self.link {
            Link::Wt(wt) => wt,
            Link::Ws(_) => panic!("not a WebTransport client"),
        }
    }

    async fn send_announce(&mut self) {
        let wt = self.wt();
        let ping = if wt.binary {
            use prost::Message as _;
            pb::Frame {
                frame: Some(pb::frame::Frame::Ping(pb::PingFrame {
                    id: Some(ANNOUNCE_ID.into()),
                })),
            }
            .encode_to_vec()
        } else {
            json!({"type": "ping", "id": ANNOUNCE_ID})
                .to_string()
                .into_bytes()
        };
        wt.hidden_pong = true;
        wt.write_frame(&ping).await;
    }

    /// The next message (WebSocket control frames included); `None` once the connection is
    /// gone without a close frame.
    pub async fn next_message(&mut self) -> Option<Message> {
        let next = async {
            match &mut self.link {
                Link::Ws(ws) => ws.next().await.and_then(Result::ok),
                Link::Wt(wt) => wt.next().await,
            }
        };
        tokio::time::timeout(WAIT, next)
            .await
            .expect("a message in time")
    }

    /// The next JSON frame (skipping WebSocket control frames).
    pub async fn recv(&mut self) -> Value {
        loop {
            let m = self.next_message().await.expect("connection open");
            match m {
                Message::Text(t) => return serde_json::from_str(&t).expect("JSON frame"),
                Message::Binary(b) => panic!("unexpected binary frame {b:?}"),
                Message::Close(c) => panic!("unexpected close {c:?}"),
                _ => continue,
            }
        }
    }

    /// The next frame, which must be of type `ty`.
    pub async fn expect(&mut self, ty: &str) -> Value {
        let v = self.recv().await;
        assert_eq!(v["type"], ty, "expected a {ty} frame, got {v}");
        v
    }

    /// Read until the connection closes; returns the kick code and the close code.
    pub async fn closed(&mut self) -> Closed {
        let mut kick = None;
        loop {
            match self.next_message().await {
                Some(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "kick" {
                        kick = v["code"].as_u64().map(|c| c as u16);
                    }
                }
                Some(Message::Close(frame)) => {
                    return Closed {
                        kick,
                        code: frame.map(|f| u16::from(f.code)),
                    }
                }
                Some(_) => {}
                None => return Closed { kick, code: None },
            }
        }
    }

    /// Expect `kick` with `code` followed by a close with the same code.
    pub async fn expect_kick(&mut self, code: u16) {
        let c = self.closed().await;
        assert_eq!(
            c,
            Closed {
                kick: Some(code),
                code: Some(code)
            }
        );
    }

    pub async fn ping(&mut self, id: &str) -> Value {
        self.send(json!({"type": "ping", "id": id})).await;
        loop {
            let v = self.recv().await;
            if v["type"] == "pong" {
                return v;
            }
        }
    }

    pub async fn close(self) {
        match self.link {
            Link::Ws(mut ws) => {
                let _ = WebSocketStream::close(
                    &mut ws,
                    Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                        code: CloseCode::Normal,
                        reason: "".into(),
                    }),
                )
                .await;
            }
            Link::Wt(wt) => wt.conn.close(wtransport::VarInt::from_u32(0), b""),
        }
    }
}

/// The status `refused` reports for an HTTP refusal with `code` over `kind`: wtransport's
/// client only says that a session was refused.
pub fn status(kind: Kind, code: u16) -> Option<u16> {
    (kind != Kind::Wt).then_some(code)
}

/// A minimal HTTP/1.1 GET over a fresh connection: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("response in time")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Run the same async test body over each transport.
#[macro_export]
macro_rules! over_transports {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[tokio::test]
            async fn ws() {
                ($body)($crate::common::Kind::Ws).await
            }
            #[tokio::test]
            async fn wss() {
                ($body)($crate::common::Kind::Wss).await
            }
            #[tokio::test]
            async fn wt() {
                ($body)($crate::common::Kind::Wt).await
            }
        }
    };
}

/// Wait until `cond` holds (state the test cannot observe as an event), bounded by WAIT.
pub async fn eventually(mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("condition reached in time");
}

/// Like `eventually`, for a condition that must await (a scrape of /metrics).
pub async fn eventually_async<F, Fut>(mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    tokio::time::timeout(WAIT, async {
        while !cond().await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("condition reached in time");
}

/// A metric's value in the exposition text (sum over series matching every label given).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
