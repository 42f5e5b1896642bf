//! Configuration: one struct, loaded from TOML, overridden from the environment.
//!
//! Every key is documented in `config/default.toml`; `Config::default()` is the
//! embedded dev profile that `imgate serve` runs with no `--config`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

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
    /// PEM file of the CA that signs Redis's certificate (`rediss://`) when it is not a
    /// public one; empty: the system's root certificates.
    pub redis_ca_file: String,
    /// Prefix of every Redis key this gateway writes (several deployments can share one
    /// Redis). No `{` or `}`: those would change the Redis Cluster hash tag.
    pub key_prefix: String,
    /// Bound on every state operation: a dead store answers UNAVAILABLE this fast.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Redis: presence of an instance that stopped refreshing it (it died) disappears after
    /// this long. Refreshed every `presence_ttl / 3` (at most every 5 s).
    #[serde(with = "duration")]
    pub presence_ttl: Duration,
    /// The prod profile refuses `backend = "memory"` unless this says that losing every
    /// inbox, cursor, group and revocation on restart is accepted (one instance, no Redis).
    pub memory_in_prod: bool,
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
    /// Tokens whose `exp - iat` is longer are refused; revocations are remembered this long.
    #[serde(with = "duration")]
    pub max_token_lifetime: Duration,
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
    /// Encoded bytes a connection may have queued for writing before it is closed with 4100
    /// (SPEC §5: slow is bytes, so a burst of small pushes is never mistaken for it).
    pub outbound_queue_bytes: usize,
    /// Most frames written per flush.
    pub write_batch: usize,
    /// Device cursors kept per user; beyond it the least recently acked device's cursor is
    /// forgotten (that device then resumes from the user's cursor).
    pub max_devices: usize,
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
    /// Connections accepted and still in their handshake (TCP until the WebSocket upgrade,
    /// QUIC until the WebTransport session is set up), per node; more are dropped at once.
    pub max_handshakes: usize,
    /// IPv6 clients are counted per prefix of this length by `max_per_ip`.
    pub ipv6_prefix: u8,
    /// A TCP/TLS/HTTP handshake must complete within this.
    #[serde(with = "duration")]
    pub handshake_timeout: Duration,
    /// A write to a client (frames, a ping, a kick, a close) not taken within this closes
    /// the connection.
    #[serde(with = "duration")]
    pub write_timeout: Duration,
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

/// WebTransport's QUIC transport. Keep-alive and idle timeout follow `sessions.heartbeat` and
/// `sessions.idle_timeout`; the handshake is bounded by `limits.handshake_timeout`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuicConfig {
    /// Bidirectional streams a client may have open at once, counting the session's CONNECT
    /// stream and the control stream; streams beyond the control stream are stopped and counted.
    pub max_streams: u32,
    /// Bytes a client may have in flight to the gateway on the control stream.
    pub stream_window: u32,
    /// Bytes a client may have in flight to the gateway over the whole connection.
    pub receive_window: u32,
    /// Bytes the gateway keeps unacknowledged toward one client.
    pub send_window: u64,
    /// Bytes of datagrams buffered per session, each way; excess datagrams are dropped.
    pub datagram_buffer: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct NetConfig {
    /// CIDRs whose `X-Forwarded-For` / PROXY protocol v2 is believed.
    pub trusted_proxies: Vec<String>,
    /// Connections from trusted proxies start with a PROXY protocol v2 header (required).
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
            quic: QuicConfig::default(),
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
            redis_ca_file: String::new(),
            key_prefix: "imgate:".into(),
            timeout: Duration::from_secs(1),
            presence_ttl: Duration::from_secs(30),
            memory_in_prod: false,
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
            max_token_lifetime: Duration::from_secs(30 * 24 * 3600),
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
            outbound_queue: 4096,
            outbound_queue_bytes: 1024 * 1024,
            write_batch: 32,
            max_devices: 64,
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
            max_handshakes: 10_000,
            ipv6_prefix: 64,
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            rate_per_sec: 50,
            rate_burst: 100,
            rate_close_after: Duration::from_secs(10),
            max_push_body: 64 * 1024,
            max_batch_users: 10_000,
        }
    }
}

impl Default for QuicConfig {
    fn default() -> Self {
        QuicConfig {
            max_streams: 4,
            stream_window: 128 * 1024,
            receive_window: 256 * 1024,
            send_window: 512 * 1024,
            datagram_buffer: 4 * 1024,
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
        let n: u64 = num.parse().map_err(|_| {
            format!("invalid duration {s:?}: expected e.g. \"500ms\", \"10s\", \"5m\", \"7d\"")
        })?;
        let ms = match unit.trim() {
            "ms" => n,
            "" | "s" => n * 1000,
            "m" => n * 60_000,
            "h" => n * 3_600_000,
            "d" => n * 86_400_000,
            other => {
                return Err(format!(
                    "invalid duration unit {other:?} in {s:?}: use ms, s, m, h or d"
                ))
            }
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

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

const ENV_PREFIX: &str = "IMGATE__";

impl Config {
    /// Load a file (or the embedded default when `path` is None), then apply `IMGATE__…`
    /// overrides from `env` (pass `std::env::vars()`).
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.display().to_string(),
                source,
            })?,
            None => return Config::from_toml_str("", env),
        };
        Config::parse(&text, env, true)
    }

    /// Parse TOML text (empty: every default) with environment overrides applied.
    pub fn from_toml_str(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        Config::parse(text, env, false)
    }

    /// A file must name its profile (SPEC §9): one that leaves it out would otherwise run
    /// the dev profile, with `/dev/token` signing the file's real secret and `dev-key`
    /// accepted. `IMGATE__PROFILE` counts as declaring it.
    fn parse(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
        require_profile: bool,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax(e.to_string()))?;
        apply_env(&mut table, env)?;
        if require_profile && !table.contains_key("profile") {
            return Err(invalid(
                "profile",
                "a config file must declare profile = \"dev\" or profile = \"prod\"",
            ));
        }
        let de = toml::Value::Table(table);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            if let Some(rest) = inner.strip_prefix("unknown field `") {
                // The path already ends with the unknown field's name.
                let field = rest.split('`').next().unwrap_or(rest);
                let key = if path == "." || path.is_empty() {
                    field.to_string()
                } else {
                    path
                };
                ConfigError::UnknownKey(key)
            } else {
                invalid(&path, inner.lines().next().unwrap_or("").to_string())
            }
        })
    }

    /// Check what serde cannot; returns warnings worth logging at start.
    pub fn validate(&self) -> Result<Vec<String>, ConfigError> {
        let mut warnings = Vec::new();
        for (key, value) in [
            ("listen.http", &self.listen.http),
            ("listen.https", &self.listen.https),
            ("listen.webtransport", &self.listen.webtransport),
            ("listen.grpc", &self.listen.grpc),
            ("listen.ops", &self.listen.ops),
        ] {
            if !value.is_empty() && value.parse::<SocketAddr>().is_err() {
                return Err(invalid(
                    key,
                    format!("{value:?} is not a socket address like 127.0.0.1:8080"),
                ));
            }
        }
        for p in &self.net.trusted_proxies {
            if p.parse::<ipnet::IpNet>().is_err() && p.parse::<std::net::IpAddr>().is_err() {
                return Err(invalid(
                    "net.trusted_proxies",
                    format!("{p:?} is not an IP address or CIDR"),
                ));
            }
        }
        for (key, n) in [
            ("state.inbox_max", self.state.inbox_max),
            ("state.replay_limit", self.state.replay_limit),
            ("sessions.max_per_user", self.sessions.max_per_user),
            ("sessions.max_devices", self.sessions.max_devices),
            ("sessions.outbound_queue", self.sessions.outbound_queue),
            (
                "sessions.outbound_queue_bytes",
                self.sessions.outbound_queue_bytes,
            ),
            ("sessions.write_batch", self.sessions.write_batch),
            ("limits.max_frame", self.limits.max_frame),
            ("limits.max_connections", self.limits.max_connections),
            ("limits.max_per_ip", self.limits.max_per_ip),
            (
                "limits.max_unauthenticated",
                self.limits.max_unauthenticated,
            ),
            ("limits.max_handshakes", self.limits.max_handshakes),
            ("limits.max_push_body", self.limits.max_push_body),
            ("limits.max_batch_users", self.limits.max_batch_users),
            ("limits.rate_per_sec", self.limits.rate_per_sec as usize),
            ("limits.rate_burst", self.limits.rate_burst as usize),
            ("auth.cache_max_entries", self.auth.cache_max_entries),
            ("quic.stream_window", self.quic.stream_window as usize),
            ("quic.receive_window", self.quic.receive_window as usize),
            ("quic.send_window", self.quic.send_window as usize),
            ("quic.datagram_buffer", self.quic.datagram_buffer),
        ] {
            if n == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        for (key, d) in [
            ("sessions.heartbeat", self.sessions.heartbeat),
            ("sessions.idle_timeout", self.sessions.idle_timeout),
            ("auth.auth_timeout", self.auth.auth_timeout),
            ("auth.max_token_lifetime", self.auth.max_token_lifetime),
            ("limits.handshake_timeout", self.limits.handshake_timeout),
            ("limits.write_timeout", self.limits.write_timeout),
            ("upstream.timeout", self.upstream.timeout),
            ("state.timeout", self.state.timeout),
            ("state.presence_ttl", self.state.presence_ttl),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if self.sessions.idle_timeout <= self.sessions.heartbeat {
            return Err(invalid(
                "sessions.idle_timeout",
                "must be longer than sessions.heartbeat",
            ));
        }
        if self.shutdown.drain_window >= self.shutdown.timeout {
            // The last kicks would go out at the deadline, and the process exit before
            // they are written.
            return Err(invalid(
                "shutdown.drain_window",
                "must be shorter than shutdown.timeout",
            ));
        }
        if self.quic.max_streams < 2 {
            return Err(invalid(
                "quic.max_streams",
                "at least 2 (the session's CONNECT stream and the control stream)",
            ));
        }
        if !(1..=128).contains(&self.limits.ipv6_prefix) {
            return Err(invalid("limits.ipv6_prefix", "between 1 and 128"));
        }
        if self.limits.max_frame > 16 * 1024 * 1024 {
            return Err(invalid("limits.max_frame", "at most 16 MiB"));
        }
        for a in &self.auth.algorithms {
            if !["HS256", "RS256", "ES256"].contains(&a.as_str()) {
                return Err(invalid(
                    "auth.algorithms",
                    format!("{a:?}: use HS256, RS256 or ES256"),
                ));
            }
        }
        if self.upstream.mode == UpstreamMode::Grpc && self.upstream.endpoint.is_empty() {
            return Err(invalid(
                "upstream.endpoint",
                "required when upstream.mode = \"grpc\"",
            ));
        }
        if self.auth.mode == AuthMode::Grpc && self.auth.endpoint.is_empty() {
            return Err(invalid(
                "auth.endpoint",
                "required when auth.mode = \"grpc\"",
            ));
        }
        if self.state.backend == StateBackend::Redis {
            crate::state::redis::url::parse_urls(&self.state.redis_url)
                .map_err(|e| invalid("state.redis_url", e))?;
        }
        if self.state.key_prefix.contains(['{', '}']) {
            return Err(invalid(
                "state.key_prefix",
                "no { or }: they would change the Redis Cluster hash tag of every key",
            ));
        }
        if (self.tls.cert_file.is_empty()) != (self.tls.key_file.is_empty()) {
            return Err(invalid(
                "tls.key_file",
                "tls.cert_file and tls.key_file go together",
            ));
        }
        if (self.grpc.tls_cert.is_empty()) != (self.grpc.tls_key.is_empty()) {
            return Err(invalid(
                "grpc.tls_key",
                "grpc.tls_cert and grpc.tls_key go together",
            ));
        }
        if !self.grpc.client_ca.is_empty() && self.grpc.tls_cert.is_empty() {
            // mTLS without TLS would serve the API in plaintext with no credentials.
            return Err(invalid(
                "grpc.client_ca",
                "client certificates need TLS: set grpc.tls_cert and grpc.tls_key",
            ));
        }
        for (key, path) in [
            ("tls.cert_file", &self.tls.cert_file),
            ("tls.key_file", &self.tls.key_file),
            ("auth.jwks_file", &self.auth.jwks_file),
            ("state.redis_ca_file", &self.state.redis_ca_file),
            ("grpc.tls_cert", &self.grpc.tls_cert),
            ("grpc.tls_key", &self.grpc.tls_key),
            ("grpc.client_ca", &self.grpc.client_ca),
        ]
        .into_iter()
        .chain(
            self.auth
                .jwt_public_keys
                .iter()
                .map(|p| ("auth.jwt_public_keys", p)),
        ) {
            if !path.is_empty() && !Path::new(path).is_file() {
                return Err(invalid(key, format!("file {path:?} does not exist")));
            }
        }
        match self.profile {
            Profile::Prod => self.validate_prod(&mut warnings)?,
            Profile::Dev => {
                if self.auth.jwt_secret.is_empty() && self.auth.mode == AuthMode::Jwt {
                    warnings.push(format!(
                        "dev profile: tokens are signed with the built-in secret {DEV_JWT_SECRET:?}; never expose this instance"
                    ));
                }
                if !self.listen.grpc.is_empty() {
                    warnings.push(format!(
                        "dev profile: the gRPC API accepts the api key {DEV_API_KEY:?}"
                    ));
                }
                if self.tls.cert_file.is_empty() {
                    warnings
                        .push("dev profile: serving a generated self-signed certificate".into());
                }
            }
        }
        Ok(warnings)
    }

    /// The prod profile fails closed (SPEC §9): each refusal names the key to fix.
    fn validate_prod(&self, warnings: &mut Vec<String>) -> Result<(), ConfigError> {
        let has_keys = !self.auth.jwt_public_keys.is_empty() || !self.auth.jwks_file.is_empty();
        if self.auth.mode == AuthMode::Jwt && !has_keys && self.auth.jwt_secret.is_empty() {
            return Err(invalid(
                "auth.jwt_secret",
                "prod needs a JWT secret, public keys or a JWKS file",
            ));
        }
        if self.auth.jwt_secret == DEV_JWT_SECRET {
            return Err(invalid(
                "auth.jwt_secret",
                "the dev secret is refused in prod",
            ));
        }
        if !self.auth.jwt_secret.is_empty() && self.auth.jwt_secret.len() < MIN_PROD_SECRET {
            return Err(invalid(
                "auth.jwt_secret",
                format!("an HS256 secret needs at least {MIN_PROD_SECRET} bytes in prod"),
            ));
        }
        // Placeholders of the shipped examples must not reach production.
        let secrets = [
            ("auth.jwt_secret", &self.auth.jwt_secret),
            ("auth.endpoint", &self.auth.endpoint),
            ("upstream.endpoint", &self.upstream.endpoint),
            ("state.redis_url", &self.state.redis_url),
        ]
        .into_iter()
        .chain(self.grpc.api_keys.iter().map(|k| ("grpc.api_keys", k)));
        for (key, value) in secrets {
            if value.contains(PLACEHOLDER) {
                return Err(invalid(
                    key,
                    format!("still holds the placeholder {PLACEHOLDER}: put the real value"),
                ));
            }
        }
        if !self.listen.grpc.is_empty() {
            if self.grpc.api_keys.is_empty() && self.grpc.client_ca.is_empty() {
                return Err(invalid(
                    "grpc.api_keys",
                    "prod needs gRPC api keys or grpc.client_ca (mTLS)",
                ));
            }
            if self
                .grpc
                .api_keys
                .iter()
                .any(|k| k == DEV_API_KEY || k.is_empty())
            {
                return Err(invalid(
                    "grpc.api_keys",
                    "the dev key and empty keys are refused in prod",
                ));
            }
        }
        if self.upstream.mode == UpstreamMode::Relay {
            return Err(invalid(
                "upstream.mode",
                "\"relay\" lets any client write into any user's inbox; prod needs \"grpc\"",
            ));
        }
        if self.state.backend == StateBackend::Memory {
            if !self.state.memory_in_prod {
                return Err(invalid(
                    "state.backend",
                    "\"memory\" loses every inbox, cursor, group and revocation on restart; \
                     use \"redis\", or set state.memory_in_prod = true to accept that",
                ));
            }
            warnings.push(
                "prod with in-memory state (state.memory_in_prod): a restart loses every inbox, cursor, group and revocation".into(),
            );
        }
        let serves_tls = !self.listen.https.is_empty() || !self.listen.webtransport.is_empty();
        if serves_tls && self.tls.cert_file.is_empty() && !self.tls.terminated_upstream {
            return Err(invalid(
                "tls.cert_file",
                "prod needs TLS certificate files, or tls.terminated_upstream = true",
            ));
        }
        Ok(())
    }

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

/// Apply `IMGATE__SECTION__KEY=value` (or `IMGATE__KEY` for top-level keys) to the table.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (name, value) in env {
        let Some(path) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let parts: Vec<String> = path.split("__").map(|p| p.to_ascii_lowercase()).collect();
        if parts.iter().any(|p| p.is_empty()) || parts.len() > 2 {
            return Err(ConfigError::UnknownKey(format!(
                "{} (from {name})",
                parts.join(".")
            )));
        }
        // A value is TOML when it parses as one (`100`, `true`, `["a"]`), else a string.
        let parsed = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(value.clone()));
        let mut target = &mut *table;
        for section in &parts[..parts.len() - 1] {
            let entry = target
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            target = entry
                .as_table_mut()
                .ok_or_else(|| invalid(section, "is not a section"))?;
        }
        target.insert(parts[parts.len() - 1].clone(), parsed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
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
