//! [`Principal`]: who the request acts for, handed to handlers by the layer.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Utc};
use ipnet::IpNet;

use crate::record::TokenRecord;
use crate::scope::ScopeSet;
use crate::token::TokenHash;

/// The authenticated token behind a request: its id, subject, scopes, type and expiry.
///
/// The layer puts it in the request extensions; read it with `Extension<Principal>`, with
/// `req.extensions().get::<Principal>()`, or (feature `axum`) as an extractor: `principal:
/// Principal` (401 or 500 when absent, see [`PrincipalRejection`]) or `Option<Principal>`.
///
/// Cloning is one atomic increment: the principal is the verification cache's own entry.
#[derive(Clone)]
pub struct Principal(pub(crate) Arc<Entry>);

/// A verification cache entry; the principal handed to handlers shares it.
pub(crate) struct Entry {
    pub(crate) record: TokenRecord,
    /// The cache key: the token's hash under the current pepper.
    pub(crate) key: TokenHash,
    /// When the token stops working, in Unix milliseconds (`i64::MAX` for never): its expiry, or
    /// the end of the rotation grace period when it was found by its previous hash.
    pub(crate) expires_ms: i64,
    /// When the entry was loaded from the store (coarse clock, Unix ms).
    pub(crate) loaded_ms: i64,
    /// When the entry is next due for a background refresh (coarse clock, Unix ms).
    pub(crate) refresh_at_ms: AtomicI64,
    /// When usage was last marked for the write-behind recorder (Unix ms, 0 for never).
    pub(crate) last_mark_ms: AtomicI64,
}

impl Entry {
    pub(crate) fn new(
        record: TokenRecord,
        key: TokenHash,
        via_previous: bool,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Self {
        let mut expires_ms = record.expires_at.map_or(i64::MAX, |t| t.timestamp_millis());
        if via_previous && let Some((_, until)) = record.previous_hash {
            expires_ms = expires_ms.min(until.timestamp_millis());
        }
        let last_mark = record.last_used_at.map_or(0, |t| t.timestamp_millis());
        Self {
            record,
            key,
            expires_ms,
            loaded_ms: now_ms,
            refresh_at_ms: AtomicI64::new(now_ms.saturating_add(ttl_ms)),
            last_mark_ms: AtomicI64::new(last_mark),
        }
    }
}

impl Principal {
    /// The token's record id.
    pub fn token_id(&self) -> &str {
        &self.0.record.id
    }

    /// The owner the token acts for.
    pub fn subject(&self) -> &str {
        &self.0.record.subject
    }

    /// The token's name.
    pub fn token_name(&self) -> &str {
        &self.0.record.name
    }

    /// The scopes granted to the token.
    pub fn scopes(&self) -> &ScopeSet {
        &self.0.record.scopes
    }

    /// Whether the token's scopes cover `scope` (exact, `resource:*` or `*`).
    pub fn has_scope(&self, scope: &str) -> bool {
        self.0.record.scopes.grants(scope)
    }

    /// The token type (`personal` unless set otherwise).
    pub fn token_type(&self) -> &str {
        &self.0.record.token_type
    }

    /// When the token expires, `None` for never.
    pub fn expires_at(&self) -> Option<DateTime<Utc>> {
        self.0.record.expires_at
    }

    /// The networks the token may be used from (empty for anywhere).
    pub fn ip_restriction(&self) -> &[IpNet] {
        &self.0.record.ip_restriction
    }

    /// When the token was last used as this process knows it: the stored time, or a later use
    /// marked here and not yet written.
    pub fn last_used_at(&self) -> Option<DateTime<Utc>> {
        let mark = self.0.last_mark_ms.load(Ordering::Relaxed);
        let stored = self.0.record.last_used_at;
        match DateTime::from_timestamp_millis(mark) {
            Some(t) if mark > 0 && stored.is_none_or(|s| t > s) => Some(t),
            _ => stored,
        }
    }

    /// The client addresses the store last recorded for the token, newest first.
    pub fn last_used_ips(&self) -> &[IpAddr] {
        &self.0.record.last_used_ips
    }

    /// The record as loaded from the store.
    pub fn record(&self) -> &TokenRecord {
        &self.0.record
    }
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Principal")
            .field("token_id", &self.token_id())
            .field("subject", &self.subject())
            .field("scopes", self.scopes())
            .field("token_type", &self.token_type())
            .field("expires_at", &self.expires_at())
            .finish()
    }
}

#[cfg(feature = "axum")]
pub use extract::PrincipalRejection;

#[cfg(feature = "axum")]
mod extract {
    use axum::extract::{FromRequestParts, OptionalFromRequestParts};
    use axum::response::{IntoResponse, Response};
    use http::request::Parts;

    use super::Principal;
    use crate::auth::{Anonymous, AuthError};

    /// Why the [`Principal`] extractor failed.
    #[derive(Debug)]
    #[non_exhaustive]
    pub enum PrincipalRejection {
        /// The request passed an optional [`PatAuthLayer`](crate::PatAuthLayer) without credentials:
        /// 401 with the layer's `WWW-Authenticate` challenge.
        Unauthenticated(Anonymous),
        /// No `PatAuthLayer` ran for this request: a server misconfiguration, answered 500.
        MissingLayer,
    }

    impl std::fmt::Display for PrincipalRejection {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Self::Unauthenticated(_) => f.write_str("the request carried no access token"),
                Self::MissingLayer => f.write_str(
                    "no Principal in the request: PatAuthLayer is not installed in front of this handler",
                ),
            }
        }
    }

    impl std::error::Error for PrincipalRejection {}

    impl IntoResponse for PrincipalRejection {
        fn into_response(self) -> Response {
            match self {
                Self::Unauthenticated(anon) => anon
                    .challenge()
                    .error_response(&AuthError::MissingCredentials, false)
                    .map(axum::body::Body::from),
                Self::MissingLayer => {
                    tracing::error!("{self}");
                    crate::auth::json_response(
                        http::StatusCode::INTERNAL_SERVER_ERROR,
                        "server_error",
                        "authentication is not configured for this route",
                    )
                    .map(axum::body::Body::from)
                }
            }
        }
    }

    impl<S: Send + Sync> FromRequestParts<S> for Principal {
        type Rejection = PrincipalRejection;

        async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
            if let Some(p) = parts.extensions.get::<Principal>() {
                return Ok(p.clone());
            }
            Err(match parts.extensions.get::<Anonymous>() {
                Some(anon) => PrincipalRejection::Unauthenticated(anon.clone()),
                None => PrincipalRejection::MissingLayer,
            })
        }
    }

    impl<S: Send + Sync> OptionalFromRequestParts<S> for Principal {
        type Rejection = std::convert::Infallible;

        async fn from_request_parts(
            parts: &mut Parts,
            _: &S,
        ) -> Result<Option<Self>, Self::Rejection> {
            Ok(parts.extensions.get::<Principal>().cloned())
        }
    }
}
