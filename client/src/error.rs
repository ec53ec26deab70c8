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
    /// No certificate or token the node accepts: not retryable with the same credentials.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The caller may not do this (role, care relationship, consent).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
}

impl ClientError {
    /// A short name of the error's kind, for counts and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::Timeout { .. } => "timeout",
            ClientError::InvalidArgument { .. } => "invalid-argument",
            ClientError::Session(_) => "session",
            ClientError::Cluster(_) => "cluster",
            ClientError::NoSeed(_) => "no-seed",
            ClientError::Server(_) => "server",
            ClientError::Unauthenticated(_) => "unauthenticated",
            ClientError::PermissionDenied(_) => "permission-denied",
        }
    }

    /// True when the request certainly had no effect: its argument was refused (every attempt
    /// of it would be), or no node could be reached. A SESSION or cluster-state refusal is not
    /// definite: it may answer a retry whose earlier attempt was applied and its answer lost
    /// (a retry from a session the server has forgotten is refused, not replayed).
    pub fn is_definite(&self) -> bool {
        matches!(
            self,
            ClientError::InvalidArgument { .. } | ClientError::NoSeed(_)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refusals_that_no_attempt_could_pass_are_definite() {
        let invalid = ClientError::InvalidArgument {
            field: "key".into(),
            message: "must not be empty".into(),
            limit: None,
        };
        assert!(invalid.is_definite());
        assert!(ClientError::NoSeed("refused".into()).is_definite());
        // A retry after a lost answer can meet these although the first attempt applied.
        assert!(!ClientError::Session("forgotten".into()).is_definite());
        assert!(!ClientError::Cluster("map changed".into()).is_definite());
        assert!(!ClientError::Server("internal".into()).is_definite());
        let timeout = ClientError::Timeout {
            deadline: Duration::from_secs(1),
            attempts: 2,
            last: "unavailable".into(),
        };
        assert!(!timeout.is_definite());
    }
}
