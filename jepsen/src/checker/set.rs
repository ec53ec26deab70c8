//! The set workload's checker: every acknowledged add must be in the final read; nothing may be
//! read that was never added; nothing may be read twice. Indeterminate adds may or may not be there.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::history::{F, Op, Type};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SetResult {
    pub key: String,
    pub valid: bool,
    pub acknowledged: usize,
    pub indeterminate: usize,
    pub read: usize,
    /// Acknowledged adds missing from the final read.
    pub lost: Vec<i64>,
    /// Elements read that no add (acknowledged or not) ever attempted.
    pub unexpected: Vec<i64>,
    /// Elements read more than once.
    pub duplicates: Vec<i64>,
    /// Set when there is no final read to judge by.
    pub missing_final_read: bool,
}

/// Checks one set key: its adds, and its last `ok` read (the final read after the cluster healed).
pub fn check(key: &str, ops: &[&Op]) -> SetResult {
    let mut ok_adds = BTreeSet::new();
    let mut info_adds = BTreeSet::new();
    for op in ops.iter().filter(|o| o.f == F::Add) {
        let Some(e) = op.input.as_i64() else { continue };
        match op.outcome {
            Type::Ok => {
                ok_adds.insert(e);
            }
            Type::Info => {
                info_adds.insert(e);
            }
            Type::Fail | Type::Invoke => {}
        }
    }
    let final_read = ops
        .iter()
        .filter(|o| o.f == F::Read && o.outcome == Type::Ok)
        .max_by_key(|o| o.ret);
    let mut result = SetResult {
        key: key.to_owned(),
        valid: false,
        acknowledged: ok_adds.len(),
        indeterminate: info_adds.len(),
        read: 0,
        lost: Vec::new(),
        unexpected: Vec::new(),
        duplicates: Vec::new(),
        missing_final_read: final_read.is_none(),
    };
    let Some(read) = final_read else {
        return result;
    };
    let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
    for v in read
        .output
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        if let Some(e) = v.as_i64() {
            *counts.entry(e).or_default() += 1;
        }
    }
    result.read = counts.values().sum();
    result.lost = ok_adds
        .iter()
        .filter(|e| !counts.contains_key(e))
        .copied()
        .collect();
    result.unexpected = counts
        .keys()
        .filter(|e| !ok_adds.contains(e) && !info_adds.contains(e))
        .copied()
        .collect();
    result.duplicates = counts
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(e, _)| *e)
        .collect();
    result.valid =
        result.lost.is_empty() && result.unexpected.is_empty() && result.duplicates.is_empty();
    result
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
            output: Value::Null,
            outcome,
            call: t,
            ret: t + 1,
        }
    }

    fn read(elements: Value, t: u64) -> Op {
        Op {
            process: 9,
            f: F::Read,
            key: "s".into(),
            input: Value::Null,
            output: elements,
            outcome: Type::Ok,
            call: t,
            ret: t + 1,
        }
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
            read(json!([1, 2]), 10),
        ];
        let refs: Vec<&Op> = ops.iter().collect();
        assert!(check("s", &refs).valid);
        let ops = [
            add(1, Type::Ok, 0),
            add(2, Type::Ok, 2),
            read(json!([1, 1, 5]), 10),
        ];
        let refs: Vec<&Op> = ops.iter().collect();
        let r = check("s", &refs);
        assert!(!r.valid);
        assert_eq!(
            (r.lost, r.unexpected, r.duplicates),
            (vec![2], vec![5], vec![1])
        );
        let ops = [add(1, Type::Ok, 0)];
        let refs: Vec<&Op> = ops.iter().collect();
        let r = check("s", &refs);
        assert!(!r.valid && r.missing_final_read);
    }
}
