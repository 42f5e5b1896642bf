//! The `proto` codec: one `imgate.v1.Frame` message per frame.
use bytes::Bytes;

use super::{ClientFrame, DecodeError, ServerFrame};

pub fn decode(_data: &[u8]) -> Result<ClientFrame, DecodeError> {
    todo!()
}

pub fn encode(_frame: &ServerFrame) -> Bytes {
    todo!()
}
