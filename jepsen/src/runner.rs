//! A run: a local cluster of `dossier-node` processes, concurrent client processes recording a
//! history, a nemesis injecting faults on a bounded schedule, then healing, final reads, and the
//! checker's verdict written to the run folder.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use dossier_api::v1::kv_client::KvClient;
use dossier_api::v1::{GetRequest, ReadConsistency as WireConsistency, RouteHeader};
use dossier_cli::ops;
use dossier_cli::procs::{LocalCluster, NodeProc};
use dossier_client::{Client, ClientError, ReadConsistency};
use serde_json::{Value, json};

use crate::checker;
use crate::history::{self, Event, F, Type};
use crate::netns::{self, Net};

/// Faults the nemesis may inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL a random node or the current leader of a shard, restart it half an interval later.
    Kill,
    /// SIGSTOP a random node or the current leader of a shard, SIGCONT it half an interval later.
    Pause,
    /// Cut the network (namespaces only), healed half an interval later. Patterns take turns:
    /// random halves, the leader of a shard isolated, a majority ring, a bridge.
    Partition,
    /// Ask the leader of a random shard's node to hand its leaderships over (Admin.Drain).
    Transfer,
}

impl std::str::FromStr for Fault {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "kill" => Ok(Fault::Kill),
            "pause" => Ok(Fault::Pause),
            "partition" => Ok(Fault::Partition),
            "transfer" => Ok(Fault::Transfer),
            other => bail!("unknown nemesis {other:?} (kill, pause, partition, transfer)"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub out: PathBuf,
    pub node_bin: PathBuf,
    pub nodes: u64,
    pub shards: u32,
    pub time_limit: Duration,
    pub nemesis: Vec<Fault>,
    pub nemesis_interval: Duration,
    pub register_keys: usize,
    pub set_keys: usize,
    pub clients: usize,
    pub base_port: u16,
    pub seed: u64,
    /// Start the nodes with the unsafe test switch (reads without a barrier).
    pub unsafe_stale_reads: bool,
    /// `raft.read-lease` of the nodes: lease reads (true, the default) or ReadIndex.
    pub read_lease: bool,
    pub check_budget_per_key: Duration,
    /// Clients of the identifier workload (patients claiming national numbers); 0: none.
    pub identifier_clients: usize,
    /// National numbers they compete for.
    pub identifier_pool: usize,
}

struct Recorder {
    started: Instant,
    events: Mutex<Vec<Event>>,
    next_process: AtomicU64,
}

impl Recorder {
    fn now(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    fn record(&self, process: u64, kind: Type, f: F, key: &str, value: Value) {
        let event = Event {
            process,
            kind,
            f,
            key: key.to_owned(),
            value,
            time: self.now(),
        };
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event);
    }

    fn fresh_process(&self) -> u64 {
        self.next_process.fetch_add(1, Ordering::Relaxed)
    }
}

/// A small deterministic generator (splitmix64), seeded per client.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Elements a set key takes, about, before its adds move on to its next part. A set is one value
/// that every add rewrites whole, so one that grew for the whole run would make the log grow with
/// the square of the run's length (a 600 s run wrote 35 GB that way); parts keep it linear.
const SET_PART_ELEMENTS: u64 = 2_000;

/// The part of every set key that takes `element` (elements are numbered over the whole run, and
/// shared with the register writes).
fn set_part(element: u64, set_keys: usize) -> u64 {
    element / (SET_PART_ELEMENTS * set_keys as u64)
}

/// Set key `k`, part `part`: `s/{k}.{part}`.
fn set_key(k: usize, part: u64) -> String {
    format!("s/{k}.{part}")
}

/// The patient of key `key`: `jepsen-` and the key with `/` as `-` (patient ids follow the
/// record layer's id rule).
fn register_patient(key: &str) -> String {
    format!("jepsen-{}", key.replace('/', "-"))
}

/// How a failed operation is recorded: `fail` only when it certainly did not take effect.
fn outcome_of(e: &ClientError) -> Type {
    if e.is_definite() {
        Type::Fail
    } else {
        Type::Info
    }
}

/// A read as a load balancer would send it: to any replica of the patient's shard. A correct
/// replica that is not the leader refuses it (the client then reads through the leader); the
/// unsafe switch makes it answer from its local state.
async fn read_any_replica(
    client: &Client,
    patient: &str,
    key: &[u8],
    rng: &mut Rng,
) -> Result<Option<Vec<u8>>, ClientError> {
    if let Some(map) = client.cluster_map() {
        let h = dossier_api::patient_hash(patient);
        if let Some(d) = map
            .shards
            .iter()
            .find(|d| h >= d.hash_lo && (d.hash_hi_max || h < d.hash_hi))
        {
            let node = d.replicas[rng.below(d.replicas.len())];
            if let Some(addr) = map
                .nodes
                .iter()
                .find(|n| n.node_id == node)
                .map(|n| n.address.clone())
                && let Ok(channel) =
                    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                        .map(|e| e.connect_timeout(Duration::from_millis(200)))
            {
                let mut request = tonic::Request::new(GetRequest {
                    route: Some(RouteHeader {
                        patient_id: patient.to_owned(),
                        ..RouteHeader::default()
                    }),
                    key: key.to_vec(),
                    consistency: WireConsistency::Linearizable as i32,
                });
                request.set_timeout(Duration::from_millis(500));
                if let Ok(channel) = channel.connect().await
                    && let Ok(r) = KvClient::new(channel).get(request).await
                {
                    let r = r.into_inner();
                    return Ok(r.found.then_some(r.value));
                }
            }
        }
    }
    let value = client
        .get_with(
            patient,
            key,
            ReadConsistency::Linearizable,
            Duration::from_secs(5),
        )
        .await?;
    Ok(value.map(|v| v.to_vec()))
}

fn decode_int(bytes: Option<Vec<u8>>) -> Value {
    match bytes {
        None => Value::Null,
        Some(b) => String::from_utf8_lossy(&b)
            .parse::<i64>()
            .map_or(Value::Null, Value::from),
    }
}

fn decode_list(bytes: &Option<Vec<u8>>) -> Vec<i64> {
    bytes
        .as_ref()
        .and_then(|b| serde_json::from_slice::<Vec<i64>>(b).ok())
        .unwrap_or_default()
}

/// One client: a logical process at a time, random operations until `stop`.
async fn client_loop(
    client: Client,
    recorder: Arc<Recorder>,
    config: Arc<RunConfig>,
    stop: Arc<AtomicBool>,
    seed: u64,
    unique: Arc<AtomicU64>,
) {
    let mut rng = Rng(seed);
    let mut process = recorder.fresh_process();
    while !stop.load(Ordering::Relaxed) {
        let register = config.set_keys == 0 || (config.register_keys > 0 && rng.below(3) > 0);
        let outcome = if register {
            let key = format!("r/{}", rng.below(config.register_keys));
            let patient = register_patient(&key);
            match rng.below(4) {
                0 | 1 => {
                    recorder.record(process, Type::Invoke, F::Read, &key, Value::Null);
                    match read_any_replica(&client, &patient, b"v", &mut rng).await {
                        Ok(v) => {
                            recorder.record(process, Type::Ok, F::Read, &key, decode_int(v));
                            Type::Ok
                        }
                        Err(e) => {
                            let t = outcome_of(&e);
                            recorder.record(process, t, F::Read, &key, Value::Null);
                            t
                        }
                    }
                }
                2 => {
                    let v = unique.fetch_add(1, Ordering::Relaxed) as i64;
                    recorder.record(process, Type::Invoke, F::Write, &key, json!(v));
                    let t = match client
                        .put_with(
                            &patient,
                            b"v",
                            v.to_string().as_bytes(),
                            Duration::from_secs(5),
                        )
                        .await
                    {
                        Ok(_) => Type::Ok,
                        Err(e) => outcome_of(&e),
                    };
                    recorder.record(process, t, F::Write, &key, json!(v));
                    t
                }
                _ => {
                    let expected = rng.below(unique.load(Ordering::Relaxed).max(1) as usize) as i64;
                    let new = unique.fetch_add(1, Ordering::Relaxed) as i64;
                    recorder.record(process, Type::Invoke, F::Cas, &key, json!([expected, new]));
                    let result = client
                        .compare_and_set(
                            &patient,
                            b"v",
                            Some(expected.to_string().as_bytes()),
                            new.to_string().as_bytes(),
                            Duration::from_secs(5),
                        )
                        .await;
                    let t = match result {
                        Ok(w) if w.applied => Type::Ok,
                        Ok(_) => Type::Fail,
                        Err(e) => outcome_of(&e),
                    };
                    recorder.record(process, t, F::Cas, &key, json!([expected, new]));
                    t
                }
            }
        } else {
            let element = unique.fetch_add(1, Ordering::Relaxed);
            let key = set_key(
                rng.below(config.set_keys),
                set_part(element, config.set_keys),
            );
            let patient = register_patient(&key);
            let element = element as i64;
            recorder.record(process, Type::Invoke, F::Add, &key, json!(element));
            let t = add_element(&client, &patient, element).await;
            recorder.record(process, t, F::Add, &key, json!(element));
            t
        };
        if outcome == Type::Info {
            // Its operation may still be in flight: this process continues under a new number.
            process = recorder.fresh_process();
        }
    }
}

/// Appends `element` to the patient's list by read + compare-and-set, retrying on conflicts.
async fn add_element(client: &Client, patient: &str, element: i64) -> Type {
    for _ in 0..50 {
        let current = match client
            .get_with(
                patient,
                b"list",
                ReadConsistency::Linearizable,
                Duration::from_secs(5),
            )
            .await
        {
            Ok(v) => v.map(|b| b.to_vec()),
            Err(e) => return outcome_of(&e),
        };
        let mut list = decode_list(&current);
        list.push(element);
        let new = serde_json::to_vec(&list).unwrap_or_default();
        match client
            .compare_and_set(
                patient,
                b"list",
                current.as_deref(),
                &new,
                Duration::from_secs(5),
            )
            .await
        {
            Ok(w) if w.applied => return Type::Ok,
            Ok(_) => continue,
            Err(e) => return outcome_of(&e),
        }
    }
    Type::Fail
}

/// The nemesis: every interval, one fault on a random node or the current leader of a random
/// shard; healed half an interval later. Writes what it did to `nemesis.log`.
async fn nemesis_loop(
    cluster: Arc<tokio::sync::Mutex<LocalCluster>>,
    net: Option<Arc<Net>>,
    config: Arc<RunConfig>,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<String>>>,
    started: Instant,
) -> u64 {
    let mut rng = Rng(config.seed ^ 0x006E_656D_6573_6973);
    let mut faults = 0;
    let mut partitions = 0;
    if config.nemesis.is_empty() {
        return 0;
    }
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(config.nemesis_interval / 2).await;
        if stop.load(Ordering::Relaxed) {
            break;
        }
        // Faults take turns, so that a short run sees each kind.
        let fault = config.nemesis[faults as usize % config.nemesis.len()];
        let seeds = cluster.lock().await.seeds.clone();
        let target = if rng.below(2) == 0 {
            let shard = 1 + rng.below(config.shards as usize) as u64;
            match ops::status(&seeds, false).await {
                Ok(s) => ops::leader_of(&s.replicas, shard).map(|r| r.node_id),
                Err(_) => None,
            }
        } else {
            None
        }
        .unwrap_or(1 + rng.below(config.nodes as usize) as u64);
        let at = started.elapsed().as_secs_f64();
        if fault == Fault::Partition {
            let Some(net) = &net else { continue };
            let (name, cut) = partition_pattern(partitions, target, config.nodes, &mut rng);
            partitions += 1;
            let line = match net.partition(&*cut) {
                Ok(()) => format!("{at:.3}s Partition {name}"),
                Err(e) => format!("{at:.3}s Partition {name} failed: {e:#}"),
            };
            faults += 1;
            log.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            tokio::time::sleep(config.nemesis_interval / 2).await;
            let at = started.elapsed().as_secs_f64();
            let line = match net.heal() {
                Ok(()) => format!("{at:.3}s partition healed"),
                Err(e) => format!("{at:.3}s partition heal failed: {e:#}"),
            };
            log.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            continue;
        }
        if fault == Fault::Transfer {
            let address = cluster
                .lock()
                .await
                .node_mut(target)
                .map(|n| n.grpc.clone());
            let line = match address {
                Some(address) => match drain(&address).await {
                    Ok(moved) => {
                        format!("{at:.3}s Transfer: node {target} handed over shards {moved:?}")
                    }
                    Err(e) => format!("{at:.3}s Transfer on node {target} failed: {e:#}"),
                },
                None => continue,
            };
            faults += 1;
            log.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            tokio::time::sleep(config.nemesis_interval / 2).await;
            continue;
        }
        {
            let mut c = cluster.lock().await;
            let Some(node) = c.node_mut(target) else {
                continue;
            };
            match fault {
                Fault::Kill => node.kill9(),
                Fault::Pause | Fault::Partition | Fault::Transfer => node.pause(true),
            }
        }
        faults += 1;
        log.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!("{at:.3}s {fault:?} node {target}"));
        tokio::time::sleep(config.nemesis_interval / 2).await;
        let mut c = cluster.lock().await;
        if let Some(node) = c.node_mut(target) {
            let healed = match fault {
                Fault::Kill => node.spawn().map(|()| "restarted"),
                Fault::Pause | Fault::Partition | Fault::Transfer => {
                    node.pause(false);
                    Ok("resumed")
                }
            };
            let at = started.elapsed().as_secs_f64();
            let line = match healed {
                Ok(what) => format!("{at:.3}s node {target} {what}"),
                Err(e) => format!("{at:.3}s node {target} failed to heal: {e:#}"),
            };
            log.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    }
    faults
}

/// Asks a node to hand every leadership it holds to another replica; returns the shards moved.
async fn drain(address: &str) -> Result<Vec<u64>> {
    let mut admin =
        dossier_api::v1::admin_client::AdminClient::connect(format!("http://{address}")).await?;
    let mut request = tonic::Request::new(dossier_api::v1::DrainRequest {});
    request.set_timeout(Duration::from_secs(10));
    Ok(admin.drain(request).await?.into_inner().transferred)
}

/// The `n`-th partition pattern: which pairs of nodes stay connected. `leader` is a shard leader
/// (or a random node) for the isolating pattern.
fn partition_pattern(
    n: u64,
    leader: u64,
    nodes: u64,
    rng: &mut Rng,
) -> (String, Box<dyn Fn(u64, u64) -> bool + Send>) {
    match n % 4 {
        0 => {
            // Random halves: a minority and a majority.
            let mut order: Vec<u64> = (1..=nodes).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i + 1));
            }
            let minority: Vec<u64> = order[..(nodes as usize / 2)].to_vec();
            let name = format!("halves, minority {minority:?}");
            (
                name,
                Box::new(move |a, b| minority.contains(&a) == minority.contains(&b)),
            )
        }
        1 => (
            format!("node {leader} isolated"),
            Box::new(move |a, b| a != leader && b != leader),
        ),
        2 => {
            // Majority ring: each node sees its ring neighbours within distance nodes/4 (rounded
            // up), a majority of the cluster, but no two nodes see the same majority.
            let reach = (nodes / 2).div_ceil(2);
            let name = format!("majority ring (reach {reach})");
            (
                name,
                Box::new(move |a, b| {
                    let d = a.abs_diff(b);
                    d.min(nodes - d) <= reach
                }),
            )
        }
        _ => {
            // Bridge: two halves that only `bridge` connects.
            let bridge = leader;
            let others: Vec<u64> = (1..=nodes).filter(|&x| x != bridge).collect();
            let left: Vec<u64> = others[..others.len() / 2].to_vec();
            let name = format!("bridge through node {bridge}, halves split at {left:?}");
            (
                name,
                Box::new(move |a, b| {
                    a == bridge || b == bridge || left.contains(&a) == left.contains(&b)
                }),
            )
        }
    }
}

/// What a run produced.
#[derive(Debug)]
pub struct RunOutcome {
    pub report: checker::Report,
    pub faults: u64,
    pub out: PathBuf,
    /// The identifier workload's check, when it ran.
    pub identifiers: Option<crate::identifiers::Report>,
}

pub async fn run(config: RunConfig) -> Result<RunOutcome> {
    std::fs::create_dir_all(&config.out)
        .with_context(|| format!("create {}", config.out.display()))?;
    let config = Arc::new(config);
    let mut extra: Vec<String> = Vec::new();
    if config.unsafe_stale_reads {
        extra.push("--unsafe-stale-reads-for-testing".into());
    }
    if !config.read_lease {
        let path = config.out.join("node.toml");
        std::fs::write(&path, "[raft]\nread-lease = false\n")
            .with_context(|| format!("write {}", path.display()))?;
        extra.push("--config".into());
        extra.push(path.display().to_string());
    }
    // Declared before the cluster so that it is dropped after the nodes are stopped.
    let net = match netns::available() {
        Ok(()) => {
            let tag = (std::process::id() % 200 + 20) as u8;
            let net = Net::create(config.nodes, tag)
                .context("create the test network (namespaces, bridge)")?;
            eprintln!("nodes run in network namespaces on bridge 10.250.{tag}.0/24");
            Some(Arc::new(net))
        }
        Err(why) => {
            eprintln!(
                "network namespaces unavailable ({why}): nodes run on loopback and partition faults are SKIPPED"
            );
            None
        }
    };
    let mut config = (*config).clone();
    if net.is_none() {
        config.nemesis.retain(|f| *f != Fault::Partition);
    }
    let config = Arc::new(config);
    let mut procs = Vec::new();
    for id in 1..=config.nodes {
        let data = config.out.join("nodes").join(format!("node-{id}"));
        let mut p = match &net {
            Some(net) => {
                let ip = net.ip(id);
                let mut p = NodeProc::at(
                    id,
                    format!("{ip}:7000"),
                    format!("{ip}:7080"),
                    data,
                    config.node_bin.clone(),
                );
                p.prefix = net.prefix(id);
                p
            }
            None => NodeProc::new(
                id,
                config.base_port + id as u16,
                config.base_port + 80 + id as u16,
                data,
                config.node_bin.clone(),
            ),
        };
        p.extra_args = extra.clone();
        procs.push(p);
    }
    let cluster = LocalCluster::from_procs(procs).await?;
    cluster
        .init(config.shards, 3.min(config.nodes as u32))
        .await?;
    let client = cluster.client().await?;
    let cluster = Arc::new(tokio::sync::Mutex::new(cluster));
    let recorder = Arc::new(Recorder {
        started: Instant::now(),
        events: Mutex::new(Vec::new()),
        next_process: AtomicU64::new(0),
    });
    let stop_clients = Arc::new(AtomicBool::new(false));
    let stop_nemesis = Arc::new(AtomicBool::new(false));
    let unique = Arc::new(AtomicU64::new(1));
    let clients: Vec<_> = (0..config.clients)
        .map(|c| {
            tokio::spawn(client_loop(
                client.clone(),
                Arc::clone(&recorder),
                Arc::clone(&config),
                Arc::clone(&stop_clients),
                config.seed.wrapping_add(c as u64 * 7919),
                Arc::clone(&unique),
            ))
        })
        .collect();
    let numbers = Arc::new(crate::identifiers::pool(
        config.identifier_pool.max(1),
        config.seed,
    ));
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let identifier_clients: Vec<_> = (0..config.identifier_clients)
        .map(|w| {
            tokio::spawn(crate::identifiers::client_loop(
                client.clone(),
                w,
                Arc::clone(&numbers),
                Arc::clone(&stop_clients),
                Arc::clone(&attempts),
                config.seed,
                recorder.started,
            ))
        })
        .collect();
    let nemesis_log = Arc::new(Mutex::new(Vec::new()));
    let nemesis = tokio::spawn(nemesis_loop(
        Arc::clone(&cluster),
        net.clone(),
        Arc::clone(&config),
        Arc::clone(&stop_nemesis),
        Arc::clone(&nemesis_log),
        recorder.started,
    ));
    eprintln!(
        "running for {:?} with nemesis {:?} every {:?}",
        config.time_limit, config.nemesis, config.nemesis_interval
    );
    tokio::time::sleep(config.time_limit).await;
    stop_nemesis.store(true, Ordering::Relaxed);
    let faults = nemesis.await.unwrap_or(0);
    let faults_end = recorder.now();
    // Heal: the network whole, every node running and not paused, then a few seconds of
    // fault-free operation.
    if let Some(net) = &net {
        net.heal()?;
    }
    {
        let mut c = cluster.lock().await;
        for p in &mut c.procs {
            if p.is_running() {
                p.pause(false);
            } else {
                p.spawn()?;
            }
        }
        for p in &c.procs {
            p.wait_http_ok("readyz", Duration::from_secs(60)).await?;
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_clients.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    // Final reads of every set key (every part of each), after the cluster healed.
    let last_part = set_part(unique.load(Ordering::Relaxed), config.set_keys.max(1));
    let set_keys = (0..config.set_keys)
        .flat_map(|k| (0..=last_part).map(move |part| set_key(k, part)))
        .collect::<Vec<_>>();
    for key in set_keys {
        let process = recorder.fresh_process();
        recorder.record(process, Type::Invoke, F::Read, &key, Value::Null);
        match client
            .get_with(
                &register_patient(&key),
                b"list",
                ReadConsistency::Linearizable,
                Duration::from_secs(20),
            )
            .await
        {
            Ok(v) => recorder.record(
                process,
                Type::Ok,
                F::Read,
                &key,
                json!(decode_list(&v.map(|b| b.to_vec()))),
            ),
            Err(e) => recorder.record(process, outcome_of(&e), F::Read, &key, Value::Null),
        }
    }
    // The identifier check reads every attempted patient: after the final set reads, so that its
    // time is not counted as a gap of the register and set workloads.
    // Identifier clients may still wait out a create's deadline: after the final reads.
    for c in identifier_clients {
        let _ = c.await;
    }
    let identifiers = if config.identifier_clients > 0 {
        let attempts = attempts.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let report = crate::identifiers::check(&client, &numbers, &attempts).await;
        std::fs::write(
            config.out.join("identifiers.json"),
            serde_json::to_string_pretty(&json!({"report": report, "attempts": attempts}))?,
        )?;
        Some(report)
    } else {
        None
    };
    let events = recorder
        .events
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut file =
        std::io::BufWriter::new(std::fs::File::create(config.out.join("history.jsonl"))?);
    history::write(&events, &mut file)?;
    drop(file);
    std::fs::write(
        config.out.join("nemesis.log"),
        nemesis_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
            + "\n",
    )?;
    {
        let mut c = cluster.lock().await;
        for p in &mut c.procs {
            p.terminate(Duration::from_secs(10));
        }
    }
    let report = check_history(
        &config.out.join("history.jsonl"),
        config.check_budget_per_key,
        Some(faults_end),
    )?;
    write_results(&config.out, &report, faults, config.time_limit)?;
    Ok(RunOutcome {
        report,
        faults,
        out: config.out.clone(),
        identifiers,
    })
}

/// Checks a history file.
pub fn check_history(
    path: &Path,
    budget: Duration,
    faults_end: Option<u64>,
) -> Result<checker::Report> {
    let events = history::read(std::io::BufReader::new(
        std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?,
    ))?;
    let ops = history::ops(&events)?;
    Ok(checker::check(&ops, budget, faults_end))
}

/// `results.json` and `summary.txt` in the run folder.
pub fn write_results(
    out: &Path,
    report: &checker::Report,
    faults: u64,
    duration: Duration,
) -> Result<()> {
    let json = json!({ "valid": report.valid, "unknown": report.unknown, "faults": faults, "duration_s": duration.as_secs_f64(), "report": report });
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::write(out.join("summary.txt"), summary(report, faults))?;
    Ok(())
}

pub fn summary(report: &checker::Report, faults: u64) -> String {
    let mut s = String::new();
    let a = &report.availability;
    s.push_str(&format!(
        "{}: {} operations ({} ok, {} fail, {} info; {:.1}% ok), {} faults injected\n",
        if report.valid {
            "VALID"
        } else if report.unknown {
            "UNKNOWN"
        } else {
            "INVALID"
        },
        a.ops,
        a.ok,
        a.fail,
        a.info,
        a.ok_fraction * 100.0,
        faults
    ));
    s.push_str(&format!(
        "longest gap without a successful write: {:.0} ms (key {})",
        a.longest_write_gap_ms, a.longest_write_gap_key
    ));
    match a.longest_write_gap_after_faults_ms {
        Some(after) => s.push_str(&format!("; after the faults stopped: {after:.0} ms\n")),
        None => s.push('\n'),
    }
    for r in &report.registers {
        s.push_str(&format!(
            "register {}: {} ({} ops)",
            r.key, r.verdict, r.ops
        ));
        if let Some(e) = &r.explanation {
            s.push_str(&format!(": {e}"));
        }
        s.push('\n');
    }
    for set in &report.sets {
        s.push_str(&format!(
            "set {}: {} ({} acknowledged, {} indeterminate, {} read; lost {:?}, unexpected {:?}, duplicates {:?}{})\n",
            set.key,
            if set.valid { "valid" } else { "INVALID" },
            set.acknowledged,
            set.indeterminate,
            set.read,
            set.lost,
            set.unexpected,
            set.duplicates,
            if set.missing_final_read { ", no final read" } else { "" }
        ));
    }
    s
}
