//! The sections of the configuration, one type each, with their defaults. Each is handed
//! whole to the component it configures (`SessionEnv` takes `[sessions]` and `[limits]`,
//! the push API `[limits]`, the QUIC endpoint `[quic]`).

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration;

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
    /// The prod profile refuses `backend = "memory"` unless this says that losing every
    /// inbox, cursor, group and revocation on restart is accepted (one instance, no Redis).
    pub memory_in_prod: bool,
}

/// `[cluster]` (SPEC §11): how instances sharing a Redis know each other.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Every instance refreshes its registration this often; it is also the period of the
    /// inbox-head check that makes up for a lost bus notification.
    #[serde(with = "duration")]
    pub heartbeat: Duration,
    /// An instance silent this long is dead: the others remove its presence and routes.
    #[serde(with = "duration")]
    pub instance_ttl: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            heartbeat: Duration::from_secs(2),
            instance_ttl: Duration::from_secs(10),
        }
    }
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
