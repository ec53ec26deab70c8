//! The HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (the process serves), `/readyz`
//! (the map is known and every local replica knows its leader).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::node::Node;

pub async fn serve(
    node: Arc<Node>,
    addr: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(node);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind HTTP endpoint {addr}"))?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("serve HTTP")
}

async fn metrics(State(node): State<Arc<Node>>) -> String {
    crate::metrics::render(&node)
}

async fn ready(State(node): State<Arc<Node>>) -> (StatusCode, &'static str) {
    if node.is_stopping() {
        (StatusCode::SERVICE_UNAVAILABLE, "stopping\n")
    } else if node.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
