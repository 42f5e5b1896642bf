//! Binary encodings of what the Redis backend stores: inbox entries and presence records.
//! Strings are length-prefixed (u32 little endian), so any byte may appear in them.

use bytes::Bytes;

use crate::state::{NewMessage, Presence, StoredMessage};

fn put(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn str(&mut self) -> Option<String> {
        let n = u32::from_le_bytes(self.bytes(4)?.try_into().ok()?) as usize;
        String::from_utf8(self.bytes(n)?.to_vec()).ok()
    }

    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.bytes(8)?.try_into().ok()?))
    }
}

/// An inbox entry's payload (the script prefixes it with the time it was stored).
pub fn encode_entry(m: &NewMessage) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(8 + 12 + m.id.len() + m.from.len() + m.kind.len() + m.body.len());
    out.extend_from_slice(&m.ts_ms.to_le_bytes());
    put(&mut out, m.id.as_bytes());
    put(&mut out, m.from.as_bytes());
    put(&mut out, m.kind.as_bytes());
    out.extend_from_slice(&m.body);
    out
}

/// A list element as stored: `<stored at ms>:<payload>`.
pub fn decode_entry(seq: u64, stored: &[u8]) -> Option<StoredMessage> {
    let colon = stored.iter().position(|&b| b == b':')?;
    let mut r = Reader(&stored[colon + 1..]);
    let ts_ms = r.i64()?;
    let id = r.str()?;
    let from = r.str()?;
    let kind = r.str()?;
    Some(StoredMessage {
        seq,
        id,
        from,
        kind,
        body: Bytes::copy_from_slice(r.0),
        ts_ms,
    })
}

pub fn encode_presence(p: &Presence) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&p.connected_at_ms.to_le_bytes());
    for s in [
        &p.user,
        &p.conn,
        &p.device,
        &p.platform,
        &p.transport,
        &p.instance,
    ] {
        put(&mut out, s.as_bytes());
    }
    out
}

pub fn decode_presence(b: &[u8]) -> Option<Presence> {
    let mut r = Reader(b);
    let connected_at_ms = r.i64()?;
    Some(Presence {
        user: r.str()?,
        conn: r.str()?,
        device: r.str()?,
        platform: r.str()?,
        transport: r.str()?,
        instance: r.str()?,
        connected_at_ms,
    })
}

/// A member of an instance's connection index: which user's record to remove.
pub fn encode_index(user: &str, conn: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + user.len() + conn.len());
    put(&mut out, user.as_bytes());
    put(&mut out, conn.as_bytes());
    out
}

pub fn decode_index(b: &[u8]) -> Option<(String, String)> {
    let mut r = Reader(b);
    Some((r.str()?, r.str()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let m = NewMessage {
            id: "i:d".into(),
            from: "f".into(),
            kind: String::new(),
            body: Bytes::from_static(b"\x00:body"),
            ts_ms: -5,
        };
        let mut stored = b"1700000000000:".to_vec();
        stored.extend(encode_entry(&m));
        let d = decode_entry(7, &stored).unwrap();
        assert_eq!(
            (d.seq, d.id, d.from, d.kind, d.body, d.ts_ms),
            (7, m.id, m.from, m.kind, m.body, m.ts_ms)
        );
        let p = Presence {
            user: "u".into(),
            conn: "c".into(),
            device: "d".into(),
            platform: "web".into(),
            transport: "ws".into(),
            instance: "i".into(),
            connected_at_ms: 3,
        };
        assert_eq!(decode_presence(&encode_presence(&p)), Some(p));
        assert_eq!(
            decode_index(&encode_index("u:1", "c")),
            Some(("u:1".into(), "c".into()))
        );
        assert_eq!(decode_entry(1, b"no colon"), None);
    }
}
