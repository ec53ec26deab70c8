//! Running a step of a cluster change on a shard's leader, wherever it is: here when this node
//! leads the shard, else on another replica through the internal `ShardAccess` service,
//! following leader hints and trying the replicas in turn until the deadline.

use std::future::Future;
use std::time::{Duration, Instant};

use dossier_api::raft::v1::shard_access_client::ShardAccessClient;
use dossier_api::v1::ShardDescriptor;
use tonic::transport::Channel;

use crate::errors::ApiError;
use crate::meta;
use crate::node::Node;

impl Node {
    /// Runs `here` when this node leads `d`'s shard, or `remote` against the replica believed to
    /// lead it; NOT_LEADER answers are followed, INVALID_ARGUMENT and INTERNAL end the attempt,
    /// anything else is retried on the next replica. `what` names the step in the final error.
    pub(crate) async fn on_shard_leader<T, H, HF, R, RF>(
        &self,
        d: &ShardDescriptor,
        within: Duration,
        what: &str,
        here: H,
        remote: R,
    ) -> Result<T, ApiError>
    where
        H: Fn() -> HF,
        HF: Future<Output = Result<T, ApiError>>,
        R: Fn(ShardAccessClient<Channel>) -> RF,
        RF: Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = Instant::now() + within;
        let mut hint: Option<u64> = None;
        let mut rotate = 0usize;
        let mut last = String::new();
        while Instant::now() < deadline {
            let target = hint
                .or_else(|| self.known_leader(d.shard_id))
                .filter(|t| d.replicas.contains(t) && rotate == 0)
                .unwrap_or_else(|| d.replicas[rotate % d.replicas.len().max(1)]);
            let result = if target == self.node_id() {
                here().await
            } else {
                let map = self
                    .map()
                    .ok_or_else(|| ApiError::ClusterState("no map".into()))?;
                let addr = meta::peer_address(&map, target)
                    .ok_or_else(|| {
                        ApiError::ClusterState(format!("node {target} is not in the map"))
                    })?
                    .to_owned();
                let channel = self.peer_channel(&addr)?;
                remote(ShardAccessClient::new(channel))
                    .await
                    .map_err(|status| crate::shards::from_status(&status))
            };
            match result {
                Ok(answer) => return Ok(answer),
                Err(ApiError::NotLeader { leader, .. }) => {
                    last = format!("node {target} does not lead shard {}", d.shard_id);
                    match leader {
                        Some((id, _)) if id != target => {
                            hint = Some(id);
                            rotate = 0;
                        }
                        _ => {
                            hint = None;
                            rotate += 1;
                        }
                    }
                }
                Err(e @ (ApiError::InvalidArgument { .. } | ApiError::Internal(_))) => {
                    return Err(e);
                }
                Err(e) => {
                    last = e.to_string();
                    hint = None;
                    rotate += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(ApiError::Unavailable(format!(
            "shard {}: {what} did not complete in time (last: {last}); send the request again to finish it",
            d.shard_id
        )))
    }
}
