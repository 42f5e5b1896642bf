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
