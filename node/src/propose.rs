//! Proposal batching: the writes waiting for one shard's group go to Raft together.
//!
//! openraft turns every `client_write` into its own message to the group's core, its own log
//! append and its own replication wake-up. Under concurrent writes one task per group collects
//! every proposal queued while the core was busy and hands them over in one
//! `client_write_many`: still one entry, one log index and one answer per command (nothing about
//! the state machine changes), but one core message, one log submit and one round of
//! AppendEntries for the lot. A lone write waits for nothing: the task takes whatever is queued
//! as soon as it runs. A batch is cut by count and by bytes, so a burst of large records goes to
//! Raft in several hand-overs (each one log append of bounded size) rather than one.

use dossier_raft::openraft::error::{ClientWriteError, Fatal, RaftError};
use dossier_raft::openraft::raft::WriteResponse;
use dossier_raft::{Raft, Request, TypeConfig};
use futures_util::StreamExt;
use prometheus::Histogram;
use tokio::sync::{mpsc, oneshot};

/// What a proposal's writer is told: applied at a log id (with the state machine's response),
/// refused by Raft, or Raft stopped.
pub type Answer =
    Result<WriteResponse<TypeConfig>, RaftError<TypeConfig, ClientWriteError<TypeConfig>>>;

struct Proposal {
    request: Request,
    /// An upper bound of the request's encoded size.
    bytes: usize,
    reply: oneshot::Sender<Answer>,
}

/// The sending side of one group's proposal queue; the task ends when every handle is dropped.
#[derive(Clone)]
pub struct Proposer {
    queue: mpsc::Sender<Proposal>,
}

impl std::fmt::Debug for Proposer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proposer")
            .field(
                "queued",
                &(self.queue.max_capacity() - self.queue.capacity()),
            )
            .finish()
    }
}

impl Proposer {
    /// Starts the group's proposal task. `queue_max` bounds the proposals waiting (a writer
    /// beyond it waits for room, within its deadline); `batch_max` proposals and `batch_bytes_max`
    /// bytes bound one hand-over (a single larger proposal goes alone). Each batch's size is
    /// observed in `batch_sizes`.
    pub fn start(
        raft: Raft,
        queue_max: usize,
        batch_max: usize,
        batch_bytes_max: usize,
        batch_sizes: Histogram,
    ) -> Proposer {
        assert!(
            queue_max > 0 && batch_max > 0,
            "proposal queue and batch must hold one"
        );
        let (queue, rx) = mpsc::channel(queue_max);
        tokio::spawn(run(
            raft,
            rx,
            Cut {
                count: batch_max,
                bytes: batch_bytes_max,
            },
            batch_sizes,
        ));
        Proposer { queue }
    }

    /// Proposes `request` (of at most `bytes` encoded) and waits until it is applied here,
    /// refused, or Raft stopped. Dropping the future leaves the proposal in flight (its outcome
    /// is then unknown).
    pub async fn write(&self, request: Request, bytes: usize) -> Answer {
        let (reply, answer) = oneshot::channel();
        let proposal = Proposal {
            request,
            bytes,
            reply,
        };
        if self.queue.send(proposal).await.is_err() {
            return Err(RaftError::Fatal(Fatal::Stopped));
        }
        answer
            .await
            .unwrap_or(Err(RaftError::Fatal(Fatal::Stopped)))
    }
}

/// Where a batch of proposals is cut.
#[derive(Debug, Clone, Copy)]
struct Cut {
    count: usize,
    bytes: usize,
}

async fn run(raft: Raft, mut rx: mpsc::Receiver<Proposal>, cut: Cut, batch_sizes: Histogram) {
    let mut batch = Vec::with_capacity(cut.count);
    // The proposal that did not fit the previous batch opens the next one.
    let mut carried: Option<Proposal> = None;
    loop {
        let first = match carried.take() {
            Some(proposal) => proposal,
            None => match rx.recv().await {
                Some(proposal) => proposal,
                None => return,
            },
        };
        let mut bytes = first.bytes;
        batch.push(first);
        // Let the request handlers that are ready to run queue their writes first: one turn of
        // the scheduler, no timer, so a lone write waits for nothing.
        tokio::task::yield_now().await;
        while batch.len() < cut.count {
            match rx.try_recv() {
                Ok(proposal) if bytes + proposal.bytes > cut.bytes => {
                    carried = Some(proposal);
                    break;
                }
                Ok(proposal) => {
                    bytes += proposal.bytes;
                    batch.push(proposal);
                }
                Err(_) => break,
            }
        }
        batch_sizes.observe(batch.len() as f64);
        let (requests, replies): (Vec<Request>, Vec<_>) =
            batch.drain(..).map(|p| (p.request, p.reply)).unzip();
        match raft.client_write_many(requests).await {
            // Answers arrive in proposal order as entries apply; waiting for them must not hold
            // up the next batch.
            Ok(answers) => {
                tokio::spawn(async move {
                    let mut answers = answers;
                    for reply in replies {
                        let answer = match answers.next().await {
                            Some(Ok(Ok(response))) => Ok(response),
                            Some(Ok(Err(refused))) => Err(RaftError::APIError(refused)),
                            Some(Err(fatal)) => Err(RaftError::Fatal(fatal)),
                            None => Err(RaftError::Fatal(Fatal::Stopped)),
                        };
                        // The writer may have given up (deadline); nothing to tell then.
                        let _ = reply.send(answer);
                    }
                });
            }
            Err(fatal) => {
                for reply in replies {
                    let _ = reply.send(Err(RaftError::Fatal(fatal.clone())));
                }
            }
        }
    }
}
