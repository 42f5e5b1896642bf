//! What instances tell each other over the bus, and its wire form: a small binary encoding
//! (length-prefixed fields) so a push body crosses the bus as the bytes it is, without the
//! base64 a text encoding would need.

use bytes::Bytes;

use crate::protocol::Push;

/// One bus message. `origin` is the instance that sent it: a receiver ignores its own
/// messages on the broadcast channel (it acted on them locally before publishing).
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub origin: String,
    pub body: Message,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Hand `push` to `user`'s connections on the receiving instance. A durable push
    /// carries its seq and epoch: the session fills any gap before it from the inbox.
    Push { user: String, push: Push },
    /// A transient push to every connection of every instance.
    Broadcast { push: Push },
    /// Tokens of `user` (of its `device` only, when given) issued at or before `at_ms` are
    /// refused; with `kick`, the connections concerned are closed with 4502 too.
    Revoke {
        user: String,
        device: Option<String>,
        at_ms: i64,
        kick: Option<String>,
    },
    /// A connection of `user` opened elsewhere replaces, under the login policy, this
    /// instance's connections of the user (all of them, or those on `platform`).
    Replace {
        user: String,
        platform: Option<String>,
    },
}

const PUSH: u8 = 1;
const BROADCAST: u8 = 2;
const REVOKE: u8 = 3;
const REPLACE: u8 = 4;

fn put(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s);
}

/// `None` as a zero byte, `Some(s)` as a one byte then `s`.
fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put(out, s.as_bytes());
        }
    }
}

fn put_push(out: &mut Vec<u8>, p: &Push) {
    put(out, p.id.as_bytes());
    put_opt(out, p.from.as_deref());
    put_opt(out, p.kind.as_deref());
    put(out, &p.body);
    out.extend_from_slice(&p.ts.to_le_bytes());
    // seq and epoch travel together (durable) or not at all (transient).
    match (p.seq, &p.epoch) {
        (Some(seq), Some(epoch)) => {
            out.push(1);
            out.extend_from_slice(&seq.to_le_bytes());
            put(out, epoch.as_bytes());
        }
        _ => out.push(0),
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.bytes(1)?[0])
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.bytes(8)?.try_into().ok()?))
    }

    fn blob(&mut self) -> Option<&'a [u8]> {
        let n = u32::from_le_bytes(self.bytes(4)?.try_into().ok()?) as usize;
        self.bytes(n)
    }

    fn str(&mut self) -> Option<String> {
        String::from_utf8(self.blob()?.to_vec()).ok()
    }

    fn opt(&mut self) -> Option<Option<String>> {
        match self.u8()? {
            0 => Some(None),
            1 => Some(Some(self.str()?)),
            _ => None,
        }
    }

    fn push(&mut self) -> Option<Push> {
        let id = self.str()?;
        let from = self.opt()?;
        let kind = self.opt()?;
        let body = Bytes::copy_from_slice(self.blob()?);
        let ts = self.u64()? as i64;
        let (seq, epoch) = match self.u8()? {
            0 => (None, None),
            1 => (Some(self.u64()?), Some(self.str()?)),
            _ => return None,
        };
        Some(Push {
            id,
            from,
            kind,
            body,
            ts,
            seq,
            epoch,
        })
    }
}

impl Envelope {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        put(&mut out, self.origin.as_bytes());
        match &self.body {
            Message::Push { user, push } => {
                out.push(PUSH);
                put(&mut out, user.as_bytes());
                put_push(&mut out, push);
            }
            Message::Broadcast { push } => {
                out.push(BROADCAST);
                put_push(&mut out, push);
            }
            Message::Revoke {
                user,
                device,
                at_ms,
                kick,
            } => {
                out.push(REVOKE);
                put(&mut out, user.as_bytes());
                put_opt(&mut out, device.as_deref());
                out.extend_from_slice(&at_ms.to_le_bytes());
                put_opt(&mut out, kick.as_deref());
            }
            Message::Replace { user, platform } => {
                out.push(REPLACE);
                put(&mut out, user.as_bytes());
                put_opt(&mut out, platform.as_deref());
            }
        }
        out
    }

    /// `None` for bytes this version cannot read (a newer instance during a rolling
    /// deploy): they are counted and dropped, never fatal.
    pub fn decode(b: &[u8]) -> Option<Envelope> {
        let mut r = Reader(b);
        let origin = r.str()?;
        let body = match r.u8()? {
            PUSH => Message::Push {
                user: r.str()?,
                push: r.push()?,
            },
            BROADCAST => Message::Broadcast { push: r.push()? },
            REVOKE => Message::Revoke {
                user: r.str()?,
                device: r.opt()?,
                at_ms: r.u64()? as i64,
                kick: r.opt()?,
            },
            REPLACE => Message::Replace {
                user: r.str()?,
                platform: r.opt()?,
            },
            _ => return None,
        };
        Some(Envelope { origin, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(durable: bool) -> Push {
        Push {
            id: "m1".into(),
            from: Some("svc".into()),
            kind: None,
            body: Bytes::from_static(b"\x00\xffbinary"),
            ts: 1_700_000_000_000,
            seq: durable.then_some(42),
            epoch: durable.then(|| "e:1".into()),
        }
    }

    #[test]
    fn every_message_round_trips() {
        for body in [
            Message::Push {
                user: "alice".into(),
                push: push(true),
            },
            Message::Push {
                user: "alice".into(),
                push: push(false),
            },
            Message::Broadcast { push: push(false) },
            Message::Revoke {
                user: "bob".into(),
                device: Some("phone".into()),
                at_ms: 123,
                kick: Some("bye".into()),
            },
            Message::Revoke {
                user: "bob".into(),
                device: None,
                at_ms: 5,
                kick: None,
            },
            Message::Replace {
                user: "kim".into(),
                platform: Some("ios".into()),
            },
        ] {
            let e = Envelope {
                origin: "gw-1".into(),
                body,
            };
            assert_eq!(Envelope::decode(&e.encode()), Some(e));
        }
    }

    #[test]
    fn truncated_or_unknown_bytes_are_refused() {
        let e = Envelope {
            origin: "gw-1".into(),
            body: Message::Broadcast { push: push(true) },
        }
        .encode();
        for n in 0..e.len() {
            assert_eq!(Envelope::decode(&e[..n]), None, "prefix of {n} bytes");
        }
        let mut unknown = Envelope {
            origin: "x".into(),
            body: Message::Replace {
                user: "u".into(),
                platform: None,
            },
        }
        .encode();
        unknown[5] = 99;
        assert_eq!(Envelope::decode(&unknown), None);
    }
}
