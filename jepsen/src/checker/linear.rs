//! Linearizability of one register (read / write / compare-and-set), by the Wing–Gong–Lowe search
//! with memoisation of (linearized set, state), as in Lowe's "Testing for linearizability" and
//! porcupine.
//!
//! - `fail` operations did not happen and are dropped, except a compare-and-set whose condition
//!   was evaluated and did not hold (its completion value is `[expected, new]`): it observed the
//!   register not holding `expected` at a point between its call and return, and is checked as
//!   such a read. `ok` operations took effect between their call and return; `info` operations
//!   may have taken effect at any point after their call, or never (their return is at infinity
//!   and the search may leave them out).
//! - Reads that did not complete `ok` tell nothing and are dropped.
//! - A search that exceeds its time budget answers `Unknown`, never `Valid`.

use std::collections::HashMap;
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
    /// A compare-and-set that found the register not holding this value.
    Differs(i64),
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
        Step::Differs(expected) => (state != Some(*expected)).then_some(state),
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
        let step = match op.f {
            F::Cas if op.outcome == Type::Fail => {
                // Refused before it was evaluated: no value, nothing observed.
                match op
                    .output
                    .as_array()
                    .and_then(|a| a.first())
                    .and_then(as_int)
                {
                    Some(expected) => Step::Differs(expected),
                    None => continue,
                }
            }
            _ if op.outcome == Type::Fail => continue,
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
    let mut ret_of = vec![0usize; n];
    for (k, e) in list.iter().enumerate().skip(1) {
        if !e.is_call {
            ret_of[e.op] = k;
        }
    }
    // Operations that completed (`ok`, or a compare-and-set that failed its condition) must be
    // linearized; `info` ones may be. Each class is numbered on its own for the memo's bit sets.
    let must: Vec<bool> = kept
        .iter()
        .map(|(_, op)| matches!(op.outcome, Type::Ok | Type::Fail))
        .collect();
    let mut slot = vec![0usize; n];
    let (mut required, mut optional) = (0usize, 0usize);
    for i in 0..n {
        let counter = if must[i] {
            &mut required
        } else {
            &mut optional
        };
        slot[i] = *counter;
        *counter += 1;
    }
    let mut remaining_ok = required;
    // The memo key: the required operations linearized, then two words for the state.
    let mut key = vec![0u64; required.div_ceil(64) + 2];
    let state_words = key.len() - 2;
    let mut infos = vec![0u64; optional.div_ceil(64)];
    let mut memo = Memo::default();
    // (entry linearized, state before it, phase it was found in)
    let mut stack: Vec<(usize, State, Phase)> = Vec::new();
    let mut state: State = None;
    let mut cursor = list[0].next;
    let mut phase = Phase::Required;
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
    let flip = |key: &mut Vec<u64>, infos: &mut Vec<u64>, op: usize| {
        let bits = if must[op] { key } else { infos };
        bits[slot[op] / 64] ^= 1 << (slot[op] % 64);
    };
    let encode = |key: &mut Vec<u64>, state: State| {
        key[state_words] = u64::from(state.is_some());
        key[state_words + 1] = state.map_or(0, |v| v as u64);
    };

    // At each configuration the search first tries the operations that must be linearized, in
    // the order of their calls, up to the first return still pending; then the indeterminate ones
    // (phase `Optional`); then it backtracks. Trying the required ones first means a
    // configuration is usually reached with as few indeterminate operations as it can be, which
    // is what lets the memo prune the ones reached with more (see `Memo`).
    while remaining_ok > 0 {
        iterations += 1;
        if iterations.is_multiple_of(4096) && started.elapsed() > budget {
            return Verdict::Unknown {
                reason: format!("search exceeded its {budget:?} budget ({n} operations)"),
            };
        }
        let at_call = cursor < end && list[cursor].is_call;
        if at_call {
            let op = list[cursor].op;
            if must[op] == (phase == Phase::Optional) {
                cursor = list[cursor].next;
                continue;
            }
            if let Some(next) = step(state, &kept[op].0) {
                flip(&mut key, &mut infos, op);
                encode(&mut key, next);
                if memo.admit(&key, &infos) {
                    stack.push((cursor, state, phase));
                    state = next;
                    if must[op] {
                        remaining_ok -= 1;
                    }
                    lift(&mut list, cursor);
                    lift(&mut list, ret_of[op]);
                    if stack.len() > deepest {
                        deepest = stack.len();
                        deepest_stuck.clear();
                    }
                    cursor = list[0].next;
                    phase = Phase::Required;
                    continue;
                }
                flip(&mut key, &mut infos, op);
            }
            cursor = list[cursor].next;
            continue;
        }
        // A return (or the end): no operation called later may come before this one.
        if phase == Phase::Required {
            phase = Phase::Optional;
            cursor = list[0].next;
            continue;
        }
        if cursor < end && stack.len() == deepest && deepest_stuck.is_empty() {
            let entry = &list[cursor];
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
            Some((k, s, ph)) => {
                let op = list[k].op;
                state = s;
                flip(&mut key, &mut infos, op);
                if must[op] {
                    remaining_ok += 1;
                }
                unlift(&mut list, ret_of[op]);
                unlift(&mut list, k);
                cursor = list[k].next;
                phase = ph;
            }
            None => {
                return Verdict::Invalid {
                    explanation: deepest_stuck,
                };
            }
        }
    }
    Verdict::Valid
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Required,
    Optional,
}

/// The configurations visited: for each (required operations linearized, state), the sets of
/// indeterminate operations linearized with them, none a superset of another.
///
/// A configuration (R, I, s) needs no search when some visited (R, I', s) has I' ⊆ I: any way to
/// linearize the rest from (R, I, s) is also one from (R, I', s), since the operations of I \ I'
/// may be left out and, never returning, constrain nothing. If (R, I', s) has been searched, that
/// way does not exist; if it is being searched, it will be found there. (With one configuration
/// per set of linearized operations, as in plain WGL, every combination of the indeterminate
/// operations pending at a point was searched separately: a search with a few dozen of them
/// pending did not end.)
#[derive(Debug, Default)]
struct Memo {
    seen: HashMap<Vec<u64>, Vec<Vec<u64>>>,
}

impl Memo {
    /// Records (key, infos) unless a visited configuration dominates it; true when recorded.
    fn admit(&mut self, key: &[u64], infos: &[u64]) -> bool {
        let subset = |a: &[u64], b: &[u64]| a.iter().zip(b).all(|(x, y)| x & !y == 0);
        match self.seen.get_mut(key) {
            Some(sets) => {
                if sets.iter().any(|seen| subset(seen, infos)) {
                    return false;
                }
                sets.retain(|seen| !subset(infos, seen));
                sets.push(infos.to_vec());
            }
            None => {
                self.seen.insert(key.to_vec(), vec![infos.to_vec()]);
            }
        }
        true
    }
}

#[cfg(test)]
#[path = "linear_tests.rs"]
mod tests;
