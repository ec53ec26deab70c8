//! The placement decisions a node made or asked for, newest last, bounded: what
//! `Admin.GetPlacement` and `dossier cluster status` show besides the node's log lines.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use dossier_api::v1::PlacementDecision;

/// Decisions kept.
const KEPT: usize = 64;

#[derive(Debug, Default)]
pub struct PlacementLog {
    entries: Mutex<VecDeque<PlacementDecision>>,
}

/// What a decision is about.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Decision<'a> {
    pub kind: &'a str,
    pub shard: u64,
    pub from: u64,
    pub to: u64,
    pub reason: &'a str,
}

impl PlacementLog {
    /// Records `decision` with its outcome ("started", "done", "failed: …").
    pub(crate) fn record(&self, decision: Decision<'_>, outcome: impl Into<String>) {
        let at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() == KEPT {
            entries.pop_front();
        }
        entries.push_back(PlacementDecision {
            at_unix_ms,
            kind: decision.kind.to_owned(),
            shard_id: decision.shard,
            from_node: decision.from,
            to_node: decision.to,
            reason: decision.reason.to_owned(),
            outcome: outcome.into(),
        });
    }

    pub fn decisions(&self) -> Vec<PlacementDecision> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_keeps_the_newest() {
        let log = PlacementLog::default();
        for shard in 0..100 {
            let d = Decision {
                kind: "move",
                shard,
                from: 1,
                to: 2,
                reason: "replica counts",
            };
            log.record(d, "done");
        }
        let kept = log.decisions();
        assert_eq!(kept.len(), KEPT);
        assert_eq!(kept.last().map(|d| d.shard_id), Some(99));
        assert_eq!(kept.first().map(|d| d.shard_id), Some(100 - KEPT as u64));
    }
}
