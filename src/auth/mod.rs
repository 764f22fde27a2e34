//! The Tower middleware: [`PatAuthLayer`] authenticates every request, [`RequireScopesLayer`]
//! checks per-route scopes.

mod body;
mod error;
mod future;
mod layer;
pub(crate) mod limit;
mod scopes;

pub use body::ResponseBody;
pub use error::{Anonymous, AuthError};
pub use future::ResponseFuture;
pub use layer::{PatAuth, PatAuthLayer, PatAuthLayerBuilder};
pub use scopes::{RequireScopes, RequireScopesLayer};

#[cfg(feature = "axum")]
pub(crate) use error::json_response;

/// Whether a request speaks gRPC (`content-type: application/grpc…`): its errors are
/// trailers-only responses with a `grpc-status`.
pub(crate) fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}
