//! The test harness: an in-process gateway on port 0 and real WebSocket clients (plain and
//! TLS). Every wait is bounded by a timeout; nothing sleeps to synchronise.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use imgate::config::Config;
use imgate::gateway::{self, Running};
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
}

/// A config for tests: every listener on an ephemeral loopback port, WebTransport off.
pub fn test_config() -> Config {
    let mut cfg = Config::default();
    cfg.listen.http = "127.0.0.1:0".into();
    cfg.listen.https = "127.0.0.1:0".into();
    cfg.listen.ops = "127.0.0.1:0".into();
    cfg.listen.grpc = "127.0.0.1:0".into();
    cfg.listen.webtransport = String::new();
    cfg.instance.id = "test-1".into();
    cfg.shutdown.drain_window = Duration::from_millis(200);
    cfg.shutdown.timeout = Duration::from_secs(5);
    cfg
}

pub struct TestGateway {
    pub running: Option<Running>,
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
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
        let running = gateway::start(cfg).await.expect("gateway starts");
        let cert_sha256 = running.gw.certs.as_ref().map(|c| c.current().sha256);
        TestGateway {
            http: running.addrs.http.expect("http bound"),
            https: running.addrs.https,
            grpc: running.addrs.grpc,
            ops: running.addrs.ops.expect("ops bound"),
            cert_sha256,
            running: Some(running),
        }
    }

    pub fn gw(&self) -> &Arc<imgate::gateway::Gateway> {
        &self.running.as_ref().expect("running").gw
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
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        self.connect_after(kind, query, headers, &[]).await
    }

    /// Like `connect`, writing `prefix` on the TCP connection first (a PROXY header).
    pub async fn connect_after(
        &self,
        kind: Kind,
        query: &str,
        headers: &[(&str, &str)],
        prefix: &[u8],
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
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
        };
        let (ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(req, stream))
            .await
            .expect("handshake in time")?;
        Ok(Client {
            ws,
            subprotocol: resp
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap().to_string()),
        })
    }

    /// A handshake the server must refuse: its HTTP status.
    pub async fn refused(&self, kind: Kind, query: &str, headers: &[(&str, &str)]) -> u16 {
        match self.connect(kind, query, headers).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
            Err(e) => panic!("expected an HTTP refusal, got {e:?}"),
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

pub struct Client {
    pub ws: WebSocketStream<Box<dyn Io>>,
    pub subprotocol: Option<String>,
}

/// How a connection ended, as the client saw it.
#[derive(Debug, PartialEq)]
pub struct Closed {
    pub kick: Option<u16>,
    pub code: Option<u16>,
}

impl Client {
    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .expect("send");
    }

    pub async fn send_raw(&mut self, m: Message) {
        let _ = self.ws.send(m).await;
    }

    /// The next JSON frame (skipping WebSocket control frames).
    pub async fn recv(&mut self) -> Value {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame in time")
                .expect("connection open")
                .expect("valid message");
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
            let next = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("close in time");
            match next {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "kick" {
                        kick = v["code"].as_u64().map(|c| c as u16);
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    return Closed {
                        kick,
                        code: frame.map(|f| u16::from(f.code)),
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Closed { kick, code: None },
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

    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }))
            .await;
    }
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
