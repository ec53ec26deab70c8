//! Soak and data scale: a local 3-node cluster loaded with tens of thousands of synthetic patients
//! and then written to for a while, measured the way an operator would look at it.
//!
//! 1. **Import** `patients` synthetic patients (several GB of clinical records at 30,000) with
//!    `importers` concurrent importers: patients/s overall and in the first and last tenth.
//! 2. **Soak**: `clients` closed-loop clients append observations for `seconds`: ops/s in the
//!    first and last tenth (a decline means the node slows as it holds more).
//! 3. **Footprint**: each node's state store and log on disk against the logical bytes written
//!    (records as encoded on the wire), and each node's peak RSS (the kernel's high-water mark).
//! 4. **Restart to ready**: node 3 SIGKILLed and started again: time to `/readyz`, and to every
//!    replica caught up with its leader.
//! 5. **Rebuild**: node 3 SIGKILLed, its data folder removed (a replaced disk) and started
//!    again: time until every replica holds what its leader holds, and the snapshot bytes it
//!    received per second.
//!
//! Progress goes to stderr; results are JSON lines. Everything lives under the run's scratch
//! directory, removed at the end.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dossier_cli::ops;
use dossier_client::{Client, WriteOptions};
use dossier_fhir::ImportedBundle;
use dossier_records::synth;
use prost::Message;
use tokio::sync::Mutex;

use crate::cluster::LocalCluster;
use crate::stats::Json;

/// What one soak run does.
#[derive(Debug, Clone)]
pub struct SoakSpec {
    pub patients: u64,
    pub importers: usize,
    pub clients: usize,
    pub seconds: u64,
    pub shards: u32,
    pub base_port: u16,
}

/// Completion times of one phase, and the bytes it wrote.
#[derive(Debug, Default)]
struct Phase {
    done: Mutex<Vec<Instant>>,
    logical_bytes: AtomicU64,
}

/// Operations per second in each tenth of `[start, end)`.
fn tenths(times: &[Instant], start: Instant, end: Instant) -> Vec<f64> {
    let tenth = (end - start) / 10;
    (0..10)
        .map(|k| {
            let from = start + tenth * k;
            let n = times
                .iter()
                .filter(|t| **t >= from && **t < from + tenth)
                .count();
            n as f64 / tenth.as_secs_f64().max(1e-9)
        })
        .collect()
}

/// The rates of every tenth, for the record: `120,118,...`.
fn rates(tenths: &[f64]) -> String {
    tenths
        .iter()
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn decline_percent(first: f64, last: f64) -> f64 {
    if first <= 0.0 {
        0.0
    } else {
        (first - last) / first * 100.0
    }
}

/// True when `node` holds a replica of every shard some node holds and each is at the highest
/// applied index any node reports (every node answering).
async fn caught_up(seeds: &[String], node: u64) -> bool {
    let Ok(status) = ops::status(seeds, false).await else {
        return false;
    };
    let all = &status.replicas;
    let shards: std::collections::BTreeSet<u64> = all.iter().map(|r| r.shard_id).collect();
    status.unreachable.is_empty()
        && !shards.is_empty()
        && shards.iter().all(|shard| {
            let best = all
                .iter()
                .filter(|r| r.shard_id == *shard)
                .map(|r| r.applied_index)
                .max();
            all.iter()
                .find(|r| r.shard_id == *shard && r.node_id == node)
                .map(|r| r.applied_index)
                == best
        })
}

/// The kernel's peak resident set of a process, in bytes.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A counter from a node's /metrics page (0 when absent).
async fn metric(http: &str, name: &str) -> f64 {
    dossier_cli::procs::metric(http, name).await.unwrap_or(0.0)
}

async fn import(client: &Client, spec: &SoakSpec, phase: &Arc<Phase>) -> Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..spec.importers.max(1))
        .map(|_| {
            let (client, next, phase) = (client.clone(), Arc::clone(&next), Arc::clone(phase));
            let patients = spec.patients;
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= patients {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let p = synth::patient(1, i);
                    let bytes = p.patient.encoded_len()
                        + p.records.iter().map(Message::encoded_len).sum::<usize>();
                    let bundle = ImportedBundle {
                        patient: p.patient,
                        records: p.records,
                        ..ImportedBundle::default()
                    };
                    dossier_cli::records::write_bundle(
                        &client,
                        &bundle,
                        dossier_cli::records::TRANSACTION_ENTRIES,
                    )
                    .await
                    .with_context(|| format!("import patient {i}"))?;
                    phase
                        .logical_bytes
                        .fetch_add(bytes as u64, Ordering::Relaxed);
                    phase.done.lock().await.push(Instant::now());
                    if (i + 1) % 1000 == 0 {
                        eprintln!("  imported {} of {patients} patients", i + 1);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.context("import task")??;
    }
    Ok(())
}

async fn soak(client: &Client, spec: &SoakSpec, phase: &Arc<Phase>) -> Result<u64> {
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..spec.clients.max(1))
        .map(|c| {
            let (client, phase, stop, errors) = (
                client.clone(),
                Arc::clone(phase),
                Arc::clone(&stop),
                Arc::clone(&errors),
            );
            let patients = spec.patients;
            tokio::spawn(async move {
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let pid = synth::patient_id(1, (c as u64 * 7919 + k * 104_729) % patients);
                    let record = synth::observation(format!("soak-{c}-{k}"), k);
                    let bytes = record.encoded_len() as u64;
                    match client
                        .create_record(&pid, record, &WriteOptions::default())
                        .await
                    {
                        Ok(_) => {
                            phase.logical_bytes.fetch_add(bytes, Ordering::Relaxed);
                            phase.done.lock().await.push(Instant::now());
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    k += 1;
                }
            })
        })
        .collect();
    let started = Instant::now();
    let total = Duration::from_secs(spec.seconds);
    while started.elapsed() < total {
        tokio::time::sleep(Duration::from_secs(30).min(total - started.elapsed())).await;
        eprintln!(
            "  soak: {} s, {} appends",
            started.elapsed().as_secs(),
            phase.done.lock().await.len()
        );
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.context("soak task")?;
    }
    Ok(errors.load(Ordering::Relaxed))
}

/// Waits until node `id` is caught up, at most `limit`; returns the time it took from `since`.
async fn wait_caught_up(seeds: &[String], id: u64, since: Instant, limit: Duration) -> Result<f64> {
    loop {
        if caught_up(seeds, id).await {
            return Ok(since.elapsed().as_secs_f64());
        }
        anyhow::ensure!(
            since.elapsed() < limit,
            "node {id} did not catch up within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn run(dir: &Path, spec: &SoakSpec) -> Result<Vec<String>> {
    let mut lines = Vec::new();
    eprintln!(
        "soak: 3 nodes, {} shards; importing {} patients with {} importers",
        spec.shards, spec.patients, spec.importers
    );
    let mut cluster = LocalCluster::start(dir, spec.shards, spec.base_port, None, true).await?;
    let seeds = cluster.seeds.clone();
    let client = cluster.client.clone();

    let imported = Arc::new(Phase::default());
    let start = Instant::now();
    import(&client, spec, &imported).await?;
    let end = Instant::now();
    let all = tenths(&imported.done.lock().await, start, end);
    let (first, last) = (all[0], all[9]);
    lines.push(
        Json::new("soak-import")
            .str("tenths_per_s", &rates(&all))
            .num("patients", spec.patients as f64)
            .num("seconds", (end - start).as_secs_f64())
            .num(
                "patients_per_s",
                spec.patients as f64 / (end - start).as_secs_f64(),
            )
            .num("first_tenth_per_s", first)
            .num("last_tenth_per_s", last)
            .num("decline_percent", decline_percent(first, last))
            .num(
                "logical_bytes",
                imported.logical_bytes.load(Ordering::Relaxed) as f64,
            )
            .finish(),
    );
    eprintln!("{}", lines.last().expect("pushed"));

    eprintln!(
        "soak: {} clients append observations for {} s",
        spec.clients, spec.seconds
    );
    let appended = Arc::new(Phase::default());
    let start = Instant::now();
    let errors = soak(&client, spec, &appended).await?;
    let end = Instant::now();
    let done = appended.done.lock().await.len();
    let all = tenths(&appended.done.lock().await, start, end);
    let (first, last) = (all[0], all[9]);
    lines.push(
        Json::new("soak-append")
            .str("tenths_per_s", &rates(&all))
            .num("clients", spec.clients as f64)
            .num("seconds", (end - start).as_secs_f64())
            .num("ops", done as f64)
            .num("ops_per_s", done as f64 / (end - start).as_secs_f64())
            .num("first_tenth_per_s", first)
            .num("last_tenth_per_s", last)
            .num("decline_percent", decline_percent(first, last))
            .num("errors", errors as f64)
            .finish(),
    );
    eprintln!("{}", lines.last().expect("pushed"));

    let logical = (imported.logical_bytes.load(Ordering::Relaxed)
        + appended.logical_bytes.load(Ordering::Relaxed)) as f64;
    let status = ops::status(&seeds, false).await?;
    for p in &cluster.local.procs {
        let (state_bytes, log_bytes) = status
            .disk
            .get(&p.id)
            .copied()
            .with_context(|| format!("node {} did not answer", p.id))?;
        let rss = p.pid().and_then(peak_rss).unwrap_or(0);
        // Copies of shards made so far: only for peers that needed one (none on a healthy run).
        let sent = metric(&p.http, "dossier_snapshot_sent_bytes_total").await;
        let reclaimed = metric(&p.http, "dossier_log_reclaimed_bytes_total").await;
        lines.push(
            Json::new("soak-footprint")
                .num("node", p.id as f64)
                .num("logical_bytes", logical)
                .num("state_bytes", state_bytes as f64)
                .num("log_bytes", log_bytes as f64)
                .num(
                    "disk_per_logical_byte",
                    (state_bytes + log_bytes) as f64 / logical,
                )
                .num("peak_rss_bytes", rss as f64)
                .num("snapshot_bytes_sent", sent)
                .num("log_reclaimed_bytes", reclaimed)
                .finish(),
        );
        eprintln!("{}", lines.last().expect("pushed"));
    }

    let node = cluster.local.node_mut(3).context("node 3")?;
    node.kill9();
    let restarted = Instant::now();
    node.spawn()?;
    node.wait_http_ok("readyz", Duration::from_secs(300))
        .await?;
    let ready = restarted.elapsed().as_secs_f64();
    let caught = wait_caught_up(&seeds, 3, restarted, Duration::from_secs(600)).await?;
    lines.push(
        Json::new("soak-restart")
            .num("ready_s", ready)
            .num("caught_up_s", caught)
            .finish(),
    );
    eprintln!("{}", lines.last().expect("pushed"));

    let node = cluster.local.node_mut(3).context("node 3")?;
    node.kill9();
    std::fs::remove_dir_all(&node.data).with_context(|| format!("wipe {}", node.data.display()))?;
    let wiped = Instant::now();
    node.spawn()?;
    let http = node.http.clone();
    let rebuilt = wait_caught_up(&seeds, 3, wiped, Duration::from_secs(1800)).await?;
    let bytes = metric(&http, "dossier_snapshot_received_bytes_total").await;
    let seconds = metric(&http, "dossier_snapshot_receive_seconds_total").await;
    lines.push(
        Json::new("soak-rebuild")
            .num("rebuilt_s", rebuilt)
            .num("snapshot_bytes", bytes)
            .num("snapshot_seconds", seconds)
            .num("snapshot_mb_per_s", bytes / 1e6 / seconds.max(1e-9))
            .finish(),
    );
    eprintln!("{}", lines.last().expect("pushed"));
    drop(cluster);
    Ok(lines)
}
