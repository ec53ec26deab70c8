//! What a cluster costs while nobody writes, and what the first write after a quiet spell costs:
//! 3 node processes with `shards` shards of 3 replicas; one write to every shard (so every group
//! has elected and committed), a settling time, then the node processes' CPU time (utime + stime
//! from /proc) and resident memory over the measured seconds. Then the latency of the first
//! write to each of up to 64 shards idle since the settling began, against the p50 of writes to
//! one shard kept busy.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dossier_cli::procs;

use crate::stats::{Json, Latency};

#[derive(Debug, Clone)]
pub struct IdleSpec {
    pub shards: u32,
    /// Quiet time before measuring (groups may go quiescent meanwhile).
    pub settle: Duration,
    pub measure: Duration,
    /// Extra `dossier-node` flags.
    pub node_args: Vec<String>,
}

/// CPU seconds (user + system) and resident bytes of a process, from /proc.
fn usage(pid: u32, ticks_per_second: f64) -> Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: f64 = fields
        .get(11..13)
        .context("short /proc stat")?
        .iter()
        .map(|f| f.parse::<f64>().unwrap_or(0.0))
        .sum();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((ticks / ticks_per_second, rss_kib * 1024))
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// One patient id per shard of the map (by the patient hash).
fn patient_per_shard(map: &dossier_api::v1::ClusterMap) -> Vec<(u64, String)> {
    let mut found: Vec<(u64, String)> = Vec::new();
    let mut i = 0u64;
    while found.len() < map.shards.len() && i < 1_000_000 {
        let p = format!("idle-{i}");
        let h = dossier_api::patient_hash(&p);
        if let Some(d) = map
            .shards
            .iter()
            .find(|d| h >= d.hash_lo && (d.hash_hi_max || h < d.hash_hi))
            && !found.iter().any(|(s, _)| *s == d.shard_id)
        {
            found.push((d.shard_id, p));
        }
        i += 1;
    }
    found.sort_unstable();
    found
}

pub async fn idle(dir: &Path, base_port: u16, spec: &IdleSpec) -> Result<Vec<String>> {
    let local = procs::LocalCluster::spawn_with(
        dir,
        3,
        base_port,
        &procs::node_binary(None)?,
        &spec.node_args,
    )
    .await?;
    local.init(spec.shards, 3).await?;
    let client = local.client_with(|_| {}).await?;
    let map = client.refresh_map().await?;
    let patients = patient_per_shard(&map);
    anyhow::ensure!(
        patients.len() == map.shards.len(),
        "no patient found for some shards"
    );
    let started = Instant::now();
    for (_, p) in &patients {
        client.put(p, b"k", b"first").await?;
    }
    eprintln!(
        "idle: one write to each of {} shards in {:.1?}; settling {:?}",
        patients.len(),
        started.elapsed(),
        spec.settle
    );
    tokio::time::sleep(spec.settle).await;
    let ticks = clock_ticks();
    let pids: Vec<u32> = local
        .procs
        .iter()
        .filter_map(procs::NodeProc::pid)
        .collect();
    let before: Vec<(f64, u64)> = pids
        .iter()
        .map(|p| usage(*p, ticks))
        .collect::<Result<_>>()?;
    let t0 = Instant::now();
    tokio::time::sleep(spec.measure).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let after: Vec<(f64, u64)> = pids
        .iter()
        .map(|p| usage(*p, ticks))
        .collect::<Result<_>>()?;
    let cpu: f64 = before.iter().zip(&after).map(|(b, a)| a.0 - b.0).sum();
    let cores = cpu / elapsed;
    let rss: u64 = after.iter().map(|a| a.1).sum();
    let replicas = u64::from(spec.shards) * 3 + 3; // data shards and the meta group
    // The first write to shards idle since the settling began, one at a time.
    let mut first = Vec::new();
    for (_, p) in patients.iter().skip(1).take(64) {
        let t = Instant::now();
        client.put(p, b"k", b"again").await?;
        first.push(t.elapsed().as_nanos() as u64);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Writes to one shard kept busy by them, one at a time.
    let busy_patient = &patients[0].1;
    let mut busy = Vec::new();
    for i in 0..400 {
        let t = Instant::now();
        client
            .put(busy_patient, b"k", format!("{i}").as_bytes())
            .await?;
        if i >= 100 {
            busy.push(t.elapsed().as_nanos() as u64);
        }
    }
    let first_l = Latency::of(&mut first);
    let busy_l = Latency::of(&mut busy);
    let p50 = |l: Option<Latency>| l.map_or(0.0, |l| l.p50 / 1000.0);
    let mut j = Json::new("idle");
    j.num("shards", f64::from(spec.shards))
        .num("settle_s", spec.settle.as_secs_f64())
        .num("measured_s", elapsed)
        .num("cores", cores)
        .num("rss_mib", rss as f64 / 1048576.0)
        .num("rss_kib_per_replica", rss as f64 / 1024.0 / replicas as f64)
        .latency("first_write_us", first_l)
        .latency("busy_write_us", busy_l);
    let lines = vec![
        j.finish(),
        "| shards | idle cores (3 nodes) | RSS MiB (3 nodes) | KiB per replica | first write to an idle shard p50 / max ms | busy shard write p50 ms |".into(),
        "|---|---|---|---|---|---|".into(),
        format!(
            "| {} | {:.3} | {:.0} | {:.0} | {:.2} / {:.2} | {:.2} |",
            spec.shards,
            cores,
            rss as f64 / 1048576.0,
            rss as f64 / 1024.0 / replicas as f64,
            p50(first_l),
            first_l.map_or(0.0, |l| l.max / 1000.0),
            p50(busy_l),
        ),
    ];
    Ok(lines)
}
