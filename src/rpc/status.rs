//! The one table from domain errors to gRPC status codes.

use tonic::{Code, Status};

use crate::service::Error;

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = match &e {
            Error::RunNotFound(_)
            | Error::FileNotFound { .. }
            | Error::TestNotFound { .. }
            | Error::ShardNotFound { .. }
            | Error::FlagNotFound { .. }
            | Error::SourceNotFound { .. } => Code::NotFound,
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Aborted(_) => Code::Aborted,
            Error::Unavailable(_) => Code::Unavailable,
        };
        crate::metrics::metrics().refused(code);
        Status::new(code, e.to_string())
    }
}

/// Errors tonic raises while decoding a request stream. An oversized message is a limit, so it
/// is reported as RESOURCE_EXHAUSTED like every other limit (tonic says OUT_OF_RANGE).
pub(crate) fn inbound(status: Status) -> Status {
    if status.code() == Code::OutOfRange && status.message().contains("too large") {
        crate::metrics::metrics().refused(Code::ResourceExhausted);
        return Status::resource_exhausted(format!(
            "message too large: {}: beyond the limit --max-message-bytes (send smaller deltas)",
            status.message()
        ));
    }
    // A message that does not decode; a client that went away is no refusal.
    if status.code() != Code::Cancelled && status.code() != Code::Unknown {
        crate::metrics::metrics().refused(status.code());
    }
    status
}
