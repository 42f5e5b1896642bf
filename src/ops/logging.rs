//! Logs: `tracing` with structured fields, text or JSON, on stdout. Tokens and message
//! bodies are never logged anywhere in the gateway, and dependencies are kept from doing it
//! (below).

use std::io::IsTerminal;

use tracing::{Level, Metadata};
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::LogConfig;

/// Whether an event may be written whatever the configured filter allows: the gateway's
/// own at any level, its dependencies' at info and above only. Below info they write
/// secrets: wtransport logs every CONNECT header set at debug (`:path` with `?token=…`,
/// `authorization`), tungstenite frame payloads (`auth` frames) at trace, and the HTTP and
/// gRPC stacks headers. So `log.level = "debug"` or `RUST_LOG=trace` never puts a token in
/// the logs; a dependency's own debug output is for a debugger, not for production logs.
pub fn allowed(meta: &Metadata<'_>) -> bool {
    is_own(meta.target()) || *meta.level() <= Level::INFO
}

fn is_own(target: &str) -> bool {
    target == "imgate" || target.starts_with("imgate::")
}

pub fn init(cfg: &LogConfig) {
    // RUST_LOG, when set, wins over the config for quick debugging.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.level));
    // Colour is for a person at a terminal; in a file or a log collector the escape codes
    // are noise that breaks grep.
    let ansi = std::io::stdout().is_terminal();
    let fmt = tracing_subscriber::fmt::layer().with_ansi(ansi);
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(filter_fn(allowed));
    let _ = if cfg.format == "json" {
        registry.with(fmt.json()).try_init()
    } else {
        registry.with(fmt).try_init()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_targets_only() {
        assert!(is_own("imgate"));
        assert!(is_own("imgate::transport::wt"));
        assert!(!is_own("imgate_other"));
        assert!(!is_own("wtransport::driver"));
        assert!(!is_own("tungstenite::protocol"));
    }
}
