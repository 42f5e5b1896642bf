//! The in-memory state on its own: durable appends per second and memory per retained entry.
//!
//! ```text
//! cargo run --release --example state_bench
//! ```

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use imgate::state::memory::MemoryState;
use imgate::state::Settings;
use imgate::state::{NewMessage, State};

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap()
}

#[tokio::main]
async fn main() {
    const USERS: usize = 10_000;
    const PER_USER: usize = 100;
    const BODY: usize = 64;
    let state = Arc::new(MemoryState::new(&Settings::default()));
    let body = Bytes::from(vec![b'x'; BODY]);
    let before = rss_kib();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..2 {
        let (state, body) = (state.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_USER {
                for u in (t..USERS).step_by(2) {
                    let msg = NewMessage {
                        id: format!("{u:08}-{i:04}-0123456789abcdef"),
                        from: "sender-1234".into(),
                        kind: "text".into(),
                        body: body.clone(),
                        ts_ms: 0,
                    };
                    state.append(&format!("user-{u}"), msg).await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    let n = USERS * PER_USER;
    let after = rss_kib();
    println!(
        "appends: {n} to {USERS} users in {:.2} s: {:.0}/s",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64()
    );
    println!(
        "memory: {} KiB for {n} entries ({BODY}-byte bodies, 31-byte ids, with dedupe): {:.0} bytes per entry",
        after - before,
        (after - before) as f64 * 1024.0 / n as f64
    );
    let started = Instant::now();
    let mut read = 0;
    for u in 0..USERS {
        read += state
            .read_after(&format!("user-{u}"), 0, 200)
            .await
            .unwrap()
            .messages
            .len();
    }
    println!(
        "replay reads: {read} entries in {:.2} s: {:.0} entries/s",
        started.elapsed().as_secs_f64(),
        read as f64 / started.elapsed().as_secs_f64()
    );
}
