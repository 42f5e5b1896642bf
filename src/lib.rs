//! imgate: the front door of an instant-messaging backend.
//!
//! Clients hold WebSocket or WebTransport sessions; business services push over gRPC.
//! docs/architecture.md walks through these modules.

pub mod accept;
pub mod app;
pub mod auth;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod delivery;
pub mod grpc;
pub mod http_util;
pub mod hub;
pub mod lifecycle;
pub mod limits;
pub mod ops;
pub mod protocol;
pub mod services;
pub mod session;
pub mod state;
pub mod tls;
pub mod transport;
pub mod upstream;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
