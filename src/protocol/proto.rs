//! The `proto` codec: one `imgate.v1.Frame` (proto/imgate/v1/frame.proto) per frame.

use bytes::Bytes;
use prost::Message as _;

use super::{ClientFrame, DecodeError, Reply, SendFrame, ServerFrame};

/// Types and gRPC services generated from proto/imgate/v1/*.proto.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/imgate.v1.rs"));

    /// The encoded descriptor set, for gRPC reflection.
    pub const DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/imgate_descriptor.bin"));
}

use pb::frame::Frame as F;

pub fn decode(data: &[u8]) -> Result<ClientFrame, DecodeError> {
    let frame = pb::Frame::decode(data)
        .map_err(|e| DecodeError::Malformed(format!("invalid protobuf frame: {e}")))?;
    match frame.frame {
        None => Err(DecodeError::Malformed("a Frame with no frame set".into())),
        Some(F::Auth(a)) => Ok(ClientFrame::Auth {
            token: a.token,
            since: a.since,
        }),
        Some(F::Ack(a)) => Ok(ClientFrame::Ack {
            seq: a.seq,
            epoch: a.epoch,
        }),
        Some(F::Ping(p)) => Ok(ClientFrame::Ping { id: p.id }),
        Some(F::Send(s)) => {
            let bad = |message: String| DecodeError::BadSend {
                id: s.id.clone(),
                message,
            };
            if s.id.is_empty() {
                return Err(bad("field `id` is required".into()));
            }
            super::json::check_target(s.to.as_deref(), s.group.as_deref()).map_err(bad)?;
            Ok(ClientFrame::Send(SendFrame {
                id: s.id,
                to: s.to,
                group: s.group,
                kind: s.kind,
                body: s.body,
            }))
        }
        Some(other) => Err(DecodeError::UnknownType {
            ty: server_type_name(&other).into(),
            id: match other {
                F::Push(p) => Some(p.id),
                F::Reply(r) => Some(r.id),
                F::Pong(p) => p.id,
                F::Error(e) => e.id,
                _ => None,
            }
            .filter(|id| !id.is_empty()),
        }),
    }
}

fn server_type_name(f: &F) -> &'static str {
    match f {
        F::Welcome(_) => "welcome",
        F::Push(_) => "push",
        F::Synced(_) => "synced",
        F::Reply(_) => "reply",
        F::Reauth(_) => "reauth",
        F::Pong(_) => "pong",
        F::Error(_) => "error",
        F::Kick(_) => "kick",
        F::Auth(_) => "auth",
        F::Send(_) => "send",
        F::Ack(_) => "ack",
        F::Ping(_) => "ping",
    }
}

fn reply(r: &Reply) -> pb::ReplyFrame {
    pb::ReplyFrame {
        id: r.id.clone(),
        ok: r.ok,
        body: r.body.clone(),
        code: r.code.clone(),
        message: r.message.clone(),
    }
}

pub fn encode(frame: &ServerFrame) -> Bytes {
    let f = match frame {
        ServerFrame::Welcome(w) => F::Welcome(pb::WelcomeFrame {
            session: w.session.clone(),
            user: w.user.clone(),
            device: w.device.clone(),
            platform: w.platform.clone(),
            transport: w.transport.clone(),
            instance: w.instance.clone(),
            heartbeat_ms: w.heartbeat_ms,
            max_frame: w.max_frame,
            epoch: w.epoch.clone(),
            head_seq: w.head_seq,
            cursor: w.cursor,
            token_expires_at_ms: w.token_expires_at_ms,
        }),
        ServerFrame::Push(p) => F::Push(pb::PushFrame {
            id: p.id.clone(),
            from: p.from.clone(),
            kind: p.kind.clone(),
            body: p.body.clone(),
            ts: p.ts,
            seq: p.seq,
            epoch: p.epoch.clone(),
        }),
        ServerFrame::Synced {
            epoch,
            seq,
            replayed,
            complete,
        } => F::Synced(pb::SyncedFrame {
            epoch: epoch.clone(),
            seq: *seq,
            replayed: *replayed,
            complete: *complete,
        }),
        ServerFrame::Reply(r) => F::Reply(reply(r)),
        ServerFrame::Reauth {
            token_expires_at_ms,
        } => F::Reauth(pb::ReauthFrame {
            token_expires_at_ms: *token_expires_at_ms,
        }),
        ServerFrame::Pong { id, ts } => F::Pong(pb::PongFrame {
            id: id.clone(),
            ts: *ts,
        }),
        ServerFrame::Error { code, message, id } => F::Error(pb::ErrorFrame {
            code: code.clone(),
            message: message.clone(),
            id: id.clone(),
        }),
        ServerFrame::Kick { code, reason } => F::Kick(pb::KickFrame {
            code: u32::from(*code),
            reason: reason.clone(),
        }),
    };
    Bytes::from(pb::Frame { frame: Some(f) }.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Push, Welcome};

    fn client(f: F) -> Vec<u8> {
        pb::Frame { frame: Some(f) }.encode_to_vec()
    }

    fn server(f: &ServerFrame) -> F {
        pb::Frame::decode(&encode(f)[..]).unwrap().frame.unwrap()
    }

    #[test]
    fn decodes_client_frames() {
        let a = client(F::Auth(pb::AuthFrame {
            token: "t".into(),
            since: Some("e:1".into()),
        }));
        assert_eq!(
            decode(&a).unwrap(),
            ClientFrame::Auth {
                token: "t".into(),
                since: Some("e:1".into())
            }
        );
        let s = client(F::Send(pb::SendFrame {
            id: "1".into(),
            to: Some("bob".into()),
            group: None,
            kind: None,
            body: Bytes::from_static(&[0, 1]),
        }));
        let ClientFrame::Send(s) = decode(&s).unwrap() else {
            panic!()
        };
        assert_eq!((s.to.as_deref(), &s.body[..]), (Some("bob"), &[0u8, 1][..]));
        assert_eq!(
            decode(&client(F::Ack(pb::AckFrame {
                seq: u64::MAX,
                epoch: "e".into()
            })))
            .unwrap(),
            ClientFrame::Ack {
                seq: u64::MAX,
                epoch: "e".into()
            }
        );
        assert_eq!(
            decode(&client(F::Ping(pb::PingFrame { id: None }))).unwrap(),
            ClientFrame::Ping { id: None }
        );
    }

    #[test]
    fn error_classes() {
        assert!(matches!(
            decode(&[0xff, 0xff, 0xff]),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode(&pb::Frame { frame: None }.encode_to_vec()),
            Err(DecodeError::Malformed(_))
        ));
        let w = client(F::Welcome(pb::WelcomeFrame::default()));
        assert_eq!(
            decode(&w),
            Err(DecodeError::UnknownType {
                ty: "welcome".into(),
                id: None
            })
        );
        let pong = client(F::Pong(pb::PongFrame {
            id: Some("p1".into()),
            ..Default::default()
        }));
        assert_eq!(
            decode(&pong),
            Err(DecodeError::UnknownType {
                ty: "pong".into(),
                id: Some("p1".into())
            })
        );
        let both = client(F::Send(pb::SendFrame {
            id: "9".into(),
            to: Some("a".into()),
            group: Some("g".into()),
            ..Default::default()
        }));
        assert!(matches!(decode(&both), Err(DecodeError::BadSend { id, .. }) if id == "9"));
        let none = client(F::Send(pb::SendFrame {
            id: "9".into(),
            ..Default::default()
        }));
        assert!(matches!(decode(&none), Err(DecodeError::BadSend { .. })));
        let no_id = client(F::Send(pb::SendFrame {
            to: Some("a".into()),
            ..Default::default()
        }));
        assert!(matches!(decode(&no_id), Err(DecodeError::BadSend { id, .. }) if id.is_empty()));
    }

    #[test]
    fn encodes_server_frames() {
        let F::Welcome(w) = server(&ServerFrame::Welcome(Welcome {
            user: "u".into(),
            head_seq: 3,
            ..Default::default()
        })) else {
            panic!()
        };
        assert_eq!((w.user.as_str(), w.head_seq), ("u", 3));
        let p = Push {
            id: "m".into(),
            body: Bytes::from_static(&[9]),
            seq: Some(7),
            epoch: Some("e".into()),
            ..Default::default()
        };
        let F::Push(p) = server(&ServerFrame::Push(p)) else {
            panic!()
        };
        assert_eq!(
            (p.seq, p.epoch.as_deref(), &p.body[..]),
            (Some(7), Some("e"), &[9u8][..])
        );
        let F::Push(t) = server(&ServerFrame::Push(Push::default())) else {
            panic!()
        };
        assert_eq!(t.seq, None, "transient pushes carry no seq");
        let F::Kick(k) = server(&ServerFrame::Kick {
            code: 4505,
            reason: "big".into(),
        }) else {
            panic!()
        };
        assert_eq!(k.code, 4505);
        let F::Reply(r) = server(&ServerFrame::Reply(Reply::err("1", "bad_request", "x"))) else {
            panic!()
        };
        assert_eq!((r.ok, r.code.as_deref()), (false, Some("bad_request")));
        assert!(matches!(
            server(&ServerFrame::Synced {
                epoch: "e".into(),
                seq: 1,
                replayed: 1,
                complete: true
            }),
            F::Synced(_)
        ));
        assert!(matches!(
            server(&ServerFrame::Pong { id: None, ts: 1 }),
            F::Pong(_)
        ));
        assert!(matches!(
            server(&ServerFrame::Reauth {
                token_expires_at_ms: 1
            }),
            F::Reauth(_)
        ));
        assert!(matches!(
            server(&ServerFrame::Error {
                code: "c".into(),
                message: "m".into(),
                id: None
            }),
            F::Error(_)
        ));
    }
}
