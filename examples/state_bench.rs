//! The state on its own: durable appends per second and memory per retained entry.
//!
//! ```text
//! cargo run --release --example state_bench
//! STATE_BENCH_REDIS=redis://127.0.0.1:6390 cargo run --release --example state_bench
//! ```
//! With `STATE_BENCH_REDIS` (a Redis of its own: it is flushed first) it measures the Redis
//! backend instead, memory from Redis's `used_memory`, appends through `append_many`.

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
    if let Ok(url) = std::env::var("STATE_BENCH_REDIS") {
        return redis(&url).await;
    }
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

async fn used_memory(url: &str) -> u64 {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut c)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

async fn redis(url: &str) {
    use imgate::state::redis::RedisState;
    const USERS: usize = 10_000;
    const PER_USER: usize = 20;
    const BODY: usize = 64;
    {
        let client = redis::Client::open(url).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("FLUSHALL").query_async(&mut c).await.unwrap();
    }
    let mut settings = Settings::default();
    settings.state.redis_url = url.to_string();
    let state = RedisState::connect(&settings).await.unwrap();
    let users: Vec<String> = (0..USERS).map(|u| format!("user-{u}")).collect();
    let before = used_memory(url).await;
    let started = Instant::now();
    for i in 0..PER_USER {
        // One id for all users of a round is what PushToUsers does; ids are per user.
        let msg = NewMessage {
            id: format!("{i:08}-0000-0123456789abcdef"),
            from: "sender-1234".into(),
            kind: "text".into(),
            body: Bytes::from(vec![b'x'; BODY]),
            ts_ms: 0,
        };
        for r in state.append_many(&users, &msg).await {
            r.unwrap();
        }
    }
    let elapsed = started.elapsed();
    let n = USERS * PER_USER;
    let after = used_memory(url).await;
    println!(
        "redis appends: {n} to {USERS} users in {:.2} s: {:.0}/s",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64()
    );
    println!(
        "redis memory: {} KiB for {n} entries ({BODY}-byte bodies, 31-byte ids, with dedupe): {:.0} bytes per entry",
        (after - before) / 1024,
        (after - before) as f64 / n as f64
    );
    // Presence: one connection per user, as a gateway records it at login.
    let before = used_memory(url).await;
    for (i, u) in users.iter().enumerate() {
        state
            .add_presence(&imgate::state::Presence {
                user: u.clone(),
                conn: format!("{:016x}", i),
                device: "device-1234".into(),
                platform: "web".into(),
                transport: "ws".into(),
                instance: "gw-host-12345".into(),
                connected_at_ms: 1_700_000_000_000,
            })
            .await
            .unwrap();
    }
    let after = used_memory(url).await;
    println!(
        "redis presence: {:.0} bytes per connection (record and instance index)",
        (after - before) as f64 / USERS as f64
    );
}
