//! `StateStore`: one sled database per node, one tree per shard replica, and the flusher that
//! tells the log how far it may be purged.
//!
//! Durability: sled's own background flush is turned off. A flusher thread calls `Db::flush` every
//! `flush-interval-ms`; before each flush it hands every shard's write-back buffer to sled and notes
//! the applied index the tree then holds, and after the flush returns it publishes that index as
//! the shard's durable applied index. Buffers holding chain entries go in two steps around an
//! extra flush, the entries first (`write_back.rs`); one flush runs at a time. A crash loses at most the
//! applies since the last flush, which the layer above re-applies from the log, so the log must
//! never be purged past [`ShardStore::durable_applied_index`].
//!
//! Which tree holds a shard is recorded in a `catalog` tree (shard id -> generation). Installing a
//! snapshot fills a tree of the next generation and then switches the catalog entry; a crash
//! before the switch leaves the old state, and trees the catalog does not name are dropped on open.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{info, warn};

use crate::ShardId;
use crate::config::StoreConfig;
use crate::error::{Error, Result};
use crate::sm::range::KeyRoute;
use crate::sm::shard::{ShardHandle, ShardStore};

const CATALOG: &[u8] = b"catalog";

pub(crate) fn tree_name(shard: ShardId, generation: u64) -> String {
    format!("shard-{shard}-{generation}")
}

fn parse_generation(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

#[derive(Debug)]
pub(crate) struct StoreInner {
    pub(crate) db: sled::Db,
    pub(crate) catalog: sled::Tree,
    pub(crate) config: Arc<StoreConfig>,
    /// The routing hash of keys, for split ranges.
    pub(crate) route: Option<KeyRoute>,
    pub(crate) shards: Mutex<HashMap<ShardId, ShardHandle>>,
    /// Held through a whole flush: a shard's staged batch must follow its entries' flush.
    flushing: Mutex<()>,
    stop: Mutex<bool>,
    wake: Condvar,
}

/// The sled state store of one node.
#[derive(Debug)]
pub struct StateStore {
    inner: Arc<StoreInner>,
    flusher: Option<JoinHandle<()>>,
}

impl StateStore {
    /// Opens the store without a key route: split ranges are recorded but keys are never
    /// checked against them (tools and tests).
    pub fn open(config: Arc<StoreConfig>) -> Result<Self> {
        StateStore::open_with_route(config, None)
    }

    /// Opens the store; `route` gives the routing hash of a key, by which splits divide a
    /// shard's keys and replicas that split refuse keys outside their range.
    pub fn open_with_route(config: Arc<StoreConfig>, route: Option<KeyRoute>) -> Result<Self> {
        let db = sled::Config::new()
            .path(&config.dir)
            .cache_capacity(config.cache_bytes)
            .flush_every_ms(None)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| Error::sled("open state store", e))?;
        let catalog = db
            .open_tree(CATALOG)
            .map_err(|e| Error::sled("open catalog", e))?;
        let mut shards = HashMap::new();
        let mut named = Vec::new();
        for item in catalog.iter() {
            let (key, value) = item.map_err(|e| Error::sled("read catalog", e))?;
            let (Some(shard), Some(generation)) =
                (parse_generation(&key), parse_generation(&value))
            else {
                return Err(Error::StoreCorrupt {
                    shard: 0,
                    what: "catalog entry",
                });
            };
            let name = tree_name(shard, generation);
            let tree = db
                .open_tree(&name)
                .map_err(|e| Error::sled("open shard tree", e))?;
            shards.insert(
                shard,
                Arc::new(ShardStore::new(
                    shard,
                    tree,
                    config.write_back_bytes,
                    config.snapshot_hold_bytes_max,
                    route,
                )?),
            );
            named.push(name);
        }
        for name in db.tree_names() {
            let name = String::from_utf8_lossy(&name).into_owned();
            if name.starts_with("shard-") && !named.contains(&name) {
                warn!(tree = %name, "dropping a shard tree left by an interrupted install or removal");
                db.drop_tree(name.as_bytes())
                    .map_err(|e| Error::sled("drop orphan tree", e))?;
            }
        }
        info!(dir = %config.dir.display(), shards = shards.len(), "state store opened");
        let inner = Arc::new(StoreInner {
            db,
            catalog,
            config: Arc::clone(&config),
            route,
            shards: Mutex::new(shards),
            flushing: Mutex::new(()),
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        let flusher = {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name("dossier-state-flusher".into())
                .spawn(move || flusher_loop(&inner))
                .map_err(|e| Error::io("spawn state flusher thread", &config.dir, e))?
        };
        Ok(StateStore {
            inner,
            flusher: Some(flusher),
        })
    }

    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// The replica of `shard` on this node, if any.
    pub fn shard(&self, shard: ShardId) -> Option<ShardHandle> {
        self.inner
            .shards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&shard)
            .cloned()
    }

    /// Every shard with a replica here, ascending.
    pub fn shards(&self) -> Vec<ShardId> {
        let mut ids: Vec<ShardId> = self
            .inner
            .shards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Creates an empty replica of `shard`.
    pub fn create_shard(&self, shard: ShardId) -> Result<ShardHandle> {
        let mut shards = self.inner.shards.lock().unwrap_or_else(|e| e.into_inner());
        if shards.contains_key(&shard) {
            return Err(Error::ShardExists { shard });
        }
        let tree = self
            .inner
            .db
            .open_tree(tree_name(shard, 0))
            .map_err(|e| Error::sled("create shard tree", e))?;
        tree.clear()
            .map_err(|e| Error::sled("clear new shard tree", e))?;
        self.inner
            .catalog
            .insert(shard.to_be_bytes(), &0u64.to_be_bytes())
            .map_err(|e| Error::sled("record shard in catalog", e))?;
        let handle = Arc::new(ShardStore::new(
            shard,
            tree,
            self.inner.config.write_back_bytes,
            self.inner.config.snapshot_hold_bytes_max,
            self.inner.route,
        )?);
        shards.insert(shard, Arc::clone(&handle));
        Ok(handle)
    }

    /// Removes the replica of `shard` and its data.
    pub fn remove_shard(&self, shard: ShardId) -> Result<()> {
        // Out of the map first, and the map's lock released: `flush` takes it again.
        let handle = self
            .inner
            .shards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&shard)
            .ok_or(Error::ShardMissing { shard })?;
        let _applying = handle.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        // A flush round that listed the shard before it left the map skips it from now on.
        handle.removed.store(true, Ordering::Release);
        self.inner
            .catalog
            .remove(shard.to_be_bytes())
            .map_err(|e| Error::sled("remove shard from catalog", e))?;
        // sled's flush, not `StateStore::flush`: that one would wait for a round that may be
        // waiting for this shard's apply lock.
        self.inner
            .db
            .flush()
            .map_err(|e| Error::sled("flush shard removal", e))?;
        let name = handle.tree().name();
        self.inner
            .db
            .drop_tree(name)
            .map_err(|e| Error::sled("drop shard tree", e))?;
        Ok(())
    }

    /// Makes everything applied so far durable and advances every shard's durable applied index.
    pub fn flush(&self) -> Result<()> {
        flush(&self.inner)
    }

    pub(crate) fn inner(&self) -> &Arc<StoreInner> {
        &self.inner
    }

    pub fn dir(&self) -> &Path {
        &self.inner.config.dir
    }
}

pub(crate) fn flush(inner: &StoreInner) -> Result<()> {
    let _one = inner.flushing.lock().unwrap_or_else(|e| e.into_inner());
    let shards: Vec<ShardHandle> = inner
        .shards
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .cloned()
        .collect();
    // Chain entries first, durable before the batches whose heads name them (`write_back.rs`).
    let mut staged = false;
    for shard in &shards {
        let _applying = shard.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        if !shard.removed.load(Ordering::Acquire) {
            staged |= shard.stage_locked()?;
        }
    }
    if staged {
        inner
            .db
            .flush()
            .map_err(|e| Error::sled("flush chain entries", e))?;
    }
    let mut stored = Vec::with_capacity(shards.len());
    for shard in &shards {
        // Under the apply lock the tree's applied id, membership and data agree; a shard whose
        // tree a snapshot view holds keeps its writes in memory and its durable state where it is.
        let _applying = shard.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        if shard.removed.load(Ordering::Acquire) {
            stored.push(None);
            continue;
        }
        shard.write_back_staged_locked()?;
        let applied = shard.stored_applied.load(Ordering::Acquire);
        // A shard that applied nothing since its last flush has nothing new to publish: an
        // idle node's many shards cost no reads of their trees.
        if applied == shard.durable_applied.load(Ordering::Acquire) {
            stored.push(None);
            continue;
        }
        stored.push(Some((applied, shard.tree_checkpoint_locked()?)));
    }
    inner
        .db
        .flush()
        .map_err(|e| Error::sled("flush state store", e))?;
    for (shard, stored) in shards.iter().zip(stored) {
        let Some((applied, checkpoint)) = stored else {
            continue;
        };
        shard.durable_applied.fetch_max(applied, Ordering::AcqRel);
        shard.publish_durable(checkpoint);
    }
    Ok(())
}

fn flusher_loop(inner: &StoreInner) {
    let interval = Duration::from_millis(inner.config.flush_interval_ms);
    let mut stop = inner.stop.lock().unwrap_or_else(|e| e.into_inner());
    while !*stop {
        stop = inner
            .wake
            .wait_timeout(stop, interval)
            .unwrap_or_else(|e| e.into_inner())
            .0;
        if *stop {
            break;
        }
        drop(stop);
        if let Err(e) = flush(inner) {
            tracing::error!(error = %e, "state store flush failed");
        }
        stop = inner.stop.lock().unwrap_or_else(|e| e.into_inner());
    }
}

impl Drop for StateStore {
    fn drop(&mut self) {
        *self.inner.stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.inner.wake.notify_all();
        if let Some(flusher) = self.flusher.take()
            && flusher.join().is_err()
        {
            warn!("state flusher thread panicked");
        }
        if let Err(e) = flush(&self.inner) {
            warn!(error = %e, "final state store flush failed");
        }
    }
}
