//! In-memory state: the embedded default, fit for single-node production.
//!
//! Users live in 64 shards behind sync mutexes that are never held across an await. A user
//! record holds the inbox (a `VecDeque` of contiguous seqs, oldest first), cursors and the
//! dedupe window. A retained entry costs about 400 bytes with a 64-byte body and a 31-byte
//! id, dedupe included (`cargo run --release --example state_bench`).

use bytes::Bytes;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;

use foldhash::fast::RandomState;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::*;
use crate::config::StateConfig;

const SHARDS: usize = 64;

struct Entry {
    msg: StoredMessage,
    at: Instant,
}

struct UserRecord {
    /// Chosen when the record is created; a record dropped and created again gets a new
    /// one, so positions from the old inbox are recognised as stale.
    epoch: String,
    head: u64,
    entries: VecDeque<Entry>,
    devices: Vec<(String, u64)>,
    user_cursor: u64,
    dedupe: HashMap<String, (u64, Instant), RandomState>,
    dedupe_prune_at: usize,
    touched: Instant,
}

impl UserRecord {
    fn new(now: Instant) -> UserRecord {
        UserRecord {
            epoch: format!("{:08x}", rand::random::<u32>()),
            head: 0,
            entries: VecDeque::new(),
            devices: Vec::new(),
            user_cursor: 0,
            dedupe: HashMap::default(),
            dedupe_prune_at: 64,
            touched: now,
        }
    }

    fn expire(&mut self, now: Instant, ttl: Duration) {
        while self
            .entries
            .front()
            .is_some_and(|e| now.duration_since(e.at) >= ttl)
        {
            self.entries.pop_front();
        }
    }

    fn prune_dedupe(&mut self, now: Instant, window: Duration) {
        self.dedupe
            .retain(|_, (_, at)| now.duration_since(*at) < window);
        self.dedupe_prune_at = (self.dedupe.len() * 2).max(64);
    }
}

/// One user's revocations.
#[derive(Default)]
struct Revoked {
    user: Option<i64>,
    devices: HashMap<String, i64>,
}

/// user → that user's connections, on every instance.
type PresenceShard = Mutex<HashMap<String, Vec<Presence>>>;

pub struct MemoryState {
    shards: Box<[Mutex<HashMap<String, UserRecord>>]>,
    hasher: RandomState,
    groups: Mutex<HashMap<String, HashSet<String>>>,
    /// user → (user-wide revocation, device → that device's revocation).
    revoked: Mutex<HashMap<String, Revoked>>,
    /// user → connections; apart from inbox records so presence costs no inbox.
    presence: Box<[PresenceShard]>,
    inbox_max: usize,
    ttl: Duration,
    dedupe_window: Duration,
}

impl MemoryState {
    pub fn new(cfg: &StateConfig) -> MemoryState {
        MemoryState {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::default(),
            groups: Mutex::new(HashMap::new()),
            revoked: Mutex::new(HashMap::new()),
            presence: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            inbox_max: cfg.inbox_max.max(1),
            ttl: cfg.inbox_ttl,
            dedupe_window: cfg.dedupe_window,
        }
    }

    /// Run `f` on the user's record, created if missing, after expiring old entries.
    fn with_user<T>(&self, user: &str, f: impl FnOnce(&mut UserRecord, Instant) -> T) -> T {
        let now = Instant::now();
        let mut shard = self.shards[(self.hasher.hash_one(user) as usize) % SHARDS].lock();
        let rec = match shard.get_mut(user) {
            Some(r) => r,
            None => shard
                .entry(user.to_string())
                .or_insert_with(|| UserRecord::new(now)),
        };
        rec.expire(now, self.ttl);
        rec.touched = now;
        f(rec, now)
    }

    /// Drop expired entries and dedupe ids, and forget users idle for longer than the
    /// inbox TTL whose inbox is empty. The gateway calls this periodically.
    pub fn sweep(&self) {
        let now = Instant::now();
        for shard in self.shards.iter() {
            shard.lock().retain(|_, rec| {
                rec.expire(now, self.ttl);
                rec.prune_dedupe(now, self.dedupe_window);
                !(rec.entries.is_empty()
                    && rec.dedupe.is_empty()
                    && now.duration_since(rec.touched) >= self.ttl)
            });
        }
    }

    fn presence_shard(&self, user: &str) -> &PresenceShard {
        &self.presence[(self.hasher.hash_one(user) as usize) % SHARDS]
    }

    /// Users with a record, and retained entries (for the bench and metrics).
    pub fn stats(&self) -> (usize, usize) {
        let mut users = 0;
        let mut entries = 0;
        for shard in self.shards.iter() {
            let s = shard.lock();
            users += s.len();
            entries += s.values().map(|r| r.entries.len()).sum::<usize>();
        }
        (users, entries)
    }
}

#[async_trait]
impl State for MemoryState {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn append(&self, user: &str, msg: NewMessage) -> Result<Appended, StateError> {
        let (max, window) = (self.inbox_max, self.dedupe_window);
        Ok(self.with_user(user, |rec, now| {
            if rec.dedupe.len() >= rec.dedupe_prune_at {
                rec.prune_dedupe(now, window);
            }
            if let Some((seq, at)) = rec.dedupe.get(&msg.id) {
                if now.duration_since(*at) < window {
                    return Appended {
                        seq: *seq,
                        epoch: rec.epoch.clone(),
                        duplicate: true,
                    };
                }
            }
            rec.head += 1;
            let seq = rec.head;
            rec.dedupe.insert(msg.id.clone(), (seq, now));
            rec.entries.push_back(Entry {
                msg: StoredMessage {
                    seq,
                    id: msg.id,
                    from: msg.from,
                    kind: msg.kind,
                    // A body decoded from a request is a slice of the connection's read
                    // buffer: kept as is, one small entry would pin kilobytes of it for the
                    // inbox's lifetime. Stored entries own their bytes.
                    body: Bytes::copy_from_slice(&msg.body),
                    ts_ms: msg.ts_ms,
                },
                at: now,
            });
            while rec.entries.len() > max {
                rec.entries.pop_front();
            }
            Appended {
                seq,
                epoch: rec.epoch.clone(),
                duplicate: false,
            }
        }))
    }

    async fn read_after(
        &self,
        user: &str,
        after: u64,
        limit: usize,
    ) -> Result<InboxRange, StateError> {
        Ok(self.with_user(user, |rec, _| {
            let first = rec
                .entries
                .front()
                .map(|e| e.msg.seq)
                .unwrap_or(rec.head + 1);
            let start = after.saturating_add(1).max(first);
            let skip = (start - first) as usize;
            let messages: Vec<StoredMessage> = rec
                .entries
                .iter()
                .skip(skip)
                .take(limit)
                .map(|e| e.msg.clone())
                .collect();
            InboxRange {
                epoch: rec.epoch.clone(),
                head_seq: rec.head,
                trimmed: after < rec.head && first > after.saturating_add(1),
                messages,
            }
        }))
    }

    async fn head(&self, user: &str) -> Result<InboxHead, StateError> {
        Ok(self.with_user(user, |rec, _| InboxHead {
            epoch: rec.epoch.clone(),
            head_seq: rec.head,
        }))
    }

    async fn cursors(&self, user: &str, device: &str) -> Result<Cursors, StateError> {
        Ok(self.with_user(user, |rec, _| Cursors {
            device: rec
                .devices
                .iter()
                .find(|(d, _)| d == device)
                .map(|(_, s)| *s),
            user: rec.user_cursor,
        }))
    }

    async fn ack(&self, user: &str, device: &str, epoch: &str, seq: u64) -> Result<(), StateError> {
        self.with_user(user, |rec, _| {
            if rec.epoch != epoch {
                return;
            }
            let seq = seq.min(rec.head);
            match rec.devices.iter_mut().find(|(d, _)| d == device) {
                Some((_, s)) => *s = (*s).max(seq),
                None => rec.devices.push((device.to_string(), seq)),
            }
            rec.user_cursor = rec.user_cursor.max(seq);
        });
        Ok(())
    }

    async fn set_group_members(
        &self,
        group: &str,
        op: GroupOp,
        users: &[String],
    ) -> Result<usize, StateError> {
        let mut groups = self.groups.lock();
        let set = groups.entry(group.to_string()).or_default();
        match op {
            GroupOp::Replace => *set = users.iter().cloned().collect(),
            GroupOp::Add => set.extend(users.iter().cloned()),
            GroupOp::Remove => {
                for u in users {
                    set.remove(u);
                }
            }
        }
        let n = set.len();
        if n == 0 {
            groups.remove(group);
        }
        Ok(n)
    }

    async fn group_members(&self, group: &str) -> Result<Vec<String>, StateError> {
        let groups = self.groups.lock();
        let mut members: Vec<String> = groups
            .get(group)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        members.sort_unstable();
        Ok(members)
    }

    async fn revoke(&self, user: &str, device: Option<&str>, at_ms: i64) -> Result<(), StateError> {
        let mut r = self.revoked.lock();
        let user = r.entry(user.to_string()).or_default();
        let at = match device {
            None => user.user.get_or_insert(at_ms),
            Some(d) => user.devices.entry(d.to_string()).or_insert(at_ms),
        };
        *at = (*at).max(at_ms);
        Ok(())
    }

    async fn revoked_at(&self, user: &str, device: Option<&str>) -> Result<Revocation, StateError> {
        let r = self.revoked.lock();
        let Some(u) = r.get(user) else {
            return Ok(Revocation::default());
        };
        Ok(Revocation {
            user: u.user,
            device: device.and_then(|d| u.devices.get(d).copied()),
        })
    }

    async fn add_presence(&self, p: &Presence) -> Result<(), StateError> {
        let mut shard = self.presence_shard(&p.user).lock();
        // Most users have one connection: do not let Vec's growth reserve four.
        let conns = shard
            .entry(p.user.clone())
            .or_insert_with(|| Vec::with_capacity(1));
        conns.retain(|c| c.conn != p.conn);
        conns.push(p.clone());
        Ok(())
    }

    async fn remove_presence(&self, user: &str, conn: &str) -> Result<(), StateError> {
        let mut shard = self.presence_shard(user).lock();
        if let Some(conns) = shard.get_mut(user) {
            conns.retain(|c| c.conn != conn);
            if conns.is_empty() {
                shard.remove(user);
            }
        }
        Ok(())
    }

    async fn presence(&self, user: &str) -> Result<Vec<Presence>, StateError> {
        Ok(self
            .presence_shard(user)
            .lock()
            .get(user)
            .cloned()
            .unwrap_or_default())
    }

    async fn routes(&self, user: &str) -> Result<Vec<String>, StateError> {
        let mut instances: Vec<String> = self
            .presence(user)
            .await?
            .into_iter()
            .map(|p| p.instance)
            .collect();
        instances.sort_unstable();
        instances.dedup();
        Ok(instances)
    }

    async fn remove_instance(&self, instance: &str) -> Result<usize, StateError> {
        let mut removed = 0;
        for shard in self.presence.iter() {
            shard.lock().retain(|_, conns| {
                let before = conns.len();
                conns.retain(|c| c.instance != instance);
                removed += before - conns.len();
                !conns.is_empty()
            });
        }
        Ok(removed)
    }

    async fn ping(&self) -> Result<(), StateError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::state_contract_tests!(|cfg: &StateConfig| MemoryState::new(cfg));

    fn cfg() -> StateConfig {
        StateConfig {
            inbox_ttl: Duration::from_secs(60),
            dedupe_window: Duration::from_secs(30),
            ..StateConfig::default()
        }
    }

    fn msg(id: &str) -> NewMessage {
        NewMessage {
            id: id.into(),
            from: "f".into(),
            kind: String::new(),
            body: bytes::Bytes::from_static(b"1"),
            ts_ms: 0,
        }
    }

    #[tokio::test]
    async fn entries_do_not_pin_the_buffer_their_body_came_in() {
        // A decoded request's body is a slice of the connection's read buffer.
        let buffer = bytes::Bytes::from(vec![7u8; 8192]);
        let s = MemoryState::new(&cfg());
        s.append(
            "u",
            NewMessage {
                body: buffer.slice(100..110),
                ..msg("a")
            },
        )
        .await
        .unwrap();
        let stored = s
            .read_after("u", 0, 10)
            .await
            .unwrap()
            .messages
            .remove(0)
            .body;
        assert_eq!(stored, buffer.slice(100..110));
        let (lo, hi) = (
            buffer.as_ptr() as usize,
            buffer.as_ptr() as usize + buffer.len(),
        );
        let at = stored.as_ptr() as usize;
        assert!(at < lo || at >= hi, "the entry shares the 8 KiB buffer");
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_the_ttl() {
        let s = MemoryState::new(&cfg());
        s.append("u", msg("a")).await.unwrap();
        tokio::time::advance(Duration::from_secs(40)).await;
        s.append("u", msg("b")).await.unwrap();
        tokio::time::advance(Duration::from_secs(30)).await;
        let r = s.read_after("u", 0, 10).await.unwrap();
        assert_eq!(
            r.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
            vec![2]
        );
        assert!(r.trimmed);
        assert_eq!(r.head_seq, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn dedupe_window_expires() {
        let s = MemoryState::new(&cfg());
        assert!(!s.append("u", msg("same")).await.unwrap().duplicate);
        assert!(s.append("u", msg("same")).await.unwrap().duplicate);
        tokio::time::advance(Duration::from_secs(31)).await;
        let again = s.append("u", msg("same")).await.unwrap();
        assert_eq!((again.seq, again.duplicate), (2, false));
    }

    #[tokio::test(start_paused = true)]
    async fn sweep_forgets_idle_users_and_a_new_inbox_gets_a_new_epoch() {
        let s = MemoryState::new(&cfg());
        let first = s.append("u", msg("a")).await.unwrap();
        s.head("idle").await.unwrap();
        tokio::time::advance(Duration::from_secs(61)).await;
        s.sweep();
        assert_eq!(s.stats(), (0, 0));
        let again = s.append("u", msg("b")).await.unwrap();
        assert_eq!(again.seq, 1);
        assert_ne!(again.epoch, first.epoch, "the inbox was lost: a new epoch");
    }

    #[tokio::test(start_paused = true)]
    async fn sweep_keeps_live_inboxes() {
        let s = MemoryState::new(&cfg());
        s.append("u", msg("a")).await.unwrap();
        tokio::time::advance(Duration::from_secs(10)).await;
        s.sweep();
        assert_eq!(s.stats(), (1, 1));
    }
}
