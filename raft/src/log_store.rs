//! openraft's `RaftLogStorage` over one group's part of the node's shared `LogEngine`.
//!
//! Entries, the vote, the committed id and the purged id are postcard-encoded opaque bytes for the
//! engine. `append` returns as soon as the entries are queued (and readable); openraft's
//! `IOFlushed` callback runs from the engine's group commit once they are fdatasync'ed.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use dossier_storage::{APPEND_FRAME_BYTES_MAX, GroupId, LogEngine, OnDurable, Submit, WriteBatch};
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};

use crate::types::{Entry, LogId, TypeConfig, Vote, decode, encode, io_error};

/// One group's log: a handle on the shared engine. Cheap to clone (the reader is a clone).
#[derive(Debug, Clone)]
pub struct LogStore {
    engine: Arc<LogEngine>,
    group: GroupId,
    /// Payload bytes of entries handed to replication at once (at least one entry is).
    send_bytes_max: usize,
}

impl LogStore {
    pub fn new(engine: Arc<LogEngine>, group: GroupId, send_bytes_max: usize) -> Self {
        LogStore {
            engine,
            group,
            send_bytes_max: send_bytes_max.max(1),
        }
    }

    /// Queues `batch` without blocking the async runtime: when the engine's back-pressure
    /// (`pending-bytes-max`) says wait, the wait happens on a blocking thread. Returns once the
    /// batch is queued (and readable), in submission order: the caller awaits each submit.
    async fn submit(&self, batch: WriteBatch, on_durable: OnDurable) -> io::Result<()> {
        match self.engine.try_submit(batch, on_durable) {
            Ok(()) => Ok(()),
            Err(Submit::Refused(e)) => Err(io_error(e)),
            Err(Submit::Full(batch, on_durable)) => {
                let engine = Arc::clone(&self.engine);
                tokio::task::spawn_blocking(move || engine.submit(batch, on_durable))
                    .await
                    .map_err(io::Error::other)?
                    .map_err(io_error)
            }
        }
    }

    /// Submits `batch` and waits until it is durable, without blocking the async runtime.
    async fn write_durable(&self, batch: WriteBatch) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(
            batch,
            Box::new(move |result| {
                // The waiter may have been cancelled; the write is durable regardless.
                let _ = tx.send(result);
            }),
        )
        .await?;
        rx.await
            .map_err(|_| io::Error::other("the log engine stopped"))?
            .map_err(io_error)
    }

    fn last_entry(&self, index: u64) -> io::Result<Entry> {
        let entries = self
            .engine
            .entries(self.group, index..index + 1)
            .map_err(io_error)?;
        let (_, bytes) = entries.first().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("entry {index} is missing"))
        })?;
        decode(bytes)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(e) => e.saturating_add(1),
            Bound::Excluded(e) => *e,
            Bound::Unbounded => u64::MAX,
        };
        let raw = self
            .engine
            .entries(self.group, start..end)
            .map_err(io_error)?;
        raw.iter().map(|(_, bytes)| decode(bytes)).collect()
    }

    /// Entries `[start, end)` up to `send_bytes_max` bytes of payload, at least one: this is what
    /// one AppendEntries carries, so a run of large entries is sent in several messages, each
    /// within the receiver's message and log batch limits.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, io::Error> {
        let raw = self
            .engine
            .entries_up_to(self.group, start..end, self.send_bytes_max)
            .map_err(io_error)?;
        raw.iter().map(|(_, bytes)| decode(bytes)).collect()
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        let state = self.engine.group_state(self.group);
        state
            .and_then(|s| s.hard_state.vote)
            .map(|v| decode(&v))
            .transpose()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let Some(state) = self.engine.group_state(self.group) else {
            return Ok(LogState::default());
        };
        let last_purged_log_id: Option<LogId> = state
            .purged
            .map(|(_, marker)| decode(&marker))
            .transpose()?;
        let last_log_id = match state.entries {
            Some((_, last)) => Some(self.last_entry(last)?.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let mut batch = WriteBatch::new();
        batch.save_vote(self.group, encode(vote)?);
        self.write_durable(batch).await
    }

    // `save_committed` / `read_committed` are left to openraft's defaults (not stored): saving the
    // committed id on every commit advance cost one more fdatasync round per write on every
    // replica, and all it buys is re-applying committed entries at start-up before a leader is
    // heard from (measured in docs/benchmarks.md).

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // openraft merges queued appends (client writes, AppendEntries) into one call of any
        // size; the engine refuses a batch above `batch-bytes-max`, and openraft would take that
        // refusal for a storage failure and stop the group. So the entries go in batches cut by
        // bytes. Batches complete in submission order and a failure fails every later one, so
        // only the last carries openraft's callback: it fires once everything is durable.
        let (_, batch_max) = self.engine.limits();
        let mut batch = WriteBatch::new();
        let mut bytes = 0usize;
        for entry in entries {
            let data = encode(&entry)?;
            let size = APPEND_FRAME_BYTES_MAX + data.len();
            if !batch.is_empty() && bytes + size > batch_max {
                let full = std::mem::take(&mut batch);
                self.submit(full, Box::new(|_| {})).await?;
                bytes = 0;
            }
            bytes += size;
            batch.append(self.group, entry.log_id.index, data);
        }
        self.submit(
            batch,
            Box::new(move |result| callback.io_completed(result.map_err(io_error))),
        )
        .await
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |id| id.index + 1);
        let mut batch = WriteBatch::new();
        batch.truncate_from(self.group, from);
        self.write_durable(batch).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let mut batch = WriteBatch::new();
        batch.purge_to(self.group, log_id.index, encode(&log_id)?);
        self.write_durable(batch).await
    }
}
