//! Configuration: one struct, loaded from TOML, overridden from the environment.
//!
//! Every key is documented in `config/default.toml`; `Config::default()` is the
//! embedded dev profile that `imgate serve` runs with no `--config`.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The HS256 secret of the dev profile. Warned about at start; refused by prod.
pub const DEV_JWT_SECRET: &str = "imgate-dev-secret-not-for-production";
/// The gRPC api key the dev profile accepts.
pub const DEV_API_KEY: &str = "dev-key";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    #[default]
    Dev,
    Prod,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub profile: Profile,
    pub listen: ListenConfig,
    pub instance: InstanceConfig,
    pub state: StateConfig,
    pub upstream: UpstreamConfig,
    pub auth: AuthConfig,
    pub grpc: GrpcConfig,
    pub tls: TlsConfig,
    pub sessions: SessionsConfig,
    pub limits: LimitsConfig,
    pub net: NetConfig,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
}

/// Socket addresses; an empty string disables that listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    pub http: String,
    pub https: String,
    pub webtransport: String,
    pub grpc: String,
    pub ops: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct InstanceConfig {
    /// Empty: derived from the host name and process id at start.
    pub id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateBackend {
    Memory,
    Redis,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    pub backend: StateBackend,
    pub redis_url: String,
    pub inbox_max: usize,
    #[serde(with = "duration")]
    pub inbox_ttl: Duration,
    #[serde(with = "duration")]
    pub dedupe_window: Duration,
    pub replay_limit: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamMode {
    Relay,
    Grpc,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub mode: UpstreamMode,
    pub endpoint: String,
    #[serde(with = "duration")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Jwt,
    Grpc,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub mode: AuthMode,
    pub endpoint: String,
    /// HS256 shared secret (empty: HS256 disabled, except the dev secret in dev).
    pub jwt_secret: String,
    /// PEM public key files for RS256 / ES256.
    pub jwt_public_keys: Vec<String>,
    /// A JWKS JSON file (keys selected by `kid`).
    pub jwks_file: String,
    /// Accepted algorithms: any of "HS256", "RS256", "ES256".
    pub algorithms: Vec<String>,
    pub issuer: String,
    pub audience: String,
    #[serde(with = "duration")]
    pub leeway: Duration,
    /// How long an unauthenticated session may wait for its `auth` frame.
    #[serde(with = "duration")]
    pub auth_timeout: Duration,
    #[serde(with = "duration")]
    pub cache_ttl: Duration,
    #[serde(with = "duration")]
    pub negative_ttl: Duration,
    pub cache_max_entries: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    pub api_keys: Vec<String>,
    pub tls_cert: String,
    pub tls_key: String,
    /// PEM CA bundle: when set, callers must present a client certificate it signed (mTLS).
    pub client_ca: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain and key for HTTPS and WebTransport. Empty: a generated
    /// self-signed dev certificate (dev profile only), rotated before it expires.
    pub cert_file: String,
    pub key_file: String,
    /// A load balancer terminates TLS in front of imgate (prod without cert files).
    pub terminated_upstream: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoginPolicy {
    Multi,
    OnePerPlatform,
    OnePerUser,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    pub policy: LoginPolicy,
    pub max_per_user: usize,
    /// Interval of server pings; also announced to clients as `heartbeat_ms`.
    #[serde(with = "duration")]
    pub heartbeat: Duration,
    /// No inbound traffic (frames, pongs) for this long closes the session with 4102.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// Frames a connection may have queued for writing before it is closed with 4100.
    pub outbound_queue: usize,
    /// Most frames written per flush.
    pub write_batch: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest inbound frame in bytes (4505 above it).
    pub max_frame: usize,
    /// Connections per node; more get HTTP 503 at the handshake.
    pub max_connections: usize,
    /// Connections per client address; more get HTTP 429.
    pub max_per_ip: usize,
    /// Sessions open but not yet authenticated, per node.
    pub max_unauthenticated: usize,
    /// A TCP/TLS/HTTP handshake must complete within this.
    #[serde(with = "duration")]
    pub handshake_timeout: Duration,
    /// Inbound frames per second per connection (token bucket rate) and burst.
    pub rate_per_sec: u32,
    pub rate_burst: u32,
    /// Excess sustained this long closes the connection with 4104.
    #[serde(with = "duration")]
    pub rate_close_after: Duration,
    /// Largest pushed body accepted over gRPC.
    pub max_push_body: usize,
    /// Most user ids in one `PushToUsers` / `GetUserStatus` / `SetGroupMembers` call.
    pub max_batch_users: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct NetConfig {
    /// CIDRs whose `X-Forwarded-For` / PROXY protocol v2 is believed.
    pub trusted_proxies: Vec<String>,
    /// Accept PROXY protocol v2 headers from trusted proxies on the public listeners.
    pub proxy_protocol: bool,
    /// Browser origins allowed to connect (exact `scheme://host[:port]`, or `*`).
    /// Empty: in dev, any localhost / 127.0.0.1 / [::1] origin; in prod, none.
    /// Requests without an `Origin` header (non-browser clients) are always allowed.
    pub allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    #[serde(with = "duration")]
    pub drain_window: Duration,
    #[serde(with = "duration")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter, e.g. "info" or "imgate=debug".
    pub level: String,
    /// "text" or "json".
    pub format: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            profile: Profile::Dev,
            listen: ListenConfig::default(),
            instance: InstanceConfig::default(),
            state: StateConfig::default(),
            upstream: UpstreamConfig::default(),
            auth: AuthConfig::default(),
            grpc: GrpcConfig::default(),
            tls: TlsConfig::default(),
            sessions: SessionsConfig::default(),
            limits: LimitsConfig::default(),
            net: NetConfig::default(),
            shutdown: ShutdownConfig::default(),
            log: LogConfig::default(),
        }
    }
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            http: "127.0.0.1:8080".into(),
            https: "127.0.0.1:8443".into(),
            webtransport: "127.0.0.1:4433".into(),
            grpc: "127.0.0.1:50051".into(),
            ops: "127.0.0.1:9090".into(),
        }
    }
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            backend: StateBackend::Memory,
            redis_url: String::new(),
            inbox_max: 1000,
            inbox_ttl: Duration::from_secs(7 * 24 * 3600),
            dedupe_window: Duration::from_secs(600),
            replay_limit: 200,
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            mode: UpstreamMode::Relay,
            endpoint: String::new(),
            timeout: Duration::from_secs(3),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::Jwt,
            endpoint: String::new(),
            jwt_secret: String::new(),
            jwt_public_keys: Vec::new(),
            jwks_file: String::new(),
            algorithms: vec!["HS256".into(), "RS256".into(), "ES256".into()],
            issuer: String::new(),
            audience: String::new(),
            leeway: Duration::from_secs(30),
            auth_timeout: Duration::from_secs(10),
            cache_ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(10),
            cache_max_entries: 100_000,
        }
    }
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            policy: LoginPolicy::Multi,
            max_per_user: 10,
            heartbeat: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            outbound_queue: 256,
            write_batch: 32,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_frame: 64 * 1024,
            max_connections: 200_000,
            max_per_ip: 1_000,
            max_unauthenticated: 20_000,
            handshake_timeout: Duration::from_secs(10),
            rate_per_sec: 50,
            rate_burst: 100,
            rate_close_after: Duration::from_secs(10),
            max_push_body: 64 * 1024,
            max_batch_users: 10_000,
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_window: Duration::from_secs(10),
            timeout: Duration::from_secs(30),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

impl ListenConfig {
    /// The parsed address of a listener, `None` when disabled (empty string).
    /// Addresses are validated at load, so this does not fail afterwards.
    pub fn addr(value: &str) -> Option<SocketAddr> {
        if value.is_empty() {
            None
        } else {
            value.parse().ok()
        }
    }
}

/// Durations as human strings: "250ms", "10s", "5m", "2h", "7d" (or a bare number of seconds).
pub mod duration {
    use std::time::Duration;

    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: expected e.g. \"500ms\", \"10s\", \"5m\", \"7d\""))?;
        let ms = match unit.trim() {
            "ms" => n,
            "" | "s" => n * 1000,
            "m" => n * 60_000,
            "h" => n * 3_600_000,
            "d" => n * 86_400_000,
            other => return Err(format!("invalid duration unit {other:?} in {s:?}: use ms, s, m, h or d")),
        };
        Ok(Duration::from_millis(ms))
    }

    pub fn format(d: &Duration) -> String {
        let ms = d.as_millis() as u64;
        if ms % 86_400_000 == 0 && ms > 0 {
            format!("{}d", ms / 86_400_000)
        } else if ms % 3_600_000 == 0 && ms > 0 {
            format!("{}h", ms / 3_600_000)
        } else if ms % 60_000 == 0 && ms > 0 {
            format!("{}m", ms / 60_000)
        } else if ms % 1000 == 0 {
            format!("{}s", ms / 1000)
        } else {
            format!("{ms}ms")
        }
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Duration::from_secs(n)),
            Raw::Str(s) => parse(&s).map_err(de::Error::custom),
        }
    }
}
