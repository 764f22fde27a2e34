//! The management API (feature `admin`): a REST API to create, list, read, update, rotate, revoke
//! and delete personal access tokens, with its OpenAPI 3.1 document and change events.
//!
//! [`router`] returns an [`axum::Router`] to nest where the application likes. It applies the
//! [`PatAuthLayer`](crate::PatAuthLayer) it is configured with, so it is protected on its own
//! (behind an application-wide layer too, the second pass is a cache hit). The scope column names
//! [`READ_SCOPE`], [`WRITE_SCOPE`] and [`ADMIN_SCOPE`] by their last word.
//!
#![doc = include_str!("../../docs/admin-endpoints.md")]
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
//! naming it (`revoked: true` or `active: false` at creation, another subject, a field a rotation
//! keeps, an unknown field); only fields the server sets (`id`, `token`, `createdAt`, …) are
//! ignored. A token has at most 100 scopes and 100 networks
//! ([`AdminConfig::max_scopes_per_token`], [`AdminConfig::max_networks_per_token`]), and a body
//! larger than 64 KiB is a 413 ([`AdminConfig::max_body_bytes`]).
//!
//! With feature `secret-scanning`, `AdminConfig::leak_reports` adds `POST /leak-reports`:
//! GitHub secret-scanning reports, signed with a configured ECDSA P-256 key instead of a token,
//! revoke the tokens they name (see `LeakReports`).
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
#[cfg(feature = "secret-scanning")]
mod leaks;
mod openapi;
mod policy;
mod routes;
mod view;
mod webhook;

pub use config::{AdminConfig, ExpiryPolicy};
pub use events::{
    EventKind, LeakSource, PurgeEvent, PurgeSummary, ReuseDetails, TokenEvent, TokenEvents,
};
#[cfg(feature = "secret-scanning")]
pub use leaks::{InvalidPublicKey, KEY_IDENTIFIER_HEADER, KEY_SIGNATURE_HEADER, LeakReports};
pub use openapi::openapi;
pub use view::{EXPIRY_WARNING_WINDOW, ExpiryWarning, TokenView};
pub use webhook::{
    EVENT_HEADER, InvalidWebhookUrl, SIGNATURE_HEADER, SignatureError, TIMESTAMP_HEADER,
    WebhookBuilder, WebhookSink, verify_signature,
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
/// Every response it sends carries `Cache-Control: no-store`, also the errors axum itself makes
/// (405 for a method a path does not have): a response of this API may hold a secret or say which
/// tokens exist, and no shared cache or browser may keep it.
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
