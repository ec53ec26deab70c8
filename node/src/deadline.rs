//! The server's default request deadline, with the exceptions that need none.
//!
//! tonic's `Server::timeout` bounds every call, streams included, and a snapshot of a large
//! shard streams for longer than any request deadline should be. This layer applies the
//! default deadline to every call except the paths it exempts, which bound themselves (the
//! snapshot stream gives up on a sender quiet for too long). A client's own `grpc-timeout`
//! still applies to every call (tonic honours it beneath this layer).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::Body;

/// Applies `default` to every call whose path is not in `exempt`.
#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer {
    pub default: Duration,
    pub exempt: &'static [&'static str],
}

impl<S> tower_layer::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline {
            inner,
            layer: *self,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    layer: DeadlineLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower_service::Service<::http::Request<Body>> for Deadline<S>
where
    S: tower_service::Service<::http::Request<Body>, Response = ::http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = ::http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: ::http::Request<Body>) -> Self::Future {
        let exempt = self.layer.exempt.contains(&request.uri().path());
        let call = self.inner.call(request);
        if exempt {
            return Box::pin(call);
        }
        let deadline = self.layer.default;
        Box::pin(async move {
            match tokio::time::timeout(deadline, call).await {
                Ok(answer) => answer,
                Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                    "the server's deadline of {deadline:?} passed"
                ))
                .into_http()),
            }
        })
    }
}
