//! The openraft type configuration shared by every group, and the codec of what Raft stores.

use std::fmt;
use std::io;

use dossier_storage::{Command, Outcome};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// What a client proposes to a group: a state-machine command (an atomic batch, with its
/// exactly-once session, or a session expiry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request(pub Command);

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Ids and sizes only: requests carry patient data.
        match &self.0 {
            Command::Txn { session, batch } => write!(
                f,
                "txn(session={:?}, conditions={}, ops={})",
                session.map(|s| (s.client, s.seq)),
                batch.conditions.len(),
                batch.ops.len()
            ),
            Command::ExpireSessions { before_index } => {
                write!(f, "expire-sessions(<{before_index})")
            }
            Command::Split { at, child, .. } => write!(f, "split(at={at:#018x}, child={child})"),
        }
    }
}

/// The most bytes an entry's encoding adds to its command's (log id and payload tag, every
/// integer at its longest varint).
pub const ENTRY_FRAMING_BYTES_MAX: usize = 64;

/// What applying an entry produced, returned to the proposer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Response {
    /// `None` for entries that are not commands (blank, membership).
    pub outcome: Option<Outcome>,
}

openraft::declare_raft_types!(
    /// One Raft group of Dossier: a shard replica set (or the meta group).
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        // Standard Raft: one leader per term.
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, u64>,
        AsyncRuntime = openraft_rt_tokio::TokioRuntime,
);

pub type NodeId = u64;
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
pub type CommittedLeaderId = openraft::type_config::alias::CommittedLeaderIdOf<TypeConfig>;

/// Serialises a value Raft stores or sends (entries, votes, log ids, RPCs) with postcard.
pub(crate) fn encode<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    postcard::to_allocvec(value).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Deserialises bytes from disk or the network; failure is corruption or a version mismatch.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    postcard::from_bytes(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

pub(crate) fn io_error(e: dossier_storage::Error) -> io::Error {
    io::Error::other(e)
}
