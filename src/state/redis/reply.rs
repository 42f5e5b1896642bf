//! Reading the scripts' replies.

use ::redis::{RedisResult, Value};

use super::codec;
use crate::state::StoredMessage;

/// A script's reply was not what it returns (a bug, or a foreign key under our prefix):
/// reported as a store error rather than a panic.
pub(super) fn bad(what: &'static str) -> ::redis::RedisError {
    ::redis::RedisError::from((
        ::redis::ErrorKind::UnexpectedReturnType,
        "unexpected reply",
        what.to_string(),
    ))
}

pub(super) fn int(v: &Value) -> RedisResult<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        _ => Err(bad("integer")),
    }
}

pub(super) fn text(v: &Value) -> RedisResult<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).map_err(|_| bad("utf-8 string")),
        Value::SimpleString(s) => Ok(s.clone()),
        _ => Err(bad("string")),
    }
}

pub(super) fn entries(first_seq: i64, v: &Value) -> RedisResult<Vec<StoredMessage>> {
    let Value::Array(items) = v else {
        return Err(bad("entries"));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::BulkString(b) => {
                codec::decode_entry(first_seq as u64 + i as u64, b).ok_or_else(|| bad("entry"))
            }
            _ => Err(bad("entry")),
        })
        .collect()
}

pub(super) fn array(v: Value, n: usize) -> RedisResult<Vec<Value>> {
    match v {
        Value::Array(a) if a.len() >= n => Ok(a),
        _ => Err(bad("array")),
    }
}
