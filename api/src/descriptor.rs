//! What a shard's descriptor says about the nodes: the one rule for "this node holds a copy".

use crate::v1::ShardDescriptor;

impl ShardDescriptor {
    /// Whether the shard has a replica on `node`: a voter, a move's learner or a standby.
    pub fn places(&self, node: u64) -> bool {
        self.replicas.contains(&node)
            || self.learners.contains(&node)
            || self.standbys.contains(&node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_replica_is_placed() {
        let d = ShardDescriptor {
            replicas: vec![1, 2, 3],
            learners: vec![4],
            standbys: vec![5],
            ..ShardDescriptor::default()
        };
        assert!((1..=5).all(|n| d.places(n)));
        assert!(!d.places(6));
    }
}
