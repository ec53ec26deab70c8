//! The connections a gRPC endpoint serves: accepted on its TCP listener and, with TLS, through a
//! handshake made with the node's current certificates (tls.rs), so that certificates reloaded
//! while the node runs serve the next connection. Handshakes run beside the accept loop, each
//! bounded in time: a slow or silent caller holds no one else up.

use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tracing::debug;

use crate::tls::{Endpoint, NodeTls};

/// A TLS handshake not done by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshaken connections waiting for the server to take them.
const READY_MAX: usize = 64;

/// The plaintext connections of `listener`.
pub fn plain(listener: TcpListener) -> impl Stream<Item = std::io::Result<TcpStream>> {
    futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| {
            let _ = stream.set_nodelay(true);
            stream
        });
        Some((accepted, listener))
    })
}

/// The TLS connections of `listener`, for `endpoint`. The accept loop ends when the server
/// drops the stream.
pub fn tls(
    listener: TcpListener,
    tls: Arc<NodeTls>,
    endpoint: Endpoint,
) -> impl Stream<Item = std::io::Result<TlsStream<TcpStream>>> {
    let (ready, connections) = mpsc::channel(READY_MAX);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
                _ = ready.closed() => return,
            };
            let _ = stream.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.server(endpoint));
            let ready = ready.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(conn)) => {
                        let _ = ready.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake refused"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(connections)
}
