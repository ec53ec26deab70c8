//! The history: one JSON object per line in `history.jsonl`, readable by any independent checker.
//!
//! `{"process": <int>, "type": "invoke"|"ok"|"fail"|"info", "f": "read"|"write"|"cas"|"add",
//!   "key": <string>, "value": <..>, "time": <int ns, monotonic>}`
//!
//! - `write`: the value written; `cas`: `[expected, new]`; `read`: `null` on invoke, the value read
//!   on ok (`null` if absent; for set keys the list of elements); `add`: the element.
//! - `fail` only when the operation certainly did not take effect; a timeout or lost connection is
//!   `info`, and the process that saw it continues under a fresh process number.
//! - A `cas` that completes `fail` with `[expected, new]` had its condition evaluated and found
//!   another value; one refused before evaluation completes `fail` with the error's text. An `add`
//!   that completes `ok` with `"present"` found its element's key already there.

use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Type {
    Invoke,
    Ok,
    Fail,
    Info,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum F {
    Read,
    Write,
    Cas,
    Add,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub process: u64,
    #[serde(rename = "type")]
    pub kind: Type,
    pub f: F,
    pub key: String,
    pub value: Value,
    pub time: u64,
}

/// Writes a history, one event per line.
pub fn write(events: &[Event], out: &mut impl Write) -> anyhow::Result<()> {
    for e in events {
        serde_json::to_writer(&mut *out, e)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// Reads a history; a malformed line is an error naming its number.
pub fn read(input: impl BufRead) -> anyhow::Result<Vec<Event>> {
    let mut events = Vec::new();
    for (n, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let event: Event = serde_json::from_str(&line)
            .map_err(|e| anyhow::anyhow!("history line {}: {e}", n + 1))?;
        events.push(event);
    }
    Ok(events)
}

/// One operation: an invocation and its completion (if any) by the same process.
#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    pub process: u64,
    pub f: F,
    pub key: String,
    /// The invocation's value (what was written, `[expected, new]`, the element added).
    pub input: Value,
    /// The completion's value (what was read).
    pub output: Value,
    /// `Ok`, `Fail` or `Info` (`Info` also for an invocation that never completed).
    pub outcome: Type,
    pub call: u64,
    /// Completion time; `u64::MAX` for `Info`: it may take effect at any time after its call.
    pub ret: u64,
}

/// Pairs invocations with completions, per process. An invocation without a completion is `info`.
pub fn ops(events: &[Event]) -> anyhow::Result<Vec<Op>> {
    into_ops(events.to_vec())
}

/// [`ops`], taking the events' values instead of copying them (set reads list whole sets).
pub fn into_ops(events: Vec<Event>) -> anyhow::Result<Vec<Op>> {
    let mut open: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    let mut ops: Vec<Op> = Vec::new();
    for e in events {
        match e.kind {
            Type::Invoke => {
                if open.contains_key(&e.process) {
                    anyhow::bail!("process {} invoked twice without a completion", e.process);
                }
                open.insert(e.process, ops.len());
                ops.push(Op {
                    process: e.process,
                    f: e.f,
                    key: e.key,
                    input: e.value,
                    output: Value::Null,
                    outcome: Type::Info,
                    call: e.time,
                    ret: u64::MAX,
                });
            }
            kind => {
                let i = open.remove(&e.process).ok_or_else(|| {
                    anyhow::anyhow!(
                        "process {} completed an operation it never invoked",
                        e.process
                    )
                })?;
                let op = &mut ops[i];
                if op.f != e.f || op.key != e.key {
                    anyhow::bail!(
                        "process {}: completion does not match its invocation",
                        e.process
                    );
                }
                op.outcome = kind;
                op.output = e.value;
                if kind != Type::Info {
                    op.ret = e.time;
                }
            }
        }
    }
    Ok(ops)
}
