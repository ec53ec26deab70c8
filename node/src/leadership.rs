//! Leaders back on their preferred replicas.
//!
//! A shard's preferred leader is the first replica of its descriptor; `cluster init` spreads
//! them evenly over the nodes, so leaderships (and with them the write load) are balanced when
//! every shard is led by its preferred replica. A leadership moves away when its node stops
//! (the SIGTERM drain hands it over) or fails; nothing brought it back, so after a rolling
//! restart the last node restarted led nothing. Now every leader that is not its shard's
//! preferred replica hands the leadership back once that replica is a voter and has caught up.
//!
//! Guards against flapping and against feeding a node that is going away:
//! - a leadership is handed on only after it was held for `SETTLE` (a draining node's
//!   leaderships arrive here moments before it stops, and must not go back to it);
//! - the preferred replica must have acknowledged entries up to `LAG_ENTRIES_MAX` behind the
//!   leader's log (openraft's transfer waits for it to catch up fully before it stands);
//! - a shard's hand-over is attempted at most once per `RETRY`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dossier_raft::openraft::ServerState;
use dossier_raft::openraft::async_runtime::WatchReceiver;
use dossier_storage::ShardId;
use tracing::{info, warn};

use crate::meta::META_SHARD;
use crate::node::Node;

/// How long a leadership is held before it is handed to the preferred replica.
const SETTLE: Duration = Duration::from_secs(5);
/// The least time between two hand-over attempts of one shard.
const RETRY: Duration = Duration::from_secs(10);
/// How far behind the leader's log the preferred replica may be and still be handed the lead.
const LAG_ENTRIES_MAX: u64 = 1024;

/// What the hand-back remembers between rounds: since when (and in which term) each shard has
/// been led here, and when its hand-over was last attempted.
#[derive(Debug, Default)]
pub struct LeaderBalance {
    led_since: Mutex<HashMap<ShardId, (u64, Instant)>>,
    last_attempt: Mutex<HashMap<ShardId, Instant>>,
}

impl Node {
    /// One round: every leadership held here for long enough by a replica that is not its
    /// shard's preferred one goes to the preferred replica, if that one is a caught-up voter.
    /// Returns the shards handed over.
    pub async fn hand_back_leaderships(&self) -> Vec<ShardId> {
        let Some(map) = self.map() else {
            return Vec::new();
        };
        let me = self.node_id();
        let now = Instant::now();
        let mut handed = Vec::new();
        for (shard, raft) in self.groups() {
            if shard == META_SHARD {
                continue;
            }
            let metrics = raft.metrics().borrow_watched().clone();
            let balance = &self.leader_balance;
            if metrics.state != ServerState::Leader {
                lock(&balance.led_since).remove(&shard);
                continue;
            }
            let term = metrics.current_term;
            let since = {
                let mut led = lock(&balance.led_since);
                let entry = led.entry(shard).or_insert((term, now));
                if entry.0 != term {
                    *entry = (term, now);
                }
                entry.1
            };
            if now.duration_since(since) < SETTLE {
                continue;
            }
            let Some(preferred) = map
                .shards
                .iter()
                .find(|d| d.shard_id == shard)
                .and_then(|d| d.replicas.first().copied())
            else {
                continue;
            };
            if preferred == me
                || !metrics
                    .membership_config
                    .membership()
                    .voter_ids()
                    .any(|v| v == preferred)
            {
                continue;
            }
            let matched = metrics
                .replication
                .as_ref()
                .and_then(|r| r.get(&preferred).cloned().flatten())
                .map_or(0, |log_id| log_id.index);
            let last = metrics.last_log_index.unwrap_or(0);
            if matched.saturating_add(LAG_ENTRIES_MAX) < last {
                continue;
            }
            {
                let mut attempts = lock(&balance.last_attempt);
                if attempts
                    .get(&shard)
                    .is_some_and(|at| now.duration_since(*at) < RETRY)
                {
                    continue;
                }
                attempts.insert(shard, now);
            }
            self.wake_if_leader(shard).await;
            match raft.trigger().transfer_leader(preferred).await {
                Ok(()) => {
                    info!(
                        shard,
                        to = preferred,
                        "leadership handed back to the preferred replica"
                    );
                    handed.push(shard);
                }
                Err(e) => warn!(shard, to = preferred, error = %e, "leadership hand-back failed"),
            }
        }
        handed
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
