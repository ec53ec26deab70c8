//! `dossier-node`: the Dossier server.
//!
//! A node hosts the meta group (the cluster map) and the replicas of the data shards the map
//! assigns to it, all over one shared log and one state store. It serves the public `Kv` and
//! `Admin` gRPC services and the internal Raft service on one port, and `/metrics`, `/healthz`,
//! `/readyz` over HTTP. See `docs/architecture.md` and `docs/operations.md`.
//!
//! Non-goals: no routing logic beyond "which shard holds this patient" (clients cache the map);
//! no authorisation yet.

// The layout of the deepest service futures (a bundle of writes, each waking its group) needs it.
#![recursion_limit = "256"]

mod access;
mod audit;
mod audit_batch;
mod authn;
mod balance;
mod break_glass;
mod compactor;
pub mod config;
mod deadline;
mod errors;
mod http;
mod leadership;
mod liveness;
mod membership;
mod meta;
mod metrics;
mod mover;
mod node;
mod peer_auth;
mod placement;
mod placement_log;
mod propose;
mod quiesce;
mod rate_limit;
mod record_store;
mod service;
mod shard_leader;
pub mod shards;
mod split_check;
mod splitter;
mod standby;
pub mod tls;
mod web;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use dossier_api::raft::v1::raft_server::RaftServer as RaftGrpc;
use dossier_api::raft::v1::shard_access_server::ShardAccessServer;
use dossier_api::v1::admin_server::AdminServer;
use dossier_api::v1::kv_server::KvServer;
use dossier_api::v1::records_server::RecordsServer;
use dossier_raft::RaftServer;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tracing::{error, info, warn};

pub use config::{Config, Flags, NodeConfig};
pub use node::Node;

/// The snapshot stream bounds itself (a sender quiet for too long is given up on): a shard of
/// gigabytes streams for longer than any request deadline.
const INSTALL_SNAPSHOT_PATH: &str = "/dossier.raft.v1.Raft/InstallSnapshot";

/// Room for a Raft message's own fields beside its entries or snapshot chunk.
const RAFT_MESSAGE_SLACK_BYTES: usize = 1 << 20;

/// Runs a node until `stop` fires (or SIGTERM / Ctrl-C when `stop` is `None`): serve, then on
/// stop hand leaderships to other replicas, stop accepting, stop the groups and flush.
pub async fn run(config: Arc<Config>, stop: Option<watch::Receiver<bool>>) -> Result<()> {
    let node = Node::start(Arc::clone(&config)).await?;
    if config.node.unsafe_stale_reads_for_testing {
        tracing::warn!(
            "UNSAFE: linearizable reads are served without a read barrier (testing only)"
        );
    }
    info!(node_id = node.node_id(), listen = %config.node.listen, http = %config.node.http_listen, tls = config.tls.is_some(), "node started");
    if config.tls.is_none() && !config.node.insecure {
        tracing::warn!(
            "NO TLS: patient data and Raft traffic cross the network in clear text and any caller \
             is served; give the node --certs-dir (dossier cert create-ca, create-node), or pass \
             --insecure to run without TLS on purpose"
        );
    }

    let (serving_tx, serving_rx) = watch::channel(false);
    // Decode limits: a message is refused before it is read whole. Raft messages carry at most
    // `raft.append-bytes-max` of entries, or one entry, or one snapshot chunk.
    let raft_message_max = (config.node.raft.append_bytes_max as usize)
        .max(config.log.entry_bytes_max as usize)
        + RAFT_MESSAGE_SLACK_BYTES;
    let request_max = config.node.limits.request_bytes_max;
    let grpc = {
        let node = Arc::clone(&node);
        let mut serving = serving_rx.clone();
        let replication_stop = serving_rx.clone();
        let addr = config.node.listen;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind gRPC endpoint {addr}"))?;
        let incoming = tokio_stream_listener(listener);
        let mut server = tonic::transport::Server::builder();
        // Raft and ShardAccess answer only node certificates when TLS is on.
        let nodes_only = peer_auth::NodesOnly {
            tls: config.tls.is_some(),
        };
        // The public services know their caller (authn.rs) and decide on it (access.rs).
        // One batcher of read audit events for both services.
        let audits = audit_batch::AuditBatcher::start(Arc::clone(&node));
        let authenticate = authn::Authenticate {
            tls: config.tls.is_some(),
            tokens: config.tokens.clone(),
            people: rate_limit::RateLimiter::new(
                config.node.limits.person_calls_per_second,
                config.node.limits.person_calls_burst,
            )
            .map(Arc::new),
        };
        if let Some(tls) = &config.tls {
            server = server
                .tls_config(tls.server.clone())
                .context("TLS of the gRPC endpoint")?;
        }
        tokio::spawn(async move {
            server
                .tcp_nodelay(true)
                // gRPC-Web for browsers comes over HTTP/1.1 (web.rs).
                .accept_http1(true)
                .layer(web::cors(&node.config.node.web_allowed_origins))
                .layer(tonic_web::GrpcWebLayer::new())
                .layer(deadline::DeadlineLayer {
                    default: node.config.request_deadline() + Duration::from_secs(1),
                    exempt: &[INSTALL_SNAPSHOT_PATH],
                })
                .add_service(InterceptedService::new(
                    RaftGrpc::new(RaftServer::new(Arc::clone(&node), replication_stop))
                        .max_decoding_message_size(raft_message_max),
                    nodes_only,
                ))
                .add_service(InterceptedService::new(
                    KvServer::new(service::kv::KvService::new(
                        Arc::clone(&node),
                        audits.clone(),
                    ))
                    .max_decoding_message_size(request_max),
                    authenticate.clone(),
                ))
                .add_service(InterceptedService::new(
                    ShardAccessServer::new(shards::ShardAccessService::new(Arc::clone(&node))),
                    nodes_only,
                ))
                .add_service(InterceptedService::new(
                    RecordsServer::new(service::records::RecordsService::new(
                        Arc::clone(&node),
                        audits,
                    ))
                    .max_decoding_message_size(request_max),
                    authenticate.clone(),
                ))
                .add_service(InterceptedService::new(
                    AdminServer::new(service::admin::AdminService::new(Arc::clone(&node))),
                    authenticate,
                ))
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = serving.wait_for(|stop| *stop).await;
                })
                .await
        })
    };
    let http = {
        let node = Arc::clone(&node);
        let mut serving = serving_rx.clone();
        let addr = config.node.http_listen;
        tokio::spawn(async move {
            http::serve(node, addr, async move {
                let _ = serving.wait_for(|stop| *stop).await;
            })
            .await
        })
    };
    let reconcile = {
        let node = Arc::clone(&node);
        let mut serving = serving_rx.clone();
        tokio::spawn(async move {
            if !node.config.node.join.is_empty() {
                let seeds = node.config.node.join.clone();
                node.join_through(&seeds).await;
            } else if node.config.node.auto_init {
                while let Err(e) = node.auto_init().await {
                    warn!(error = %format!("{e:#}"), "auto-init failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            let mut last_expiry = std::time::Instant::now();
            let mut last_balance = std::time::Instant::now();
            loop {
                if last_expiry.elapsed() > Duration::from_secs(60) {
                    node.expire_sessions().await;
                    last_expiry = std::time::Instant::now();
                }
                if last_balance.elapsed() > Duration::from_secs(1) && !node.is_stopping() {
                    node.hand_back_leaderships().await;
                    last_balance = std::time::Instant::now();
                }
                if let Err(e) = node.reconcile().await {
                    warn!(error = %format!("{e:#}"), "reconcile failed");
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = serving.wait_for(|stop| *stop) => return,
                }
            }
        })
    };

    let compactor = tokio::spawn(compactor::run(Arc::clone(&node), serving_rx.clone()));
    let quiescence = tokio::spawn(quiesce::run(Arc::clone(&node), serving_rx.clone()));
    let split_check = tokio::spawn(split_check::run(Arc::clone(&node), serving_rx.clone()));
    // The placement driver acts only while this node leads the meta group; a move may take
    // minutes, so it runs beside reconcile, never inside it.
    let placement = {
        let node = Arc::clone(&node);
        let mut serving = serving_rx.clone();
        tokio::spawn(async move {
            loop {
                let busy = node.drive_placement().await;
                let pause = if busy {
                    Duration::from_millis(100)
                } else {
                    Duration::from_secs(1)
                };
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = serving.wait_for(|stop| *stop) => return,
                }
            }
        })
    };

    wait_for_stop(stop).await;
    info!("stopping: handing leaderships over");
    let (moved, kept) = node.drain(Duration::from_secs(3)).await;
    info!(
        moved = moved.len(),
        kept = kept.len(),
        "leaderships handed over"
    );
    let _ = serving_tx.send(true);
    reconcile.abort();
    placement.abort();
    compactor.abort();
    quiescence.abort();
    split_check.abort();
    match grpc.await {
        Ok(Err(e)) => error!(error = %e, "gRPC server failed"),
        Err(e) => error!(error = %e, "gRPC server task failed"),
        Ok(Ok(())) => {}
    }
    if let Ok(Err(e)) = http.await {
        error!(error = %format!("{e:#}"), "HTTP server failed");
    }
    node.shutdown().await;
    info!("node stopped");
    Ok(())
}

fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| {
            let _ = stream.set_nodelay(true);
            stream
        });
        Some((accepted, listener))
    })
}

async fn wait_for_stop(stop: Option<watch::Receiver<bool>>) {
    match stop {
        Some(mut stop) => {
            let _ = stop.wait_for(|s| *s).await;
        }
        None => {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        error!(error = %e, "cannot listen for SIGTERM; stopping on Ctrl-C only");
                        let _ = tokio::signal::ctrl_c().await;
                        return;
                    }
                };
            tokio::select! {
                _ = term.recv() => info!("SIGTERM received"),
                _ = tokio::signal::ctrl_c() => info!("interrupt received"),
            }
        }
    }
}
