//! The verification steps, in request order: the failure limit, the offline format check and the
//! cache probe ([`Verifier::probe`]), then, with what the cache or the store said, expiry, the
//! token's IP restriction, scopes and the usage mark ([`Verifier::authorize`]). The request path
//! ([`PatAuth`](crate::PatAuth)) and [`PatAuthLayer::verify`](crate::PatAuthLayer::verify) both
//! run these, and every refusal of either goes through [`Verifier::refuse`].

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::{Request, Response};

use super::error::{Anonymous, AuthError, Challenge};
use super::extract::Sources;
use super::is_grpc;
use super::limit::FailureLimit;
use crate::cache::{Cache, Negative, Outcome, now_ms};
use crate::client_ip::{ClientAddr, ClientIpSource};
use crate::principal::Principal;
use crate::record::ip_allowed;
use crate::scope::ScopeSet;
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
            .finish_non_exhaustive()
    }
}

/// The hashes a store lookup searches for a token the cache does not know: under the current
/// pepper, then under the previous ones.
pub(super) struct LookupKeys {
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
            return Admission::Refused(self.refuse(&e, req));
        }
        let token = match self.sources.extract(req.headers(), req.uri()) {
            Ok(Some(token)) => token,
            Ok(None) if self.anonymous => {
                req.extensions_mut()
                    .insert(Anonymous(self.challenge.clone()));
                return Admission::Admitted;
            }
            Ok(None) => return Admission::Refused(self.refuse(&AuthError::MissingCredentials, req)),
            Err(e) => return Admission::Refused(self.refuse(&e, req)),
        };
        // One clock read serves the probe and the expiry check.
        let now = now_ms();
        match self.probe(token, now) {
            Ok(Probe::Cached(outcome)) => match self.admit(outcome, req, now) {
                Ok(()) => Admission::Admitted,
                Err(e) => Admission::Refused(self.refuse(&e, req)),
            },
            Ok(Probe::Uncached(keys)) => Admission::Uncached(keys),
            Err(e) => Admission::Refused(self.refuse(&e, req)),
        }
    }

    /// The offline format check, the hash and the cache probe of a token.
    #[inline]
    pub(super) fn probe(&self, token: &str, now: i64) -> Result<Probe, AuthError> {
        if self.format.check(token).is_err() {
            return Err(AuthError::InvalidToken);
        }
        let hasher = self.cache.hasher();
        let hash = hasher.hash(token);
        Ok(match self.cache.probe(&hash, now) {
            Some(outcome) => Probe::Cached(outcome),
            // Without previous peppers this is an empty `Vec`: no allocation.
            None => Probe::Uncached(LookupKeys {
                hash,
                previous: hasher.previous_hashes(token),
            }),
        })
    }

    /// The one refusal path of requests: counts a failed credential against the client's failure
    /// limit and answers with the error response, HTTP or gRPC as the request speaks.
    #[cold]
    pub(super) fn refuse<B>(&self, err: &AuthError, req: &Request<B>) -> Response<Bytes> {
        if self.limiter.is_some() {
            self.count_failure(err, self.client_addr(req).limit_key());
        }
        self.challenge.error_response(err, is_grpc(req))
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

    /// Counts a failed credential against `key`'s network.
    #[cold]
    pub(super) fn count_failure(&self, err: &AuthError, key: Option<IpAddr>) {
        if let Some(limiter) = &self.limiter
            && matches!(
                err,
                AuthError::InvalidToken | AuthError::Revoked | AuthError::Expired
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
    ) -> Result<(), AuthError> {
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
    ) -> Result<Principal, AuthError> {
        let principal = self.principal(outcome, now)?;
        let restriction = principal.ip_restriction();
        let mut ip = None;
        if !restriction.is_empty() {
            ip = client();
            if !ip_allowed(restriction, ip) {
                return Err(AuthError::IpNotAllowed);
            }
        }
        let scopes = principal.scopes();
        if (!self.required.is_empty() && !scopes.grants_all(&self.required))
            || extra.is_some_and(|extra| !scopes.grants_all(extra))
        {
            return Err(self.insufficient_scope(extra));
        }
        if let Some(usage) = &self.usage {
            // One relaxed load while the token was marked within the granularity.
            let last = principal.0.last_mark_ms.load(Ordering::Relaxed);
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
            .last_mark_ms
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
    fn principal(&self, outcome: Outcome, now: i64) -> Result<Principal, AuthError> {
        match outcome {
            Outcome::Found(p) if now < p.0.expires_ms => Ok(p),
            Outcome::Found(p) => {
                self.cache.expire(&p);
                Err(AuthError::Expired)
            }
            Outcome::Rejected(Negative::Unknown) => Err(AuthError::InvalidToken),
            Outcome::Rejected(Negative::Revoked) => Err(AuthError::Revoked),
            Outcome::Rejected(Negative::Expired) => Err(AuthError::Expired),
            Outcome::Unavailable => Err(AuthError::Unavailable {
                retry_after_secs: self.unavailable_retry_after,
            }),
        }
    }
}
