//! `dossier-raft`: openraft `=0.10.0-alpha.37` over `dossier-storage`, many groups per node.
//!
//! - [`LogStore`]: `RaftLogStorage` over one group's part of the node's shared, group-committed log.
//! - [`StateMachine`]: `RaftStateMachine` over one shard replica of the sled state store, with
//!   snapshot files.
//! - [`PeerPool`] / [`GroupNetwork`]: one tonic channel per peer node carrying every group's
//!   messages, each tagged with its shard id; [`RaftServer`] receives them.
//! - [`GroupContext::start`]: starts a replica.
//!
//! Non-goals: this crate knows nothing of patients, routing or the public API.

mod append;
mod error;
mod group;
#[cfg(test)]
mod lease_credit_tests;
mod log_store;
mod network;
mod server;
mod snapshot_send;
mod state_machine;
mod types;
mod vote_hold;

pub use append::AppendStreamCounts;
pub use error::Error;
pub use group::{GroupContext, QUIESCE_AFTER_DEFAULT_MS, Raft, RaftConfig};
pub use log_store::LogStore;
pub use network::{APPEND_PIPELINE_DEPTH, GroupNetwork, NetworkConfig, PeerPool};
pub use server::{GroupRegistry, RaftServer};
pub use snapshot_send::SnapshotCounts;
pub use state_machine::{SnapshotData, StateMachine};
pub use types::{
    ENTRY_FRAMING_BYTES_MAX, Entry, LogId, NodeId, Request, Response, StoredMembership, TypeConfig,
    Vote,
};
pub use vote_hold::VoteHold;

/// openraft itself, for the types the node needs (metrics, errors, membership).
pub use openraft;
