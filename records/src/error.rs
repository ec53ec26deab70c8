//! The record layer's errors. The node maps them to gRPC statuses in its one error mapping.

/// What went wrong in the record layer itself (the store's own errors travel in the caller's
/// error type, see [`crate::kv::Reads`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The request is wrong: `field` is its path in the request.
    #[error("{field}: {message}")]
    InvalidArgument {
        field: String,
        message: String,
        limit: Option<u64>,
    },
    /// Stored bytes do not decode: a bug or damage, never the caller's fault.
    #[error("stored {what} does not decode")]
    Corrupt { what: String },
    /// Concurrent writes won every attempt; the caller may retry.
    #[error("{0}; retry")]
    Contended(String),
}

impl Error {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            message: message.into(),
            limit: None,
        }
    }

    pub fn corrupt(what: impl Into<String>) -> Self {
        Error::Corrupt { what: what.into() }
    }
}
