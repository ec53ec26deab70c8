//! `dossier-jepsen`: the multi-process fault-injection harness and its linearizability checker.
//!
//! Not built yet: this crate is intentionally empty.
