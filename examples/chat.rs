//! A terminal chat client for the tour: logs in with a dev token, prints what arrives, sends
//! what you type, acks every durable push, and on a reconnect resumes from the last message
//! it holds, so nothing is lost or shown twice.
//!
//! ```text
//! cargo run --example chat -- --user alice --to bob
//! cargo run --example chat -- --user bob --to alice --tls      # over wss, certificate pinned
//! cargo run --example chat -- --user carol --to alice --wt      # over WebTransport (QUIC)
//! ```
//! Type a line to send it to `--to`; `@carol hi` sends to carol; `#team hi` to group team.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

struct Args {
    user: String,
    device: String,
    to: Option<String>,
    http: String,
    https: String,
    /// The WebTransport listener (UDP).
    wt_addr: String,
    tls: bool,
    wt: bool,
}

fn args() -> Args {
    let mut a = Args {
        user: String::new(),
        device: "cli".into(),
        to: None,
        http: "127.0.0.1:8080".into(),
        https: "127.0.0.1:8443".into(),
        wt_addr: "127.0.0.1:4433".into(),
        tls: false,
        wt: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--user" => a.user = val(),
            "--device" => a.device = val(),
            "--to" => a.to = Some(val()),
            "--http" => a.http = val(),
            "--https" => a.https = val(),
            "--tls" => a.tls = true,
            "--wt" => a.wt = true,
            "--webtransport" => a.wt_addr = val(),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0)
            }
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if a.user.is_empty() {
        usage("--user is required");
    }
    a
}

const USAGE: &str = "usage: chat --user U [--device D] [--to U] [--tls | --wt] [--http HOST:PORT] [--https HOST:PORT] [--webtransport HOST:PORT]";

fn usage(msg: &str) -> ! {
    eprintln!("{msg}\n{USAGE}");
    std::process::exit(2)
}

/// GET over plain HTTP (the public listener), returning the JSON body.
async fn get_json(addr: &str, path: &str) -> anyhow::Result<Value> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200"),
        "GET {path}: {}",
        head.lines().next().unwrap_or("")
    );
    Ok(serde_json::from_str(body)?)
}

/// Where this device stands: the newest durable seq it holds, per epoch.
#[derive(Default)]
struct Held {
    epoch: String,
    seq: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    imgate::tls::install_crypto_provider();
    let a = args();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut held = Held::default();
    let mut backoff = Duration::from_millis(250);
    loop {
        match session(&a, &mut held, &mut lines).await {
            Ok(Some(code)) if (4500..4600).contains(&code) => {
                eprintln!("* closed with {code}: not reconnecting");
                return Ok(());
            }
            Ok(None) => return Ok(()), // stdin closed
            Ok(Some(code)) => eprintln!("* closed with {code}: reconnecting"),
            Err(e) => eprintln!("* {e:#}: reconnecting"),
        }
        // Backoff with jitter, as SPEC §4 asks of 41xx closes.
        let jitter = Duration::from_millis(rand::random::<u64>() % 250);
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

type Lines = tokio::io::Lines<BufReader<tokio::io::Stdin>>;

/// One connection; returns the close code, or None when the user is done.
async fn session(a: &Args, held: &mut Held, lines: &mut Lines) -> anyhow::Result<Option<u16>> {
    let token = get_json(
        &a.http,
        &format!("/dev/token?user={}&device={}", a.user, a.device),
    )
    .await?["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let since = if held.epoch.is_empty() {
        String::new()
    } else {
        format!("&since={}:{}", held.epoch, held.seq)
    };
    let mut link = if a.wt {
        Link::webtransport(a, &format!("token={token}{since}")).await?
    } else {
        Link::websocket(a, &format!("token={token}{since}")).await?
    };
    // WebTransport has no automatic pongs: keep the session alive with pings.
    let mut heartbeat = tokio::time::interval(Duration::from_secs(20));
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { return Ok(None) };
                let (target, text) = match line.split_once(' ') {
                    Some((t, rest)) if t.starts_with('@') => (json!({"to": &t[1..]}), rest.to_string()),
                    Some((t, rest)) if t.starts_with('#') => (json!({"group": &t[1..]}), rest.to_string()),
                    _ => match &a.to {
                        Some(to) => (json!({"to": to}), line.clone()),
                        None => { eprintln!("* no --to: write @user message"); continue }
                    },
                };
                next_id += 1;
                let mut frame = json!({"type": "send", "id": next_id.to_string(), "body": {"text": text}});
                frame.as_object_mut().unwrap().extend(target.as_object().unwrap().clone());
                link.send(frame.to_string()).await?;
            }
            _ = heartbeat.tick(), if a.wt => link.send(json!({"type": "ping"}).to_string()).await?,
            next = link.next() => match next? {
                Inbound::Frame(t) => {
                    let v: Value = serde_json::from_str(&t)?;
                    if let Some(code) = show(&v, held) {
                        return Ok(Some(code));
                    }
                    if v["type"] == "push" && v["seq"].is_u64() {
                        link.send(json!({"type": "ack", "seq": v["seq"], "epoch": v["epoch"]}).to_string()).await?;
                    }
                }
                Inbound::Closed(code) => return Ok(Some(code)),
            },
        }
    }
}

enum Inbound {
    Frame(String),
    Closed(u16),
}

/// The connection, over WebSocket or WebTransport: one protocol on both (docs/protocol.md).
enum Link {
    Ws(Box<tokio_tungstenite::WebSocketStream<Box<dyn Io>>>),
    Wt {
        conn: wtransport::Connection,
        send: wtransport::SendStream,
        recv: wtransport::RecvStream,
        /// Control-stream bytes not yet a whole frame.
        buf: Vec<u8>,
    },
}

impl Link {
    async fn websocket(a: &Args, query: &str) -> anyhow::Result<Link> {
        let (url, addr) = if a.tls {
            (format!("wss://localhost/ws?{query}"), a.https.clone())
        } else {
            (format!("ws://{}/ws?{query}", a.http), a.http.clone())
        };
        let tcp = TcpStream::connect(&addr).await?;
        let io: Box<dyn Io> = if a.tls {
            let connector =
                tokio_rustls::TlsConnector::from(imgate::tls::pinned_client_config(pin(a).await?));
            Box::new(
                connector
                    .connect(rustls::pki_types::ServerName::try_from("localhost")?, tcp)
                    .await?,
            )
        } else {
            Box::new(tcp)
        };
        let (ws, _) = tokio_tungstenite::client_async(url.into_client_request()?, io).await?;
        Ok(Link::Ws(Box::new(ws)))
    }

    async fn webtransport(a: &Args, query: &str) -> anyhow::Result<Link> {
        let cfg = wtransport::ClientConfig::builder()
            .with_bind_default()
            .with_server_certificate_hashes([wtransport::tls::Sha256Digest::new(pin(a).await?)])
            .build();
        let conn = wtransport::Endpoint::client(cfg)?
            .connect(format!("https://{}/wt?{query}", a.wt_addr))
            .await?;
        let (send, recv) = conn.open_bi().await?.await?;
        let mut link = Link::Wt {
            conn,
            send,
            recv,
            buf: Vec::new(),
        };
        // The first write announces the control stream (the token came in the URL).
        link.send(json!({"type": "ping"}).to_string()).await?;
        Ok(link)
    }

    async fn send(&mut self, text: String) -> anyhow::Result<()> {
        match self {
            Link::Ws(ws) => ws.send(Message::Text(text.into())).await?,
            Link::Wt { send, .. } => {
                let mut frame = (text.len() as u32).to_be_bytes().to_vec();
                frame.extend_from_slice(text.as_bytes());
                send.write_all(&frame).await?;
            }
        }
        Ok(())
    }

    /// The next frame, or the close code. Cancel-safe: unread bytes stay in `buf` or in
    /// the stream.
    async fn next(&mut self) -> anyhow::Result<Inbound> {
        match self {
            Link::Ws(ws) => loop {
                match ws.next().await {
                    None => return Ok(Inbound::Closed(1006)),
                    Some(msg) => match msg? {
                        Message::Text(t) => return Ok(Inbound::Frame(t.to_string())),
                        Message::Close(f) => {
                            return Ok(Inbound::Closed(
                                f.map(|f| u16::from(f.code)).unwrap_or(1005),
                            ))
                        }
                        _ => {}
                    },
                }
            },
            Link::Wt {
                conn, recv, buf, ..
            } => loop {
                if buf.len() >= 4 {
                    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                    if buf.len() >= 4 + len {
                        let frame = String::from_utf8(buf[4..4 + len].to_vec())?;
                        buf.drain(..4 + len);
                        return Ok(Inbound::Frame(frame));
                    }
                }
                let mut chunk = [0u8; 4096];
                match recv.read(&mut chunk).await {
                    Ok(Some(n)) => buf.extend_from_slice(&chunk[..n]),
                    // The stream ended: the session's close code says why (after `kick`).
                    Ok(None) | Err(_) => {
                        let code = match conn.closed().await {
                            wtransport::error::ConnectionError::ApplicationClosed(c) => {
                                u16::try_from(c.code().into_inner()).unwrap_or(1006)
                            }
                            _ => 1006,
                        };
                        return Ok(Inbound::Closed(code));
                    }
                }
            },
        }
    }
}

/// The gateway's certificate hash, as it publishes it on /cert-hash.
async fn pin(a: &Args) -> anyhow::Result<[u8; 32]> {
    let hex = get_json(&a.http, "/cert-hash").await?["sha256_hex"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut pin = [0u8; 32];
    for (i, b) in pin.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or("00"), 16)?;
    }
    Ok(pin)
}

/// Print a frame; returns the code of a `kick`.
fn show(v: &Value, held: &mut Held) -> Option<u16> {
    match v["type"].as_str().unwrap_or("") {
        "welcome" => {
            if v["epoch"] != held.epoch.as_str() {
                held.epoch = v["epoch"].as_str().unwrap_or("").into();
                held.seq = v["cursor"].as_u64().unwrap_or(0);
            }
            println!(
                "* connected as {} ({}) over {} to {}",
                v["user"], v["device"], v["transport"], v["instance"]
            );
        }
        "push" => {
            if let Some(seq) = v["seq"].as_u64() {
                if seq <= held.seq {
                    return None; // already shown: delivery is at-least-once on the wire
                }
                held.seq = seq;
            }
            let body = if v["body"].is_null() {
                v["body_b64"].clone()
            } else {
                v["body"].clone()
            };
            let text = body.get("text").cloned().unwrap_or(body);
            let text = text
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| text.to_string());
            println!(
                "[{}] {}: {}",
                v["seq"]
                    .as_u64()
                    .map(|s| s.to_string())
                    .unwrap_or("-".into()),
                v["from"].as_str().unwrap_or("?"),
                text
            );
        }
        "synced" => println!(
            "* synced: {} replayed{}",
            v["replayed"],
            if v["complete"] == false {
                " (some were lost)"
            } else {
                ""
            }
        ),
        "reply" if v["ok"] == false => println!("* send failed: {} {}", v["code"], v["message"]),
        "error" => println!("* error: {} {}", v["code"], v["message"]),
        "kick" => {
            println!("* kicked: {} {}", v["code"], v["reason"]);
            return v["code"].as_u64().map(|c| c as u16);
        }
        _ => {}
    }
    None
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}
