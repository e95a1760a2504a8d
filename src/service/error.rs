//! The domain's errors. The gRPC edge maps each variant to a status code in one table
//! (`rpc::status`); nothing else decides codes.

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("run `{0}` does not exist")]
    RunNotFound(String),
    #[error("run `{run}` has no file `{path}`")]
    FileNotFound { run: String, path: String },
    #[error("run `{run}` has no test `{test}`")]
    TestNotFound { run: String, test: String },
    #[error("run `{run}` has no shard `{shard}`")]
    ShardNotFound { run: String, shard: String },
    #[error("no run of commit `{commit}` carries flag `{flag}`")]
    FlagNotFound { commit: String, flag: String },
    #[error("no source of `{path}` was pushed with run `{run}`")]
    SourceNotFound { run: String, path: String },
    /// Malformed input; `field` names where (e.g. `delta.files[3].line_gaps[17]`).
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// The run exists, and belongs to a project the caller does not reach.
    #[error("{0}")]
    PermissionDenied(String),
    /// The run exists with parameters that contradict the request.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is well-formed but the run or shard is in a state that forbids it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A configured limit would be exceeded.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A race with another stream of the same shard; reconnecting and resuming resolves it.
    #[error("{0}")]
    Aborted(String),
    /// The daemon cannot serve this now (shutting down, or its store failed).
    #[error("{0}")]
    Unavailable(String),
}

impl Error {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
