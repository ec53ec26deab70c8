//! Quiescent groups: a group nobody writes costs no timer, no heartbeat and no message.
//!
//! With quiescence on (`raft.quiesce-after-ms` not 0), the leader of a data group whose log has
//! not grown for that long, every member holding all of it, stops its own Raft timers
//! (openraft's tick: no heartbeats) and asks each member to do the same (`Raft.Quiesce`). A member agrees only when it
//! follows that leader in that term and holds its whole log, and while the leader's node answers
//! its pings (`liveness.rs`). If a voter does not agree, the leader starts its timers again: the
//! group stays awake.
//!
//! A quiescent group wakes up:
//! - on the leader, when it is used: a write, a linearizable read, a membership change, a
//!   leadership transfer (`Node::wake_if_leader`): its timers start again, and the entries it
//!   sends wake the followers;
//! - on a member, when a message that needs its timers arrives (entries, a vote or pre-vote, a
//!   snapshot, a leadership transfer; not a heartbeat): its timers start with its own candidacy
//!   held back for one leader lease, so that the leader's next heartbeat arrives first;
//! - on a member, when the leader's node stops answering pings for `liveness::DEAD_AFTER`: its
//!   timers start with its candidacy held back by a random part of the election timeout (so that
//!   the members do not all stand at once), and the group elects as after any leader loss;
//! - on a leader, when a member's node restarted (a new incarnation): its timers start, so that
//!   the restarted member hears a leader before its election timeout.
//!
//! Safety does not depend on any of this: a quiescent group sends nothing and changes nothing, a
//! leader whose followers stopped hearing it loses its read lease (a read first sends heartbeats
//! for a fresh quorum acknowledgement), and the only vote this adds is a refusal: a quiescent
//! member refuses pre-votes while its leader's node answers pings, which keeps a member that
//! lost sight of the leader from deposing a leader that the others still reach (its first
//! pre-vote also wakes the group, so the next round is Raft's own decision).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dossier_api::raft::v1::QuiesceRequest;
use dossier_api::raft::v1::raft_client::RaftClient;
use dossier_api::v1::NodeState;
use dossier_raft::Raft;
use dossier_raft::openraft::ServerState;
use dossier_raft::openraft::async_runtime::WatchReceiver;
use tokio::sync::watch;
use tracing::debug;

use crate::liveness::{self, PING_EVERY, PING_TIMEOUT};
use crate::meta::META_SHARD;
use crate::node::Node;

/// How often the leader looks for groups to quiesce.
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// How long a member may take to answer a Quiesce request.
const QUIESCE_TIMEOUT: Duration = Duration::from_millis(300);

/// One group's quiescence on this node.
#[derive(Debug, Default)]
pub(crate) struct Quiet {
    /// Set while the group may be quiescent, or its leader is being woken: the fast path of
    /// every wake reads only this.
    maybe: AtomicBool,
    /// The leader it is quiescent under (this node when it leads), None when awake.
    leader: Mutex<Option<u64>>,
    /// Held while a quiescent leader wakes for its first use; the uses that come meanwhile wait
    /// for it (`Node::wake_if_leader`).
    waking: tokio::sync::Mutex<()>,
    /// The last log index the group quiesced at, on its leader.
    index: AtomicU64,
}

impl Quiet {
    /// Whether the group may be quiescent (or its leader is being woken).
    pub(crate) fn may_be(&self) -> bool {
        self.maybe.load(Ordering::Acquire)
    }

    /// The leader the group is quiescent under, if it is.
    pub(crate) fn leader(&self) -> Option<u64> {
        if !self.may_be() {
            return None;
        }
        *self.leader.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the group's timers under `leader`.
    fn quiesce(&self, raft: &Raft, leader: u64) {
        let mut state = self.leader.lock().unwrap_or_else(|e| e.into_inner());
        *state = Some(leader);
        self.index.store(
            raft.metrics().borrow_watched().last_log_index.unwrap_or(0),
            Ordering::Release,
        );
        self.maybe.store(true, Ordering::Release);
        raft.runtime_config().tick(false);
    }

    /// Starts the group's timers again, its own candidacy held back for `hold`. Returns whether
    /// it was quiescent.
    fn wake(&self, raft: &Raft, hold: Duration) -> bool {
        let woke = self.start(raft, hold);
        if woke {
            self.maybe.store(false, Ordering::Release);
        }
        woke
    }

    /// `wake` but for the fast-path flag, which the caller clears once the group is usable.
    fn start(&self, raft: &Raft, hold: Duration) -> bool {
        if !self.may_be() {
            return false;
        }
        let mut state = self.leader.lock().unwrap_or_else(|e| e.into_inner());
        if state.take().is_none() {
            return false;
        }
        if !hold.is_zero() {
            raft.runtime_config().elect(false);
            let raft = raft.clone();
            tokio::spawn(async move {
                tokio::time::sleep(hold).await;
                raft.runtime_config().elect(true);
            });
        }
        raft.runtime_config().tick(true);
        true
    }
}

impl Node {
    fn quiescence_on(&self) -> bool {
        self.config.node.raft.quiescence_ms() > 0
    }

    /// One leader lease: how long a woken member holds back its candidacy.
    fn lease(&self) -> Duration {
        Duration::from_millis(self.config.node.raft.election_timeout_max_ms)
    }

    /// Before this node uses `shard`'s group as its leader (a write, a linearizable read, a
    /// membership change, a transfer): wakes it if it is quiescent under this node, and renews
    /// its leader lease first (one heartbeat round): openraft refuses writes on a leader whose
    /// lease expired (`ForwardReason::LeaseExpired`, no leader named), and a quiescent leader's
    /// has. Uses that come meanwhile wait for it. A quiescent follower stays so (the request is
    /// sent on to the leader).
    pub(crate) async fn wake_if_leader(&self, shard: u64) {
        if !self.may_be_quiet(shard) {
            return;
        }
        let Some((raft, quiet)) = self.quiet_group(shard) else {
            return;
        };
        let _waking = quiet.waking.lock().await;
        if quiet.leader() != Some(self.node_id()) || !quiet.start(&raft, Duration::ZERO) {
            return;
        }
        self.metrics.quiescence_wakes.inc();
        let option = self.config.node.raft.read_option();
        if let Err(e) = tokio::time::timeout(self.lease(), raft.ensure_linearizable(option)).await {
            debug!(shard, error = %e, "the woken leader did not renew its lease in time");
        }
        quiet.maybe.store(false, Ordering::Release);
    }

    /// A message that needs the group's timers arrived (`GroupRegistry::active`).
    pub(crate) fn wake_on_message(&self, shard: u64) {
        if self.may_be_quiet(shard)
            && let Some((raft, quiet)) = self.quiet_group(shard)
            && quiet.wake(&raft, self.lease())
        {
            self.metrics.quiescence_wakes.inc();
        }
    }

    /// Whether a pre-vote from `candidate` for `shard` is refused: the group is quiescent here
    /// under a leader whose node answers pings (or under this node).
    pub(crate) fn quiet_pre_vote_refusal(&self, shard: u64, candidate: u64) -> Option<String> {
        let (raft, quiet) = self.quiet_group(shard)?;
        let leader = quiet.leader()?;
        if leader == candidate {
            return None;
        }
        if leader == self.node_id() {
            // Deposed meanwhile (a paused leader that came back): Raft decides.
            if raft.metrics().borrow_watched().state != ServerState::Leader {
                return None;
            }
            return Some(format!(
                "shard {shard} is quiescent under this node, which leads it"
            ));
        }
        self.liveness.alive(leader).then(|| {
            format!("shard {shard} is quiescent under node {leader}, whose node answers pings")
        })
    }

    /// A leader's Quiesce request (`GroupRegistry::quiesce`).
    pub(crate) fn quiesce_here(&self, r: &QuiesceRequest) -> Result<(), String> {
        if !self.quiescence_on() {
            return Err("quiescence is off on this node".into());
        }
        if !self.liveness.alive(r.leader) {
            return Err(format!(
                "node {} does not answer this node's pings",
                r.leader
            ));
        }
        let (raft, quiet) = self
            .quiet_group(r.shard_id)
            .ok_or_else(|| format!("no replica of shard {} here", r.shard_id))?;
        let m = raft.metrics().borrow_watched().clone();
        if !matches!(m.state, ServerState::Follower | ServerState::Learner) {
            return Err(format!("this replica is {:?}", m.state));
        }
        if m.current_leader != Some(r.leader) || m.current_term != r.term {
            return Err(format!(
                "this replica follows {:?} in term {}",
                m.current_leader, m.current_term
            ));
        }
        if m.last_log_index != Some(r.last_log_index) {
            return Err(format!(
                "this replica's log ends at {:?}, not {}",
                m.last_log_index, r.last_log_index
            ));
        }
        quiet.quiesce(&raft, r.leader);
        Ok(())
    }

    /// Quiesces `shard`'s group, led here and idle: stops its timers and asks every member to;
    /// wakes it again if a voter does not agree. Returns whether it stayed quiescent.
    async fn quiesce_group(&self, shard: u64, raft: &Raft, quiet: &Quiet) -> bool {
        let m = raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership().clone();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let me = self.node_id();
        let Some(last) = m.last_log_index else {
            return false;
        };
        quiet.quiesce(raft, me);
        let asks = membership
            .nodes()
            .filter(|(id, _)| **id != me)
            .map(|(id, node)| {
                let (id, addr) = (*id, node.addr.clone());
                let request = self.ctx.pool.addressed(
                    QuiesceRequest {
                        shard_id: shard,
                        leader: me,
                        term: m.current_term,
                        last_log_index: last,
                    },
                    id,
                );
                let channel = self.ctx.pool.channel(&addr);
                async move {
                    let Ok(channel) = channel else {
                        return (id, Err("no channel".to_owned()));
                    };
                    let answer = tokio::time::timeout(
                        QUIESCE_TIMEOUT,
                        RaftClient::new(channel).quiesce(request),
                    )
                    .await;
                    let answer = match answer {
                        Err(_) => Err("no answer in time".to_owned()),
                        Ok(Err(status)) => Err(status.message().to_owned()),
                        Ok(Ok(r)) if r.get_ref().quiet => Ok(()),
                        Ok(Ok(r)) => Err(r.into_inner().refusal),
                    };
                    (id, answer)
                }
            });
        let answers = futures_util::future::join_all(asks).await;
        let refused: Vec<(u64, String)> = answers
            .into_iter()
            .filter_map(|(id, a)| a.err().map(|e| (id, e)))
            .filter(|(id, _)| voters.contains(id))
            .collect();
        if refused.is_empty() {
            debug!(shard, last, "group quiescent");
            return true;
        }
        debug!(
            shard,
            ?refused,
            "a voter did not quiesce; the group stays awake"
        );
        quiet.wake(raft, Duration::ZERO);
        false
    }

    /// Pings every other node of the map that has no ping in flight, each in a task of its own,
    /// so that a peer that does not answer delays no other: an answer records the peer alive,
    /// and a restarted peer wakes the groups led here that it is a member of.
    fn ping_peers(self: &Arc<Self>) {
        let Some(map) = self.map() else {
            return;
        };
        let me = self.node_id();
        let incarnation = self.liveness.incarnation();
        for n in &map.nodes {
            if n.node_id == me || n.state == NodeState::Removed as i32 {
                continue;
            }
            let Ok(channel) = self.ctx.pool.channel(&n.address) else {
                continue;
            };
            let id = n.node_id;
            if !self.liveness.start_ping(id) {
                continue;
            }
            let request = self.ctx.pool.addressed(
                dossier_api::raft::v1::PingRequest {
                    from_node: me,
                    incarnation,
                },
                id,
            );
            let node = Arc::clone(self);
            tokio::spawn(async move {
                let answer =
                    tokio::time::timeout(PING_TIMEOUT, RaftClient::new(channel).ping(request))
                        .await;
                node.liveness.end_ping(id);
                if let Ok(Ok(reply)) = answer
                    && node.liveness.heard(id, reply.into_inner().incarnation)
                {
                    node.wake_groups_with(id);
                }
            });
        }
    }

    /// Wakes the groups quiescent here under a leader whose node is not heard from.
    fn wake_silent_leaders(&self) {
        let me = self.node_id();
        for (shard, raft, quiet) in self.quiet_groups() {
            if let Some(leader) = quiet.leader()
                && leader != me
                && !self.liveness.alive(leader)
            {
                // A random part of the election timeout, so the members do not stand at once.
                let min = self.config.node.raft.election_timeout_min_ms.max(1);
                let hold = Duration::from_millis(liveness::random_u64() % min);
                if quiet.wake(&raft, hold) {
                    self.metrics.quiescence_wakes.inc();
                    debug!(
                        shard,
                        leader, "the quiescent leader's node is silent: waking up"
                    );
                }
            }
        }
    }

    /// Wakes the groups quiescent under this node that `node` is a member of (it restarted, and
    /// must hear a leader before its election timeout).
    pub(crate) fn wake_groups_with(&self, node: u64) {
        let me = self.node_id();
        for (shard, raft, quiet) in self.quiet_groups() {
            if quiet.leader() == Some(me)
                && raft
                    .metrics()
                    .borrow_watched()
                    .membership_config
                    .membership()
                    .get_node(&node)
                    .is_some()
                && quiet.wake(&raft, Duration::ZERO)
            {
                self.metrics.quiescence_wakes.inc();
                debug!(shard, node, "a member restarted: waking up");
            }
        }
    }

    /// Quiesces, one round, the data groups led here whose log has not grown since
    /// `quiesce-after-ms` (`idle`: each group's last index and since when).
    async fn quiesce_idle(&self, idle: &mut HashMap<u64, (u64, Instant)>) {
        let after = Duration::from_millis(self.config.node.raft.quiescence_ms());
        let me = self.node_id();
        let mut seen = Vec::new();
        for (shard, raft, quiet) in self.quiet_groups() {
            if shard == META_SHARD {
                continue;
            }
            if quiet.leader() == Some(me) {
                // A write that passed its wake-up check just before the group quiesced appends
                // to a leader whose timers are off, and openraft restarts a broken replication
                // stream only on a timer: the log having grown, the leader wakes.
                let grown = raft.metrics().borrow_watched().last_log_index.unwrap_or(0)
                    != quiet.index.load(Ordering::Acquire);
                if grown && quiet.wake(&raft, Duration::ZERO) {
                    self.metrics.quiescence_wakes.inc();
                    debug!(shard, "the log grew while quiescent: waking up");
                }
                continue;
            }
            if quiet.leader().is_some() {
                continue;
            }
            let ready = {
                let metrics = raft.metrics();
                let m = metrics.borrow_watched();
                if m.state != ServerState::Leader || m.current_leader != Some(me) {
                    continue;
                }
                let last = m.last_log_index.unwrap_or(0);
                seen.push(shard);
                let since = idle.entry(shard).or_insert((last, Instant::now()));
                if since.0 != last {
                    *since = (last, Instant::now());
                    continue;
                }
                let applied = m.last_applied.map(|l| l.index);
                let all_hold = m.replication.as_ref().is_some_and(|r| {
                    r.iter()
                        .all(|(id, matched)| *id == me || matched.map(|l| l.index) == Some(last))
                });
                let settled = m.membership_config.membership().get_joint_config().len() == 1;
                since.1.elapsed() >= after && applied == Some(last) && all_hold && settled
            };
            // A member whose node does not answer pings would not answer the request either.
            let heard = ready
                && raft
                    .metrics()
                    .borrow_watched()
                    .membership_config
                    .membership()
                    .nodes()
                    .all(|(id, _)| *id == me || self.liveness.alive(*id));
            if heard && self.quiesce_group(shard, &raft, &quiet).await {
                self.metrics.quiescence_sleeps.inc();
            }
        }
        idle.retain(|s, _| seen.contains(s));
    }
}

/// The quiescence loops of a node (when `raft.quiesce-after-ms` is not 0): liveness pings and the
/// watch on quiescent groups' leaders every `PING_EVERY`, and, in a loop of its own (a Quiesce
/// round may wait on a slow member), idle groups looked for every `CHECK_EVERY`.
pub(crate) async fn run(node: Arc<Node>, mut stop: watch::Receiver<bool>) {
    if !node.quiescence_on() {
        return;
    }
    let quiescer = {
        let node = Arc::clone(&node);
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let mut idle = HashMap::new();
            loop {
                if !node.is_stopping() {
                    node.quiesce_idle(&mut idle).await;
                }
                tokio::select! {
                    _ = tokio::time::sleep(CHECK_EVERY) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        })
    };
    loop {
        node.ping_peers();
        node.wake_silent_leaders();
        tokio::select! {
            _ = tokio::time::sleep(PING_EVERY) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    quiescer.abort();
}
