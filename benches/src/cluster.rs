//! Cluster measurements: closed-loop clients against a local 3-node cluster of `dossier-node`
//! processes (3 replicas per shard), and the failover gap after SIGKILL of a shard leader.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dossier_cli::ops;
use dossier_cli::procs;
use dossier_client::{Client, ReadConsistency};
use dossier_records::synth::Rng;

use crate::stats::{Json, Latency, per_second};

pub mod floor;

mod etcdpb {
    #![allow(clippy::all, missing_debug_implementations)]
    tonic::include_proto!("etcdserverpb");
}

/// The system under load: the same workload code drives both.
#[derive(Clone)]
pub enum Backend {
    Dossier(Client),
    /// Dossier with the client's coalescing off: every request its own unary call.
    DossierUnary(Client),
    /// `connections_per_node` channels per etcd member, interleaved; clients are spread over
    /// them (etcd forwards writes).
    Etcd(Vec<tonic::transport::Channel>),
    /// The gRPC floor ([`floor`]): etcd's protocol answered from memory, channels as for etcd.
    Floor(Vec<tonic::transport::Channel>),
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Dossier(_) => "dossier",
            Backend::DossierUnary(_) => "dossier-unary",
            Backend::Etcd(_) => "etcd",
            Backend::Floor(_) => "grpc-floor",
        }
    }

    pub async fn etcd(endpoints: &[String], connections_per_node: usize) -> Result<Backend> {
        Ok(Backend::Etcd(
            Self::channels(endpoints, connections_per_node).await?,
        ))
    }

    pub async fn floor(endpoints: &[String], connections_per_node: usize) -> Result<Backend> {
        Ok(Backend::Floor(
            Self::channels(endpoints, connections_per_node).await?,
        ))
    }

    /// `per_node` connections to each endpoint, in the order e0, e1, e2, e0, e1, e2, ...
    async fn channels(
        endpoints: &[String],
        per_node: usize,
    ) -> Result<Vec<tonic::transport::Channel>> {
        let mut channels = Vec::new();
        for e in std::iter::repeat_n(endpoints, per_node.max(1)).flatten() {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{e}"))?
                .connect_timeout(Duration::from_millis(500))
                .tcp_nodelay(true)
                .connect()
                .await
                .with_context(|| format!("connect to {e}"))?;
            channels.push(channel);
        }
        Ok(channels)
    }
}

/// A local cluster for one measurement and its client; the nodes stop (SIGTERM) when dropped.
pub struct LocalCluster {
    pub local: procs::LocalCluster,
    pub client: Client,
    pub seeds: Vec<String>,
}

impl LocalCluster {
    /// Starts the cluster with `shards` shards and connects a client opening
    /// `connections_per_node` connections to each node (the client's default when `None`),
    /// coalescing requests into bundles or not.
    pub async fn start(
        dir: &Path,
        shards: u32,
        base_port: u16,
        connections_per_node: Option<usize>,
        coalesce: bool,
    ) -> Result<LocalCluster> {
        Self::start_with(
            dir,
            shards,
            base_port,
            connections_per_node,
            coalesce,
            &[],
            false,
        )
        .await
    }

    /// `start`, the nodes started with the extra flags `node_args`; with `tls`, a CA and
    /// certificates are made in `dir` (`dossier cert`), the nodes serve TLS and call each other
    /// over it, and the client presents a `service` certificate.
    pub async fn start_with(
        dir: &Path,
        shards: u32,
        base_port: u16,
        connections_per_node: Option<usize>,
        coalesce: bool,
        node_args: &[String],
        tls: bool,
    ) -> Result<LocalCluster> {
        let bin = procs::node_binary(None)?;
        let local = if tls {
            procs::LocalCluster::spawn_secure(dir, 3, base_port, &bin, node_args).await?
        } else {
            procs::LocalCluster::spawn_with(dir, 3, base_port, &bin, node_args).await?
        };
        local.init(shards, 3).await?;
        let client = local
            .client_with(|config| {
                if let Some(n) = connections_per_node {
                    config.connections_per_node = n;
                }
                config.coalesce = coalesce;
            })
            .await?;
        let seeds = local.seeds.clone();
        Ok(LocalCluster {
            local,
            client,
            seeds,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Put,
    Get(ReadConsistency),
    /// Linearizable gets and puts, `read_percent` of the operations being gets.
    Mixed {
        read_percent: u8,
    },
    /// Linearizable reads of a patient's record (`Records.Read` of one Observation).
    RecordRead,
}

impl Workload {
    /// `put`, `get`, `get-stale`, or `mixed` (with `read_percent`).
    pub fn parse(name: &str, read_percent: u8) -> Result<Workload> {
        Ok(match name {
            "put" => Workload::Put,
            "get" => Workload::Get(ReadConsistency::Linearizable),
            "get-stale" => Workload::Get(ReadConsistency::Stale),
            "record-read" => Workload::RecordRead,
            "mixed" => {
                anyhow::ensure!(
                    read_percent <= 100,
                    "--read-percent must be within 0..100, is {read_percent}"
                );
                Workload::Mixed { read_percent }
            }
            other => anyhow::bail!(
                "unknown workload {other:?} (put, get, get-stale, mixed, record-read)"
            ),
        })
    }

    fn name(self) -> String {
        match self {
            Workload::Put => "put".into(),
            Workload::Get(ReadConsistency::Linearizable) => "get".into(),
            Workload::Get(ReadConsistency::Stale) => "get-stale".into(),
            Workload::Mixed { read_percent } => format!("mixed-{read_percent}r"),
            Workload::RecordRead => "record-read".into(),
        }
    }

    fn reads(self) -> bool {
        !matches!(self, Workload::Put)
    }
}

/// How clients pick the patient of each operation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Distribution {
    Uniform,
    /// Zipf over patients with exponent `theta` (0.99 is YCSB's default): patient 0 hottest.
    Zipf {
        theta: f64,
    },
}

impl Distribution {
    pub fn parse(name: &str, theta: f64) -> Result<Distribution> {
        match name {
            "uniform" => Ok(Distribution::Uniform),
            "zipf" | "zipfian" => {
                anyhow::ensure!(
                    theta > 0.0 && theta < 10.0,
                    "--zipf-theta must be within (0, 10), is {theta}"
                );
                Ok(Distribution::Zipf { theta })
            }
            other => anyhow::bail!("unknown distribution {other:?} (uniform, zipf)"),
        }
    }

    fn name(self) -> String {
        match self {
            Distribution::Uniform => "uniform".into(),
            Distribution::Zipf { theta } => format!("zipf-{theta}"),
        }
    }
}

/// Draws patient numbers in `0..patients`: uniform, or Zipf through a cumulative table.
#[derive(Debug, Clone)]
enum Chooser {
    Uniform(u64),
    Zipf(Arc<Vec<f64>>),
}

impl Chooser {
    fn new(distribution: Distribution, patients: usize) -> Chooser {
        match distribution {
            Distribution::Uniform => Chooser::Uniform(patients as u64),
            Distribution::Zipf { theta } => {
                let weights: Vec<f64> = (1..=patients).map(|k| (k as f64).powf(-theta)).collect();
                let total: f64 = weights.iter().sum();
                let mut acc = 0.0;
                let cdf = weights
                    .iter()
                    .map(|w| {
                        acc += w / total;
                        acc
                    })
                    .collect();
                Chooser::Zipf(Arc::new(cdf))
            }
        }
    }

    fn pick(&self, rng: &mut Rng) -> usize {
        match self {
            Chooser::Uniform(n) => (rng.next_u64() % n) as usize,
            Chooser::Zipf(cdf) => {
                let u = rng.unit();
                cdf.partition_point(|&c| c < u).min(cdf.len() - 1)
            }
        }
    }
}

/// One load point: what runs, how long, over which keys.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub workload: Workload,
    pub clients: usize,
    pub value_bytes: usize,
    pub patients: usize,
    pub distribution: Distribution,
    /// Measured time; the run ends at this or at `ops`, whichever comes first.
    pub duration: Duration,
    /// Measured operations (successful or not) across all clients.
    pub ops: Option<u64>,
    pub warmup: Duration,
    /// The Dossier cluster's shard count (reported only; `None` for other backends).
    pub shards: Option<u32>,
    /// Connections per node, member or server (reported only).
    pub connections_per_node: usize,
}

/// The outcome of one load point.
#[derive(Debug)]
pub struct LoadResult {
    pub json: String,
    pub row: String,
}

fn patient_name(n: usize) -> String {
    format!("patient-{n:06}")
}

/// The kind of a failed operation, for the error counts.
fn dossier_error_kind(e: &dossier_client::ClientError) -> &'static str {
    e.kind()
}

impl Backend {
    async fn op(
        &self,
        client: usize,
        read: Option<ReadConsistency>,
        patient: &str,
        value: &[u8],
    ) -> Result<(), String> {
        match read {
            Some(consistency) => self.get_kind(client, patient, consistency).await,
            None => self.put_kind(client, patient, value).await,
        }
    }

    /// The record-read workload's patient `patient` with one Observation, `obs` (kept if it
    /// exists already).
    async fn preload_record(&self, patient: &str, n: u64) -> Result<(), String> {
        let (Backend::Dossier(c) | Backend::DossierUnary(c)) = self else {
            return Err("record-read needs the dossier backend".into());
        };
        let resource = dossier_api::v1::Resource {
            meta: Some(dossier_api::v1::Meta {
                id: patient.to_owned(),
                ..Default::default()
            }),
            kind: Some(dossier_api::v1::resource::Kind::Patient(
                dossier_api::v1::Patient {
                    names: vec![dossier_api::v1::HumanName {
                        family: "Bench".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )),
            unmodelled_json: String::new(),
        };
        let options = dossier_client::WriteOptions::default();
        let kind = |e: dossier_client::ClientError| dossier_error_kind(&e).to_owned();
        c.create_patient(resource, &options).await.map_err(kind)?;
        let obs = dossier_records::synth::observation("obs".into(), n);
        c.create_record(patient, obs, &options)
            .await
            .map_err(kind)?;
        Ok(())
    }

    async fn record_read(&self, patient: &str) -> Result<(), String> {
        let (Backend::Dossier(c) | Backend::DossierUnary(c)) = self else {
            return Err("record-read needs the dossier backend".into());
        };
        match c
            .read_record(patient, dossier_api::v1::ResourceType::Observation, "obs")
            .await
        {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err("not-found".into()),
            Err(e) => Err(dossier_error_kind(&e).to_owned()),
        }
    }

    async fn put_kind(&self, client: usize, patient: &str, value: &[u8]) -> Result<(), String> {
        match self {
            Backend::Dossier(c) | Backend::DossierUnary(c) => c
                .put(patient, b"k", value)
                .await
                .map(|_| ())
                .map_err(|e| dossier_error_kind(&e).to_owned()),
            Backend::Etcd(channels) | Backend::Floor(channels) => {
                let mut kv =
                    etcdpb::kv_client::KvClient::new(channels[client % channels.len()].clone());
                let request = etcdpb::PutRequest {
                    key: format!("{patient}/k").into_bytes(),
                    value: value.to_vec(),
                    ..Default::default()
                };
                kv.put(request)
                    .await
                    .map(|_| ())
                    .map_err(|s| format!("{:?}", s.code()).to_lowercase())
            }
        }
    }

    async fn get_kind(
        &self,
        client: usize,
        patient: &str,
        consistency: ReadConsistency,
    ) -> Result<(), String> {
        match self {
            Backend::Dossier(c) | Backend::DossierUnary(c) => c
                .get_with(patient, b"k", consistency, Duration::from_secs(10))
                .await
                .map(|_| ())
                .map_err(|e| dossier_error_kind(&e).to_owned()),
            Backend::Etcd(channels) | Backend::Floor(channels) => {
                let mut kv =
                    etcdpb::kv_client::KvClient::new(channels[client % channels.len()].clone());
                let request = etcdpb::RangeRequest {
                    key: format!("{patient}/k").into_bytes(),
                    serializable: consistency == ReadConsistency::Stale,
                    ..Default::default()
                };
                kv.range(request)
                    .await
                    .map(|_| ())
                    .map_err(|s| format!("{:?}", s.code()).to_lowercase())
            }
        }
    }
}

/// Closed loop: `spec.clients` clients, each sending its next operation when the last returns,
/// for `spec.warmup` unmeasured and then until `spec.duration` or `spec.ops`. Progress once a
/// second on stderr.
pub async fn load(backend: &Backend, spec: &LoadSpec) -> Result<LoadResult> {
    anyhow::ensure!(spec.clients > 0, "--clients must be at least 1");
    anyhow::ensure!(spec.patients > 0, "--patients must be at least 1");
    let value = Arc::new(vec![0x42u8; spec.value_bytes]);
    if spec.workload == Workload::RecordRead {
        for p in 0..spec.patients {
            backend
                .preload_record(&patient_name(p), p as u64)
                .await
                .map_err(|kind| anyhow::anyhow!("preloading patient {p} failed: {kind}"))?;
        }
    } else if spec.workload.reads() {
        for p in 0..spec.patients {
            backend
                .put_kind(p, &patient_name(p), &value)
                .await
                .map_err(|kind| anyhow::anyhow!("preloading patient {p} failed: {kind}"))?;
        }
    }
    let chooser = Chooser::new(spec.distribution, spec.patients);
    let workload = spec.workload;
    let result = crate::closed_loop::run(
        crate::closed_loop::LoopSpec {
            clients: spec.clients,
            warmup: spec.warmup,
            duration: spec.duration,
            ops: spec.ops,
        },
        |c| {
            let (backend, value, chooser) = (
                Arc::new(backend.clone()),
                Arc::clone(&value),
                chooser.clone(),
            );
            let mut rng = Rng(0x5eed ^ (c as u64).wrapping_mul(0x9e37_79b9));
            move |_k| {
                let patient = patient_name(chooser.pick(&mut rng));
                let read = match workload {
                    Workload::Put | Workload::RecordRead => None,
                    Workload::Get(consistency) => Some(consistency),
                    Workload::Mixed { read_percent } => (rng.next_u64() % 100
                        < u64::from(read_percent))
                    .then_some(ReadConsistency::Linearizable),
                };
                let (backend, value) = (Arc::clone(&backend), Arc::clone(&value));
                async move {
                    if workload == Workload::RecordRead {
                        return backend.record_read(&patient).await.map(|()| 1);
                    }
                    backend.op(c, read, &patient, &value).await.map(|()| 1)
                }
            }
        },
    )
    .await?;
    let (hist, errors, elapsed) = (result.latencies, result.errors, result.elapsed);
    let ops = hist.len();
    let error_total: u64 = errors.values().sum();
    let latency = Latency::of_histogram(&hist);
    let mut json = Json::new("cluster-load");
    json.str("backend", backend.name())
        .str("workload", &workload.name())
        .str("distribution", &spec.distribution.name())
        .num("clients", spec.clients as f64)
        .num("value_bytes", spec.value_bytes as f64)
        .num("patients", spec.patients as f64)
        .num("replicas", 3.0)
        .num("connections_per_node", spec.connections_per_node as f64);
    if let Some(shards) = spec.shards {
        json.num("shards", f64::from(shards));
    }
    json.num("seconds", elapsed.as_secs_f64())
        .num("ops", ops as f64)
        .num("ops_per_s", per_second(ops, elapsed))
        .num("errors", error_total as f64);
    for (kind, n) in &errors {
        json.num(&format!("errors_{}", kind.replace('-', "_")), *n as f64);
    }
    json.latency("latency", latency);
    let ms = |f: fn(&Latency) -> f64| {
        latency.map_or("-".to_owned(), |l| format!("{:.2}", f(&l) / 1000.0))
    };
    let row = format!(
        "| {}{} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} |",
        backend.name(),
        spec.shards
            .map_or(String::new(), |n| format!(", {n} shards")),
        workload.name(),
        spec.distribution.name(),
        spec.clients,
        per_second(ops, elapsed),
        ms(|l| l.p50),
        ms(|l| l.p99),
        ms(|l| l.p999),
        ms(|l| l.max),
        if errors.is_empty() {
            "0".to_owned()
        } else {
            errors
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        },
    );
    Ok(LoadResult {
        json: json.finish(),
        row,
    })
}

/// The header of the table `LoadResult::row` fills.
pub const TABLE_HEADER: &str = "| backend | workload | keys | clients | ops/s | p50 ms | p99 ms | p99.9 ms | max ms | errors |\n|---|---|---|---|---|---|---|---|---|---|";

/// Steady writes from `clients` clients to one shard; SIGKILL its leader; measure the
/// client-observed gap and the time to the first success after the kill; restart the node and
/// wait until it has caught up. Repeated `reps` times. With `quiet`, nobody writes before the
/// kill: the shard is left until every replica reports it quiescent (the nodes must run with
/// `--quiesce-after-ms`), its leader is killed, and the writers start at the kill: the gap is
/// the time from the kill to the first write acknowledged.
pub async fn failover(
    cluster: &mut LocalCluster,
    reps: usize,
    clients: usize,
    quiet: bool,
) -> Result<Vec<String>> {
    let map = cluster.client.cluster_map().context("map")?;
    let target = map.shards.first().context("a shard")?.clone();
    let patients: Vec<String> = (0..)
        .map(|n| format!("failover-{n:06}"))
        .filter(|p| {
            let h = dossier_api::patient_hash(p);
            h >= target.hash_lo && (target.hash_hi_max || h < target.hash_hi)
        })
        .take(clients)
        .collect();
    let mut out = Vec::new();
    let mut failovers = Failovers::new(
        if quiet {
            "failover-quiescent"
        } else {
            "failover"
        },
        clients,
    );
    for rep in 1..=reps {
        let stop = Arc::new(AtomicBool::new(false));
        let successes: Arc<std::sync::Mutex<Vec<Instant>>> = Arc::default();
        let writers = || {
            patients
                .iter()
                .map(|patient| {
                    let (client, stop, successes, patient) = (
                        cluster.client.clone(),
                        Arc::clone(&stop),
                        Arc::clone(&successes),
                        patient.clone(),
                    );
                    tokio::spawn(async move {
                        let mut n = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            n += 1;
                            if client
                                .put_with(
                                    &patient,
                                    format!("k{n}").as_bytes(),
                                    b"v",
                                    Duration::from_secs(5),
                                )
                                .await
                                .is_ok()
                            {
                                successes
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push(Instant::now());
                            }
                        }
                    })
                })
                .collect::<Vec<_>>()
        };
        let mut tasks = Vec::new();
        if quiet {
            wait_quiescent(&cluster.seeds, target.shard_id).await?;
        } else {
            tasks = writers();
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        // The leader as of now, after the writers warmed up (leadership may have moved).
        let status = ops::status(&cluster.seeds, false).await?;
        let leader = ops::leader_of(&status.replicas, target.shard_id)
            .map(|r| r.node_id)
            .context("the shard has a leader")?;
        // What the kill was decided on, for the report of an anomalous repetition.
        let seen: Vec<String> = status
            .replicas
            .iter()
            .filter(|r| r.shard_id == target.shard_id)
            .map(|r| {
                format!(
                    "node {} {} of term {} (leader {}, commit {})",
                    r.node_id, r.role, r.term, r.leader_id, r.commit_index
                )
            })
            .chain(
                status
                    .unreachable
                    .iter()
                    .map(|n| format!("node {n} unreachable")),
            )
            .collect();
        let killed_at = Instant::now();
        let victim = cluster.local.node_mut(leader).context("leader process")?;
        victim.kill9();
        if quiet {
            tasks = writers();
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        let times = successes.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let anomaly = |what: &str| {
            anyhow::anyhow!(
                "repetition {rep}: {what} after SIGKILL of node {leader}, the leader of shard {} by \
                 the status read just before: {}; {} writes succeeded in the whole repetition",
                target.shard_id,
                seen.join(", "),
                times.len()
            )
        };
        let (gap, first) = if quiet {
            let first = times
                .iter()
                .min()
                .map(|t| t.duration_since(killed_at).as_secs_f64())
                .ok_or_else(|| anomaly("no write succeeded"))?;
            (first, first)
        } else {
            gap_around(&times, killed_at).ok_or_else(|| anomaly("no write succeeded"))?
        };
        // Writes that never paused mean the node killed was not the one serving them.
        anyhow::ensure!(
            gap >= MIN_FAILOVER_GAP.as_secs_f64(),
            anomaly(&format!(
                "writes never paused (longest gap {:.0} ms)",
                gap * 1e3
            ))
        );
        out.push(failovers.record(rep, &format!("node {leader}"), gap, first));
        let victim = cluster.local.node_mut(leader).context("leader process")?;
        victim.spawn()?;
        victim
            .wait_http_ok("readyz", Duration::from_secs(30))
            .await?;
    }
    out.push(failovers.summary());
    Ok(out)
}

/// Waits (up to 30 s) until every replica of `shard` reports itself quiescent.
async fn wait_quiescent(seeds: &[String], shard: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = ops::status(seeds, false).await?;
        let replicas: Vec<_> = status
            .replicas
            .iter()
            .filter(|r| r.shard_id == shard)
            .collect();
        if replicas.len() == 3 && replicas.iter().all(|r| r.quiescent) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "shard {shard} did not go quiescent within 30 s (are the nodes run with --quiesce-after-ms?)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Below this, a failover "gap" is only the writers' own pace: a leader's death cannot be that
/// short (the followers wait out their election timeouts first).
const MIN_FAILOVER_GAP: Duration = Duration::from_millis(50);

/// The repetitions of one failover measurement: a JSON line each, then a summary.
struct Failovers {
    measurement: &'static str,
    clients: usize,
    gaps: Vec<f64>,
}

impl Failovers {
    fn new(measurement: &'static str, clients: usize) -> Self {
        Failovers {
            measurement,
            clients,
            gaps: Vec::new(),
        }
    }

    fn record(&mut self, rep: usize, killed: &str, gap: f64, recovered: f64) -> String {
        self.gaps.push(gap);
        eprintln!(
            "  rep {rep}: killed {killed}; gap {:.0} ms, writes flowing again {:.0} ms after the kill",
            gap * 1e3,
            recovered * 1e3
        );
        Json::new(self.measurement)
            .num("rep", rep as f64)
            .num("clients", self.clients as f64)
            .str("killed", killed)
            .num("gap_ms", gap * 1e3)
            .num("recovered_after_kill_ms", recovered * 1e3)
            .finish()
    }

    fn summary(&mut self) -> String {
        self.gaps.sort_by(f64::total_cmp);
        let n = self.gaps.len();
        Json::new(&format!("{}-summary", self.measurement))
            .num("reps", n as f64)
            .num(
                "gap_median_ms",
                self.gaps.get(n / 2).copied().unwrap_or(f64::NAN) * 1e3,
            )
            .num(
                "gap_max_ms",
                self.gaps.last().copied().unwrap_or(f64::NAN) * 1e3,
            )
            .finish()
    }
}

/// The client-observed gap of a fault at `killed_at`: the longest stretch between two consecutive
/// successful writes (across all clients) that ends after the kill, and when it ended, relative to
/// the kill. (Writes already committed when the leader died may still return just after the kill;
/// the gap is what follows them.)
pub fn gap_around(times: &[Instant], killed_at: Instant) -> Option<(f64, f64)> {
    let mut sorted = times.to_vec();
    sorted.sort_unstable();
    sorted
        .windows(2)
        .filter(|w| w[1] >= killed_at)
        .map(|w| {
            (
                (w[1] - w[0]).as_secs_f64(),
                w[1].saturating_duration_since(killed_at).as_secs_f64(),
            )
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
}

/// The etcd counterpart of [`failover`]: 16 writers over the three members (a writer moves to the
/// next member when its member fails), SIGKILL of the etcd leader (found with Maintenance.Status),
/// the gap measured the same way, the member restarted by `benches/scripts/etcd-cluster.sh`.
pub async fn failover_etcd(
    endpoints: &[String],
    dir: &Path,
    script: &Path,
    reps: usize,
    clients: usize,
) -> Result<Vec<String>> {
    let Backend::Etcd(channels) = Backend::etcd(endpoints, 1).await? else {
        unreachable!("etcd backend")
    };
    let mut out = Vec::new();
    let mut failovers = Failovers::new("failover-etcd", clients);
    for rep in 1..=reps {
        let stop = Arc::new(AtomicBool::new(false));
        let successes: Arc<std::sync::Mutex<Vec<Instant>>> = Arc::default();
        let tasks: Vec<_> = (0..clients)
            .map(|c| {
                let (channels, stop, successes) =
                    (channels.clone(), Arc::clone(&stop), Arc::clone(&successes));
                tokio::spawn(async move {
                    let mut member = c % channels.len();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let mut kv = etcdpb::kv_client::KvClient::new(channels[member].clone());
                        let mut request = tonic::Request::new(etcdpb::PutRequest {
                            key: format!("failover-{c}/k{n}").into_bytes(),
                            value: b"v".to_vec(),
                            ..Default::default()
                        });
                        request.set_timeout(Duration::from_millis(500));
                        if kv.put(request).await.is_ok() {
                            successes
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(Instant::now());
                        } else {
                            member = (member + 1) % channels.len();
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The leader's member id, then which endpoint (and so which pid file) it is.
        let mut leader = None;
        let mut ids = Vec::new();
        for (i, channel) in channels.iter().enumerate() {
            let mut m = etcdpb::maintenance_client::MaintenanceClient::new(channel.clone());
            if let Ok(s) = m.status(etcdpb::StatusRequest {}).await {
                let s = s.into_inner();
                leader = Some(s.leader);
                ids.push((i, s.header.map_or(0, |h| h.member_id)));
            }
        }
        let leader = leader.context("no etcd member answered Status")?;
        let index = ids
            .iter()
            .find(|(_, id)| *id == leader)
            .map(|(i, _)| *i)
            .context("leader is not among the endpoints")?;
        let member = index + 1;
        let pid: i32 = std::fs::read_to_string(dir.join(format!("e{member}.pid")))?
            .trim()
            .parse()?;
        let killed_at = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        tokio::time::sleep(Duration::from_secs(4)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        let times = successes.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let (gap, first) = gap_around(&times, killed_at).context("successes around the kill")?;
        out.push(failovers.record(rep, &format!("etcd member e{member}"), gap, first));
        let status = std::process::Command::new("bash")
            .arg(script)
            .arg("restart-member")
            .arg(dir)
            .arg(member.to_string())
            .status()
            .context("restart the etcd member")?;
        anyhow::ensure!(status.success(), "restarting etcd member {member} failed");
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    out.push(failovers.summary());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_is_skewed_and_uniform_is_flat() {
        let draws = 200_000;
        let count = |d: Distribution| {
            let chooser = Chooser::new(d, 100);
            let mut rng = Rng(7);
            let mut hits = vec![0u32; 100];
            for _ in 0..draws {
                hits[chooser.pick(&mut rng)] += 1;
            }
            hits
        };
        let zipf = count(Distribution::Zipf { theta: 0.99 });
        // With theta 0.99 over 100 keys, key 0 takes about 19 % and key 99 about 0.2 %.
        assert!(zipf[0] > draws / 7, "hottest key drew {}", zipf[0]);
        assert!(zipf[0] > zipf[1] && zipf[1] > zipf[9] && zipf[9] > zipf[99]);
        assert!(zipf[99] > 0);
        let uniform = count(Distribution::Uniform);
        let (lo, hi) = (uniform.iter().min().unwrap(), uniform.iter().max().unwrap());
        assert!(
            *lo > 1_700 && *hi < 2_300,
            "uniform counts within {lo}..{hi}"
        );
    }

    #[test]
    fn bad_workload_arguments_are_refused() {
        assert!(Workload::parse("mixed", 101).is_err());
        assert!(Workload::parse("scan", 0).is_err());
        assert_eq!(
            Workload::parse("mixed", 90).unwrap(),
            Workload::Mixed { read_percent: 90 }
        );
        assert!(Distribution::parse("zipf", 0.0).is_err());
        assert!(Distribution::parse("pareto", 1.0).is_err());
    }
}
