//! `dossier-jepsen`: a multi-process fault-injection harness for Dossier with its own checker.
//!
//! - [`history`]: the JSONL history format any independent checker can read.
//! - [`workloads`]: registers over a few values (read, write, compare-and-set) and grow-only sets
//!   with one key per element, read back by scans.
//! - [`nemesis`]: faults on a schedule: kills, pauses, partitions between nodes and between
//!   client hosts and nodes (in network namespaces, [`netns`], [`client_host`]), leader
//!   transfers; and beside them, changes of the cluster's shape: replica moves, joins, removals,
//!   splits.
//! - [`checker`]: linearizability per register key (Wing–Gong–Lowe with memoisation, `info`
//!   operations optional, a time budget that answers `unknown`, never `valid`), set integrity
//!   (lost, unexpected, duplicated elements, reads missing what was there before they began),
//!   availability.
//!
//! Non-goals: no knowledge of Dossier's internals; it talks to the cluster only through
//! `dossier-client` and the public gRPC API, and controls processes with signals.

pub mod audit;
pub mod checker;
pub mod client_host;
pub mod history;
pub mod identifiers;
pub mod nemesis;
pub mod netns;
pub mod runner;
pub mod workloads;
