//! # tower-pat
//!
//! Personal access token authentication for [Tower](https://docs.rs/tower): a layer for axum,
//! hyper and tonic services that accepts a token on every request, decides in a fraction of a
//! microsecond whether it is valid, and hands the handler a [`Principal`].
//!
//! For each request, [`PatAuthLayer`]
//! 1. extracts the token (`Authorization: Bearer …`, and optionally other sources),
//! 2. looks it up in an in-process cache by a keyed PRF of the token (SipHash-2-4-128 under a
//!    per-process random key: see [below](#the-cache-index-and-what-it-reveals)); on a hit that is
//!    all, since only tokens that passed the steps below get an entry,
//! 3. on a miss, checks its format offline (prefix, length, alphabet, CRC32 checksum: a mistyped
//!    or invented token never reaches the store), hashes it (SHA-256, or HMAC-SHA256 with a
//!    pepper: only hashes are stored) and asks the store (one query per token per TTL, however
//!    many requests arrive at once),
//! 4. enforces revocation, expiry, IP restriction (CIDR) and scopes on every request,
//! 5. records usage (last used, last addresses) write-behind,
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
//! ## The cache index and what it reveals
//!
//! The store keeps only the SHA-256 of each token (or its HMAC under a server pepper); the layer
//! computes it only on a cache miss, to ask the store. A cache hit is found by another value: a
//! 128-bit keyed PRF of the token, SipHash-2-4-128 under a 128-bit key drawn from the operating
//! system's CSPRNG when the layer is built. The key stays in the process: it is never stored,
//! logged, printed in `Debug` or shared between layers, and a restart draws a new one. Why this is
//! as strong as a probe keyed by the digest:
//!
//! - **No forgery.** A request hits an entry only if its token's PRF value equals one the cache
//!   holds, and only tokens the store confirmed get an entry. Finding another string with the same
//!   128-bit value needs the key (SipHash is a PRF: without the key its outputs are
//!   indistinguishable from random), and even then a collision would have to be found among the
//!   cached tokens' values, which an attacker does not see. A guess succeeds with probability
//!   n / 2^128 for n cached tokens, where a guess of the token itself succeeds with n / 62^32 ≈
//!   n / 2^190.5: the slot is the weaker of the two, and it is far beyond reach.
//! - **The format check is not skipped, it is remembered.** A token gets an entry only after it
//!   passed the offline format check and the store found it; a request that hits presents that
//!   same string, so the check (CRC32 and base62) would pass again, and so would the reading of
//!   the header as text (visible ASCII): the common request (`Authorization: Bearer`, the only
//!   source configured) is probed by the bytes after the scheme. Malformed and unknown tokens
//!   miss, and on a miss everything runs as before (but the positive map is not probed twice):
//!   the header read as text, format check, digest, negative cache, store.
//! - **Revocation still reaches the entry.** Store events name records by their stored hash;
//!   an index from the hash to the slot, kept under the map's own lock, finds the entry to drop.
//! - **And its copies.** A thread that serves one token many times in a row keeps a copy of its
//!   entry (a *hot replica*: its own reference count, so that one busy token on many cores costs
//!   no write to memory other cores write). A replica serves only while its entry is in the map:
//!   every path that drops an entry (revocation and every other store event, expiry, a refresh, a
//!   reconnected change feed) marks it retired before it returns, and a replica checks that mark
//!   on every hit. The usage mark stays the entry's, so usage is recorded once per token whatever
//!   the number of threads.
//! - **A memory dump** of the process shows the PRF key, the slots and the stored hashes of cached
//!   tokens: no token. The stored hashes are what the store holds anyway; the key and slots let
//!   an attacker test guesses offline exactly as the hashes already do, at the cost of one
//!   SipHash instead of one SHA-256 per guess; with 190 bits of randomness per token neither is
//!   a way in. Without the dump (the usual case) the slots are worth nothing: they are keyed.
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
#[cfg(feature = "gateway")]
pub mod gateway;
pub mod notices;
mod periodic;
pub mod principal;
pub mod record;
pub mod retention;
pub mod reuse;
pub mod scope;
mod shared_run;
pub mod stats;
pub mod store;
pub mod token;
pub mod tokens;
pub mod usage;

pub use auth::{
    AuthError, ForeignCredential, PatAuth, PatAuthLayer, PatAuthLayerBuilder, RefusedToken,
    RequireScopes, RequireScopesLayer, ResponseBody,
};
pub use cache::CacheConfig;
pub use client_ip::{ClientAddr, ClientIpSource, ForwardedHeader};
pub use notices::{ExpiryNoticeConfig, ExpiryNotices};
pub use principal::Principal;
#[cfg(feature = "axum")]
pub use principal::PrincipalRejection;
pub use record::{NewToken, TokenRecord, UsageUpdate};
pub use retention::{Retention, RetentionConfig};
pub use reuse::{ReusePolicy, SecretReuse};
pub use scope::{Scope, ScopeSet};
pub use stats::AuthStats;
#[cfg(feature = "postgres")]
pub use store::PostgresStore;
#[cfg(feature = "sqlite")]
pub use store::SqliteStore;
pub use store::{
    CallerGuard, MemoryStore, Rotation, StoreError, TokenLookup, TokenPatch, TokenStore,
};
pub use token::{TokenFormat, TokenHash, TokenHasher, TokenSecret};
pub use tokens::{LayerMismatch, Tokens};
pub use usage::{UsageConfig, UsageRecorder, UsageStats};

/// The README's code blocks, compiled as doc-tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
