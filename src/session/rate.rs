//! The per-connection inbound rate limit (SPEC §3): a token bucket; the first excess frame of
//! an episode is answered with `error rate_limited`, the rest are dropped, and excess
//! sustained past `rate_close_after` closes with 4104.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// First excess frame of an episode: tell the client.
    Warn,
    /// Further excess: drop silently.
    Drop,
    /// Excess sustained past the limit: close with 4104.
    Close,
}

#[derive(Debug)]
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    close_after: Duration,
    /// Start of the current excess episode and the latest excess frame in it. An episode
    /// ends after `QUIET` with no excess, so a client that keeps sending faster than the
    /// rate stays in one episode even though refilled tokens let some frames through.
    limited_since: Option<Instant>,
    last_excess: Instant,
}

const QUIET: Duration = Duration::from_secs(1);

impl RateLimiter {
    pub fn new(per_sec: u32, burst: u32, close_after: Duration, now: Instant) -> RateLimiter {
        let burst = f64::from(burst.max(1));
        RateLimiter {
            per_sec: f64::from(per_sec),
            burst,
            tokens: burst,
            last: now,
            close_after,
            limited_since: None,
            last_excess: now,
        }
    }

    pub fn check(&mut self, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            if now.saturating_duration_since(self.last_excess) >= QUIET {
                self.limited_since = None;
            }
            return Verdict::Allow;
        }
        self.last_excess = now;
        match self.limited_since {
            None => {
                self.limited_since = Some(now);
                Verdict::Warn
            }
            Some(since) if now.saturating_duration_since(since) >= self.close_after => {
                Verdict::Close
            }
            Some(_) => Verdict::Drop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_then_warn_drop_close() {
        let start = Instant::now();
        let mut r = RateLimiter::new(10, 3, Duration::from_secs(2), start);
        for _ in 0..3 {
            assert_eq!(r.check(start), Verdict::Allow);
        }
        assert_eq!(r.check(start), Verdict::Warn);
        assert_eq!(r.check(start), Verdict::Drop);
        // A quiet second refills the bucket and ends the episode: the next excess warns again.
        let t = start + Duration::from_millis(1100);
        for _ in 0..3 {
            assert_eq!(r.check(t), Verdict::Allow);
        }
        assert_eq!(r.check(t), Verdict::Warn);
        // Sustained: keep sending faster than the rate (some frames pass on refilled
        // tokens) for longer than close_after.
        let mut now = t;
        let mut verdict = Verdict::Drop;
        for _ in 0..1000 {
            now += Duration::from_millis(5);
            verdict = r.check(now);
            if verdict == Verdict::Close {
                break;
            }
        }
        assert_eq!(verdict, Verdict::Close);
        assert!(now.duration_since(t) >= Duration::from_secs(2));
    }
}
