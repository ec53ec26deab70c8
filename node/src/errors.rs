//! The node's request errors and their one mapping to gRPC statuses: the standard error model,
//! a `google.rpc.Status` carrying the `dossier.v1.ErrorDetail` as an `Any` (api/proto/dossier/v1/errors.proto).

use dossier_api::google::rpc::{
    BadRequest, ResourceInfo, RetryInfo, Status as RpcStatus, bad_request,
};
use dossier_api::v1::{ErrorDetail, ErrorReason, ShardDescriptor};
use prost::Message;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("this node is not the leader of shard {shard}")]
    NotLeader {
        shard: u64,
        leader: Option<(u64, String)>,
    },
    /// The client routed with another shard or an older epoch than this node's map holds for
    /// the patient: `descriptor` is the one to route with.
    #[error(
        "routed to shard {routed_shard} at epoch {routed_epoch}; the patient is in shard {} at epoch {}: route with that descriptor",
        .descriptor.shard_id, .descriptor.epoch
    )]
    StaleEpoch {
        routed_shard: u64,
        routed_epoch: u64,
        descriptor: Box<ShardDescriptor>,
    },
    #[error("{field}: {message}")]
    InvalidArgument {
        /// The path of the offending field in the request, e.g. `resource.patient.names[0]`.
        field: String,
        message: String,
        limit: Option<u64>,
    },
    #[error("too many requests in flight on this node (limit {limit})")]
    ResourceExhausted { limit: u64 },
    /// The caller is over its rate (`limits.person-calls-per-second`).
    #[error("{caller:?} is over its rate of {per_second} calls a second on this node; retry later")]
    RateLimited { caller: String, per_second: u64 },
    #[error("the request deadline passed; a write may still take effect")]
    Deadline,
    /// No replica of `shard` here, or no such shard in the map. `descriptor`, when known, is
    /// the patient's shard to route with.
    #[error("no replica of shard {shard} on this node{}", placed(.descriptor.as_deref()))]
    ShardNotFound {
        shard: u64,
        descriptor: Option<Box<ShardDescriptor>>,
    },
    #[error("{0}")]
    ClusterState(String),
    #[error("{0}")]
    Session(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    /// No identity, or credentials that do not check out.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's role or standing with the patient does not allow the call.
    #[error("{0}")]
    PermissionDenied(String),
}

/// Where the patient's shard is, for a request that reached a node without it.
fn placed(descriptor: Option<&ShardDescriptor>) -> String {
    match descriptor {
        Some(d) => format!(
            "; the patient is in shard {} at epoch {}, on nodes {:?}",
            d.shard_id, d.epoch, d.replicas
        ),
        None => String::new(),
    }
}

impl ApiError {
    /// A shard this node has no replica of.
    pub fn shard_not_found(shard: u64) -> Self {
        ApiError::ShardNotFound {
            shard,
            descriptor: None,
        }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidArgument {
            field: field.into(),
            message: message.into(),
            limit: None,
        }
    }

    pub fn too_large(field: impl Into<String>, bytes: usize, limit: usize) -> Self {
        ApiError::InvalidArgument {
            field: field.into(),
            message: format!("is {bytes} bytes, above the limit of {limit}"),
            limit: Some(limit as u64),
        }
    }

    /// A short label for metrics.
    pub fn code_name(&self) -> &'static str {
        match self {
            ApiError::NotLeader { .. } => "not_leader",
            ApiError::StaleEpoch { .. } => "stale_epoch",
            ApiError::InvalidArgument { .. } => "invalid_argument",
            ApiError::ResourceExhausted { .. } => "resource_exhausted",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Deadline => "deadline",
            ApiError::ShardNotFound { .. } => "shard_not_found",
            ApiError::ClusterState(_) => "cluster_state",
            ApiError::Session(_) => "session",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
            ApiError::Unauthenticated(_) => "unauthenticated",
            ApiError::PermissionDenied(_) => "permission_denied",
        }
    }

    fn parts(&self) -> (Code, ErrorReason) {
        match self {
            ApiError::NotLeader { .. } => (Code::Unavailable, ErrorReason::NotLeader),
            ApiError::StaleEpoch { .. } => (Code::FailedPrecondition, ErrorReason::StaleEpoch),
            ApiError::InvalidArgument { .. } => {
                (Code::InvalidArgument, ErrorReason::InvalidArgument)
            }
            ApiError::ResourceExhausted { .. } | ApiError::RateLimited { .. } => {
                (Code::ResourceExhausted, ErrorReason::ResourceExhausted)
            }
            ApiError::Deadline => (Code::DeadlineExceeded, ErrorReason::Deadline),
            ApiError::ShardNotFound { .. } => (Code::NotFound, ErrorReason::ShardNotFound),
            ApiError::ClusterState(_) => (Code::FailedPrecondition, ErrorReason::ClusterState),
            ApiError::Session(_) => (Code::FailedPrecondition, ErrorReason::Session),
            ApiError::Unavailable(_) => (Code::Unavailable, ErrorReason::Unavailable),
            ApiError::Internal(_) => (Code::Internal, ErrorReason::Internal),
            ApiError::Unauthenticated(_) => (Code::Unauthenticated, ErrorReason::Unauthenticated),
            ApiError::PermissionDenied(_) => {
                (Code::PermissionDenied, ErrorReason::PermissionDenied)
            }
        }
    }
}

impl ApiError {
    /// The gRPC code and the machine-readable detail every error answer carries.
    pub fn detail(&self) -> (Code, ErrorDetail) {
        let (code, reason) = self.parts();
        let mut detail = ErrorDetail {
            reason: reason as i32,
            message: self.to_string(),
            ..ErrorDetail::default()
        };
        match self {
            ApiError::NotLeader {
                leader: Some((id, addr)),
                ..
            } => {
                detail.leader_hint_node_id = *id;
                detail.leader_hint_address = addr.clone();
            }
            ApiError::StaleEpoch { descriptor, .. }
            | ApiError::ShardNotFound {
                descriptor: Some(descriptor),
                ..
            } => detail.shard = Some(descriptor.as_ref().clone()),
            ApiError::InvalidArgument { field, limit, .. } => {
                detail.field = field.clone();
                detail.limit = limit.unwrap_or(0);
            }
            _ => {}
        }
        (code, detail)
    }
}

impl From<dossier_records::Error> for ApiError {
    fn from(e: dossier_records::Error) -> ApiError {
        use dossier_records::Error as E;
        match e {
            E::InvalidArgument {
                field,
                message,
                limit,
            } => ApiError::InvalidArgument {
                field,
                message,
                limit,
            },
            E::Corrupt { .. } => ApiError::Internal(e.to_string()),
            E::Contended(_) => ApiError::Unavailable(e.to_string()),
        }
    }
}

/// `type.googleapis.com/<full name>`: how an `Any` names the message it holds.
fn any<M: Message>(full_name: &str, message: &M) -> prost_types::Any {
    prost_types::Any {
        type_url: format!("type.googleapis.com/{full_name}"),
        value: message.encode_to_vec(),
    }
}

/// How long a client should wait before retrying an overloaded or unavailable node.
const RETRY_DELAY: prost_types::Duration = prost_types::Duration {
    seconds: 0,
    nanos: 100_000_000,
};

impl ApiError {
    /// The standard gRPC error model of this error: a `google.rpc.Status` whose details hold
    /// the `dossier.v1.ErrorDetail` as an `Any`, and where they fit `google.rpc.BadRequest`
    /// (the field at fault), `RetryInfo` (overload, unavailable) and `ResourceInfo` (the shard).
    pub fn rpc_status(&self) -> (Code, RpcStatus) {
        let (code, detail) = self.detail();
        let mut details = vec![any("dossier.v1.ErrorDetail", &detail)];
        match self {
            ApiError::InvalidArgument { field, message, .. } => details.push(any(
                "google.rpc.BadRequest",
                &BadRequest {
                    field_violations: vec![bad_request::FieldViolation {
                        field: field.clone(),
                        description: message.clone(),
                    }],
                },
            )),
            ApiError::ResourceExhausted { .. }
            | ApiError::RateLimited { .. }
            | ApiError::Unavailable(_) => details.push(any(
                "google.rpc.RetryInfo",
                &RetryInfo {
                    retry_delay: Some(RETRY_DELAY),
                },
            )),
            ApiError::ShardNotFound { shard, .. } => details.push(any(
                "google.rpc.ResourceInfo",
                &ResourceInfo {
                    resource_type: "dossier.v1.Shard".into(),
                    resource_name: shard.to_string(),
                    ..ResourceInfo::default()
                },
            )),
            ApiError::StaleEpoch { descriptor, .. } => details.push(any(
                "google.rpc.ResourceInfo",
                &ResourceInfo {
                    resource_type: "dossier.v1.Shard".into(),
                    resource_name: descriptor.shard_id.to_string(),
                    ..ResourceInfo::default()
                },
            )),
            _ => {}
        }
        let status = RpcStatus {
            code: code as i32,
            message: self.to_string(),
            details,
        };
        (code, status)
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let (code, status) = e.rpc_status();
        Status::with_details(code, status.message.clone(), status.encode_to_vec().into())
    }
}
