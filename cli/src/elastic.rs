//! Changes to the cluster's shape, sent to the meta group's leader (found by following leader
//! hints from the seeds): replica moves, shard splits and node removal. Each is safe to repeat.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use dossier_api::v1::admin_client::AdminClient;
use dossier_api::v1::{
    ClusterMap, ErrorReason, MoveReplicaRequest, NodeState, NodeStatusRequest, RemoveNodeRequest,
    ShardDescriptor, SplitShardRequest,
};
use tonic::transport::Channel;

use crate::ops::{admin, decode_detail};

/// At most this many nodes are asked per call (seeds plus leader hints).
const MAX_ASKED: usize = 16;

/// Calls `call` on the meta group's leader: tries the seeds in order and follows leader hints;
/// an INVALID_ARGUMENT answer is final (`what` refused: message).
async fn on_meta_leader<T, F, Fut>(
    seeds: &[String],
    timeout: Duration,
    what: &str,
    mut call: F,
) -> Result<T>
where
    F: FnMut(AdminClient<Channel>) -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let mut targets: Vec<String> = seeds.iter().rev().cloned().collect();
    let mut last = String::from("no seed given");
    let mut asked = 0;
    while let Some(target) = targets.pop() {
        asked += 1;
        if asked > MAX_ASKED {
            break;
        }
        let client = match admin(&target, timeout).await {
            Ok(c) => c,
            Err(e) => {
                last = format!("{target}: {e:#}");
                continue;
            }
        };
        match call(client).await {
            Ok(answer) => return Ok(answer),
            Err(status) => match decode_detail(&status) {
                Some(d) if !d.leader_hint_address.is_empty() => targets.push(d.leader_hint_address),
                Some(d) if d.reason == ErrorReason::InvalidArgument as i32 => {
                    bail!("{what} refused: {}", d.message)
                }
                _ => last = format!("{target}: {}", status.message()),
            },
        }
    }
    bail!("no node carried out the {what} (last: {last}); it is safe to run it again")
}

/// Moves a shard's replica (`Admin.MoveReplica`); the catch-up of a large shard may take
/// minutes, so the call may too.
pub async fn move_replica(
    seeds: &[String],
    shard: u64,
    from: u64,
    to: u64,
) -> Result<ShardDescriptor> {
    let request = MoveReplicaRequest {
        shard_id: shard,
        from_node: from,
        to_node: to,
    };
    on_meta_leader(
        seeds,
        Duration::from_secs(400),
        "move",
        |mut c| async move { c.move_replica(request).await },
    )
    .await?
    .into_inner()
    .shard
    .context("the node answered without the descriptor")
}

/// Splits a shard at hash `at` (0: the middle patient); returns the shard and the new one.
pub async fn split_shard(
    seeds: &[String],
    shard: u64,
    at: u64,
) -> Result<(ShardDescriptor, ShardDescriptor)> {
    let r = on_meta_leader(
        seeds,
        Duration::from_secs(180),
        "split",
        |mut c| async move {
            c.split_shard(SplitShardRequest {
                shard_id: shard,
                at,
            })
            .await
        },
    )
    .await?
    .into_inner();
    Ok((
        r.left.context("the node answered without the shard")?,
        r.right.context("the node answered without the new shard")?,
    ))
}

/// Starts decommissioning a node (`Admin.RemoveNode`): it is marked draining and the placement
/// driver moves its replicas away. Returns the map that marks it.
pub async fn remove_node(seeds: &[String], node: u64) -> Result<ClusterMap> {
    on_meta_leader(
        seeds,
        Duration::from_secs(15),
        "removal",
        |mut c| async move { c.remove_node(RemoveNodeRequest { node_id: node }).await },
    )
    .await?
    .into_inner()
    .map
    .context("the node answered without the map")
}

/// Waits until `node` is removed, printing each change of the number of replicas it still
/// holds; gives up (the drain goes on) after `limit`.
pub async fn wait_removed(seeds: &[String], node: u64, limit: Duration) -> Result<ClusterMap> {
    let started = Instant::now();
    let mut printed = None;
    loop {
        let map = crate::ops::fresh_map(seeds).await?;
        let entry = map
            .nodes
            .iter()
            .find(|n| n.node_id == node)
            .with_context(|| format!("node {node} is not in the cluster map"))?;
        if entry.state == NodeState::Removed as i32 {
            return Ok(map);
        }
        let held = map.shards.iter().filter(|d| d.places(node)).count();
        if printed != Some(held) {
            println!(
                "[{:>6.1?}] node {node} holds {held} replicas",
                started.elapsed()
            );
            printed = Some(held);
        }
        if started.elapsed() > limit {
            bail!(
                "node {node} still holds {held} replicas after {limit:?}; the drain goes on (see `dossier node list`)"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How long [`wait_audit_moved`] asks a node that does not answer.
const UNREACHABLE_AFTER: Duration = Duration::from_secs(15);

/// What [`wait_audit_moved`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditJournal {
    /// Every event the node journaled is in its chain.
    Empty,
    /// The node did not answer within the wait (it may be down for good): its disk may still
    /// hold events.
    Unreachable(String),
    /// The node does not report its backlog (a version that predates it).
    Unreported,
}

/// Waits until the node `client` talks to (node `node`) has moved every audit event of the reads
/// it served from its journal to their patients' chains (`NodeStatus.audit_backlog` 0), printing
/// the count as it falls; a node that does not answer is asked again for 15 s. Fails when
/// the node still holds events after `limit`, or refuses the caller: until then its disk holds
/// events that exist nowhere else.
pub async fn wait_audit_moved(
    mut client: AdminClient<Channel>,
    node: u64,
    limit: Duration,
) -> Result<AuditJournal> {
    let started = Instant::now();
    let mut printed = None;
    loop {
        let answer = client
            .node_status(NodeStatusRequest { count_keys: false })
            .await;
        let backlog = match answer {
            Ok(status) => match status.into_inner().audit_backlog {
                Some(backlog) => backlog,
                None => return Ok(AuditJournal::Unreported),
            },
            Err(e)
                if matches!(
                    e.code(),
                    tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
                ) =>
            {
                bail!(
                    "node {node} refused to report its audit backlog: {}",
                    e.message()
                )
            }
            // A node that keeps refusing connections is down: asked for a while, not the whole wait.
            Err(e) if started.elapsed() > limit.min(UNREACHABLE_AFTER) => {
                return Ok(AuditJournal::Unreachable(e.message().to_owned()));
            }
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if backlog == 0 {
            return Ok(AuditJournal::Empty);
        }
        if printed != Some(backlog) {
            println!(
                "[{:>6.1?}] node {node} has {backlog} audit events still to move to their chains",
                started.elapsed()
            );
            printed = Some(backlog);
        }
        if started.elapsed() > limit {
            bail!(
                "node {node} still holds {backlog} audit events after {limit:?}: keep it running until its audit backlog is 0, then stop it"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
