//! The closed loop every cluster measurement runs: `clients` concurrent clients, each sending its
//! next operation when the last one returns, unmeasured for a warm-up, then measured until the
//! duration or an operation count; latencies in an HDR histogram, failures counted by kind,
//! progress once a second on stderr.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;

use crate::stats::per_second;

/// How long, how many, how many clients.
#[derive(Debug, Clone, Copy)]
pub struct LoopSpec {
    pub clients: usize,
    pub warmup: Duration,
    /// Measured time; the loop also ends at `ops`.
    pub duration: Duration,
    /// Measured operations (successful or not) across all clients.
    pub ops: Option<u64>,
}

/// What the measured part of the loop saw.
#[derive(Debug)]
pub struct LoopResult {
    /// Latencies of successful operations, in microseconds.
    pub latencies: Histogram<u64>,
    /// Failed operations by kind.
    pub errors: BTreeMap<String, u64>,
    /// The units successful operations reported (records written, records read, ...).
    pub units: u64,
    pub elapsed: Duration,
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Runs the loop. `client(c)` makes client `c`'s operation: called with the operation's number
/// (from 1), it returns a future of the units done or the kind of failure.
pub async fn run<C, Op, Fut>(spec: LoopSpec, client: C) -> Result<LoopResult>
where
    C: Fn(usize) -> Op,
    Op: FnMut(u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<u64, String>> + Send,
{
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let measured = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let ops_limit = spec.ops.unwrap_or(u64::MAX);
    let tasks: Vec<_> = (0..spec.clients)
        .map(|c| {
            let mut op = client(c);
            let (measuring, stop, measured, failed) = (
                Arc::clone(&measuring),
                Arc::clone(&stop),
                Arc::clone(&measured),
                Arc::clone(&failed),
            );
            tokio::spawn(async move {
                let mut latencies = histogram();
                let mut errors: BTreeMap<String, u64> = BTreeMap::new();
                let mut units = 0u64;
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    k += 1;
                    let started = Instant::now();
                    let outcome = op(k).await;
                    if !measuring.load(Ordering::Relaxed) {
                        continue;
                    }
                    match outcome {
                        Ok(n) => {
                            units += n;
                            let us = (started.elapsed().as_micros() as u64).clamp(1, 60_000_000);
                            latencies
                                .record(us)
                                .expect("clamped into the histogram's bounds");
                        }
                        Err(kind) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            *errors.entry(kind).or_default() += 1;
                        }
                    }
                    if measured.fetch_add(1, Ordering::Relaxed) + 1 >= ops_limit {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
                (latencies, errors, units)
            })
        })
        .collect();
    tokio::time::sleep(spec.warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let mut last = (0u64, started);
    while !stop.load(Ordering::Relaxed) && started.elapsed() < spec.duration {
        let left = spec.duration.saturating_sub(started.elapsed());
        tokio::time::sleep(left.min(Duration::from_millis(100))).await;
        if last.1.elapsed() >= Duration::from_secs(1) {
            let done = measured.load(Ordering::Relaxed);
            eprintln!(
                "  {:>5.1} s: {done} ops, {:.0} ops/s in the last second, {} errors",
                started.elapsed().as_secs_f64(),
                per_second(done - last.0, last.1.elapsed()),
                failed.load(Ordering::Relaxed)
            );
            last = (done, Instant::now());
        }
    }
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut result = LoopResult {
        latencies: histogram(),
        errors: BTreeMap::new(),
        units: 0,
        elapsed,
    };
    for t in tasks {
        let (h, e, u) = t.await.context("client task")?;
        result.latencies.add(&h)?;
        result.units += u;
        for (kind, n) in e {
            *result.errors.entry(kind).or_default() += n;
        }
    }
    Ok(result)
}
