//! The token cache: bounded; a valid result lives until min(ttl, exp), an invalid one for
//! `negative_ttl`. Keys are SHA-256 digests of the token, never the token itself.
//!
//! Valid and invalid results are kept apart, each bounded and evicted oldest first in O(1):
//! a flood of distinct bad tokens churns only the invalid side and never evicts a valid entry
//! (which, in `auth.mode = "grpc"`, would turn into a remote call) nor scans under the lock.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::{AuthError, Identity};
use crate::ops::metrics;

const SHARDS: usize = 16;

pub type Key = [u8; 32];

#[derive(Clone)]
struct Entry {
    result: Result<Identity, AuthError>,
    expires: Instant,
}

/// One side (valid or invalid results) of a shard: a map and its insertion order.
#[derive(Default)]
struct Side {
    map: HashMap<Key, Entry>,
    order: VecDeque<Key>,
}

impl Side {
    fn insert(&mut self, k: Key, e: Entry, cap: usize) {
        if self.map.insert(k, e).is_none() {
            self.order.push_back(k);
        }
        // Oldest first. `order` may name keys already removed (expired, evicted by user):
        // those are skipped, and each key is pushed once per insertion, so this is O(1)
        // amortised.
        while self.map.len() > cap {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
        if self.order.len() > cap.saturating_mul(2) {
            let map = &self.map;
            self.order.retain(|k| map.contains_key(k));
        }
    }
}

#[derive(Default)]
struct Shard {
    valid: Side,
    invalid: Side,
}

pub struct TokenCache {
    shards: Vec<Mutex<Shard>>,
    per_shard: usize,
    ttl: Duration,
    negative_ttl: Duration,
}

pub fn key(token: &str) -> Key {
    Sha256::digest(token.as_bytes()).into()
}

impl TokenCache {
    pub fn new(max_entries: usize, ttl: Duration, negative_ttl: Duration) -> TokenCache {
        TokenCache {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            per_shard: max_entries.div_ceil(SHARDS).max(1),
            ttl,
            negative_ttl,
        }
    }

    fn shard(&self, k: &Key) -> &Mutex<Shard> {
        &self.shards[k[0] as usize % SHARDS]
    }

    /// A cached result that has not expired; counts hit, negative or miss.
    pub fn get(&self, k: &Key) -> Option<Result<Identity, AuthError>> {
        let now = Instant::now();
        let mut guard = self.shard(k).lock();
        let shard = &mut *guard;
        for side in [&mut shard.valid, &mut shard.invalid] {
            match side.map.get(k) {
                Some(e) if e.expires > now => {
                    metrics::token_cache(if e.result.is_ok() { "hit" } else { "negative" });
                    return Some(e.result.clone());
                }
                Some(_) => {
                    side.map.remove(k);
                }
                None => {}
            }
        }
        metrics::token_cache("miss");
        None
    }

    /// Remember a verification result. Outages are never cached.
    pub fn put(&self, k: Key, result: &Result<Identity, AuthError>) {
        let now = Instant::now();
        let ttl = match result {
            Ok(id) => {
                let left =
                    Duration::from_millis((id.expires_at_ms - crate::now_ms()).max(0) as u64);
                self.ttl.min(left)
            }
            Err(AuthError::Unavailable(_)) => return,
            Err(_) => self.negative_ttl,
        };
        if ttl.is_zero() {
            return;
        }
        let entry = Entry {
            result: result.clone(),
            expires: now + ttl,
        };
        let mut shard = self.shard(&k).lock();
        if result.is_ok() {
            shard.invalid.map.remove(&k);
            shard.valid.insert(k, entry, self.per_shard);
        } else {
            shard.valid.map.remove(&k);
            shard.invalid.insert(k, entry, self.per_shard);
        }
    }

    /// Forget one entry.
    pub fn remove(&self, k: &Key) {
        let mut shard = self.shard(k).lock();
        shard.valid.map.remove(k);
        shard.invalid.map.remove(k);
    }

    /// Drop the valid entries of `user` (of its device `device` only, when given); returns
    /// how many. Revocation is rare: a scan is fine.
    pub fn evict(&self, user: &str, device: Option<&str>) -> u32 {
        let mut n = 0;
        for shard in &self.shards {
            shard.lock().valid.map.retain(|_, e| {
                let keep = !matches!(&e.result, Ok(id) if id.user == user
                    && device.is_none_or(|d| id.device.as_deref() == Some(d)));
                if !keep {
                    n += 1;
                }
                keep
            });
        }
        n
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let s = s.lock();
                s.valid.map.len() + s.invalid.map.len()
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(user: &str, exp_in_ms: i64) -> Identity {
        Identity {
            user: user.into(),
            device: None,
            platform: None,
            expires_at_ms: crate::now_ms() + exp_in_ms,
            issued: super::super::Issued::Claim(0),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn positive_negative_and_expiry() {
        let c = TokenCache::new(100, Duration::from_secs(60), Duration::from_secs(5));
        let (a, b, u) = (key("a"), key("b"), key("u"));
        assert!(c.get(&a).is_none());
        c.put(a, &Ok(id("alice", 3_600_000)));
        c.put(b, &Err(AuthError::Invalid("x".into())));
        c.put(u, &Err(AuthError::Unavailable("down".into())));
        assert_eq!(c.get(&a).unwrap().unwrap().user, "alice");
        assert!(c.get(&b).unwrap().is_err());
        assert!(c.get(&u).is_none(), "outages are not cached");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(
            c.get(&b).is_none(),
            "negative entries expire after negative_ttl"
        );
        assert!(c.get(&a).is_some());
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(c.get(&a).is_none(), "positive entries expire after ttl");
    }

    #[tokio::test(start_paused = true)]
    async fn ttl_is_capped_by_exp() {
        let c = TokenCache::new(100, Duration::from_secs(300), Duration::from_secs(5));
        let k = key("short");
        c.put(k, &Ok(id("a", 2_000)));
        assert!(c.get(&k).is_some());
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(c.get(&k).is_none());
    }

    #[test]
    fn bounded_and_evicts_by_user() {
        let c = TokenCache::new(32, Duration::from_secs(60), Duration::from_secs(5));
        for i in 0..1000 {
            c.put(
                key(&i.to_string()),
                &Ok(id(if i % 2 == 0 { "even" } else { "odd" }, 3_600_000)),
            );
        }
        assert!(c.len() <= 32, "{}", c.len());
        let before = c.len();
        let evicted = c.evict("even", None);
        assert_eq!(c.len(), before - evicted as usize);
        assert!(c
            .shards
            .iter()
            .all(|s| s
                .lock()
                .valid
                .map
                .values()
                .all(|e| e.result.as_ref().unwrap().user == "odd")));
    }

    /// Review F11: a flood of distinct bad tokens never evicts a valid entry.
    #[test]
    fn bad_tokens_do_not_evict_valid_ones() {
        let c = TokenCache::new(64, Duration::from_secs(60), Duration::from_secs(5));
        let good: Vec<Key> = (0..32).map(|i| key(&format!("good-{i}"))).collect();
        for k in &good {
            c.put(*k, &Ok(id("u", 3_600_000)));
        }
        for i in 0..100_000 {
            c.put(
                key(&format!("junk-{i}")),
                &Err(AuthError::Invalid("x".into())),
            );
        }
        assert!(good.iter().all(|k| c.get(k).is_some_and(|r| r.is_ok())));
        assert!(c.len() <= 2 * 64 + SHARDS, "{}", c.len());
    }
}
