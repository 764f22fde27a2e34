//! [`Principal`]: who the request acts for, handed to handlers by the layer.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Utc};
use ipnet::IpNet;

use crate::cache::Slot;
use crate::record::TokenRecord;
use crate::scope::ScopeSet;
use crate::token::TokenHash;

/// The authenticated token behind a request: its id, subject, scopes, type and expiry.
///
/// The layer puts it in the request extensions; read it with `Extension<Principal>`, with
/// `req.extensions().get::<Principal>()`, or (feature `axum`) as an extractor: `principal:
/// Principal` (401 or 500 when absent, see [`PrincipalRejection`]) or `Option<Principal>`.
///
/// Cloning is one atomic increment: the principal is the verification cache's entry, or this
/// thread's copy of it for a token the thread serves often (see [`crate::cache`]).
#[derive(Clone)]
pub struct Principal(pub(crate) Arc<Entry>);

/// A verification cache entry; the principal handed to handlers shares it.
///
/// Lean on purpose (under 400 bytes per cached token in all, against 890 with a full record; see
/// BENCHMARKS.md): only what the request path and the [`Principal`] accessors read, the strings in
/// one allocation, the scope set shared with every other entry that has the same scopes, the last
/// use as one number. The fields read on every cache hit come first: with the `Arc`'s counts they
/// are the first 64 bytes, one cache line or two adjacent ones to fetch when a million entries do
/// not fit in the CPU's caches. 184 bytes, so that the `Arc` (200) takes a 208-byte chunk of
/// glibc's allocator (a test holds it there).
#[repr(C)]
pub(crate) struct Entry {
    /// When the token stops working, in Unix milliseconds (`i64::MAX` for never): its expiry, or
    /// the end of the rotation grace period when it was found by its previous hash.
    pub(crate) expires_ms: i64,
    /// When the entry is next due for a background refresh (coarse clock, Unix ms).
    pub(crate) refresh_at_ms: AtomicI64,
    /// When the token was last used as far as this process knows (Unix ms, 0 for never): the
    /// stored time when loaded, then each use marked for the write-behind recorder.
    pub(crate) last_mark_ms: AtomicI64,
    /// Read on every hit too: empty for most tokens.
    ip_restriction: Box<[IpNet]>,
    /// In a thread's replica of a hot entry (see [`crate::cache`]), the cache's own entry: its
    /// usage mark and liveness are the ones that count. `None` in the cache's own entries.
    origin: Option<Arc<Entry>>,
    // The rest is read on a hit only with required scopes, or by handlers and the cache's
    // maintenance.
    scopes: ScopeSet,
    /// When the entry was loaded from the store (coarse clock, Unix ms).
    pub(crate) loaded_ms: i64,
    /// Where the entry is cached: the keyed PRF of the token.
    pub(crate) slot: Slot,
    /// The hash the store found the token under (the current pepper's or an older one's): what
    /// store events name and a refresh looks up. Never the record's hash after a match on its
    /// rotation grace hash: a refresh must look up the secret that was presented, not the one
    /// that replaced it.
    pub(crate) hash: TokenHash,
    names: Names,
    last_used_ips: Box<[IpAddr]>,
    expires_at: Option<DateTime<Utc>>,
    /// Whether the store found the token by its rotation grace hash (a secret a rotation
    /// replaced): `expires_ms` is then the earlier of its expiry and the end of the grace period.
    /// Read only once the entry has expired (in the bytes the struct's alignment leaves over):
    /// such an entry is looked up again, since past the grace period the secret must be answered
    /// as unknown, and reported as reused.
    pub(crate) superseded: bool,
}

/// The `refresh_at_ms` of an entry the cache dropped ([`Entry::retire`]): no clock reads earlier,
/// so a hit's one check (`now < refresh_at_ms`) also turns it away.
pub(crate) const RETIRED: i64 = i64::MIN;

/// A record's id, subject, name and type, one after the other in one allocation.
#[derive(Clone)]
struct Names {
    buf: Box<str>,
    subject_at: u32,
    name_at: u32,
    type_at: u32,
}

impl Names {
    fn new(id: &str, subject: &str, name: &str, token_type: &str) -> Self {
        let at = |n: usize| u32::try_from(n).expect("a token's names fit in 4 GiB");
        let mut buf =
            String::with_capacity(id.len() + subject.len() + name.len() + token_type.len());
        for s in [id, subject, name, token_type] {
            buf.push_str(s);
        }
        Self {
            buf: buf.into_boxed_str(),
            subject_at: at(id.len()),
            name_at: at(id.len() + subject.len()),
            type_at: at(id.len() + subject.len() + name.len()),
        }
    }

    fn id(&self) -> &str {
        &self.buf[..self.subject_at as usize]
    }

    fn subject(&self) -> &str {
        &self.buf[self.subject_at as usize..self.name_at as usize]
    }

    fn name(&self) -> &str {
        &self.buf[self.name_at as usize..self.type_at as usize]
    }

    fn token_type(&self) -> &str {
        &self.buf[self.type_at as usize..]
    }
}

impl Entry {
    /// The entry for `record`, cached in `slot` and found in the store under `matched`: the
    /// record's hash, or its rotation grace hash (then the entry expires with the grace period).
    pub(crate) fn new(
        record: TokenRecord,
        slot: Slot,
        matched: TokenHash,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Self {
        let mut expires_ms = record.expires_at.map_or(i64::MAX, |t| t.timestamp_millis());
        let superseded = record.hash != matched;
        if superseded {
            // Found by the superseded secret: it works until the grace period ends, if at all.
            let until = record
                .previous_hash
                .filter(|(h, _)| *h == matched)
                .map_or(i64::MIN, |(_, until)| until.timestamp_millis());
            expires_ms = expires_ms.min(until);
        }
        // Never later than now: a use stored in the future (written by a node whose clock ran
        // ahead) would stop this node from marking the token until its clock got there.
        let last_mark = record
            .last_used_at
            .map_or(0, |t| t.timestamp_millis())
            .min(now_ms);
        Self {
            expires_ms,
            refresh_at_ms: AtomicI64::new(now_ms.saturating_add(ttl_ms)),
            last_mark_ms: AtomicI64::new(last_mark),
            ip_restriction: record.ip_restriction.into_boxed_slice(),
            origin: None,
            scopes: record.scopes,
            loaded_ms: now_ms,
            slot,
            hash: matched,
            names: Names::new(
                &record.id,
                &record.subject,
                &record.name,
                &record.token_type,
            ),
            last_used_ips: record.last_used_ips.into_boxed_slice(),
            expires_at: record.expires_at,
            superseded,
        }
    }

    /// A copy of the cache's entry `origin` for one thread's hot replica: the same token, its own
    /// reference count (which only that thread writes), the usage mark and liveness read through
    /// to `origin`.
    pub(crate) fn replicate(origin: &Arc<Entry>) -> Self {
        let origin = Entry::origin(origin);
        Self {
            expires_ms: origin.expires_ms,
            // Never read: a replica's liveness and usage mark are its origin's. Retired and
            // zero, so that a read of them here by mistake fails safe.
            refresh_at_ms: AtomicI64::new(RETIRED),
            last_mark_ms: AtomicI64::new(0),
            ip_restriction: origin.ip_restriction.clone(),
            origin: Some(Arc::clone(origin)),
            scopes: origin.scopes.clone(),
            loaded_ms: origin.loaded_ms,
            slot: origin.slot,
            hash: origin.hash,
            names: origin.names.clone(),
            last_used_ips: origin.last_used_ips.clone(),
            expires_at: origin.expires_at,
            superseded: origin.superseded,
        }
    }

    /// The cache's own entry: `this`, or the entry a replica copies.
    #[inline]
    pub(crate) fn origin(this: &Arc<Self>) -> &Arc<Self> {
        this.origin.as_ref().unwrap_or(this)
    }

    /// The usage mark that counts: the cache entry's, also read through a replica.
    #[inline]
    pub(crate) fn mark(&self) -> &AtomicI64 {
        match &self.origin {
            Some(origin) => &origin.last_mark_ms,
            None => &self.last_mark_ms,
        }
    }

    /// Marks an entry the cache has just dropped: its replicas stop serving (they check
    /// `refresh_at_ms` of their origin on every hit), and a request that took it from the map
    /// before it was dropped treats it as a miss. Call after removing it from the map, before the
    /// removal is reported done.
    #[inline]
    pub(crate) fn retire(&self) {
        self.refresh_at_ms.store(RETIRED, Ordering::SeqCst);
    }

    /// The hash the store found the token under: what a refresh looks up.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    pub(crate) fn stored_hash(&self) -> TokenHash {
        self.hash
    }
}

impl Principal {
    /// The token's record id.
    pub fn token_id(&self) -> &str {
        self.0.names.id()
    }

    /// The owner the token acts for.
    pub fn subject(&self) -> &str {
        self.0.names.subject()
    }

    /// The token's name.
    pub fn token_name(&self) -> &str {
        self.0.names.name()
    }

    /// The scopes granted to the token.
    pub fn scopes(&self) -> &ScopeSet {
        &self.0.scopes
    }

    /// Whether the token's scopes cover `scope` (exact, `resource:*` or `*`).
    pub fn has_scope(&self, scope: &str) -> bool {
        self.0.scopes.grants(scope)
    }

    /// The token type (`personal` unless set otherwise).
    pub fn token_type(&self) -> &str {
        self.0.names.token_type()
    }

    /// When the token expires, `None` for never.
    pub fn expires_at(&self) -> Option<DateTime<Utc>> {
        self.0.expires_at
    }

    /// The networks the token may be used from (empty for anywhere).
    pub fn ip_restriction(&self) -> &[IpNet] {
        &self.0.ip_restriction
    }

    /// When the token was last used as this process knows it, to the millisecond: the stored
    /// time, or a later use marked here and not yet written.
    pub fn last_used_at(&self) -> Option<DateTime<Utc>> {
        let mark = self.0.mark().load(Ordering::Relaxed);
        if mark == 0 {
            return None;
        }
        DateTime::from_timestamp_millis(mark)
    }

    /// The client addresses the store last recorded for the token, newest first.
    pub fn last_used_ips(&self) -> &[IpAddr] {
        &self.0.last_used_ips
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::Utc;

    use super::{Entry, Principal};
    use crate::record::{NewToken, parse_ip_net};
    use crate::scope::ScopeSet;
    use crate::token::{TokenFormat, TokenHasher};

    /// What a million cached tokens cost depends on it: 184 bytes make the `Arc` 200, a 208-byte
    /// chunk of glibc's allocator; 192 would take 224 (BENCHMARKS.md: bytes per cached token).
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn an_entry_stays_within_its_allocation_size() {
        assert!(std::mem::size_of::<Entry>() <= 184);
    }

    #[test]
    fn the_lean_entry_answers_as_the_record_did() {
        let now = Utc::now();
        let scopes = ScopeSet::parse(["repo:read", "repo:*"]).unwrap();
        let (mut record, _) = NewToken::new("zoë@example.com", "déploiement ✓")
            .scope_set(scopes.clone())
            .token_type("service")
            .expires_at(now + chrono::Duration::days(1))
            .ip_restriction([parse_ip_net("10.0.0.0/8").unwrap()])
            .build(&TokenFormat::new(), &TokenHasher::sha256(), now);
        record.last_used_ips = vec!["10.1.2.3".parse().unwrap()];
        let key = record.hash;
        let p = Principal(Arc::new(Entry::new(
            record.clone(),
            crate::cache::Slot::test(1),
            key,
            0,
            60_000,
        )));
        assert_eq!(p.token_id(), record.id);
        assert_eq!(p.subject(), "zoë@example.com");
        assert_eq!(p.token_name(), "déploiement ✓");
        assert_eq!(p.token_type(), "service");
        assert_eq!(p.scopes(), &scopes);
        assert!(p.has_scope("repo:write"));
        assert_eq!(p.expires_at(), record.expires_at);
        assert_eq!(p.ip_restriction(), record.ip_restriction.as_slice());
        assert_eq!(p.last_used_ips(), record.last_used_ips.as_slice());
        assert_eq!(p.last_used_at(), None);
        // Stored under its own hash: a refresh looks that hash up.
        assert_eq!(p.0.stored_hash(), key);
        // A stored last use, to the millisecond, through the entry and through a replica.
        let used = now - chrono::Duration::hours(1);
        record.last_used_at = Some(used);
        let entry = Arc::new(Entry::new(
            record.clone(),
            crate::cache::Slot::test(1),
            key,
            now.timestamp_millis(),
            60_000,
        ));
        let replica = Principal(Arc::new(Entry::replicate(&entry)));
        let to_ms = |t: chrono::DateTime<Utc>| t.timestamp_millis();
        assert_eq!(
            Principal(entry).last_used_at().map(to_ms),
            Some(to_ms(used))
        );
        assert_eq!(replica.last_used_at().map(to_ms), Some(to_ms(used)));
        // A last use stored in the future (a node whose clock ran ahead) is taken as now.
        record.last_used_at = Some(now + chrono::Duration::days(365));
        let entry = Entry::new(record, crate::cache::Slot::test(1), key, to_ms(now), 60_000);
        assert_eq!(
            Principal(Arc::new(entry)).last_used_at().map(to_ms),
            Some(to_ms(now))
        );
    }

    #[tokio::test]
    async fn entries_with_the_same_scopes_share_one_set() {
        let tokens = crate::Tokens::new(crate::MemoryStore::new());
        let layer = tokens.layer().build();
        let mut principals = Vec::new();
        for (name, scopes) in [
            ("a", ["repo:read", "repo:write"]),
            ("b", ["repo:write", "repo:read"]),
            ("c", ["repo:read", "admin"]),
        ] {
            let token = NewToken::new("alice", name).scopes(scopes).unwrap();
            let (_, secret) = tokens.issue(token).await.unwrap();
            principals.push(
                layer
                    .verify(secret.expose_secret(), None, &ScopeSet::empty())
                    .await
                    .unwrap(),
            );
        }
        let set = |p: &Principal| p.scopes().iter().as_slice().as_ptr();
        assert_eq!(principals[0].scopes(), principals[1].scopes());
        assert_eq!(set(&principals[0]), set(&principals[1]));
        assert_ne!(set(&principals[0]), set(&principals[2]));
    }
}
