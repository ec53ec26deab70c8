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
use tokio::sync::{Notify, oneshot};

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
    /// The seq the next event gets: seqs are given in the order events join `waiting`, so
    /// that batches reach the log in seq order.
    next: u64,
    waiting: Vec<Waiting>,
}

#[derive(Debug)]
struct Waiting {
    seq: u64,
    data: Bytes,
    durable: oneshot::Sender<Result<(), String>>,
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

    /// The seq the next entry will get.
    pub fn next_seq(&self) -> u64 {
        self.queue().next
    }

    /// Makes the append `op` (to the chain of `route_key`) durable in the journal, its event
    /// stamped with its seq; returns the entry once the log has fsynced it.
    pub async fn append(&self, route_key: &str, op: &kv::Op) -> Result<Entry, ApiError> {
        let kv::Op::Append {
            head,
            prefix,
            value,
        } = op
        else {
            return Err(ApiError::Internal("only appends are journaled".into()));
        };
        let (tx, durable) = oneshot::channel();
        let (seq, stamped) = {
            let mut queue = self.queue();
            let seq = queue.next;
            queue.next += 1;
            let stamped = stamp(value, seq);
            let data = encode(route_key, head, prefix, &stamped);
            queue.waiting.push(Waiting {
                seq,
                data,
                durable: tx,
            });
            if queue.waiting.len() == 1 {
                self.arrived.notify_one();
            }
            (seq, stamped)
        };
        durable
            .await
            .map_err(|_| ApiError::Unavailable("the node's audit journal stopped".into()))?
            .map_err(|e| {
                ApiError::Unavailable(format!("the audit journal could not write: {e}"))
            })?;
        Ok(Entry {
            seq,
            route_key: route_key.to_owned(),
            op: kv::Op::Append {
                head: head.clone(),
                prefix: prefix.clone(),
                value: stamped,
            },
        })
    }

    /// Writes the waiting events through `submit`, one batch at a time, at most one batch per
    /// [`INTERVAL`]; runs until the task is dropped.
    pub async fn run(self: Arc<Self>, submit: Arc<SubmitFn>) {
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
            let batch: Vec<Waiting> = {
                let mut queue = self.queue();
                let n = queue.waiting.len().min(BATCH_MAX);
                queue.waiting.drain(..n).collect()
            };
            let result = write(submit.as_ref(), &batch).await;
            for w in batch {
                let _ = w.durable.send(result.clone());
            }
        }
    }
}

/// Writes `batch` to the log and waits until it is durable.
async fn write(submit: &SubmitFn, batch: &[Waiting]) -> Result<(), String> {
    loop {
        let mut log_batch = WriteBatch::new();
        for w in batch {
            log_batch.append(JOURNAL_GROUP, w.seq, w.data.clone());
        }
        let (tx, durable) = oneshot::channel::<dossier_storage::Result<()>>();
        let callback = Box::new(move |r: dossier_storage::Result<()>| {
            let _ = tx.send(r);
        });
        match submit(log_batch, callback) {
            Ok(()) => {}
            Err(Submit::Refused(e)) => return Err(e.to_string()),
            // The log is behind on its disk: wait for room and try again.
            Err(Submit::Full(..)) => {
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        }
        return match durable.await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("the node's log closed".into()),
        };
    }
}

/// The encoded event `event` with its `journal_seq` set to `seq`: the field appended to the
/// encoding (a field met last wins; the event's own encoding leaves it unset, 0), with no
/// decode and re-encode on the read path.
fn stamp(event: &[u8], seq: u64) -> Bytes {
    const JOURNAL_SEQ_FIELD: u32 = 13;
    let mut out = BytesMut::with_capacity(event.len() + 11);
    out.put_slice(event);
    prost::encoding::encode_key(JOURNAL_SEQ_FIELD, WireType::Varint, &mut out);
    prost::encoding::encode_varint(seq, &mut out);
    out.freeze()
}

/// Forgets the journal's entries up to `seq` (moved to their chains).
pub fn forget_to(engine: &LogEngine, seq: u64) {
    let mut batch = WriteBatch::new();
    batch.purge_to(JOURNAL_GROUP, seq, Bytes::new());
    // Durability of a purge does not matter: entries left behind are moved again, harmlessly.
    let _ = engine.try_submit(batch, Box::new(|_| {}));
}

fn encode(route_key: &str, head: &[u8], prefix: &[u8], event: &[u8]) -> Bytes {
    let mut out =
        BytesMut::with_capacity(1 + 6 + route_key.len() + head.len() + prefix.len() + event.len());
    out.put_u8(VERSION);
    for part in [route_key.as_bytes(), head, prefix] {
        out.put_u16(u16::try_from(part.len()).unwrap_or(u16::MAX));
        out.put_slice(&part[..part.len().min(u16::MAX as usize)]);
    }
    out.put_slice(event);
    out.freeze()
}

fn decode(seq: u64, data: &[u8]) -> Option<Entry> {
    let (&version, mut rest) = data.split_first()?;
    if version != VERSION {
        return None;
    }
    let mut parts = Vec::with_capacity(3);
    for _ in 0..3 {
        let len = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
        parts.push(rest.get(2..2 + len)?);
        rest = &rest[2 + len..];
    }
    Some(Entry {
        seq,
        route_key: String::from_utf8(parts[0].to_vec()).ok()?,
        op: kv::Op::Append {
            head: Bytes::copy_from_slice(parts[1]),
            prefix: Bytes::copy_from_slice(parts[2]),
            value: Bytes::copy_from_slice(rest),
        },
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use bytes::Bytes;
    use dossier_api::v1::AuditEvent;
    use dossier_records::kv;
    use dossier_storage::{LogConfig, LogEngine};
    use prost::Message;

    use super::{Journal, forget_to, stamp};

    /// A journal over `log`, writing.
    fn started(
        log: &Arc<LogEngine>,
    ) -> (Arc<Journal>, Vec<super::Entry>, tokio::task::JoinHandle<()>) {
        let (journal, left) = Journal::open(log).unwrap();
        let submit_to = Arc::clone(log);
        let task = tokio::spawn(Arc::clone(&journal).run(Arc::new(move |batch, on_durable| {
            submit_to.try_submit(batch, on_durable)
        })));
        (journal, left, task)
    }

    /// Stops the journal's task, then closes its log.
    async fn close(log: Arc<LogEngine>, task: tokio::task::JoinHandle<()>) {
        task.abort();
        let _ = task.await;
        Arc::into_inner(log).unwrap().close().unwrap();
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
        let stamped = AuditEvent::decode(stamp(&event.encode_to_vec(), 300).as_ref()).unwrap();
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

    /// Reads arriving together share batches (one fdatasync each), and every event is in the
    /// log, in seq order, once its append returns.
    #[tokio::test]
    async fn concurrent_appends_share_batches() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(engine(dir.path()));
        let (journal, _) = Journal::open(&log).unwrap();
        let submissions = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (count, submit_to) = (Arc::clone(&submissions), Arc::clone(&log));
        let task = tokio::spawn(Arc::clone(&journal).run(Arc::new(move |batch, on_durable| {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            submit_to.try_submit(batch, on_durable)
        })));
        let appends = (0..200).map(|i| {
            let journal = Arc::clone(&journal);
            async move {
                journal
                    .append(&format!("patient-{i}"), &append_op(&format!("actor-{i}")))
                    .await
                    .unwrap()
            }
        });
        let mut seqs: Vec<u64> = futures_util::future::join_all(appends)
            .await
            .iter()
            .map(|e| e.seq)
            .collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
        let batches = submissions.load(std::sync::atomic::Ordering::Relaxed);
        assert!(batches <= 10, "200 appends took {batches} batches");
        close(log, task).await;
        let log = engine(dir.path());
        let (_, left) = Journal::open(&log).unwrap();
        let actors: Vec<(u64, String)> = left
            .iter()
            .map(|e| (e.seq, actor_and_seq(&e.op).0))
            .collect();
        assert_eq!(actors.len(), 200);
        for (seq, actor) in actors {
            assert_eq!(actor, format!("actor-{}", seq - 1));
        }
    }

    /// What the journal made durable and did not forget is handed back when the node starts
    /// again, in order, each event stamped with its seq; seqs go on from there, also after the
    /// journal forgot everything.
    #[tokio::test]
    async fn a_restart_hands_back_what_was_not_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = Arc::new(engine(dir.path()));
            let (journal, left, task) = started(&log);
            assert!(left.is_empty());
            for actor in ["a", "b", "c"] {
                let entry = journal
                    .append("patient-1", &append_op(actor))
                    .await
                    .unwrap();
                assert_eq!(actor_and_seq(&entry.op).0, actor);
            }
            forget_to(&log, 1);
            // The purge travels with the next write; make it durable with one more append.
            journal.append("patient-2", &append_op("d")).await.unwrap();
            close(log, task).await;
        }
        let log = Arc::new(engine(dir.path()));
        let (journal, left, task) = started(&log);
        let got: Vec<_> = left
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
        assert_eq!(journal.next_seq(), 5);
        forget_to(&log, 4);
        let entry = journal.append("patient-3", &append_op("e")).await.unwrap();
        assert_eq!(entry.seq, 5);
        close(log, task).await;
        let log = engine(dir.path());
        let (journal, left) = Journal::open(&log).unwrap();
        assert_eq!(left.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![5]);
        assert_eq!(journal.next_seq(), 6);
    }
}
