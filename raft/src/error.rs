//! The one error type of `dossier-raft`.

use dossier_storage::ShardId;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("storage failed")]
    Storage(#[from] dossier_storage::Error),

    #[error("i/o failed to {op}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid raft configuration: {0}")]
    Config(#[from] openraft::ConfigError),

    #[error("raft group {shard} stopped: {reason}")]
    Fatal { shard: ShardId, reason: String },
}
