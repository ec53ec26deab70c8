//! Prometheus metrics: request and commit latency histograms here, per-shard Raft state and log
//! counters gathered at scrape time.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use dossier_raft::openraft::async_runtime::WatchReceiver;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntGauge, Registry, TextEncoder,
};

use crate::node::Node;

#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub request_seconds: HistogramVec,
    pub commit_seconds: Histogram,
    /// Writes handed to Raft together by a group's proposal task.
    pub proposals_per_batch: Histogram,
    /// Items of one `Kv.Bundle` (the requests a client coalesced).
    pub bundle_items: Histogram,
    /// Groups led here that went quiescent (`quiesce.rs`).
    pub quiescence_sleeps: IntCounter,
    /// Quiescent groups woken up here.
    pub quiescence_wakes: IntCounter,
    /// Calls served on break-the-glass grounds (docs/security.md).
    pub break_glass: IntCounter,
    /// Reads' audit events journaled here and not yet in their chains (`audit_batch.rs`).
    pub audit_backlog: IntGauge,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let request_seconds = HistogramVec::new(
            HistogramOpts::new("dossier_request_seconds", "Latency of public gRPC requests")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["method", "code"],
        )
        .expect("valid metric");
        let commit_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "dossier_commit_seconds",
                "Proposal to commit-and-apply latency of writes",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let proposals_per_batch = Histogram::with_opts(
            HistogramOpts::new(
                "dossier_proposals_per_batch",
                "Writes of one group proposed to Raft in one batch",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
        )
        .expect("valid metric");
        let bundle_items = Histogram::with_opts(
            HistogramOpts::new(
                "dossier_bundle_items",
                "Requests carried by one Kv.Bundle call",
            )
            .buckets(vec![
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0,
            ]),
        )
        .expect("valid metric");
        let quiescence_sleeps = IntCounter::new(
            "dossier_quiescence_sleeps_total",
            "Groups led here that went quiescent",
        )
        .expect("valid metric");
        let quiescence_wakes = IntCounter::new(
            "dossier_quiescence_wakes_total",
            "Quiescent groups woken up here",
        )
        .expect("valid metric");
        let break_glass = IntCounter::new(
            "dossier_break_glass_total",
            "Calls on a patient's record served on break-the-glass grounds",
        )
        .expect("valid metric");
        registry
            .register(Box::new(break_glass.clone()))
            .expect("registered once");
        let audit_backlog = IntGauge::new(
            "dossier_audit_backlog",
            "Reads' audit events journaled on this node and not yet moved to their chains",
        )
        .expect("valid metric");
        registry
            .register(Box::new(audit_backlog.clone()))
            .expect("registered once");
        registry
            .register(Box::new(quiescence_sleeps.clone()))
            .expect("registered once");
        registry
            .register(Box::new(quiescence_wakes.clone()))
            .expect("registered once");
        registry
            .register(Box::new(proposals_per_batch.clone()))
            .expect("registered once");
        registry
            .register(Box::new(bundle_items.clone()))
            .expect("registered once");
        registry
            .register(Box::new(request_seconds.clone()))
            .expect("registered once");
        registry
            .register(Box::new(commit_seconds.clone()))
            .expect("registered once");
        Metrics {
            registry,
            request_seconds,
            commit_seconds,
            proposals_per_batch,
            bundle_items,
            quiescence_sleeps,
            quiescence_wakes,
            break_glass,
            audit_backlog,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The Prometheus text exposition of everything.
pub fn render(node: &Node) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP dossier_shard_term Current Raft term of the local replica.\n# TYPE dossier_shard_term gauge"
    );
    let groups = node.groups();
    let mut rows = Vec::new();
    for (shard, raft) in &groups {
        let m = raft.metrics().borrow_watched().clone();
        rows.push((
            *shard,
            m.current_term,
            m.current_leader.unwrap_or(0),
            m.state.is_leader(),
            m.last_log_index.unwrap_or(0),
            m.local_committed.map_or(0, |l| l.index),
            m.last_applied.map_or(0, |l| l.index),
        ));
    }
    for r in &rows {
        let _ = writeln!(out, "dossier_shard_term{{shard=\"{}\"}} {}", r.0, r.1);
    }
    let _ = writeln!(
        out,
        "# HELP dossier_shard_leader Node id of the leader the local replica knows (0: none).\n# TYPE dossier_shard_leader gauge"
    );
    for r in &rows {
        let _ = writeln!(out, "dossier_shard_leader{{shard=\"{}\"}} {}", r.0, r.2);
    }
    let _ = writeln!(
        out,
        "# HELP dossier_shard_is_leader 1 when this node leads the shard.\n# TYPE dossier_shard_is_leader gauge"
    );
    for r in &rows {
        let _ = writeln!(
            out,
            "dossier_shard_is_leader{{shard=\"{}\"}} {}",
            r.0,
            u8::from(r.3)
        );
    }
    for (name, help, col) in [
        (
            "dossier_shard_last_log_index",
            "Last log index of the local replica.",
            4,
        ),
        (
            "dossier_shard_commit_index",
            "Commit index known to the local replica.",
            5,
        ),
        (
            "dossier_shard_applied_index",
            "Applied index of the local replica.",
            6,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for r in &rows {
            let v = [r.4, r.5, r.6][col - 4];
            let _ = writeln!(out, "{name}{{shard=\"{}\"}} {v}", r.0);
        }
    }
    let streams = node.append_counts();
    for (name, help, value) in [
        (
            "dossier_raft_append_streams_opened_total",
            "Replication streams this node opened to its peers (one per peer, again after a break).",
            streams.streams_opened.load(Ordering::Relaxed),
        ),
        (
            "dossier_raft_append_sessions_total",
            "Replication sessions of this node's leaders (runs of AppendEntries, heartbeats).",
            streams.sessions.load(Ordering::Relaxed),
        ),
        (
            "dossier_raft_append_session_failures_total",
            "Replication sessions that failed: stream broken, answer overdue, peer refused.",
            streams.session_failures.load(Ordering::Relaxed),
        ),
        (
            "dossier_raft_append_answers_withheld_total",
            "Append answers held back because they would have renewed the lease with a later request's time.",
            streams.answers_withheld.load(Ordering::Relaxed),
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    }
    let log = node.engine().stats();
    let snapshots = node.snapshot_counts();
    let pinning = node
        .engine()
        .pins(1)
        .first()
        .map_or(-1.0, |p| p.group as f64);
    for (name, help, kind, value) in [
        (
            "dossier_log_fsyncs_total",
            "fdatasync calls of the shared log.",
            "counter",
            log.fsyncs as f64,
        ),
        (
            "dossier_log_fsync_seconds_total",
            "Time spent in fdatasync by the shared log.",
            "counter",
            log.fsync_nanos_total as f64 / 1e9,
        ),
        (
            "dossier_log_rounds_total",
            "Group-commit rounds (one write and one fsync each).",
            "counter",
            log.rounds as f64,
        ),
        (
            "dossier_log_batches_total",
            "Write batches submitted to the shared log.",
            "counter",
            log.batches_submitted as f64,
        ),
        (
            "dossier_log_entries_total",
            "Entries appended to the shared log.",
            "counter",
            log.entries_appended as f64,
        ),
        (
            "dossier_log_bytes_written_total",
            "Bytes written to the shared log.",
            "counter",
            log.bytes_written as f64,
        ),
        (
            "dossier_log_segments",
            "Segment files of the shared log.",
            "gauge",
            log.segments as f64,
        ),
        (
            "dossier_log_cache_bytes",
            "Entry bytes held by the log's read cache.",
            "gauge",
            log.cache_bytes as f64,
        ),
        (
            "dossier_log_segment_bytes",
            "Bytes of frames in the shared log's segments (compaction keeps it below half of \
             log.disk-bytes-target).",
            "gauge",
            log.segment_bytes as f64,
        ),
        (
            "dossier_log_reclaimed_bytes_total",
            "Bytes of log segment files deleted because no live entry needed them.",
            "counter",
            log.reclaimed_bytes as f64,
        ),
        (
            "dossier_log_pinning_group",
            "The group whose oldest live entry keeps the oldest log segment (0 is the meta group; \
             -1: none).",
            "gauge",
            pinning,
        ),
        (
            "dossier_log_compaction_snapshots_total",
            "Checkpoints the log compactor triggered.",
            "counter",
            node.compactions.snapshots.load(Ordering::Relaxed) as f64,
        ),
        (
            "dossier_snapshots_sent_total",
            "Snapshots this node sent to peers (replicas behind the purge point, new or rebuilt).",
            "counter",
            snapshots.sent.load(Ordering::Relaxed) as f64,
        ),
        (
            "dossier_snapshot_sent_bytes_total",
            "Bytes of the snapshots this node sent.",
            "counter",
            snapshots.sent_bytes.load(Ordering::Relaxed) as f64,
        ),
        (
            "dossier_snapshot_send_seconds_total",
            "Time spent sending snapshots (view to the peer's answer).",
            "counter",
            snapshots.sent_micros.load(Ordering::Relaxed) as f64 / 1e6,
        ),
        (
            "dossier_snapshots_received_total",
            "Snapshots this node received and installed.",
            "counter",
            snapshots.received.load(Ordering::Relaxed) as f64,
        ),
        (
            "dossier_snapshot_received_bytes_total",
            "Bytes of the snapshots this node received and installed.",
            "counter",
            snapshots.received_bytes.load(Ordering::Relaxed) as f64,
        ),
        (
            "dossier_snapshot_receive_seconds_total",
            "Time spent receiving and installing snapshots (first chunk to installed state).",
            "counter",
            snapshots.received_micros.load(Ordering::Relaxed) as f64 / 1e6,
        ),
        (
            "dossier_log_compaction_purges_total",
            "Log purges the log compactor triggered.",
            "counter",
            node.compactions.purges.load(Ordering::Relaxed) as f64,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    let mut buf = Vec::new();
    if TextEncoder::new()
        .encode(&node.metrics.registry.gather(), &mut buf)
        .is_ok()
    {
        out.push_str(&String::from_utf8_lossy(&buf));
    }
    out
}
