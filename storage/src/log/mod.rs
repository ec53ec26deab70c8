//! The shared Raft log: frames, records, segments, the per-group index and the engine.

pub(crate) mod engine;
pub(crate) mod frame;
pub(crate) mod group;
pub(crate) mod record;
pub(crate) mod segment;
