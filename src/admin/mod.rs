//! The management API (feature `admin`): a REST API to create, list, read, update, rotate, revoke
//! and delete personal access tokens, with its OpenAPI 3.1 document and change events.
//!
//! [`router`] returns an [`axum::Router`] to nest where the application likes. It applies the
//! [`PatAuthLayer`](crate::PatAuthLayer) it is configured with, so it is protected on its own
//! (behind an application-wide layer too, the second pass is a cache hit):
//! `personalAccessToken:read` reads, `personalAccessToken:write` creates, updates, rotates,
//! revokes and deletes, and `personalAccessToken:admin` acts on other subjects' tokens
//! (`personalAccessToken:*` and `*` cover them all).
//!
//! | method and path | answer |
//! | --- | --- |
//! | `POST /` | 201, `Location`, the token view plus the secret as `token`, `secret` and `accessToken` |
//! | `GET /` | 200, the caller's tokens (`?ownerId=` with the admin scope), total in `X-Total-Count` |
//! | `GET /self` | 200, the token that authenticated the request |
//! | `GET /{id}` | 200, or 404 (also for another subject's token without the admin scope) |
//! | `PATCH /{id}` | 200, a JSON merge patch of `name`, `scopes`, `expiresAt`, `ipRestriction`, `revoked` |
//! | `POST /{id}/rotate` | 201, a new secret; the old one stops at once or after `gracePeriodSeconds` |
//! | `DELETE /{id}` | 200, `{"message": "Personal access token revoked", "status": 200}` |
//! | `GET /openapi.json` | the OpenAPI 3.1 document (public) |
//!
//! A token never gets more than the token that created or changed it:
//! - **scopes**: a created or patched token's scopes are all the caller's; acting on a token
//!   (PATCH of any field, revoke, rotate, delete) needs every scope it holds (a `*` token needs
//!   `*`), whoever owns it: `personalAccessToken:admin` reaches other subjects' tokens, never
//!   scopes the caller lacks (403 `insufficient_scope`);
//! - **lifetime**: a created, patched or rotated token expires no later than the caller (a token
//!   that never expires needs a caller that never expires; a secret still in its rotation grace
//!   period counts as expiring when the grace period ends); under
//!   [`ExpiryPolicy::DefaultLifetime`] a default that would outlive the caller is cut to the
//!   caller's expiry, while an explicit `expiresAt` beyond it is refused (403 `forbidden`);
//! - **networks**: a created, patched or rotated token's `ipRestriction` lies within the caller's
//!   (each network inside one of the caller's; IPv4-mapped IPv6 compares as IPv4); a created token
//!   that names none inherits the caller's (403 `forbidden` otherwise).
//!
//! So a token can narrow itself with a PATCH, never widen itself, and a rotation never hands out a
//! secret that is more than the caller. Every field of a request is honoured or refused with a 400
//! naming it (`revoked: true` at creation, `active: false`, another subject, a field a rotation
//! keeps, an unknown field); only fields the server sets (`id`, `token`, `createdAt`, …) are
//! ignored. A token has at most 100 scopes and 100 networks
//! ([`AdminConfig::max_scopes_per_token`], [`AdminConfig::max_networks_per_token`]), and a body
//! larger than 64 KiB is a 413 ([`AdminConfig::max_body_bytes`]).
//!
//! Every change goes through the [`TokenStore`](crate::TokenStore), whose change feed drops the
//! layer's cache entry before the call returns: the very next request sees it. Errors are the
//! crate's one JSON shape, `{"code", "message", "status"}`; a bad field's message starts with its
//! name. A 429 comes from the per-subject creation limit
//! ([`AdminConfig::creation_rate_limit`]).
//!
//! ```
//! use axum::Router;
//! use tower_pat::{MemoryStore, Tokens, admin::{self, AdminConfig}};
//!
//! # fn main() -> Result<(), tower_pat::LayerMismatch> {
//! let tokens = Tokens::new(MemoryStore::new());
//! let layer = tokens.layer().build();
//! let app: Router = Router::new()
//!     .nest("/personal-access-tokens", admin::router(AdminConfig::new(&tokens, &layer)?))
//!     .layer(layer);
//! # let _ = app;
//! # Ok(())
//! # }
//! ```

mod config;
mod error;
mod events;
mod input;
mod openapi;
mod policy;
mod routes;
mod view;
mod webhook;

pub use config::{AdminConfig, ExpiryPolicy};
pub use events::{EventKind, TokenEvent, TokenEvents};
pub use openapi::openapi;
pub use view::{EXPIRY_WARNING_WINDOW, ExpiryWarning, TokenView};
pub use webhook::{
    EVENT_HEADER, InvalidWebhookUrl, SIGNATURE_HEADER, TIMESTAMP_HEADER, WebhookBuilder,
    WebhookSink,
};

/// The scope that lets a token read tokens.
pub const READ_SCOPE: &str = "personalAccessToken:read";
/// The scope that lets a token create, update, rotate, revoke and delete tokens.
pub const WRITE_SCOPE: &str = "personalAccessToken:write";
/// The scope that lets a token act on other subjects' tokens.
pub const ADMIN_SCOPE: &str = "personalAccessToken:admin";

/// The management API as an axum router, protected by the configured layer. Nest it where the
/// application likes (the examples use `/personal-access-tokens`).
///
/// Every response it sends carries `Cache-Control: no-store` (DESIGN.md §8), also the errors
/// axum itself makes (405 for a method a path does not have).
pub fn router(config: AdminConfig) -> axum::Router {
    routes::router(config).layer(axum::middleware::map_response(no_store))
}

/// Marks a response uncacheable unless it says otherwise already.
async fn no_store(mut res: axum::response::Response) -> axum::response::Response {
    res.headers_mut()
        .entry(http::header::CACHE_CONTROL)
        .or_insert(http::HeaderValue::from_static("no-store"));
    res
}
