//! Browsers: gRPC-Web on the gRPC port, and the CORS policy that lets pages of the configured
//! origins read the answers (docs/client-protocol.md, "Browsers").
//!
//! A browser cannot speak gRPC over HTTP/2 trailers, so the node also accepts HTTP/1.1 on its
//! gRPC port and translates gRPC-Web (`application/grpc-web[-text]`) requests to the same
//! services; plain gRPC passes through untouched. Errors keep the standard model: the trailer
//! `grpc-status-details-bin` travels in the gRPC-Web body, and CORS exposes it to the page.

use std::time::Duration;

use ::http::{HeaderName, HeaderValue, Method};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// Request headers a gRPC-Web client sends (and `authorization` for the callers to come).
const ALLOWED_HEADERS: [&str; 8] = [
    "content-type",
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "authorization",
    crate::access::BREAK_GLASS_HEADER,
    "connect-protocol-version",
    "connect-timeout-ms",
];

/// Answer headers the page may read: the gRPC status and its details.
const EXPOSED_HEADERS: [&str; 3] = ["grpc-status", "grpc-message", "grpc-status-details-bin"];

/// How long a browser may cache a preflight answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// The CORS policy for `allowed` origins (validated by the configuration): `*` allows any.
pub fn cors(allowed: &[String]) -> CorsLayer {
    let origins = if allowed.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(allowed.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([Method::POST, Method::OPTIONS])
        .allow_headers(ALLOWED_HEADERS.map(HeaderName::from_static))
        .expose_headers(EXPOSED_HEADERS.map(HeaderName::from_static))
        .max_age(PREFLIGHT_MAX_AGE)
}
