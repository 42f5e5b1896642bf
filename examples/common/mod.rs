//! What the load generators (`bench`, `bare`) share: their command line, their knobs, their
//! WebSocket buffers and their quantiles.
#![allow(dead_code)] // each example uses its own part

use std::collections::HashMap;
use std::str::FromStr;

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// `MODE [--name value | --switch]...`
pub struct Flags {
    pub mode: String,
    values: HashMap<String, String>,
    switches: Vec<String>,
}

impl Flags {
    /// The process's arguments; `named` take a value, `switches` do not; anything else is an
    /// error.
    pub fn parse(named: &[&str], switches: &[&str]) -> Flags {
        let mut f = Flags {
            mode: String::new(),
            values: HashMap::new(),
            switches: Vec::new(),
        };
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            if named.contains(&a.as_str()) {
                let v = it.next().unwrap_or_else(|| panic!("{a} needs a value"));
                f.values.insert(a, v);
            } else if switches.contains(&a.as_str()) {
                f.switches.push(a);
            } else if f.mode.is_empty() && !a.starts_with("--") {
                f.mode = a;
            } else {
                panic!("unknown argument {a}");
            }
        }
        f
    }

    /// The value of `--name`, or `default` when absent.
    pub fn get<T: FromStr>(&self, name: &str, default: T) -> T {
        self.opt(name).unwrap_or(default)
    }

    pub fn opt<T: FromStr>(&self, name: &str) -> Option<T> {
        self.values.get(name).map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}: cannot use {v:?}"))
        })
    }

    pub fn has(&self, switch: &str) -> bool {
        self.switches.iter().any(|s| s == switch)
    }
}

/// A tuning knob from the environment (BENCH_*), or its default.
pub fn env_or<T: FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Small buffers, as the gateway's: tungstenite's default 128 KiB read buffer, zeroed as it
/// is used, made a load generator spend its time in page faults and memset.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(4096)
}

/// The `p` quantile of sorted nanosecond samples, in milliseconds.
pub fn quantile_ms(sorted: &[u64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(i).copied().unwrap_or(0) as f64 / 1e6
}
