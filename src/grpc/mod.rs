//! gRPC (SPEC §7): the `Gateway` service business services call, and the clients of the
//! `Business` and `Auth` services imgate calls.

pub mod api;
pub mod auth;
pub mod business;
pub mod server;

use tonic::Status;

use crate::protocol::valid_id;

pub use crate::protocol::proto::pb;

/// INVALID_ARGUMENT naming the field when `id` is not a valid user, device or group id.
pub(crate) fn check_id(field: &str, id: &str) -> Result<(), Status> {
    if id.is_empty() {
        Err(Status::invalid_argument(format!("{field}: required")))
    } else if !valid_id(id) {
        Err(Status::invalid_argument(format!(
            "{field}: must be 1-128 chars of A-Z a-z 0-9 . _ : @ -"
        )))
    } else {
        Ok(())
    }
}

/// The gRPC status name (`UNAVAILABLE`, …) for `PushResult.error_code`.
pub(crate) fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
