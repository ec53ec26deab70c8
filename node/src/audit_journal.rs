//! The node's journal of read audit events: a read's event is made durable here, in the node's
//! own log (a group of its own, [`JOURNAL_GROUP`]), before the read answers. The reads of a
//! millisecond share one batch and one fdatasync ([`INTERVAL`]). `audit_batch.rs` then moves
//! the events into their patients' chains in large batches, and the journal forgets what was
//! moved. After a crash, what the journal still holds is moved again on restart.
//!
//! Entry `seq` of the journal: version byte 1, then the routing key, the chain's head key and
//! entry prefix (each a u16 BE length and the bytes), then the encoded `AuditEvent`, whose
//! `journal_seq` is `seq`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use dossier_records::kv;
use dossier_storage::{GroupId, LogEngine, OnDurable, Submit, WriteBatch};
use prost::encoding::WireType;
use tokio::sync::{Notify, OwnedSemaphorePermit, oneshot};

use crate::errors::ApiError;

/// The log group of the journal: no shard has this id.
pub const JOURNAL_GROUP: GroupId = u64::MAX;

const VERSION: u8 = 1;

/// The journal hands its waiting events to the log at most this often, all of them in one
/// batch: one fdatasync covers the reads of a millisecond, not the few that arrived during the
/// previous one (each fdatasync costs the node CPU, whoever waits for it).
const INTERVAL: Duration = Duration::from_millis(1);

/// Events of one batch at most.
const BATCH_MAX: usize = 1024;

/// How the journal hands a batch to the node's log ([`LogEngine::try_submit`]).
pub type SubmitFn = dyn Fn(WriteBatch, OnDurable) -> Result<(), Submit> + Send + Sync;

/// Where the journal hands each durable entry, with the room in the backlog it holds until it
/// is in its chain.
pub type DeliverFn = dyn Fn(Entry, Option<OwnedSemaphorePermit>) + Send + Sync;

/// One journaled event: where its chain is (the patient's routing key and the chain's keys) and
/// the append.
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    pub route_key: String,
    pub op: kv::Op,
}

/// The journal over a node's log.
#[derive(Debug)]
pub struct Journal {
    queue: Mutex<Queue>,
    /// Told when the queue stops being empty.
    arrived: Notify,
}

#[derive(Debug)]
struct Queue {
    /// The seq the next written entry gets. Seqs are given when a batch is made, by the one
    /// task that writes, and kept only once the log took the batch: the group's entries stay
    /// contiguous whatever the log refuses.
    next: u64,
    waiting: Vec<Waiting>,
}

/// An event waiting to be written: its chain, its unstamped encoding, its room in the backlog,
/// and its reader, told once it is durable (the reader may be gone: the event is written and
/// moved all the same).
#[derive(Debug)]
struct Waiting {
    route_key: String,
    head: Bytes,
    prefix: Bytes,
    event: Bytes,
    room: Option<OwnedSemaphorePermit>,
    durable: oneshot::Sender<Result<u64, String>>,
}

impl Journal {
    /// Opens the journal in `engine`; returns it with the entries it still holds (oldest first),
    /// to be moved to their chains. Events are written once [`Journal::run`] runs.
    pub fn open(engine: &LogEngine) -> Result<(Arc<Journal>, Vec<Entry>), ApiError> {
        let state = engine.group_state(JOURNAL_GROUP);
        let (held, next) = match &state {
            Some(s) => match s.entries {
                Some((first, last)) => (Some(first..last + 1), last + 1),
                None => (None, s.purged.as_ref().map_or(1, |(p, _)| p + 1)),
            },
            None => (None, 1),
        };
        let mut entries = Vec::new();
        if let Some(range) = held {
            for (seq, data) in engine
                .entries(JOURNAL_GROUP, range)
                .map_err(|e| ApiError::Internal(format!("read the audit journal: {e}")))?
            {
                entries.push(decode(seq, &data).ok_or_else(|| {
                    ApiError::Internal(format!("audit journal entry {seq} does not decode"))
                })?);
            }
        }
        let journal = Journal {
            queue: Mutex::new(Queue {
                next,
                waiting: Vec::new(),
            }),
            arrived: Notify::new(),
        };
        Ok((Arc::new(journal), entries))
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The seq the next entry written will get: every entry below it is durable.
    pub fn next_seq(&self) -> u64 {
        self.queue().next
    }

    /// Makes the append `op` (to the chain of `route_key`) durable in the journal; returns its
    /// seq once the log has fsynced it. The journal's task then hands the entry, stamped with its
    /// seq, on with `room` ([`Journal::run`]), whether or not this call is still waiting.
    pub async fn append(
        &self,
        route_key: &str,
        op: &kv::Op,
        room: Option<OwnedSemaphorePermit>,
    ) -> Result<u64, ApiError> {
        let kv::Op::Append {
            head,
            prefix,
            value,
        } = op
        else {
            return Err(ApiError::Internal("only appends are journaled".into()));
        };
        if [route_key.as_bytes(), head, prefix]
            .iter()
            .any(|part| part.len() > usize::from(u16::MAX))
        {
            return Err(ApiError::Internal(
                "an audit event's routing key or chain keys exceed 64 KiB".into(),
            ));
        }
        let (tx, durable) = oneshot::channel();
        {
            let mut queue = self.queue();
            queue.waiting.push(Waiting {
                route_key: route_key.to_owned(),
                head: head.clone(),
                prefix: prefix.clone(),
                event: value.clone(),
                room,
                durable: tx,
            });
            if queue.waiting.len() == 1 {
                self.arrived.notify_one();
            }
        }
        durable
            .await
            .map_err(|_| ApiError::Unavailable("the node's audit journal stopped".into()))?
            .map_err(|e| ApiError::Unavailable(format!("the audit journal could not write: {e}")))
    }

    /// Writes the waiting events through `submit`, one batch at a time, at most one batch per
    /// [`INTERVAL`], and hands each durable entry to `deliver`; runs until the task is dropped.
    pub async fn run(self: Arc<Self>, submit: Arc<SubmitFn>, deliver: Arc<DeliverFn>) {
        let mut last = Instant::now();
        loop {
            loop {
                let notified = self.arrived.notified();
                if !self.queue().waiting.is_empty() {
                    break;
                }
                notified.await;
            }
            let due = last + INTERVAL;
            if Instant::now() < due && self.queue().waiting.len() < BATCH_MAX {
                tokio::time::sleep_until(due.into()).await;
            }
            last = Instant::now();
            let (first, batch): (u64, Vec<Waiting>) = {
                let mut queue = self.queue();
                let n = queue.waiting.len().min(BATCH_MAX);
                (queue.next, queue.waiting.drain(..n).collect())
            };
            // Each entry's bytes end with its stamped event: the chain's value is a slice of them.
            let (data, stamped): (Vec<Bytes>, Vec<Bytes>) = (first..)
                .zip(&batch)
                .map(|(seq, w)| encode(&w.route_key, &w.head, &w.prefix, &w.event, seq))
                .unzip();
            let (taken, result) = write(submit.as_ref(), first, &data).await;
            if taken {
                self.queue().next = first + batch.len() as u64;
            }
            // Entries the log took are moved even when their fsync failed (their reads fail:
            // the chain may over-report, never under-report), so that the moved mark goes on.
            for ((seq, w), event) in (first..).zip(batch).zip(stamped) {
                let Waiting {
                    route_key,
                    head,
                    prefix,
                    room,
                    durable,
                    ..
                } = w;
                if taken {
                    let op = kv::Op::Append {
                        head,
                        prefix,
                        value: event,
                    };
                    deliver(Entry { seq, route_key, op }, room);
                }
                let _ = durable.send(result.clone().map(|()| seq));
            }
        }
    }
}

/// Writes `data` as the entries from `first` on, and waits until they are durable. Says whether
/// the log took the entries (their seqs are then spent, durable or not) and whether they are
/// durable.
async fn write(submit: &SubmitFn, first: u64, data: &[Bytes]) -> (bool, Result<(), String>) {
    loop {
        let mut log_batch = WriteBatch::new();
        for (seq, d) in (first..).zip(data) {
            log_batch.append(JOURNAL_GROUP, seq, d.clone());
        }
        let (tx, durable) = oneshot::channel::<dossier_storage::Result<()>>();
        let callback = Box::new(move |r: dossier_storage::Result<()>| {
            let _ = tx.send(r);
        });
        match submit(log_batch, callback) {
            Ok(()) => {}
            Err(Submit::Refused(e)) => return (false, Err(e.to_string())),
            // The log is behind on its disk: wait for room and try again.
            Err(Submit::Full(..)) => {
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        }
        return match durable.await {
            Ok(r) => (true, r.map_err(|e| e.to_string())),
            Err(_) => (true, Err("the node's log closed".into())),
        };
    }
}

/// Entry `seq`'s bytes, and the stamped event they end with (a slice of them, not a copy). The
/// event is stamped with its `journal_seq` by appending the field to its encoding (a field met
/// last wins; the event's own encoding leaves it unset, 0): no decode and re-encode on the read
/// path.
fn encode(route_key: &str, head: &[u8], prefix: &[u8], event: &[u8], seq: u64) -> (Bytes, Bytes) {
    const JOURNAL_SEQ_FIELD: u32 = 13;
    let mut out = BytesMut::with_capacity(
        1 + 6 + route_key.len() + head.len() + prefix.len() + event.len() + 11,
    );
    out.put_u8(VERSION);
    for part in [route_key.as_bytes(), head, prefix] {
        // `Journal::append` refuses longer parts.
        debug_assert!(part.len() <= usize::from(u16::MAX));
        out.put_u16(part.len() as u16);
        out.put_slice(part);
    }
    let event_at = out.len();
    out.put_slice(event);
    prost::encoding::encode_key(JOURNAL_SEQ_FIELD, WireType::Varint, &mut out);
    prost::encoding::encode_varint(seq, &mut out);
    let data = out.freeze();
    let stamped = data.slice(event_at..);
    (data, stamped)
}

/// Forgets the journal's entries up to `seq` (moved to their chains).
pub fn forget_to(engine: &LogEngine, seq: u64) {
    let mut batch = WriteBatch::new();
    batch.purge_to(JOURNAL_GROUP, seq, Bytes::new());
    // Durability of a purge does not matter: entries left behind are moved again, harmlessly.
    let _ = engine.try_submit(batch, Box::new(|_| {}));
}

fn decode(seq: u64, data: &Bytes) -> Option<Entry> {
    if data.first() != Some(&VERSION) {
        return None;
    }
    let mut at = 1;
    let mut parts = Vec::with_capacity(3);
    for _ in 0..3 {
        let len = u16::from_be_bytes(data.get(at..at + 2)?.try_into().ok()?) as usize;
        let end = at + 2 + len;
        if end > data.len() {
            return None;
        }
        parts.push(data.slice(at + 2..end));
        at = end;
    }
    Some(Entry {
        seq,
        route_key: String::from_utf8(parts[0].to_vec()).ok()?,
        op: kv::Op::Append {
            head: parts[1].clone(),
            prefix: parts[2].clone(),
            value: data.slice(at..),
        },
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use dossier_api::v1::AuditEvent;
    use dossier_records::kv;
    use dossier_storage::{LogConfig, LogEngine, Submit};
    use prost::Message;

    use super::{Entry, Journal, SubmitFn, encode, forget_to};

    /// A running journal over a log, with the entries it delivered and the batches it submitted.
    struct Running {
        log: Arc<LogEngine>,
        journal: Arc<Journal>,
        left: Vec<Entry>,
        delivered: Arc<Mutex<Vec<Entry>>>,
        batches: Arc<AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Running {
        /// The journal over `log`, submitting through `refuse_first` refusals first.
        fn start(log: LogEngine, refuse_first: usize) -> Running {
            let log = Arc::new(log);
            let (journal, left) = Journal::open(&log).unwrap();
            let delivered = Arc::new(Mutex::new(Vec::new()));
            let batches = Arc::new(AtomicUsize::new(0));
            let (submit_to, count) = (Arc::clone(&log), Arc::clone(&batches));
            let submit: Arc<SubmitFn> = Arc::new(move |batch, on_durable| {
                if count.fetch_add(1, Ordering::Relaxed) < refuse_first {
                    return Err(Submit::Refused(dossier_storage::Error::Failed));
                }
                submit_to.try_submit(batch, on_durable)
            });
            let into = Arc::clone(&delivered);
            let task = tokio::spawn(Arc::clone(&journal).run(
                submit,
                Arc::new(move |entry, _room| into.lock().unwrap().push(entry)),
            ));
            Running {
                log,
                journal,
                left,
                delivered,
                batches,
                task,
            }
        }

        fn delivered(&self) -> Vec<(u64, String)> {
            let mut got: Vec<(u64, String)> = self
                .delivered
                .lock()
                .unwrap()
                .iter()
                .map(|e| {
                    let (actor, seq) = actor_and_seq(&e.op);
                    assert_eq!(seq, e.seq, "an entry is stamped with its seq");
                    (e.seq, actor)
                })
                .collect();
            got.sort();
            got
        }

        /// Stops the journal's task, then closes its log.
        async fn close(self) {
            self.task.abort();
            let _ = self.task.await;
            Arc::into_inner(self.log).unwrap().close().unwrap();
        }
    }

    /// The stamped bytes decode as the event with its journal seq, whatever else it holds.
    #[test]
    fn a_stamp_sets_the_journal_seq_and_keeps_the_rest() {
        let event = AuditEvent {
            actor: "ward-app".into(),
            node_id: 3,
            kv_keys: vec![b"k".to_vec()],
            ..AuditEvent::default()
        };
        let (_, stamped) = encode("p", b"h", b"a/", &event.encode_to_vec(), 300);
        let stamped = AuditEvent::decode(stamped.as_ref()).unwrap();
        assert_eq!(
            stamped,
            AuditEvent {
                journal_seq: 300,
                ..event
            }
        );
    }

    fn engine(dir: &std::path::Path) -> LogEngine {
        let config = LogConfig {
            dir: dir.to_path_buf(),
            ..LogConfig::default()
        }
        .validate()
        .unwrap();
        LogEngine::open(Arc::clone(&config)).unwrap()
    }

    fn append_op(actor: &str) -> kv::Op {
        kv::Op::Append {
            head: Bytes::from_static(b"P\x01A"),
            prefix: Bytes::from_static(b"P\x01a/"),
            value: AuditEvent {
                actor: actor.into(),
                node_id: 7,
                ..AuditEvent::default()
            }
            .encode_to_vec()
            .into(),
        }
    }

    fn actor_and_seq(op: &kv::Op) -> (String, u64) {
        let kv::Op::Append { value, .. } = op else {
            panic!("not an append")
        };
        let e = AuditEvent::decode(value.as_ref()).unwrap();
        (e.actor, e.journal_seq)
    }

    /// Reads arriving together share batches (one fdatasync each); every event is in the log,
    /// in seq order, and handed on, once its append returns.
    #[tokio::test]
    async fn concurrent_appends_share_batches() {
        let dir = tempfile::tempdir().unwrap();
        let running = Running::start(engine(dir.path()), 0);
        let appends = (0..200).map(|i| {
            let journal = Arc::clone(&running.journal);
            async move {
                journal
                    .append(
                        &format!("patient-{i}"),
                        &append_op(&format!("actor-{i}")),
                        None,
                    )
                    .await
                    .unwrap()
            }
        });
        let mut seqs: Vec<u64> = futures_util::future::join_all(appends).await;
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
        let batches = running.batches.load(Ordering::Relaxed);
        assert!(batches <= 10, "200 appends took {batches} batches");
        let want: Vec<(u64, String)> = (1..=200).map(|s| (s, format!("actor-{}", s - 1))).collect();
        assert_eq!(running.delivered(), want);
        running.close().await;
        let log = engine(dir.path());
        let (_, left) = Journal::open(&log).unwrap();
        let held: Vec<(u64, String)> = left
            .iter()
            .map(|e| (e.seq, actor_and_seq(&e.op).0))
            .collect();
        assert_eq!(held, want);
    }

    /// A batch the log refuses fails its reads and spends no seq: the next batch starts where
    /// the refused one did, so the journal's entries stay contiguous and it keeps working.
    #[tokio::test]
    async fn a_refused_batch_spends_no_seq() {
        let dir = tempfile::tempdir().unwrap();
        let running = Running::start(engine(dir.path()), 1);
        assert!(
            running
                .journal
                .append("patient-1", &append_op("refused"), None)
                .await
                .is_err()
        );
        for actor in ["a", "b"] {
            running
                .journal
                .append("patient-1", &append_op(actor), None)
                .await
                .unwrap();
        }
        assert_eq!(
            running.delivered(),
            vec![(1, "a".to_owned()), (2, "b".to_owned())]
        );
        assert_eq!(running.journal.next_seq(), 3);
        running.close().await;
    }

    /// What the journal made durable and did not forget is handed back when the node starts
    /// again, in order, each event stamped with its seq; seqs go on from there, also after the
    /// journal forgot everything.
    #[tokio::test]
    async fn a_restart_hands_back_what_was_not_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        {
            let running = Running::start(engine(dir.path()), 0);
            assert!(running.left.is_empty());
            for actor in ["a", "b", "c"] {
                running
                    .journal
                    .append("patient-1", &append_op(actor), None)
                    .await
                    .unwrap();
            }
            forget_to(&running.log, 1);
            // The purge travels with the next write; make it durable with one more append.
            running
                .journal
                .append("patient-2", &append_op("d"), None)
                .await
                .unwrap();
            running.close().await;
        }
        let running = Running::start(engine(dir.path()), 0);
        let got: Vec<_> = running
            .left
            .iter()
            .map(|e| (e.seq, e.route_key.clone(), actor_and_seq(&e.op)))
            .collect();
        assert_eq!(
            got,
            vec![
                (2, "patient-1".to_owned(), ("b".to_owned(), 2)),
                (3, "patient-1".to_owned(), ("c".to_owned(), 3)),
                (4, "patient-2".to_owned(), ("d".to_owned(), 4)),
            ]
        );
        assert_eq!(running.journal.next_seq(), 5);
        forget_to(&running.log, 4);
        let seq = running
            .journal
            .append("patient-3", &append_op("e"), None)
            .await
            .unwrap();
        assert_eq!(seq, 5);
        running.close().await;
        let log = engine(dir.path());
        let (journal, left) = Journal::open(&log).unwrap();
        assert_eq!(left.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![5]);
        assert_eq!(journal.next_seq(), 6);
    }
}
