//! What the placement driver balances, decided from the cluster map alone (pure functions):
//! - **zones**: a shard with two replicas in one zone while an up node of a zone it does not use
//!   could take one moves that replica there (two data centres and a witness site: one replica
//!   per site);
//! - **replica counts**: while the most loaded up node holds two or more replicas above the least
//!   loaded one, one replica moves from the first to the second, never into a zone the shard
//!   uses already unless the source shares it;
//! - **preferred leaders**: while one up node is the preferred (first) replica of two or more
//!   shards above another that also holds one of them, that shard's replica order changes so that
//!   the other comes first; the leaders-back loop (`leadership.rs`) then hands the lead over.
//!
//! One change at a time, none while a move is in progress: each decision starts from the map as
//! the previous one left it.

use std::collections::{BTreeMap, BTreeSet};

use dossier_api::v1::{ClusterMap, NodeState, ShardDescriptor};

/// A replica move the placement driver makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Move {
    pub shard: u64,
    pub from: u64,
    pub to: u64,
    /// Why: for the log.
    pub reason: &'static str,
}

/// The up nodes that may hold voters (standby nodes hold only standbys: `standby.rs`).
fn up_nodes(map: &ClusterMap) -> Vec<u64> {
    map.nodes
        .iter()
        .filter(|n| n.state == NodeState::Up as i32 && !n.standby)
        .map(|n| n.node_id)
        .collect()
}

fn zone(map: &ClusterMap, node: u64) -> &str {
    map.nodes
        .iter()
        .find(|n| n.node_id == node)
        .map_or("", |n| n.zone.as_str())
}

/// Replicas (voters and learners, not standbys) per up node that may hold voters.
fn loads(map: &ClusterMap) -> BTreeMap<u64, usize> {
    let mut loads: BTreeMap<u64, usize> = up_nodes(map).into_iter().map(|n| (n, 0)).collect();
    for d in &map.shards {
        for r in d.replicas.iter().chain(&d.learners) {
            if let Some(l) = loads.get_mut(r) {
                *l += 1;
            }
        }
    }
    loads
}

/// The zones of `d`'s replicas other than `leaving` (empty zones are no zone).
fn zones_without<'a>(map: &'a ClusterMap, d: &ShardDescriptor, leaving: u64) -> BTreeSet<&'a str> {
    d.replicas
        .iter()
        .filter(|r| **r != leaving)
        .map(|r| zone(map, *r))
        .filter(|z| !z.is_empty())
        .collect()
}

/// The node that should receive `shard`'s replica now on `leaving` (a drain): up, holding no
/// copy of the shard, in a zone none of the shard's other replicas is in when one exists, and
/// then the one holding the fewest replicas (lowest id on a tie).
pub(crate) fn drain_target(map: &ClusterMap, shard: u64, leaving: u64) -> Option<u64> {
    let d = map.shards.iter().find(|d| d.shard_id == shard)?;
    let used = zones_without(map, d, leaving);
    loads(map)
        .into_iter()
        .filter(|(n, _)| !d.replicas.contains(n) && !d.learners.contains(n))
        .map(|(n, load)| (used.contains(zone(map, n)), load, n))
        .min()
        .map(|(_, _, n)| n)
}

/// The next replica move, if the map calls for one.
pub(crate) fn next_move(map: &ClusterMap) -> Option<Move> {
    if map.shards.iter().any(|d| !d.learners.is_empty()) {
        return None;
    }
    let loads = loads(map);
    let up: Vec<u64> = loads.keys().copied().collect();
    // Zones first: a shard that doubles up in a zone while a free zone has an up node.
    for d in &map.shards {
        let mut seen = BTreeSet::new();
        let doubled = d
            .replicas
            .iter()
            .filter(|r| !zone(map, **r).is_empty())
            .filter(|r| !seen.insert(zone(map, **r)))
            .copied()
            .last();
        let Some(doubled) = doubled else { continue };
        let used: BTreeSet<&str> = d.replicas.iter().map(|r| zone(map, *r)).collect();
        let target = up
            .iter()
            .filter(|n| !d.replicas.contains(n))
            .filter(|n| !zone(map, **n).is_empty() && !used.contains(zone(map, **n)))
            .min_by_key(|n| (loads[n], **n));
        if let Some(&to) = target {
            // Of the replicas sharing the doubled zone, the one on the busier node leaves.
            let twin_zone = zone(map, doubled);
            let from = d
                .replicas
                .iter()
                .filter(|r| zone(map, **r) == twin_zone)
                .max_by_key(|r| (loads.get(r).copied().unwrap_or(usize::MAX), **r))
                .copied()
                .unwrap_or(doubled);
            return Some(Move {
                shard: d.shard_id,
                from,
                to,
                reason: "two replicas in one zone",
            });
        }
    }
    // Then counts: to the least loaded up node, from the most loaded one that can give it a
    // replica without putting two in one zone.
    let mut targets: Vec<(usize, u64)> = loads.iter().map(|(n, l)| (*l, *n)).collect();
    targets.sort_unstable();
    let mut sources = targets.clone();
    sources.sort_unstable_by(|a, b| b.cmp(a));
    for &(low, to) in &targets {
        let to_zone = zone(map, to);
        for &(high, from) in &sources {
            if high < low + 2 {
                break;
            }
            let fits = |d: &&ShardDescriptor| {
                d.replicas.contains(&from)
                    && !d.replicas.contains(&to)
                    && (to_zone.is_empty()
                        || to_zone == zone(map, from)
                        || !zones_without(map, d, from).contains(to_zone))
            };
            if let Some(d) = map.shards.iter().find(fits) {
                return Some(Move {
                    shard: d.shard_id,
                    from,
                    to,
                    reason: "replica counts",
                });
            }
        }
    }
    None
}

/// The next change of a shard's preferred leader: its new replica order.
pub(crate) fn next_preference(map: &ClusterMap) -> Option<(u64, Vec<u64>)> {
    let mut preferred: BTreeMap<u64, usize> = up_nodes(map).into_iter().map(|n| (n, 0)).collect();
    for d in &map.shards {
        if let Some(first) = d.replicas.first()
            && let Some(c) = preferred.get_mut(first)
        {
            *c += 1;
        }
    }
    let (&most, &high) = preferred.iter().max_by_key(|(n, c)| (**c, **n))?;
    // The least preferred node that holds a replica of one of `most`'s preferred shards.
    let mut candidates: Vec<(usize, u64, u64)> = map
        .shards
        .iter()
        .filter(|d| d.replicas.first() == Some(&most))
        .flat_map(|d| {
            d.replicas
                .iter()
                .skip(1)
                .filter_map(|r| preferred.get(r).map(|c| (*c, *r, d.shard_id)))
                .collect::<Vec<_>>()
        })
        .collect();
    candidates.sort_unstable();
    let &(low, to, shard) = candidates.first()?;
    if high < low + 2 {
        return None;
    }
    let d = map.shards.iter().find(|d| d.shard_id == shard)?;
    let mut order = vec![to];
    order.extend(d.replicas.iter().copied().filter(|r| *r != to));
    Some((shard, order))
}

#[cfg(test)]
mod tests {
    use dossier_api::v1::NodeInfo;

    use super::*;
    use crate::meta;

    fn map(zones: &[&str], shards: u32) -> ClusterMap {
        let nodes: Vec<NodeInfo> = zones
            .iter()
            .enumerate()
            .map(|(i, z)| NodeInfo {
                node_id: i as u64 + 1,
                address: format!("10.0.0.{}:7000", i + 1),
                zone: (*z).into(),
                ..NodeInfo::default()
            })
            .collect();
        let mut m = meta::plan(&nodes[..3], shards, 3);
        m.nodes = nodes;
        m
    }

    fn apply(m: &mut ClusterMap, mv: Move) {
        let d = m
            .shards
            .iter_mut()
            .find(|d| d.shard_id == mv.shard)
            .unwrap();
        for r in &mut d.replicas {
            if *r == mv.from {
                *r = mv.to;
            }
        }
    }

    #[test]
    fn a_joined_node_takes_its_share_and_zones_stay_apart() {
        // Three nodes of zones a, b, c hold 6 shards; node 4 joins in zone a.
        let mut m = map(&["a", "b", "c", "a"], 6);
        let mut moves = 0;
        while let Some(mv) = next_move(&m) {
            // Only from the node of its own zone: the others would double zone a.
            assert_eq!(mv.from, 1, "{mv:?}");
            apply(&mut m, mv);
            moves += 1;
            assert!(moves <= 18, "no end to the moves");
        }
        let l = loads(&m);
        assert_eq!((l[&1], l[&4]), (3, 3), "{l:?}");
        // No zone doubled.
        for d in &m.shards {
            let zones: BTreeSet<&str> = d.replicas.iter().map(|r| zone(&m, *r)).collect();
            assert_eq!(zones.len(), 3, "{d:?}");
        }
    }

    #[test]
    fn counts_even_out_without_zones_and_doubled_zones_are_fixed() {
        let mut m = map(&["", "", "", ""], 8);
        let mut moves = 0;
        while let Some(mv) = next_move(&m) {
            apply(&mut m, mv);
            moves += 1;
            assert!(moves <= 24);
        }
        let l = loads(&m);
        let (max, min) = (l.values().max().unwrap(), l.values().min().unwrap());
        assert!(max - min <= 1, "{l:?}");
        assert_eq!(moves, 6, "24 replicas over 4 nodes: 6 move to the new one");

        // Two replicas in zone a, and zone c has a free node: the busier twin moves there.
        let mut m = map(&["a", "a", "b", "c"], 1);
        let mv = next_move(&m).unwrap();
        assert_eq!((mv.to, mv.reason), (4, "two replicas in one zone"));
        apply(&mut m, mv);
        assert_eq!(next_move(&m), None);
        // No move while another is in progress.
        let mut m = map(&["", "", "", ""], 8);
        m.shards[0].learners = vec![4];
        assert_eq!(next_move(&m), None);
    }

    #[test]
    fn preferred_leaders_spread() {
        let mut m = map(&["", "", "", ""], 8);
        // Every shard prefers node 1 first.
        for d in &mut m.shards {
            d.replicas = vec![1, 2, 3];
        }
        let mut changes = 0;
        while let Some((shard, order)) = next_preference(&m) {
            m.shards
                .iter_mut()
                .find(|d| d.shard_id == shard)
                .unwrap()
                .replicas = order;
            changes += 1;
            assert!(changes <= 8);
        }
        let mut first: BTreeMap<u64, usize> = BTreeMap::new();
        for d in &m.shards {
            *first.entry(d.replicas[0]).or_default() += 1;
        }
        // Node 4 holds no replica: it cannot be preferred. 8 over nodes 1..3: 3, 3, 2.
        assert_eq!(first.values().max(), Some(&3), "{first:?}");
        assert!(!first.contains_key(&4));
    }
}
