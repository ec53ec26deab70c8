//! openraft's `RaftStateMachine` over one shard replica of the sled state store, and snapshots
//! as files.
//!
//! The applied log id and the membership are stored (postcard-encoded) in the replica's tree with
//! the data, in the same atomic batch. A snapshot is a `dossier-storage` snapshot file in the
//! group's snapshot directory; the newest one is kept, older ones are deleted.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use dossier_storage::{ApplyEntry, EntryPayload as SmPayload, ShardHandle, ShardId, StateStore};
use futures_util::StreamExt;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, Snapshot};
use tracing::{debug, warn};

use crate::types::{LogId, SnapshotMeta, StoredMembership, TypeConfig, decode, encode, io_error};

/// Entries applied per sled batch: bounds memory when a long run is re-applied after a restart.
const APPLY_RUN_MAX: usize = 512;

/// The data of a snapshot: its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFile {
    pub path: PathBuf,
}

type CurrentSnapshot = Arc<Mutex<Option<(SnapshotMeta, PathBuf)>>>;

/// One shard replica's state machine.
#[derive(Debug, Clone)]
pub struct StateMachine {
    store: Arc<StateStore>,
    shard: ShardHandle,
    snapshot_dir: PathBuf,
    current: CurrentSnapshot,
}

fn snapshot_name(meta: &SnapshotMeta) -> String {
    let index = meta.last_log_id.as_ref().map_or(0, |l| l.index + 1);
    format!("snapshot-{index:020}.snap")
}

/// Decodes a storage snapshot header into openraft's snapshot meta.
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
    /// Opens the replica of `shard` (creating it if missing) with its snapshots under
    /// `snapshot_dir`, and finds the newest snapshot left there by an earlier run.
    pub fn open(store: Arc<StateStore>, shard: ShardId, snapshot_dir: PathBuf) -> io::Result<Self> {
        let handle = match store.shard(shard) {
            Some(handle) => handle,
            None => store.create_shard(shard).map_err(io_error)?,
        };
        std::fs::create_dir_all(&snapshot_dir)?;
        let mut newest: Option<(SnapshotMeta, PathBuf)> = None;
        for dirent in std::fs::read_dir(&snapshot_dir)? {
            let path = dirent?.path();
            if path.extension().is_none_or(|e| e != "snap") {
                // Partial transfers and builds from an earlier run.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let header = dossier_storage::read_snapshot_header(&path).map_err(io_error)?;
            let meta = meta_of(header.applied.as_ref(), header.membership.as_deref())?;
            if newest
                .as_ref()
                .is_none_or(|(m, _)| m.last_log_id < meta.last_log_id)
            {
                if let Some((_, older)) = newest.replace((meta, path)) {
                    let _ = std::fs::remove_file(older);
                }
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }
        Ok(StateMachine {
            store,
            shard: handle,
            snapshot_dir,
            current: Arc::new(Mutex::new(newest)),
        })
    }

    pub fn shard(&self) -> &ShardHandle {
        &self.shard
    }

    pub fn snapshot_dir(&self) -> &Path {
        &self.snapshot_dir
    }

    /// Makes `path` the current snapshot under its canonical name, deleting the previous one.
    fn set_current(
        current: &CurrentSnapshot,
        dir: &Path,
        meta: SnapshotMeta,
        path: &Path,
    ) -> io::Result<PathBuf> {
        let target = dir.join(snapshot_name(&meta));
        if path != target {
            std::fs::rename(path, &target)?;
        }
        let mut current = current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, old)) = current.replace((meta, target.clone()))
            && old != target
            && let Err(e) = std::fs::remove_file(&old)
        {
            warn!(path = %old.display(), error = %e, "failed to delete a replaced snapshot");
        }
        Ok(target)
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
    type SnapshotData = SnapshotFile;
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
            run.push(item?);
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
        snapshot: SnapshotFile,
    ) -> Result<(), io::Error> {
        let installed = self
            .store
            .install_snapshot(self.shard.shard(), &snapshot.path)
            .map_err(io_error)?;
        let got = meta_of(installed.applied.as_ref(), installed.membership.as_deref())?;
        if got.last_log_id != meta.last_log_id {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "snapshot file does not match its meta",
            ));
        }
        Self::set_current(
            &self.current,
            &self.snapshot_dir,
            meta.clone(),
            &snapshot.path,
        )?;
        debug!(shard = self.shard.shard(), "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<
        Option<Snapshot<crate::types::CommittedLeaderId, u64, openraft::BasicNode, SnapshotFile>>,
        io::Error,
    > {
        let current = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Ok(current.map(|(meta, path)| Snapshot {
            meta,
            snapshot: SnapshotFile { path },
        }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(
        &mut self,
    ) -> Result<
        Snapshot<crate::types::CommittedLeaderId, u64, openraft::BasicNode, SnapshotFile>,
        io::Error,
    > {
        let building = self.snapshot_dir.join("building.partial");
        let built = self.shard.build_snapshot(&building).map_err(io_error)?;
        let meta = meta_of(built.applied.as_ref(), built.membership.as_deref())?;
        let path = Self::set_current(&self.current, &self.snapshot_dir, meta.clone(), &building)?;
        debug!(
            shard = self.shard.shard(),
            records = built.records,
            "snapshot built"
        );
        Ok(Snapshot {
            meta,
            snapshot: SnapshotFile { path },
        })
    }
}
