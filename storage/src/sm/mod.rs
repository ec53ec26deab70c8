//! The sled state store: commands, one shard replica's tree, the node's database.

pub(crate) mod command;
pub(crate) mod shard;
pub(crate) mod store;
