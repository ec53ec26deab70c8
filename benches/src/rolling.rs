//! Planned maintenance under load: every node of a 3-node cluster restarted in turn with SIGTERM
//! (its leaderships are handed over first) while closed-loop clients read and write. The
//! coffee-break rule says such maintenance fails no request; this measures failed requests, the
//! longest any single request took, the longest stretch in which no request completed, and how
//! long each restarted node took to lead again.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dossier_cli::ops;
use dossier_records::synth::Rng;

use crate::cluster::LocalCluster;

/// What one rolling restart asks for.
#[derive(Debug, Clone)]
pub struct RollingSpec {
    pub clients: usize,
    /// Share of linearizable gets; the rest are puts.
    pub read_percent: u8,
    pub patients: usize,
    /// Load before the first restart and after each node is back, before the next.
    pub settle: Duration,
    /// How long a stopping node may take before it is SIGKILLed (then the run fails).
    pub stop_grace: Duration,
}

/// What the clients saw.
#[derive(Debug, Default)]
struct Observed {
    completions: Vec<Instant>,
    slowest: Duration,
    failures: Vec<String>,
}

/// Restarts every node in turn under load; returns the report lines (JSON, then a table).
pub async fn rolling_restart(
    dir: &Path,
    shards: u32,
    base_port: u16,
    spec: &RollingSpec,
) -> Result<Vec<String>> {
    let mut cluster = LocalCluster::start(dir, shards, base_port, None, true).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let observed: Arc<Mutex<Observed>> = Arc::default();
    let ops_done = Arc::new(AtomicU64::new(0));
    let value = vec![7u8; 256];
    let tasks: Vec<_> = (0..spec.clients)
        .map(|c| {
            let (client, stop, observed, ops_done, value) = (
                cluster.client.clone(),
                Arc::clone(&stop),
                Arc::clone(&observed),
                Arc::clone(&ops_done),
                value.clone(),
            );
            let (patients, read_percent) = (spec.patients.max(1), spec.read_percent);
            tokio::spawn(async move {
                let mut rng = Rng(0x7011 ^ (c as u64).wrapping_mul(0x9e37_79b9));
                while !stop.load(Ordering::Relaxed) {
                    let patient = format!("rolling-{}", rng.next_u64() % patients as u64);
                    let started = Instant::now();
                    let result = if rng.next_u64() % 100 < u64::from(read_percent) {
                        client.get(&patient, b"k").await.map(|_| ())
                    } else {
                        client.put(&patient, b"k", &value).await.map(|_| ())
                    };
                    let took = started.elapsed();
                    ops_done.fetch_add(1, Ordering::Relaxed);
                    let mut o = observed.lock().unwrap_or_else(|e| e.into_inner());
                    match result {
                        Ok(()) => {
                            o.completions.push(Instant::now());
                            o.slowest = o.slowest.max(took);
                        }
                        Err(e) => o.failures.push(format!("{patient}: {e}")),
                    }
                }
            })
        })
        .collect();
    let started = Instant::now();
    tokio::time::sleep(spec.settle).await;
    let mut restarts = Vec::new();
    let ids: Vec<u64> = cluster.local.procs.iter().map(|p| p.id).collect();
    for id in ids {
        let led_before = leaders_per_node(&cluster.seeds).await?;
        let node = cluster.local.node_mut(id).context("node process")?;
        let stopping = Instant::now();
        let grace = spec.stop_grace;
        tokio::task::block_in_place(|| node.terminate(grace));
        let stopped_in = stopping.elapsed();
        anyhow::ensure!(
            stopped_in < grace,
            "node {id} did not stop within {grace:?} of SIGTERM (it was SIGKILLed)"
        );
        node.spawn()?;
        node.wait_http_ok("readyz", Duration::from_secs(60)).await?;
        let back = stopping.elapsed();
        // Its preferred leaderships come back once it has caught up (node/src/leadership.rs).
        let deadline = Instant::now() + Duration::from_secs(60);
        let leads_again = loop {
            let led = leaders_per_node(&cluster.seeds).await?;
            if led.get(&id).copied().unwrap_or(0) >= led_before.get(&id).copied().unwrap_or(0) {
                break Some(stopping.elapsed());
            }
            if Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        restarts.push((id, stopped_in, back, leads_again, led_before));
        tokio::time::sleep(spec.settle).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed();
    let led_after = leaders_per_node(&cluster.seeds).await?;
    tokio::task::block_in_place(|| {
        for p in &mut cluster.local.procs {
            p.terminate(spec.stop_grace);
        }
    });
    let mut o = Arc::try_unwrap(observed)
        .map_err(|_| anyhow::anyhow!("load tasks still hold the results"))?
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    o.completions.sort_unstable();
    let longest_pause = o
        .completions
        .windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .max()
        .unwrap_or_default();
    let total = ops_done.load(Ordering::Relaxed);
    let mut out = Vec::new();
    for (id, stopped_in, back, leads_again, before) in &restarts {
        out.push(format!(
            "{{\"measurement\": \"rolling-restart\", \"node\": {id}, \"stopped_ms\": {}, \"ready_again_ms\": {}, \"leads_again_ms\": {}, \"leaders_before\": {}}}",
            stopped_in.as_millis(),
            back.as_millis(),
            leads_again.map_or("null".to_owned(), |d| d.as_millis().to_string()),
            before.get(id).copied().unwrap_or(0)
        ));
    }
    out.push(format!(
        "{{\"measurement\": \"rolling-restart\", \"clients\": {}, \"read_percent\": {}, \"shards\": {shards}, \"seconds\": {:.1}, \"requests\": {total}, \"failed\": {}, \"slowest_request_ms\": {}, \"longest_pause_ms\": {}, \"leaders_after\": \"{led_after:?}\"}}",
        spec.clients,
        spec.read_percent,
        elapsed.as_secs_f64(),
        o.failures.len(),
        o.slowest.as_millis(),
        longest_pause.as_millis()
    ));
    out.push(
        "| node restarted | stopped in ms | ready again ms | leads its share again ms |".into(),
    );
    out.push("|---|---|---|---|".into());
    for (id, stopped_in, back, leads_again, _) in &restarts {
        out.push(format!(
            "| {id} | {} | {} | {} |",
            stopped_in.as_millis(),
            back.as_millis(),
            leads_again.map_or("not within 60 s".to_owned(), |d| d.as_millis().to_string())
        ));
    }
    out.push(format!(
        "{total} requests ({}% gets) by {} clients over {:.1} s: {} failed, slowest {} ms, longest stretch without a completed request {} ms; leaders per node at the end {led_after:?}",
        spec.read_percent,
        spec.clients,
        elapsed.as_secs_f64(),
        o.failures.len(),
        o.slowest.as_millis(),
        longest_pause.as_millis()
    ));
    for f in o.failures.iter().take(10) {
        out.push(format!("failed: {f}"));
    }
    Ok(out)
}

/// How many shards each node leads, by every reachable node's own view.
async fn leaders_per_node(seeds: &[String]) -> Result<BTreeMap<u64, usize>> {
    let status = ops::status(seeds, false).await?;
    let mut led = BTreeMap::new();
    for d in &status.map.shards {
        if let Some(leader) = ops::leader_of(&status.replicas, d.shard_id) {
            *led.entry(leader.node_id).or_default() += 1;
        }
    }
    Ok(led)
}
