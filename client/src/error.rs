//! The client's one error type. `is_definite()` tells whether a failed write certainly did not
//! take effect; a timeout or lost connection leaves it indeterminate (with a session, a retry of
//! the same request is still applied at most once).

use std::time::Duration;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no answer within the deadline of {deadline:?} after {attempts} attempts (last: {last})"
    )]
    Timeout {
        deadline: Duration,
        attempts: u32,
        last: String,
    },
    #[error("invalid argument {field}: {message}")]
    InvalidArgument {
        field: String,
        message: String,
        limit: Option<u64>,
    },
    #[error("session: {0}")]
    Session(String),
    #[error("the cluster is not initialised or its map is unusable: {0}")]
    Cluster(String),
    #[error("no seed node answered: {0}")]
    NoSeed(String),
    #[error("server error: {0}")]
    Server(String),
}

impl ClientError {
    /// True when the request certainly had no effect (a refused argument, a refused session).
    pub fn is_definite(&self) -> bool {
        matches!(
            self,
            ClientError::InvalidArgument { .. }
                | ClientError::Session(_)
                | ClientError::Cluster(_)
                | ClientError::NoSeed(_)
        )
    }
}
