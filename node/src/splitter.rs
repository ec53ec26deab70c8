//! Shard splits: a shard's hash range divides in two at a patient hash, without a moment where
//! a key is served by two shards or by none.
//!
//! Run by the meta group's leader (`Node::split_shard`), each step checking what is done, so that
//! a split interrupted by a crash is finished by asking again:
//! 1. the map reserves the new shard's id (`next_shard_id`), so ids are never reused;
//! 2. the shard's leader (`Node::split_here`, through the internal `ShardAccess.Split`) proposes
//!    the `Split` command; each replica, applying it, builds the new shard's replica on its own
//!    node from its own copy (the keys routed to `[at, hi)` and the session table) and from then
//!    on refuses those keys (retryably) whatever map a request was routed by;
//! 3. the map gives the shard `[lo, at)` with its epoch + 1 and lists the new shard `[at, hi)` on
//!    the same nodes (its preferred leader the next replica, to spread leaderships), so clients
//!    re-route (`STALE_EPOCH`); nodes start the new shard's group from the state their split
//!    built (`reconcile`).

use std::time::Duration;

use dossier_api::raft::v1::{SplitRequest, SplitResponse};
use dossier_api::v1::{ClusterMap, ShardDescriptor};
use dossier_raft::openraft::ServerState;
use dossier_raft::openraft::async_runtime::WatchReceiver;
use dossier_storage::{Command, HashRange};
use tracing::{info, warn};

use crate::errors::ApiError;
use crate::membership::{MapChange, descriptor};
use crate::meta;
use crate::node::Node;

/// For the shard's leader to choose the split point, propose and apply the split (which copies
/// half the shard on every replica).
const SPLIT_TIMEOUT: Duration = Duration::from_secs(120);

/// The id the next new shard takes.
fn next_id(map: &ClusterMap) -> u64 {
    let above = map.shards.iter().map(|d| d.shard_id).max().unwrap_or(0) + 1;
    map.next_shard_id.max(above)
}

/// Step 1: checks the request and reserves an id for the new shard.
fn reserve(map: &ClusterMap, shard: u64, at: u64) -> Result<MapChange, ApiError> {
    let d = descriptor(map, shard)?;
    if !d.learners.is_empty() {
        return Err(ApiError::Unavailable(format!(
            "shard {shard} has a replica move in progress (learners {:?}); split it afterwards",
            d.learners
        )));
    }
    if at != 0 && (at <= d.hash_lo || !meta::covers(d, at)) {
        return Err(ApiError::invalid(
            "at",
            format!(
                "{at} is not inside shard {shard}'s range above its first hash ({}..{})",
                d.hash_lo,
                if d.hash_hi_max {
                    "end".to_owned()
                } else {
                    d.hash_hi.to_string()
                }
            ),
        ));
    }
    let mut next = map.clone();
    next.next_shard_id = next_id(map) + 1;
    Ok(MapChange::Next(next))
}

/// Step 3: the shard keeps `[lo, at)`, the new shard `child` takes `[at, hi)`.
fn publish(
    map: &ClusterMap,
    shard: u64,
    at: u64,
    child: u64,
    leader: u64,
) -> Result<MapChange, ApiError> {
    if map.shards.iter().any(|d| d.shard_id == child) {
        return Ok(MapChange::Unchanged); // published already
    }
    let d = descriptor(map, shard)?.clone();
    if at <= d.hash_lo || !meta::covers(&d, at) {
        return Err(ApiError::Internal(format!(
            "shard {shard} split at {at}, outside its range in the map"
        )));
    }
    let mut next = map.clone();
    let epoch = d.epoch + 1;
    // The node that split it leads the new shard from the start; the placement driver spreads
    // preferred leaders later.
    let mut replicas = d.replicas.clone();
    if let Some(i) = replicas.iter().position(|r| *r == leader) {
        replicas[..=i].rotate_right(1);
    }
    for s in &mut next.shards {
        if s.shard_id == shard {
            s.hash_hi = at;
            s.hash_hi_max = false;
            s.epoch = epoch;
        }
    }
    next.shards.push(ShardDescriptor {
        shard_id: child,
        hash_lo: at,
        hash_hi: d.hash_hi,
        hash_hi_max: d.hash_hi_max,
        replicas,
        epoch,
        learners: Vec::new(),
        split_from: shard,
        moving_from: 0,
        // Each standby applied the split too and built its copy of the new shard.
        standbys: d.standbys.clone(),
    });
    next.shards.sort_by_key(|s| s.hash_lo);
    next.next_shard_id = next.next_shard_id.max(child + 1);
    Ok(MapChange::Next(next))
}

impl Node {
    /// Splits `shard` at hash `at` (0: the middle patient), on the meta leader. Returns the two
    /// descriptors.
    pub async fn split_shard(
        &self,
        shard: u64,
        at: u64,
    ) -> Result<(ShardDescriptor, ShardDescriptor), ApiError> {
        if shard == meta::META_SHARD {
            return Err(ApiError::invalid(
                "shard_id",
                "the meta group does not split",
            ));
        }
        let map = self.change_map(|m| reserve(m, shard, at)).await?;
        // `reserve` wrote this map: the id below its next one is this split's.
        let child = map.next_shard_id - 1;
        let d = descriptor(&map, shard)?.clone();
        let request = SplitRequest {
            shard_id: shard,
            at,
            child,
            hash_lo: d.hash_lo,
            hash_hi: d.hash_hi,
            hash_hi_max: d.hash_hi_max,
        };
        info!(shard, at, child, "split: proposing it to the shard's group");
        let done: SplitResponse = self
            .on_shard_leader(
                &d,
                SPLIT_TIMEOUT,
                "the split",
                || self.split_here(&request),
                |mut client| {
                    let mut call = tonic::Request::new(request);
                    call.set_timeout(SPLIT_TIMEOUT);
                    async move { Ok(client.split(call).await?.into_inner()) }
                },
            )
            .await?;
        let map = self
            .change_map(|m| publish(m, shard, done.at, done.child, done.leader))
            .await?;
        let left = descriptor(&map, shard)?.clone();
        let right = descriptor(&map, done.child)?.clone();
        let decision = crate::placement_log::Decision {
            kind: "split",
            shard,
            from: 0,
            to: done.child,
            reason: "requested",
        };
        self.placement_log
            .record(decision, format!("done at {:#018x}", done.at));
        info!(
            shard,
            child = done.child,
            at = done.at,
            epoch = left.epoch,
            "split: done"
        );
        Ok((left, right))
    }

    /// On the shard's leader: proposes the split unless the group split already (then answers
    /// that split). Idempotent.
    pub(crate) async fn split_here(&self, r: &SplitRequest) -> Result<SplitResponse, ApiError> {
        let shard = r.shard_id;
        let raft = self.group(shard).ok_or(ApiError::shard_not_found(shard))?;
        // Every committed entry applied here first: a split an earlier leader committed must be
        // seen (and finished), never made a second time over the same range.
        self.read_barrier(shard, SPLIT_TIMEOUT).await?;
        let metrics = raft.metrics().borrow_watched().clone();
        if metrics.state != ServerState::Leader {
            return Err(self.not_leader(shard, metrics.current_leader, None));
        }
        let membership = metrics.membership_config.membership().clone();
        // Standbys are learners that stay: they apply the split like the voters. Any other
        // learner is a move's target.
        let standbys = self
            .map()
            .and_then(|m| m.shards.into_iter().find(|d| d.shard_id == shard))
            .map(|d| d.standbys)
            .unwrap_or_default();
        let moving = membership.learner_ids().any(|l| !standbys.contains(&l));
        if membership.get_joint_config().len() > 1 || moving {
            return Err(ApiError::Unavailable(format!(
                "shard {shard} is changing its replicas; split it afterwards"
            )));
        }
        let replica = self
            .replica(shard)
            .ok_or(ApiError::shard_not_found(shard))?;
        let internal =
            |e: dossier_storage::Error| ApiError::Internal(format!("shard {shard}: {e}"));
        let map_hi = (!r.hash_hi_max).then_some(r.hash_hi);
        if let Some(range) = replica.range()
            && range.hi != map_hi
            && let Some((at, child)) = replica.last_split().map_err(internal)?
        {
            // Split already, and the map does not show it yet: finish that split.
            return Ok(SplitResponse {
                at,
                child,
                leader: self.node_id(),
            });
        }
        let at = if r.at != 0 {
            r.at
        } else {
            let replica = replica.clone();
            tokio::task::spawn_blocking(move || replica.split_point())
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?
                .map_err(internal)?
                .ok_or_else(|| {
                    ApiError::invalid(
                        "at",
                        format!(
                            "shard {shard} holds fewer than two patients: a patient never spans two shards"
                        ),
                    )
                })?
        };
        let range = HashRange {
            lo: r.hash_lo,
            hi: map_hi,
        };
        if at <= r.hash_lo || !range.contains(at) {
            return Err(ApiError::invalid(
                "at",
                format!("{at} is not inside shard {shard}'s range above its first hash"),
            ));
        }
        let command = Command::Split {
            at,
            child: r.child,
            lo: r.hash_lo,
            hi: map_hi,
        };
        self.write(shard, command, SPLIT_TIMEOUT).await?;
        info!(
            shard,
            at,
            child = r.child,
            "split: applied by the shard's leader"
        );
        // The new shard's group starts here from the state the split built and stands for
        // election at once, so that it has a leader by the time the map routes to it.
        if let Err(e) = self.start_split_child(r.child).await {
            warn!(shard, child = r.child, error = %e, "split: the new shard's group did not start here");
        }
        Ok(SplitResponse {
            at,
            child: r.child,
            leader: self.node_id(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> ClusterMap {
        let nodes: Vec<dossier_api::v1::NodeInfo> = (1..=3)
            .map(|i| dossier_api::v1::NodeInfo {
                node_id: i,
                address: format!("10.0.0.{i}:7000"),
                ..Default::default()
            })
            .collect();
        meta::plan(&nodes, 2, 3)
    }

    #[test]
    fn a_split_divides_the_range_and_bumps_epochs() {
        let m = map();
        assert_eq!(next_id(&m), 3);
        let MapChange::Next(m) = reserve(&m, 2, 0).unwrap() else {
            panic!("reserves an id")
        };
        assert_eq!(m.next_shard_id, 4);
        let at = m.shards[1].hash_lo + 10;
        let MapChange::Next(n) = publish(&m, 2, at, 3, 2).unwrap() else {
            panic!("publishes")
        };
        let left = descriptor(&n, 2).unwrap();
        let right = descriptor(&n, 3).unwrap();
        assert_eq!((left.hash_hi, left.hash_hi_max, left.epoch), (at, false, 2));
        assert_eq!(
            (right.hash_lo, right.hash_hi_max, right.epoch),
            (at, true, 2)
        );
        assert_eq!(right.split_from, 2);
        assert_eq!(right.replicas[0], 2, "the node that split it leads first");
        // Ranges still cover the space without gap or overlap, in order.
        for pair in n.shards.windows(2) {
            assert_eq!(pair[0].hash_hi, pair[1].hash_lo);
        }
        assert!(matches!(
            publish(&n, 2, at, 3, 2).unwrap(),
            MapChange::Unchanged
        ));
        // Outside the range, or at its first hash: refused.
        assert!(reserve(&n, 2, at).is_err());
        assert!(reserve(&n, 2, n.shards[1].hash_lo).is_err());
    }
}
