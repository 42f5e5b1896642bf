//! The wire protocol as plain types: frames, codecs and close codes. No I/O here.

pub mod codes;
pub mod json;
pub mod proto;

use bytes::Bytes;

pub use codes::CloseCode;

/// Which codec a session speaks, chosen at the handshake (`codec` query parameter or the
/// `imgate.v1.json` / `imgate.v1.proto` subprotocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Codec {
    #[default]
    Json,
    Proto,
}

impl Codec {
    pub fn as_str(self) -> &'static str {
        match self {
            Codec::Json => "json",
            Codec::Proto => "proto",
        }
    }

    pub fn parse(s: &str) -> Option<Codec> {
        match s {
            "json" => Some(Codec::Json),
            "proto" => Some(Codec::Proto),
            _ => None,
        }
    }

    /// Decode one inbound frame.
    pub fn decode(self, data: &[u8]) -> Result<ClientFrame, DecodeError> {
        match self {
            Codec::Json => json::decode(data),
            Codec::Proto => proto::decode(data),
        }
    }

    /// Encode one outbound frame.
    pub fn encode(self, frame: &ServerFrame) -> Bytes {
        match self {
            Codec::Json => json::encode(frame),
            Codec::Proto => proto::encode(frame),
        }
    }
}

/// Frames a client sends.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    Auth {
        token: String,
        since: Option<String>,
    },
    Send(SendFrame),
    Ack {
        seq: u64,
        epoch: String,
    },
    Ping {
        id: Option<String>,
    },
}

impl ClientFrame {
    /// The `type` name, for metrics labels.
    pub fn type_name(&self) -> &'static str {
        match self {
            ClientFrame::Auth { .. } => "auth",
            ClientFrame::Send(_) => "send",
            ClientFrame::Ack { .. } => "ack",
            ClientFrame::Ping { .. } => "ping",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct SendFrame {
    /// The client's request id, echoed in the `reply`.
    pub id: String,
    pub to: Option<String>,
    pub group: Option<String>,
    pub kind: Option<String>,
    /// json codec: the body's JSON text; proto codec: the raw bytes.
    pub body: Bytes,
}

/// Frames the server sends.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerFrame {
    Welcome(Welcome),
    Push(Push),
    Synced {
        epoch: String,
        seq: u64,
        replayed: u64,
        complete: bool,
    },
    Reply(Reply),
    Reauth {
        token_expires_at_ms: i64,
    },
    Pong {
        id: Option<String>,
        ts: i64,
    },
    Error {
        code: String,
        message: String,
        id: Option<String>,
    },
    Kick {
        code: u16,
        reason: String,
    },
}

impl ServerFrame {
    /// The `type` name, for metrics labels.
    pub fn type_name(&self) -> &'static str {
        match self {
            ServerFrame::Welcome(_) => "welcome",
            ServerFrame::Push(_) => "push",
            ServerFrame::Synced { .. } => "synced",
            ServerFrame::Reply(_) => "reply",
            ServerFrame::Reauth { .. } => "reauth",
            ServerFrame::Pong { .. } => "pong",
            ServerFrame::Error { .. } => "error",
            ServerFrame::Kick { .. } => "kick",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Welcome {
    pub session: String,
    pub user: String,
    pub device: String,
    pub platform: String,
    pub transport: String,
    pub instance: String,
    pub heartbeat_ms: u64,
    pub max_frame: u64,
    pub epoch: String,
    pub head_seq: u64,
    pub cursor: u64,
    pub token_expires_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Push {
    /// Message id.
    pub id: String,
    pub from: Option<String>,
    pub kind: Option<String>,
    /// Raw bytes. The json codec writes them as `body` when they are valid UTF-8 JSON
    /// text, else as `body_b64`; an empty body gives neither field.
    pub body: Bytes,
    pub ts: i64,
    /// Durable pushes only: `seq` and `epoch`.
    pub seq: Option<u64>,
    pub epoch: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reply {
    pub id: String,
    pub ok: bool,
    /// json codec: embedded as JSON when valid JSON text, else `body_b64`.
    pub body: Option<Bytes>,
    pub code: Option<String>,
    pub message: Option<String>,
}

impl Reply {
    pub fn ok(id: impl Into<String>, body: Option<Bytes>) -> Reply {
        Reply {
            id: id.into(),
            ok: true,
            body,
            code: None,
            message: None,
        }
    }

    pub fn err(id: impl Into<String>, code: &str, message: impl Into<String>) -> Reply {
        Reply {
            id: id.into(),
            ok: false,
            body: None,
            code: Some(code.to_string()),
            message: Some(message.into()),
        }
    }
}

/// Why an inbound frame could not be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// Not decodable at all (bad JSON / protobuf, missing `type`, wrong field types in a
    /// frame other than `send`): `kick` 4504 and close.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A well-formed frame of a type this server does not know: `error` `unknown_type`,
    /// carrying the frame's `id` when it had one (a string).
    #[error("unknown frame type {ty:?}")]
    UnknownType { ty: String, id: Option<String> },
    /// A `send` whose fields are wrong (no `to` nor `group`, both, bad ids, bad field
    /// types): `reply` `ok:false` `code:"bad_request"` with this id (empty if none could
    /// be read).
    #[error("bad send: {message}")]
    BadSend { id: String, message: String },
}

/// Is `s` a valid user, device or group id: 1–128 chars of `A-Z a-z 0-9 . _ : @ -`.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-'))
}
