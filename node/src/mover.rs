//! Replica moves: a shard's replica goes from one node to another without the shard ever having
//! fewer voters than before, and without a request routed by the old map being served wrongly.
//!
//! Run by the meta group's leader (`Node::move_replica`), every step checking what is done
//! already, so that a move interrupted by a crash is finished by asking again:
//! 1. the map lists the target among the shard's `learners`: the target starts an empty replica;
//! 2. the shard's leader (`Node::change_replicas_here`, reached through the internal
//!    `ShardAccess.ChangeReplicas`) adds the target as a Raft learner and waits until it has
//!    caught up (by snapshot when far behind), then replaces the source by the target among the
//!    voters through openraft's joint consensus; a leader that is the source hands its
//!    leadership over first;
//! 3. the map lists the target in the source's place among `replicas`, epoch + 1, so that clients
//!    re-route (`STALE_EPOCH`);
//! 4. the source sees that the map no longer lists it and drops its replica (`reconcile`).

use std::collections::BTreeSet;
use std::time::Duration;

use dossier_api::raft::v1::ChangeReplicasRequest;
use dossier_api::v1::{ClusterMap, NodeState, ShardDescriptor};
use dossier_raft::openraft::async_runtime::WatchReceiver;
use dossier_raft::openraft::{BasicNode, ChangeMembers, ServerState};
use tracing::info;

use crate::errors::ApiError;
use crate::membership::{MapChange, descriptor};
use crate::meta;
use crate::node::Node;

/// How long a new replica may take to catch up with its shard's leader.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(300);
/// Beyond the catch-up, for reaching the shard's leader and changing the voters.
const CHANGE_SLACK: Duration = Duration::from_secs(30);

/// Step 1: checks the move and lists `to` as a learner of the shard (unless done already).
pub(crate) fn begin_move(
    map: &ClusterMap,
    shard: u64,
    from: u64,
    to: u64,
) -> Result<MapChange, ApiError> {
    let d = descriptor(map, shard)?;
    if d.replicas.contains(&to) && !d.replicas.contains(&from) {
        return Ok(MapChange::Unchanged); // finished already
    }
    if !d.replicas.contains(&from) {
        return Err(ApiError::invalid(
            "from_node",
            format!(
                "node {from} holds no replica of shard {shard} (replicas {:?})",
                d.replicas
            ),
        ));
    }
    if d.replicas.contains(&to) {
        return Err(ApiError::invalid(
            "to_node",
            format!("node {to} holds a replica of shard {shard} already"),
        ));
    }
    let node =
        map.nodes.iter().find(|n| n.node_id == to).ok_or_else(|| {
            ApiError::invalid("to_node", format!("node {to} is not in the cluster"))
        })?;
    if node.state != NodeState::Up as i32 {
        return Err(ApiError::invalid(
            "to_node",
            format!("node {to} is not up; replicas go only to nodes that are"),
        ));
    }
    if node.standby {
        return Err(ApiError::invalid(
            "to_node",
            format!("node {to} is a standby node: it holds only non-voting standby replicas"),
        ));
    }
    if d.learners.contains(&to) && d.moving_from == from {
        return Ok(MapChange::Unchanged);
    }
    if !d.learners.is_empty() {
        return Err(ApiError::Unavailable(format!(
            "shard {shard} has a move in progress (node {} replacing node {}); it is finished first",
            d.learners[0], d.moving_from
        )));
    }
    let mut next = map.clone();
    let d = next
        .shards
        .iter_mut()
        .find(|d| d.shard_id == shard)
        .expect("found above");
    d.learners.push(to);
    d.moving_from = from;
    Ok(MapChange::Next(next))
}

/// Step 3: `to` in `from`'s place among the replicas (same position: the preferred leader
/// moves with it), no longer a learner, epoch + 1.
pub(crate) fn finish_move(
    map: &ClusterMap,
    shard: u64,
    from: u64,
    to: u64,
) -> Result<MapChange, ApiError> {
    let d = descriptor(map, shard)?;
    if d.replicas.contains(&to) && !d.replicas.contains(&from) {
        return Ok(MapChange::Unchanged);
    }
    let mut next = map.clone();
    let d = next
        .shards
        .iter_mut()
        .find(|d| d.shard_id == shard)
        .expect("found above");
    let Some(slot) = d.replicas.iter().position(|r| *r == from) else {
        return Err(ApiError::invalid(
            "from_node",
            format!("node {from} holds no replica of shard {shard}"),
        ));
    };
    d.replicas[slot] = to;
    d.learners.retain(|l| *l != to);
    d.moving_from = 0;
    d.epoch += 1;
    Ok(MapChange::Next(next))
}

impl Node {
    /// Moves the replica of `shard` on node `from` to node `to` (on the meta leader).
    pub async fn move_replica(
        &self,
        shard: u64,
        from: u64,
        to: u64,
    ) -> Result<ShardDescriptor, ApiError> {
        if shard == meta::META_SHARD {
            return Err(ApiError::invalid(
                "shard_id",
                "the meta group's replicas are not moved this way",
            ));
        }
        if from == to {
            return Err(ApiError::invalid("to_node", "must differ from from_node"));
        }
        let map = self.change_map(|m| begin_move(m, shard, from, to)).await?;
        let d = descriptor(&map, shard)?.clone();
        if d.replicas.contains(&to) && !d.replicas.contains(&from) {
            return Ok(d);
        }
        let address = meta::peer_address(&map, to)
            .ok_or_else(|| ApiError::invalid("to_node", format!("node {to} has no address")))?
            .to_owned();
        info!(
            shard,
            from, to, "replica move: the target catches up as a learner"
        );
        let voters = self
            .change_replicas_on_leader(
                &d,
                ChangeReplicasRequest {
                    shard_id: shard,
                    add_node: to,
                    add_address: address,
                    remove_node: from,
                    catch_up_timeout_ms: CATCH_UP_TIMEOUT.as_millis() as u64,
                    standby: false,
                },
                CATCH_UP_TIMEOUT + CHANGE_SLACK,
                "the voter change",
            )
            .await?;
        info!(shard, from, to, ?voters, "replica move: voters changed");
        let map = self.change_map(|m| finish_move(m, shard, from, to)).await?;
        let d = descriptor(&map, shard)?.clone();
        info!(shard, from, to, epoch = d.epoch, "replica move: done");
        Ok(d)
    }

    /// Runs the voter change on the shard's leader, wherever it is, following hints.
    /// Runs `request` (a voter or standby change of `d`) on the shard's leader, wherever it
    /// is, following hints, within `within`; returns the voters afterwards.
    pub(crate) async fn change_replicas_on_leader(
        &self,
        d: &ShardDescriptor,
        request: ChangeReplicasRequest,
        within: Duration,
        what: &str,
    ) -> Result<Vec<u64>, ApiError> {
        self.on_shard_leader(
            d,
            within,
            what,
            || self.change_replicas_here(&request),
            |mut client| {
                let mut call = tonic::Request::new(request.clone());
                call.set_timeout(within);
                async move { Ok(client.change_replicas(call).await?.into_inner().voters) }
            },
        )
        .await
    }

    /// On the shard's leader: `add` becomes a caught-up learner, then a voter in `remove`'s
    /// place. Idempotent.
    pub(crate) async fn change_replicas_here(
        &self,
        r: &ChangeReplicasRequest,
    ) -> Result<Vec<u64>, ApiError> {
        let shard = r.shard_id;
        let raft = self.group(shard).ok_or(ApiError::shard_not_found(shard))?;
        self.wake_if_leader(shard).await;
        let metrics = raft.metrics().borrow_watched().clone();
        if metrics.state != ServerState::Leader {
            return Err(self.not_leader(shard, metrics.current_leader, None));
        }
        // A split applied here that the map does not show yet: its new shard took this group's
        // members as they were; the voters change after the map shows the split.
        if let (Some(range), Some(d)) = (
            self.replica(shard).and_then(|r| r.range()),
            self.map()
                .and_then(|m| m.shards.into_iter().find(|d| d.shard_id == shard)),
        ) && range.hi != meta::hash_hi(&d)
        {
            return Err(ApiError::Unavailable(format!(
                "shard {shard} is splitting; its replicas change after the split"
            )));
        }
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        if r.standby {
            let member = membership.get_node(&r.remove_node).is_some();
            return self.change_standby_here(&raft, r, &voters, member).await;
        }
        let mut wanted = voters.clone();
        wanted.remove(&r.remove_node);
        wanted.insert(r.add_node);
        if wanted == voters {
            return Ok(voters.into_iter().collect());
        }
        let me = self.node_id();
        if r.remove_node == me {
            // The leader leaves: hand the leadership to a voter that stays, then the caller
            // retries on it.
            if let Some(next) = voters
                .iter()
                .copied()
                .find(|v| *v != me && wanted.contains(v))
            {
                raft.trigger()
                    .transfer_leader(next)
                    .await
                    .map_err(|e| ApiError::Unavailable(format!("shard {shard}: {e}")))?;
                return Err(self.not_leader(shard, Some(next), None));
            }
        }
        let timeout = Duration::from_millis(r.catch_up_timeout_ms.max(1000));
        if !voters.contains(&r.add_node) {
            match tokio::time::timeout(
                timeout,
                raft.add_learner(r.add_node, BasicNode::new(&r.add_address), true),
            )
            .await
            {
                Err(_) => {
                    return Err(ApiError::Unavailable(format!(
                        "shard {shard}: node {} did not catch up within {timeout:?}",
                        r.add_node
                    )));
                }
                Ok(Err(e)) => return Err(raft_error(self, shard, &e)),
                Ok(Ok(_)) => {}
            }
        }
        raft.change_membership(ChangeMembers::ReplaceAllVoters(wanted.clone()), false)
            .await
            .map_err(|e| raft_error(self, shard, &e))?;
        Ok(wanted.into_iter().collect())
    }
}

impl Node {
    /// On the shard's leader: `add_node` (if set) becomes a non-voting learner, without waiting
    /// for it to catch up; `remove_node` (if set) leaves the members. Idempotent; refuses to
    /// touch a voter.
    async fn change_standby_here(
        &self,
        raft: &dossier_raft::Raft,
        r: &ChangeReplicasRequest,
        voters: &BTreeSet<u64>,
        remove_is_member: bool,
    ) -> Result<Vec<u64>, ApiError> {
        let shard = r.shard_id;
        for (field, node) in [("add_node", r.add_node), ("remove_node", r.remove_node)] {
            if voters.contains(&node) {
                return Err(ApiError::invalid(
                    field,
                    format!("node {node} is a voter of shard {shard}, not a standby"),
                ));
            }
        }
        if r.add_node != 0 {
            // Already a learner: AddNodes leaves it as it is.
            raft.add_learner(r.add_node, BasicNode::new(&r.add_address), false)
                .await
                .map_err(|e| raft_error(self, shard, &e))?;
        }
        if r.remove_node != 0 && remove_is_member {
            raft.change_membership(
                ChangeMembers::RemoveNodes(BTreeSet::from([r.remove_node])),
                false,
            )
            .await
            .map_err(|e| raft_error(self, shard, &e))?;
        }
        Ok(voters.iter().copied().collect())
    }
}

fn raft_error(
    node: &Node,
    shard: u64,
    e: &dossier_raft::openraft::errors::RaftError<
        dossier_raft::TypeConfig,
        dossier_raft::openraft::errors::ClientWriteError<dossier_raft::TypeConfig>,
    >,
) -> ApiError {
    match e.forward_to_leader() {
        Some(f) => node.not_leader(shard, f.leader_id, f.leader_node.as_ref()),
        None => ApiError::Unavailable(format!("shard {shard}: {e}")),
    }
}
