//! The set workload's checker. A set only grows (one key per element, never removed), and each
//! page of a read is a linearizable scan of its own key range taken after the read began, so:
//!
//! - **lost**: an acknowledged add missing from the final read (the last `ok` read, after the
//!   cluster healed);
//! - **stale reads**: a read (intermediate or final) missing an element that was certainly there
//!   before the read began: its add was acknowledged, or an earlier read that returned before this
//!   one began saw it. The pages of a read cover the key space without overlap, so the page whose
//!   range holds that element's key was taken after it was stored and must list it;
//! - **unexpected**: an element read that no add could have stored: never attempted on this set,
//!   attempted only after the read returned, or whose add certainly failed;
//! - **duplicates**: an element listed twice by one read, or an add told its key was already
//!   there (elements are unique, so it had been applied before: an exactly-once retry applied
//!   twice);
//! - **malformed**: an item whose key and value do not name the same element.
//!
//! Indeterminate adds may or may not be there.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::history::{F, Op, Type};

/// Elements listed per stale read in the report.
const EXAMPLES: usize = 10;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StaleRead {
    /// Its call and return, in ms since the start of the history's clock.
    pub call_ms: f64,
    pub ret_ms: f64,
    /// How many elements certainly there before it began it did not list, and the first few.
    pub missing: usize,
    pub examples: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SetResult {
    pub key: String,
    pub valid: bool,
    pub acknowledged: usize,
    pub indeterminate: usize,
    /// Elements in the final read.
    pub read: usize,
    /// `ok` reads checked, the final one included.
    pub reads: usize,
    /// Acknowledged adds missing from the final read.
    pub lost: Vec<i64>,
    /// Elements read that no add could have stored.
    pub unexpected: Vec<i64>,
    /// Elements listed twice by a read, or added twice.
    pub duplicates: Vec<i64>,
    /// Reads that missed elements certainly there before they began.
    pub stale_reads: Vec<StaleRead>,
    /// Items that do not name an element.
    pub malformed: Vec<String>,
    /// Set when there is no final read to judge by.
    pub missing_final_read: bool,
}

/// One `ok` read: its interval and its elements, sorted.
struct Read {
    call: u64,
    ret: u64,
    elements: Vec<i64>,
}

/// Checks one set key: its adds and its `ok` reads.
pub fn check(key: &str, ops: &[&Op]) -> SetResult {
    // Element → its add's call; acknowledged adds with their return; indeterminate; failed.
    let mut called: BTreeMap<i64, u64> = BTreeMap::new();
    let mut acked: Vec<(u64, i64)> = Vec::new();
    let mut info = BTreeSet::new();
    let mut failed = BTreeSet::new();
    let mut duplicates = BTreeSet::new();
    for op in ops.iter().filter(|o| o.f == F::Add) {
        let Some(e) = op.input.as_i64() else { continue };
        let call = called.entry(e).or_insert(op.call);
        *call = (*call).min(op.call);
        match op.outcome {
            Type::Ok => {
                acked.push((op.ret, e));
                if op.output.as_str() == Some("present") {
                    duplicates.insert(e);
                }
            }
            Type::Info | Type::Invoke => {
                info.insert(e);
            }
            Type::Fail => {
                failed.insert(e);
            }
        }
    }
    let ok_adds: BTreeSet<i64> = acked.iter().map(|&(_, e)| e).collect();
    let mut malformed = Vec::new();
    let mut reads: Vec<Read> = Vec::new();
    for op in ops
        .iter()
        .filter(|o| o.f == F::Read && o.outcome == Type::Ok)
    {
        let mut elements = Vec::new();
        for v in op.output.as_array().map(Vec::as_slice).unwrap_or_default() {
            match v.as_i64() {
                Some(e) => elements.push(e),
                None => malformed.push(v.as_str().map_or_else(|| v.to_string(), str::to_owned)),
            }
        }
        elements.sort_unstable();
        for w in elements.windows(2) {
            if w[0] == w[1] {
                duplicates.insert(w[0]);
            }
        }
        elements.dedup();
        reads.push(Read {
            call: op.call,
            ret: op.ret,
            elements,
        });
    }
    let mut unexpected = BTreeSet::new();
    for r in &reads {
        for e in &r.elements {
            let possible = called.get(e).is_some_and(|&call| call < r.ret)
                && (ok_adds.contains(e) || info.contains(e) || !failed.contains(e));
            if !possible {
                unexpected.insert(*e);
            }
        }
    }
    let stale_reads = stale(&acked, &reads);
    // The final read is the last `ok` read, and judges losses only if it began after every
    // acknowledged add returned (the run's final reads do); an earlier read, left last because
    // the final ones failed, would count later adds as lost.
    let last_ack = acked.iter().map(|&(ret, _)| ret).max();
    let final_read = reads
        .iter()
        .max_by_key(|r| r.ret)
        .filter(|r| last_ack.is_none_or(|ack| ack < r.call));
    let mut result = SetResult {
        key: key.to_owned(),
        valid: false,
        acknowledged: ok_adds.len(),
        indeterminate: info.len(),
        read: final_read.map_or(0, |r| r.elements.len()),
        reads: reads.len(),
        lost: Vec::new(),
        unexpected: unexpected.into_iter().collect(),
        duplicates: duplicates.into_iter().collect(),
        stale_reads,
        malformed,
        missing_final_read: final_read.is_none(),
    };
    if let Some(read) = final_read {
        result.lost = ok_adds
            .iter()
            .filter(|e| read.elements.binary_search(e).is_err())
            .copied()
            .collect();
        result.valid = result.lost.is_empty()
            && result.unexpected.is_empty()
            && result.duplicates.is_empty()
            && result.stale_reads.is_empty()
            && result.malformed.is_empty();
    }
    result
}

/// Every read missing an element certainly stored before it began: acknowledged before its call,
/// or listed by a read that returned before its call.
fn stale(acked: &[(u64, i64)], reads: &[Read]) -> Vec<StaleRead> {
    // What became certain, and when: (time, element), sorted by time.
    let mut known: Vec<(u64, i64)> = acked.to_vec();
    for r in reads {
        known.extend(r.elements.iter().map(|&e| (r.ret, e)));
    }
    known.sort_unstable();
    let mut order: Vec<&Read> = reads.iter().collect();
    order.sort_by_key(|r| r.call);
    let mut present = BTreeSet::new();
    let mut next = 0;
    let mut out = Vec::new();
    for r in order {
        while let Some(&(t, e)) = known.get(next) {
            if t >= r.call {
                break;
            }
            present.insert(e);
            next += 1;
        }
        let mut missing = present
            .iter()
            .filter(|e| r.elements.binary_search(e).is_err());
        let examples: Vec<i64> = missing.by_ref().take(EXAMPLES).copied().collect();
        if !examples.is_empty() {
            out.push(StaleRead {
                call_ms: r.call as f64 / 1e6,
                ret_ms: r.ret as f64 / 1e6,
                missing: examples.len() + missing.count(),
                examples,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn add(e: i64, outcome: Type, t: u64) -> Op {
        Op {
            process: 1,
            f: F::Add,
            key: "s".into(),
            input: json!(e),
            output: if outcome == Type::Ok {
                json!(e)
            } else {
                Value::Null
            },
            outcome,
            call: t,
            ret: if outcome == Type::Info {
                u64::MAX
            } else {
                t + 1
            },
        }
    }

    fn read(elements: Value, call: u64, ret: u64) -> Op {
        Op {
            process: 9,
            f: F::Read,
            key: "s".into(),
            input: Value::Null,
            output: elements,
            outcome: Type::Ok,
            call,
            ret,
        }
    }

    fn run(ops: &[Op]) -> SetResult {
        let refs: Vec<&Op> = ops.iter().collect();
        check("s", &refs)
    }

    /// Lost, unexpected and duplicated elements are each reported; indeterminate adds are allowed
    /// either way.
    #[test]
    fn set_faults_are_reported() {
        let ops = [
            add(1, Type::Ok, 0),
            add(2, Type::Ok, 2),
            add(3, Type::Info, 4),
            add(4, Type::Fail, 6),
            read(json!([1, 2]), 10, 11),
        ];
        assert!(run(&ops).valid);
        let ops = [
            add(1, Type::Ok, 0),
            add(2, Type::Ok, 2),
            read(json!([1, 1, 5]), 10, 11),
        ];
        let r = run(&ops);
        assert!(!r.valid);
        assert_eq!(
            (r.lost, r.unexpected, r.duplicates),
            (vec![2], vec![5], vec![1])
        );
        let r = run(&[add(1, Type::Ok, 0)]);
        assert!(!r.valid && r.missing_final_read);
        // The last read began before the last acknowledged add returned: no final read.
        let r = run(&[
            add(1, Type::Ok, 0),
            read(json!([1]), 10, 20),
            add(2, Type::Ok, 15),
        ]);
        assert!(
            !r.valid && r.missing_final_read && r.lost.is_empty(),
            "{r:?}"
        );
        // An element whose add certainly failed, or was attempted only after the read returned.
        let ops = [
            add(4, Type::Fail, 0),
            read(json!([4, 6]), 10, 11),
            add(6, Type::Ok, 20),
            read(json!([4, 6]), 30, 31),
        ];
        assert_eq!(run(&ops).unexpected, vec![4, 6]);
        // An add told its key was already there.
        let mut twice = add(7, Type::Ok, 0);
        twice.output = json!("present");
        let r = run(&[twice, read(json!([7]), 10, 11)]);
        assert_eq!((r.valid, r.duplicates), (false, vec![7]));
        let r = run(&[read(json!(["set/0/x=1"]), 10, 11)]);
        assert_eq!(
            (r.valid, r.malformed),
            (false, vec!["set/0/x=1".to_owned()])
        );
    }

    /// A read must list every add acknowledged before it began and every element a read that
    /// returned before it began listed; what was acknowledged or listed while it ran need not be
    /// there.
    #[test]
    fn stale_reads_are_reported() {
        let ops = [
            add(1, Type::Ok, 0),
            add(2, Type::Info, 2),
            read(json!([1, 2]), 10, 20),
            // Overlaps the read above and the add of 3: either way.
            read(json!([1]), 15, 25),
            add(3, Type::Ok, 22),
            read(json!([1, 2, 3]), 30, 40),
        ];
        let r = run(&ops);
        assert!(r.valid, "{r:?}");
        assert_eq!(r.reads, 3);
        let ops = [
            add(1, Type::Ok, 0),
            add(2, Type::Info, 2),
            read(json!([1, 2]), 10, 20),
            // 2 was seen by a read that returned before this one began.
            read(json!([1]), 21, 25),
            add(3, Type::Ok, 26),
            // 3 was acknowledged before this one began.
            read(json!([1, 2]), 30, 40),
            read(json!([1, 2, 3]), 50, 60),
        ];
        let r = run(&ops);
        assert!(!r.valid);
        assert!(r.lost.is_empty());
        let missing: Vec<(f64, Vec<i64>)> = r
            .stale_reads
            .iter()
            .map(|s| (s.call_ms, s.examples.clone()))
            .collect();
        assert_eq!(missing, vec![(21.0 / 1e6, vec![2]), (30.0 / 1e6, vec![3])]);
    }
}
