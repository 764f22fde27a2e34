//! The Tower middleware: [`PatAuthLayer`] authenticates every request, [`RequireScopesLayer`]
//! checks per-route scopes.
//!
//! Laid out as tower-http lays out a middleware: `builder` ([`PatAuthLayerBuilder`]), `layer`
//! ([`PatAuthLayer`] and [`PatAuthLayer::verify`]), `service` ([`PatAuth`]), `future`
//! ([`ResponseFuture`]), `body` ([`ResponseBody`]), `extract` (where a credential is read from), and
//! `verify`, the verification steps in request order (failure limit, format, cache and store
//! lookup, expiry, IP restriction, scopes, usage mark) with the one refusal path.
//!
//! # Logging
//!
//! The crate logs with [`tracing`], never a token, a hash, a pepper or a webhook key. Targets:
//!
//! | Target | Level | Event |
//! |---|---|---|
//! | `tower_pat::auth` | debug | every refusal of [`PatAuthLayer`] and of [`PatAuthLayer::verify`]: `reason` (`missing_credentials`, `invalid_request`, `invalid_token`, `revoked`, `expired`, `ip_not_allowed`, `insufficient_scope`, `too_many_attempts`, `unavailable`), `status`, `token_id` when the layer held the token's record (expired, IP, scope refusals), `client` when the client address is known |
//! | `tower_pat::auth` | warn | a builder setting that has no effect |
//! | `tower_pat::auth` | warn | a rotated-out secret was presented ([reuse detection](crate::reuse), when on): `token_id`, `client`, `revoked` |
//! | `tower_pat::store` | warn | a store query that failed: a token lookup (the request gets 503 unless a cached entry serves on), a background refresh, a usage flush (retried), a lookup of superseded secrets or a reuse revocation (the request is refused as unknown either way) |
//!
//! Other events (the change feed, the management API, webhooks) use their module path as target,
//! such as `tower_pat::store::postgres` or `tower_pat::admin::webhook`. For example
//! `RUST_LOG=tower_pat::auth=debug,tower_pat::store=warn` with `tracing-subscriber`'s `EnvFilter`.

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

#[cfg(feature = "gateway")]
pub(crate) use verify::{percent_decode, query_key, query_pairs};

pub use body::ResponseBody;
pub use builder::PatAuthLayerBuilder;
pub use error::{Anonymous, AuthError, RefusedToken};
pub use extract::ForeignCredential;
pub use future::ResponseFuture;
pub use layer::PatAuthLayer;
pub use scopes::{RequireScopes, RequireScopesLayer};
pub use service::PatAuth;

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
