//! The sled state store: commands, one shard replica's tree, the node's database, splits.

pub(crate) mod apply;
pub mod chain;
pub(crate) mod command;
pub(crate) mod range;
pub(crate) mod shard;
pub(crate) mod split;
pub(crate) mod store;
pub(crate) mod write_back;
