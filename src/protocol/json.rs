//! The `json` codec: one JSON object per frame with a `type` field (SPEC §3).
//!
//! Decoding reads every known field as a borrowed raw value first, then parses the fields
//! the frame type needs, so a `send` with a wrong field still yields its `id` for the
//! `bad_request` reply. Encoding writes bytes directly: it runs once per push.

use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{valid_id, ClientFrame, DecodeError, Reply, SendFrame, ServerFrame};

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(rename = "type", borrow, default)]
    ty: Option<&'a RawValue>,
    #[serde(borrow, default)]
    token: Option<&'a RawValue>,
    #[serde(borrow, default)]
    since: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    to: Option<&'a RawValue>,
    #[serde(borrow, default)]
    group: Option<&'a RawValue>,
    #[serde(borrow, default)]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default)]
    body: Option<&'a RawValue>,
    #[serde(borrow, default)]
    seq: Option<&'a RawValue>,
    #[serde(borrow, default)]
    epoch: Option<&'a RawValue>,
}

/// Parse an optional field; JSON `null` counts as absent.
fn field<'a, T: Deserialize<'a>>(
    raw: Option<&'a RawValue>,
    name: &str,
) -> Result<Option<T>, String> {
    match raw {
        None => Ok(None),
        Some(r) if r.get() == "null" => Ok(None),
        Some(r) => serde_json::from_str(r.get())
            .map(Some)
            .map_err(|_| format!("field `{name}` has the wrong type")),
    }
}

fn required<'a, T: Deserialize<'a>>(raw: Option<&'a RawValue>, name: &str) -> Result<T, String> {
    field(raw, name)?.ok_or_else(|| format!("field `{name}` is required"))
}

pub fn decode(data: &[u8]) -> Result<ClientFrame, DecodeError> {
    let f: Fields = serde_json::from_slice(data)
        .map_err(|e| DecodeError::Malformed(format!("invalid JSON frame: {e}")))?;
    let ty: String = required(f.ty, "type").map_err(DecodeError::Malformed)?;
    let malformed = DecodeError::Malformed;
    match ty.as_str() {
        "auth" => Ok(ClientFrame::Auth {
            token: required(f.token, "token").map_err(malformed)?,
            since: field(f.since, "since").map_err(malformed)?,
        }),
        "ack" => Ok(ClientFrame::Ack {
            seq: required(f.seq, "seq").map_err(malformed)?,
            epoch: required(f.epoch, "epoch").map_err(malformed)?,
        }),
        "ping" => Ok(ClientFrame::Ping {
            id: field(f.id, "id").map_err(malformed)?,
        }),
        "send" => decode_send(&f).map(ClientFrame::Send),
        _ => Err(DecodeError::UnknownType {
            ty,
            // Echoed in the `error` so a client can tell which request it answers; an `id`
            // of another JSON type is left out rather than refused.
            id: field(f.id, "id").ok().flatten(),
        }),
    }
}

fn decode_send(f: &Fields) -> Result<SendFrame, DecodeError> {
    // The id first: every later problem is reported in a reply carrying it.
    let id: String = field(f.id, "id").ok().flatten().unwrap_or_default();
    let bad = |message: String| DecodeError::BadSend {
        id: id.clone(),
        message,
    };
    if id.is_empty() {
        return Err(bad("field `id` is required".into()));
    }
    let to: Option<String> = field(f.to, "to").map_err(bad)?;
    let group: Option<String> = field(f.group, "group").map_err(bad)?;
    let kind: Option<String> = field(f.kind, "kind").map_err(bad)?;
    check_target(to.as_deref(), group.as_deref()).map_err(bad)?;
    let body = f
        .body
        .map(|b| Bytes::copy_from_slice(b.get().as_bytes()))
        .unwrap_or_default();
    Ok(SendFrame {
        id,
        to,
        group,
        kind,
        body,
    })
}

/// Exactly one of `to` and `group`, each a valid id.
pub(crate) fn check_target(to: Option<&str>, group: Option<&str>) -> Result<(), String> {
    match (to, group) {
        (Some(_), Some(_)) => Err("give either `to` or `group`, not both".into()),
        (None, None) => Err("a send needs `to` (a user) or `group`".into()),
        (Some(t), None) if !valid_id(t) => {
            Err("`to` must be 1-128 chars of A-Z a-z 0-9 . _ : @ -".into())
        }
        (None, Some(g)) if !valid_id(g) => {
            Err("`group` must be 1-128 chars of A-Z a-z 0-9 . _ : @ -".into())
        }
        _ => Ok(()),
    }
}

/// Writes one JSON object field by field.
struct Obj {
    buf: Vec<u8>,
}

impl Obj {
    fn new(ty: &str, capacity: usize) -> Obj {
        let mut buf = Vec::with_capacity(capacity);
        buf.extend_from_slice(b"{\"type\":\"");
        buf.extend_from_slice(ty.as_bytes());
        buf.push(b'"');
        Obj { buf }
    }

    fn key(&mut self, k: &str) {
        self.buf.extend_from_slice(b",\"");
        self.buf.extend_from_slice(k.as_bytes());
        self.buf.extend_from_slice(b"\":");
    }

    fn str(&mut self, k: &str, v: &str) {
        self.key(k);
        // Writing a &str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut self.buf, v);
    }

    fn opt_str(&mut self, k: &str, v: Option<&str>) {
        if let Some(v) = v {
            self.str(k, v);
        }
    }

    fn num(&mut self, k: &str, v: impl itoa_like::Num) {
        self.key(k);
        v.write(&mut self.buf);
    }

    fn bool(&mut self, k: &str, v: bool) {
        self.key(k);
        self.buf
            .extend_from_slice(if v { b"true" } else { b"false" });
    }

    /// A body: embedded when it is valid UTF-8 JSON text, else base64; nothing when empty.
    fn body(&mut self, v: &[u8]) {
        if v.is_empty() {
            return;
        }
        if serde_json::from_slice::<serde::de::IgnoredAny>(v).is_ok() {
            self.key("body");
            self.buf.extend_from_slice(v);
        } else {
            self.key("body_b64");
            self.buf.push(b'"');
            let engine = &base64::engine::general_purpose::STANDARD;
            let start = self.buf.len();
            self.buf
                .resize(start + base64::encoded_len(v.len(), true).unwrap_or(0), 0);
            let n = engine.encode_slice(v, &mut self.buf[start..]).unwrap_or(0);
            self.buf.truncate(start + n);
            self.buf.push(b'"');
        }
    }

    fn finish(mut self) -> Bytes {
        self.buf.push(b'}');
        Bytes::from(self.buf)
    }
}

mod itoa_like {
    use std::io::Write;

    pub trait Num {
        fn write(self, buf: &mut Vec<u8>);
    }
    impl Num for u64 {
        fn write(self, buf: &mut Vec<u8>) {
            let _ = write!(buf, "{self}");
        }
    }
    impl Num for i64 {
        fn write(self, buf: &mut Vec<u8>) {
            let _ = write!(buf, "{self}");
        }
    }
    impl Num for u16 {
        fn write(self, buf: &mut Vec<u8>) {
            let _ = write!(buf, "{self}");
        }
    }
}

fn encode_reply(r: &Reply) -> Bytes {
    let mut o = Obj::new("reply", 64 + r.body.as_ref().map_or(0, |b| b.len()));
    o.str("id", &r.id);
    o.bool("ok", r.ok);
    if let Some(b) = &r.body {
        o.body(b);
    }
    o.opt_str("code", r.code.as_deref());
    o.opt_str("message", r.message.as_deref());
    o.finish()
}

pub fn encode(frame: &ServerFrame) -> Bytes {
    match frame {
        ServerFrame::Welcome(w) => {
            let mut o = Obj::new("welcome", 320);
            o.str("session", &w.session);
            o.str("user", &w.user);
            o.str("device", &w.device);
            o.str("platform", &w.platform);
            o.str("transport", &w.transport);
            o.str("instance", &w.instance);
            o.num("heartbeat_ms", w.heartbeat_ms);
            o.num("max_frame", w.max_frame);
            o.str("epoch", &w.epoch);
            o.num("head_seq", w.head_seq);
            o.num("cursor", w.cursor);
            o.num("token_expires_at_ms", w.token_expires_at_ms);
            o.finish()
        }
        ServerFrame::Push(p) => {
            let mut o = Obj::new("push", 96 + p.body.len() + p.id.len());
            o.str("id", &p.id);
            o.opt_str("from", p.from.as_deref());
            o.opt_str("kind", p.kind.as_deref());
            o.body(&p.body);
            o.num("ts", p.ts);
            if let Some(seq) = p.seq {
                o.num("seq", seq);
            }
            o.opt_str("epoch", p.epoch.as_deref());
            o.finish()
        }
        ServerFrame::Synced {
            epoch,
            seq,
            replayed,
            complete,
        } => {
            let mut o = Obj::new("synced", 96);
            o.str("epoch", epoch);
            o.num("seq", *seq);
            o.num("replayed", *replayed);
            o.bool("complete", *complete);
            o.finish()
        }
        ServerFrame::Reply(r) => encode_reply(r),
        ServerFrame::Reauth {
            token_expires_at_ms,
        } => {
            let mut o = Obj::new("reauth", 48);
            o.num("token_expires_at_ms", *token_expires_at_ms);
            o.finish()
        }
        ServerFrame::Pong { id, ts } => {
            let mut o = Obj::new("pong", 48);
            o.opt_str("id", id.as_deref());
            o.num("ts", *ts);
            o.finish()
        }
        ServerFrame::Error { code, message, id } => {
            let mut o = Obj::new("error", 64 + message.len());
            o.str("code", code);
            o.str("message", message);
            o.opt_str("id", id.as_deref());
            o.finish()
        }
        ServerFrame::Kick { code, reason } => {
            let mut o = Obj::new("kick", 48 + reason.len());
            o.num("code", *code);
            o.str("reason", reason);
            o.finish()
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::protocol::{Push, Welcome};

    fn dec(v: &str) -> Result<ClientFrame, DecodeError> {
        decode(v.as_bytes())
    }

    fn enc(f: &ServerFrame) -> Value {
        serde_json::from_slice(&encode(f)).expect("valid JSON")
    }

    #[test]
    fn decodes_client_frames() {
        assert_eq!(
            dec(r#"{"type":"auth","token":"t","since":"e:4"}"#).unwrap(),
            ClientFrame::Auth {
                token: "t".into(),
                since: Some("e:4".into())
            }
        );
        assert_eq!(
            dec(r#"{"type":"ack","seq":18446744073709551615,"epoch":"e"}"#).unwrap(),
            ClientFrame::Ack {
                seq: u64::MAX,
                epoch: "e".into()
            }
        );
        assert_eq!(
            dec(r#"{"type":"ping"}"#).unwrap(),
            ClientFrame::Ping { id: None }
        );
        assert_eq!(
            dec(r#"{"id":"x","type":"ping","extra":[1]}"#).unwrap(),
            ClientFrame::Ping {
                id: Some("x".into())
            }
        );
        let ClientFrame::Send(s) =
            dec(r#"{"type":"send","id":"1","to":"bob","kind":"text","body":{"a": [1, "b"]}}"#)
                .unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (s.id.as_str(), s.to.as_deref(), s.kind.as_deref()),
            ("1", Some("bob"), Some("text"))
        );
        assert_eq!(
            serde_json::from_slice::<Value>(&s.body).unwrap(),
            json!({"a": [1, "b"]})
        );
        let ClientFrame::Send(s) = dec(r#"{"type":"send","id":"2","group":"g"}"#).unwrap() else {
            panic!()
        };
        assert!(s.body.is_empty());
        assert_eq!(s.group.as_deref(), Some("g"));
    }

    #[test]
    fn error_classes() {
        for bad in [
            "",
            "[]",
            "{",
            "\"x\"",
            r#"{"token":"t"}"#,
            r#"{"type":1}"#,
            r#"{"type":"auth"}"#,
            r#"{"type":"ack","seq":"1","epoch":"e"}"#,
            r#"{"type":"ping","id":5}"#,
        ] {
            assert!(matches!(dec(bad), Err(DecodeError::Malformed(_))), "{bad}");
        }
        assert_eq!(
            dec(r#"{"type":"welcome"}"#),
            Err(DecodeError::UnknownType {
                ty: "welcome".into(),
                id: None
            })
        );
        assert_eq!(
            dec(r#"{"type":"frobnicate","id":"u1"}"#),
            Err(DecodeError::UnknownType {
                ty: "frobnicate".into(),
                id: Some("u1".into())
            })
        );
        assert_eq!(
            dec(r#"{"type":"frobnicate","id":7}"#),
            Err(DecodeError::UnknownType {
                ty: "frobnicate".into(),
                id: None
            })
        );
        let bad_send = |s: &str| match dec(s) {
            Err(DecodeError::BadSend { id, .. }) => id,
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(bad_send(r#"{"type":"send","id":"7","body":1}"#), "7");
        assert_eq!(
            bad_send(r#"{"type":"send","id":"7","to":"a","group":"b"}"#),
            "7"
        );
        assert_eq!(bad_send(r#"{"type":"send","id":"7","to":"bad id"}"#), "7");
        assert_eq!(bad_send(r#"{"type":"send","id":"7","to":5}"#), "7");
        assert_eq!(bad_send(r#"{"type":"send","to":"a"}"#), "");
        assert_eq!(bad_send(r#"{"type":"send","id":9,"to":"a"}"#), "");
    }

    #[test]
    fn encodes_server_frames() {
        let w = enc(&ServerFrame::Welcome(Welcome {
            user: "u\"1".into(),
            head_seq: 5,
            token_expires_at_ms: -1,
            ..Default::default()
        }));
        assert_eq!(w["type"], "welcome");
        assert_eq!(w["user"], "u\"1");
        assert_eq!(w["head_seq"], 5);
        assert_eq!(w["token_expires_at_ms"], -1);
        let p = Push {
            id: "m".into(),
            body: Bytes::from_static(b"{\"x\":1}"),
            ts: 9,
            seq: Some(u64::MAX),
            epoch: Some("e".into()),
            ..Default::default()
        };
        let v = enc(&ServerFrame::Push(p.clone()));
        assert_eq!(
            v,
            json!({"type":"push","id":"m","body":{"x":1},"ts":9,"seq":u64::MAX,"epoch":"e"})
        );
        let bin = Push {
            body: Bytes::from_static(&[0xff, 0xfe, 0]),
            ..p.clone()
        };
        assert_eq!(enc(&ServerFrame::Push(bin))["body_b64"], "//4A");
        let text = Push {
            body: Bytes::from_static(b"not json"),
            ..p.clone()
        };
        assert_eq!(enc(&ServerFrame::Push(text))["body_b64"], "bm90IGpzb24=");
        let empty = enc(&ServerFrame::Push(Push {
            body: Bytes::new(),
            seq: None,
            epoch: None,
            ..p
        }));
        assert!(
            empty.get("body").is_none()
                && empty.get("body_b64").is_none()
                && empty.get("seq").is_none()
        );
        assert_eq!(
            enc(&ServerFrame::Reply(Reply::ok(
                "1",
                Some(Bytes::from_static(b"{\"seq\":3}"))
            ))),
            json!({"type":"reply","id":"1","ok":true,"body":{"seq":3}})
        );
        assert_eq!(
            enc(&ServerFrame::Reply(Reply::err(
                "2",
                "bad_request",
                "no \n target"
            ))),
            json!({"type":"reply","id":"2","ok":false,"code":"bad_request","message":"no \n target"})
        );
        assert_eq!(
            enc(&ServerFrame::Kick {
                code: 4500,
                reason: "x".into()
            }),
            json!({"type":"kick","code":4500,"reason":"x"})
        );
        assert_eq!(
            enc(&ServerFrame::Pong { id: None, ts: 1 }),
            json!({"type":"pong","ts":1})
        );
        assert_eq!(
            enc(&ServerFrame::Synced {
                epoch: "e".into(),
                seq: 2,
                replayed: 1,
                complete: false
            }),
            json!({"type":"synced","epoch":"e","seq":2,"replayed":1,"complete":false})
        );
        assert_eq!(
            enc(&ServerFrame::Reauth {
                token_expires_at_ms: 5
            }),
            json!({"type":"reauth","token_expires_at_ms":5})
        );
        assert_eq!(
            enc(&ServerFrame::Error {
                code: "c".into(),
                message: "m".into(),
                id: Some("i".into())
            }),
            json!({"type":"error","code":"c","message":"m","id":"i"})
        );
    }
}
