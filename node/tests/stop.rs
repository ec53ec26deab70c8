//! What a node holds is let go when its run returns.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestNode;
use dossier_node::Config;
use tokio::sync::watch;

/// `dossier_node::run` returns after a stop with nothing of the node still running: the same
/// data directory opens again at once in the same runtime (an embedder restarting a node in
/// place). Before, the audit journal's tasks kept the node, and its log's lock, until the
/// runtime itself was dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_lets_go_of_its_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let (stop, stopped) = watch::channel(false);
    let first = tokio::spawn(dossier_node::run(config.clone(), Some(stopped)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!first.is_finished(), "the node stopped by itself");
    stop_and_wait(&stop, first).await;

    runs_again(config).await;
}

/// A run that fails once the node is open (its gRPC port is taken) lets go of the directory too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_lets_go_of_its_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let taken = std::net::TcpListener::bind(config.node.listen).unwrap();
    let e = dossier_node::run(config.clone(), None).await.unwrap_err();
    assert!(format!("{e:#}").contains("bind"), "{e:#}");
    drop(taken);
    runs_again(config).await;
}

/// A lone node's configuration, its data under `dir`.
fn config(dir: &std::path::Path) -> Arc<Config> {
    TestNode::new(1, dir.join("node-1"), &|_| {})
        .config
        .clone()
        .validate()
        .unwrap()
}

/// Starts a node on `config` and stops it, failing if its data directory stays held.
async fn runs_again(config: Arc<Config>) {
    // Tasks aborted as a run ended are dropped by the runtime moments later: a few tries.
    let mut refusals = Vec::new();
    for _ in 0..20 {
        let (stop, stopped) = watch::channel(false);
        let again = tokio::spawn(dossier_node::run(config.clone(), Some(stopped)));
        tokio::time::sleep(Duration::from_millis(300)).await;
        if !again.is_finished() {
            stop_and_wait(&stop, again).await;
            return;
        }
        refusals.push(format!("{:#}", again.await.unwrap().unwrap_err()));
    }
    panic!("the data directory stayed held after the run ended: {refusals:?}");
}

/// Asks a running node to stop and waits until its run returned without an error.
async fn stop_and_wait(
    stop: &watch::Sender<bool>,
    run: tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the node stops within 30 s")
        .unwrap()
        .unwrap();
}
