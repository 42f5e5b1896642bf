//! The length-prefixed framing of WebTransport's control stream (SPEC §3; native QUIC uses
//! the same): a 4-byte big-endian length, then the frame. Plain functions over a buffer, so
//! they are unit-tested and fuzzed without any I/O.

use bytes::{Buf, Bytes, BytesMut};

use super::SessionError;

/// Bytes of the length prefix.
pub const PREFIX: usize = 4;

/// Take one whole frame off the front of `buf`, if there is one.
pub fn take_frame(buf: &mut BytesMut, max_frame: usize) -> Result<Option<Bytes>, SessionError> {
    if buf.len() < PREFIX {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max_frame {
        return Err(SessionError::TooLarge);
    }
    if buf.len() < PREFIX + len {
        // Make room for what is coming, a bounded step at a time: a declared length is only
        // a claim until the bytes arrive (review F19), and 16 KiB steps keep large frames
        // from growing chunk by chunk.
        buf.reserve((PREFIX + len - buf.len()).min(16 * 1024));
        return Ok(None);
    }
    buf.advance(PREFIX);
    let frame = buf.split_to(len).freeze();
    if buf.is_empty() {
        // An idle session keeps no read buffer.
        *buf = BytesMut::new();
    }
    Ok(Some(frame))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn framed(payloads: &[&[u8]]) -> BytesMut {
        let mut b = BytesMut::new();
        for p in payloads {
            b.put_u32(p.len() as u32);
            b.extend_from_slice(p);
        }
        b
    }

    #[test]
    fn frames_are_split_on_their_length_prefix() {
        let mut b = framed(&[b"{\"type\":\"ping\"}", b"", b"abc"]);
        assert_eq!(
            take_frame(&mut b, 64).unwrap().unwrap(),
            "{\"type\":\"ping\"}"
        );
        assert_eq!(take_frame(&mut b, 64).unwrap().unwrap(), "");
        assert_eq!(take_frame(&mut b, 64).unwrap().unwrap(), "abc");
        assert_eq!(take_frame(&mut b, 64).unwrap(), None);
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let whole = framed(&[b"hello"]);
        let mut b = BytesMut::from(&whole[..2]);
        assert_eq!(take_frame(&mut b, 64).unwrap(), None);
        b.extend_from_slice(&whole[2..6]);
        assert_eq!(take_frame(&mut b, 64).unwrap(), None);
        b.extend_from_slice(&whole[6..]);
        assert_eq!(take_frame(&mut b, 64).unwrap().unwrap(), "hello");
    }

    #[test]
    fn a_length_over_max_frame_is_refused_before_the_body_arrives() {
        let mut b = BytesMut::new();
        b.put_u32(65);
        assert!(matches!(
            take_frame(&mut b, 64),
            Err(SessionError::TooLarge)
        ));
    }
}
