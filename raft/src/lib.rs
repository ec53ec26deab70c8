//! `dossier-raft`: openraft `=0.10.0-alpha.37` over `dossier-storage`, and the multi-group network.
//!
//! Not built yet: this crate is intentionally empty. It must know nothing of patients.
