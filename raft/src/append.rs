//! Pipelined AppendEntries over one long-lived gRPC stream per pair of nodes (`Replicate`).
//!
//! openraft runs replication as *sessions*: a leader's replication task opens one with
//! `stream_append` and feeds it AppendEntries requests in log order; each heartbeat is a session
//! of one request that must finish within the heartbeat interval. Opening an HTTP/2 stream per
//! session costs a stream per heartbeat (about 25 a second per group and follower) and, under
//! load, streams given up before the peer accepted them count against h2's reset limit. So the
//! sessions of every group are multiplexed over one stream per peer:
//!
//! - **Sender** ([`Mux`], one per peer address): at its first request a session joins the
//!   stream (a new session id) and sends its requests as frames, at most `depth` unanswered;
//!   one reader task routes the answers to the sessions by id. A session that ends (done,
//!   failed, or dropped by openraft at its timeout) sends an `end` frame. If the stream breaks,
//!   every session on it fails as unreachable (an idle one at its next request), and a session
//!   opens a new stream, at most once per [`REOPEN_AFTER`].
//! - **Receiver** ([`serve`]): one task reads the frames and hands each session's requests, in
//!   order, to a task running the replica's `Raft::stream_append` (which hands them to the core
//!   at once and answers in order). The reader never waits on a session: a session whose queue
//!   is full (the sender broke its window) is refused.
//!
//! Bounds: a session has at most `depth` requests unanswered (at most
//! [`SESSION_REQUESTS_QUEUED`]), so at most `depth` answers wait in its queue. The sender's
//! frame queue holds [`FRAMES_QUEUED`] frames: above three quarters no new session joins (a
//! heartbeat fails at once), and a stream whose queue is full is closed (its peer is not
//! reading). The receiver knows at most [`SESSIONS_MAX`] sessions per stream (open, or closed
//! and awaiting their `end`) before it refuses new ones. Closing a stream ends the call: the
//! receiver then drops every session of it.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use dossier_api::raft::v1::raft_client::RaftClient;
use dossier_api::raft::v1::{AppendAnswer, AppendFrame};
use dossier_storage::ShardId;
use futures_util::{Stream, StreamExt};
use openraft::errors::{NetworkError, RPCError, Unreachable};
use openraft::raft::{AppendEntriesRequest, StreamAppendResult};
use tokio::sync::{mpsc, watch};
use tonic::Status;
use tonic::transport::Channel;

use crate::group::Raft;
use crate::server::GroupRegistry;
use crate::types::{LogId, NodeId, TypeConfig, decode, encode};

/// Frames waiting for the transport on one sender stream.
pub const FRAMES_QUEUED: usize = 16_384;
/// Sessions a receiver keeps open on one stream.
pub const SESSIONS_MAX: usize = 4096;
/// Requests of one session waiting for the replica on the receiver.
pub const SESSION_REQUESTS_QUEUED: usize = 64;
/// After a stream to a peer closed, how long sessions fail at once instead of opening another
/// (every heartbeat is a session: without this, a dead peer is dialled about 25 times a second
/// per group).
pub const REOPEN_AFTER: Duration = Duration::from_millis(100);
/// Answers waiting for the transport on one receiver stream.
const ANSWERS_QUEUED: usize = 1024;

/// Replication streams and sessions of this node's leaders, for the metrics page.
#[derive(Debug, Default)]
pub struct AppendStreamCounts {
    /// `Replicate` streams opened (one per peer, again after each break).
    pub streams_opened: AtomicU64,
    /// Sessions that joined a stream (replication runs and heartbeats).
    pub sessions: AtomicU64,
    /// Sessions that failed: the stream broke, an answer was overdue, the peer refused.
    pub session_failures: AtomicU64,
    /// Answers withheld from openraft because it would have matched them against a later
    /// request (see [`Session`]).
    pub answers_withheld: AtomicU64,
}

type AnswerTx = mpsc::Sender<AppendAnswer>;

/// What a session's frames travel on: a `Replicate` stream ([`Mux`]); tests script others.
pub(crate) trait Carrier: Send + Sync + 'static {
    /// A new session whose answers go to `answers`; `None` if no session can join now.
    fn register(&self, answers: AnswerTx) -> Option<u64>;
    /// Queues a request frame of an open session; false once the session ended or the carrier
    /// closed.
    fn send(&self, frame: AppendFrame) -> bool;
    /// Ends a session.
    fn end(&self, session: u64);
}

/// The sending end of one `Replicate` stream.
#[derive(Debug)]
pub(crate) struct Mux {
    addr: String,
    frames: mpsc::Sender<AppendFrame>,
    sessions: Mutex<Sessions>,
    next_session: AtomicU64,
    /// Turns true when the mux closes: the call ends at once (queued frames dropped, the
    /// receiver forgets the stream's sessions), whoever still holds the mux.
    closing: watch::Sender<bool>,
}

#[derive(Debug, Default)]
struct Sessions {
    open: HashMap<u64, AnswerTx>,
    /// When the stream closed.
    closed: Option<tokio::time::Instant>,
}

impl Mux {
    /// Opens the stream on `channel` (lazily connected; a failure closes the mux), addressed to
    /// node `to` of `cluster`.
    pub(crate) fn open(
        addr: &str,
        channel: Channel,
        cluster: &crate::network::ClusterName,
        to: NodeId,
    ) -> Arc<Mux> {
        let (frames, outgoing) = mpsc::channel(FRAMES_QUEUED);
        let (closing, closed) = watch::channel(false);
        let mux = Arc::new(Mux {
            addr: addr.to_owned(),
            frames,
            sessions: Mutex::new(Sessions::default()),
            next_session: AtomicU64::new(1),
            closing,
        });
        let weak = Arc::downgrade(&mux);
        let mut call = tonic::Request::new(outgoing);
        crate::network::address(&mut call, cluster, to);
        tokio::spawn(read_answers(weak, channel, call, closed));
        mux
    }

    /// When the stream closed, if it did.
    pub(crate) fn closed_at(&self) -> Option<tokio::time::Instant> {
        self.lock().closed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fails every session (their answer queues close), refuses new ones and ends the call.
    fn close(&self) {
        let mut sessions = self.lock();
        Self::close_locked(&mut sessions, &self.closing);
    }

    fn close_locked(sessions: &mut Sessions, closing: &watch::Sender<bool>) {
        sessions
            .closed
            .get_or_insert_with(tokio::time::Instant::now);
        sessions.open.clear();
        closing.send_replace(true);
    }

    fn route(&self, answer: AppendAnswer) {
        if let Some(session) = self.lock().open.get(&answer.session) {
            // A session gone since (dropped at its timeout) no longer reads: nothing to do. A
            // full queue means the peer answered a request twice; the session then times out.
            if let Err(mpsc::error::TrySendError::Full(answer)) = session.try_send(answer) {
                tracing::error!(peer = %self.addr, session = answer.session, "more append answers than requests");
            }
        }
    }

    /// A full queue means the peer stopped reading: the stream is closed.
    fn queue(&self, sessions: &mut Sessions, frame: AppendFrame) -> bool {
        match self.frames.try_send(frame) {
            Ok(()) => true,
            Err(e) => {
                if matches!(e, mpsc::error::TrySendError::Full(_)) {
                    tracing::warn!(peer = %self.addr, "replication stream backed up; closing it");
                }
                Self::close_locked(sessions, &self.closing);
                false
            }
        }
    }
}

impl Carrier for Mux {
    /// A new session whose answers go to `answers`; `None` once the stream closed, or while
    /// its frame queue is more than three quarters full (the sessions on it drain it first).
    fn register(&self, answers: AnswerTx) -> Option<u64> {
        let mut sessions = self.lock();
        if sessions.closed.is_some() || self.frames.capacity() < FRAMES_QUEUED / 4 {
            return None;
        }
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        sessions.open.insert(id, answers);
        Some(id)
    }

    /// Queues a request frame of an open session; false once the session ended or the stream
    /// closed. Queued under the sessions' lock, so no frame of a session follows its `end`.
    fn send(&self, frame: AppendFrame) -> bool {
        let mut sessions = self.lock();
        if !sessions.open.contains_key(&frame.session) {
            return false;
        }
        self.queue(&mut sessions, frame)
    }

    /// Ends a session: forgets it here and tells the receiver.
    fn end(&self, session: u64) {
        let mut sessions = self.lock();
        if sessions.open.remove(&session).is_some() {
            let end = AppendFrame {
                session,
                shard_id: 0,
                payload: Vec::new(),
                end: true,
            };
            self.queue(&mut sessions, end);
        }
    }
}

/// The stream's one reader: opens the call, then routes answers until the stream ends or the
/// mux closes.
async fn read_answers(
    mux: Weak<Mux>,
    channel: Channel,
    call: tonic::Request<mpsc::Receiver<AppendFrame>>,
    closed: watch::Receiver<bool>,
) {
    let when_closed = |mut closed: watch::Receiver<bool>| async move {
        let _ = closed.wait_for(|c| *c).await;
    };
    let closing = when_closed(closed.clone());
    let call = call
        .map(|outgoing| tokio_stream::wrappers::ReceiverStream::new(outgoing).take_until(closing));
    let mut client = RaftClient::new(channel);
    let opened = tokio::select! {
        opened = client.replicate(call) => opened,
        () = when_closed(closed.clone()) => return,
    };
    match opened {
        Ok(answers) => {
            let answers = answers.into_inner().take_until(when_closed(closed));
            futures_util::pin_mut!(answers);
            loop {
                match answers.next().await {
                    Some(Ok(answer)) => match mux.upgrade() {
                        Some(mux) => mux.route(answer),
                        None => return,
                    },
                    Some(Err(status)) => {
                        tracing::debug!(error = %status, "replication stream broke");
                        break;
                    }
                    None => break,
                }
            }
        }
        Err(status) => tracing::debug!(error = %status, "replication stream not opened"),
    }
    if let Some(mux) = mux.upgrade() {
        mux.close();
    }
}

/// Where a session stands with its stream: it joins at its first request (after any backoff
/// openraft applies in the request stream, so a dead peer is not redialled at once).
enum Link<O> {
    NotYet {
        open: O,
        answers: AnswerTx,
    },
    Joined(Arc<dyn Carrier>, u64),
    /// Joining failed; the session has reported it.
    Failed,
}

fn closed(addr: &str) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::from_string(format!(
        "replication stream to {addr} closed"
    )))
}

/// A request sent and not answered yet, as openraft's in-flight queue knows it: the log ids
/// `(prev, last]` it covers (`last == prev` for a request without entries).
#[derive(Debug)]
struct Unanswered {
    prev: Option<LogId>,
    last: Option<LogId>,
}

impl Unanswered {
    fn of(request: &AppendEntriesRequest<TypeConfig>) -> Self {
        let prev = request.prev_log_id;
        let last = request.entries.last().map(|e| e.log_id).or(prev);
        Unanswered { prev, last }
    }

    /// Whether openraft, handed an answer that matched up to `matching`, takes this request as
    /// acknowledged, wholly or in part, and credits the quorum clock with the time it created
    /// it (openraft 0.10's `InflightAppendQueue::drain_acked`: every request with
    /// `last <= matching`, and one with `prev < matching`).
    fn acknowledged_by(&self, matching: &Option<LogId>) -> bool {
        *matching >= self.last || *matching > self.prev
    }
}

/// One openraft replication session, as the stream of its answers.
///
/// Requests are pulled from openraft's request stream and sent, and answers received, all
/// while openraft waits for the next answer: never while openraft handles the previous one.
/// That, and the rule on withheld answers below, keep the leader's lease honest.
///
/// **Why (the lease).** openraft stamps each AppendEntries request with the instant it
/// *creates* it, and matches an answer to its requests by log id only: an answer that matched
/// up to `m` acknowledges every in-flight request whose last log id is at or below `m`, and the
/// leader's quorum clock takes the *newest* of their stamps. A request without entries (it
/// carries only a new commit index) covers `(m, m]`: if it was created after the follower
/// answered an older request ending at `m`, that older answer would be credited with the empty
/// request's later stamp. After a pause (SIGSTOP, a long stall) the stale answers sitting in the
/// socket would then renew the lease of a leader that was deposed meanwhile, and it would serve
/// linearizable reads from its stale state (docs/invariants.md, "Lease reads"). So:
/// - a request is pulled only while openraft awaits this stream, so no request is created
///   between handing openraft an answer and openraft matching it;
/// - an answer that openraft would match against a later request of this session (the next
///   one unanswered is acknowledged by it, in `Unanswered::acknowledged_by`'s sense) is
///   withheld: the later request's own answer acknowledges both, with a stamp taken before that
///   answer was made. Only requests without entries are ever in that position, and withholding
///   costs at most the round trip of the request behind.
pub(crate) struct Session<S, O> {
    addr: String,
    shard: ShardId,
    link: Link<O>,
    input: S,
    input_ended: bool,
    answers: mpsc::Receiver<AppendAnswer>,
    /// The stream closed; answers no longer come.
    answers_closed: bool,
    /// Sent and not answered, oldest first; at most `depth`.
    unanswered: VecDeque<Unanswered>,
    depth: usize,
    ttl: Duration,
    /// When the oldest unanswered request (or the last answer, if later) is overdue.
    deadline: Option<tokio::time::Instant>,
    counts: Arc<AppendStreamCounts>,
}

impl<S, O> Session<S, O>
where
    S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    O: FnOnce() -> Result<Arc<dyn Carrier>, RPCError<TypeConfig>> + Send + 'static,
{
    /// A session of `shard` to the peer at `addr`: it sends `input`'s requests as they come,
    /// at most `depth` unanswered, on the stream `open` gives. `ttl` bounds the wait for an
    /// answer while one is due.
    pub(crate) fn start(
        addr: &str,
        open: O,
        shard: ShardId,
        input: S,
        depth: usize,
        ttl: Duration,
        counts: Arc<AppendStreamCounts>,
    ) -> Self {
        // The receiver queues at most SESSION_REQUESTS_QUEUED requests of a session.
        let depth = depth.clamp(1, SESSION_REQUESTS_QUEUED);
        // A session has at most `depth` requests unanswered, and the peer answers each once.
        let (answers_tx, answers) = mpsc::channel(depth);
        Session {
            addr: addr.to_owned(),
            shard,
            link: Link::NotYet {
                open,
                answers: answers_tx,
            },
            input,
            input_ended: false,
            answers,
            answers_closed: false,
            unanswered: VecDeque::with_capacity(depth),
            depth,
            ttl,
            deadline: None,
            counts,
        }
    }

    /// The next answer; `None` once every request sent was answered and the input ended.
    async fn next_answer(
        &mut self,
    ) -> Option<Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>> {
        loop {
            if self.input_ended && self.unanswered.is_empty() {
                return None;
            }
            if self.answers_closed && (!self.unanswered.is_empty() || self.input_ended) {
                return Some(Err(closed(&self.addr)));
            }
            if self.unanswered.is_empty() {
                self.deadline = None;
            } else if self.deadline.is_none() {
                self.deadline = Some(tokio::time::Instant::now() + self.ttl);
            }
            let deadline = self.deadline;
            let awaiting_answer = !self.unanswered.is_empty() && !self.answers_closed;
            let may_send = !self.input_ended && self.unanswered.len() < self.depth;
            tokio::select! {
                // An answer at hand wins over a new request or a deadline in the same poll.
                biased;
                answer = self.answers.recv(), if awaiting_answer => {
                    // The next answer gets a full `ttl` again.
                    self.deadline = None;
                    let Some(answer) = answer else {
                        // The stream closed: what is unanswered fails above.
                        self.answers_closed = true;
                        continue;
                    };
                    self.unanswered.pop_front();
                    let answer = crate::network::answer(&answer.payload, answer.error);
                    if let Ok(Ok(matching)) = &answer
                        && self.unanswered.front().is_some_and(|next| next.acknowledged_by(matching))
                    {
                        self.counts.answers_withheld.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    return Some(answer);
                }
                // Cancel-safe: a request openraft is still building stays in its stream.
                request = self.input.next(), if may_send => match request {
                    None => self.input_ended = true,
                    Some(request) => {
                        if let Err(e) = self.send(&request) {
                            return Some(Err(e));
                        }
                    }
                },
                () = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)),
                    if deadline.is_some() =>
                {
                    return Some(Err(RPCError::Network(NetworkError::from_string(format!(
                        "no append answer from {} within {:?}",
                        self.addr, self.ttl
                    )))));
                }
            }
        }
    }

    /// Sends one request, joining the stream at the first.
    fn send(
        &mut self,
        request: &AppendEntriesRequest<TypeConfig>,
    ) -> Result<(), RPCError<TypeConfig>> {
        let payload = encode(request).map_err(|e| {
            tracing::error!(shard = self.shard, error = %e, "append request does not encode");
            RPCError::Network(NetworkError::new(&e))
        })?;
        let shard = self.shard;
        let (carrier, session) = self.join()?;
        let sent = carrier.send(AppendFrame {
            session,
            shard_id: shard,
            payload,
            end: false,
        });
        if !sent {
            return Err(closed(&self.addr));
        }
        self.unanswered.push_back(Unanswered::of(request));
        Ok(())
    }

    /// The stream and this session's id on it, joining at the first call.
    fn join(&mut self) -> Result<(&dyn Carrier, u64), RPCError<TypeConfig>> {
        if matches!(self.link, Link::NotYet { .. }) {
            let Link::NotYet { open, answers } = std::mem::replace(&mut self.link, Link::Failed)
            else {
                unreachable!("matched above");
            };
            let carrier = open()?;
            let id = carrier
                .register(answers)
                .ok_or_else(|| closed(&self.addr))?;
            self.counts.sessions.fetch_add(1, Ordering::Relaxed);
            self.link = Link::Joined(carrier, id);
        }
        match &self.link {
            Link::Joined(carrier, id) => Ok((carrier.as_ref(), *id)),
            _ => Err(closed(&self.addr)),
        }
    }

    /// The answers as openraft wants them: in order, ending after the first error or refusal.
    pub(crate) fn into_stream(
        self,
    ) -> impl Stream<Item = Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>> + Send + 'static
    {
        futures_util::stream::unfold(Some(self), |session| async move {
            let mut session = session?;
            let answer = session.next_answer().await?;
            let go_on = matches!(answer, Ok(Ok(_)));
            if let Err(e) = &answer {
                tracing::debug!(peer = %session.addr, error = %e, "append session failed");
                session
                    .counts
                    .session_failures
                    .fetch_add(1, Ordering::Relaxed);
            }
            Some((answer, go_on.then_some(session)))
        })
    }
}

impl<S, O> Drop for Session<S, O> {
    fn drop(&mut self) {
        if let Link::Joined(mux, id) = &self.link {
            mux.end(*id);
        }
    }
}

/// The receiving end of one `Replicate` stream: the answers, until the frames end or `stopping`
/// turns true (the node stops serving; the sender then fails its sessions and reconnects
/// elsewhere or later).
pub(crate) fn serve<R: GroupRegistry>(
    registry: Arc<R>,
    frames: tonic::Streaming<AppendFrame>,
    stopping: watch::Receiver<bool>,
) -> impl Stream<Item = Result<AppendAnswer, Status>> + Send + 'static {
    let (answers, outgoing) = mpsc::channel(ANSWERS_QUEUED);
    tokio::spawn(dispatch(registry, frames, answers, stopping.clone()));
    let mut stop = stopping;
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio_stream::wrappers::ReceiverStream::new(outgoing)
        .map(Ok)
        .take_until(stopped)
}

/// A session as the receiver knows it, until the sender's `end`.
enum Incoming {
    Open {
        shard: ShardId,
        requests: mpsc::Sender<AppendEntriesRequest<TypeConfig>>,
    },
    /// Refused or ended here (after a refusal by the replica): later frames are dropped, not
    /// taken for a new session.
    Closed,
}

/// Reads the frames and hands each session's requests to its task, never waiting on one.
async fn dispatch<R: GroupRegistry>(
    registry: Arc<R>,
    mut frames: tonic::Streaming<AppendFrame>,
    answers: mpsc::Sender<AppendAnswer>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut sessions: HashMap<u64, Incoming> = HashMap::new();
    let refuse = |session: u64, error: String| {
        let refusal = refusal(session, error);
        // The reader does not wait: a refusal that finds the answers backed up waits in a task
        // (one per refused session at most: a refused session's later frames are dropped).
        if let Err(mpsc::error::TrySendError::Full(refusal)) = answers.try_send(refusal) {
            let answers = answers.clone();
            tokio::spawn(async move {
                let _ = answers.send(refusal).await;
            });
        }
    };
    loop {
        let frame = tokio::select! {
            frame = frames.next() => frame,
            _ = stopping.wait_for(|s| *s) => return,
        };
        let frame = match frame {
            Some(Ok(frame)) => frame,
            Some(Err(status)) => {
                tracing::debug!(error = %status, "replication stream from a peer broke");
                return;
            }
            None => return,
        };
        let id = frame.session;
        if frame.end {
            sessions.remove(&id);
            continue;
        }
        // The sender queues no frame of a session after its end: an unknown id is a new session.
        // Sessions refused or closed here count until their end too (the sender ends each).
        let full = sessions.len() >= SESSIONS_MAX;
        let incoming = match sessions.entry(id) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) if full => {
                refuse(id, format!("more than {SESSIONS_MAX} append sessions open"));
                // Remembered until its end (a refused session's entry costs a few bytes; the
                // sender has that many sessions open at most).
                entry.insert(Incoming::Closed);
                continue;
            }
            Entry::Vacant(entry) => match registry.raft(frame.shard_id) {
                None => {
                    refuse(
                        id,
                        format!("no replica of shard {} on this node", frame.shard_id),
                    );
                    entry.insert(Incoming::Closed)
                }
                Some(raft) => {
                    let (requests, queued) = mpsc::channel(SESSION_REQUESTS_QUEUED);
                    tokio::spawn(answer_session(raft, id, queued, answers.clone()));
                    entry.insert(Incoming::Open {
                        shard: frame.shard_id,
                        requests,
                    })
                }
            },
        };
        let Incoming::Open { shard, requests } = incoming else {
            continue;
        };
        let refusal = if *shard != frame.shard_id {
            Some("append session changed shard".to_owned())
        } else {
            match decode::<AppendEntriesRequest<TypeConfig>>(&frame.payload) {
                Err(e) => Some(format!("undecodable append request: {e}")),
                Ok(request) => {
                    match requests.try_send(woken(&*registry, frame.shard_id, request)) {
                        Ok(()) => None,
                        Err(mpsc::error::TrySendError::Full(_)) => Some(format!(
                            "more than {SESSION_REQUESTS_QUEUED} append requests unanswered"
                        )),
                        // The replica ended the session: its last answer was a refusal.
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            *incoming = Incoming::Closed;
                            continue;
                        }
                    }
                }
            }
        };
        if let Some(refusal) = refusal {
            *incoming = Incoming::Closed;
            refuse(id, refusal);
        }
    }
}

/// Entries to append need the replica's timers: a quiescent replica wakes up first.
fn woken<R: GroupRegistry>(
    registry: &R,
    shard: u64,
    request: AppendEntriesRequest<TypeConfig>,
) -> AppendEntriesRequest<TypeConfig> {
    if !request.entries.is_empty() {
        registry.active(shard);
    }
    request
}

/// The receiver's answer that ends a session it cannot serve.
fn refusal(session: u64, error: String) -> AppendAnswer {
    AppendAnswer {
        session,
        payload: Vec::new(),
        error,
    }
}

/// Runs one session through the replica and queues its answers, in order.
async fn answer_session(
    raft: Raft,
    session: u64,
    requests: mpsc::Receiver<AppendEntriesRequest<TypeConfig>>,
    answers: mpsc::Sender<AppendAnswer>,
) {
    let results = raft.stream_append(tokio_stream::wrappers::ReceiverStream::new(requests));
    futures_util::pin_mut!(results);
    while let Some(result) = results.next().await {
        let answer = match result.map(|appended| encode(&appended)) {
            Ok(Ok(payload)) => AppendAnswer {
                session,
                payload,
                error: String::new(),
            },
            Ok(Err(e)) => refusal(session, format!("append result does not encode: {e}")),
            Err(fatal) => refusal(session, fatal.to_string()),
        };
        if answers.send(answer).await.is_err() {
            // The stream ended.
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Unanswered;
    use crate::types::LogId;

    fn id(index: u64) -> Option<LogId> {
        Some(LogId::new(crate::types::CommittedLeaderId::new(1), index))
    }

    /// The rule follows openraft's `drain_acked`: a request is acknowledged by an answer that
    /// matched its last entry or beyond, or partly, by one past its first entry.
    #[test]
    fn acknowledged_by_follows_openraft_matching() {
        let entries = Unanswered {
            prev: id(5),
            last: id(8),
        };
        let empty = Unanswered {
            prev: id(8),
            last: id(8),
        };
        let first = Unanswered {
            prev: None,
            last: None,
        };
        for (request, matching, acknowledged) in [
            (&entries, id(8), true),
            (&entries, id(9), true),
            (&entries, id(6), true),
            (&entries, id(5), false),
            (&entries, None, false),
            // An entry-less request is covered by any answer that matched up to its position.
            (&empty, id(8), true),
            (&empty, id(7), false),
            (&first, None, true),
        ] {
            assert_eq!(
                request.acknowledged_by(&matching),
                acknowledged,
                "{request:?} by {matching:?}"
            );
        }
    }
}
