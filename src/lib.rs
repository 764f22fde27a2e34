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
//! Issue a token, protect a router, and send it two requests: one with the token, answered 200,
//! and one without, answered 401 with the RFC 6750 challenge.
//!
//! ```
//! use axum::{Router, body::Body, routing::get};
//! use http::{Request, StatusCode, header};
//! use http_body_util::BodyExt;
//! use tower::ServiceExt;
//! use tower_pat::{MemoryStore, NewToken, Principal, Tokens};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // One handle owns the store, the token format and the hasher.
//! let tokens = Tokens::new(MemoryStore::new());
//! let layer = tokens.layer().realm("example").build();
//!
//! // Issue a token: show the secret once, the store keeps only its hash.
//! let (_record, secret) = tokens
//!     .issue(NewToken::new("alice", "laptop").scopes(["repo:read"])?)
//!     .await?;
//!
//! let app: Router = Router::new()
//!     .route("/me", get(|p: Principal| async move { format!("hello {}", p.subject()) }))
//!     .layer(layer);
//!
//! // With the token: the handler runs and sees who called.
//! let with_token = Request::get("/me")
//!     .header(header::AUTHORIZATION, format!("Bearer {}", secret.expose_secret()))
//!     .body(Body::empty())?;
//! let res = app.clone().oneshot(with_token).await?;
//! assert_eq!(res.status(), StatusCode::OK);
//! assert_eq!(res.into_body().collect().await?.to_bytes(), "hello alice");
//!
//! // Without: 401, the challenge, and a response no cache keeps.
//! let res = app.oneshot(Request::get("/me").body(Body::empty())?).await?;
//! assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
//! assert_eq!(res.headers()[header::WWW_AUTHENTICATE], r#"Bearer realm="example""#);
//! assert_eq!(res.headers()[header::CACHE_CONTROL], "no-store");
//! # Ok(())
//! # }
//! ```
//!
//! To serve it, hand `app` to `axum::serve` as usual; for IP restrictions, serve it with
//! `into_make_service_with_connect_info::<SocketAddr>()` so the layer sees the peer address.
//!
//! ## Errors
//!
//! Each refusal is one [`AuthError`]: one status, one challenge, one JSON body, one gRPC status.
//!
#![doc = include_str!("../docs/errors.md")]
//!
//! ## The client address
//!
//! IP restrictions and the failure limit use the connection's peer address, or, behind trusted
//! proxies, the address they put in the one header configured with
//! [`PatAuthLayerBuilder::trusted_proxies`] ([`ForwardedHeader`]); see [`client_ip`].
//!
//! ## Features
//!
#![doc = include_str!("../docs/features.md")]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

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
pub mod tokens;
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
pub use tokens::{LayerMismatch, Tokens};
pub use usage::{UsageConfig, UsageRecorder, UsageStats};

/// The README's code blocks, compiled as doc-tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
