//! A client host: a tokio runtime whose threads all live in one network namespace, so that every
//! connection its tasks open leaves from that host's address and can be cut off from some nodes
//! (`Net::cut_clients`) while the harness's own control traffic still reaches every node.
//!
//! A socket belongs to the namespace of the thread that creates it, so each of the runtime's
//! threads (workers and the blocking pool) joins the namespace as it starts, and the clients of
//! the host must be created and used only from tasks spawned on it: a `dossier_client::Client`
//! opens its connections lazily, from the task that first needs them.

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};

/// Worker threads of one client host's runtime.
const WORKER_THREADS: usize = 2;

#[derive(Debug)]
pub struct ClientHost {
    /// `None` only once dropped: a runtime must not be dropped from async code, so `Drop` shuts
    /// it down in the background.
    runtime: Option<tokio::runtime::Runtime>,
    /// The namespace's name, `None` for a host in the harness's own namespace (loopback runs).
    namespace: Option<String>,
    /// Set when a thread of the runtime could not join the namespace.
    misplaced: Arc<AtomicBool>,
}

impl ClientHost {
    /// A runtime whose threads join `namespace` (a name under `/var/run/netns`), or stay in the
    /// harness's namespace when it is `None`.
    pub fn new(name: &str, namespace: Option<&str>) -> Result<ClientHost> {
        let target = namespace
            .map(|ns| {
                let path = format!("/var/run/netns/{ns}");
                File::open(&path)
                    .map(Arc::new)
                    .with_context(|| format!("open {path}"))
            })
            .transpose()?;
        let misplaced = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&misplaced);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKER_THREADS)
            .thread_name(name)
            .enable_all()
            .on_thread_start(move || {
                if let Some(file) = &target
                    && setns(file.as_ref(), CloneFlags::CLONE_NEWNET).is_err()
                {
                    flag.store(true, Ordering::Relaxed);
                }
            })
            .build()
            .with_context(|| format!("start the runtime of client host {name}"))?;
        Ok(ClientHost {
            runtime: Some(runtime),
            namespace: namespace.map(str::to_owned),
            misplaced,
        })
    }

    pub fn handle(&self) -> &tokio::runtime::Handle {
        self.runtime
            .as_ref()
            .expect("the runtime is only taken by drop")
            .handle()
    }

    /// Fails unless a task of this host runs in its namespace (and no thread failed to join it).
    pub async fn check(&self) -> Result<()> {
        let Some(ns) = &self.namespace else {
            return Ok(());
        };
        let expected = std::fs::metadata(format!("/var/run/netns/{ns}"))
            .with_context(|| format!("stat namespace {ns}"))?;
        let seen = self
            .handle()
            .spawn(async { std::fs::metadata("/proc/thread-self/ns/net") })
            .await
            .context("probe the client host's namespace")?
            .context("stat /proc/thread-self/ns/net")?;
        use std::os::unix::fs::MetadataExt;
        if seen.ino() != expected.ino() || self.misplaced.load(Ordering::Relaxed) {
            bail!("the threads of client host {ns} did not join its network namespace");
        }
        Ok(())
    }
}

impl Drop for ClientHost {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
