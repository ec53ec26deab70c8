//! Sending a snapshot to a peer.
//!
//! 1. The replica's [`SnapshotView`] (its state held at one applied id) is written to a spool
//!    file in the group's snapshot directory, off the async runtime; the hold ends with it.
//! 2. The file goes to the peer in chunks over one `InstallSnapshot` stream, through a channel of
//!    a few chunks (memory is bounded by `snapshot_chunk_bytes` times that depth).
//! 3. The spool file is removed however the transfer ends.
//!
//! No deadline bounds the whole transfer: a shard of gigabytes takes as long as the link needs.
//! It fails instead when the peer takes no chunk for `snapshot_idle_timeout`, or gives no answer
//! within `snapshot_install_timeout` after the last chunk (the peer loads the file before it
//! answers). openraft then tries again later, with a fresh view.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dossier_api::raft::v1::raft_client::RaftClient;
use dossier_api::raft::v1::{RaftReply, SnapshotChunk};
use dossier_storage::{ShardId, SnapshotView};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tracing::info;

/// Chunks queued between the file reader and the stream.
const CHUNKS_QUEUED: usize = 4;
/// How often progress is checked.
const PROGRESS_TICK: Duration = Duration::from_millis(250);

/// Snapshot transfers of this node, for the metrics page.
#[derive(Debug, Default)]
pub struct SnapshotCounts {
    pub sent: AtomicU64,
    pub sent_bytes: AtomicU64,
    /// Time from taking the view to the peer's answer, summed.
    pub sent_micros: AtomicU64,
    pub received: AtomicU64,
    pub received_bytes: AtomicU64,
    /// Time from the first chunk to the installed state, summed.
    pub received_micros: AtomicU64,
}

impl SnapshotCounts {
    pub(crate) fn record_sent(&self, bytes: u64, took: Duration) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.sent_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.sent_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    pub(crate) fn record_received(&self, bytes: u64, took: Duration) {
        self.received.fetch_add(1, Ordering::Relaxed);
        self.received_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.received_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }
}

/// One transfer to make.
pub(crate) struct Outgoing {
    pub shard: ShardId,
    /// The encoded vote and snapshot meta, sent in the first chunk.
    pub header: Vec<u8>,
    pub view: SnapshotView,
    /// Where the view is written before it is sent.
    pub spool: PathBuf,
    pub chunk_bytes: usize,
    pub idle_timeout: Duration,
    pub install_timeout: Duration,
}

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    #[error("writing the snapshot of shard {shard}: {source}")]
    Local {
        shard: ShardId,
        source: dossier_storage::Error,
    },
    #[error("the snapshot stream failed: {0}")]
    Peer(tonic::Status),
    #[error("{0}")]
    Stalled(String),
}

/// Removes the spool file when the transfer ends, however it ends: shared by the transfer and
/// the blocking task writing the file, so that a transfer dropped while the file is still being
/// written removes it once the writer is done.
struct Spool(PathBuf);

impl Drop for Spool {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.0.display(), error = %e, "failed to remove a snapshot spool file");
        }
    }
}

/// Sends `out` over `client`; `address` adds the routing headers to the request.
pub(crate) async fn send(
    out: Outgoing,
    mut client: RaftClient<Channel>,
    address: impl FnOnce(&mut tonic::Request<ReceiverStream<SnapshotChunk>>),
    counts: &SnapshotCounts,
) -> Result<RaftReply, SendError> {
    let started = Instant::now();
    let Outgoing {
        shard,
        header,
        view,
        spool,
        chunk_bytes,
        idle_timeout,
        install_timeout,
    } = out;
    let guard = Arc::new(Spool(spool.clone()));
    let writer_guard = Arc::clone(&guard);
    let written = tokio::task::spawn_blocking(move || {
        let written = view.write_to(&writer_guard.0);
        drop(view);
        drop(writer_guard);
        written
    })
    .await
    .map_err(|e| SendError::Stalled(format!("snapshot writer task failed: {e}")))?
    .map_err(|source| SendError::Local { shard, source })?;
    let (tx, rx) = tokio::sync::mpsc::channel::<SnapshotChunk>(CHUNKS_QUEUED);
    let sent = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicBool::new(false));
    let reader = {
        let sent = Arc::clone(&sent);
        let finished = Arc::clone(&finished);
        tokio::task::spawn_blocking(move || -> dossier_storage::Result<()> {
            let mut offset = 0u64;
            let mut header = Some(header);
            loop {
                let data = dossier_storage::read_snapshot_chunk(&spool, offset, chunk_bytes)?;
                // The first chunk always goes (it carries the header); an empty read ends it.
                if data.is_empty() && header.is_none() {
                    finished.store(true, Ordering::Release);
                    return Ok(());
                }
                offset += data.len() as u64;
                let end = data.is_empty();
                let chunk = SnapshotChunk {
                    shard_id: shard,
                    header: header.take().unwrap_or_default(),
                    data: data.to_vec(),
                };
                if tx.blocking_send(chunk).is_err() {
                    return Ok(());
                }
                sent.store(offset, Ordering::Release);
                if end {
                    finished.store(true, Ordering::Release);
                    return Ok(());
                }
            }
        })
    };
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    address(&mut request);
    let rpc = client.install_snapshot(request);
    tokio::pin!(rpc);
    let mut tick = tokio::time::interval(PROGRESS_TICK);
    let mut progress = (0u64, Instant::now());
    let mut finished_at: Option<Instant> = None;
    let answer = loop {
        tokio::select! {
            answer = &mut rpc => break answer,
            _ = tick.tick() => {
                let now = sent.load(Ordering::Acquire);
                if now != progress.0 {
                    progress = (now, Instant::now());
                }
                if finished.load(Ordering::Acquire) {
                    let at = *finished_at.get_or_insert_with(Instant::now);
                    if at.elapsed() > install_timeout {
                        reader.abort();
                        return Err(SendError::Stalled(format!(
                            "the peer did not answer within {install_timeout:?} after the last \
                             snapshot chunk of shard {shard}"
                        )));
                    }
                } else if progress.1.elapsed() > idle_timeout {
                    reader.abort();
                    return Err(SendError::Stalled(format!(
                        "the peer took no snapshot chunk of shard {shard} for {idle_timeout:?} \
                         ({now} of {} bytes sent)",
                        written.bytes
                    )));
                }
            }
        }
    };
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(source)) => return Err(SendError::Local { shard, source }),
        Err(e) => {
            return Err(SendError::Stalled(format!(
                "snapshot reader task failed: {e}"
            )));
        }
    }
    let reply = answer.map_err(SendError::Peer)?.into_inner();
    let secs = started.elapsed().as_secs_f64();
    info!(
        shard,
        records = written.records,
        bytes = written.bytes,
        secs,
        mb_per_s = written.bytes as f64 / 1e6 / secs.max(1e-9),
        "snapshot sent"
    );
    counts.record_sent(written.bytes, started.elapsed());
    drop(guard);
    Ok(reply)
}
