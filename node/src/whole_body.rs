//! gRPC-Web over HTTP/1.1 reads the whole request before it is served.
//!
//! A call refused before its body is read (no or a bad identity, a rate limit, a deadline)
//! answers at once; over HTTP/1.1 the server then closes the connection on a request it did not
//! read, and a client still sending that request sees the connection break (EPIPE, a transport
//! error) instead of the refusal. gRPC-Web requests are unary (the protocol has no client
//! streams), so the node reads each one whole, up to a bound, before the call runs: the client
//! gets its refusal, and the connection stays open. HTTP/2 (gRPC) passes through untouched.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body_util::{BodyExt, Full, Limited};
use tonic::body::Body;

use crate::errors::ApiError;

/// Reads HTTP/1.x request bodies whole, refusing those above `bytes_max`.
#[derive(Debug, Clone, Copy)]
pub struct WholeBodyLayer {
    pub bytes_max: usize,
}

impl<S> tower_layer::Layer<S> for WholeBodyLayer {
    type Service = WholeBody<S>;

    fn layer(&self, inner: S) -> WholeBody<S> {
        WholeBody {
            inner,
            bytes_max: self.bytes_max,
        }
    }
}

#[derive(Debug, Clone)]
pub struct WholeBody<S> {
    inner: S,
    bytes_max: usize,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower_service::Service<::http::Request<Body>> for WholeBody<S>
where
    S: tower_service::Service<::http::Request<Body>, Response = ::http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
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
        // The service made ready by poll_ready serves this call; its clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let bytes_max = self.bytes_max;
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let bytes = match Limited::new(body, bytes_max).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) => {
                    let refusal = if e.is::<http_body_util::LengthLimitError>() {
                        ApiError::InvalidArgument {
                            field: "request".into(),
                            message: format!("is larger than {bytes_max} bytes"),
                            limit: Some(bytes_max as u64),
                        }
                    } else {
                        ApiError::Unavailable(format!("the request could not be read: {e}"))
                    };
                    return Ok(tonic::Status::from(refusal).into_http());
                }
            };
            inner
                .call(::http::Request::from_parts(
                    parts,
                    Body::new(Full::new(bytes)),
                ))
                .await
        })
    }
}
