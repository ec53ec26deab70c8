//! The Everything stream of the `Records` service: a patient's current records in stamp order,
//! read by the record layer (`dossier_records::everything`) on blocking threads, in messages
//! bounded by bytes, with a bound on the streams reading at once.

use std::sync::Arc;
use std::time::Duration;

use dossier_api::v1::EverythingResponse;
use dossier_records::PatientKeys;
use dossier_records::everything::Everything;
use dossier_storage::ShardHandle;
use tonic::Status;

use crate::errors::ApiError;
use crate::record_store::ReplicaReads;

/// How long Everything waits for a reader to take the next message before giving up.
pub(super) const STALLED_READER: Duration = Duration::from_secs(60);

/// How long a stream keeps its reading slot while its reader has not taken the last message.
const SLOT_KEPT_FOR_READER: Duration = Duration::from_secs(1);

/// Sends the patient's current records with a stamp above `since`, in stamp order, in messages
/// of at most `bytes_max` bytes (a larger record goes alone). Messages are read and decoded on
/// blocking threads: a large patient must not hold an async worker (heartbeats run there). A
/// stream reads only while it holds one of the node's reading slots (`slots`, taken in arrival
/// order), so that under more streams than the cores serve, the first ones finish instead of all
/// crawling; a stream whose reader falls behind gives its slot up until the reader catches up.
#[allow(clippy::too_many_arguments)]
pub(super) async fn stream_everything(
    slots: Arc<tokio::sync::Semaphore>,
    replica: ShardHandle,
    keys: PatientKeys,
    types: Vec<&'static str>,
    since: u64,
    include_entered_in_error: bool,
    bytes_max: usize,
    tx: &tokio::sync::mpsc::Sender<Result<EverythingResponse, Status>>,
) -> Result<(), ApiError> {
    let blocking_failed =
        |e: tokio::task::JoinError| ApiError::Internal(format!("everything task: {e}"));
    let take_slot = || async {
        Arc::clone(&slots)
            .acquire_owned()
            .await
            .map_err(|_| ApiError::Unavailable("the node is stopping".into()))
    };
    let mut slot = Some(take_slot().await?);
    let mut everything = {
        let replica = replica.clone();
        tokio::task::spawn_blocking(move || {
            Everything::start(
                &ReplicaReads(&replica),
                &keys,
                &types,
                since,
                include_entered_in_error,
            )
        })
        .await
        .map_err(blocking_failed)??
    };
    let as_of = everything.as_of() as i64;
    let mut sent_any = false;
    loop {
        // Room for the next message first: nothing is read for a reader that is not reading.
        let room = match tokio::time::timeout(SLOT_KEPT_FOR_READER, tx.reserve()).await {
            Ok(room) => room,
            Err(_) => {
                slot = None;
                // A reader that stops reading (but keeps its connection) ends the stream after
                // STALLED_READER instead of holding its admission permit for ever.
                match tokio::time::timeout(STALLED_READER, tx.reserve()).await {
                    Ok(room) => room,
                    Err(_) => return Ok(()),
                }
            }
        };
        let Ok(room) = room else {
            return Ok(()); // The reader went away.
        };
        if slot.is_none() {
            slot = Some(take_slot().await?);
        }
        let (back, resources) = {
            let replica = replica.clone();
            tokio::task::spawn_blocking(move || {
                let resources = everything.next_batch(&ReplicaReads(&replica), bytes_max);
                (everything, resources)
            })
            .await
            .map_err(blocking_failed)?
        };
        everything = back;
        let resources = resources?;
        if resources.is_empty() && sent_any {
            return Ok(());
        }
        let last = resources.is_empty();
        room.send(Ok(EverythingResponse {
            resources,
            as_of_micros: as_of,
        }));
        if last {
            return Ok(());
        }
        sent_any = true;
    }
}
