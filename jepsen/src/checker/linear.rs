//! Linearizability of one register (read / write / compare-and-set), by the Wing–Gong–Lowe search
//! with memoisation of (linearized set, state), as in Lowe's "Testing for linearizability" and
//! porcupine.
//!
//! - `fail` operations did not happen and are dropped; `ok` operations took effect between their
//!   call and return; `info` operations may have taken effect at any point after their call, or
//!   never (their return is at infinity and the search may leave them out).
//! - Reads that did not complete `ok` tell nothing and are dropped.
//! - A search that exceeds its time budget answers `Unknown`, never `Valid`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::history::{F, Op, Type};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Valid,
    /// No linearization exists; `stuck_at` is the call time of the op the longest prefix stalled on.
    Invalid {
        explanation: String,
    },
    Unknown {
        reason: String,
    },
}

/// The register's value: `None` while absent.
type State = Option<i64>;

#[derive(Debug, Clone)]
enum Step {
    Read(State),
    Write(i64),
    Cas(i64, i64),
}

fn as_int(v: &Value) -> Option<i64> {
    v.as_i64()
}

/// The model's transition, or `None` if the op cannot happen in `state`.
fn step(state: State, op: &Step) -> Option<State> {
    match op {
        Step::Read(v) => (state == *v).then_some(state),
        Step::Write(v) => Some(Some(*v)),
        Step::Cas(expected, new) => (state == Some(*expected)).then_some(Some(*new)),
    }
}

struct Entry {
    op: usize,
    is_call: bool,
    time: u64,
    prev: usize,
    next: usize,
}

/// Checks one key's operations.
pub fn check(ops: &[Op], budget: Duration) -> Verdict {
    let started = Instant::now();
    // Keep what constrains the history.
    let mut kept: Vec<(Step, &Op)> = Vec::new();
    for op in ops {
        if op.outcome == Type::Fail {
            continue;
        }
        let step = match op.f {
            F::Read if op.outcome == Type::Ok => {
                if op.output.is_null() {
                    Step::Read(None)
                } else if let Some(v) = as_int(&op.output) {
                    Step::Read(Some(v))
                } else {
                    return Verdict::Unknown {
                        reason: format!("read returned a non-integer {}", op.output),
                    };
                }
            }
            F::Read => continue,
            F::Write => match as_int(&op.input) {
                Some(v) => Step::Write(v),
                None => {
                    return Verdict::Unknown {
                        reason: format!("write of a non-integer {}", op.input),
                    };
                }
            },
            F::Cas => match op
                .input
                .as_array()
                .map(|a| (a.first().and_then(as_int), a.get(1).and_then(as_int)))
            {
                Some((Some(e), Some(n))) => Step::Cas(e, n),
                _ => {
                    return Verdict::Unknown {
                        reason: format!("cas value is not [expected, new]: {}", op.input),
                    };
                }
            },
            F::Add => {
                return Verdict::Unknown {
                    reason: "add is not a register operation".into(),
                };
            }
        };
        kept.push((step, op));
    }
    let n = kept.len();
    if n == 0 {
        return Verdict::Valid;
    }
    // Entries sorted by time; at equal times calls come first (the more permissive order).
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, (_, op)) in kept.iter().enumerate() {
        events.push((op.call, true, i));
        events.push((op.ret, false, i));
    }
    events.sort_by_key(|&(t, is_call, i)| (t, !is_call, i));
    // A doubly linked list with a sentinel head at index 0.
    let mut list: Vec<Entry> = Vec::with_capacity(events.len() + 1);
    list.push(Entry {
        op: usize::MAX,
        is_call: false,
        time: 0,
        prev: 0,
        next: 1,
    });
    for (k, &(time, is_call, op)) in events.iter().enumerate() {
        list.push(Entry {
            op,
            is_call,
            time,
            prev: k,
            next: k + 2,
        });
    }
    let end = list.len();
    let mut call_of = vec![0usize; n];
    let mut ret_of = vec![0usize; n];
    for (k, e) in list.iter().enumerate().skip(1) {
        if e.is_call {
            call_of[e.op] = k;
        } else {
            ret_of[e.op] = k;
        }
    }
    let must = |i: usize| kept[i].1.outcome == Type::Ok;
    let mut remaining_ok = (0..n).filter(|&i| must(i)).count();
    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut state: State = None;
    let mut cursor = list[0].next;
    let mut deepest = 0usize;
    let mut deepest_stuck = String::new();
    let mut iterations = 0u64;

    let lift = |list: &mut Vec<Entry>, k: usize| {
        let (p, nx) = (list[k].prev, list[k].next);
        list[p].next = nx;
        if nx < end {
            list[nx].prev = p;
        }
    };
    let unlift = |list: &mut Vec<Entry>, k: usize| {
        let (p, nx) = (list[k].prev, list[k].next);
        list[p].next = k;
        if nx < end {
            list[nx].prev = k;
        }
    };

    while remaining_ok > 0 {
        iterations += 1;
        if iterations.is_multiple_of(4096) && started.elapsed() > budget {
            return Verdict::Unknown {
                reason: format!("search exceeded its {budget:?} budget ({n} operations)"),
            };
        }
        if cursor >= end {
            // Only info operations' calls were left to try: backtrack.
            match stack.pop() {
                Some((k, s)) => {
                    let op = list[k].op;
                    state = s;
                    linearized[op / 64] &= !(1 << (op % 64));
                    if must(op) {
                        remaining_ok += 1;
                    }
                    unlift(&mut list, ret_of[op]);
                    unlift(&mut list, k);
                    cursor = list[k].next;
                    continue;
                }
                None => break,
            }
        }
        let entry = &list[cursor];
        if entry.is_call {
            let op = entry.op;
            if let Some(next) = step(state, &kept[op].0) {
                linearized[op / 64] |= 1 << (op % 64);
                if cache.insert((linearized.clone(), next)) {
                    stack.push((cursor, state));
                    state = next;
                    if must(op) {
                        remaining_ok -= 1;
                    }
                    lift(&mut list, cursor);
                    lift(&mut list, ret_of[op]);
                    if stack.len() > deepest {
                        deepest = stack.len();
                        deepest_stuck.clear();
                    }
                    cursor = list[0].next;
                    continue;
                }
                linearized[op / 64] &= !(1 << (op % 64));
            }
            cursor = list[cursor].next;
        } else {
            // The op of this return must be linearized before anything later: backtrack.
            if stack.len() == deepest && deepest_stuck.is_empty() {
                let op = kept[entry.op].1;
                deepest_stuck = format!(
                    "after {} operations, none can be linearized before the {:?} by process {} (called at {} ns, returned at {} ns, value {}, read {}) in state {:?}",
                    stack.len(),
                    op.f,
                    op.process,
                    op.call,
                    entry.time,
                    op.input,
                    op.output,
                    state
                );
            }
            match stack.pop() {
                Some((k, s)) => {
                    let op = list[k].op;
                    state = s;
                    linearized[op / 64] &= !(1 << (op % 64));
                    if must(op) {
                        remaining_ok += 1;
                    }
                    unlift(&mut list, ret_of[op]);
                    unlift(&mut list, k);
                    cursor = list[k].next;
                }
                None => {
                    return Verdict::Invalid {
                        explanation: deepest_stuck,
                    };
                }
            }
        }
    }
    if remaining_ok == 0 {
        Verdict::Valid
    } else {
        Verdict::Invalid {
            explanation: deepest_stuck,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn op(
        process: u64,
        f: F,
        input: Value,
        output: Value,
        outcome: Type,
        call: u64,
        ret: u64,
    ) -> Op {
        let ret = if outcome == Type::Info { u64::MAX } else { ret };
        Op {
            process,
            f,
            key: "k".into(),
            input,
            output,
            outcome,
            call,
            ret,
        }
    }

    fn budget() -> Duration {
        Duration::from_secs(5)
    }

    /// Sequential writes and reads that agree are linearizable; a read of a value never written
    /// (or of an overwritten one, after the overwrite returned) is not.
    #[test]
    fn sequential_histories() {
        let ok = vec![
            op(1, F::Write, json!(1), Value::Null, Type::Ok, 0, 10),
            op(1, F::Read, Value::Null, json!(1), Type::Ok, 20, 30),
            op(2, F::Write, json!(2), Value::Null, Type::Ok, 40, 50),
            op(2, F::Read, Value::Null, json!(2), Type::Ok, 60, 70),
        ];
        assert_eq!(check(&ok, budget()), Verdict::Valid);
        let mut stale = ok.clone();
        stale[3].output = json!(1);
        assert!(matches!(check(&stale, budget()), Verdict::Invalid { .. }));
        let never = vec![op(1, F::Read, Value::Null, json!(7), Type::Ok, 0, 10)];
        assert!(matches!(check(&never, budget()), Verdict::Invalid { .. }));
        let absent = vec![op(1, F::Read, Value::Null, Value::Null, Type::Ok, 0, 10)];
        assert_eq!(check(&absent, budget()), Verdict::Valid);
    }

    /// Concurrent operations may take effect in either order.
    #[test]
    fn concurrency_allows_either_order() {
        let h = vec![
            op(1, F::Write, json!(1), Value::Null, Type::Ok, 0, 100),
            op(2, F::Write, json!(2), Value::Null, Type::Ok, 10, 90),
            op(3, F::Read, Value::Null, json!(1), Type::Ok, 120, 130),
        ];
        assert_eq!(check(&h, budget()), Verdict::Valid);
        let h2 = vec![
            op(1, F::Write, json!(1), Value::Null, Type::Ok, 0, 100),
            op(2, F::Write, json!(2), Value::Null, Type::Ok, 10, 90),
            op(3, F::Read, Value::Null, json!(2), Type::Ok, 120, 130),
            op(4, F::Read, Value::Null, json!(1), Type::Ok, 140, 150),
        ];
        assert!(matches!(check(&h2, budget()), Verdict::Invalid { .. }));
    }

    /// An indeterminate write may have happened (explaining a later read) or not; a failed one
    /// did not happen.
    #[test]
    fn info_and_fail() {
        let took_effect = vec![
            op(1, F::Write, json!(5), Value::Null, Type::Info, 0, 0),
            op(2, F::Read, Value::Null, json!(5), Type::Ok, 50, 60),
        ];
        assert_eq!(check(&took_effect, budget()), Verdict::Valid);
        let never = vec![
            op(1, F::Write, json!(5), Value::Null, Type::Info, 0, 0),
            op(2, F::Read, Value::Null, Value::Null, Type::Ok, 50, 60),
        ];
        assert_eq!(check(&never, budget()), Verdict::Valid);
        let failed = vec![
            op(1, F::Write, json!(5), Value::Null, Type::Fail, 0, 10),
            op(2, F::Read, Value::Null, json!(5), Type::Ok, 50, 60),
        ];
        assert!(matches!(check(&failed, budget()), Verdict::Invalid { .. }));
        // An info write cannot take effect before it was called.
        let early = vec![
            op(2, F::Read, Value::Null, json!(5), Type::Ok, 0, 10),
            op(1, F::Write, json!(5), Value::Null, Type::Info, 20, 0),
        ];
        assert!(matches!(check(&early, budget()), Verdict::Invalid { .. }));
    }

    /// Compare-and-set succeeds only from its expected value.
    #[test]
    fn compare_and_set() {
        let h = vec![
            op(1, F::Write, json!(1), Value::Null, Type::Ok, 0, 10),
            op(2, F::Cas, json!([1, 2]), Value::Null, Type::Ok, 20, 30),
            op(3, F::Read, Value::Null, json!(2), Type::Ok, 40, 50),
        ];
        assert_eq!(check(&h, budget()), Verdict::Valid);
        let wrong = vec![
            op(1, F::Write, json!(1), Value::Null, Type::Ok, 0, 10),
            op(2, F::Cas, json!([3, 2]), Value::Null, Type::Ok, 20, 30),
        ];
        assert!(matches!(check(&wrong, budget()), Verdict::Invalid { .. }));
    }

    /// A large valid history of many concurrent processes is checked within the budget, and a
    /// single stale read injected into it is found.
    #[test]
    fn larger_histories() {
        let mut h = Vec::new();
        let mut t = 0;
        for i in 0..400i64 {
            // Writer i writes i; two readers overlap it, one reading before, one after.
            h.push(op(1, F::Write, json!(i), Value::Null, Type::Ok, t, t + 10));
            h.push(op(
                2,
                F::Read,
                Value::Null,
                if i == 0 { Value::Null } else { json!(i - 1) },
                Type::Ok,
                t + 1,
                t + 5,
            ));
            h.push(op(
                3,
                F::Read,
                Value::Null,
                json!(i),
                Type::Ok,
                t + 6,
                t + 20,
            ));
            t += 30;
        }
        assert_eq!(check(&h, budget()), Verdict::Valid);
        let mut bad = h.clone();
        bad[3 * 200 + 2].output = json!(150);
        assert!(matches!(check(&bad, budget()), Verdict::Invalid { .. }));
    }
}
