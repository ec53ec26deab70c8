//! openraft `0.10.0-alpha.37` alone (its `Raft`, Dossier's storage, a scripted network): how it
//! credits a follower's answer when the network pipelines AppendEntries.
//!
//! openraft stamps each AppendEntries request with the instant it *builds* it
//! (`InflightAppend::new`) and matches an answer to its in-flight requests by log id only
//! (`InflightAppendQueue::drain_acked`): an answer that matched up to `m` acknowledges every
//! request whose last log id is at or below `m`, and the leader's quorum clock takes the newest of
//! their stamps. A request without entries, sent only to carry a new commit index, covers
//! `(m, m]`. A transport that takes the next request before the answer to the previous one has
//! been handled (a pipelined `RaftNetworkV2::stream_append`) therefore lets an old answer ending
//! at `m` be credited with the stamp of an entry-less request built later, one the follower may
//! never have received. The leader then believes a quorum acknowledged it a moment ago: its lease
//! (and a ReadIndex round, whose acknowledgements are compared by the same stamps) passes,
//! although no follower has answered anything for many leases.
//!
//! The test below shows it, deterministically, with one real node and two scripted followers:
//! 1. the followers answer normally; a write commits and a lease read passes;
//! 2. the followers make their answers to the next write but those answers stay in flight
//!    (a leader stopped by SIGSTOP, a congested link), then hear nothing more;
//! 3. five leases later a lease read fails: correct, nobody has answered for that long;
//! 4. follower 2's old answer arrives: the write commits, and openraft builds an entry-less request
//!    to follower 3 to carry the commit, which the pipelined transport takes at once;
//!    a lease read still fails (follower 2's answer is credited with the old write's stamp);
//! 5. follower 3's old answer arrives: it matches the entry-less request too, and a lease read
//!    now **passes**, crediting follower 3 with a request it never answered; a ReadIndex read
//!    begun before step 4 is confirmed by the same answer.
//!
//! `openraft_credits_an_old_answer_with_a_later_requests_time` runs it over a transport that
//! takes requests eagerly: its last assertions state openraft's behaviour today (if openraft fixes
//! it, they fail, and should then assert the reads are refused). It needs nothing of Dossier but
//! its storage, to report upstream. `the_append_session_never_credits_an_old_answer_late` runs
//! the same script over Dossier's own replication session (`crate::append::Session`, on a
//! scripted carrier instead of a gRPC stream): both reads are refused (docs/invariants.md,
//! "Lease reads"); without the session's rules both pass.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dossier_api::raft::v1::{AppendAnswer, AppendFrame};
use dossier_storage::{Batch, Command, LogConfig, LogEngine, StateStore, StoreConfig};
use futures_util::{Stream, StreamExt};
use openraft::base::{BoxFuture, BoxStream};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendError,
    StreamAppendResult, TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::SnapshotOf;
use openraft::{BasicNode, LinearizerOption, RaftNetworkFactory, RaftNetworkV2, ReadPolicy};
use tokio::sync::mpsc;

use crate::append::{AppendStreamCounts, Carrier, Session};
use crate::types::{LogId, NodeId, Request, TypeConfig, Vote, decode, encode};
use crate::{LogStore, Raft, SnapshotData, StateMachine};

type Answer = Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Answers every request at once.
    Up,
    /// Makes its answers at once but they stay in flight until `deliver`.
    InFlight,
    /// Receives nothing more (a stopped leader's requests never leave it).
    Deaf,
}

type Delivery = Box<dyn FnOnce() + Send>;

/// A scripted follower: it accepts every request of the leader's term.
struct Follower {
    mode: Mutex<Mode>,
    in_flight: Mutex<Vec<Delivery>>,
    /// Answers made to requests carrying entries.
    answered_entries: AtomicU64,
    /// Requests without entries the transport took.
    empty_taken: AtomicU64,
}

impl Follower {
    fn new() -> Arc<Follower> {
        Arc::new(Follower {
            mode: Mutex::new(Mode::Up),
            in_flight: Mutex::new(Vec::new()),
            answered_entries: AtomicU64::new(0),
            empty_taken: AtomicU64::new(0),
        })
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Takes a request; its answer (what it matched) goes to `deliver`, now or later, or never.
    fn receive(
        &self,
        request: &AppendEntriesRequest<TypeConfig>,
        deliver: impl FnOnce(Option<LogId>) + Send + 'static,
    ) {
        if request.entries.is_empty() {
            self.empty_taken.fetch_add(1, Ordering::SeqCst);
        }
        let mode = *self.mode.lock().unwrap();
        if mode == Mode::Deaf {
            return;
        }
        if !request.entries.is_empty() {
            self.answered_entries.fetch_add(1, Ordering::SeqCst);
        }
        // Accepted: it matches up to the request's last log id.
        let matched = request
            .entries
            .last()
            .map(|e| e.log_id)
            .or(request.prev_log_id);
        match mode {
            Mode::Up => deliver(matched),
            Mode::InFlight => self
                .in_flight
                .lock()
                .unwrap()
                .push(Box::new(move || deliver(matched))),
            Mode::Deaf => unreachable!(),
        }
    }

    /// The oldest answer in flight arrives.
    fn deliver_first(&self) {
        let mut in_flight = self.in_flight.lock().unwrap();
        if !in_flight.is_empty() {
            let delivery = in_flight.remove(0);
            drop(in_flight);
            delivery();
        }
    }

    /// The answers in flight arrive.
    fn deliver(&self) {
        let in_flight = std::mem::take(&mut *self.in_flight.lock().unwrap());
        for delivery in in_flight {
            delivery();
        }
    }
}

/// How the leader's `stream_append` reaches a follower.
#[derive(Debug, Clone, Copy)]
enum Transport {
    /// A task takes each request as soon as openraft builds it, whether or not the answers
    /// before it have been handled.
    Eager,
    /// Dossier's replication session, over a scripted carrier.
    Session,
}

#[derive(Clone)]
struct Network {
    transport: Transport,
    followers: Arc<BTreeMap<NodeId, Arc<Follower>>>,
    counts: Arc<AppendStreamCounts>,
}

struct Link {
    transport: Transport,
    follower: Arc<Follower>,
    counts: Arc<AppendStreamCounts>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Link;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Link {
        Link {
            transport: self.transport,
            follower: Arc::clone(&self.followers[&target]),
            counts: Arc::clone(&self.counts),
        }
    }
}

/// A carrier that hands each frame to a scripted follower and its answers back to the session.
struct ScriptedCarrier {
    follower: Arc<Follower>,
    sessions: Mutex<HashMap<u64, mpsc::Sender<AppendAnswer>>>,
    next: AtomicU64,
}

impl Carrier for ScriptedCarrier {
    fn register(&self, answers: mpsc::Sender<AppendAnswer>) -> Option<u64> {
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        self.sessions.lock().unwrap().insert(id, answers);
        Some(id)
    }

    fn send(&self, frame: AppendFrame) -> bool {
        let Some(answers) = self.sessions.lock().unwrap().get(&frame.session).cloned() else {
            return false;
        };
        let request: AppendEntriesRequest<TypeConfig> = decode(&frame.payload).unwrap();
        let session = frame.session;
        self.follower.receive(&request, move |matched| {
            let result: StreamAppendResult<TypeConfig> =
                Ok::<_, StreamAppendError<TypeConfig>>(matched);
            let _ = answers.try_send(AppendAnswer {
                session,
                payload: encode(&result).unwrap(),
                error: String::new(),
            });
        });
        true
    }

    fn end(&self, session: u64) {
        self.sessions.lock().unwrap().remove(&session);
    }
}

fn unsupported() -> NetworkError<TypeConfig> {
    NetworkError::from_string("not used by this test".to_owned())
}

impl RaftNetworkV2<TypeConfig> for Link {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        Err(RPCError::Network(unsupported()))
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        _option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, Answer>, RPCError<TypeConfig>>>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>>
            + openraft::OptionalSend
            + Unpin
            + 'static,
    {
        let follower = Arc::clone(&self.follower);
        let answers: BoxStream<'s, Answer> = match self.transport {
            Transport::Eager => {
                // Far more than the test's requests.
                let (answers, rx) = mpsc::channel(1024);
                tokio::spawn(async move {
                    let mut input = input;
                    while let Some(request) = input.next().await {
                        let answers = answers.clone();
                        follower.receive(&request, move |matched| {
                            let _ = answers.try_send(Ok(Ok(matched)));
                        });
                    }
                });
                Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
            }
            Transport::Session => {
                let carrier: Arc<dyn Carrier> = Arc::new(ScriptedCarrier {
                    follower,
                    sessions: Mutex::new(HashMap::new()),
                    next: AtomicU64::new(1),
                });
                let session = Session::start(
                    "scripted",
                    move || Ok(carrier),
                    1,
                    input,
                    crate::APPEND_PIPELINE_DEPTH,
                    Duration::from_secs(30),
                    Arc::clone(&self.counts),
                );
                Box::pin(session.into_stream())
            }
        };
        Box::pin(async move { Ok(answers) })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        Ok(VoteResponse::new(rpc.vote, None, true))
    }

    async fn full_snapshot(
        &mut self,
        _vote: Vote,
        _snapshot: SnapshotOf<TypeConfig, SnapshotData>,
        _cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        Err(StreamingError::Network(unsupported()))
    }

    async fn transfer_leader(
        &mut self,
        _req: TransferLeaderRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        Err(RPCError::Network(unsupported()))
    }
}

fn write() -> Request {
    Request(Command::Txn {
        session: None,
        batch: Batch::default(),
    })
}

/// Whether a lease read passes on the acknowledgements recorded so far (no waiting, no
/// heartbeat).
async fn lease_read_passes(raft: &Raft) -> bool {
    let option = LinearizerOption::new(None, false).with_wait_timeout(Duration::ZERO);
    raft.ensure_linearizable(option).await.is_ok()
}

/// Whether a lease read passes at some point within `within`, asking every millisecond.
async fn lease_read_passes_within(raft: &Raft, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if lease_read_passes(raft).await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// What the leader concluded once the old answers had arrived.
#[derive(Debug, PartialEq, Eq)]
struct Verdict {
    /// A lease read passed.
    lease_read: bool,
    /// A ReadIndex round begun before the old answers arrived was confirmed.
    read_index: bool,
}

/// The five steps of the module's documentation over `transport`.
async fn old_answers_after_a_stall(transport: Transport) -> (Verdict, Arc<AppendStreamCounts>) {
    let dir = tempfile::tempdir().unwrap();
    let log = LogConfig {
        dir: dir.path().join("log"),
        ..LogConfig::default()
    };
    let engine = Arc::new(LogEngine::open(log.validate().unwrap()).unwrap());
    let state = StoreConfig {
        dir: dir.path().join("state"),
        ..StoreConfig::default()
    };
    let store = Arc::new(StateStore::open(state.validate().unwrap()).unwrap());
    let sm = StateMachine::open(store, 1, dir.path().join("snapshots")).unwrap();
    // Leader lease = election_timeout_max = 100 ms.
    let lease = Duration::from_millis(100);
    let config = openraft::Config {
        heartbeat_interval: 20,
        election_timeout_min: 80,
        election_timeout_max: 100,
        ..Default::default()
    };
    let followers: BTreeMap<NodeId, Arc<Follower>> =
        [(2, Follower::new()), (3, Follower::new())].into();
    let counts = Arc::new(AppendStreamCounts::default());
    let network = Network {
        transport,
        followers: Arc::new(followers.clone()),
        counts: Arc::clone(&counts),
    };
    let raft = Raft::new(
        1,
        Arc::new(config.validate().unwrap()),
        network,
        LogStore::new(engine, 1, 8 << 20),
        sm,
    )
    .await
    .unwrap();
    let nodes: BTreeMap<NodeId, BasicNode> = (1..=3).map(|id| (id, BasicNode::default())).collect();
    raft.initialize(nodes).await.unwrap();
    raft.wait(Some(Duration::from_secs(5)))
        .current_leader(1, "node 1 leads")
        .await
        .unwrap();

    // 1. Everybody answers. (openraft takes writes only while the leader's lease is valid.)
    assert!(
        lease_read_passes_within(&raft, Duration::from_secs(5)).await,
        "the followers acknowledge the new leader"
    );
    raft.client_write(write()).await.unwrap();
    assert!(
        lease_read_passes(&raft).await,
        "a fresh quorum acknowledged the leader"
    );

    // 2. The followers answer the next write, but their answers stay in flight; then they hear
    //    nothing more.
    let (f2, f3) = (&followers[&2], &followers[&3]);
    let answered = (
        f2.answered_entries.load(Ordering::SeqCst),
        f3.answered_entries.load(Ordering::SeqCst),
    );
    f2.set(Mode::InFlight);
    f3.set(Mode::InFlight);
    let pending = {
        let raft = raft.clone();
        tokio::spawn(async move { raft.client_write(write()).await })
    };
    wait_for("both followers to answer the write", || {
        f2.answered_entries.load(Ordering::SeqCst) > answered.0
            && f3.answered_entries.load(Ordering::SeqCst) > answered.1
    })
    .await;
    f2.set(Mode::Deaf);
    f3.set(Mode::Deaf);

    // 3. Five leases later nobody has answered for five leases.
    tokio::time::sleep(lease * 5).await;
    assert!(
        !lease_read_passes(&raft).await,
        "no follower answered for five leases"
    );

    // A ReadIndex read starts now: it needs a quorum acknowledgement of a request sent after
    // this instant, and no follower will answer one.
    let read_index = {
        let raft = raft.clone();
        let option = LinearizerOption::from(ReadPolicy::ReadIndex)
            .with_wait_timeout(Duration::from_millis(1_000));
        tokio::spawn(async move { raft.ensure_linearizable(option).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;

    // 4. Follower 2's old answer arrives: the write commits, and openraft builds an entry-less
    //    request to follower 3 for the commit index.
    let empty_taken = f3.empty_taken.load(Ordering::SeqCst);
    f2.deliver();
    pending.await.unwrap().unwrap();
    wait_for("an entry-less request to follower 3", || {
        f3.empty_taken.load(Ordering::SeqCst) > empty_taken
    })
    .await;
    assert!(
        !lease_read_passes(&raft).await,
        "follower 2's answer is credited with the old write's time"
    );

    // 5. Follower 3's old answer arrives.
    f3.deliver();
    let lease_read = lease_read_passes_within(&raft, Duration::from_millis(50)).await;
    let read_index = read_index.await.unwrap().is_ok();
    raft.shutdown().await.unwrap();
    (
        Verdict {
            lease_read,
            read_index,
        },
        counts,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_credits_an_old_answer_with_a_later_requests_time() {
    let (verdict, _) = old_answers_after_a_stall(Transport::Eager).await;
    assert_eq!(
        verdict,
        Verdict {
            lease_read: true,
            read_index: true
        },
        "openraft 0.10.0-alpha.37 renews the lease, and confirms a ReadIndex round, with an \
         answer made five leases before (if this fails, openraft no longer does: assert both \
         reads are refused instead)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_append_session_never_credits_an_old_answer_late() {
    let (verdict, counts) = old_answers_after_a_stall(Transport::Session).await;
    assert_eq!(
        verdict,
        Verdict {
            lease_read: false,
            read_index: false
        },
        "no follower answered anything for five leases"
    );
    // Follower 3's old answer was held back: openraft would have matched it against the
    // entry-less request built after it.
    assert!(counts.answers_withheld.load(Ordering::Relaxed) >= 1);
}

/// An answer withheld because an entry-less request follows it is never handed over; when that
/// request goes unanswered the session fails at its deadline instead of waiting for ever, and
/// openraft starts again from a probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withheld_answer_whose_successor_is_lost_ends_the_session() {
    use openraft::entry::RaftEntry;

    let log_id = |index| LogId::new(crate::types::CommittedLeaderId::new(1), index);
    let with_entry = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(1, 1),
        prev_log_id: Some(log_id(4)),
        entries: vec![crate::types::Entry::new_blank(log_id(5))],
        leader_commit: Some(log_id(4)),
    };
    let commit_only = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(1, 1),
        prev_log_id: Some(log_id(5)),
        entries: Vec::new(),
        leader_commit: Some(log_id(5)),
    };
    let follower = Follower::new();
    follower.set(Mode::InFlight);
    let carrier: Arc<dyn Carrier> = Arc::new(ScriptedCarrier {
        follower: Arc::clone(&follower),
        sessions: Mutex::new(HashMap::new()),
        next: AtomicU64::new(1),
    });
    let counts = Arc::new(AppendStreamCounts::default());
    let ttl = Duration::from_millis(200);
    let session = Session::start(
        "scripted",
        move || Ok(carrier),
        1,
        futures_util::stream::iter([with_entry, commit_only]),
        crate::APPEND_PIPELINE_DEPTH,
        ttl,
        Arc::clone(&counts),
    );
    let answers = tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let answers: Vec<Answer> = session.into_stream().collect().await;
        (answers, started.elapsed())
    });
    wait_for("both requests sent", || {
        follower.empty_taken.load(Ordering::SeqCst) == 1
    })
    .await;
    // The answer to the first request arrives; the second's never does.
    follower.deliver_first();
    let (answers, took) = answers.await.unwrap();
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert!(
        matches!(&answers[0], Err(RPCError::Network(_))),
        "the session fails at its deadline: {answers:?}"
    );
    assert!(took >= ttl, "{took:?}");
    assert_eq!(counts.answers_withheld.load(Ordering::Relaxed), 1);
}
