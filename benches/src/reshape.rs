//! The cluster changes shape under load: a fourth node joins and takes its share (the placement
//! driver moves replicas onto it), a replica is moved by hand, a shard splits, the fourth node is
//! removed again (its replicas move back), and a standby node joins (a non-voting copy of every
//! shard), while closed-loop clients read and write. Each change is measured against the baseline
//! window just before it (the same load on the shape the change starts from): throughput and p99
//! in a window starting at the change (at least `window` long, longer if the change takes
//! longer), failed requests, and how long the change took. Each baseline is also compared with
//! the first, which shows the drift of the whole run.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dossier_cli::procs::NodeProc;
use dossier_cli::{elastic, ops};
use dossier_records::synth::Rng;

use crate::cluster::LocalCluster;
use crate::stats::{Json, Latency};

/// What one run asks for.
#[derive(Debug, Clone)]
pub struct ReshapeSpec {
    pub clients: usize,
    /// Share of linearizable gets; the rest are puts of 256 bytes.
    pub read_percent: u8,
    pub patients: usize,
    /// The shortest measuring window of a change, and the length of each baseline window.
    pub window: Duration,
}

/// One request as the clients saw it.
#[derive(Debug, Clone, Copy)]
struct Sample {
    started: Instant,
    took: Duration,
    ok: bool,
}

/// One measured window.
struct Phase {
    name: String,
    from: Instant,
    to: Instant,
    /// How long the change itself took (none for baselines).
    change: Option<Duration>,
}

/// Joins, moves, splits and removes under load; returns the report lines (JSON, then a table).
pub async fn reshape(
    dir: &Path,
    shards: u32,
    base_port: u16,
    spec: &ReshapeSpec,
) -> Result<Vec<String>> {
    let mut cluster = LocalCluster::start(dir, shards, base_port, None, true).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let value = vec![7u8; 256];
    let tasks: Vec<_> = (0..spec.clients)
        .map(|c| {
            let (client, stop, samples, value) = (
                cluster.client.clone(),
                Arc::clone(&stop),
                Arc::clone(&samples),
                value.clone(),
            );
            let (patients, read_percent) = (spec.patients.max(1), spec.read_percent);
            tokio::spawn(async move {
                let mut rng = Rng(0x5e5a ^ (c as u64).wrapping_mul(0x9e37_79b9));
                let mut mine = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let patient = format!("reshape-{}", rng.next_u64() % patients as u64);
                    let started = Instant::now();
                    let ok = if rng.next_u64() % 100 < u64::from(read_percent) {
                        client.get(&patient, b"k").await.is_ok()
                    } else {
                        client.put(&patient, b"k", &value).await.is_ok()
                    };
                    mine.push(Sample {
                        started,
                        took: started.elapsed(),
                        ok,
                    });
                    if mine.len() >= 4096 {
                        samples
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .append(&mut mine);
                    }
                }
                samples
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .append(&mut mine);
            })
        })
        .collect();
    let mut phases = Vec::new();
    // Warm up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    phases.push(baseline("baseline", spec.window).await);

    // A fourth node joins and takes its share.
    let id = 4u64;
    let mut joiner = joining(dir, base_port, id, &cluster.seeds, &[])?;
    let from = Instant::now();
    joiner.spawn()?;
    wait_share_taken(&cluster.seeds, id, Duration::from_secs(300)).await?;
    phases.push(timed("join: node 4 takes its share", from, spec.window).await);

    phases.push(baseline("baseline", spec.window).await);

    // One replica moved by hand (from node 4 to the node holding the fewest replicas that has
    // none of that shard); the placement driver may move one back afterwards, inside the window.
    let status = ops::status(&cluster.seeds, false).await?;
    let d = status
        .map
        .shards
        .iter()
        .find(|d| d.replicas.contains(&id))
        .context("node 4 holds a replica")?
        .clone();
    let to = (1..=3u64)
        .find(|n| !d.replicas.contains(n))
        .context("a node without the shard")?;
    let from = Instant::now();
    elastic::move_replica(&cluster.seeds, d.shard_id, id, to).await?;
    phases.push(
        timed(
            &format!("move: shard {} from node {id} to node {to}", d.shard_id),
            from,
            spec.window,
        )
        .await,
    );
    settle(&cluster.seeds).await?;

    phases.push(baseline("baseline", spec.window).await);

    // A shard splits at its middle patient.
    let from = Instant::now();
    let (left, right) = elastic::split_shard(&cluster.seeds, 1, 0).await?;
    phases.push(
        timed(
            &format!(
                "split: shard {} into {} and {}",
                left.shard_id, left.shard_id, right.shard_id
            ),
            from,
            spec.window,
        )
        .await,
    );
    settle(&cluster.seeds).await?;

    phases.push(baseline("baseline", spec.window).await);

    // Node 4 is removed: its replicas move to the other nodes.
    let from = Instant::now();
    elastic::remove_node(&cluster.seeds, id).await?;
    elastic::wait_removed(&cluster.seeds, id, Duration::from_secs(300)).await?;
    phases.push(timed("remove: node 4 drained and removed", from, spec.window).await);

    // A standby node joins (zone "dr"): the placement driver gives it a non-voting copy of every
    // shard.
    phases.push(baseline("baseline", spec.window).await);
    let standby_id = 5u64;
    let mut standby = joining(
        dir,
        base_port,
        standby_id,
        &cluster.seeds,
        &["--standby", "--zone", "dr"],
    )?;
    let from = Instant::now();
    standby.spawn()?;
    wait_standbys(&cluster.seeds, standby_id, Duration::from_secs(300)).await?;
    phases.push(
        timed(
            "standby: node 5 holds every shard's standby",
            from,
            spec.window,
        )
        .await,
    );

    phases.push(baseline("baseline again", spec.window).await);

    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    tokio::task::block_in_place(|| {
        joiner.terminate(Duration::from_secs(30));
        standby.terminate(Duration::from_secs(30));
        for p in &mut cluster.local.procs {
            p.terminate(Duration::from_secs(30));
        }
    });
    let samples = Arc::try_unwrap(samples)
        .map_err(|_| anyhow::anyhow!("load tasks still hold the samples"))?
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    Ok(report(&phases, &samples, shards, spec))
}

/// Node `id` of the run, started with `--join` through `seeds` and `extra` flags.
fn joining(
    dir: &Path,
    base_port: u16,
    id: u64,
    seeds: &[String],
    extra: &[&str],
) -> Result<NodeProc> {
    let mut node = dossier_cli::procs::LocalCluster::node(
        base_port,
        id,
        dir.join(format!("node-{id}")),
        dossier_cli::procs::node_binary(None)?,
        false,
    )?;
    node.extra_args = ["--join".to_owned(), seeds.join(",")]
        .into_iter()
        .chain(extra.iter().map(|a| (*a).to_owned()))
        .collect();
    Ok(node)
}

/// A baseline window of `window` from now.
async fn baseline(name: &str, window: Duration) -> Phase {
    let from = Instant::now();
    tokio::time::sleep(window).await;
    Phase {
        name: name.to_owned(),
        from,
        to: Instant::now(),
        change: None,
    }
}

/// Waits until every shard lists node `id` among its standbys.
async fn wait_standbys(seeds: &[String], id: u64, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let map = ops::fresh_map(seeds).await?;
        if map.shards.iter().all(|d| d.standbys.contains(&id)) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "node {id} is not every shard's standby within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A phase from `from` to now, at least `window` long (it waits out the rest).
async fn timed(name: &str, from: Instant, window: Duration) -> Phase {
    let change = from.elapsed();
    if change < window {
        tokio::time::sleep(window - change).await;
    }
    Phase {
        name: name.to_owned(),
        from,
        to: Instant::now(),
        change: Some(change),
    }
}

/// Waits until no move is in progress.
async fn settle(seeds: &[String]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let map = ops::fresh_map(seeds).await?;
        if map.shards.iter().all(|d| d.learners.is_empty()) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "moves still in progress after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until node `id` has taken its share (`ops::Share::taken`).
async fn wait_share_taken(seeds: &[String], id: u64, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let status = ops::status(seeds, false).await?;
        let share = ops::Share::of(&status, id);
        if share.taken() {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "node {id} did not take its share within {limit:?} (replicas per up node {:?})",
            share.replicas_per_node
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn report(phases: &[Phase], samples: &[Sample], shards: u32, spec: &ReshapeSpec) -> Vec<String> {
    let first = phases.first().map(|p| rate(p, samples)).unwrap_or(0.0);
    let mut base = first;
    let mut out = Vec::new();
    let mut rows = Vec::new();
    for p in phases {
        // A baseline against the first (the drift), a change against the baseline before it.
        let r = rate(p, samples);
        let against = if p.change.is_none() { first } else { base };
        if p.change.is_none() {
            base = r;
        }
        let mut nanos: Vec<u64> = samples
            .iter()
            .filter(|s| s.started >= p.from && s.started < p.to)
            .map(|s| s.took.as_nanos() as u64)
            .collect();
        let failed = samples
            .iter()
            .filter(|s| !s.ok && s.started >= p.from && s.started < p.to)
            .count();
        let latency = Latency::of(&mut nanos);
        let mut j = Json::new("reshape");
        j.str("phase", &p.name)
            .num("clients", spec.clients as f64)
            .num("read_percent", f64::from(spec.read_percent))
            .num("shards", f64::from(shards))
            .num("window_s", (p.to - p.from).as_secs_f64())
            .num("change_ms", p.change.map_or(0.0, |c| c.as_millis() as f64))
            .num("ops_per_s", r.round())
            .num("of_baseline", if against > 0.0 { r / against } else { 0.0 })
            .num("failed", failed as f64)
            .latency("latency_us", latency);
        out.push(j.finish());
        rows.push(format!(
            "| {} | {} | {:.0} | {:.2} | {:.1} | {} |",
            p.name,
            p.change
                .map_or("-".to_owned(), |c| format!("{:.2}", c.as_secs_f64())),
            r,
            if against > 0.0 { r / against } else { 0.0 },
            latency.map_or(0.0, |l| l.p99 / 1000.0),
            failed
        ));
    }
    out.push("| phase | change took s | ops/s | of the baseline before (a baseline: of the first) | p99 ms | failed |".into());
    out.push("|---|---|---|---|---|---|".into());
    out.extend(rows);
    out
}

/// Completed requests per second among those started in the phase.
fn rate(p: &Phase, samples: &[Sample]) -> f64 {
    let n = samples
        .iter()
        .filter(|s| s.ok && s.started >= p.from && s.started < p.to)
        .count();
    n as f64 / (p.to - p.from).as_secs_f64().max(1e-9)
}
