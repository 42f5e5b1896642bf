//! In-memory state: the embedded default, fit for single-node production.
//!
//! Users live in 64 shards behind sync mutexes that are never held across an await. A user
//! record holds the inbox (a `VecDeque` of contiguous seqs, oldest first), cursors and the
//! dedupe window. A retained entry costs about 400 bytes with a 64-byte body and a 31-byte
//! id, dedupe included (`cargo run --release --example state_bench`).

use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;

use foldhash::fast::RandomState;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::*;

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
    devices: Devices,
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
            devices: Devices::default(),
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

/// Device cursors, bounded by `sessions.max_devices`: an ack costs O(log n), and the least
/// recently acked device is the first of `order`.
#[derive(Default)]
struct Devices {
    /// device → (cursor, tick of its latest ack)
    cursors: HashMap<String, (u64, u64), RandomState>,
    /// tick → device, oldest ack first
    order: BTreeMap<u64, String>,
    tick: u64,
}

impl Devices {
    fn get(&self, device: &str) -> Option<u64> {
        self.cursors.get(device).map(|(seq, _)| *seq)
    }

    fn ack(&mut self, device: &str, seq: u64, max: usize) {
        self.tick += 1;
        let tick = self.tick;
        match self.cursors.get_mut(device) {
            Some((cur, at)) => {
                *cur = (*cur).max(seq);
                let name = self.order.remove(at).unwrap_or_else(|| device.to_string());
                *at = tick;
                self.order.insert(tick, name);
            }
            None => {
                self.cursors.insert(device.to_string(), (seq, tick));
                self.order.insert(tick, device.to_string());
                while self.cursors.len() > max {
                    let Some((_, oldest)) = self.order.pop_first() else {
                        break;
                    };
                    self.cursors.remove(&oldest);
                }
            }
        }
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
    max_devices: usize,
}

impl MemoryState {
    pub fn new(settings: &Settings) -> MemoryState {
        let cfg = &settings.state;
        MemoryState {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::default(),
            groups: Mutex::new(HashMap::new()),
            revoked: Mutex::new(HashMap::new()),
            presence: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            inbox_max: cfg.inbox_max.max(1),
            ttl: cfg.inbox_ttl,
            dedupe_window: cfg.dedupe_window,
            max_devices: settings.max_devices.max(1),
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
                        routes: Vec::new(),
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
                routes: Vec::new(),
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
            device: rec.devices.get(device),
            user: rec.user_cursor,
        }))
    }

    async fn ack(
        &self,
        user: &str,
        device: Option<&str>,
        epoch: &str,
        seq: u64,
    ) -> Result<(), StateError> {
        let max = self.max_devices;
        self.with_user(user, |rec, _| {
            if rec.epoch != epoch {
                return;
            }
            let seq = seq.min(rec.head);
            if let Some(device) = device {
                rec.devices.ack(device, seq, max);
            }
            rec.user_cursor = rec.user_cursor.max(seq);
        });
        Ok(())
    }

    async fn set_group_members(
        &self,
        group: &str,
        op: GroupEdit,
        users: &[String],
    ) -> Result<usize, StateError> {
        let mut groups = self.groups.lock();
        let set = groups.entry(group.to_string()).or_default();
        match op {
            GroupEdit::Replace => *set = users.iter().cloned().collect(),
            GroupEdit::Add => set.extend(users.iter().cloned()),
            GroupEdit::Remove => {
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

    async fn maintain(&self, _instance: &str) -> Result<(), StateError> {
        self.sweep();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::contract;

    async fn memory(s: Settings) -> contract::Fixture {
        contract::Fixture::new(MemoryState::new(&s), ())
    }

    crate::state_contract_tests!(memory);

    fn cfg() -> Settings {
        let mut s = Settings::default();
        s.state.inbox_ttl = Duration::from_secs(60);
        s.state.dedupe_window = Duration::from_secs(30);
        s
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
    async fn sweep_keeps_live_inboxes() {
        let s = MemoryState::new(&cfg());
        s.append("u", msg("a")).await.unwrap();
        tokio::time::advance(Duration::from_secs(10)).await;
        s.sweep();
        assert_eq!(s.stats(), (1, 1));
    }
}
