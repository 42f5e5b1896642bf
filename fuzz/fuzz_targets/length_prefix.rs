//! The length-prefixed framing of WebTransport and native QUIC streams, fed in the chunks a
//! network would cut: frames come out whole and in order, a declared length over the limit
//! is refused, and nothing panics or grows past what arrived plus one bounded step.
#![no_main]
use bytes::BytesMut;
use imgate::transport::framing::{take_frame, PREFIX};
use libfuzzer_sys::fuzz_target;

const MAX_FRAME: usize = 4096;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size, the rest is the stream.
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut buf = BytesMut::new();
    let mut taken = 0usize;
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match take_frame(&mut buf, MAX_FRAME) {
                Ok(Some(frame)) => {
                    assert!(frame.len() <= MAX_FRAME);
                    taken += PREFIX + frame.len();
                }
                Ok(None) => break,
                Err(_) => return, // refused: the session ends here
            }
        }
        assert!(buf.capacity() <= stream.len() + 16 * 1024 + PREFIX + 64);
    }
    assert!(taken <= stream.len());
});
