//! Measurements of the storage engine: the disk's raw fdatasync rate, the log's append path under
//! concurrency (group commit), recovery time, and index memory per million entries.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use dossier_storage::{LogConfig, LogEngine, WriteBatch};

use crate::stats::{Json, Latency, per_second};

const BLOCK: usize = 4096;

/// One raw-disk mode: 4 KiB write + fdatasync per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawMode {
    /// Appending to a growing file (what a naive log does): the size must be synced too.
    Append,
    /// Overwriting one preallocated block: data only.
    Overwrite,
}

/// Calls per second of one raw mode, and the call latencies in nanoseconds.
pub fn raw_rate(dir: &Path, mode: RawMode, duration: Duration) -> Result<(f64, Vec<u64>)> {
    let path = dir.join(format!("raw-{mode:?}"));
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .context("create raw file")?;
    if mode == RawMode::Overwrite {
        file.write_all_at(&[1u8; BLOCK], 0)
            .context("preallocate block")?;
        file.sync_all().context("sync preallocated block")?;
    }
    let block = [0xabu8; BLOCK];
    let mut lat = Vec::new();
    let started = Instant::now();
    let mut offset = 0u64;
    while started.elapsed() < duration {
        let t = Instant::now();
        file.write_all_at(&block, offset).context("write block")?;
        file.sync_data().context("fdatasync")?;
        lat.push(t.elapsed().as_nanos() as u64);
        if mode == RawMode::Append {
            offset += BLOCK as u64;
        }
    }
    let rate = per_second(lat.len() as u64, started.elapsed());
    std::fs::remove_file(&path).ok();
    Ok((rate, lat))
}

/// Raw disk limit in both modes, as JSON lines.
pub fn fsync_raw(dir: &Path, duration: Duration) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for mode in [RawMode::Append, RawMode::Overwrite] {
        let (rate, mut lat) = raw_rate(dir, mode, duration)?;
        out.push(
            Json::new("fsync-raw")
                .str("mode", &format!("{mode:?}").to_lowercase())
                .num("calls", lat.len() as f64)
                .num("seconds", duration.as_secs_f64())
                .num("fsyncs_per_s", rate)
                .latency("latency", Latency::of(&mut lat))
                .finish(),
        );
    }
    Ok(out)
}

fn log_config(dir: &Path, linger_us: u64) -> Result<Arc<LogConfig>> {
    Ok(LogConfig {
        dir: dir.to_path_buf(),
        group_commit_linger_us: linger_us,
        ..LogConfig::default()
    }
    .validate()?)
}

/// One closed-loop append measurement.
#[derive(Debug, Clone, Copy)]
pub struct AppendLoad {
    /// Logical closed-loop appenders: each keeps one append outstanding.
    pub appenders: usize,
    /// OS threads that drive the appenders (as an async runtime's workers would).
    pub threads: usize,
    pub groups: u64,
    pub entry_bytes: usize,
    pub linger_us: u64,
    pub duration: Duration,
    pub warmup: Duration,
}

/// `appenders` logical appenders, each in a closed loop appending one entry of `entry_bytes` to
/// its own groups (of `groups` in all) and waiting until it is durable before the next, driven by
/// `threads` OS threads.
pub fn append(dir: &Path, load: &AppendLoad) -> Result<(String, f64, Option<Latency>)> {
    let AppendLoad {
        appenders,
        threads,
        groups,
        entry_bytes,
        linger_us,
        duration,
        warmup,
    } = *load;
    ensure!(
        appenders > 0 && groups > 0,
        "appenders and groups must be positive"
    );
    let log_dir = dir.join(format!("append-{appenders}"));
    let engine = Arc::new(LogEngine::open(log_config(&log_dir, linger_us)?)?);
    let payload = Bytes::from(vec![0x5au8; entry_bytes]);
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let drivers = threads.clamp(1, appenders);
    let threads: Vec<_> = (0..drivers)
        .map(|d| {
            let (engine, payload, measuring, stop) = (
                Arc::clone(&engine),
                payload.clone(),
                Arc::clone(&measuring),
                Arc::clone(&stop),
            );
            // Logical appenders a with a % drivers == d, driven by this thread as tasks of an
            // async runtime would be: each keeps exactly one append outstanding.
            let mine: Vec<usize> = (0..appenders).filter(|a| a % drivers == d).collect();
            std::thread::spawn(move || -> Result<Vec<u64>> {
                // Appender a owns the groups g with g % appenders == a (or a group of its own
                // when there are more appenders than groups), so indexes stay contiguous.
                let groups_of = |a: usize| -> Vec<u64> {
                    if appenders as u64 <= groups {
                        (0..groups)
                            .filter(|g| g % appenders as u64 == a as u64)
                            .collect()
                    } else {
                        vec![groups + a as u64]
                    }
                };
                let owned: Vec<Vec<u64>> = mine.iter().map(|&a| groups_of(a)).collect();
                let mut next: Vec<Vec<u64>> = owned.iter().map(|g| vec![1u64; g.len()]).collect();
                let mut turn = vec![0usize; mine.len()];
                let (done_tx, done_rx) =
                    std::sync::mpsc::sync_channel::<(usize, Instant, dossier_storage::Result<()>)>(
                        mine.len(),
                    );
                let submit =
                    |slot: usize, next: &mut Vec<Vec<u64>>, turn: &mut Vec<usize>| -> Result<()> {
                        let k = turn[slot];
                        let mut batch = WriteBatch::new();
                        batch.append(owned[slot][k], next[slot][k], payload.clone());
                        next[slot][k] += 1;
                        turn[slot] = (k + 1) % owned[slot].len();
                        let done_tx = done_tx.clone();
                        let started = Instant::now();
                        engine.submit(
                            batch,
                            Box::new(move |r| drop(done_tx.send((slot, started, r)))),
                        )?;
                        Ok(())
                    };
                for slot in 0..mine.len() {
                    submit(slot, &mut next, &mut turn)?;
                }
                let mut lat = Vec::new();
                let mut outstanding = mine.len();
                while outstanding > 0 {
                    let (slot, started, result) =
                        done_rx.recv().context("log callbacks stopped")?;
                    result?;
                    outstanding -= 1;
                    if measuring.load(Ordering::Relaxed) {
                        lat.push(started.elapsed().as_nanos() as u64);
                    }
                    if !stop.load(Ordering::Relaxed) {
                        submit(slot, &mut next, &mut turn)?;
                        outstanding += 1;
                    }
                }
                Ok(lat)
            })
        })
        .collect();
    std::thread::sleep(warmup);
    let before = engine.stats();
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    std::thread::sleep(duration);
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let after = engine.stats();
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in threads {
        lat.extend(
            t.join()
                .map_err(|_| anyhow::anyhow!("appender panicked"))??,
        );
    }
    let entries = lat.len() as u64;
    let fsyncs = after.fsyncs - before.fsyncs;
    let fsync_us =
        (after.fsync_nanos_total - before.fsync_nanos_total) as f64 / 1000.0 / fsyncs.max(1) as f64;
    Arc::into_inner(engine)
        .context("engine still shared")?
        .close()?;
    std::fs::remove_dir_all(&log_dir).ok();
    let rate = per_second(entries, elapsed);
    let latency = Latency::of(&mut lat);
    let json = Json::new("log-append")
        .num("appenders", appenders as f64)
        .num("threads", drivers as f64)
        .num("groups", groups as f64)
        .num("entry_bytes", entry_bytes as f64)
        .num("linger_us", linger_us as f64)
        .num("seconds", elapsed.as_secs_f64())
        .num("entries", entries as f64)
        .num("entries_per_s", rate)
        .num("fsyncs_per_s", per_second(fsyncs, elapsed))
        .num("entries_per_fsync", entries as f64 / fsyncs.max(1) as f64)
        .num("fsync_mean_us", fsync_us)
        .latency("latency", latency)
        .finish();
    Ok((json, rate, latency))
}

fn rss_bytes() -> Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").context("read /proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .context("statm has a resident field")?
        .parse()?;
    Ok(pages * 4096)
}

/// Fills a log of `log_bytes` with `entry_bytes` entries over `groups` groups, reopens it and
/// times recovery; reports index memory per million entries (the engine's own estimate and the
/// growth of resident memory across the open).
pub fn recovery(
    dir: &Path,
    log_bytes: u64,
    groups: u64,
    entry_bytes: usize,
) -> Result<Vec<String>> {
    let log_dir = dir.join("recovery");
    let config = log_config(&log_dir, LogConfig::default().group_commit_linger_us)?;
    let payload = Bytes::from(vec![0x33u8; entry_bytes]);
    let frame_bytes = (entry_bytes + 8 + 17) as u64;
    let total = log_bytes / frame_bytes;
    let per_group = total / groups;
    {
        let engine = LogEngine::open(Arc::clone(&config))?;
        let started = Instant::now();
        let mut last_report = Instant::now();
        let (tx, rx) = std::sync::mpsc::sync_channel::<dossier_storage::Result<()>>(64);
        let mut in_flight = 0;
        let batch_entries = 64u64;
        for first in (1..=per_group).step_by(batch_entries as usize) {
            for group in 0..groups {
                let mut batch = WriteBatch::new();
                for index in first..(first + batch_entries).min(per_group + 1) {
                    batch.append(group, index, payload.clone());
                }
                if in_flight == 64 {
                    rx.recv().context("writer gone")??;
                    in_flight -= 1;
                }
                let tx = tx.clone();
                engine.submit(batch, Box::new(move |r| drop(tx.send(r))))?;
                in_flight += 1;
            }
            if last_report.elapsed() > Duration::from_secs(2) {
                eprintln!("  filling: {:.0}%", 100.0 * first as f64 / per_group as f64);
                last_report = Instant::now();
            }
        }
        for _ in 0..in_flight {
            rx.recv().context("writer gone")??;
        }
        eprintln!(
            "  filled {} entries in {:.1?}",
            per_group * groups,
            started.elapsed()
        );
        engine.close()?;
    }
    let on_disk: u64 = std::fs::read_dir(&log_dir)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    // Drop the page cache when allowed so that recovery reads from the disk; say which it was.
    let cold = std::fs::write("/proc/sys/vm/drop_caches", "1").is_ok();
    let rss_before = rss_bytes()?;
    let started = Instant::now();
    let engine = LogEngine::open(Arc::clone(&config))?;
    let elapsed = started.elapsed();
    let rss_after = rss_bytes()?;
    let stats = engine.stats();
    let entries = per_group * groups;
    let million = entries as f64 / 1e6;
    engine.close()?;
    std::fs::remove_dir_all(&log_dir).ok();
    Ok(vec![
        Json::new("log-recovery")
            .num("log_bytes", on_disk as f64)
            .num("entries", entries as f64)
            .num("groups", groups as f64)
            .num("segments", stats.segments as f64)
            .str("page_cache", if cold { "dropped" } else { "warm" })
            .num("seconds", elapsed.as_secs_f64())
            .num(
                "mib_per_s",
                on_disk as f64 / (1 << 20) as f64 / elapsed.as_secs_f64(),
            )
            .finish(),
        Json::new("log-index-memory")
            .num("entries", entries as f64)
            .num(
                "index_bytes_per_million_entries",
                stats.index_bytes as f64 / million,
            )
            .num(
                "rss_growth_bytes_per_million_entries",
                rss_after.saturating_sub(rss_before) as f64 / million,
            )
            .finish(),
    ])
}

/// Group commit judged against the disk in one run: rounds alternate a raw append+fdatasync
/// measurement with the engine at each linger setting, so that drift of the disk hits both.
pub fn ratio(dir: &Path, rounds: usize, load: &AppendLoad, lingers: &[u64]) -> Result<Vec<String>> {
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); lingers.len()];
    let mut p50s: Vec<Vec<f64>> = vec![Vec::new(); lingers.len()];
    let mut p99s: Vec<Vec<f64>> = vec![Vec::new(); lingers.len()];
    let mut out = Vec::new();
    for round in 1..=rounds {
        let (raw, mut raw_lat) = raw_rate(dir, RawMode::Append, load.duration)?;
        let raw_lat = Latency::of(&mut raw_lat).context("no raw calls")?;
        for (k, &linger_us) in lingers.iter().enumerate() {
            let (_, rate, lat) = append(dir, &AppendLoad { linger_us, ..*load })?;
            let lat = lat.context("no appends completed")?;
            ratios[k].push(rate / raw);
            p50s[k].push(lat.p50 / raw_lat.p50);
            p99s[k].push(lat.p99 / raw_lat.p99);
            eprintln!(
                "  round {round}: raw {raw:.0} fsyncs/s, linger {linger_us} us: {rate:.0} entries/s = {:.1}x",
                rate / raw
            );
            out.push(
                Json::new("log-append-ratio")
                    .num("round", round as f64)
                    .num("appenders", load.appenders as f64)
                    .num("linger_us", linger_us as f64)
                    .num("raw_fsyncs_per_s", raw)
                    .num("entries_per_s", rate)
                    .num("ratio", rate / raw)
                    .num("raw_p50_us", raw_lat.p50)
                    .num("raw_p99_us", raw_lat.p99)
                    .num("p50_us", lat.p50)
                    .num("p99_us", lat.p99)
                    .finish(),
            );
        }
    }
    for (k, &linger_us) in lingers.iter().enumerate() {
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (p50_ratio, p99_ratio) = (median(&mut p50s[k]), median(&mut p99s[k]));
        let r = &mut ratios[k];
        r.sort_by(f64::total_cmp);
        out.push(
            Json::new("log-append-ratio-summary")
                .num("appenders", load.appenders as f64)
                .num("linger_us", linger_us as f64)
                .num("rounds", r.len() as f64)
                .num("ratio_min", r[0])
                .num("ratio_median", r[r.len() / 2])
                .num("ratio_max", r[r.len() - 1])
                .num("p50_vs_raw_median", p50_ratio)
                .num("p99_vs_raw_median", p99_ratio)
                .finish(),
        );
    }
    Ok(out)
}
