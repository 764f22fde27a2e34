//! The Tower middleware: [`PatAuthLayer`] authenticates every request, [`RequireScopesLayer`]
//! checks per-route scopes.

mod body;
mod builder;
mod error;
mod extract;
mod future;
mod layer;
pub(crate) mod limit;
mod scopes;
mod service;
mod verify;

pub use body::ResponseBody;
pub use error::{Anonymous, AuthError};
pub use future::ResponseFuture;
pub use builder::PatAuthLayerBuilder;
pub use layer::PatAuthLayer;
pub use service::PatAuth;
pub use scopes::{RequireScopes, RequireScopesLayer};

#[cfg(feature = "axum")]
pub(crate) use error::json_response;

/// Whether a request speaks gRPC: HTTP/2 with `content-type: application/grpc…`. Its refusals are
/// then trailers-only responses (HTTP 200 with a `grpc-status`); every other request gets a real
/// HTTP status. gRPC needs HTTP/2: an HTTP/1.x request with a gRPC content type (with or without
/// `te: trailers`) is not one, and a 200 refusal would read as success to every HTTP client,
/// cache and log in between.
pub(crate) fn is_grpc<B>(req: &http::Request<B>) -> bool {
    req.version() == http::Version::HTTP_2
        && req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}
