//! Partition patterns: which nodes stay connected to each other, and which nodes each client host
//! still reaches. Patterns take turns (the `n`-th fault of its kind takes pattern `n mod 4`) and
//! are drawn over the member nodes at the time of the fault; a node that joins while one holds is
//! reached by everyone.

use std::collections::BTreeMap;

use crate::workloads::Rng;

/// Whether two nodes stay connected.
pub type Connected = Box<dyn Fn(u64, u64) -> bool + Send>;

/// Whether client host `h` (from 1) still reaches node `i`.
pub type Sees = Box<dyn Fn(u64, u64) -> bool + Send>;

/// The `n`-th pattern between nodes: its name and which pairs stay connected. `target` is a
/// shard's leader (or a random member) for the patterns that single out a node.
pub fn between_nodes(n: u64, target: u64, members: &[u64], rng: &mut Rng) -> (String, Connected) {
    let count = members.len();
    match n % 4 {
        0 => {
            // Random halves: a minority and a majority.
            let minority = sample(members, count / 2, rng);
            let name = format!("halves, minority {minority:?}");
            (
                name,
                Box::new(move |a, b| minority.contains(&a) == minority.contains(&b)),
            )
        }
        1 => (
            format!("node {target} isolated"),
            Box::new(move |a, b| a != target && b != target),
        ),
        2 => {
            // Majority ring: each node sees its ring neighbours within distance count/4 (rounded
            // up), a majority of the cluster, but no two nodes see the same majority.
            let reach = (count / 2).div_ceil(2);
            let position: BTreeMap<u64, usize> =
                members.iter().enumerate().map(|(i, &m)| (m, i)).collect();
            let name = format!("majority ring over {members:?} (reach {reach})");
            (
                name,
                Box::new(move |a, b| match (position.get(&a), position.get(&b)) {
                    (Some(&x), Some(&y)) => {
                        let d = x.abs_diff(y);
                        d.min(count - d) <= reach
                    }
                    // A node that joined after the cut: connected.
                    _ => true,
                }),
            )
        }
        _ => {
            // Bridge: two halves that only `target` connects.
            let others: Vec<u64> = members.iter().copied().filter(|&x| x != target).collect();
            let left: Vec<u64> = others[..others.len() / 2].to_vec();
            let name = format!("bridge through node {target}, halves split at {left:?}");
            (
                name,
                Box::new(move |a, b| {
                    a == target || b == target || left.contains(&a) == left.contains(&b)
                }),
            )
        }
    }
}

/// The `n`-th pattern between client hosts (1..=hosts) and nodes: its name and which nodes each
/// host still reaches. Every host keeps at least one node. `target` is a shard's leader (or a
/// random member).
pub fn clients_from_nodes(
    n: u64,
    target: u64,
    members: &[u64],
    hosts: u64,
    rng: &mut Rng,
) -> (String, Sees) {
    let count = members.len();
    let (kind, seen): (&str, BTreeMap<u64, Vec<u64>>) = match n % 4 {
        // Each host its own minority (at least one node), its own majority, one node.
        0 => (
            "a minority each",
            per_host(members, (count / 2).max(1), hosts, rng),
        ),
        1 => (
            "a majority each",
            per_host(members, count / 2 + 1, hosts, rng),
        ),
        2 => ("one node each", per_host(members, 1, hosts, rng)),
        _ => {
            let others: Vec<u64> = members.iter().copied().filter(|&m| m != target).collect();
            let seen = (1..=hosts).map(|h| (h, others.clone())).collect();
            ("all but the leader", seen)
        }
    };
    let name = format!("{kind}: {seen:?}");
    let cut_off = members.to_vec();
    (
        name,
        Box::new(move |h, i| {
            // Nodes that joined after the cut are reached.
            !cut_off.contains(&i) || seen.get(&h).is_some_and(|s| s.contains(&i))
        }),
    )
}

/// For each host, `size` members drawn at random.
fn per_host(members: &[u64], size: usize, hosts: u64, rng: &mut Rng) -> BTreeMap<u64, Vec<u64>> {
    (1..=hosts)
        .map(|h| (h, sample(members, size, rng)))
        .collect()
}

/// `size` of `members` drawn at random, sorted.
fn sample(members: &[u64], size: usize, rng: &mut Rng) -> Vec<u64> {
    let mut order = members.to_vec();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    order.truncate(size);
    order.sort_unstable();
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each client pattern leaves every host at least one node, cuts each host off from at least
    /// one node, and its sizes are the ones named: a minority, a majority, one node, all but one.
    #[test]
    fn client_patterns_cut_some_nodes_and_keep_one() {
        let members = [1, 2, 3, 4, 5];
        let mut rng = Rng(7);
        for n in 0..8 {
            let (name, sees) = clients_from_nodes(n, 3, &members, 2, &mut rng);
            for h in 1..=2 {
                let reached = members.iter().filter(|&&i| sees(h, i)).count();
                let expected = [2, 3, 1, 4][n as usize % 4];
                assert_eq!(reached, expected, "pattern {n} ({name}), host {h}");
            }
            if n % 4 == 3 {
                assert!(!sees(1, 3) && !sees(2, 3), "{name}");
            }
            // A node that was not a member when the cut was made is reached.
            assert!(sees(1, 9) && sees(2, 9));
        }
    }

    /// Node patterns: halves keep a majority together; the isolated node reaches no one; in the
    /// ring each node reaches a majority (itself included); the bridge reaches everyone.
    #[test]
    fn node_patterns() {
        let members = [1, 2, 3, 4, 6];
        let mut rng = Rng(3);
        let reach = |c: &Connected, a: u64| members.iter().filter(|&&b| c(a, b)).count();
        let (_, halves) = between_nodes(0, 2, &members, &mut rng);
        assert!(members.iter().any(|&a| reach(&halves, a) == 3));
        let (_, isolated) = between_nodes(1, 2, &members, &mut rng);
        assert_eq!(reach(&isolated, 2), 0);
        let (_, ring) = between_nodes(2, 2, &members, &mut rng);
        assert!(members.iter().all(|&a| reach(&ring, a) == 3));
        let (_, bridge) = between_nodes(3, 2, &members, &mut rng);
        assert_eq!(reach(&bridge, 2), 5);
        assert!(members.iter().any(|&a| reach(&bridge, a) < 5));
    }
}
