//! An HTTP/1.1 request a call left unread is read to its end, and dropped, before the answer
//! goes.
//!
//! A call refused before its request body is read (no or a bad identity, a rate limit) answers
//! at once. Over HTTP/1.1 the server then closes the connection, since the rest of the request
//! was never read, and a client still sending it sees the connection break (EPIPE: a transport
//! error) instead of the refusal; Node's `fetch` (the TypeScript client's default transport)
//! speaks HTTP/1.1. So, after the call has answered, whatever of its request is still unread is
//! read and discarded (at most `bytes_max` bytes, for at most [`DRAIN_FOR`]) before the answer is
//! handed on: nothing is buffered, so a caller without identity cannot make the node hold its
//! request in memory. A request larger than that, or slower, still finds the connection closed.
//! HTTP/2 (gRPC) is untouched: a stream is reset on its own, the connection stays.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use tonic::Status;
use tonic::body::Body;

/// How long an unread request may take to arrive in full before the answer goes without it.
pub const DRAIN_FOR: Duration = Duration::from_secs(5);

/// Reads to its end what a call left unread of an HTTP/1.x request, up to `bytes_max` bytes.
#[derive(Debug, Clone, Copy)]
pub struct DrainLayer {
    pub bytes_max: usize,
}

impl<S> tower_layer::Layer<S> for DrainLayer {
    type Service = Drain<S>;

    fn layer(&self, inner: S) -> Drain<S> {
        Drain {
            inner,
            bytes_max: self.bytes_max,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Drain<S> {
    inner: S,
    bytes_max: usize,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The request body, lent to the call: what the call does not read stays here for the drain.
type Slot = Arc<Mutex<Option<Body>>>;

/// The call's view of the request body in its slot.
struct Lent(Slot);

impl Lent {
    fn with<T>(&self, f: impl FnOnce(Option<&mut Body>) -> T) -> T {
        f(self.0.lock().unwrap_or_else(|e| e.into_inner()).as_mut())
    }
}

impl http_body::Body for Lent {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.with(|body| match body {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.with(|body| body.is_none_or(|b| b.is_end_stream()))
    }

    fn size_hint(&self) -> SizeHint {
        self.with(|body| body.map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint()))
    }
}

impl<S> tower_service::Service<::http::Request<Body>> for Drain<S>
where
    S: tower_service::Service<::http::Request<Body>, Response = ::http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = ::http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: ::http::Request<Body>) -> Self::Future {
        if request.version() >= ::http::Version::HTTP_2 {
            return Box::pin(self.inner.call(request));
        }
        let (parts, body) = request.into_parts();
        let slot: Slot = Arc::new(Mutex::new(Some(body)));
        let call = self.inner.call(::http::Request::from_parts(
            parts,
            Body::new(Lent(Arc::clone(&slot))),
        ));
        let bytes_max = self.bytes_max;
        Box::pin(async move {
            let answer = call.await;
            let rest = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(rest) = rest.filter(|b| !b.is_end_stream()) {
                let _ = tokio::time::timeout(DRAIN_FOR, drain(rest, bytes_max)).await;
            }
            answer
        })
    }
}

/// Reads `body` to its end, dropping it, or until `bytes_max` bytes were read or it fails.
async fn drain(mut body: Body, bytes_max: usize) {
    let mut read = 0usize;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(data) = frame.data_ref() {
            read += data.len();
            if read > bytes_max {
                return;
            }
        }
    }
}
