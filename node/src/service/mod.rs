//! The public gRPC services, and what every request handler does around its own work.

pub mod admin;
pub mod kv;
mod record_access;
mod record_everything;
mod record_requests;
mod record_write;
pub mod records;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dossier_api::v1::{ReadConsistency, RouteHeader, ShardDescriptor};
use tonic::{Request, Response, Status};

use crate::errors::ApiError;
use crate::node::Node;

/// The request's deadline: gRPC's `grpc-timeout` header ("<n><unit>"), capped by the node's
/// limit, or the limit when none is sent.
pub(crate) fn deadline_of<T>(request: &Request<T>, max: Duration) -> Duration {
    let parsed = request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (n, unit) = v.split_at(v.len().checked_sub(1)?);
            let n: u64 = n.parse().ok()?;
            Some(match unit {
                "H" => Duration::from_secs(n * 3600),
                "M" => Duration::from_secs(n * 60),
                "S" => Duration::from_secs(n),
                "m" => Duration::from_millis(n),
                "u" => Duration::from_micros(n),
                "n" => Duration::from_nanos(n),
                _ => return None,
            })
        });
    parsed.map_or(max, |d| d.min(max))
}

/// Admission under the node's in-flight limit; refused while the node stops.
pub(crate) fn admit(node: &Node) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    if node.is_stopping() {
        return Err(ApiError::Unavailable("the node is shutting down".into()));
    }
    Arc::clone(&node.in_flight)
        .try_acquire_owned()
        .map_err(|_| ApiError::ResourceExhausted {
            limit: node.config.node.limits.in_flight_max as u64,
        })
}

/// The shard of the route's patient, if this node hosts a replica of it at the epoch the client
/// routed with; else STALE_EPOCH with the fresh descriptor, which tells the client where to go.
pub(crate) fn hosted_shard(node: &Node, route: &RouteHeader) -> Result<ShardDescriptor, ApiError> {
    let map = node
        .map()
        // Retryable: another node may know the map already (this one is catching up).
        .ok_or_else(|| {
            ApiError::Unavailable("this node has not learnt the cluster map yet".into())
        })?;
    let descriptor = crate::meta::shard_for(&map, dossier_api::patient_hash(&route.patient_id))
        .cloned()
        .ok_or_else(|| ApiError::ClusterState("no shard covers this patient".into()))?;
    // Route shard 0: the caller asks the node to route (no check of shard and epoch).
    if route.shard_id != 0 {
        if route.shard_id == descriptor.shard_id && route.epoch > descriptor.epoch {
            // The client saw a newer map than this node has applied: this node is behind.
            return Err(ApiError::Unavailable(format!(
                "this node's map holds shard {} at epoch {}, older than the routed epoch {}; it is catching up: retry, or try another replica",
                descriptor.shard_id, descriptor.epoch, route.epoch
            )));
        }
        if !map.shards.iter().any(|d| d.shard_id == route.shard_id) {
            return Err(ApiError::ShardNotFound {
                shard: route.shard_id,
                descriptor: Some(Box::new(descriptor)),
            });
        }
        if route.shard_id != descriptor.shard_id || route.epoch != descriptor.epoch {
            return Err(ApiError::StaleEpoch {
                routed_shard: route.shard_id,
                routed_epoch: route.epoch,
                descriptor: Box::new(descriptor),
            });
        }
    }
    // A standby serves stale reads; for the rest it names the leader (NOT_LEADER).
    let me = node.node_id();
    if !descriptor.replicas.contains(&me) && !descriptor.standbys.contains(&me) {
        return Err(ApiError::ShardNotFound {
            shard: descriptor.shard_id,
            descriptor: Some(Box::new(descriptor)),
        });
    }
    Ok(descriptor)
}

/// Waits until the local replica of `shard` may serve a read of `consistency` for the patient
/// (or identifier) `route_key`, and checks that the replica still holds it: a split applied
/// here may have given it to another shard before this node's map says so.
pub(crate) async fn read_ready(
    node: &Node,
    shard: u64,
    route_key: &str,
    consistency: i32,
    deadline: Duration,
) -> Result<(), ApiError> {
    match ReadConsistency::try_from(consistency) {
        Ok(ReadConsistency::Linearizable) => node.read_barrier(shard, deadline).await?,
        Ok(ReadConsistency::Stale) => {}
        Err(_) => return Err(ApiError::invalid("consistency", "unknown value")),
    }
    node.check_owned(shard, route_key)
}

/// Records the request's latency under its method and outcome, and turns the result into the
/// gRPC answer.
pub(crate) fn observe<T>(
    node: &Node,
    method: &'static str,
    started: Instant,
    result: Result<T, ApiError>,
) -> Result<Response<T>, Status> {
    record(node, method, started, result.as_ref().map(|_| ()));
    result.map(Response::new).map_err(Status::from)
}

/// Records the request's latency under its method and outcome.
pub(crate) fn record(
    node: &Node,
    method: &'static str,
    started: Instant,
    outcome: Result<(), &ApiError>,
) {
    let code = match outcome {
        Ok(_) => "ok",
        Err(e) => e.code_name(),
    };
    node.metrics
        .request_seconds
        .with_label_values(&[method, code])
        .observe(started.elapsed().as_secs_f64());
}
