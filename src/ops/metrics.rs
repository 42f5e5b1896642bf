//! Prometheus metrics (SPEC §8). Every series is registered and touched at zero at start, so
//! dashboards and alerts see it before the first event. Label values are bounded `&'static
//! str`s: never a user, device, group or message id.

use std::sync::OnceLock;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::protocol::CloseCode;
use crate::transport::Transport;

/// The metric names SPEC §8 promises (more are exported).
pub const SPEC_NAMES: [&str; 18] = [
    "imgate_connections",
    "imgate_connections_opened_total",
    "imgate_connections_closed_total",
    "imgate_auth_total",
    "imgate_frames_received_total",
    "imgate_frames_sent_total",
    "imgate_bytes_received_total",
    "imgate_bytes_sent_total",
    "imgate_push_requests_total",
    "imgate_push_delivery_seconds",
    "imgate_upstream_seconds",
    "imgate_token_cache_total",
    "imgate_state_seconds",
    "imgate_state_errors_total",
    "imgate_state_up",
    "imgate_cluster_messages_total",
    "imgate_instances",
    "imgate_build_info",
];

/// The `transport` label values: every `Transport`, so a new one is never missing.
pub const TRANSPORTS: [&str; Transport::ALL.len()] = {
    let mut out = [""; Transport::ALL.len()];
    let mut i = 0;
    while i < out.len() {
        out[i] = Transport::ALL[i].as_str();
        i += 1;
    }
    out
};
/// The `code` label values: 1000 (the client closed), 1006 (the connection was lost), then
/// every SPEC §4 `CloseCode`.
pub const CLOSE_CODES: [&str; 2 + CloseCode::ALL.len()] = {
    let mut out = [""; 2 + CloseCode::ALL.len()];
    out[0] = "1000";
    out[1] = "1006";
    let mut i = 0;
    while i < CloseCode::ALL.len() {
        out[2 + i] = CloseCode::ALL[i].as_str();
        i += 1;
    }
    out
};
pub const CLIENT_FRAME_TYPES: [&str; 5] = ["auth", "send", "ack", "ping", "unknown"];
pub const SERVER_FRAME_TYPES: [&str; 8] = [
    "welcome", "push", "synced", "reply", "reauth", "pong", "error", "kick",
];
pub const AUTH_RESULTS: [&str; 5] = ["ok", "invalid", "expired", "revoked", "unavailable"];
pub const TOKEN_CACHE_RESULTS: [&str; 3] = ["hit", "miss", "negative"];
pub const PUSH_METHODS: [&str; 6] = [
    "PushToUser",
    "PushToUsers",
    "PushToGroup",
    "Broadcast",
    "PushStream",
    "relay",
];
pub const PUSH_RESULTS: [&str; 4] = ["ok", "invalid_argument", "unavailable", "unauthenticated"];
pub const UPSTREAM_RESULTS: [&str; 4] = ["ok", "error", "timeout", "unavailable"];
pub const STATE_OPS: [&str; 14] = [
    "append",
    "append_many",
    "resume",
    "maintain",
    "read",
    "head",
    "cursors",
    "ack",
    "group_set",
    "group_get",
    "revoke",
    "presence",
    "route",
    "publish",
];
pub const STATE_BACKENDS: [&str; 2] = ["memory", "redis"];
pub const CLUSTER_DIRECTIONS: [&str; 2] = ["in", "out"];
pub const REJECT_REASONS: [&str; 12] = [
    "node_limit",
    "ip_limit",
    "unauth_limit",
    "handshake_limit",
    "quic_retry",
    "handshake_timeout",
    "origin",
    "bad_request",
    "unauthorized",
    "draining",
    "not_found",
    "no_control_stream",
];
/// The listeners that run `accept::serve`: the public ones by transport label, and ops.
pub const TCP_LISTENERS: [&str; 3] = ["ws", "wss", "ops"];
/// Why a WebTransport datagram was not answered.
pub const DATAGRAM_DROPS: [&str; 2] = ["rate", "invalid"];

/// Latency buckets from 100 µs to 10 s.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Install the process-wide recorder once (tests start many gateways in one process) and
/// return the handle `/metrics` renders.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
                .expect("buckets are not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            describe();
            touch();
            let _ = HOT.set(Hot::register());
            handle
        })
        .clone()
}

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric, declared once: name, kind, unit and help. `describe` registers them all;
/// the label sets each is touched with are the constants above.
#[rustfmt::skip]
const METRICS: &[(&str, Kind, Option<Unit>, &str)] = &[
    ("imgate_connections", Kind::Gauge, None, "Open authenticated sessions"),
    ("imgate_connections_opened_total", Kind::Counter, None, "Sessions opened (after the transport handshake)"),
    ("imgate_connections_closed_total", Kind::Counter, None, "Sessions closed, by close code"),
    ("imgate_connections_rejected_total", Kind::Counter, None, "Handshakes refused before a session opened, by reason"),
    ("imgate_unauthenticated_sessions", Kind::Gauge, None, "Sessions waiting for their auth frame"),
    ("imgate_auth_total", Kind::Counter, None, "Token checks, by result"),
    ("imgate_token_cache_total", Kind::Counter, None, "Token cache lookups, by result"),
    ("imgate_frames_received_total", Kind::Counter, None, "Inbound frames, by type"),
    ("imgate_frames_sent_total", Kind::Counter, None, "Outbound frames, by type"),
    ("imgate_bytes_received_total", Kind::Counter, Some(Unit::Bytes), "Inbound frame bytes"),
    ("imgate_bytes_sent_total", Kind::Counter, Some(Unit::Bytes), "Outbound frame bytes"),
    ("imgate_slow_consumer_total", Kind::Counter, None, "Connections closed with 4100 (outbound queue full)"),
    ("imgate_rate_limited_total", Kind::Counter, None, "Rate-limit episodes (error rate_limited sent)"),
    ("imgate_frames_dropped_total", Kind::Counter, None, "Inbound frames dropped, by reason"),
    ("imgate_push_requests_total", Kind::Counter, None, "Push requests, by method and result"),
    ("imgate_push_delivery_seconds", Kind::Histogram, Some(Unit::Seconds), "Push accepted to frame written to the socket"),
    ("imgate_upstream_seconds", Kind::Histogram, Some(Unit::Seconds), "Client send handled upstream, by result"),
    ("imgate_state_seconds", Kind::Histogram, Some(Unit::Seconds), "State store operation latency"),
    ("imgate_state_errors_total", Kind::Counter, None, "Failed state store operations"),
    ("imgate_state_up", Kind::Gauge, None, "1 when the state store answers"),
    ("imgate_cluster_messages_total", Kind::Counter, None, "Messages exchanged with other instances"),
    ("imgate_instances", Kind::Gauge, None, "Instances in the cluster"),
    ("imgate_draining", Kind::Gauge, None, "1 while the instance drains"),
    ("imgate_webtransport_streams_refused_total", Kind::Counter, None, "Extra WebTransport streams refused"),
    ("imgate_webtransport_datagrams_total", Kind::Counter, None, "WebTransport datagrams, by direction"),
    ("imgate_webtransport_datagrams_dropped_total", Kind::Counter, None, "WebTransport datagrams not answered: over the rate limit or not a ping"),
    ("imgate_status_changes_dropped_total", Kind::Counter, None, "Presence changes dropped while the backend was away"),
    ("imgate_certificate_expiry_seconds", Kind::Gauge, Some(Unit::Seconds), "Seconds until the served TLS certificate expires, by source (file or generated)"),
    ("imgate_build_info", Kind::Gauge, None, "Build information"),
    ("imgate_accept_errors_total", Kind::Counter, None, "Failed accepts on a TCP listener, by listener"),
];

fn describe() {
    for &(name, kind, unit, help) in METRICS {
        match (kind, unit) {
            (Kind::Counter, Some(unit)) => describe_counter!(name, unit, help),
            (Kind::Counter, None) => describe_counter!(name, help),
            (Kind::Gauge, Some(unit)) => describe_gauge!(name, unit, help),
            (Kind::Gauge, None) => describe_gauge!(name, help),
            (Kind::Histogram, Some(unit)) => describe_histogram!(name, unit, help),
            (Kind::Histogram, None) => describe_histogram!(name, help),
        }
    }
}

/// Create every series at zero.
fn touch() {
    for t in TRANSPORTS {
        gauge!("imgate_connections", "transport" => t).set(0.0);
        counter!("imgate_connections_opened_total", "transport" => t).absolute(0);
        for c in CLOSE_CODES {
            counter!("imgate_connections_closed_total", "transport" => t, "code" => c).absolute(0);
        }
        for ty in CLIENT_FRAME_TYPES {
            counter!("imgate_frames_received_total", "transport" => t, "type" => ty).absolute(0);
        }
        for ty in SERVER_FRAME_TYPES {
            counter!("imgate_frames_sent_total", "transport" => t, "type" => ty).absolute(0);
        }
        counter!("imgate_bytes_received_total", "transport" => t).absolute(0);
        counter!("imgate_bytes_sent_total", "transport" => t).absolute(0);
        counter!("imgate_slow_consumer_total", "transport" => t).absolute(0);
        counter!("imgate_rate_limited_total", "transport" => t).absolute(0);
        counter!("imgate_frames_dropped_total", "transport" => t, "reason" => "rate_limited")
            .absolute(0);
    }
    for r in REJECT_REASONS {
        counter!("imgate_connections_rejected_total", "reason" => r).absolute(0);
    }
    gauge!("imgate_unauthenticated_sessions").set(0.0);
    for r in AUTH_RESULTS {
        counter!("imgate_auth_total", "result" => r).absolute(0);
    }
    for r in TOKEN_CACHE_RESULTS {
        counter!("imgate_token_cache_total", "result" => r).absolute(0);
    }
    for m in PUSH_METHODS {
        for r in PUSH_RESULTS {
            counter!("imgate_push_requests_total", "method" => m, "result" => r).absolute(0);
        }
    }
    let _ = histogram!("imgate_push_delivery_seconds");
    for r in UPSTREAM_RESULTS {
        let _ = histogram!("imgate_upstream_seconds", "result" => r);
    }
    for b in STATE_BACKENDS {
        for op in STATE_OPS {
            let _ = histogram!("imgate_state_seconds", "backend" => b, "op" => op);
            counter!("imgate_state_errors_total", "backend" => b, "op" => op).absolute(0);
        }
    }
    gauge!("imgate_state_up").set(1.0);
    for d in CLUSTER_DIRECTIONS {
        counter!("imgate_cluster_messages_total", "direction" => d).absolute(0);
        counter!("imgate_webtransport_datagrams_total", "direction" => d).absolute(0);
    }
    gauge!("imgate_instances").set(1.0);
    gauge!("imgate_draining").set(0.0);
    counter!("imgate_webtransport_streams_refused_total").absolute(0);
    for r in DATAGRAM_DROPS {
        counter!("imgate_webtransport_datagrams_dropped_total", "reason" => r).absolute(0);
    }
    counter!("imgate_status_changes_dropped_total").absolute(0);
    for l in TCP_LISTENERS {
        counter!("imgate_accept_errors_total", "listener" => l).absolute(0);
    }
}

/// Update a series through its registered handle (`Hot`) when there is one, else through
/// the macro's registry lookup.
macro_rules! hot_or {
    ($handle:expr, $lookup:expr, $op:ident($value:expr)) => {
        match HOT.get().and_then($handle) {
            Some(handle) => handle.$op($value),
            None => $lookup.$op($value),
        }
    };
}

/// Handles on the series touched for every frame and every push. The macros look a series
/// up in the registry on each call (hash the name and labels, compare, clone a handle): a few
/// percent of the gateway's CPU under push load. Series outside these sets (and every
/// series before `install`) still go through the macros.
struct Hot {
    /// `[transport][type]`
    frames_received: Vec<Counter>,
    frames_sent: Vec<Counter>,
    bytes_received: Vec<Counter>,
    bytes_sent: Vec<Counter>,
    /// `[method][result]`
    push_requests: Vec<Counter>,
    push_delivery: Histogram,
    /// `[backend][op]`
    state_seconds: Vec<Histogram>,
}

static HOT: OnceLock<Hot> = OnceLock::new();

impl Hot {
    fn register() -> Hot {
        let pairs = |a: &'static [&'static str], b: &'static [&'static str]| {
            a.iter()
                .flat_map(move |x| b.iter().map(move |y| (*x, *y)))
                .collect::<Vec<_>>()
        };
        Hot {
            frames_received: pairs(&TRANSPORTS, &CLIENT_FRAME_TYPES)
                .into_iter()
                .map(|(t, ty)| counter!("imgate_frames_received_total", "transport" => t, "type" => ty))
                .collect(),
            frames_sent: pairs(&TRANSPORTS, &SERVER_FRAME_TYPES)
                .into_iter()
                .map(|(t, ty)| counter!("imgate_frames_sent_total", "transport" => t, "type" => ty))
                .collect(),
            bytes_received: TRANSPORTS
                .iter()
                .map(|t| counter!("imgate_bytes_received_total", "transport" => *t))
                .collect(),
            bytes_sent: TRANSPORTS
                .iter()
                .map(|t| counter!("imgate_bytes_sent_total", "transport" => *t))
                .collect(),
            push_requests: pairs(&PUSH_METHODS, &PUSH_RESULTS)
                .into_iter()
                .map(|(m, r)| counter!("imgate_push_requests_total", "method" => m, "result" => r))
                .collect(),
            push_delivery: histogram!("imgate_push_delivery_seconds"),
            state_seconds: pairs(&STATE_BACKENDS, &STATE_OPS)
                .into_iter()
                .map(|(b, op)| histogram!("imgate_state_seconds", "backend" => b, "op" => op))
                .collect(),
        }
    }
}

/// Where `value` sits in a label set.
fn at(set: &[&str], value: &str) -> Option<usize> {
    set.iter().position(|s| *s == value)
}

/// The handle for `(a, b)` in a `[a][b]` table, when both are known labels.
fn cell<'h, T>(table: &'h [T], set_a: &[&str], a: &str, set_b: &[&str], b: &str) -> Option<&'h T> {
    Some(&table[at(set_a, a)? * set_b.len() + at(set_b, b)?])
}

pub fn build_info() {
    gauge!("imgate_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

pub fn connection_opened(transport: &'static str) {
    counter!("imgate_connections_opened_total", "transport" => transport).increment(1);
}

pub fn connection_closed(transport: &'static str, code: &'static str) {
    counter!("imgate_connections_closed_total", "transport" => transport, "code" => code)
        .increment(1);
}

pub fn connections_delta(transport: &'static str, delta: i64) {
    gauge!("imgate_connections", "transport" => transport).increment(delta as f64);
}

pub fn frame_received(transport: &'static str, ty: &'static str) {
    hot_or!(
        |h| cell(
            &h.frames_received,
            &TRANSPORTS,
            transport,
            &CLIENT_FRAME_TYPES,
            ty
        ),
        counter!("imgate_frames_received_total", "transport" => transport, "type" => ty),
        increment(1)
    );
}

pub fn frames_sent(transport: &'static str, ty: &'static str, n: u64) {
    hot_or!(
        |h| cell(
            &h.frames_sent,
            &TRANSPORTS,
            transport,
            &SERVER_FRAME_TYPES,
            ty
        ),
        counter!("imgate_frames_sent_total", "transport" => transport, "type" => ty),
        increment(n)
    );
}

pub fn bytes_received(transport: &'static str, n: u64) {
    hot_or!(
        |h| h.bytes_received.get(at(&TRANSPORTS, transport)?),
        counter!("imgate_bytes_received_total", "transport" => transport),
        increment(n)
    );
}

pub fn bytes_sent(transport: &'static str, n: u64) {
    hot_or!(
        |h| h.bytes_sent.get(at(&TRANSPORTS, transport)?),
        counter!("imgate_bytes_sent_total", "transport" => transport),
        increment(n)
    );
}

pub fn rejected(reason: &'static str) {
    counter!("imgate_connections_rejected_total", "reason" => reason).increment(1);
}

pub fn unauthenticated_delta(delta: i64) {
    gauge!("imgate_unauthenticated_sessions").increment(delta as f64);
}

pub fn auth_result(result: &'static str) {
    counter!("imgate_auth_total", "result" => result).increment(1);
}

pub fn token_cache(result: &'static str) {
    counter!("imgate_token_cache_total", "result" => result).increment(1);
}

pub fn slow_consumer(transport: &'static str) {
    counter!("imgate_slow_consumer_total", "transport" => transport).increment(1);
}

pub fn rate_limited(transport: &'static str) {
    counter!("imgate_rate_limited_total", "transport" => transport).increment(1);
}

pub fn frame_dropped(transport: &'static str, reason: &'static str) {
    counter!("imgate_frames_dropped_total", "transport" => transport, "reason" => reason)
        .increment(1);
}

pub fn push_request(method: &'static str, result: &'static str) {
    hot_or!(
        |h| cell(
            &h.push_requests,
            &PUSH_METHODS,
            method,
            &PUSH_RESULTS,
            result
        ),
        counter!("imgate_push_requests_total", "method" => method, "result" => result),
        increment(1)
    );
}

pub fn push_delivery(seconds: f64) {
    hot_or!(
        |h| Some(&h.push_delivery),
        histogram!("imgate_push_delivery_seconds"),
        record(seconds)
    );
}

pub fn upstream(result: &'static str, seconds: f64) {
    histogram!("imgate_upstream_seconds", "result" => result).record(seconds);
}

pub fn state_op(backend: &'static str, op: &'static str, seconds: f64) {
    hot_or!(
        |h| cell(&h.state_seconds, &STATE_BACKENDS, backend, &STATE_OPS, op),
        histogram!("imgate_state_seconds", "backend" => backend, "op" => op),
        record(seconds)
    );
}

pub fn state_error(backend: &'static str, op: &'static str) {
    counter!("imgate_state_errors_total", "backend" => backend, "op" => op).increment(1);
}

pub fn state_up(up: bool) {
    gauge!("imgate_state_up").set(if up { 1.0 } else { 0.0 });
}

pub fn cluster_message(direction: &'static str) {
    counter!("imgate_cluster_messages_total", "direction" => direction).increment(1);
}

pub fn instances(n: usize) {
    gauge!("imgate_instances").set(n as f64);
}

pub fn status_change_dropped(n: u64) {
    counter!("imgate_status_changes_dropped_total").increment(n);
}

pub fn wt_stream_refused() {
    counter!("imgate_webtransport_streams_refused_total").increment(1);
}

pub fn wt_datagram(direction: &'static str) {
    counter!("imgate_webtransport_datagrams_total", "direction" => direction).increment(1);
}

pub fn wt_datagram_dropped(reason: &'static str) {
    counter!("imgate_webtransport_datagrams_dropped_total", "reason" => reason).increment(1);
}

/// Seconds until the served certificate expires (negative once it has). `source` is `file`
/// (configured PEM files) or `generated` (the dev certificate, rotated by the gateway). Not
/// touched at zero: an instance that serves no TLS has no certificate to count down, and a
/// zero would read as "expired".
pub fn certificate_expiry(source: &'static str, seconds: f64) {
    gauge!("imgate_certificate_expiry_seconds", "source" => source).set(seconds);
}

pub fn accept_failed(listener: &'static str) {
    counter!("imgate_accept_errors_total", "listener" => listener).increment(1);
}

pub fn draining(on: bool) {
    gauge!("imgate_draining").set(if on { 1.0 } else { 0.0 });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small exposition-format checker: comment lines, then `name{labels} value` lines
    /// whose names were declared by a `# TYPE` line.
    fn check_exposition(text: &str) {
        let mut typed = std::collections::HashSet::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split(' ');
                let name = parts.next().unwrap();
                let kind = parts.next().unwrap();
                assert!(
                    ["counter", "gauge", "histogram", "summary"].contains(&kind),
                    "{line}"
                );
                typed.insert(name.to_string());
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect(line);
            assert!(
                value.parse::<f64>().is_ok() || value == "+Inf",
                "bad value in {line}"
            );
            let name = series.split('{').next().unwrap();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| typed.contains(*b)))
                .unwrap_or(name);
            assert!(typed.contains(base), "{name} has no # TYPE");
            if let Some(labels) = series.strip_prefix(name) {
                if !labels.is_empty() {
                    assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
                    for pair in labels[1..labels.len() - 1].split("\",") {
                        let (k, v) = pair.split_once('=').expect(line);
                        assert!(
                            k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                            "{line}"
                        );
                        assert!(v.starts_with('"'), "{line}");
                    }
                }
            }
        }
    }

    #[test]
    fn every_spec_series_exists_from_start() {
        let handle = install();
        build_info();
        let text = handle.render();
        for name in SPEC_NAMES {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
        assert!(text.contains("imgate_connections_closed_total{transport=\"wt\",code=\"4507\"} 0"));
        assert!(text.contains("imgate_push_delivery_seconds_bucket{le=\"0.0001\"}"));
        check_exposition(&text);
    }
}
