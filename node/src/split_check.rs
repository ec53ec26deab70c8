//! Automatic splits: every node watches the shards it leads and asks the meta group's leader to
//! split one (at its middle patient) when its data passes `split-shard-bytes`, or when it
//! applies more than `split-writes-per-second` commands per second over three checks in a row.
//!
//! Measuring a shard reads all of its data, so it is done only after an eighth of the threshold
//! was written to it since the last measure (an idle shard is never read), off the async runtime.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dossier_api::v1::SplitShardRequest;
use dossier_api::v1::admin_client::AdminClient;
use dossier_raft::openraft::ServerState;
use dossier_raft::openraft::async_runtime::WatchReceiver;
use dossier_storage::ShardId;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::meta::{self, META_SHARD};
use crate::node::Node;
use crate::placement_log::Decision;

/// Between two checks of the shards led here.
const CHECK_EVERY: Duration = Duration::from_secs(10);
/// Checks in a row above the write rate before a split.
const HOT_CHECKS: u32 = 3;

/// What the check remembers of a shard.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    /// `written_bytes` when last measured.
    measured_at: u64,
    measured: bool,
    /// Applied index and time at the last check, and checks in a row above the rate.
    applied: u64,
    at: Option<Instant>,
    hot: u32,
}

pub async fn run(node: Arc<Node>, mut stop: watch::Receiver<bool>) {
    let mut seen: HashMap<ShardId, Seen> = HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let bytes_max = node.config.node.split_shard_bytes;
        let rate_max = node.config.node.split_writes_per_second;
        if bytes_max == 0 && rate_max == 0 {
            continue;
        }
        for (shard, raft) in node.groups() {
            if shard == META_SHARD || raft.metrics().borrow_watched().state != ServerState::Leader {
                continue;
            }
            let Some(replica) = node.replica(shard) else {
                continue;
            };
            let s = seen.entry(shard).or_default();
            let mut reason = None;
            if bytes_max > 0 {
                let written = replica.written_bytes();
                if !s.measured || written.saturating_sub(s.measured_at) >= (bytes_max / 8).max(1) {
                    s.measured_at = written;
                    s.measured = true;
                    let measuring = replica.clone();
                    match tokio::task::spawn_blocking(move || measuring.data_bytes()).await {
                        Ok(Ok(size)) if size > bytes_max => {
                            reason =
                                Some(format!("{size} bytes, above split-shard-bytes {bytes_max}"));
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => warn!(shard, error = %e, "split check: measuring failed"),
                        Err(e) => warn!(shard, error = %e, "split check: measuring failed"),
                    }
                }
            }
            let applied = replica.applied_index().unwrap_or(0);
            if let Some(at) = s.at {
                let rate = applied.saturating_sub(s.applied) as f64 / at.elapsed().as_secs_f64();
                s.hot = if rate_max > 0 && rate > rate_max as f64 {
                    s.hot + 1
                } else {
                    0
                };
                if s.hot >= HOT_CHECKS && reason.is_none() {
                    reason = Some(format!(
                        "{rate:.0} commands/s, above split-writes-per-second {rate_max}"
                    ));
                }
            }
            s.applied = applied;
            s.at = Some(Instant::now());
            if let Some(reason) = reason {
                info!(shard, %reason, "split check: asking for a split");
                s.hot = 0;
                // Measured again after the split, from what is written from now on.
                s.measured = false;
                let decision = Decision {
                    kind: "split",
                    shard,
                    from: 0,
                    to: 0,
                    reason: &reason,
                };
                match ask_split(&node, shard).await {
                    Ok(()) => node.placement_log.record(decision, "done"),
                    Err(e) => {
                        warn!(shard, error = %e, "split check: the split was not made; it is asked again later");
                        node.placement_log.record(decision, format!("failed: {e}"));
                    }
                }
            }
        }
        seen.retain(|shard, _| node.replica(*shard).is_some());
    }
}

/// Asks the meta group's leader (this node or another) to split `shard` at its middle patient.
async fn ask_split(node: &Node, shard: ShardId) -> anyhow::Result<()> {
    let leader = node
        .known_leader(META_SHARD)
        .ok_or_else(|| anyhow::anyhow!("the meta group has no known leader"))?;
    if leader == node.node_id() {
        node.split_shard(shard, 0).await?;
        return Ok(());
    }
    let map = node
        .map()
        .ok_or_else(|| anyhow::anyhow!("no cluster map"))?;
    let address = meta::address(&map, leader)
        .ok_or_else(|| anyhow::anyhow!("node {leader} is not in the map"))?;
    let channel = node.peer_channel(address)?;
    let mut request = tonic::Request::new(SplitShardRequest {
        shard_id: shard,
        at: 0,
    });
    request.set_timeout(Duration::from_secs(180));
    AdminClient::new(channel).split_shard(request).await?;
    Ok(())
}
