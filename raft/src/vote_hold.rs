//! A restarted voter keeps the promise it may have made before it stopped.
//!
//! A follower that acknowledges a leader promises to vote for no one else for one leader lease
//! (`election_timeout_max`): lease reads on the leader rest on that promise (docs/invariants.md,
//! "Lease reads"). openraft keeps the promise in memory only; a replica that restarts starts with
//! no lease and would grant a vote at once, or stand for election itself, possibly within the
//! lease of a leader it acknowledged just before it stopped. A quorum for a new leader could then
//! form while the old leader still serves lease reads. So for one lease after a process started
//! on a log that holds any group's state (a restart, not a fresh node), its replicas refuse Vote
//! and PreVote requests and do not stand for election. A fresh node has promised nothing.

use std::time::Duration;

use dossier_storage::LogEngine;
use tokio::time::Instant;

use crate::group::Raft;

/// Until when this process's replicas neither vote nor stand for election.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VoteHold {
    until: Instant,
    /// When the process started.
    started: Instant,
}

/// How long after the process started a replica with no state refuses to vote for candidates of
/// groups that have had a leader (`crate::server::stateless_refusal`): long enough for a live
/// leader to reach a rebuilt replica, bounded so that a new group whose first leader failed
/// before replicating anything can still elect one.
pub const STATELESS_VOTE_WINDOW: Duration = Duration::from_secs(30);

impl VoteHold {
    /// Called once, when the process starts, on its log: a hold of one leader lease
    /// (`election_timeout_max`) from now if the log holds any group's state, none if it is new.
    pub fn at_start(config: &openraft::Config, log: &LogEngine) -> Self {
        let hold = if log.groups().is_empty() {
            Duration::ZERO
        } else {
            Duration::from_millis(config.election_timeout_max)
        };
        let now = Instant::now();
        VoteHold {
            until: now + hold,
            started: now,
        }
    }

    /// No hold (tests of what follows the hold).
    #[cfg(test)]
    pub(crate) fn none() -> Self {
        VoteHold {
            until: Instant::now(),
            started: Instant::now(),
        }
    }

    /// A process that started `ago` (tests of the stateless vote window).
    #[cfg(test)]
    pub(crate) fn started_ago(ago: Duration) -> Self {
        VoteHold {
            until: Instant::now(),
            started: Instant::now() - ago,
        }
    }

    /// Whether replicas with no state still refuse candidates of groups that have had a leader.
    pub fn stateless_window_open(&self) -> bool {
        self.started.elapsed() < STATELESS_VOTE_WINDOW
    }

    /// The time left, if the hold is still on.
    pub fn remaining(&self) -> Option<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Keeps a replica started during the hold from standing for election until it ends.
    pub(crate) fn hold_elections(&self, raft: &Raft) {
        if self.remaining().is_none() {
            return;
        }
        raft.runtime_config().elect(false);
        let raft = raft.clone();
        let until = self.until;
        tokio::spawn(async move {
            tokio::time::sleep_until(until).await;
            raft.runtime_config().elect(true);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use dossier_api::raft::v1::RaftMessage;
    use dossier_api::raft::v1::raft_server::Raft as RaftService;
    use openraft::raft::VoteRequest;

    use super::VoteHold;
    use crate::server::RaftServer;
    use crate::server::test_registry::Registry;
    use crate::types::{TypeConfig, Vote, encode};

    async fn vote_answer(hold: VoteHold, pre: bool) -> String {
        let (_stop, stopping) = tokio::sync::watch::channel(false);
        let server = RaftServer::new(Arc::new(Registry { raft: None, hold }), stopping);
        let vote = VoteRequest::<TypeConfig>::new(Vote::new(3, 1), None);
        let mut request = tonic::Request::new(RaftMessage {
            shard_id: 7,
            payload: encode(&vote).unwrap(),
        });
        crate::network::address(&mut request, &"test".parse().unwrap(), 2);
        let answer = if pre {
            server.pre_vote(request).await
        } else {
            server.vote(request).await
        };
        answer.unwrap().into_inner().error
    }

    /// Within one lease of the start, Vote and PreVote are refused before any replica sees
    /// them; afterwards they reach the replica (here: none, so the refusal says so).
    #[tokio::test]
    async fn votes_are_refused_for_one_lease_after_the_start() {
        let config = openraft::Config {
            election_timeout_min: 150,
            election_timeout_max: 300,
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let log = dossier_storage::LogConfig {
            dir: dir.path().to_owned(),
            ..dossier_storage::LogConfig::default()
        };
        let engine = dossier_storage::LogEngine::open(log.validate().unwrap()).unwrap();
        // A new node has promised nothing.
        assert_eq!(VoteHold::at_start(&config, &engine).remaining(), None);
        let mut batch = dossier_storage::WriteBatch::new();
        batch.save_vote(7, vec![1u8]);
        engine.write(batch).unwrap();
        let hold = VoteHold::at_start(&config, &engine);
        let left = hold.remaining().expect("a restarted node holds its votes");
        assert!(left <= Duration::from_millis(300));
        for pre in [false, true] {
            let error = vote_answer(hold, pre).await;
            assert!(error.starts_with("vote held for"), "{error}");
        }
        let over = VoteHold::none();
        assert_eq!(over.remaining(), None);
        for pre in [false, true] {
            let error = vote_answer(over, pre).await;
            assert_eq!(error, "no replica of shard 7 on this node");
        }
    }
}
