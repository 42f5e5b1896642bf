//! Configuration: one struct, loaded from TOML, overridden from the environment.
//!
//! Every key is documented in `config/default.toml`; `Config::default()` is the
//! embedded dev profile that `imgate serve` runs with no `--config`.

pub mod duration;
mod load;
mod sections;
mod validate;

pub use sections::*;

use serde::{Deserialize, Serialize};

/// The HS256 secret of the dev profile. Warned about at start; refused by prod.
pub const DEV_JWT_SECRET: &str = "imgate-dev-secret-not-for-production";
/// The gRPC api key the dev profile accepts.
pub const DEV_API_KEY: &str = "dev-key";
/// The marker the shipped example configs put where a real secret or address belongs.
pub const PLACEHOLDER: &str = "CHANGE-ME";
/// Shortest HS256 secret prod accepts (RFC 7518 §3.2: a key at least as long as the hash).
const MIN_PROD_SECRET: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    #[default]
    Dev,
    Prod,
}

impl Profile {
    /// The name a config file uses: `dev` or `prod` (for logs and CLI output).
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Dev => "dev",
            Profile::Prod => "prod",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub profile: Profile,
    pub listen: ListenConfig,
    pub instance: InstanceConfig,
    pub state: StateConfig,
    pub cluster: ClusterConfig,
    pub upstream: UpstreamConfig,
    pub auth: AuthConfig,
    pub grpc: GrpcConfig,
    pub tls: TlsConfig,
    pub sessions: SessionsConfig,
    pub limits: LimitsConfig,
    pub quic: QuicConfig,
    pub net: NetConfig,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            profile: Profile::Dev,
            listen: ListenConfig::default(),
            instance: InstanceConfig::default(),
            state: StateConfig::default(),
            cluster: ClusterConfig::default(),
            upstream: UpstreamConfig::default(),
            auth: AuthConfig::default(),
            grpc: GrpcConfig::default(),
            tls: TlsConfig::default(),
            sessions: SessionsConfig::default(),
            limits: LimitsConfig::default(),
            quic: QuicConfig::default(),
            net: NetConfig::default(),
            shutdown: ShutdownConfig::default(),
            log: LogConfig::default(),
        }
    }
}

/// A configuration problem; the message names the key. The CLI exits with code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Syntax(String),
    #[error("unknown key `{0}`")]
    UnknownKey(String),
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: String, message: String },
}

pub(crate) fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

impl Config {
    /// The effective HS256 secret: configured, else the dev secret in dev.
    pub fn jwt_secret(&self) -> Option<String> {
        if !self.auth.jwt_secret.is_empty() {
            Some(self.auth.jwt_secret.clone())
        } else if self.profile == Profile::Dev {
            Some(DEV_JWT_SECRET.to_string())
        } else {
            None
        }
    }

    /// The effective gRPC api keys: configured, plus `dev-key` in dev.
    pub fn api_keys(&self) -> Vec<String> {
        let mut keys = self.grpc.api_keys.clone();
        if self.profile == Profile::Dev {
            keys.push(DEV_API_KEY.to_string());
        }
        keys
    }

    /// The instance id: configured, else `<hostname>-<pid>`.
    pub fn instance_id(&self) -> String {
        if !self.instance.id.is_empty() {
            return self.instance.id.clone();
        }
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "imgate".into());
        format!("{host}-{}", std::process::id())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn as_json(c: &Config) -> serde_json::Value {
        serde_json::to_value(c).unwrap()
    }

    #[test]
    fn default_toml_is_the_embedded_default() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"))
                .unwrap();
        let parsed = Config::from_toml_str(&text, vec![]).unwrap();
        assert_eq!(as_json(&parsed), as_json(&Config::default()));
        // And every key of the embedded default is written in the file.
        let table: toml::Table = text.parse().unwrap();
        let full = toml::Table::try_from(Config::default()).unwrap();
        for (section, v) in &full {
            match v {
                toml::Value::Table(keys) => {
                    for k in keys.keys() {
                        assert!(
                            table.get(section).and_then(|s| s.get(k)).is_some(),
                            "{section}.{k} is not documented"
                        );
                    }
                }
                _ => assert!(table.contains_key(section), "{section} is not documented"),
            }
        }
    }

    #[test]
    fn example_files() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config/");
        let dev = Config::load(Some(Path::new(&format!("{dir}dev.toml"))), vec![]).unwrap();
        assert_eq!(dev.profile, Profile::Dev);
        dev.validate().unwrap();
        let prod = Config::load(Some(Path::new(&format!("{dir}prod.toml"))), vec![]).unwrap();
        assert_eq!(prod.profile, Profile::Prod);
        // Its key files live on the production host, not here: validation names the key.
        let err = prod.validate().unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::from_toml_str("[listen]\nhtp = \"x\"", vec![]).unwrap_err();
        assert_eq!(e.to_string(), "unknown key `listen.htp`");
        let e = Config::from_toml_str("colour = 1", vec![]).unwrap_err();
        assert_eq!(e.to_string(), "unknown key `colour`");
        let e = Config::from_toml_str("", env(&[("IMGATE__LIMITS__MAX_FRAMES", "1")])).unwrap_err();
        assert_eq!(e.to_string(), "unknown key `limits.max_frames`");
    }

    #[test]
    fn bad_values_are_named() {
        let e = Config::from_toml_str("[sessions]\nheartbeat = \"soon\"", vec![]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("invalid value for `sessions.heartbeat`"),
            "{e}"
        );
        let e = Config::from_toml_str("[sessions]\npolicy = \"many\"", vec![]).unwrap_err();
        assert!(e.to_string().contains("sessions.policy"), "{e}");
        let mut c = Config::default();
        c.listen.http = "nowhere".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("listen.http"));
        let mut c = Config::default();
        c.state.backend = StateBackend::Redis;
        for url in ["", "http://redis:6379", "redis://a:1,redis://b:notaport"] {
            c.state.redis_url = url.into();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("state.redis_url"), "{url}: {e}");
        }
        c.state.redis_url = "rediss://imgate:pw@a:6380".into();
        c.validate().unwrap();
        c.state.redis_url = "redis://a:1, redis://b:2".into();
        c.validate().unwrap();
        c.state.key_prefix = "app{1}:".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("state.key_prefix"));
        let mut c = Config::default();
        c.shutdown.drain_window = c.shutdown.timeout;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("shutdown.drain_window"));
        let mut c = Config::default();
        c.net.trusted_proxies = vec!["10.0.0.0/33".into()];
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("net.trusted_proxies"));
    }

    #[test]
    fn env_overrides() {
        let c = Config::from_toml_str(
            "[listen]\ngrpc = \"127.0.0.1:1\"",
            env(&[
                ("IMGATE__LISTEN__GRPC", "127.0.0.1:50052"),
                ("IMGATE__LIMITS__MAX_FRAME", "1024"),
                ("IMGATE__NET__TRUSTED_PROXIES", "[\"10.0.0.0/8\"]"),
                ("IMGATE__SESSIONS__HEARTBEAT", "5s"),
                ("IMGATE__PROFILE", "prod"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen.grpc, "127.0.0.1:50052");
        assert_eq!(c.limits.max_frame, 1024);
        assert_eq!(c.net.trusted_proxies, vec!["10.0.0.0/8"]);
        assert_eq!(c.sessions.heartbeat, Duration::from_secs(5));
        assert_eq!(c.profile, Profile::Prod);
        // An empty value disables a listener.
        let c = Config::from_toml_str("", env(&[("IMGATE__LISTEN__GRPC", "")])).unwrap();
        assert_eq!(c.listen.grpc, "");
    }

    #[test]
    fn durations() {
        for (s, ms) in [
            ("500ms", 500),
            ("10s", 10_000),
            ("5m", 300_000),
            ("2h", 7_200_000),
            ("7d", 604_800_000),
            ("3", 3000),
        ] {
            assert_eq!(
                duration::parse(s).unwrap(),
                Duration::from_millis(ms),
                "{s}"
            );
        }
        assert!(duration::parse("5 parsecs").is_err());
        assert!(duration::parse("").is_err());
        let c = Config::from_toml_str("[auth]\nleeway = 45", vec![]).unwrap();
        assert_eq!(c.auth.leeway, Duration::from_secs(45));
    }

    /// A prod config that passes: every later check starts from it and breaks one thing.
    fn good_prod() -> Config {
        let mut c = Config {
            profile: Profile::Prod,
            ..Config::default()
        };
        c.tls.terminated_upstream = true;
        c.auth.jwt_secret = "a-real-secret-of-enough-length-0123456789".into();
        c.grpc.api_keys = vec!["k-123".into()];
        c.upstream.mode = UpstreamMode::Grpc;
        c.upstream.endpoint = "http://backend.internal:7000".into();
        c.state.backend = StateBackend::Redis;
        c.state.redis_url = "redis://redis.internal:6379".into();
        c
    }

    fn refused(c: &Config) -> String {
        c.validate().expect_err("refused").to_string()
    }

    #[test]
    fn prod_refuses_dev_material() {
        let c = good_prod();
        assert!(c.validate().unwrap().is_empty());
        assert_eq!(
            c.jwt_secret().as_deref(),
            Some("a-real-secret-of-enough-length-0123456789")
        );
        assert_eq!(c.api_keys(), vec!["k-123"]);
        for (key, breaks) in [
            (
                "auth.jwt_secret",
                (|c| c.auth.jwt_secret.clear()) as fn(&mut Config),
            ),
            ("auth.jwt_secret", |c| {
                c.auth.jwt_secret = DEV_JWT_SECRET.into()
            }),
            ("grpc.api_keys", |c| c.grpc.api_keys.clear()),
            ("grpc.api_keys", |c| {
                c.grpc.api_keys = vec![DEV_API_KEY.into()]
            }),
            ("tls.cert_file", |c| c.tls.terminated_upstream = false),
        ] {
            let mut c = good_prod();
            breaks(&mut c);
            assert!(refused(&c).contains(key), "{key}: {}", refused(&c));
        }
    }

    /// Each configuration the security review called fail-open is refused, naming its key.
    #[test]
    fn prod_fails_closed() {
        for (key, breaks) in [
            // Relay lets any client write into any user's inbox.
            (
                "upstream.mode",
                (|c| c.upstream.mode = UpstreamMode::Relay) as fn(&mut Config),
            ),
            // Memory state loses every inbox on restart, unless accepted.
            ("state.backend", |c| c.state.backend = StateBackend::Memory),
            // Placeholders from the shipped examples.
            ("auth.jwt_secret", |c| {
                c.auth.jwt_secret = "CHANGE-ME-CHANGE-ME-CHANGE-ME-CHANGE-ME".into()
            }),
            ("grpc.api_keys", |c| {
                c.grpc.api_keys = vec!["CHANGE-ME-to-a-long-random-key".into()]
            }),
            ("state.redis_url", |c| {
                c.state.redis_url = "rediss://imgate:CHANGE-ME@redis.internal:6380".into()
            }),
            ("upstream.endpoint", |c| {
                c.upstream.endpoint = "http://CHANGE-ME:7000".into()
            }),
            // An HS256 secret shorter than the hash.
            ("auth.jwt_secret", |c| {
                c.auth.jwt_secret = "short-secret".into()
            }),
        ] {
            let mut c = good_prod();
            breaks(&mut c);
            assert!(refused(&c).contains(key), "{key}: {}", refused(&c));
        }
        let mut c = good_prod();
        c.state.backend = StateBackend::Memory;
        c.state.memory_in_prod = true;
        let warnings = c.validate().unwrap();
        assert!(
            warnings.iter().any(|w| w.contains("memory_in_prod")),
            "{warnings:?}"
        );
    }

    /// mTLS without TLS would serve the gRPC API in plaintext with no credentials (any
    /// profile); the gRPC certificate and key go together.
    #[test]
    fn grpc_tls_material_goes_together() {
        let dir = std::env::temp_dir().join(format!("imgate-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "not read by validate").unwrap();
        for profile in [Profile::Dev, Profile::Prod] {
            let mut c = good_prod();
            c.profile = profile;
            c.grpc.api_keys.clear();
            c.grpc.client_ca = ca.display().to_string();
            assert!(refused(&c).contains("grpc.client_ca"), "{}", refused(&c));
        }
        let mut c = good_prod();
        c.grpc.tls_cert = ca.display().to_string();
        assert!(refused(&c).contains("grpc.tls_key"), "{}", refused(&c));
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A file that leaves out `profile` is refused instead of running dev.
    #[test]
    fn a_file_declares_its_profile() {
        let dir = std::env::temp_dir().join(format!("imgate-profile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "[listen]\nhttp = \"0.0.0.0:8080\"\n[auth]\njwt_secret = \"real\"\n",
        )
        .unwrap();
        let e = Config::load(Some(&file), vec![]).unwrap_err().to_string();
        assert!(e.starts_with("invalid value for `profile`"), "{e}");
        // Declaring it in the environment counts.
        let c = Config::load(Some(&file), env(&[("IMGATE__PROFILE", "dev")])).unwrap();
        assert_eq!(c.profile, Profile::Dev);
        // No file at all is the embedded dev default.
        assert_eq!(Config::load(None, vec![]).unwrap().profile, Profile::Dev);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn dev_warns_and_has_dev_material() {
        let c = Config::default();
        let w = c.validate().unwrap();
        assert!(w.iter().any(|w| w.contains("built-in secret")));
        assert_eq!(c.jwt_secret().as_deref(), Some(DEV_JWT_SECRET));
        assert!(c.api_keys().contains(&DEV_API_KEY.to_string()));
    }
}
