//! Tests of the linearizability checker: hand-written histories, simulated ones of the
//! workload's shape, and random small ones against an exhaustive search.

use serde_json::json;

use super::*;

fn op(process: u64, f: F, input: Value, output: Value, outcome: Type, call: u64, ret: u64) -> Op {
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

/// A compare-and-set that failed its condition observed the register without its expected
/// value; one refused before evaluation (an error text as completion) observed nothing.
#[test]
fn failed_compare_and_set_is_an_observation() {
    let h = vec![
        op(1, F::Write, json!(1), Value::Null, Type::Ok, 0, 10),
        op(2, F::Cas, json!([2, 3]), json!([2, 3]), Type::Fail, 20, 30),
        op(3, F::Read, Value::Null, json!(1), Type::Ok, 40, 50),
    ];
    assert_eq!(check(&h, budget()), Verdict::Valid);
    let mut wrong = h.clone();
    wrong[1].input = json!([1, 3]);
    wrong[1].output = json!([1, 3]);
    assert!(matches!(check(&wrong, budget()), Verdict::Invalid { .. }));
    wrong[1].output = json!("unavailable: no leader");
    assert_eq!(check(&wrong, budget()), Verdict::Valid);
    // Concurrent with a write of its expected value: it may have come first.
    let h = vec![
        op(1, F::Write, json!(1), Value::Null, Type::Ok, 0, 10),
        op(2, F::Write, json!(2), Value::Null, Type::Ok, 20, 40),
        op(3, F::Cas, json!([2, 3]), json!([2, 3]), Type::Fail, 25, 35),
        op(4, F::Read, Value::Null, json!(2), Type::Ok, 50, 60),
    ];
    assert_eq!(check(&h, budget()), Verdict::Valid);
}

/// A history of `n` operations on one register with values `0..5`, as a correct register
/// would give it under `procs` concurrent processes: each operation takes effect at a point
/// between its call and return. Every `info_every`-th operation never returns (every other
/// one of those took effect); its process continues under a new number.
fn simulated(seed: u64, n: usize, procs: u64, info_every: usize) -> Vec<Op> {
    let mut s = seed;
    let mut rand = |m: u64| {
        s = s
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (s >> 33) % m
    };
    // (op, point of effect, took effect)
    let mut planned: Vec<(Op, u64, bool)> = Vec::with_capacity(n);
    let mut clock: Vec<(u64, u64)> = (0..procs).map(|p| (p, rand(20))).collect();
    let mut next_process = procs;
    for i in 0..n {
        // The process whose previous operation returned first goes next.
        let who = (0..clock.len()).min_by_key(|&c| clock[c].1).unwrap_or(0);
        let (process, at) = clock[who];
        let call = at;
        let point = call + 1 + rand(40);
        let ret = point + 1 + rand(40);
        let (f, input) = match rand(4) {
            0 | 1 => (F::Read, Value::Null),
            2 => (F::Write, json!(rand(5))),
            _ => (F::Cas, json!([rand(5), rand(5)])),
        };
        let info = info_every > 0 && i % info_every == info_every - 1;
        let o = op(process, f, input, Value::Null, Type::Ok, call, ret);
        planned.push((o, point, !info || i % (2 * info_every) == info_every - 1));
        clock[who] = if info {
            next_process += 1;
            (next_process, call + 1 + rand(10))
        } else {
            (process, ret + rand(10))
        };
        if info {
            let last = planned.len() - 1;
            planned[last].0.outcome = Type::Info;
            planned[last].0.ret = u64::MAX;
        }
    }
    let mut order: Vec<usize> = (0..planned.len()).collect();
    order.sort_by_key(|&i| planned[i].1);
    let mut state: Option<i64> = None;
    for i in order {
        let (o, _, effect) = &mut planned[i];
        if !*effect {
            continue;
        }
        match o.f {
            F::Read => o.output = state.map_or(Value::Null, Value::from),
            F::Write => state = o.input.as_i64(),
            F::Cas => {
                let (e, n) = (o.input[0].as_i64(), o.input[1].as_i64());
                if state == e {
                    state = n;
                } else if o.outcome == Type::Ok {
                    o.outcome = Type::Fail;
                }
                o.output = o.input.clone();
            }
            F::Add => {}
        }
    }
    planned.into_iter().map(|(o, _, _)| o).collect()
}

/// Register histories of the workload's shape (values 0..5, failed compare-and-set checked,
/// indeterminate operations) of the size of one register key are decided well inside the
/// budget, valid as they are, and invalid with one read of a value never written; also when
/// that read comes late and the whole prefix has to be searched first.
#[test]
fn small_value_domain_stays_tractable() {
    let budget = Duration::from_secs(120);
    for (seed, procs, info_every) in [(1, 8, 0), (4, 8, 200), (3, 10, 250)] {
        let h = simulated(seed, 1_000, procs, info_every);
        let started = Instant::now();
        assert_eq!(check(&h, budget), Verdict::Valid, "seed {seed}");
        let valid_took = started.elapsed();
        for at in [500, 990] {
            let mut bad = h.clone();
            let Some(read) =
                (at..bad.len()).find(|&i| bad[i].f == F::Read && bad[i].outcome == Type::Ok)
            else {
                panic!("no read after {at}")
            };
            bad[read].output = json!(9);
            let started = Instant::now();
            assert!(
                matches!(check(&bad, budget), Verdict::Invalid { .. }),
                "seed {seed}, bad read at {read}"
            );
            eprintln!(
                "seed {seed}: valid in {valid_took:?}, invalid at op {read} in {:?}",
                started.elapsed()
            );
        }
    }
}

/// Linearizability by definition, for small histories: some order of the operations that must
/// take effect (`ok` ones, and compare-and-set that failed its condition, as observations) and of
/// any subset of the indeterminate ones, in which no operation comes before one that returned
/// before it was called, and which the register's model accepts step by step. No memo, no
/// pruning beyond the model: the reference the search is compared with.
fn linearizable_by_definition(ops: &[Op]) -> bool {
    // (step, call, return; u64::MAX for indeterminate ones, which may also be left out)
    let mut kept: Vec<(Step, u64, u64)> = Vec::new();
    for o in ops {
        let step = match (o.f, o.outcome) {
            (F::Cas, Type::Fail) => match o.output.as_array().and_then(|a| a[0].as_i64()) {
                Some(e) => Step::Differs(e),
                None => continue,
            },
            (_, Type::Fail) | (F::Read, Type::Info) => continue,
            (F::Read, _) => Step::Read(o.output.as_i64()),
            (F::Write, _) => Step::Write(o.input.as_i64().unwrap()),
            (F::Cas, _) => Step::Cas(o.input[0].as_i64().unwrap(), o.input[1].as_i64().unwrap()),
            (F::Add, _) => unreachable!(),
        };
        let ret = if o.outcome == Type::Info {
            u64::MAX
        } else {
            o.ret
        };
        kept.push((step, o.call, ret));
    }
    fn search(kept: &[(Step, u64, u64)], placed: &mut Vec<bool>, state: State) -> bool {
        let open = |placed: &[bool], i: usize| !placed[i] && kept[i].2 != u64::MAX;
        if !(0..kept.len()).any(|i| open(placed, i)) {
            return true;
        }
        for x in 0..kept.len() {
            let blocked =
                (0..kept.len()).any(|y| y != x && open(placed, y) && kept[y].2 < kept[x].1);
            if placed[x] || blocked {
                continue;
            }
            if let Some(next) = step(state, &kept[x].0) {
                placed[x] = true;
                let found = search(kept, placed, next);
                placed[x] = false;
                if found {
                    return true;
                }
            }
        }
        false
    }
    search(&kept, &mut vec![false; kept.len()], None)
}

/// Random small histories (up to 8 operations over values 0..3, with indeterminate operations and
/// failed compare-and-set of both kinds) get the same verdict from the search as from the
/// definition: the memo's pruning never calls an invalid history valid, nor a valid one invalid.
#[test]
fn agrees_with_the_definition_on_small_histories() {
    let mut s: u64 = 0x5EED;
    let mut rand = |m: u64| {
        s = s
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (s >> 33) % m
    };
    let (mut valid, mut invalid) = (0, 0);
    for case in 0..20_000 {
        let n = 1 + rand(8) as usize;
        let mut h = Vec::with_capacity(n);
        for p in 0..n as u64 {
            let call = rand(30);
            let ret = call + 1 + rand(15);
            let outcome = match rand(10) {
                0..=5 => Type::Ok,
                6 | 7 => Type::Info,
                _ => Type::Fail,
            };
            let value = |r: u64| if r == 3 { Value::Null } else { json!(r) };
            let (f, input, output) = match rand(3) {
                0 => (F::Read, Value::Null, value(rand(4))),
                1 => (F::Write, json!(rand(3)), Value::Null),
                _ => {
                    let cas = json!([rand(3), rand(3)]);
                    let output = if outcome == Type::Fail && rand(4) == 0 {
                        json!("refused")
                    } else {
                        cas.clone()
                    };
                    (F::Cas, cas, output)
                }
            };
            h.push(op(p, f, input, output, outcome, call, ret));
        }
        let expected = linearizable_by_definition(&h);
        let verdict = check(&h, budget());
        assert!(
            !matches!(verdict, Verdict::Unknown { .. }),
            "case {case}: {verdict:?}"
        );
        assert_eq!(
            verdict == Verdict::Valid,
            expected,
            "case {case}: {verdict:?} for {h:#?}"
        );
        if expected {
            valid += 1;
        } else {
            invalid += 1;
        }
    }
    // Both verdicts must be well represented for the comparison to mean anything.
    assert!(
        valid > 2_000 && invalid > 2_000,
        "{valid} valid, {invalid} invalid"
    );
}
