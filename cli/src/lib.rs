//! `dossier-cli` library: local cluster processes and cluster operations, shared by the `dossier`
//! binary, the benchmarks and the fault harness.

pub mod audit_log;
pub mod certs;
pub mod elastic;
pub mod ops;
pub mod procs;
pub mod records;
pub mod tokens;
