//! `dossier-node`: the Dossier server.
//!
//! A node hosts the meta group (the cluster map) and the replicas of the data shards the map
//! assigns to it, all over one shared log and one state store. It serves the public `Kv`,
//! `Records` and `Admin` gRPC services, the internal Raft and ShardAccess services on the same
//! port or on their own (`peer-listen`), and `/metrics`, `/healthz`, `/readyz` over HTTP. See `docs/architecture.md` and `docs/operations.md`.
//!
//! Non-goals: no routing logic beyond "which shard holds this patient" (clients cache the map).
//! Who may call what is docs/security.md.

// The layout of the deepest service futures (a bundle of writes, each waking its group) needs it.
#![recursion_limit = "256"]

mod access;
mod audit;
mod audit_batch;
mod audit_journal;
mod authn;
mod balance;
mod break_glass;
mod compactor;
pub mod config;
mod deadline;
mod errors;
mod http;
mod init;
mod leadership;
mod listener;
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
mod request_drain;
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
    info!(node_id = node.node_id(), listen = %config.node.listen, peer_listen = ?config.node.peer_listen, http = %config.node.http_listen, tls = config.tls.is_some(), "node started");
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
    // Both endpoints stop serving when `serving` turns true.
    macro_rules! serve {
        ($router:expr, $listener:expr, $endpoint:expr) => {{
            let mut serving = serving_rx.clone();
            let stop = async move {
                let _ = serving.wait_for(|stop| *stop).await;
            };
            match &config.tls {
                Some(tls) => {
                    let incoming = listener::tls($listener, Arc::clone(tls), $endpoint);
                    tokio::spawn(async move {
                        $router.serve_with_incoming_shutdown(incoming, stop).await
                    })
                }
                None => {
                    let incoming = listener::plain($listener);
                    tokio::spawn(async move {
                        $router.serve_with_incoming_shutdown(incoming, stop).await
                    })
                }
            }
        }};
    }
    // Raft and ShardAccess answer only node certificates when TLS is on; on their own port
    // (`peer-listen`) the handshake also requires a certificate of the cluster's CA.
    let nodes_only = peer_auth::NodesOnly {
        tls: config.tls.is_some(),
    };
    let raft_service = InterceptedService::new(
        RaftGrpc::new(RaftServer::new(Arc::clone(&node), serving_rx.clone()))
            .max_decoding_message_size(raft_message_max),
        nodes_only,
    );
    let shard_access_service = InterceptedService::new(
        ShardAccessServer::new(shards::ShardAccessService::new(Arc::clone(&node))),
        nodes_only,
    );
    let deadlines = deadline::DeadlineLayer {
        default: node.config.request_deadline() + Duration::from_secs(1),
        exempt: &[INSTALL_SNAPSHOT_PATH],
    };
    // One batcher of read audit events for both public services; it first moves to their
    // chains the events a previous run journaled.
    let audits = audit_batch::AuditBatcher::start(Arc::clone(&node))
        .map_err(|e| anyhow::anyhow!("open the audit journal: {e}"))?;
    // Whichever way this run ends (a port that cannot be bound, an error), its tasks let go of
    // the node; a normal stop stops them earlier, once the servers have.
    let stop_audits = audits.stop_on_drop();
    let peers = match config.node.peer_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("bind peer endpoint {addr}"))?;
            let router = tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .layer(deadlines)
                .add_service(raft_service.clone())
                .add_service(shard_access_service.clone());
            Some(serve!(router, listener, tls::Endpoint::Peers))
        }
        None => None,
    };
    let grpc = {
        let addr = config.node.listen;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind gRPC endpoint {addr}"))?;
        // The public services know their caller (authn.rs) and decide on it (access.rs).
        let authenticate = authn::Authenticate {
            tls: config.tls.is_some(),
            tokens: config.tokens.clone(),
            people: rate_limit::RateLimiter::new(
                config.node.limits.person_calls_per_second,
                config.node.limits.person_calls_burst,
            )
            .map(Arc::new),
        };
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            // gRPC-Web for browsers comes over HTTP/1.1 (web.rs).
            .accept_http1(true)
            .layer(web::cors(&node.config.node.web_allowed_origins))
            // What a call refused early left unread of an HTTP/1.1 request is read and dropped
            // before the answer goes, so that the refusal reaches the client (request_drain.rs);
            // base64 (grpc-web-text) makes a request a third larger.
            .layer(request_drain::DrainLayer {
                bytes_max: request_max.saturating_mul(2),
            })
            .layer(tonic_web::GrpcWebLayer::new())
            .layer(deadlines)
            .add_service(InterceptedService::new(
                KvServer::new(service::kv::KvService::new(
                    Arc::clone(&node),
                    audits.clone(),
                ))
                .max_decoding_message_size(request_max),
                authenticate.clone(),
            ))
            .add_service(InterceptedService::new(
                RecordsServer::new(service::records::RecordsService::new(
                    Arc::clone(&node),
                    audits.clone(),
                ))
                .max_decoding_message_size(request_max),
                authenticate.clone(),
            ))
            .add_service(InterceptedService::new(
                AdminServer::new(service::admin::AdminService::new(
                    Arc::clone(&node),
                    audits.clone(),
                )),
                authenticate,
            ));
        // Without a peer port the internal services share this one.
        let router = if peers.is_none() {
            router
                .add_service(raft_service)
                .add_service(shard_access_service)
        } else {
            router
        };
        serve!(router, listener, tls::Endpoint::Public)
    };
    let reload = config.tls.as_ref().map(|tls| {
        tokio::spawn(reload_credentials(
            Arc::clone(tls),
            config.tokens.clone(),
            Arc::clone(&node),
            serving_rx.clone(),
        ))
    });
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
    // Reads' events journaled here go to their chains now rather than at the next start.
    if let Err(e) = audits.flush(Duration::from_secs(3)).await {
        warn!(error = %e, unmoved = audits.unmoved(), "audit events left in the journal; they are moved at the next start");
    }
    let _ = serving_tx.send(true);
    reconcile.abort();
    placement.abort();
    compactor.abort();
    quiescence.abort();
    split_check.abort();
    if let Some(reload) = reload {
        reload.abort();
    }
    for (what, server) in std::iter::once(("gRPC", grpc)).chain(peers.map(|p| ("peer", p))) {
        match server.await {
            Ok(Err(e)) => error!(error = %e, "{what} server failed"),
            Err(e) => error!(error = %e, "{what} server task failed"),
            Ok(Ok(())) => {}
        }
    }
    if let Ok(Err(e)) = http.await {
        error!(error = %format!("{e:#}"), "HTTP server failed");
    }
    drop(stop_audits);
    node.shutdown().await;
    info!("node stopped");
    Ok(())
}

/// How often the certs directory and the JWKS file are checked for new files.
const CREDENTIALS_CHECK: Duration = Duration::from_secs(5);

/// Reads the node's certificates and the identity provider's keys again when their files change
/// or on SIGHUP, until `serving` stops: the next connections in and out, and the next tokens,
/// use them. Files that do not load are logged and what is in use is kept.
async fn reload_credentials(
    tls: Arc<tls::NodeTls>,
    tokens: Option<Arc<authn::TokenVerifier>>,
    node: Arc<Node>,
    mut serving: watch::Receiver<bool>,
) {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        let forced = tokio::select! {
            _ = tokio::time::sleep(CREDENTIALS_CHECK) => false,
            Some(()) = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => true,
            _ = serving.wait_for(|stop| *stop) => return,
        };
        match tls.reload(forced) {
            Ok(true) => {
                node.set_peer_tls(tls.client());
                info!(
                    sighup = forced,
                    "certificates reloaded: new connections use them"
                );
            }
            Ok(false) => {}
            Err(e) => warn!(
                error = %format!("{e:#}"),
                "the certs directory does not load; keeping the certificates in use"
            ),
        }
        if let Some(tokens) = &tokens {
            match tokens.reload(forced) {
                Ok(true) => info!(sighup = forced, "token keys (JWKS) reloaded"),
                Ok(false) => {}
                Err(e) => warn!(
                    error = %format!("{e:#}"),
                    "the JWKS file does not load; keeping the token keys in use"
                ),
            }
        }
    }
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
