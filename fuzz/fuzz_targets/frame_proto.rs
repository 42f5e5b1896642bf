//! Client frames in the proto codec: any bytes decode to a frame or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = imgate::protocol::Codec::Proto.decode(data);
});
