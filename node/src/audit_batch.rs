//! The audit events of reads, committed in batches: a read hands its event to the node's
//! batcher and waits until it is committed; the batcher takes whatever events are waiting, puts
//! those of one shard into one batch of appends (one Raft entry, whatever the number of reads),
//! and proposes the batches of all shards at once. While a round commits, the next one gathers,
//! as a group commit does: the busier the node, the more reads one entry audits.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dossier_records::kv::{self, BatchResult, Shards};
use futures_util::future::join_all;
use tokio::sync::{mpsc, oneshot};

use crate::errors::ApiError;
use crate::node::Node;
use crate::shards::ClusterShards;

/// Appends of one Raft entry at most (the store's per-batch limit bounds it too).
const APPENDS_PER_BATCH_MAX: usize = 256;

/// Events waiting for a round at most; a read finding the queue full waits for room.
const QUEUE_MAX: usize = 8192;

struct Pending {
    /// The patient (or routing key) whose chain the event goes to.
    route_key: String,
    op: kv::Op,
    deadline: Duration,
    done: oneshot::Sender<Result<(), ApiError>>,
}

/// The node's batcher of read audit events.
#[derive(Debug, Clone)]
pub struct AuditBatcher {
    queue: mpsc::Sender<Pending>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").finish_non_exhaustive()
    }
}

impl AuditBatcher {
    /// Starts the batcher's task on the current runtime.
    pub fn start(node: Arc<Node>) -> AuditBatcher {
        let (queue, rx) = mpsc::channel(QUEUE_MAX);
        tokio::spawn(run(node, rx));
        AuditBatcher { queue }
    }

    /// Commits `op` (an append to the chain of `route_key`) within `deadline`.
    pub async fn append(
        &self,
        route_key: &str,
        op: kv::Op,
        deadline: Duration,
    ) -> Result<(), ApiError> {
        let (done, answer) = oneshot::channel();
        let pending = Pending {
            route_key: route_key.to_owned(),
            op,
            deadline,
            done,
        };
        let gone = || ApiError::Unavailable("the node is shutting down".into());
        tokio::time::timeout(deadline, async {
            self.queue.send(pending).await.map_err(|_| gone())?;
            answer.await.map_err(|_| gone())?
        })
        .await
        .map_err(|_| ApiError::Deadline)?
    }
}

async fn run(node: Arc<Node>, mut rx: mpsc::Receiver<Pending>) {
    let shards = ClusterShards::new(Arc::clone(&node));
    while let Some(first) = rx.recv().await {
        let mut round = vec![first];
        while round.len() < QUEUE_MAX
            && let Ok(p) = rx.try_recv()
        {
            round.push(p);
        }
        // By shard, as the map routes each chain now (a split since is caught below).
        let map = node.map();
        let mut by_shard: BTreeMap<u64, Vec<Pending>> = BTreeMap::new();
        for p in round {
            let shard = map
                .as_ref()
                .and_then(|m| crate::meta::shard_for(m, dossier_api::patient_hash(&p.route_key)))
                .map_or(0, |d| d.shard_id);
            by_shard.entry(shard).or_default().push(p);
        }
        let mut writes = Vec::new();
        for (_, mut group) in by_shard {
            while !group.is_empty() {
                let rest = group.split_off(group.len().min(APPENDS_PER_BATCH_MAX));
                writes.push(commit(&shards, std::mem::replace(&mut group, rest)));
            }
        }
        join_all(writes).await;
    }
}

/// Commits one shard's events in one batch; if that fails (a split moved some chains, say),
/// each event on its own.
async fn commit(shards: &ClusterShards, group: Vec<Pending>) {
    let deadline = group
        .iter()
        .map(|p| p.deadline)
        .min()
        .unwrap_or_default();
    let batch = kv::Batch {
        conditions: Vec::new(),
        ops: group.iter().map(|p| p.op.clone()).collect(),
    };
    let together = match shards.write(&group[0].route_key, batch, deadline).await {
        Ok(BatchResult::Applied) => Ok(()),
        Ok(BatchResult::Failed(_)) => Err(ApiError::Internal(
            "an unconditional audit batch was refused".into(),
        )),
        Err(e) => Err(e),
    };
    if together.is_ok() || group.len() == 1 {
        for p in group {
            let _ = p.done.send(together.as_ref().map(|_| ()).map_err(clone_error));
        }
        return;
    }
    let alone = group.into_iter().map(|p| async move {
        let batch = kv::Batch {
            conditions: Vec::new(),
            ops: vec![p.op.clone()],
        };
        let result = match shards.write(&p.route_key, batch, p.deadline).await {
            Ok(BatchResult::Applied) => Ok(()),
            Ok(BatchResult::Failed(_)) => Err(ApiError::Internal(
                "an unconditional audit append was refused".into(),
            )),
            Err(e) => Err(e),
        };
        let _ = p.done.send(result);
    });
    join_all(alone).await;
}

/// An error to hand to every waiter of a failed batch: retryable as UNAVAILABLE unless it was
/// the deadline.
fn clone_error(e: &ApiError) -> ApiError {
    match e {
        ApiError::Deadline => ApiError::Deadline,
        other => ApiError::Unavailable(format!("the audit of this read did not commit: {other}")),
    }
}
