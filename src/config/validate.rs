//! What serde cannot check: value ranges, keys that go together, files that must exist,
//! and the prod profile's refusals (SPEC §9). One function per concern, each naming the key
//! it refuses.

use std::net::SocketAddr;
use std::path::Path;

use super::*;

impl Config {
    /// Check what serde cannot; returns warnings worth logging at start.
    pub fn validate(&self) -> Result<Vec<String>, ConfigError> {
        self.check_listen()?;
        self.check_trusted_proxies()?;
        self.check_counts()?;
        self.check_durations()?;
        self.check_bounds()?;
        self.check_backends()?;
        self.check_tls()?;
        self.check_files()?;
        let mut warnings = Vec::new();
        match self.profile {
            Profile::Prod => self.validate_prod(&mut warnings)?,
            Profile::Dev => self.dev_warnings(&mut warnings),
        }
        Ok(warnings)
    }

    /// Listeners are socket addresses.
    fn check_listen(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// `net.trusted_proxies` are addresses or CIDRs.
    fn check_trusted_proxies(&self) -> Result<(), ConfigError> {
        for p in &self.net.trusted_proxies {
            if p.parse::<ipnet::IpNet>().is_err() && p.parse::<std::net::IpAddr>().is_err() {
                return Err(invalid(
                    "net.trusted_proxies",
                    format!("{p:?} is not an IP address or CIDR"),
                ));
            }
        }
        Ok(())
    }

    /// Sizes and counts that must not be zero.
    fn check_counts(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// Durations that must not be zero.
    fn check_durations(&self) -> Result<(), ConfigError> {
        for (key, d) in [
            ("sessions.heartbeat", self.sessions.heartbeat),
            ("sessions.idle_timeout", self.sessions.idle_timeout),
            ("auth.auth_timeout", self.auth.auth_timeout),
            ("auth.max_token_lifetime", self.auth.max_token_lifetime),
            ("limits.handshake_timeout", self.limits.handshake_timeout),
            ("limits.write_timeout", self.limits.write_timeout),
            ("upstream.timeout", self.upstream.timeout),
            ("state.timeout", self.state.timeout),
            ("cluster.heartbeat", self.cluster.heartbeat),
            ("cluster.instance_ttl", self.cluster.instance_ttl),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        Ok(())
    }

    /// Values bounded by another key or by the protocol.
    fn check_bounds(&self) -> Result<(), ConfigError> {
        if self.sessions.idle_timeout <= self.sessions.heartbeat {
            return Err(invalid(
                "sessions.idle_timeout",
                "must be longer than sessions.heartbeat",
            ));
        }
        if self.cluster.instance_ttl < self.cluster.heartbeat * 2 {
            // One late heartbeat (a busy Redis, a descheduled process) would declare a
            // live instance dead and have the others drop its presence.
            return Err(invalid(
                "cluster.instance_ttl",
                "must be at least twice cluster.heartbeat",
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
        Ok(())
    }

    /// Auth, upstream and state backends: what each mode needs.
    fn check_backends(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// Keys that go together for TLS and mTLS.
    fn check_tls(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// Files that must exist.
    fn check_files(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// What the dev profile serves that must never be exposed.
    fn dev_warnings(&self, warnings: &mut Vec<String>) {
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
            warnings.push("dev profile: serving a generated self-signed certificate".into());
        }
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
}
