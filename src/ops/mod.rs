//! Operations: metrics, health and readiness, shutdown.
pub mod logging;
pub mod metrics;
pub mod server;
