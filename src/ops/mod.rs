//! Operations: metrics, health and readiness, shutdown.
pub mod metrics;
