//! openraft's `RaftStateMachine` over one shard replica of the sled state store.
//!
//! The applied log id and the membership are stored (postcard-encoded) in the replica's tree with
//! the data, in the same atomic batch.
//!
//! **Snapshots cost no copy of the shard** (`docs/architecture.md`, "Snapshots"):
//! - For compaction, openraft asks for a snapshot so that it may purge the log. The state store
//!   already holds the shard durably, so `build_snapshot` returns the replica's durable
//!   checkpoint (the applied id and membership its last flush made durable) and no data: the log
//!   may be purged up to it because a restart finds the state store at or past it.
//! - For a peer (a follower behind the purge point, a new or rebuilt replica),
//!   `get_current_snapshot` takes a [`SnapshotView`] of the replica (its state at one applied id,
//!   held while applies go on) and the network writes it out and streams it. Only then is the
//!   shard read whole.
//! - A received file is installed into a fresh tree and then deleted.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dossier_storage::{
    ApplyEntry, EntryPayload as SmPayload, HashRange, ShardHandle, ShardId, SnapshotView,
    StateStore,
};
use futures_util::StreamExt;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, Snapshot};
use tracing::debug;

use crate::types::{
    CommittedLeaderId, LogId, SnapshotMeta, StoredMembership, TypeConfig, decode, encode, io_error,
};

/// Entries applied per sled batch: bounds memory when a long run is re-applied after a restart.
const APPLY_RUN_MAX: usize = 512;

/// The data of a snapshot, by where it comes from.
#[derive(Debug)]
pub enum SnapshotData {
    /// A compaction point: the state store holds this state durably; there is nothing to send.
    Checkpoint,
    /// The replica's state at one applied id, to write out and send to a peer.
    View(SnapshotView),
    /// A snapshot file received from a peer, to install.
    Received(PathBuf),
}

/// One shard replica's state machine.
#[derive(Debug, Clone)]
pub struct StateMachine {
    store: Arc<StateStore>,
    shard: ShardHandle,
    snapshot_dir: PathBuf,
}

/// Decodes a storage applied id and membership into openraft's snapshot meta.
fn meta_of(
    applied: Option<&dossier_storage::Applied>,
    membership: Option<&[u8]>,
) -> io::Result<SnapshotMeta> {
    let last_log_id: Option<LogId> = applied.map(|a| decode(&a.log_id)).transpose()?;
    let last_membership: StoredMembership = membership.map(decode).transpose()?.unwrap_or_default();
    Ok(SnapshotMeta {
        last_log_id,
        last_membership,
    })
}

impl StateMachine {
    /// Opens the replica of `shard` (creating it if missing); `snapshot_dir` holds snapshots being
    /// sent or received, and whatever an earlier run left there is removed.
    pub fn open(store: Arc<StateStore>, shard: ShardId, snapshot_dir: PathBuf) -> io::Result<Self> {
        let handle = match store.shard(shard) {
            Some(handle) => handle,
            None => store.create_shard(shard).map_err(io_error)?,
        };
        std::fs::create_dir_all(&snapshot_dir)?;
        for dirent in std::fs::read_dir(&snapshot_dir)? {
            // Transfers cut short by a crash, and snapshot files of earlier versions. Those
            // versions purged the log up to a snapshot file that the state store might not have
            // reached on disk yet: such a file is installed before it goes.
            let path = dirent?.path();
            if path.extension().is_some_and(|e| e == "snap") {
                let header = dossier_storage::read_snapshot_header(&path).map_err(io_error)?;
                let ahead = header.applied.as_ref().map(|a| a.index) > handle.applied_index();
                if ahead {
                    tracing::info!(
                        shard,
                        path = %path.display(),
                        "installing a snapshot an earlier version left ahead of the state store"
                    );
                    store.install_snapshot(shard, &path).map_err(io_error)?;
                }
            }
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "failed to remove a leftover snapshot file");
            }
        }
        Ok(StateMachine {
            store,
            shard: handle,
            snapshot_dir,
        })
    }

    pub fn shard(&self) -> &ShardHandle {
        &self.shard
    }

    pub fn snapshot_dir(&self) -> &Path {
        &self.snapshot_dir
    }

    /// Builds the local replica of a split's `child` (unless it exists): the keys in `given`,
    /// this replica's membership, at the log id every group starts from (index 0, term 0), so
    /// that the child's group starts as one just initialised, with data; each replica of the
    /// parent builds the same state.
    fn build_child(&self, child: ShardId, given: HashRange) -> io::Result<()> {
        let start = LogId::new(CommittedLeaderId::new(0), 0);
        let membership: StoredMembership = match self.shard.membership().map_err(io_error)? {
            Some(bytes) => decode(&bytes)?,
            None => StoredMembership::default(),
        };
        let membership = StoredMembership::new(Some(start), membership.membership().clone());
        let applied = dossier_storage::Applied {
            index: 0,
            log_id: encode(&start)?.into(),
        };
        let built = self
            .store
            .split_off(
                self.shard.shard(),
                child,
                given,
                &applied,
                encode(&membership)?.into(),
            )
            .map_err(io_error)?;
        if built.is_none() {
            tracing::info!(
                parent = self.shard.shard(),
                child,
                "split: the child replica exists already"
            );
        }
        Ok(())
    }

    fn apply_run(&self, run: &mut Vec<EntryResponder<TypeConfig>>) -> io::Result<()> {
        if run.is_empty() {
            return Ok(());
        }
        // The commands are moved into the apply batch, not copied; what the responders need
        // (whether the entry was a command) is kept beside.
        let mut entries = Vec::with_capacity(run.len());
        let mut responders = Vec::with_capacity(run.len());
        for (entry, responder) in run.drain(..) {
            let log_id = entry.log_id;
            let (payload, is_command) = match entry.payload {
                EntryPayload::Blank => (SmPayload::Blank, false),
                EntryPayload::Normal(request) => (SmPayload::Command(request.0), true),
                EntryPayload::Membership(membership) => {
                    let stored = StoredMembership::new(Some(log_id), membership);
                    (SmPayload::Membership(encode(&stored)?.into()), false)
                }
            };
            entries.push(ApplyEntry {
                index: log_id.index,
                log_id: encode(&log_id)?.into(),
                payload,
            });
            responders.push((responder, is_command));
        }
        let outcomes = self.shard.apply(&entries).map_err(io_error)?;
        for ((responder, is_command), outcome) in responders.into_iter().zip(outcomes) {
            if let Some(responder) = responder {
                responder.send(crate::types::Response {
                    outcome: is_command.then_some(outcome),
                });
            }
        }
        Ok(())
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let applied = self.shard.applied().map_err(io_error)?;
        let membership = self.shard.membership().map_err(io_error)?;
        let meta = meta_of(applied.as_ref(), membership.as_deref())?;
        Ok((meta.last_log_id, meta.last_membership))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: futures_util::Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>>
            + Unpin
            + OptionalSend,
    {
        let mut run = Vec::new();
        while let Some(item) = entries.next().await {
            let item = item?;
            if matches!(
                &item.0.payload,
                EntryPayload::Normal(crate::types::Request(
                    dossier_storage::Command::ExpireSessions { .. }
                ))
            ) {
                // Expiry reads the shard's whole session table: off the async runtime, after
                // the entries before it.
                self.apply_run(&mut run)?;
                let sm = self.clone();
                let mut expiry = vec![item];
                tokio::task::spawn_blocking(move || sm.apply_run(&mut expiry))
                    .await
                    .map_err(io::Error::other)??;
                continue;
            }
            if let EntryPayload::Normal(crate::types::Request(dossier_storage::Command::Split {
                at,
                child,
                lo,
                hi,
            })) = &item.0.payload
                && self.shard.split_applies(*at, *lo, *hi)
            {
                // The child replica is built from this replica's state before the split entry
                // (a copy of half the shard: off the async runtime), then the entry is applied.
                let (at, child, hi) = (*at, *child, *hi);
                self.apply_run(&mut run)?;
                let sm = self.clone();
                let mut split = vec![item];
                tokio::task::spawn_blocking(move || {
                    sm.build_child(child, HashRange { lo: at, hi })?;
                    sm.apply_run(&mut split)
                })
                .await
                .map_err(io::Error::other)??;
                continue;
            }
            run.push(item);
            if run.len() == APPLY_RUN_MAX {
                self.apply_run(&mut run)?;
            }
        }
        self.apply_run(&mut run)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        // Loading a shard of gigabytes is long blocking I/O: off the async runtime.
        let store = Arc::clone(&self.store);
        let shard = self.shard.shard();
        let (path, view) = match snapshot {
            SnapshotData::Received(path) => (path, None),
            // Another replica's view handed over in-process (openraft's storage tests do this):
            // written out here first.
            SnapshotData::View(view) => (self.snapshot_dir.join("local.partial"), Some(view)),
            SnapshotData::Checkpoint => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a compaction checkpoint holds no data to install",
                ));
            }
        };
        let file = path.clone();
        let installed = tokio::task::spawn_blocking(move || {
            if let Some(view) = view {
                view.write_to(&file)?;
            }
            store.install_snapshot(shard, &file)
        })
        .await
        .map_err(io::Error::other)?;
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "failed to remove an installed snapshot file");
        }
        let installed = installed.map_err(io_error)?;
        let got = meta_of(installed.applied.as_ref(), installed.membership.as_deref())?;
        if got.last_log_id != meta.last_log_id {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "snapshot file does not match its meta",
            ));
        }
        debug!(shard, "snapshot installed");
        Ok(())
    }

    /// A view of the replica at the applied id its tree holds (at or past the durable checkpoint
    /// any purge was based on): the network writes it out only if it sends it.
    async fn get_current_snapshot(
        &mut self,
    ) -> Result<
        Option<Snapshot<crate::types::CommittedLeaderId, u64, openraft::BasicNode, SnapshotData>>,
        io::Error,
    > {
        let view = self.shard.view().map_err(io_error)?;
        let held = view.meta();
        if held.applied.is_none() {
            return Ok(None);
        }
        let meta = meta_of(held.applied.as_ref(), held.membership.as_deref())?;
        Ok(Some(Snapshot {
            meta,
            snapshot: SnapshotData::View(view),
        }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;

    /// The durable checkpoint, after a flush of the state store if this replica applied more
    /// since the last one (off the async runtime): no copy of the shard. The log may be purged
    /// up to it.
    async fn build_snapshot(
        &mut self,
    ) -> Result<
        Snapshot<crate::types::CommittedLeaderId, u64, openraft::BasicNode, SnapshotData>,
        io::Error,
    > {
        if self.shard.applied_index() > self.shard.durable_applied_index() {
            let store = Arc::clone(&self.store);
            tokio::task::spawn_blocking(move || store.flush())
                .await
                .map_err(io::Error::other)?
                .map_err(io_error)?;
        }
        let checkpoint = self.shard.durable_checkpoint();
        let meta = meta_of(
            checkpoint.as_ref().map(|c| &c.applied),
            checkpoint.as_ref().and_then(|c| c.membership.as_deref()),
        )?;
        debug!(
            shard = self.shard.shard(),
            applied = ?meta.last_log_id,
            "compaction checkpoint"
        );
        Ok(Snapshot {
            meta,
            snapshot: SnapshotData::Checkpoint,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use dossier_storage::{ApplyEntry, Batch, Command, EntryPayload, StateStore, StoreConfig};

    use super::StateMachine;

    fn store(dir: &std::path::Path) -> Arc<StateStore> {
        let config = StoreConfig {
            dir: dir.to_path_buf(),
            ..StoreConfig::default()
        };
        Arc::new(StateStore::open(config.validate().unwrap()).unwrap())
    }

    /// An earlier version left a snapshot file ahead of its state store (it purged the log up
    /// to the file, before its state store was flushed): opening installs it before removing it,
    /// so the replica is not left below its log's purge point.
    #[test]
    fn a_snapshot_file_left_ahead_of_the_state_is_installed_on_open() {
        let source = tempfile::tempdir().unwrap();
        let shard = store(source.path()).create_shard(7).unwrap();
        let entries: Vec<ApplyEntry> = (1..=50)
            .map(|i| ApplyEntry {
                index: i,
                log_id: Bytes::from(vec![0u8; 3]),
                payload: EntryPayload::Command(Command::Txn {
                    session: None,
                    batch: Batch::put(format!("k{i}"), "v"),
                }),
            })
            .collect();
        shard.apply(&entries).unwrap();
        let target = tempfile::tempdir().unwrap();
        let snapshots = target.path().join("snapshots");
        std::fs::create_dir_all(&snapshots).unwrap();
        let file = snapshots.join("snapshot-00000000000000000051.snap");
        shard.build_snapshot(&file).unwrap();

        let sm =
            StateMachine::open(store(&target.path().join("state")), 7, snapshots.clone()).unwrap();
        assert_eq!(sm.shard().applied_index(), Some(50));
        assert_eq!(sm.shard().get(b"k50").unwrap().as_deref(), Some(&b"v"[..]));
        assert_eq!(std::fs::read_dir(&snapshots).unwrap().count(), 0);
    }
}
