//! Pipelined AppendEntries over one long-lived gRPC stream per pair of nodes (`Replicate`).
//!
//! openraft runs replication as *sessions*: a leader's replication task opens one with
//! `stream_append` and feeds it AppendEntries requests in log order; each heartbeat is a session
//! of one request that must finish within the heartbeat interval. Opening an HTTP/2 stream per
//! session costs a stream per heartbeat (about 25 a second per group and follower) and, under
//! load, streams given up before the peer accepted them count against h2's reset limit. So the
//! sessions of every group are multiplexed over one stream per peer:
//!
//! - **Sender** ([`Mux`], one per peer address): a session takes the next session id and sends
//!   its requests as frames, at most `depth` unanswered; one reader task routes the answers to
//!   the sessions by id. A session that ends (done, failed, or dropped by openraft at its
//!   timeout) sends an `end` frame. If the stream breaks, every session on it fails as
//!   unreachable and the next session opens a new stream.
//! - **Receiver** ([`serve`]): one task reads the frames and hands each session's requests, in
//!   order, to a task running the replica's `Raft::stream_append` (which hands them to the core
//!   at once and answers in order). The reader never waits on a session: a session whose queue
//!   is full (the sender broke its window) is refused.
//!
//! Bounds: a session has at most `depth` requests unanswered, so at most `depth` answers wait in
//! its queue; the sender's frame queue holds [`FRAMES_QUEUED`] frames, and a stream whose queue
//! is full is closed (its peer is not reading); the receiver keeps at most [`SESSIONS_MAX`]
//! sessions per stream and [`SESSION_REQUESTS_QUEUED`] requests per session.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use dossier_api::raft::v1::raft_client::RaftClient;
use dossier_api::raft::v1::{AppendAnswer, AppendFrame};
use dossier_storage::ShardId;
use futures_util::{Stream, StreamExt};
use openraft::errors::{NetworkError, RPCError, Unreachable};
use openraft::raft::{AppendEntriesRequest, StreamAppendResult};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot, watch};
use tonic::Status;
use tonic::transport::Channel;

use crate::group::Raft;
use crate::server::GroupRegistry;
use crate::types::{TypeConfig, decode, encode};

/// Frames waiting for the transport on one sender stream.
pub const FRAMES_QUEUED: usize = 4096;
/// Sessions a receiver keeps open on one stream.
pub const SESSIONS_MAX: usize = 4096;
/// Requests of one session waiting for the replica on the receiver.
pub const SESSION_REQUESTS_QUEUED: usize = 64;
/// Answers waiting for the transport on one receiver stream.
const ANSWERS_QUEUED: usize = 1024;

/// Replication streams and sessions of this node's leaders, for the metrics page.
#[derive(Debug, Default)]
pub struct AppendStreamCounts {
    /// `Replicate` streams opened (one per peer, again after each break).
    pub streams_opened: AtomicU64,
    /// Sessions started (replication runs and heartbeats).
    pub sessions: AtomicU64,
    /// Sessions that failed: the stream broke, an answer was overdue, the peer refused.
    pub session_failures: AtomicU64,
}

type AnswerTx = mpsc::UnboundedSender<AppendAnswer>;

/// The sending end of one `Replicate` stream.
#[derive(Debug)]
pub(crate) struct Mux {
    addr: String,
    frames: mpsc::Sender<AppendFrame>,
    sessions: Mutex<Sessions>,
    next_session: AtomicU64,
}

#[derive(Debug, Default)]
struct Sessions {
    open: HashMap<u64, AnswerTx>,
    closed: bool,
}

impl Mux {
    /// Opens the stream on `channel` (lazily connected; a failure closes the mux).
    pub(crate) fn open(addr: &str, channel: Channel) -> Arc<Mux> {
        let (frames, outgoing) = mpsc::channel(FRAMES_QUEUED);
        let mux = Arc::new(Mux {
            addr: addr.to_owned(),
            frames,
            sessions: Mutex::new(Sessions::default()),
            next_session: AtomicU64::new(1),
        });
        let weak = Arc::downgrade(&mux);
        tokio::spawn(read_answers(
            weak,
            channel,
            tokio_stream::wrappers::ReceiverStream::new(outgoing),
        ));
        mux
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fails every session (their answer queues close) and refuses new ones.
    fn close(&self) {
        let mut sessions = self.lock();
        sessions.closed = true;
        sessions.open.clear();
    }

    fn register(&self) -> Option<(u64, mpsc::UnboundedReceiver<AppendAnswer>)> {
        let mut sessions = self.lock();
        if sessions.closed {
            return None;
        }
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        sessions.open.insert(id, tx);
        Some((id, rx))
    }

    fn route(&self, answer: AppendAnswer) {
        if let Some(session) = self.lock().open.get(&answer.session) {
            // A session gone since (dropped at its timeout) no longer reads: nothing to do.
            let _ = session.send(answer);
        }
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

    /// A full queue means the peer stopped reading: the stream is closed.
    fn queue(&self, sessions: &mut Sessions, frame: AppendFrame) -> bool {
        match self.frames.try_send(frame) {
            Ok(()) => true,
            Err(e) => {
                if matches!(e, mpsc::error::TrySendError::Full(_)) {
                    tracing::warn!(peer = %self.addr, "replication stream backed up; closing it");
                }
                sessions.closed = true;
                sessions.open.clear();
                false
            }
        }
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

/// The stream's one reader: opens the call, then routes answers until the stream ends.
async fn read_answers(
    mux: Weak<Mux>,
    channel: Channel,
    outgoing: tokio_stream::wrappers::ReceiverStream<AppendFrame>,
) {
    let mut client = RaftClient::new(channel);
    match client.replicate(tonic::Request::new(outgoing)).await {
        Ok(answers) => {
            let mut answers = answers.into_inner();
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

/// One openraft replication session on a [`Mux`], as the stream of its answers.
pub(crate) struct Session {
    mux: Arc<Mux>,
    id: u64,
    answers: mpsc::UnboundedReceiver<AppendAnswer>,
    window: Arc<Semaphore>,
    depth: usize,
    ttl: Duration,
    /// Requests sent, once the input ended (or why sending stopped).
    sent: Option<oneshot::Receiver<Result<u64, String>>>,
    total: Option<u64>,
    received: u64,
    /// Signalled by the sending task after each request it queued.
    queued: Arc<Notify>,
    /// When the oldest unanswered request (or the last answer, if later) is overdue.
    deadline: Option<tokio::time::Instant>,
    pump: tokio::task::AbortHandle,
    counts: Arc<AppendStreamCounts>,
}

impl Session {
    /// Starts a session of `shard` on `mux`: a task sends `input`'s requests as they come, at
    /// most `depth` unanswered. `ttl` bounds the wait for an answer while one is due.
    pub(crate) fn start<S>(
        mux: Arc<Mux>,
        shard: ShardId,
        input: S,
        depth: usize,
        ttl: Duration,
        counts: Arc<AppendStreamCounts>,
    ) -> Result<Session, RPCError<TypeConfig>>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        let depth = depth.max(1);
        let Some((id, answers)) = mux.register() else {
            counts.session_failures.fetch_add(1, Ordering::Relaxed);
            return Err(RPCError::Unreachable(Unreachable::from_string(format!(
                "replication stream to {} closed",
                mux.addr
            ))));
        };
        counts.sessions.fetch_add(1, Ordering::Relaxed);
        let window = Arc::new(Semaphore::new(depth));
        let (sent_tx, sent) = oneshot::channel();
        let queued = Arc::new(Notify::new());
        let pump = tokio::spawn(send_requests(
            input,
            Arc::clone(&mux),
            id,
            shard,
            Arc::clone(&window),
            Arc::clone(&queued),
            sent_tx,
        ));
        Ok(Session {
            mux,
            id,
            answers,
            window,
            depth,
            ttl,
            sent: Some(sent),
            total: None,
            received: 0,
            queued,
            deadline: None,
            pump: pump.abort_handle(),
            counts,
        })
    }

    /// The next answer; `None` once every request sent was answered and the input ended.
    async fn next_answer(
        &mut self,
    ) -> Option<Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>> {
        loop {
            if self.total == Some(self.received) {
                return None;
            }
            let unanswered = self.depth - self.window.available_permits();
            if unanswered == 0 {
                self.deadline = None;
            } else if self.deadline.is_none() {
                self.deadline = Some(tokio::time::Instant::now() + self.ttl);
            }
            let deadline = self.deadline;
            let awaiting_count = self.sent.is_some();
            let sent = &mut self.sent;
            tokio::select! {
                // A request went out: the wait for its answer is timed from now on.
                () = self.queued.notified() => {}
                answer = self.answers.recv() => {
                    // The next answer gets a full `ttl` again.
                    self.deadline = None;
                    let Some(answer) = answer else {
                        return Some(Err(RPCError::Unreachable(Unreachable::from_string(
                            format!("replication stream to {} closed", self.mux.addr),
                        ))));
                    };
                    self.received += 1;
                    self.window.add_permits(1);
                    if !answer.error.is_empty() {
                        return Some(Err(RPCError::Unreachable(Unreachable::from_string(
                            answer.error,
                        ))));
                    }
                    return Some(
                        decode(&answer.payload)
                            .map_err(|e| RPCError::Network(NetworkError::new(&e))),
                    );
                }
                count = async { sent.as_mut().expect("polled only while pending").await },
                    if awaiting_count =>
                {
                    self.sent = None;
                    match count {
                        Ok(Ok(total)) => self.total = Some(total),
                        Ok(Err(why)) => {
                            return Some(Err(RPCError::Network(NetworkError::from_string(why))));
                        }
                        Err(_) => {
                            return Some(Err(RPCError::Network(NetworkError::from_string(
                                "append session's sender stopped".to_owned(),
                            ))));
                        }
                    }
                }
                () = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)),
                    if deadline.is_some() =>
                {
                    return Some(Err(RPCError::Network(NetworkError::from_string(format!(
                        "no append answer from {} within {:?}",
                        self.mux.addr, self.ttl
                    )))));
                }
            }
        }
    }

    /// The answers as openraft wants them: in order, ending after the first error or refusal.
    pub(crate) fn into_stream(
        self,
    ) -> impl Stream<Item = Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>
    + Send
    + 'static {
        futures_util::stream::unfold(Some(self), |session| async move {
            let mut session = session?;
            let answer = session.next_answer().await?;
            let go_on = matches!(answer, Ok(Ok(_)));
            if !go_on {
                if let Err(e) = &answer {
                    tracing::info!(peer = %session.mux.addr, session = session.id, error = %e, "append session failed");
                }
                session
                    .counts
                    .session_failures
                    .fetch_add(u64::from(answer.is_err()), Ordering::Relaxed);
            }
            Some((answer, go_on.then_some(session)))
        })
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.pump.abort();
        self.mux.end(self.id);
    }
}

/// Sends a session's requests, each once a window permit is free; reports the count at the end.
async fn send_requests<S>(
    mut input: S,
    mux: Arc<Mux>,
    session: u64,
    shard: ShardId,
    window: Arc<Semaphore>,
    queued: Arc<Notify>,
    sent: oneshot::Sender<Result<u64, String>>,
) where
    S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Unpin,
{
    let mut count = 0u64;
    while let Some(request) = input.next().await {
        // Taken once a request is at hand: a permit held while waiting for one would count as
        // an unanswered request. An answer gives it back.
        match window.acquire().await {
            Ok(permit) => permit.forget(),
            Err(_) => return,
        }
        let payload = match encode(&request) {
            Ok(payload) => payload,
            Err(e) => {
                tracing::error!(shard, error = %e, "append request does not encode");
                let _ = sent.send(Err(format!("append request does not encode: {e}")));
                return;
            }
        };
        let frame = AppendFrame {
            session,
            shard_id: shard,
            payload,
            end: false,
        };
        if !mux.send(frame) {
            let _ = sent.send(Err(format!("replication stream to {} closed", mux.addr)));
            return;
        }
        queued.notify_one();
        count += 1;
    }
    let _ = sent.send(Ok(count));
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
        // Best effort: if the answers are backed up, the sender's session times out instead.
        let _ = answers.try_send(AppendAnswer {
            session,
            payload: Vec::new(),
            error,
        });
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
        let full = sessions.len() >= SESSIONS_MAX;
        let incoming = match sessions.entry(id) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(_) if full => {
                refuse(id, format!("more than {SESSIONS_MAX} append sessions open"));
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
                Ok(request) => match requests.try_send(request) {
                    Ok(()) => None,
                    Err(mpsc::error::TrySendError::Full(_)) => Some(format!(
                        "more than {SESSION_REQUESTS_QUEUED} append requests unanswered"
                    )),
                    // The replica ended the session: its last answer was a refusal.
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        *incoming = Incoming::Closed;
                        continue;
                    }
                },
            }
        };
        if let Some(refusal) = refusal {
            *incoming = Incoming::Closed;
            refuse(id, refusal);
        }
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
            Ok(Err(e)) => AppendAnswer {
                session,
                payload: Vec::new(),
                error: format!("append result does not encode: {e}"),
            },
            Err(fatal) => AppendAnswer {
                session,
                payload: Vec::new(),
                error: fatal.to_string(),
            },
        };
        if answers.send(answer).await.is_err() {
            // The stream ended.
            return;
        }
    }
}
