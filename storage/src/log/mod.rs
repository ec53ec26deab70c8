//! The shared Raft log: frames, records, segments, the per-group index and the engine.
//!
//! Reading order: `frame`, `record`, `segment`, `group`, `state`, `engine` (the public API),
//! `writer` (group commit and reclaim), `recovery`.

pub(crate) mod engine;
pub(crate) mod frame;
pub(crate) mod group;
mod prealloc;
pub(crate) mod record;
mod recovery;
pub(crate) mod segment;
mod state;
mod writer;
