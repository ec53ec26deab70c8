//! The cluster map and the meta group that holds it.
//!
//! The meta group is Raft group 0, replicated on the nodes named at `cluster init`. Its state
//! machine holds one key, `cluster-map`: the protobuf-encoded `ClusterMap` (nodes and shard
//! descriptors). Every node reads it from its local meta replica and reconciles: it starts the
//! replicas the map assigns to it, and the first replica of each shard initialises the group.
//!
//! Shards partition the 64-bit patient hash space (`dossier_api::patient_hash`) into contiguous
//! half-open ranges. Descriptors carry an epoch so that splits and replica moves can come later
//! without a format change.

use dossier_api::v1::{ClusterMap, NodeInfo, ShardDescriptor};
use dossier_storage::{ShardHandle, ShardId};
use prost::Message;

pub const META_SHARD: ShardId = 0;
pub const MAP_KEY: &[u8] = b"cluster-map";

/// The map held by a replica of the meta group, if any.
pub fn read_map(meta: &ShardHandle) -> anyhow::Result<Option<ClusterMap>> {
    let Some(bytes) = meta.get(MAP_KEY)? else {
        return Ok(None);
    };
    Ok(Some(ClusterMap::decode(bytes.as_ref())?))
}

/// Splits the hash space evenly into `shards` shards of `replicas` replicas each. Shard `i` (from 1)
/// is placed on nodes `i-1, i, ...` (mod the node count), so that first replicas (the preferred
/// leaders) are spread evenly over the nodes.
pub fn plan(nodes: &[NodeInfo], shards: u32, replicas: u32) -> ClusterMap {
    assert!(!nodes.is_empty() && shards > 0 && replicas as usize <= nodes.len());
    let n = u128::from(shards);
    let descriptors = (0..shards)
        .map(|i| {
            let lo = ((u128::from(i) << 64) / n) as u64;
            let last = i + 1 == shards;
            let hi = if last {
                0
            } else {
                ((u128::from(i + 1) << 64) / n) as u64
            };
            let replicas = (0..replicas as usize)
                .map(|k| nodes[(i as usize + k) % nodes.len()].node_id)
                .collect();
            ShardDescriptor {
                shard_id: u64::from(i) + 1,
                hash_lo: lo,
                hash_hi: hi,
                hash_hi_max: last,
                replicas,
                epoch: 1,
                learners: Vec::new(),
                split_from: 0,
                moving_from: 0,
                standbys: Vec::new(),
            }
        })
        .collect();
    ClusterMap {
        nodes: nodes.to_vec(),
        shards: descriptors,
        version: 1,
        next_shard_id: u64::from(shards) + 1,
    }
}

/// Whether `hash` falls in the descriptor's range.
pub fn covers(d: &ShardDescriptor, hash: u64) -> bool {
    hash >= d.hash_lo && (d.hash_hi_max || hash < d.hash_hi)
}

/// The descriptor's upper bound: `None` when its range runs to the end of the space.
pub fn hash_hi(d: &ShardDescriptor) -> Option<u64> {
    (!d.hash_hi_max).then_some(d.hash_hi)
}

/// The shard of a patient hash.
pub fn shard_for(map: &ClusterMap, hash: u64) -> Option<&ShardDescriptor> {
    map.shards.iter().find(|d| covers(d, hash))
}

/// Where clients reach `node`: its public services.
pub fn address(map: &ClusterMap, node: u64) -> Option<&str> {
    map.nodes
        .iter()
        .find(|n| n.node_id == node)
        .map(|n| n.address.as_str())
}

/// Where peers reach `node`'s internal services (Raft, ShardAccess).
pub fn peer_address(map: &ClusterMap, node: u64) -> Option<&str> {
    map.nodes.iter().find(|n| n.node_id == node).map(peer_of)
}

/// A node's peer endpoint: its own when it has one, else its client address.
pub fn peer_of(node: &NodeInfo) -> &str {
    if node.peer_address.is_empty() {
        &node.address
    } else {
        &node.peer_address
    }
}

pub fn encode(map: &ClusterMap) -> Vec<u8> {
    map.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The planned shards cover the whole hash space exactly once, and first replicas are spread.
    #[test]
    fn plan_covers_space_and_spreads_leaders() {
        let nodes: Vec<NodeInfo> = (1..=3)
            .map(|i| NodeInfo {
                node_id: i,
                address: format!("127.0.0.1:700{i}"),
                ..NodeInfo::default()
            })
            .collect();
        let map = plan(&nodes, 8, 3);
        for probe in [0u64, 1, u64::MAX / 8, u64::MAX / 2, u64::MAX - 1, u64::MAX] {
            let hits = map.shards.iter().filter(|d| covers(d, probe)).count();
            assert_eq!(hits, 1, "hash {probe}");
        }
        for pair in map.shards.windows(2) {
            assert_eq!(pair[0].hash_hi, pair[1].hash_lo);
        }
        let mut firsts = [0; 4];
        for d in &map.shards {
            assert_eq!(d.replicas.len(), 3);
            firsts[d.replicas[0] as usize] += 1;
        }
        assert!(
            firsts[1..].iter().all(|&c| (2..=3).contains(&c)),
            "{firsts:?}"
        );
    }
}
