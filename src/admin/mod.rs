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
//! Every change goes through the [`TokenStore`](crate::TokenStore), whose change feed drops the
//! layer's cache entry before the call returns: the very next request sees it. Errors are the
//! crate's one JSON shape, `{"code", "message", "status"}`; a bad field's message starts with its
//! name. A 429 comes from the per-subject creation limit
//! ([`AdminConfig::creation_rate_limit`]).
//!
//! ```
//! use std::sync::Arc;
//! use axum::Router;
//! use tower_pat::{MemoryStore, PatAuthLayer, admin::{self, AdminConfig}};
//!
//! let store = MemoryStore::new();
//! let layer = PatAuthLayer::builder(store.clone()).build();
//! let app: Router = Router::new()
//!     .nest("/personal-access-tokens", admin::router(AdminConfig::new(Arc::new(store), &layer)));
//! # let _ = app;
//! ```

mod config;
mod error;
mod events;
mod input;
mod openapi;
mod routes;
mod view;
mod webhook;

pub use config::{AdminConfig, ExpiryPolicy};
pub use events::{EventKind, TokenEvent, TokenEvents};
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
pub fn router(config: AdminConfig) -> axum::Router {
    routes::router(config)
}
