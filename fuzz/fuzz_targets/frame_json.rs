//! Client frames in the json codec: any bytes decode to a frame or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = imgate::protocol::Codec::Json.decode(data);
});
