//! Checkers: linearizability per register key, set integrity per set key, and availability.

pub mod linear;
pub mod set;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::history::{F, Op, Type};

/// What one key's check concluded.
#[derive(Debug, Clone, Serialize)]
pub struct KeyResult {
    pub key: String,
    pub ops: usize,
    /// "valid", "invalid" or "unknown".
    pub verdict: String,
    pub explanation: Option<String>,
}

/// Availability: the fraction of operations that completed `ok`, and the longest stretch without a
/// successful write (per key, which stands for its shard here).
#[derive(Debug, Clone, Serialize)]
pub struct Availability {
    pub ops: usize,
    pub ok: usize,
    pub fail: usize,
    pub info: usize,
    pub ok_fraction: f64,
    /// The longest stretch without a successful write on one key, over the whole run.
    pub longest_write_gap_ms: f64,
    pub longest_write_gap_key: String,
    /// The same, counting only stretches that start after the faults stopped (when known).
    pub longest_write_gap_after_faults_ms: Option<f64>,
}

/// The whole verdict of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub valid: bool,
    /// True when some key could not be decided in its time budget.
    pub unknown: bool,
    pub registers: Vec<KeyResult>,
    pub sets: Vec<set::SetResult>,
    pub availability: Availability,
    pub cas: CasCounts,
}

/// What the compare-and-set operations came to.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CasCounts {
    pub invoked: usize,
    /// Completed `ok`: the register held the expected value and took the new one.
    pub applied: usize,
    /// Completed `fail` with the condition evaluated: the register held another value.
    pub condition_failed: usize,
    /// Completed `fail` without being evaluated (refused).
    pub refused: usize,
    pub indeterminate: usize,
}

fn cas_counts(ops: &[Op]) -> CasCounts {
    let mut c = CasCounts::default();
    for op in ops.iter().filter(|o| o.f == F::Cas) {
        c.invoked += 1;
        match op.outcome {
            Type::Ok => c.applied += 1,
            Type::Fail if op.output.is_array() => c.condition_failed += 1,
            Type::Fail => c.refused += 1,
            Type::Info | Type::Invoke => c.indeterminate += 1,
        }
    }
    c
}

/// Set keys start with `s/`; any other key is a register. `faults_end` (ns, the history's clock) splits
/// availability into during and after the faults.
pub fn check(ops: &[Op], budget_per_key: Duration, faults_end: Option<u64>) -> Report {
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    let mut registers = Vec::new();
    let mut sets = Vec::new();
    for (key, key_ops) in &by_key {
        if key.starts_with("s/") {
            sets.push(set::check(key, key_ops));
        } else {
            let owned: Vec<Op> = key_ops.iter().map(|o| (*o).clone()).collect();
            let (verdict, explanation) = match linear::check(&owned, budget_per_key) {
                linear::Verdict::Valid => ("valid", None),
                linear::Verdict::Invalid { explanation } => ("invalid", Some(explanation)),
                linear::Verdict::Unknown { reason } => ("unknown", Some(reason)),
            };
            registers.push(KeyResult {
                key: (*key).to_owned(),
                ops: owned.len(),
                verdict: verdict.into(),
                explanation,
            });
        }
    }
    let availability = availability(ops, faults_end);
    let unknown = registers.iter().any(|r| r.verdict == "unknown");
    let valid =
        !unknown && registers.iter().all(|r| r.verdict == "valid") && sets.iter().all(|s| s.valid);
    Report {
        valid,
        unknown,
        registers,
        sets,
        availability,
        cas: cas_counts(ops),
    }
}

fn availability(ops: &[Op], faults_end: Option<u64>) -> Availability {
    let count = |t: Type| ops.iter().filter(|o| o.outcome == t).count();
    let (ok, fail, info) = (count(Type::Ok), count(Type::Fail), count(Type::Info));
    let mut writes: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let start = ops.iter().map(|o| o.call).min().unwrap_or(0);
    let end = ops
        .iter()
        .filter(|o| o.ret != u64::MAX)
        .map(|o| o.ret)
        .max()
        .unwrap_or(start);
    for op in ops
        .iter()
        .filter(|o| o.outcome == Type::Ok && matches!(o.f, F::Write | F::Cas | F::Add))
    {
        // The generations of a register slot (`r/0.0`, `r/0.1`, ...) take its operations in
        // turn: one timeline (so did the parts of a set key in histories before one key per
        // element, `s/0.0`, `s/0.1`, ...).
        let key = op
            .key
            .split_once('.')
            .map_or(op.key.as_str(), |(base, _)| base);
        writes.entry(key).or_default().push(op.ret);
    }
    let mut longest = (0u64, String::new());
    let mut longest_after = 0u64;
    for (key, times) in &mut writes {
        times.sort_unstable();
        let mut prev = start;
        for &t in times.iter().chain(std::iter::once(&end)) {
            let gap = t.saturating_sub(prev);
            if gap > longest.0 {
                longest = (gap, (*key).to_owned());
            }
            if faults_end.is_some_and(|f| prev >= f) {
                longest_after = longest_after.max(gap);
            }
            prev = prev.max(t);
        }
    }
    Availability {
        ops: ops.len(),
        ok,
        fail,
        info,
        ok_fraction: if ops.is_empty() {
            0.0
        } else {
            ok as f64 / ops.len() as f64
        },
        longest_write_gap_ms: longest.0 as f64 / 1e6,
        longest_write_gap_key: longest.1,
        longest_write_gap_after_faults_ms: faults_end.map(|_| longest_after as f64 / 1e6),
    }
}
