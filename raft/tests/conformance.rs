//! openraft's own storage conformance suite, run against our log store (a group of the shared
//! log engine) and our state machine (a shard replica of the sled store with snapshot files).

use std::sync::Arc;

use dossier_raft::{LogStore, StateMachine, TypeConfig};
use dossier_storage::{LogConfig, LogEngine, StateStore, StoreConfig};
use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};

struct Builder;

fn storage_error(e: impl std::error::Error + 'static) -> StorageError<TypeConfig> {
    use openraft::type_config::TypeConfigExt;
    StorageError::write(TypeConfig::err_from_error(&e))
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().map_err(storage_error)?;
        let log = LogConfig {
            dir: dir.path().join("log"),
            ..LogConfig::default()
        };
        let engine = Arc::new(
            LogEngine::open(log.validate().map_err(storage_error)?).map_err(storage_error)?,
        );
        let state = StoreConfig {
            dir: dir.path().join("state"),
            ..StoreConfig::default()
        };
        let store = Arc::new(
            StateStore::open(state.validate().map_err(storage_error)?).map_err(storage_error)?,
        );
        let sm =
            StateMachine::open(store, 7, dir.path().join("snapshots")).map_err(storage_error)?;
        Ok((dir, LogStore::new(engine, 7, 8 << 20), sm))
    }
}

/// Every test of openraft's suite passes: log reads and visibility, vote, log state, purge
/// (including past the end), truncation, apply, snapshot build / current / install / transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite() {
    Suite::test_all(Builder)
        .await
        .expect("openraft storage suite");
}
