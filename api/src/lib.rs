//! `dossier-api`: the wire contract (protobuf, package `dossier.v1`) and the typed clinical records.
//!
//! Not built yet: this crate is intentionally empty. It will do no I/O.
