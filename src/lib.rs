//! imgate: the front door of an instant-messaging backend.
//!
//! Clients hold WebSocket or WebTransport sessions; business services push over gRPC.
//! See docs/architecture.md for the tour of these modules.

pub mod auth;
pub mod config;
pub mod ops;
pub mod protocol;
pub mod state;
pub mod tls;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
