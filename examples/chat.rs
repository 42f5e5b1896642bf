//! A terminal chat client for the tour: logs in with a dev token, prints what arrives, sends
//! what you type, acks every durable push, and on a reconnect resumes from the last message
//! it holds, so nothing is lost or shown twice.
//!
//! ```text
//! cargo run --example chat -- --user alice --to bob
//! cargo run --example chat -- --user bob --to alice --tls      # over wss, certificate pinned
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
    tls: bool,
}

fn args() -> Args {
    let mut a = Args {
        user: String::new(),
        device: "cli".into(),
        to: None,
        http: "127.0.0.1:8080".into(),
        https: "127.0.0.1:8443".into(),
        tls: false,
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
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if a.user.is_empty() {
        usage("--user is required");
    }
    a
}

fn usage(msg: &str) -> ! {
    eprintln!("{msg}\nusage: chat --user U [--device D] [--to U] [--tls] [--http HOST:PORT] [--https HOST:PORT]");
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
    let (url, addr) = if a.tls {
        (
            format!("wss://localhost/ws?token={token}{since}"),
            a.https.clone(),
        )
    } else {
        (
            format!("ws://{}/ws?token={token}{since}", a.http),
            a.http.clone(),
        )
    };
    let tcp = TcpStream::connect(&addr).await?;
    let io: Box<dyn Io> = if a.tls {
        // Pin the gateway's certificate by the hash it publishes on /cert-hash.
        let hex = get_json(&a.http, "/cert-hash").await?["sha256_hex"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let mut pin = [0u8; 32];
        for (i, b) in pin.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or("00"), 16)?;
        }
        let connector = tokio_rustls::TlsConnector::from(imgate::tls::pinned_client_config(pin));
        Box::new(
            connector
                .connect(rustls::pki_types::ServerName::try_from("localhost")?, tcp)
                .await?,
        )
    } else {
        Box::new(tcp)
    };
    let (mut ws, _) = tokio_tungstenite::client_async(url.into_client_request()?, io).await?;
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
                ws.send(Message::Text(frame.to_string().into())).await?;
            }
            msg = ws.next() => {
                let Some(msg) = msg else { return Ok(Some(1006)) };
                match msg? {
                    Message::Text(t) => {
                        let v: Value = serde_json::from_str(&t)?;
                        if let Some(code) = show(&v, held) {
                            return Ok(Some(code));
                        }
                        if v["type"] == "push" && v["seq"].is_u64() {
                            ws.send(Message::Text(json!({"type": "ack", "seq": v["seq"], "epoch": v["epoch"]}).to_string().into())).await?;
                        }
                    }
                    Message::Close(f) => return Ok(Some(f.map(|f| u16::from(f.code)).unwrap_or(1005))),
                    _ => {}
                }
            }
        }
    }
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
