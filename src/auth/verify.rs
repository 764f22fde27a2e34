//! The verification steps, in request order: the failure limit, the cache probe by the token's
//! keyed slot, and only on a miss the offline format check, the digest and the negative cache
//! ([`Verifier::probe`]; a request in the common form, `Authorization: Bearer`, is probed by the
//! header's bytes first, in [`Verifier::admit_request`]), then, with what the cache or the store
//! said, expiry, the token's IP restriction, scopes and the usage mark
//! ([`Verifier::authorize`]). The request path ([`PatAuth`](crate::PatAuth)) and
//! [`PatAuthLayer::verify`](crate::PatAuthLayer::verify) both run these, and every refusal of
//! either goes through [`Verifier::refuse`].

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::{HeaderName, HeaderValue, Request, Response, header};

use super::error::{Anonymous, AuthError, Challenge, RefusedToken};
use super::extract::{ForeignCredential, Sources};
use super::is_grpc;
use super::limit::{Attempt, FailureLimit};
use crate::cache::{Cache, Negative, Outcome, Slot, now_ms};
use crate::client_ip::{ClientAddr, ClientIpSource};
use crate::principal::Principal;
use crate::record::ip_allowed;
use crate::scope::ScopeSet;
use crate::stats::Counter;
use crate::token::{TokenFormat, TokenHash};
use crate::usage::UsageRecorder;

/// The layer's configuration and state, shared by its clones, its services and their futures.
pub(crate) struct Verifier {
    pub(super) format: TokenFormat,
    pub(super) cache: Arc<Cache>,
    pub(super) sources: Sources,
    pub(super) challenge: Challenge,
    pub(super) client_ip: ClientIpSource,
    pub(super) required: ScopeSet,
    pub(super) anonymous: bool,
    pub(super) unavailable_retry_after: u64,
    pub(super) usage: Option<UsageRecorder>,
    pub(super) limiter: Option<FailureLimit>,
    /// Whether a request without a peer address was named in the log while the failure limit is
    /// on (once per layer: such requests are not limited).
    pub(super) unkeyed_warned: AtomicBool,
    pub(super) pass_foreign: bool,
    pub(super) on_reject: Option<RejectHook>,
    pub(super) expiration_header: bool,
}

/// The application's hook that shapes refusal responses
/// ([`PatAuthLayerBuilder::on_reject`](crate::PatAuthLayerBuilder::on_reject)).
pub(super) type RejectHook = Arc<dyn Fn(&AuthError, &mut Response<Bytes>) + Send + Sync>;

/// The name of the header with the token's expiry
/// ([`PatAuthLayerBuilder::token_expiration_header`](crate::PatAuthLayerBuilder::token_expiration_header)).
pub(super) const TOKEN_EXPIRATION: HeaderName = HeaderName::from_static("x-token-expiration");

/// The `X-Token-Expiration` value of a token expiring at `expires_ms`: RFC 3339 in UTC to the
/// second (`2025-01-01T00:00:00Z`); `None` for a token that never expires.
#[cold]
pub(super) fn expiration_value(expires_ms: i64) -> Option<HeaderValue> {
    if expires_ms == i64::MAX {
        return None;
    }
    let at = DateTime::from_timestamp_millis(expires_ms)?;
    HeaderValue::try_from(at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)).ok()
}

/// A refused verification: the error, and the principal when the token matched a record (for the
/// refusal event's token id).
pub(super) struct Refusal {
    pub(super) error: AuthError,
    pub(super) principal: Option<Principal>,
    /// The slot of a cached entry that was found by a rotated-out secret and has expired
    /// ([`Verifier::principal`]): it has been dropped, and the token is to be looked up as a
    /// cache miss, so that a secret past its grace period gets the answer of an unknown token
    /// and is reported as reused. The error is then [`AuthError::InvalidToken`], with no
    /// principal: a caller that cannot look it up (after a store lookup, which only a racing
    /// load can lead to) answers as for an unknown token.
    pub(super) look_up: Option<Slot>,
}

impl From<AuthError> for Refusal {
    #[inline]
    fn from(error: AuthError) -> Self {
        Self {
            error,
            principal: None,
            look_up: None,
        }
    }
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PatAuthLayer")
            .field("format", &self.format)
            .field("sources", &self.sources)
            .field("challenge", &self.challenge)
            .field("client_ip", &self.client_ip)
            .field("required", &self.required)
            .field("anonymous", &self.anonymous)
            .field("usage", &self.usage)
            .field("limiter", &self.limiter)
            .field("pass_foreign", &self.pass_foreign)
            .field("on_reject", &self.on_reject.is_some())
            .field("expiration_header", &self.expiration_header)
            .finish_non_exhaustive()
    }
}

/// The hashes a store lookup searches for a token the cache does not know: under the current
/// pepper, then under the previous ones.
pub(super) struct LookupKeys {
    /// Where the answer is cached.
    pub(super) slot: Slot,
    pub(super) hash: TokenHash,
    pub(super) previous: Vec<TokenHash>,
}

/// What the cache knows about a well-formed token.
pub(super) enum Probe {
    /// The cache's answer: a principal, a remembered refusal, or the store being unavailable.
    Cached(Outcome),
    /// Nothing: the store must be asked for these hashes.
    Uncached(LookupKeys),
}

/// What the synchronous part of the request path decided.
pub(super) enum Admission {
    /// The request may go on (with a principal, or anonymous).
    Admitted,
    /// The refusal to send.
    Refused(Response<Bytes>),
    /// The cache does not know the token: the store must be asked for these hashes.
    Uncached(LookupKeys),
}

impl Verifier {
    /// The synchronous part of the request path: everything up to and including the cache probe.
    #[inline]
    pub(super) fn admit_request<B>(&self, req: &mut Request<B>) -> Admission {
        if self.limiter.is_some()
            && let Err(e) = self.check_limit(self.client_addr(req).limit_key())
        {
            return Admission::Refused(self.refuse(e.into(), req));
        }
        // The common request: a cached token in `Authorization: Bearer`, probed by its bytes.
        if let Some(token) = self
            .sources
            .bearer_bytes(req.headers(), self.format.token_len())
        {
            // One clock read serves the probe and, on a hit, the expiry check.
            let now = now_ms();
            let slot = self.cache.slot(token);
            if let Some(principal) = self.cache.probe(slot, now) {
                return self.admit_cached(Outcome::Found(principal), req, now);
            }
            return self.admit_uncached(req, Some(slot));
        }
        self.admit_uncached(req, None)
    }

    /// The rest of [`admit_request`](Self::admit_request): every request the cache does not hold
    /// in the common form. `missed` is the slot of the bytes the common form probed, in vain:
    /// when the token read as text is those bytes, it is not probed again.
    #[inline(never)]
    fn admit_uncached<B>(&self, req: &mut Request<B>, missed: Option<Slot>) -> Admission {
        let token = match self.sources.extract(req.headers(), req.uri()) {
            Ok(Some(token))
                if self.pass_foreign
                    && !token.starts_with(self.format.prefix())
                    && !self.mentions_prefix(req) =>
            {
                return self.pass_foreign(req);
            }
            Ok(Some(token)) => token,
            Ok(None)
                if self.pass_foreign
                    && Sources::other_authorization(req.headers())
                    && !self.mentions_prefix(req) =>
            {
                return self.pass_foreign(req);
            }
            // A token in a spelling the layer does not read (`Bearer<TAB>pat_…`, an unaccepted
            // scheme or source) is a bad credential, not none: refused as without `anonymous`.
            Ok(None) if self.anonymous && !self.mentions_prefix(req) => {
                req.extensions_mut()
                    .insert(Anonymous(self.challenge.clone()));
                self.cache.stats.add(Counter::Anonymous);
                return Admission::Admitted;
            }
            Ok(None) => {
                let error = match self.sources.unread_credential(req.headers(), req.uri()) {
                    Some(why) => AuthError::CredentialNotAccepted(why),
                    None => AuthError::MissingCredentials,
                };
                return Admission::Refused(self.refuse(error.into(), req));
            }
            Err(e) => return Admission::Refused(self.refuse(e.into(), req)),
        };
        let now = now_ms();
        let missed = missed.filter(|_| {
            self.sources
                .bearer_bytes(req.headers(), self.format.token_len())
                .is_some_and(|probed| probed == token.as_bytes())
        });
        let probe = match missed {
            Some(slot) => self.probe_miss(token, slot),
            None => self.probe(token, now),
        };
        self.admit_probed(probe, req, now)
    }

    /// Admits, refuses or sends to the store a request on what the cache probe said.
    #[inline]
    fn admit_probed<B>(
        &self,
        probe: Result<Probe, AuthError>,
        req: &mut Request<B>,
        now: i64,
    ) -> Admission {
        match probe {
            Ok(Probe::Cached(outcome)) => self.admit_cached(outcome, req, now),
            Ok(Probe::Uncached(keys)) => {
                self.cache.stats.add(Counter::Miss);
                Admission::Uncached(keys)
            }
            Err(e) => Admission::Refused(self.refuse(e.into(), req)),
        }
    }

    /// Admits or refuses a request on what the cache said (a principal, a remembered refusal).
    #[inline]
    fn admit_cached<B>(&self, outcome: Outcome, req: &mut Request<B>, now: i64) -> Admission {
        let positive = matches!(outcome, Outcome::Found(_));
        match self.admit(outcome, req, now) {
            Ok(()) => {
                self.cache.stats.add(Counter::OkHit);
                Admission::Admitted
            }
            Err(Refusal {
                look_up: Some(slot),
                ..
            }) => self.admit_looked_up(req, slot, now),
            Err(refusal) => {
                if positive {
                    self.cache.stats.add(Counter::HitRefused);
                }
                Admission::Refused(self.refuse(refusal, req))
            }
        }
    }

    /// Whether a credential that starts with the token prefix (in any letter case) is anywhere a
    /// credential can be, in any spelling: an `Authorization` value after its scheme and any
    /// spaces or tabs (`Bearer<TAB>pat_…`, an unaccepted scheme) or as a whole, a configured
    /// header, or the query's `access_token` after percent-decoding (`+pat_…`, `%70at_…`). Such a
    /// request is never passed on as foreign: it gets the answer it would get without
    /// `pass_foreign_credentials`. Only the start of a credential counts, so a JWT that happens
    /// to contain the prefix is still foreign.
    #[cold]
    fn mentions_prefix<B>(&self, req: &Request<B>) -> bool {
        let prefix = self.format.prefix().as_bytes();
        let starts = |v: &[u8]| {
            let v = v.trim_ascii_start();
            !prefix.is_empty()
                && v.len() >= prefix.len()
                && v[..prefix.len()].eq_ignore_ascii_case(prefix)
        };
        let credential = |v: &[u8]| {
            let v = v.trim_ascii();
            starts(v)
                || v.iter()
                    .position(|b| *b == b' ' || *b == b'\t')
                    .is_some_and(|i| starts(&v[i..]))
        };
        let headers = req.headers();
        let in_headers = headers
            .get_all(http::header::AUTHORIZATION)
            .iter()
            .chain(self.sources.headers.iter().flat_map(|n| headers.get_all(n)))
            .any(|v| credential(v.as_bytes()));
        in_headers
            || req.uri().query().is_some_and(|q| {
                query_pairs(q)
                    .filter(|(k, _)| is_access_token_key(k))
                    .any(|(_, v)| {
                        let v = percent_decode(v.as_bytes());
                        starts(&v)
                    })
            })
    }

    /// Lets a request with a foreign credential through without a principal, marked for the
    /// authentication layer behind.
    #[cold]
    fn pass_foreign<B>(&self, req: &mut Request<B>) -> Admission {
        let extensions = req.extensions_mut();
        extensions.insert(ForeignCredential);
        // The `Principal` extractor answers with this layer's 401 challenge if nothing behind
        // authenticated the request.
        extensions.insert(Anonymous(self.challenge.clone()));
        self.cache.stats.add(Counter::Anonymous);
        Admission::Admitted
    }

    /// The cache probe of a token: its keyed PRF, then the positive map. Only on a miss the
    /// offline format check, the SHA-256 (or HMAC) and the negative cache: a hit is a token that
    /// passed them when it was cached, and no other string has its slot (see the crate docs on
    /// the cache index).
    #[inline]
    pub(super) fn probe(&self, token: &str, now: i64) -> Result<Probe, AuthError> {
        // A token of another length is malformed and never cached: refused before the PRF, which
        // would otherwise hash whatever length a client sends.
        if token.len() != self.format.token_len() {
            return Err(AuthError::InvalidToken);
        }
        let slot = self.cache.slot(token.as_bytes());
        match self.cache.probe(slot, now) {
            Some(principal) => Ok(Probe::Cached(Outcome::Found(principal))),
            None => self.probe_miss(token, slot),
        }
    }

    /// The rest of [`probe`](Self::probe) for a token the positive map does not hold.
    #[inline(never)]
    pub(super) fn probe_miss(&self, token: &str, slot: Slot) -> Result<Probe, AuthError> {
        if self.format.check(token).is_err() {
            return Err(AuthError::InvalidToken);
        }
        let hasher = self.cache.hasher();
        let hash = hasher.hash(token);
        Ok(match self.cache.probe_negative(&hash) {
            Some(negative) => {
                self.cache.stats.add(Counter::NegativeHit);
                Probe::Cached(Outcome::Rejected(negative))
            }
            // Without previous peppers this is an empty `Vec`: no allocation.
            None => Probe::Uncached(LookupKeys {
                slot,
                hash,
                previous: hasher.previous_hashes(token),
            }),
        })
    }

    /// The one refusal path of requests: [`refused`](Self::refused), then the error response,
    /// HTTP or gRPC as the request speaks, shaped by the application's
    /// [`on_reject`](crate::PatAuthLayerBuilder::on_reject) hook.
    #[cold]
    pub(super) fn refuse<B>(&self, refusal: Refusal, req: &Request<B>) -> Response<Bytes> {
        let client = self.client_addr(req);
        self.refused(&refusal, client.limit_key(), client.ip());
        let grpc = is_grpc(req);
        let res = self.challenge.error_response(&refusal.error, grpc);
        let mut res = match &self.on_reject {
            Some(hook) => shape(hook, &refusal.error, res, grpc),
            None => res,
        };
        if let Some(principal) = refusal.principal {
            res.extensions_mut().insert(RefusedToken(principal));
        }
        res
    }

    /// What every refusal, of a request or of [`PatAuthLayer::verify`], does besides answering:
    /// a failed credential counts against the failure limit (`key`), and a debug event names the
    /// reason, the token id when the token matched a record, and the client address.
    ///
    /// [`PatAuthLayer::verify`]: crate::PatAuthLayer::verify
    #[cold]
    pub(super) fn refused(&self, refusal: &Refusal, key: Option<IpAddr>, client: Option<IpAddr>) {
        self.count_failure(&refusal.error, key);
        self.cache.stats.refused(&refusal.error);
        tracing::debug!(
            target: "tower_pat::auth",
            reason = refusal.error.reason(),
            status = refusal.error.status().as_u16(),
            token_id = refusal.principal.as_ref().map(Principal::token_id),
            client = client.map(tracing::field::display),
            "request refused"
        );
    }

    /// The request's client address, and the address its failures count against.
    #[inline]
    pub(super) fn client_addr<B>(&self, req: &Request<B>) -> ClientAddr {
        self.client_ip.client_addr(req.headers(), req.extensions())
    }

    /// `Err(TooManyAttempts)` while the failure limit refuses `key`'s network.
    #[inline]
    pub(super) fn check_limit(&self, key: Option<IpAddr>) -> Result<(), AuthError> {
        if let Some(limiter) = &self.limiter
            && let Some(key) = key
            && let Some(retry_after_secs) = limiter.blocked(key)
        {
            return Err(AuthError::TooManyAttempts { retry_after_secs });
        }
        Ok(())
    }

    /// Before a store lookup of a token from `key`'s network: with the failure limit on, the
    /// lookup counts as a failure until the returned attempt is dropped (after its refusal was
    /// counted), so that requests at once cannot all pass a window with one failure left (each
    /// would reach the store). Waits while the network's failures and lookups in progress reach
    /// the limit, at most `lookup_wait`; `TooManyAttempts` once the failures alone do, or when
    /// the wait is over (then with a `Retry-After` of a second: the network's own limit holds it
    /// back, not the store).
    #[cold]
    pub(super) async fn lookup_attempt(
        &self,
        key: Option<IpAddr>,
    ) -> Result<Option<Attempt>, AuthError> {
        let Some(limiter) = &self.limiter else {
            return Ok(None);
        };
        let Some(key) = key else {
            self.unkeyed();
            return Ok(None);
        };
        match tokio::time::timeout(self.cache.config().lookup_wait, limiter.attempt(key)).await {
            Ok(Ok(attempt)) => Ok(Some(attempt)),
            Ok(Err(retry_after_secs)) => Err(AuthError::TooManyAttempts { retry_after_secs }),
            Err(_) => Err(AuthError::TooManyAttempts {
                retry_after_secs: 1,
            }),
        }
    }

    /// A store lookup for a request without a peer address while the failure limit is on: its
    /// failures cannot be counted against anyone. Named once per layer at warn, since it means
    /// the server does not record the address where the layer looks
    /// ([`peer_addr`](crate::client_ip::peer_addr)) and the limit is off for every request.
    #[cold]
    fn unkeyed(&self) {
        if !self.unkeyed_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                target: "tower_pat::auth",
                "the failure limit is on, but a request carries no peer address: its failures are \
                 not limited (insert the connection's address: axum's ConnectInfo, a SocketAddr \
                 extension; see tower_pat::client_ip::peer_addr)"
            );
        }
    }

    /// Counts a failed credential against `key`'s network.
    #[cold]
    pub(super) fn count_failure(&self, err: &AuthError, key: Option<IpAddr>) {
        if let Some(limiter) = &self.limiter
            && matches!(
                err,
                AuthError::InvalidToken
                    | AuthError::Revoked
                    | AuthError::Disabled
                    | AuthError::Expired
            )
            && let Some(key) = key
        {
            limiter.count(key);
        }
    }

    /// Enforces what the cache or the store said, plus the per-request rules (IP, scopes), and puts
    /// the principal in the request. On a cache hit this is the rest of the hot path.
    #[inline]
    pub(super) fn admit<B>(
        &self,
        outcome: Outcome,
        req: &mut Request<B>,
        now: i64,
    ) -> Result<(), Refusal> {
        let principal = self.authorize(outcome, now, None, || self.client_addr(req).ip())?;
        req.extensions_mut().insert(principal);
        Ok(())
    }

    /// The rules after the lookup, shared by requests and [`PatAuthLayer::verify`]: expiry, the
    /// token's IP restriction against the client address (`client` is only called when needed),
    /// the layer's required scopes and `extra` ones, and the usage mark.
    ///
    /// [`PatAuthLayer::verify`]: crate::PatAuthLayer::verify
    #[inline]
    pub(super) fn authorize(
        &self,
        outcome: Outcome,
        now: i64,
        extra: Option<&ScopeSet>,
        client: impl Fn() -> Option<IpAddr>,
    ) -> Result<Principal, Refusal> {
        let principal = self.principal(outcome, now)?;
        let restriction = principal.ip_restriction();
        let mut ip = None;
        if !restriction.is_empty() {
            ip = client();
            if !ip_allowed(restriction, ip) {
                return Err(Refusal {
                    error: AuthError::IpNotAllowed,
                    principal: Some(principal),
                    look_up: None,
                });
            }
        }
        let scopes = principal.scopes();
        if (!self.required.is_empty() && !scopes.grants_all(&self.required))
            || extra.is_some_and(|extra| !scopes.grants_all(extra))
        {
            return Err(Refusal {
                error: self.insufficient_scope(extra),
                principal: Some(principal),
                look_up: None,
            });
        }
        if let Some(usage) = &self.usage {
            // One relaxed load while the token was marked within the granularity.
            let last = principal.0.mark().load(Ordering::Relaxed);
            if now.saturating_sub(last) >= usage.granularity_ms() {
                self.mark(usage, &principal, last, now, || ip.or_else(&client));
            }
        }
        Ok(principal)
    }

    /// The 403 naming every scope required: the layer's and `extra`.
    #[cold]
    fn insufficient_scope(&self, extra: Option<&ScopeSet>) -> AuthError {
        AuthError::InsufficientScope(match extra {
            Some(extra) if !extra.is_empty() => {
                self.required.iter().chain(extra).cloned().collect()
            }
            _ => self.required.clone(),
        })
    }

    /// Hands a usage mark to the recorder, once per token per granularity however many requests
    /// race for it. The address recorded is the client's as read from trusted information, or
    /// none.
    #[cold]
    fn mark(
        &self,
        usage: &UsageRecorder,
        principal: &Principal,
        last: i64,
        now: i64,
        ip: impl FnOnce() -> Option<IpAddr>,
    ) {
        if principal
            .0
            .mark()
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let at = DateTime::from_timestamp_millis(now).unwrap_or_else(Utc::now);
        usage.record(principal.token_id(), at, ip());
    }

    /// The principal of a cache or store outcome, with expiry checked against the clock.
    #[inline]
    fn principal(&self, outcome: Outcome, now: i64) -> Result<Principal, Refusal> {
        Err(match outcome {
            Outcome::Found(p) if now < p.0.expires_ms => return Ok(p),
            Outcome::Found(p) => return Err(self.expired(p)),
            Outcome::Rejected(Negative::Unknown) => AuthError::InvalidToken,
            Outcome::Rejected(Negative::Revoked) => AuthError::Revoked,
            Outcome::Rejected(Negative::Disabled) => AuthError::Disabled,
            Outcome::Rejected(Negative::Expired) => AuthError::Expired,
            Outcome::Unavailable => AuthError::Unavailable {
                retry_after_secs: self.unavailable_retry_after,
            },
        }
        .into())
    }
}

impl Verifier {
    /// The refusal of a principal that has expired, whose entry is dropped from the cache.
    ///
    /// An entry found by a rotated-out secret in its grace period expires with the grace period
    /// (or the token, if earlier). Past the grace period the store no longer knows that secret:
    /// answered from the cache, it would be "expired", telling whoever holds it that it was real,
    /// and its [reuse](crate::reuse) would go unreported. So such an entry is looked up again as
    /// a miss ([`Refusal::look_up`]): the store's answer is the one an uncached secret gets
    /// (unknown and reported past the grace period, expired for a token expired within it).
    #[cold]
    fn expired(&self, p: Principal) -> Refusal {
        self.cache.expire(&p);
        if p.0.superseded {
            return Refusal {
                error: AuthError::InvalidToken,
                principal: None,
                look_up: Some(p.0.slot),
            };
        }
        Refusal {
            error: AuthError::Expired,
            principal: Some(p),
            look_up: None,
        }
    }

    /// The request of a cached entry that [`expired`](Self::expired) sent back to the store:
    /// the token read again, then the miss path (format, digest, negative cache, store). A miss
    /// never answers with a cached principal, so this happens once per request.
    #[cold]
    #[inline(never)]
    fn admit_looked_up<B>(&self, req: &mut Request<B>, slot: Slot, now: i64) -> Admission {
        let probe = match self.sources.extract(req.headers(), req.uri()) {
            Ok(Some(token)) => self.probe_miss(token, slot),
            // The request carried the token that found the entry.
            Ok(None) => Err(AuthError::InvalidToken),
            Err(e) => Err(e),
        };
        self.admit_probed(probe, req, now)
    }
}

/// Runs the application's hook on a refusal, then puts back what stays the layer's: the status,
/// `WWW-Authenticate`, `Retry-After`, `Cache-Control: no-store`, `grpc-status` and `grpc-message`
/// (absent on HTTP refusals), and for gRPC the content type and the empty (trailers-only) body.
#[cold]
fn shape(
    hook: &RejectHook,
    err: &AuthError,
    mut res: Response<Bytes>,
    grpc: bool,
) -> Response<Bytes> {
    const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
    const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
    let status = res.status();
    // `grpc-status` and `grpc-message` are kept (or kept absent) for HTTP refusals too: a gRPC
    // status on an HTTP refusal could read as success to a gRPC-Web proxy.
    let mut kept = vec![
        header::WWW_AUTHENTICATE,
        header::RETRY_AFTER,
        header::CACHE_CONTROL,
        GRPC_STATUS,
        GRPC_MESSAGE,
    ];
    if grpc {
        kept.push(header::CONTENT_TYPE);
    }
    let kept: Vec<_> = kept
        .into_iter()
        .map(|name| {
            let value = res.headers().get(&name).cloned();
            (name, value)
        })
        .collect();
    hook(err, &mut res);
    *res.status_mut() = status;
    let headers = res.headers_mut();
    for (name, value) in kept {
        match value {
            Some(value) => {
                headers.insert(name, value);
            }
            None => {
                headers.remove(name);
            }
        }
    }
    if grpc {
        headers.remove(header::CONTENT_LENGTH);
        *res.body_mut() = Bytes::new();
    }
    res
}

/// The `key=value` pairs of a query as the applications behind may split it: at `&`, and at `;`
/// (which some frameworks also take as a separator). A pair without `=` is a key with an empty
/// value.
pub(crate) fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split(['&', ';'])
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
}

/// A query key as an application behind may name it: form-decoded ([`percent_decode`]), then
/// renamed as PHP renames `$_GET` keys, which Symfony and Laravel read: cut at a NUL, leading
/// spaces dropped, then `.`, ` ` and `[` turned into `_` (`access.token`, `access+token` and
/// `%61ccess_token` are `access_token`; `.method` and `_method%00x` are `_method`).
pub(crate) fn query_key(key: &str) -> Vec<u8> {
    let mut key = percent_decode(key.as_bytes());
    key.truncate(key.iter().position(|&b| b == 0).unwrap_or(key.len()));
    let start = key.iter().position(|&b| b != b' ').unwrap_or(key.len());
    key.drain(..start);
    for b in &mut key {
        if matches!(*b, b'.' | b' ' | b'[') {
            *b = b'_';
        }
    }
    key
}

/// Whether the query key `key` (as sent) names the `access_token` parameter to an application
/// behind, in any letter case ([`query_key`]).
pub(crate) fn is_access_token_key(key: &str) -> bool {
    const NAME: &[u8] = b"access_token";
    // Decoding and renaming never lengthen a key: shorter ones are not it.
    key.len() >= NAME.len() && query_key(key).eq_ignore_ascii_case(NAME)
}

/// `application/x-www-form-urlencoded` decoding of one key or value: `%XX` and `+` (a space).
/// Malformed escapes are kept as they are.
pub(crate) fn percent_decode(s: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < s.len() => match (hex(s[i + 1]), hex(s[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    out
}
