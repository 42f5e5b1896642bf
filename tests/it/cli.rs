//! The command line as an operator uses it (SPEC §9).

use std::process::Command;

fn imgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_imgate"))
}

#[test]
fn check_config_names_the_bad_key_and_exits_2() {
    let dir = std::env::temp_dir().join(format!("imgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "profile = \"dev\"\n[listen]\nhtp = \"x\"\n").unwrap();
    let out = imgate().arg("check-config").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen.htp"));

    let out = imgate()
        .arg("serve")
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "serve refuses the same file");

    let out = imgate()
        .args([
            "check-config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/dev.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The profile as a config file spells it, as the README's tour shows it.
    assert!(String::from_utf8_lossy(&out.stdout).ends_with(": ok (profile dev)\n"));

    // prod without secrets is refused, naming what is missing.
    let prod = dir.join("prod.toml");
    std::fs::write(&prod, "profile = \"prod\"\n").unwrap();
    let out = imgate().arg("check-config").arg(&prod).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.jwt_secret"));

    // Environment overrides reach the same checks.
    let out = imgate()
        .args([
            "check-config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/dev.toml"),
        ])
        .env("IMGATE__LIMITS__MAX_FRAME", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("limits.max_frame"));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn token_and_gen_cert() {
    let out = imgate()
        .args(["token", "--user", "alice", "--device", "d1", "--ttl", "5m"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap();
    assert_eq!(token.trim().split('.').count(), 3, "a JWT");
    let out = imgate()
        .args(["token", "--user", "bad id"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    let dir = std::env::temp_dir().join(format!("imgate-gencert-{}", std::process::id()));
    let out = imgate()
        .arg("gen-cert")
        .arg("--out")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(std::fs::read_to_string(dir.join("cert.pem"))
        .unwrap()
        .starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(dir.join("key.pem").exists());
    std::fs::remove_dir_all(dir).ok();
}

/// A gateway logging at trace into a pipe (not a terminal), as under systemd or a
/// container runtime: plain text, no Rust Debug formatting, and no token anywhere, even
/// though dependencies log the CONNECT headers and frame payloads that carry them.
#[tokio::test]
async fn logs_to_a_file_are_plain_and_carry_no_token() {
    use std::io::BufRead;
    use std::process::Stdio;
    use std::time::Duration;

    use crate::common::{http_get, token, Kind, TestGateway, WAIT};

    let mut child = imgate()
        .arg("serve")
        .env("RUST_LOG", "trace")
        .env("IMGATE__LISTEN__HTTP", "127.0.0.1:0")
        .env("IMGATE__LISTEN__HTTPS", "")
        .env("IMGATE__LISTEN__WEBTRANSPORT", "127.0.0.1:0")
        .env("IMGATE__LISTEN__GRPC", "")
        .env("IMGATE__LISTEN__OPS", "")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    let started = loop {
        let line = tokio::time::timeout(WAIT, lines.recv())
            .await
            .expect("the gateway starts in time")
            .expect("the gateway runs");
        log.push(line.clone());
        if line.contains("imgate started") {
            break line;
        }
    };
    let field = |name: &str| -> String {
        let at = started.find(&format!(" {name}=")).expect(name) + name.len() + 2;
        started[at..].split(' ').next().unwrap().to_string()
    };
    assert_eq!(field("profile"), "dev");
    assert_eq!(field("https"), "off");
    let http: std::net::SocketAddr = field("http").parse().expect("a plain address");
    let wt: std::net::SocketAddr = field("webtransport").parse().unwrap();
    let (_, hash) = http_get(http, "/cert-hash").await;
    let hex = serde_json::from_str::<serde_json::Value>(&hash).unwrap()["sha256_hex"]
        .as_str()
        .unwrap()
        .to_string();
    let sha: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let gw = TestGateway {
        running: None,
        http,
        https: None,
        wt: Some(wt),
        grpc: None,
        ops: http,
        cert_sha256: Some(sha.try_into().unwrap()),
    };

    // Tokens in the URL of both transports, and in an `auth` frame (a refresh).
    let secrets: Vec<String> = (0..3)
        .map(|i| {
            token(
                "logan",
                Some(&format!("d{i}")),
                None,
                Duration::from_secs(600),
            )
        })
        .collect();
    let mut ws = gw.login(Kind::Ws, "logan", "d0").await;
    let mut c = gw
        .connect(Kind::Ws, &format!("token={}", secrets[0]), &[])
        .await
        .unwrap();
    c.expect("welcome").await;
    c.send(serde_json::json!({"type": "auth", "token": secrets[1]}))
        .await;
    c.expect("synced").await;
    c.expect("reauth").await;
    let mut t = gw
        .connect(Kind::Wt, &format!("token={}", secrets[2]), &[])
        .await
        .unwrap();
    t.expect("welcome").await;
    assert_eq!(ws.ping("p").await["id"], "p");
    c.close().await;
    t.close().await;
    ws.close().await;
    // Everything logged so far: the server's trace of these sessions is written before it
    // answers, and the last answer is in.
    child.kill().unwrap();
    let _ = child.wait();
    while let Ok(Some(line)) = tokio::time::timeout(WAIT, lines.recv()).await {
        log.push(line);
    }
    let text = log.join("\n");
    for s in &secrets {
        // The signature is the secret part; the header is the same for every token.
        let signature = s.rsplit('.').next().unwrap();
        assert!(!text.contains(signature), "a token in the logs");
    }
    assert!(!text.contains('\u{1b}'), "colour codes in a file");
    assert!(!text.contains("Some("), "Rust Debug formatting");
}

/// The security review's fail-open file: no `profile`, a real secret. It must not start the
/// dev profile (which would mint tokens signed with that secret): exit 2 naming the key.
#[test]
fn a_file_without_profile_is_refused() {
    let dir = std::env::temp_dir().join(format!("imgate-noprofile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("c.toml");
    std::fs::write(
        &file,
        "[listen]\nhttp = \"127.0.0.1:0\"\nhttps = \"\"\nwebtransport = \"\"\ngrpc = \"\"\nops = \"\"\n[auth]\njwt_secret = \"real\"\n",
    )
    .unwrap();
    let out = imgate().arg("check-config").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("profile"));

    let mut serve = imgate()
        .arg("serve")
        .arg("--config")
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: a gateway that started anyway is killed and the test fails.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(status) = serve.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            serve.kill().ok();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(status.and_then(|s| s.code()), Some(2), "serve refuses it");
    std::fs::remove_dir_all(dir).ok();
}
