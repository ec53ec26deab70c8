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

use crate::stats::{Json, Latency, per_second};

mod etcdpb {
    #![allow(clippy::all, missing_debug_implementations)]
    tonic::include_proto!("etcdserverpb");
}

/// The system under load: the same workload code drives both.
#[derive(Clone)]
pub enum Backend {
    Dossier(Client),
    /// One channel per etcd member; clients are spread over them (etcd forwards writes).
    Etcd(Vec<tonic::transport::Channel>),
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Dossier(_) => "dossier",
            Backend::Etcd(_) => "etcd",
        }
    }

    pub async fn etcd(endpoints: &[String]) -> Result<Backend> {
        let mut channels = Vec::new();
        for e in endpoints {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{e}"))?
                .connect_timeout(Duration::from_millis(500))
                .tcp_nodelay(true)
                .connect()
                .await
                .with_context(|| format!("connect to etcd at {e}"))?;
            channels.push(channel);
        }
        Ok(Backend::Etcd(channels))
    }

    async fn put(&self, client: usize, patient: &str, value: &[u8]) -> bool {
        match self {
            Backend::Dossier(c) => c.put(patient, b"k", value).await.is_ok(),
            Backend::Etcd(channels) => {
                let mut kv =
                    etcdpb::kv_client::KvClient::new(channels[client % channels.len()].clone());
                let request = etcdpb::PutRequest {
                    key: format!("{patient}/k").into_bytes(),
                    value: value.to_vec(),
                    ..Default::default()
                };
                kv.put(request).await.is_ok()
            }
        }
    }

    async fn get(&self, client: usize, patient: &str, consistency: ReadConsistency) -> bool {
        match self {
            Backend::Dossier(c) => c
                .get_with(patient, b"k", consistency, Duration::from_secs(10))
                .await
                .is_ok(),
            Backend::Etcd(channels) => {
                let mut kv =
                    etcdpb::kv_client::KvClient::new(channels[client % channels.len()].clone());
                let request = etcdpb::RangeRequest {
                    key: format!("{patient}/k").into_bytes(),
                    serializable: consistency == ReadConsistency::Stale,
                    ..Default::default()
                };
                kv.range(request).await.is_ok()
            }
        }
    }
}

/// A local cluster for one measurement and its client; the nodes stop (SIGTERM) when dropped.
pub struct LocalCluster {
    pub local: procs::LocalCluster,
    pub client: Client,
    pub seeds: Vec<String>,
}

impl LocalCluster {
    pub async fn start(dir: &Path, shards: u32, base_port: u16) -> Result<LocalCluster> {
        let local =
            procs::LocalCluster::spawn(dir, 3, base_port, &procs::node_binary(None)?).await?;
        local.init(shards, 3).await?;
        let client = local.client().await?;
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
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Put => "put",
            Workload::Get(ReadConsistency::Linearizable) => "get",
            Workload::Get(ReadConsistency::Stale) => "get-stale",
        }
    }
}

/// `clients` closed-loop clients for `duration` after `warmup`, over `patients` patients.
pub async fn load(
    backend: &Backend,
    workload: Workload,
    clients: usize,
    value_bytes: usize,
    patients: usize,
    duration: Duration,
    warmup: Duration,
) -> Result<String> {
    let value = Arc::new(vec![0x42u8; value_bytes]);
    if let Workload::Get(_) = workload {
        for p in 0..patients {
            if !backend.put(p, &format!("patient-{p:06}"), &value).await {
                anyhow::bail!("preloading patient {p} failed");
            }
        }
    }
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (backend, value, measuring, stop) = (
                backend.clone(),
                Arc::clone(&value),
                Arc::clone(&measuring),
                Arc::clone(&stop),
            );
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0u64;
                let mut n = c;
                while !stop.load(Ordering::Relaxed) {
                    let patient = format!("patient-{:06}", n % patients);
                    n = n
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407)
                        >> 1;
                    let started = Instant::now();
                    let ok = match workload {
                        Workload::Put => backend.put(c, &patient, &value).await,
                        Workload::Get(consistency) => backend.get(c, &patient, consistency).await,
                    };
                    if measuring.load(Ordering::Relaxed) {
                        if ok {
                            lat.push(started.elapsed().as_nanos() as u64);
                        } else {
                            errors += 1;
                        }
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    tokio::time::sleep(warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.context("client task")?;
        lat.extend(l);
        errors += e;
    }
    let ops = lat.len() as u64;
    Ok(Json::new("cluster-load")
        .str("backend", backend.name())
        .str("workload", workload.name())
        .num("clients", clients as f64)
        .num("value_bytes", value_bytes as f64)
        .num("replicas", 3.0)
        .num("seconds", elapsed.as_secs_f64())
        .num("ops", ops as f64)
        .num("ops_per_s", per_second(ops, elapsed))
        .num("errors", errors as f64)
        .latency("latency", Latency::of(&mut lat))
        .finish())
}

/// Steady writes from `clients` clients to one shard; SIGKILL its leader; measure the
/// client-observed gap and the time to the first success after the kill; restart the node and
/// wait until it has caught up. Repeated `reps` times.
pub async fn failover(
    cluster: &mut LocalCluster,
    reps: usize,
    clients: usize,
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
    let mut failovers = Failovers::new("failover", clients);
    for rep in 1..=reps {
        let stop = Arc::new(AtomicBool::new(false));
        let successes: Arc<std::sync::Mutex<Vec<Instant>>> = Arc::default();
        let tasks: Vec<_> = patients
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
            .collect();
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The leader as of now, after the writers warmed up (leadership may have moved).
        let status = ops::status(&cluster.seeds).await?;
        let leader = ops::leader_of(&status.replicas, target.shard_id)
            .map(|r| r.node_id)
            .context("the shard has a leader")?;
        let killed_at = Instant::now();
        let victim = cluster.local.node_mut(leader).context("leader process")?;
        victim.kill9();
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        let times = successes.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let (gap, first) = gap_around(&times, killed_at).context("successes around the kill")?;
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
    let Backend::Etcd(channels) = Backend::etcd(endpoints).await? else {
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
