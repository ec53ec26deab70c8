//! `dossier-client`: the library application services use to talk to Dossier.
//!
//! Connect with a few seed addresses; the client fetches and caches the cluster map, routes every
//! request by patient id to the patient's shard, follows leader hints and fresh shard descriptors,
//! and retries with backoff inside a caller-given deadline. Every write carries an exactly-once
//! session: a retry after a timeout or a leader change is applied at most once.
//!
//! ```no_run
//! # async fn demo() -> Result<(), dossier_client::ClientError> {
//! use dossier_client::{Client, ClientConfig};
//!
//! let client = Client::connect(ClientConfig::new(["127.0.0.1:7000"])).await?;
//! client.put("patient-42", b"allergies", b"penicillin").await?;
//! let value = client.get("patient-42", b"allergies").await?;
//! assert_eq!(value.as_deref(), Some(&b"penicillin"[..]));
//! # Ok(())
//! # }
//! ```
//! A runnable version is `cargo run -p dossier-client --example quickstart` against a running
//! `dossier-node`.
//!
//! Non-goals: no server-side logic; depends only on `dossier-api`. Never blocks past a deadline.

mod break_glass;
mod bundle;
mod error;
mod records;
mod tls;
mod token;
pub use break_glass::BreakGlass;
pub use records::{History, RecordWrite, SearchPage, SearchQuery, WriteOptions, is_applied};
pub use tls::ClientTls;
pub use token::BearerToken;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
pub use dossier_api::v1::ReadConsistency;
use dossier_api::v1::admin_client::AdminClient;
use dossier_api::v1::kv_client::KvClient;
use dossier_api::v1::{
    BatchRequest, ClusterMap, ClusterMapRequest, CompareAndSetRequest, DeleteRequest, ErrorDetail,
    ErrorReason, GetRequest, KeyValue, PutRequest, RouteHeader, ScanRequest, SessionHeader,
    ShardDescriptor,
};
pub use dossier_api::v1::{Condition, Operation, condition, operation};
pub use error::ClientError;
use tonic::transport::{Channel, Endpoint};

use bundle::{Answer, Item, Lane};

/// How the client reaches the cluster and how long it keeps trying.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// host:port of a few nodes; any one that answers gives the map.
    pub seeds: Vec<String>,
    pub connect_timeout: Duration,
    /// Deadline of one call to one node.
    pub attempt_timeout: Duration,
    /// Deadline of a whole request, retries included, unless the call gives its own.
    pub deadline: Duration,
    /// First and largest wait between retries (doubling).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// HTTP/2 connections opened to each node, used in turn. One connection's frames are read
    /// and written by one task at each end, so a single connection caps a busy client at about
    /// one core of the node (docs/benchmarks.md); at least 1.
    pub connections_per_node: usize,
    /// Coalesce the gets and writes waiting to go to one connection into one `Kv.Bundle` (each
    /// still answered on its own). Saves most of the per-call cost on a busy client; a lone
    /// request goes at once either way.
    pub coalesce: bool,
    /// TLS to the nodes (their CA, and this client's certificate if it has one); None: plaintext,
    /// for nodes run with `--insecure`.
    pub tls: Option<ClientTls>,
    /// The bearer token of a clinician, patient or service, sent with every call
    /// (needs `tls`); None: the caller is who its certificate says.
    pub token: Option<BearerToken>,
    /// A clinician's break-the-glass reason, sent with Records calls: they are served without
    /// a care relationship, and flagged for review.
    pub break_glass: Option<BreakGlass>,
}

impl ClientConfig {
    pub fn new<S: Into<String>>(seeds: impl IntoIterator<Item = S>) -> Self {
        ClientConfig {
            seeds: seeds.into_iter().map(Into::into).collect(),
            connect_timeout: Duration::from_millis(250),
            attempt_timeout: Duration::from_secs(2),
            deadline: Duration::from_secs(10),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(100),
            connections_per_node: 2,
            coalesce: true,
            tls: None,
            token: None,
            break_glass: None,
        }
    }
}

/// The result of a write: whether its conditions held, and the log index it committed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteResult {
    pub applied: bool,
    pub failed_condition: Option<u32>,
    pub index: u64,
}

/// One page of a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanPage {
    pub items: Vec<(Bytes, Bytes)>,
    /// True when keys follow the last one returned: pass it as `start_after` for the next page.
    pub more: bool,
}

#[derive(Debug)]
struct Inner {
    config: ClientConfig,
    /// Shared, so that routing a request costs a reference count, not a copy of the map.
    map: RwLock<Option<Arc<ClusterMap>>>,
    /// `connections_per_node` lanes per node address, and the counter that picks one.
    lanes: Mutex<HashMap<String, Arc<[Lane]>>>,
    next_channel: AtomicUsize,
    /// The leader each shard last answered from (or hinted).
    leaders: Mutex<HashMap<u64, u64>>,
    /// Idle exactly-once sessions per shard: (id, last sequence number used). The server keeps
    /// a session table per shard, so a session's sequence numbers are per shard too.
    sessions: Mutex<HashMap<u64, Vec<(u64, u64)>>>,
    session_seed: AtomicU64,
}

/// A connection to a Dossier cluster. Cheap to clone; share one per process.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// What went wrong with one attempt, and what to do about it.
enum Attempt {
    /// Try again (possibly elsewhere) after a pause.
    Retry(String),
    /// Stop: the answer is final.
    Fail(ClientError),
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn detail(status: &tonic::Status) -> Option<ErrorDetail> {
    dossier_api::error_detail(status.details()).filter(|d| d.reason != 0)
}

impl Client {
    /// Connects to the cluster through `config.seeds` and fetches the map.
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        if config.seeds.is_empty() {
            return Err(ClientError::NoSeed("no seed address given".into()));
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let client = Client {
            inner: Arc::new(Inner {
                config,
                map: RwLock::new(None),
                lanes: Mutex::new(HashMap::new()),
                next_channel: AtomicUsize::new(0),
                leaders: Mutex::new(HashMap::new()),
                sessions: Mutex::new(HashMap::new()),
                session_seed: AtomicU64::new(splitmix64(nanos ^ u64::from(std::process::id()))),
            }),
        };
        client.refresh_map().await?;
        Ok(client)
    }

    /// The cached cluster map.
    pub fn cluster_map(&self) -> Option<ClusterMap> {
        self.inner
            .map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_deref()
            .cloned()
    }

    fn lane(&self, addr: &str) -> Result<Lane, ClientError> {
        let turn = self.inner.next_channel.fetch_add(1, Ordering::Relaxed);
        let mut lanes = self.inner.lanes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pool) = lanes.get(addr) {
            return Ok(pool[turn % pool.len()].clone());
        }
        let endpoint = match &self.inner.config.tls {
            Some(tls) => tls.endpoint(addr),
            None => Endpoint::from_shared(format!("http://{addr}")),
        }
        .map_err(|e| ClientError::InvalidArgument {
            field: "address".into(),
            message: e.to_string(),
            limit: None,
        })?
        .connect_timeout(self.inner.config.connect_timeout)
        .tcp_nodelay(true);
        let pool: Arc<[Lane]> = (0..self.inner.config.connections_per_node.max(1))
            .map(|_| {
                Lane::new(
                    endpoint.connect_lazy(),
                    self.inner.config.coalesce,
                    self.inner.config.token.clone(),
                )
            })
            .collect();
        let lane = pool[turn % pool.len()].clone();
        lanes.insert(addr.to_owned(), pool);
        Ok(lane)
    }

    fn channel(&self, addr: &str) -> Result<Channel, ClientError> {
        Ok(self.lane(addr)?.channel)
    }

    /// A connection to the node at `addr` with this client's TLS and identity (one of its own
    /// pooled connections), for calls to a chosen replica that the client does not route.
    pub fn connection(&self, addr: &str) -> Result<Channel, ClientError> {
        self.channel(addr)
    }

    /// Fetches the map from any node that answers (seeds first, then known nodes).
    pub async fn refresh_map(&self) -> Result<ClusterMap, ClientError> {
        let mut candidates = self.inner.config.seeds.clone();
        if let Some(map) = self.cluster_map() {
            candidates.extend(map.nodes.iter().map(|n| n.address.clone()));
        }
        let mut last = String::from("no candidates");
        for addr in candidates {
            let mut admin = AdminClient::new(self.channel(&addr)?);
            let mut request = tonic::Request::new(ClusterMapRequest {});
            request.set_timeout(self.inner.config.attempt_timeout);
            if let Some(token) = &self.inner.config.token {
                token.stamp(&mut request);
            }
            match admin.get_cluster_map(request).await {
                Ok(map) => {
                    let map = map.into_inner();
                    if map.shards.is_empty() {
                        last = format!("{addr}: the map has no shards");
                        continue;
                    }
                    let known = self.cluster_map().map_or(0, |m| m.version);
                    if map.version < known {
                        // A node that fell behind (or left the cluster): the map never goes back.
                        last = format!("{addr}: map version {} is older than {known}", map.version);
                        continue;
                    }
                    *self.inner.map.write().unwrap_or_else(|e| e.into_inner()) =
                        Some(Arc::new(map.clone()));
                    return Ok(map);
                }
                Err(status) => last = format!("{addr}: {}", status.message()),
            }
        }
        Err(ClientError::NoSeed(last))
    }

    fn shard_of(
        &self,
        patient_id: &str,
    ) -> Result<(ShardDescriptor, Arc<ClusterMap>), ClientError> {
        let map = self
            .inner
            .map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| ClientError::Cluster("no map".into()))?;
        let hash = dossier_api::patient_hash(patient_id);
        let d = map
            .shards
            .iter()
            .find(|d| hash >= d.hash_lo && (d.hash_hi_max || hash < d.hash_hi))
            .cloned()
            .ok_or_else(|| ClientError::Cluster("no shard covers this patient".into()))?;
        Ok((d, map))
    }

    fn take_session(&self, shard: u64) -> (u64, u64) {
        let mut idle = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match idle.entry(shard).or_default().pop() {
            Some((id, last)) => (id, last + 1),
            None => {
                let id = splitmix64(self.inner.session_seed.fetch_add(1, Ordering::Relaxed)).max(1);
                (id, 1)
            }
        }
    }

    fn return_session(&self, shard: u64, id: u64, seq: u64) {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(shard)
            .or_default()
            .push((id, seq));
    }

    /// Runs `call` against the patient's shard until it succeeds, fails for good, or the deadline
    /// passes: follows leader hints, refreshes the map on stale-epoch answers, rotates replicas on
    /// unreachable nodes, backs off on overload.
    async fn routed<T, F, Fut>(
        &self,
        patient_id: &str,
        deadline: Duration,
        mut call: F,
    ) -> Result<T, ClientError>
    where
        F: FnMut(Lane, RouteHeader, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let started = Instant::now();
        let mut backoff = self.inner.config.backoff_min;
        let mut attempts = 0u32;
        let mut rotate = 0usize;
        let mut last = String::new();
        loop {
            let remaining = deadline.saturating_sub(started.elapsed());
            if remaining.is_zero() {
                return Err(ClientError::Timeout {
                    deadline,
                    attempts,
                    last,
                });
            }
            attempts += 1;
            let (d, map) = self.shard_of(patient_id)?;
            let leader = self
                .inner
                .leaders
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&d.shard_id)
                .copied();
            let target = match leader.filter(|l| d.replicas.contains(l)) {
                Some(l) if rotate == 0 => l,
                _ => d.replicas[rotate % d.replicas.len().max(1)],
            };
            let Some(addr) = map
                .nodes
                .iter()
                .find(|n| n.node_id == target)
                .map(|n| n.address.clone())
            else {
                return Err(ClientError::Cluster(format!(
                    "node {target} is not in the map"
                )));
            };
            let route = RouteHeader {
                shard_id: d.shard_id,
                epoch: d.epoch,
                patient_id: patient_id.to_owned(),
            };
            let attempt_timeout = remaining.min(self.inner.config.attempt_timeout);
            let outcome = match tokio::time::timeout(
                attempt_timeout,
                call(self.lane(&addr)?, route, attempt_timeout),
            )
            .await
            {
                Ok(Ok(value)) => {
                    self.inner
                        .leaders
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(d.shard_id, target);
                    return Ok(value);
                }
                Ok(Err(status)) => self.classify(&d, &status, &mut rotate).await,
                Err(_) => {
                    rotate += 1;
                    Attempt::Retry(format!(
                        "node {target}: no answer within {attempt_timeout:?}"
                    ))
                }
            };
            match outcome {
                Attempt::Fail(e) => return Err(e),
                Attempt::Retry(why) => {
                    tracing::debug!(shard = d.shard_id, attempts, why = %why, "retrying");
                    last = why;
                    let pause = backoff.min(deadline.saturating_sub(started.elapsed()));
                    tokio::time::sleep(pause).await;
                    backoff = (backoff * 2).min(self.inner.config.backoff_max);
                }
            }
        }
    }

    async fn classify(
        &self,
        d: &ShardDescriptor,
        status: &tonic::Status,
        rotate: &mut usize,
    ) -> Attempt {
        let Some(detail) = detail(status) else {
            // No detail: the transport failed (node down, connection refused) or an old server.
            *rotate += 1;
            return Attempt::Retry(format!("{:?}: {}", status.code(), status.message()));
        };
        match ErrorReason::try_from(detail.reason).unwrap_or(ErrorReason::Unspecified) {
            ErrorReason::NotLeader => {
                let mut leaders = self.inner.leaders.lock().unwrap_or_else(|e| e.into_inner());
                if detail.leader_hint_node_id != 0 {
                    leaders.insert(d.shard_id, detail.leader_hint_node_id);
                    *rotate = 0;
                } else {
                    leaders.remove(&d.shard_id);
                    *rotate += 1;
                }
                Attempt::Retry(detail.message)
            }
            ErrorReason::StaleEpoch | ErrorReason::ShardNotFound => {
                if let Err(e) = self.refresh_map().await {
                    return Attempt::Retry(format!("map refresh failed: {e}"));
                }
                *rotate += 1;
                Attempt::Retry(detail.message)
            }
            ErrorReason::InvalidArgument => Attempt::Fail(ClientError::InvalidArgument {
                field: detail.field,
                message: detail.message,
                limit: (detail.limit != 0).then_some(detail.limit),
            }),
            ErrorReason::Session => Attempt::Fail(ClientError::Session(detail.message)),
            ErrorReason::ClusterState => Attempt::Fail(ClientError::Cluster(detail.message)),
            ErrorReason::Internal => Attempt::Fail(ClientError::Server(detail.message)),
            ErrorReason::Unauthenticated => {
                Attempt::Fail(ClientError::Unauthenticated(detail.message))
            }
            ErrorReason::PermissionDenied => {
                Attempt::Fail(ClientError::PermissionDenied(detail.message))
            }
            ErrorReason::ResourceExhausted | ErrorReason::Deadline => {
                Attempt::Retry(detail.message)
            }
            ErrorReason::Unavailable | ErrorReason::Unspecified => {
                *rotate += 1;
                Attempt::Retry(detail.message)
            }
        }
    }

    /// Runs a write with an exactly-once session: every retry carries the same session and
    /// sequence number. `request` builds the write for an attempt's route.
    async fn write(
        &self,
        patient_id: &str,
        deadline: Duration,
        request: impl Fn(RouteHeader, SessionHeader) -> Item,
    ) -> Result<WriteResult, ClientError> {
        let shard = self.shard_of(patient_id)?.0.shard_id;
        let (id, seq) = self.take_session(shard);
        let session = SessionHeader {
            client_session: id,
            sequence: seq,
        };
        let result = self
            .routed(patient_id, deadline, |lane, route, t| {
                let item = request(route, session);
                async move {
                    match lane.call(item, t).await? {
                        Answer::Write(w) => Ok(w),
                        _ => Err(tonic::Status::internal("a write was answered as a read")),
                    }
                }
            })
            .await;
        match &result {
            // A session error means the server's table is ahead of us: drop the session.
            Err(ClientError::Session(_)) => {}
            // Refused before it was proposed (every attempt carries the same request, so every
            // attempt was refused): the sequence number was never used and is used next.
            Err(ClientError::InvalidArgument { .. }) => self.return_session(shard, id, seq - 1),
            _ => self.return_session(shard, id, seq),
        }
        let w = result?;
        Ok(WriteResult {
            applied: w.applied,
            failed_condition: (!w.applied).then_some(w.failed_condition),
            index: w.index,
        })
    }

    /// Reads a key of a patient (linearizable).
    pub async fn get(&self, patient_id: &str, key: &[u8]) -> Result<Option<Bytes>, ClientError> {
        self.get_with(
            patient_id,
            key,
            ReadConsistency::Linearizable,
            self.inner.config.deadline,
        )
        .await
    }

    /// Reads a key with the given consistency and deadline.
    pub async fn get_with(
        &self,
        patient_id: &str,
        key: &[u8],
        consistency: ReadConsistency,
        deadline: Duration,
    ) -> Result<Option<Bytes>, ClientError> {
        let response = self
            .routed(patient_id, deadline, |lane, route, t| {
                let item = Item::Get(GetRequest {
                    route: Some(route),
                    key: key.to_vec(),
                    consistency: consistency as i32,
                });
                async move {
                    match lane.call(item, t).await? {
                        Answer::Get(r) => Ok(r),
                        _ => Err(tonic::Status::internal("a read was answered as a write")),
                    }
                }
            })
            .await?;
        Ok(response.found.then(|| Bytes::from(response.value)))
    }

    pub async fn put(
        &self,
        patient_id: &str,
        key: &[u8],
        value: &[u8],
    ) -> Result<WriteResult, ClientError> {
        self.put_with(patient_id, key, value, self.inner.config.deadline)
            .await
    }

    pub async fn put_with(
        &self,
        patient_id: &str,
        key: &[u8],
        value: &[u8],
        deadline: Duration,
    ) -> Result<WriteResult, ClientError> {
        self.write(patient_id, deadline, |route, session| {
            Item::Put(PutRequest {
                route: Some(route),
                session: Some(session),
                key: key.to_vec(),
                value: value.to_vec(),
            })
        })
        .await
    }

    pub async fn delete(&self, patient_id: &str, key: &[u8]) -> Result<WriteResult, ClientError> {
        self.write(patient_id, self.inner.config.deadline, |route, session| {
            Item::Delete(DeleteRequest {
                route: Some(route),
                session: Some(session),
                key: key.to_vec(),
            })
        })
        .await
    }

    /// Puts `new` only if the key's value is `expected` (`None`: only if absent); `applied` says
    /// whether it did.
    pub async fn compare_and_set(
        &self,
        patient_id: &str,
        key: &[u8],
        expected: Option<&[u8]>,
        new: &[u8],
        deadline: Duration,
    ) -> Result<WriteResult, ClientError> {
        self.write(patient_id, deadline, |route, session| {
            Item::CompareAndSet(CompareAndSetRequest {
                route: Some(route),
                session: Some(session),
                key: key.to_vec(),
                expected: expected.unwrap_or_default().to_vec(),
                expect_absent: expected.is_none(),
                value: new.to_vec(),
            })
        })
        .await
    }

    /// An atomic batch on one patient's keys, guarded by conditions.
    pub async fn batch(
        &self,
        patient_id: &str,
        conditions: Vec<Condition>,
        operations: Vec<Operation>,
        deadline: Duration,
    ) -> Result<WriteResult, ClientError> {
        self.write(patient_id, deadline, |route, session| {
            Item::Batch(BatchRequest {
                route: Some(route),
                session: Some(session),
                conditions: conditions.clone(),
                operations: operations.clone(),
            })
        })
        .await
    }

    /// One page of a patient's keys starting with `prefix`, after `start_after` if given.
    pub async fn scan(
        &self,
        patient_id: &str,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: u32,
        consistency: ReadConsistency,
    ) -> Result<ScanPage, ClientError> {
        let response = self
            .routed(patient_id, self.inner.config.deadline, |lane, route, t| {
                let mut request = tonic::Request::new(ScanRequest {
                    route: Some(route),
                    prefix: prefix.to_vec(),
                    start_after: start_after.unwrap_or_default().to_vec(),
                    limit,
                    consistency: consistency as i32,
                });
                request.set_timeout(t);
                if let Some(token) = &self.inner.config.token {
                    token.stamp(&mut request);
                }
                async move {
                    let mut kv = KvClient::new(lane.channel)
                        .max_decoding_message_size(bundle::ANSWER_BYTES_MAX);
                    Ok(kv.scan(request).await?.into_inner())
                }
            })
            .await?;
        let items = response
            .items
            .into_iter()
            .map(|KeyValue { key, value }| (Bytes::from(key), Bytes::from(value)))
            .collect();
        Ok(ScanPage {
            items,
            more: response.more,
        })
    }

    /// An admin client on any node of the map (for tools).
    pub fn admin(&self, address: &str) -> Result<AdminClient<Channel>, ClientError> {
        Ok(AdminClient::new(self.channel(address)?))
    }
}
