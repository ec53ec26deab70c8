//! `dossier-api`: the wire contract and the patient-to-shard hash.
//!
//! - `v1`: the public services (`Kv`, `Admin`) and `ErrorDetail`, package `dossier.v1`.
//! - `raft::v1`: the internal node-to-node service, package `dossier.raft.v1`.
//! - [`patient_hash`]: the stable hash that places a patient in a shard.
//! - `google::rpc`: the standard gRPC error model; [`error_detail`] reads a status's detail.
//!
//! Non-goals: no I/O, no networking beyond the generated stubs, no knowledge of Raft internals.

#![allow(clippy::large_enum_variant, missing_debug_implementations)] // generated code

pub mod v1 {
    tonic::include_proto!("dossier.v1");
}

/// The standard gRPC error model: `Status` in `grpc-status-details-bin`, its detail types.
pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

pub mod raft {
    pub mod v1 {
        tonic::include_proto!("dossier.raft.v1");
    }
}

mod descriptor;
mod error_detail;
mod grant;
mod hash;
pub use error_detail::{ERROR_DETAIL_TYPE_URL, error_detail};
pub use grant::{GRANT_URI_PREFIX, Grant};
pub use hash::{PATIENT_HASH_SEED, patient_hash};
