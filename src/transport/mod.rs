//! Transports: each accepts, handshakes and frames one kind of client connection and hands
//! the rest of the gateway a [`Session`]. Nothing outside this module names a transport type.

pub mod admission;
pub mod edge;
pub mod framing;
pub mod http;
pub mod proxy;
pub mod ws;
pub mod wt;

use std::future::Future;

use bytes::Bytes;

/// Which transport carries a session: feeds the `transport` log field, metric label and
/// the `welcome` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Ws,
    Wss,
    Wt,
}

impl Transport {
    /// Every transport, in `index` order: the metric label sets are built from it.
    pub const ALL: [Transport; 3] = [Transport::Ws, Transport::Wss, Transport::Wt];

    pub const fn as_str(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Wss => "wss",
            Transport::Wt => "wt",
        }
    }

    /// The position in `ALL`. The match is exhaustive, so a new variant does not compile
    /// until it has one; the check below then fails until `ALL` lists it there.
    pub const fn index(self) -> usize {
        match self {
            Transport::Ws => 0,
            Transport::Wss => 1,
            Transport::Wt => 2,
        }
    }
}

const _: () = {
    let mut i = 0;
    while i < Transport::ALL.len() {
        assert!(
            Transport::ALL[i].index() == i,
            "Transport::ALL out of order"
        );
        i += 1;
    }
};

/// One inbound message as the transport delimits it.
#[derive(Debug)]
pub enum Inbound {
    /// A WebSocket text message.
    Text(Bytes),
    /// A WebSocket binary message.
    Binary(Bytes),
    /// A frame delimited by the transport's own framing (WebTransport's length prefix):
    /// valid for either codec.
    Frame(Bytes),
    /// Transport-level liveness (a WebSocket pong or ping) with no frame to decode.
    Alive,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// An inbound message over `limits.max_frame`: 4505.
    #[error("frame too large")]
    TooLarge,
    /// Broken framing: 4504.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The connection is gone (reset, closed under us), with the transport's error.
    #[error("connection lost")]
    Io(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl SessionError {
    /// The connection is gone; `cause` says how.
    pub fn lost(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> SessionError {
        SessionError::Io(cause.into())
    }
}

/// A client session after its handshake, as the connection driver sees it.
///
/// One task owns a session: it reads, writes and closes it, so there is no split and no
/// lock. `recv` must be cancel-safe (it is raced against the outbound queue and timers in a
/// `select!`); `send` writes a batch and flushes once (syscalls dominate a gateway's CPU).
pub trait Session: Send + 'static {
    fn transport(&self) -> Transport;

    /// The next inbound message; `Ok(None)` once the peer closed. Cancel-safe.
    fn recv(&mut self) -> impl Future<Output = Result<Option<Inbound>, SessionError>> + Send;

    /// Write frames already encoded for the session's codec, then flush once.
    fn send(&mut self, frames: &[Bytes]) -> impl Future<Output = Result<(), SessionError>> + Send;

    /// A transport-level liveness probe (a WebSocket ping). Transports with their own
    /// keep-alive do nothing.
    fn ping(&mut self) -> impl Future<Output = Result<(), SessionError>> + Send;

    /// Close with a SPEC §4 code. The `kick` frame, when one is due, was sent before. Waits a
    /// bounded time for the peer's side of the close handshake.
    fn close(&mut self, code: u16, reason: &str) -> impl Future<Output = ()> + Send;
}
