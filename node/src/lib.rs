//! `dossier-node`: the server process (routing, meta group, data groups, gRPC and HTTP endpoints).
//!
//! Not built yet: this crate is intentionally empty and ships no binary.
