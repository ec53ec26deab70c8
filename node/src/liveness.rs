//! Which peer nodes are alive, by one ping per peer about ten times a second (the internal
//! `Raft.Ping`), for quiescent groups (`quiesce.rs`): a follower of a quiescent group hears no
//! heartbeat, so it watches its leader's node instead, and wakes its group when that node stops
//! answering. The answer names the peer's incarnation (random per process start), so a restarted
//! peer is seen even when no ping failed. A ping received counts as an answer.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often every peer is pinged.
pub(crate) const PING_EVERY: Duration = Duration::from_millis(100);
/// How long a ping may take.
pub(crate) const PING_TIMEOUT: Duration = Duration::from_millis(300);
/// A peer not heard from for this long is taken for dead: the followers of groups it leads
/// quietly wake up and elect. About the election timeout a heartbeating group waits for.
pub(crate) const DEAD_AFTER: Duration = Duration::from_millis(500);

/// A random number (std's per-process hash keys, mixed with the clock).
pub(crate) fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

#[derive(Debug)]
pub(crate) struct Liveness {
    /// This process's incarnation, never 0.
    incarnation: u64,
    peers: Mutex<HashMap<u64, Peer>>,
    /// Peers with a ping on its way: one at a time each.
    pinging: Mutex<HashSet<u64>>,
}

#[derive(Debug, Clone, Copy)]
struct Peer {
    heard: Instant,
    incarnation: u64,
}

impl Liveness {
    pub(crate) fn new() -> Liveness {
        Liveness {
            incarnation: random_u64().max(1),
            peers: Mutex::default(),
            pinging: Mutex::default(),
        }
    }

    /// Whether a ping to `node` may start (none on its way); marks one on its way.
    pub(crate) fn start_ping(&self, node: u64) -> bool {
        self.pinging
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node)
    }

    pub(crate) fn end_ping(&self, node: u64) {
        self.pinging
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&node);
    }

    pub(crate) fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Node `node` (process `incarnation`) answered or pinged: returns whether it restarted
    /// since it was last heard (another incarnation).
    pub(crate) fn heard(&self, node: u64, incarnation: u64) -> bool {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let before = peers.insert(
            node,
            Peer {
                heard: Instant::now(),
                incarnation,
            },
        );
        matches!(before, Some(p) if p.incarnation != incarnation && incarnation != 0)
    }

    /// Whether `node` was heard from within `DEAD_AFTER`.
    pub(crate) fn alive(&self, node: u64) -> bool {
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&node)
            .is_some_and(|p| p.heard.elapsed() < DEAD_AFTER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_alive_when_heard_and_restarts_are_seen() {
        let l = Liveness::new();
        assert!(!l.alive(2), "never heard");
        assert!(!l.heard(2, 7), "first heard is no restart");
        assert!(l.alive(2));
        assert!(!l.heard(2, 7));
        assert!(l.heard(2, 8), "another incarnation");
        assert_ne!(l.incarnation(), 0);
        assert!(l.start_ping(2));
        assert!(!l.start_ping(2), "one ping on its way per peer");
        l.end_ping(2);
        assert!(l.start_ping(2));
    }
}
