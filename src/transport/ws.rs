//! WebSocket sessions (plain and TLS), on a stream hyper has already upgraded.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use super::{Inbound, Session, SessionError, Transport};

/// A close frame's reason fits in a control frame's 125 bytes with the code.
const MAX_CLOSE_REASON: usize = 123;

/// `s` cut to at most `max` bytes at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// How long a close waits for the client's close frame before dropping the socket.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Small buffers: tungstenite's 128 KiB defaults cost ~90 KB per idle connection. The read
/// buffer starts at 512 bytes and grows only while a larger frame is in flight.
///
/// `max_frame` bounds what a client may send; `max_out` is the largest frame the gateway may
/// write (a push of `limits.max_push_body`, encoded), which the write buffer's cap must fit
/// with room for a batch behind it: a frame over the cap fails the whole connection, on every
/// reconnect (review F18). The cap is a limit, not an allocation.
pub fn config(max_frame: usize, max_out: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(512)
        .write_buffer_size(8 * 1024)
        .max_write_buffer_size(max_frame.max(max_out).max(64 * 1024) * 4)
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame))
}

pub struct WsSession<S> {
    ws: WebSocketStream<S>,
    transport: Transport,
    /// The json codec speaks text messages, proto binary ones.
    text: bool,
}

impl<S> WsSession<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Wrap an upgraded stream (the HTTP handshake is done).
    pub async fn from_upgraded(
        io: S,
        transport: Transport,
        text: bool,
        max_frame: usize,
        max_out: usize,
    ) -> Self {
        let config = config(max_frame, max_out);
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        WsSession {
            ws,
            transport,
            text,
        }
    }

    fn message(&self, frame: &Bytes) -> Result<Message, SessionError> {
        if self.text {
            Utf8Bytes::try_from(frame.clone())
                .map(Message::Text)
                .map_err(|_| SessionError::Protocol("outbound text frame is not UTF-8".into()))
        } else {
            Ok(Message::Binary(frame.clone()))
        }
    }
}

fn map_err(e: WsError) -> SessionError {
    match e {
        WsError::Capacity(_) => SessionError::TooLarge,
        // A socket dropped without a close frame is a connection that went away (1006), not
        // a client speaking bad WebSocket (4504).
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => SessionError::lost(e),
        WsError::Protocol(p) => SessionError::Protocol(p.to_string()),
        WsError::Utf8(_) => SessionError::Protocol("invalid UTF-8 in a text message".into()),
        other => SessionError::lost(other),
    }
}

impl<S> Session for WsSession<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn transport(&self) -> Transport {
        self.transport
    }

    async fn recv(&mut self) -> Result<Option<Inbound>, SessionError> {
        loop {
            // `StreamExt::next` is cancel-safe: a partly read frame stays in the buffer.
            return match self.ws.next().await {
                None => Ok(None),
                Some(Ok(Message::Text(t))) => Ok(Some(Inbound::Text(Bytes::from(t)))),
                Some(Ok(Message::Binary(b))) => Ok(Some(Inbound::Binary(b))),
                // tungstenite queues the pong itself; it is flushed with the next write.
                Some(Ok(Message::Ping(_))) | Some(Ok(Message::Pong(_))) => Ok(Some(Inbound::Alive)),
                Some(Ok(Message::Close(_))) => Ok(None),
                Some(Ok(Message::Frame(_))) => continue,
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => Ok(None),
                Some(Err(e)) => Err(map_err(e)),
            };
        }
    }

    async fn send(&mut self, frames: &[Bytes]) -> Result<(), SessionError> {
        for frame in frames {
            let msg = self.message(frame)?;
            self.ws.feed(msg).await.map_err(map_err)?;
        }
        self.ws.flush().await.map_err(map_err)
    }

    async fn ping(&mut self) -> Result<(), SessionError> {
        self.ws
            .send(Message::Ping(Bytes::new()))
            .await
            .map_err(map_err)
    }

    async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code: WsCloseCode::from(code),
            reason: truncate(reason, MAX_CLOSE_REASON).into(),
        };
        if self.ws.close(Some(frame)).await.is_err() {
            return;
        }
        // Let the client answer the close handshake so it sees a clean close, bounded.
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::truncate;

    #[test]
    fn close_reasons_fit_a_control_frame() {
        assert_eq!(truncate("short", 123), "short");
        let long = "é".repeat(100); // 200 bytes
        let cut = truncate(&long, 123);
        assert!(cut.len() <= 123 && cut.chars().all(|c| c == 'é'));
    }
}
