//! A checker that has never failed proves nothing: with the nodes' UNSAFE test switch (reads served
//! by any replica without a read barrier) a short run must be reported non-linearizable, and the
//! same run without the switch must be valid.

#![allow(clippy::unwrap_used)]

use std::process::Command;

fn run(dir: &std::path::Path, unsafe_reads: bool, port: u16) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dossier-jepsen"));
    cmd.args([
        "run",
        "--time-limit",
        "8",
        "--nemesis",
        "",
        "--nodes",
        "3",
        "--shards",
        "2",
        "--set-keys",
        "1",
    ])
    .args(["--base-port", &port.to_string()])
    .arg("--out")
    .arg(dir);
    if unsafe_reads {
        cmd.arg("--unsafe-stale-reads");
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn unsafe_reads_are_reported_and_safe_reads_pass() {
    let dir = tempfile::tempdir().unwrap();
    let (code, summary) = run(&dir.path().join("unsafe"), true, 7850);
    assert_eq!(code, Some(1), "the unsafe run must be invalid:\n{summary}");
    assert!(summary.starts_with("INVALID"), "{summary}");
    assert!(summary.contains("none can be linearized"), "{summary}");
    let (code, summary) = run(&dir.path().join("safe"), false, 7870);
    assert_eq!(
        code,
        Some(0),
        "the same run without the switch must be valid:\n{summary}"
    );
}
