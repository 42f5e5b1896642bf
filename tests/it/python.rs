//! docs/grpc.md's worked example, run as written: a business backend and a pusher in
//! Python (grpcio), driving the gateway through the `.proto` files alone.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use serde_json::json;

use crate::common::{Kind, TestGateway};

fn python_ready() {
    let ok = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "python3 with grpcio and grpcio-tools is needed: pip install grpcio grpcio-tools (scripts/test does)");
}

fn example(name: &str) -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/examples/python/").to_string() + name
}

#[tokio::test]
async fn python_backend_and_pusher() {
    python_ready();
    let mut backend = Command::new("python3")
        .arg(example("backend.py"))
        .args(["--port", "0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(backend.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let port: u16 = line
        .trim()
        .strip_prefix("listening ")
        .expect("backend prints its port")
        .parse()
        .unwrap();
    let gw = TestGateway::with(|c| {
        c.upstream.mode = imgate::config::UpstreamMode::Grpc;
        c.upstream.endpoint = format!("http://127.0.0.1:{port}");
    })
    .await;
    writeln!(backend.stdin.as_mut().unwrap(), "{}", gw.grpc.unwrap()).unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for l in out.lines().map_while(Result::ok) {
            let _ = lines_tx.send(l);
        }
    });

    let mut alice = gw.login(Kind::Ws, "alice", "phone").await;
    let mut bob = gw.login(Kind::Wss, "bob", "laptop").await;
    // The backend hears who came online.
    loop {
        let l = tokio::time::timeout(crate::common::WAIT, lines.recv())
            .await
            .expect("status line")
            .unwrap();
        if l == "status bob laptop online via wss" {
            break;
        }
    }
    alice.send(json!({"type": "send", "id": "m1", "to": "bob", "kind": "text", "body": {"text": "hi bob"}})).await;
    let reply = alice.expect("reply").await;
    assert_eq!(
        (
            reply["ok"].as_bool(),
            reply["body"]["seq"].as_u64(),
            reply["body"]["online"].as_bool()
        ),
        (Some(true), Some(1), Some(true))
    );
    let p = bob.expect("push").await;
    assert_eq!(
        (
            p["from"].as_str(),
            p["body"]["text"].as_str(),
            p["seq"].as_u64()
        ),
        (Some("alice"), Some("hi bob"), Some(1))
    );

    let grpc = gw.grpc.unwrap().to_string();
    let pushed = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(example("push.py"))
            .args(["--target", &grpc, "--user", "bob", "--text", "from python"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    assert!(String::from_utf8_lossy(&pushed.stdout).starts_with("online=True delivered=1 seq=2"));
    let p = bob.expect("push").await;
    assert_eq!(
        (p["from"].as_str(), p["body"]["text"].as_str()),
        (Some("backend"), Some("from python"))
    );
    let _ = backend.kill();
    let _ = backend.wait();
}
