//! `dossier-cli`: the `dossier` admin command line.
//!
//! Not built yet: this crate is intentionally empty and ships no binary.
