//! # tower-pat
//!
//! Personal access token authentication for [Tower](https://docs.rs/tower): a layer for axum,
//! hyper and tonic services that accepts a token on every request, decides in a fraction of a
//! microsecond whether it is valid, and hands the handler a [`Principal`].
//!
//! For each request, [`PatAuthLayer`]
//! 1. extracts the token (`Authorization: Bearer …`, and optionally other sources),
//! 2. checks its format offline (prefix, length, alphabet, CRC32 checksum): a mistyped or invented
//!    token never reaches the cache or the store,
//! 3. hashes it (SHA-256, or HMAC-SHA256 with a pepper): only hashes are stored and cached,
//! 4. looks the hash up in an in-process cache backed by a store (one store query per token per
//!    TTL, however many requests arrive at once),
//! 5. enforces revocation, expiry, IP restriction (CIDR) and scopes on every request,
//! 6. puts the [`Principal`] in the request extensions.
//!
//! ## Quickstart
//!
//! ```
//! use axum::{Router, routing::get};
//! use tower_pat::{MemoryStore, NewToken, PatAuthLayer, Principal, ScopeSet, TokenStore};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = MemoryStore::new();
//! let layer = PatAuthLayer::builder(store.clone()).build();
//!
//! // Issue a token: show the secret once, store only its hash.
//! let (record, secret) = NewToken::new("alice", "laptop", ScopeSet::parse(["repo:read"])?)
//!     .issue(layer.format(), layer.hasher(), chrono::Utc::now());
//! store.insert(&record).await?;
//! println!("token: {}", secret.expose_secret());
//!
//! let app: Router = Router::new()
//!     .route("/me", get(|p: Principal| async move { format!("hello {}", p.subject()) }))
//!     .layer(layer);
//! # let _ = app;
//! # Ok(())
//! # }
//! ```
//!
//! ## Errors
//!
//! | case | HTTP | gRPC |
//! | --- | --- | --- |
//! | no credentials | 401, `WWW-Authenticate: Bearer realm="…"` | 16 |
//! | two different credentials, unreadable header | 400 `invalid_request` | 16 |
//! | unknown, malformed, revoked or expired token | 401 `invalid_token` | 16 |
//! | client address outside the IP restriction | 403 `invalid_token` | 7 |
//! | required scope missing | 403 `insufficient_scope` with `scope="…"` | 7 |
//! | too many failed attempts from one client network (opt-in) | 429 with `Retry-After` | 8 |
//! | store unreachable and token not cached | 503 with `Retry-After` | 14 |
//!
//! Error bodies are JSON, `{"code": "invalid_token", "message": "…", "status": 401}`. Only an
//! HTTP/2 request with `content-type: application/grpc…` gets the gRPC column: a trailers-only
//! response (HTTP 200, `grpc-status`). Every refusal carries `Cache-Control: no-store`.
//!
//! ## The client address
//!
//! IP restrictions and the failure limit use the connection's peer address, or, behind trusted
//! proxies, the address they put in the one header configured with
//! [`PatAuthLayerBuilder::trusted_proxies`] ([`ForwardedHeader`]); see [`client_ip`].
//!
//! ## Features
//!
//! - `axum` (default): [`Principal`] as an extractor; the peer address from `ConnectInfo`.
//! - `admin` (default): the management API, [`admin::router`]: create, list, update, rotate,
//!   revoke and delete tokens over REST, with an OpenAPI 3.1 document and webhook events.
//! - `tonic`: the peer address from tonic's `TcpConnectInfo`.
//! - `sqlite` (default): `SqliteStore`, tokens in one SQLite file.
//! - `postgres`: `PostgresStore`, many nodes over one PostgreSQL database,
//!   revocations broadcast between them with `LISTEN`/`NOTIFY`.
//! - `postgres-tls`: TLS (rustls) for the PostgreSQL connections.

#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

#[cfg(feature = "admin")]
pub mod admin;
pub mod auth;
pub mod cache;
pub mod client_ip;
pub mod principal;
pub mod record;
pub mod scope;
pub mod store;
pub mod token;
pub mod usage;

pub use auth::{
    AuthError, ForeignCredential, PatAuth, PatAuthLayer, PatAuthLayerBuilder, RequireScopes,
    RequireScopesLayer, ResponseBody,
};
pub use cache::CacheConfig;
pub use client_ip::{ClientAddr, ClientIpSource, ForwardedHeader};
pub use principal::Principal;
#[cfg(feature = "axum")]
pub use principal::PrincipalRejection;
pub use record::{NewToken, TokenRecord, UsageUpdate};
pub use scope::{Scope, ScopeSet};
#[cfg(feature = "postgres")]
pub use store::PostgresStore;
#[cfg(feature = "sqlite")]
pub use store::SqliteStore;
pub use store::{MemoryStore, Rotation, StoreError, TokenLookup, TokenPatch, TokenStore};
pub use token::{TokenFormat, TokenHash, TokenHasher, TokenSecret};
pub use usage::{UsageConfig, UsageRecorder, UsageStats};

/// The README's code blocks, compiled as doc-tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
