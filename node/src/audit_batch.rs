//! The audit events of reads, committed in batches: a read hands its event to the node's
//! batcher and waits until it is committed. The batcher keeps a few batches in flight per
//! shard; the events that arrive for a shard while they commit wait, and go together in its
//! next batch: one Raft entry of appends, whatever the number of reads (a group commit per
//! shard: the busier the shard, the more reads one entry audits). Shards do not wait for each
//! other.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dossier_records::kv::{self, BatchResult, Shards};
use futures_util::StreamExt;
use futures_util::future::join_all;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot};

use crate::errors::ApiError;
use crate::node::Node;
use crate::shards::ClusterShards;

/// Appends of one Raft entry at most (the store's per-batch limit bounds it too).
const APPENDS_PER_BATCH_MAX: usize = 256;

/// Batches of one shard in flight at most: enough to keep its log writer fed while a batch
/// commits (a read waits for less than a whole commit before its own batch leaves), few enough
/// that batches stay large under load.
const IN_FLIGHT_PER_SHARD: usize = 4;

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
    // Events waiting per shard, and the shards with a batch in flight.
    let mut waiting: BTreeMap<u64, Vec<Pending>> = BTreeMap::new();
    let mut in_flight = FuturesUnordered::new();
    let mut busy: BTreeMap<u64, usize> = BTreeMap::new();
    loop {
        tokio::select! {
            next = rx.recv() => {
                let Some(first) = next else { break };
                let map = node.map();
                let mut arrived = vec![first];
                while arrived.len() < QUEUE_MAX
                    && let Ok(p) = rx.try_recv()
                {
                    arrived.push(p);
                }
                for p in arrived {
                    // By shard as the map routes the chain now (a split since is caught in
                    // `commit`).
                    let shard = map
                        .as_ref()
                        .and_then(|m| {
                            crate::meta::shard_for(m, dossier_api::patient_hash(&p.route_key))
                        })
                        .map_or(0, |d| d.shard_id);
                    waiting.entry(shard).or_default().push(p);
                }
            }
            Some(shard) = in_flight.next(), if !in_flight.is_empty() => {
                if let Some(n) = busy.get_mut(&shard) {
                    *n -= 1;
                }
            }
        }
        // Every shard with events waiting and room in flight sends one now.
        let ready: Vec<u64> = waiting
            .keys()
            .filter(|s| busy.get(s).copied().unwrap_or(0) < IN_FLIGHT_PER_SHARD)
            .copied()
            .collect();
        for shard in ready {
            let mut group = waiting.remove(&shard).unwrap_or_default();
            if group.len() > APPENDS_PER_BATCH_MAX {
                let rest = group.split_off(APPENDS_PER_BATCH_MAX);
                waiting.insert(shard, rest);
            }
            *busy.entry(shard).or_default() += 1;
            let shards = shards.clone();
            in_flight.push(async move {
                commit(&shards, group).await;
                shard
            });
        }
    }
}

/// Commits one shard's events in one batch; if that fails (a split moved some chains, say),
/// each event on its own.
async fn commit(shards: &ClusterShards, group: Vec<Pending>) {
    let deadline = group.iter().map(|p| p.deadline).min().unwrap_or_default();
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
            let _ = p
                .done
                .send(together.as_ref().map(|_| ()).map_err(clone_error));
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
