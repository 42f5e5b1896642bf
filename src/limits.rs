//! Admission limits (SPEC §9): connections per client address counted from the moment they
//! are accepted, a cap on connections still in their handshake, the node's connection limit
//! and the cap on sessions not yet authenticated. Every slot is held by a guard that gives it
//! back when dropped, on every path.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Config;
use crate::ops::metrics;

/// Why a connection was refused before it became a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    NodeLimit,
    IpLimit,
    UnauthLimit,
    HandshakeLimit,
}

impl Rejection {
    pub fn reason(self) -> &'static str {
        match self {
            Rejection::NodeLimit => "node_limit",
            Rejection::IpLimit => "ip_limit",
            Rejection::UnauthLimit => "unauth_limit",
            Rejection::HandshakeLimit => "handshake_limit",
        }
    }
}

pub struct Limits {
    node: Arc<Semaphore>,
    unauth: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    max_per_ip: u32,
    max_connections: usize,
    max_handshakes: usize,
    ipv6_prefix: u8,
}

/// One connection counted against its client address, from accept to close.
pub struct IpSlot {
    limits: Arc<Limits>,
    key: IpAddr,
}

impl IpSlot {
    /// Whether this slot counts `ip` (IPv6 addresses share a slot per prefix).
    pub fn counts(&self, ip: IpAddr) -> bool {
        self.key == self.limits.key(ip)
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.limits.per_ip.lock();
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// A connection in its handshake: TCP accept until the WebSocket upgrade, QUIC first packet
/// until the WebTransport session is set up.
pub struct Handshaking(#[allow(dead_code)] OwnedSemaphorePermit);

/// Held for a session's life; releases its slots when dropped.
pub struct Permits {
    _node: OwnedSemaphorePermit,
    _ip: IpSlot,
    unauth: Option<OwnedSemaphorePermit>,
}

impl Permits {
    /// The session authenticated: it no longer counts as unauthenticated.
    pub fn authenticated(&mut self) {
        if self.unauth.take().is_some() {
            metrics::unauthenticated_delta(-1);
        }
    }
}

impl Drop for Permits {
    fn drop(&mut self) {
        self.authenticated();
    }
}

impl Limits {
    pub fn new(cfg: &Config) -> Limits {
        let l = &cfg.limits;
        Limits {
            node: Arc::new(Semaphore::new(l.max_connections)),
            unauth: Arc::new(Semaphore::new(l.max_unauthenticated)),
            handshakes: Arc::new(Semaphore::new(l.max_handshakes)),
            per_ip: Mutex::new(HashMap::new()),
            max_per_ip: l.max_per_ip as u32,
            max_connections: l.max_connections,
            max_handshakes: l.max_handshakes,
            ipv6_prefix: l.ipv6_prefix,
        }
    }

    /// Sessions holding a slot: open or in their handshake.
    pub fn open(&self) -> usize {
        self.max_connections - self.node.available_permits()
    }

    /// Connections accepted and still in their handshake.
    pub fn handshaking(&self) -> usize {
        self.max_handshakes - self.handshakes.available_permits()
    }

    /// Whether QUIC should make new clients prove their address (a Retry) before it spends
    /// a TLS handshake on them: when half the handshake slots are taken.
    pub fn under_load(&self) -> bool {
        self.handshaking() * 2 >= self.max_handshakes
    }

    /// The key an address is counted under: IPv4 as is, IPv6 by its prefix (a /64 holder
    /// would otherwise have unlimited addresses).
    fn key(&self, ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                let prefix = u32::from(self.ipv6_prefix.min(128));
                let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
                IpAddr::V6((bits & mask).into())
            }
            v4 => v4,
        }
    }

    /// Count a connection from `ip`; refused beyond `limits.max_per_ip`.
    pub fn take_ip(self: &Arc<Self>, ip: IpAddr) -> Result<IpSlot, Rejection> {
        let key = self.key(ip);
        let mut map = self.per_ip.lock();
        let n = map.entry(key).or_insert(0);
        if *n >= self.max_per_ip {
            if *n == 0 {
                map.remove(&key);
            }
            return Err(Rejection::IpLimit);
        }
        *n += 1;
        Ok(IpSlot {
            limits: self.clone(),
            key,
        })
    }

    /// A connection begins its handshake; refused beyond `limits.max_handshakes`.
    pub fn begin_handshake(&self) -> Result<Handshaking, Rejection> {
        self.handshakes
            .clone()
            .try_acquire_owned()
            .map(Handshaking)
            .map_err(|_| Rejection::HandshakeLimit)
    }

    /// Take the slots a new session needs. `held`: the slot its connection took at accept
    /// (none when a trusted proxy forwarded it: then `ip` came from its headers and is
    /// counted now). `unauthenticated`: it will wait for an `auth` frame.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        held: Option<IpSlot>,
        unauthenticated: bool,
    ) -> Result<Permits, Rejection> {
        let node = self
            .node
            .clone()
            .try_acquire_owned()
            .map_err(|_| Rejection::NodeLimit)?;
        let ip = match held {
            Some(slot) if slot.counts(ip) => slot,
            _ => self.take_ip(ip)?,
        };
        let unauth = if unauthenticated {
            let p = self
                .unauth
                .clone()
                .try_acquire_owned()
                .map_err(|_| Rejection::UnauthLimit)?;
            metrics::unauthenticated_delta(1);
            Some(p)
        } else {
            None
        };
        Ok(Permits {
            _node: node,
            _ip: ip,
            unauth,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_per_ip: usize) -> Arc<Limits> {
        let mut cfg = Config::default();
        cfg.limits.max_per_ip = max_per_ip;
        cfg.limits.max_handshakes = 2;
        Arc::new(Limits::new(&cfg))
    }

    #[test]
    fn per_ip_slots_come_back() {
        let l = limits(2);
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        let a = l.take_ip(ip).unwrap();
        let b = l.take_ip(ip).unwrap();
        assert_eq!(l.take_ip(ip).err(), Some(Rejection::IpLimit));
        assert!(l.take_ip("203.0.113.8".parse().unwrap()).is_ok());
        drop(a);
        let permits = l.admit(ip, Some(l.take_ip(ip).unwrap()), true).unwrap();
        drop((b, permits));
        assert!(l.per_ip.lock().is_empty(), "no entry outlives its slots");
    }

    #[test]
    fn ipv6_counts_per_prefix() {
        let l = limits(1);
        let _a = l.take_ip("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(l.take_ip("2001:db8:1:2::ffff".parse().unwrap()).is_err());
        assert!(l.take_ip("2001:db8:1:3::1".parse().unwrap()).is_ok());
        // An IPv4-mapped address is its IPv4 address.
        let _b = l.take_ip("198.51.100.1".parse().unwrap()).unwrap();
        assert!(l.take_ip("::ffff:198.51.100.1".parse().unwrap()).is_err());
    }

    #[test]
    fn handshakes_are_capped() {
        let l = limits(10);
        let a = l.begin_handshake().unwrap();
        assert!(l.under_load());
        let _b = l.begin_handshake().unwrap();
        assert!(l.begin_handshake().is_err());
        drop(a);
        assert!(l.begin_handshake().is_ok());
    }
}
