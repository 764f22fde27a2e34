use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::{HeaderMap, HeaderName, Request, Response, Uri, header};
use ipnet::IpNet;
use tower::{Layer, Service};

use super::error::{Anonymous, AuthError, Challenge};
use super::future::ResponseFuture;
use super::limit::FailureLimit;
use super::{ResponseBody, is_grpc};
use crate::cache::{Cache, CacheConfig, Negative, Outcome, now_ms};
use crate::client_ip::{ClientAddr, ClientIpSource, ForwardedHeader};
use crate::principal::Principal;
use crate::record::ip_allowed;
use crate::scope::ScopeSet;
use crate::store::TokenLookup;
use crate::token::{TokenFormat, TokenHash, TokenHasher};
use crate::usage::{UsageConfig, UsageRecorder};

/// The Tower layer that authenticates every request with a personal access token.
///
/// Build it once with [`PatAuthLayer::builder`] and apply it with `.layer(…)`; clones share the
/// cache. For each request it extracts the token, checks its format offline, hashes it, finds it in
/// the cache (or, once per token, in the store) and enforces revocation, expiry, IP restriction and
/// scopes, then puts the [`Principal`] in the request extensions. A refused request never reaches
/// the inner service; it gets one of the answers of [`AuthError`].
///
/// Any [`Service`] that takes an [`http::Request`] and returns an [`http::Response`] can sit
/// behind it, here a `tower::service_fn`:
///
/// ```
/// use std::convert::Infallible;
///
/// use bytes::Bytes;
/// use http::{Request, Response, StatusCode, header};
/// use http_body_util::{BodyExt, Full};
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
/// use tower_pat::{MemoryStore, NewToken, Principal, Tokens};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let tokens = Tokens::new(MemoryStore::new());
/// let layer = tokens
///     .layer()
///     .realm("example")
///     .require_scopes(["api:read"])
///     .build();
/// let (_record, secret) = tokens
///     .issue(NewToken::new("alice", "ci").scopes(["api:read"])?)
///     .await?;
///
/// // The inner service finds the caller in the request extensions.
/// let service = ServiceBuilder::new()
///     .layer(layer)
///     .service(service_fn(|req: Request<Full<Bytes>>| async move {
///         let principal = req.extensions().get::<Principal>().expect("set by the layer");
///         let body = Full::new(Bytes::from(principal.subject().to_owned()));
///         Ok::<_, Infallible>(Response::new(body))
///     }));
///
/// // A request with the token: 200, and the service saw alice.
/// let request = Request::get("/")
///     .header(header::AUTHORIZATION, format!("Bearer {}", secret.expose_secret()))
///     .body(Full::default())?;
/// let response = service.clone().oneshot(request).await?;
/// assert_eq!(response.status(), StatusCode::OK);
/// assert_eq!(response.into_body().collect().await?.to_bytes(), "alice");
///
/// // A request without: 401 with the RFC 6750 challenge; the service is not called.
/// let response = service.oneshot(Request::get("/").body(Full::default())?).await?;
/// assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
/// assert_eq!(response.headers()[header::WWW_AUTHENTICATE], r#"Bearer realm="example""#);
/// assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct PatAuthLayer {
    shared: Arc<Shared>,
}

/// Configures a [`PatAuthLayer`].
#[derive(Debug)]
#[must_use]
pub struct PatAuthLayerBuilder {
    lookup: Arc<dyn TokenLookup>,
    format: TokenFormat,
    hasher: TokenHasher,
    cache: CacheConfig,
    sources: Sources,
    realm: String,
    client_ip: ClientIpSource,
    required: ScopeSet,
    anonymous: bool,
    unavailable_retry_after: u64,
    usage: Option<UsageConfig>,
    limit_failures: Option<(u32, Duration)>,
    limit_prefixes: (u8, u8),
}

#[derive(Clone, Debug, Default)]
struct Sources {
    token_scheme: bool,
    raw_authorization: bool,
    headers: Vec<HeaderName>,
    query: bool,
}

impl std::fmt::Debug for dyn TokenLookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dyn TokenLookup")
    }
}

impl PatAuthLayer {
    /// Starts a layer over a store (anything implementing [`TokenLookup`], an `Arc` of one
    /// included).
    pub fn builder<L: TokenLookup>(lookup: L) -> PatAuthLayerBuilder {
        PatAuthLayerBuilder {
            lookup: Arc::new(lookup),
            format: TokenFormat::default(),
            hasher: TokenHasher::default(),
            cache: CacheConfig::default(),
            sources: Sources::default(),
            realm: "api".to_owned(),
            client_ip: ClientIpSource::new(),
            required: ScopeSet::empty(),
            anonymous: false,
            unavailable_retry_after: 5,
            usage: None,
            limit_failures: None,
            limit_prefixes: FailureLimit::DEFAULT_PREFIXES,
        }
    }

    /// The usage recorder, when the layer tracks usage
    /// ([`PatAuthLayerBuilder::track_usage`]): its stats, and `shutdown().await` before exit.
    pub fn usage(&self) -> Option<&UsageRecorder> {
        self.shared.usage.as_ref()
    }

    /// Drops whatever the cache holds for this token, as a store event would. Stores with a change
    /// feed do this by themselves; call it after changing a record behind the store's back.
    pub fn invalidate(&self, token_id: &str, hash: &TokenHash) {
        self.shared.cache.invalidate(token_id, hash);
    }

    /// Drops every cached entry.
    pub fn clear_cache(&self) {
        self.shared.cache.clear();
    }

    /// Number of tokens in the positive cache.
    pub fn cached_tokens(&self) -> usize {
        self.shared.cache.len()
    }

    /// How many store lookups this layer has made: a metric, and a way for tests to see the cache
    /// at work.
    pub fn store_lookups(&self) -> u64 {
        self.shared.cache.store_lookups()
    }

    /// How many store lookups are in flight, running or waiting for a slot (concurrent requests
    /// for one token share one). A metric; it returns to zero when no request waits for the store,
    /// whether the requests finished or were dropped (a lookup nobody waits for any more is
    /// cancelled).
    pub fn lookups_in_flight(&self) -> usize {
        self.shared.cache.lookups_in_flight()
    }

    /// Test hook: `hook` runs on every load or refresh just before the cache stores what the store
    /// answered (after the store query), so a test can fire an invalidation at that exact moment.
    /// Set once; returns `false` if a hook was already set. Not part of the stable API.
    #[doc(hidden)]
    pub fn set_cache_insert_hook(&self, hook: impl Fn() + Send + Sync + 'static) -> bool {
        self.shared.cache.set_insert_hook(Box::new(hook))
    }

    /// How old the oldest state this layer may act on can be: how long a change made elsewhere
    /// (a revocation through another node) may have gone unseen here.
    ///
    /// - Zero while the store's change feed is connected and its queries succeed.
    /// - While the feed is down, the time since it was declared down; a silent feed is declared
    ///   down by the store's heartbeat (for `PostgresStore` at most 4 s after it went silent by
    ///   default, see `PostgresStoreBuilder::heartbeat`). Meanwhile no entry serves past
    ///   the TTL, so a revocation made elsewhere is honoured here within that delay plus the TTL.
    /// - While store queries (loads, background refreshes) keep failing, the time since the first
    ///   of them was sent, even with the feed connected: cached entries then serve on for
    ///   `stale_if_error`. It returns to zero when the store answers a later query, or when the
    ///   cache is emptied (the feed reconnecting empties it).
    /// - The longer of the two, at most the TTL plus `stale_if_error`.
    /// - For a store without a change feed, the TTL plus `stale_if_error`.
    ///
    /// A health check can compare it with what the deployment tolerates, and take a node that
    /// falls behind out of rotation.
    pub fn max_staleness(&self) -> Duration {
        self.shared.cache.max_staleness()
    }

    /// The token format the layer accepts.
    pub fn format(&self) -> &TokenFormat {
        &self.shared.format
    }

    /// The hasher the layer uses; the management API must store hashes made by the same one.
    pub fn hasher(&self) -> &TokenHasher {
        self.shared.cache.hasher()
    }

    /// The realm of the layer's `WWW-Authenticate` challenges (for a
    /// [`RequireScopesLayer`](crate::RequireScopesLayer) behind it).
    pub fn realm(&self) -> &str {
        self.shared.challenge.realm()
    }

    /// The cache settings.
    pub fn cache_config(&self) -> &CacheConfig {
        self.shared.cache.config()
    }

    /// Where the layer reads the client address from ([`PatAuthLayerBuilder::trusted_proxies`]):
    /// a gateway that verifies tokens with [`verify`](Self::verify) reads addresses the same way.
    pub fn client_ip_source(&self) -> &ClientIpSource {
        &self.shared.client_ip
    }

    /// Verifies a bare token with every rule the layer applies to a request, for callers that are
    /// not HTTP requests through the layer (another transport, a gateway, a job): the offline
    /// format check, the cache and store lookup, revocation, expiry, the token's IP restriction
    /// against `client`, the layer's own required scopes plus `required`, the failure limit (when
    /// [`limit_failures`](PatAuthLayerBuilder::limit_failures) is on, counted against `client`)
    /// and usage tracking. It is the request path's own code.
    ///
    /// `client` is the caller's address as far as it is known from trusted information; `None`
    /// when it is not known, and a token with an IP restriction is then refused
    /// ([`AuthError::IpNotAllowed`]): it fails closed.
    ///
    /// ```
    /// # async fn run(layer: tower_pat::PatAuthLayer, token: &str) {
    /// use tower_pat::ScopeSet;
    ///
    /// let required = ScopeSet::parse(["deploy:write"]).unwrap();
    /// match layer.verify(token, Some("192.0.2.7".parse().unwrap()), &required).await {
    ///     Ok(principal) => println!("deploying for {}", principal.subject()),
    ///     Err(e) => println!("refused: {e} ({})", e.status()),
    /// }
    /// # }
    /// ```
    pub async fn verify(
        &self,
        token: &str,
        client: Option<IpAddr>,
        required: &ScopeSet,
    ) -> Result<Principal, AuthError> {
        let shared = &self.shared;
        let result = async {
            shared.check_limit(client)?;
            let now = now_ms();
            let outcome = match shared.find(token, now)? {
                Found::Cached(outcome) => outcome,
                Found::Miss(hash, previous) => {
                    Arc::clone(&shared.cache).load(hash, previous, client).await
                }
            };
            shared.authorize(outcome, now_ms(), Some(required), || client)
        }
        .await;
        if let Err(e) = &result {
            shared.count_failure(e, client);
        }
        result
    }
}

impl PatAuthLayerBuilder {
    /// The token format (default: prefix `pat_`).
    pub fn format(mut self, format: TokenFormat) -> Self {
        self.format = format;
        self
    }

    /// How tokens are hashed (default: plain SHA-256).
    pub fn hasher(mut self, hasher: TokenHasher) -> Self {
        self.hasher = hasher;
        self
    }

    /// The realm of the `WWW-Authenticate` challenge (default `api`).
    pub fn realm(mut self, realm: impl Into<String>) -> Self {
        self.realm = realm.into();
        self
    }

    /// The verification cache settings.
    pub fn cache(mut self, config: CacheConfig) -> Self {
        self.cache = config;
        self
    }

    /// Also accepts `Authorization: Token <token>` (GitHub's and GitLab's older scheme).
    pub fn accept_token_scheme(mut self) -> Self {
        self.sources.token_scheme = true;
        self
    }

    /// Also accepts a bare token as the whole `Authorization` value, without a scheme.
    pub fn accept_raw_authorization(mut self) -> Self {
        self.sources.raw_authorization = true;
        self
    }

    /// Also accepts the token in this header, such as `X-API-Key` or `PRIVATE-TOKEN`.
    pub fn accept_header(mut self, name: HeaderName) -> Self {
        self.sources.headers.push(name);
        self
    }

    /// Also accepts the `access_token` query parameter. Off by default: RFC 6750 §2.3 discourages
    /// it, since URLs end up in logs and browser history.
    pub fn accept_query_parameter(mut self) -> Self {
        self.sources.query = true;
        self
    }

    /// Takes the client address from `header` when the connection's peer is in one of `proxies`
    /// (default: no proxy is trusted, the client is always the peer). Only `header` is ever read:
    /// a request that also carries another forwarding header, which a client can send itself, is
    /// judged by the configured one alone. See [`crate::client_ip`] for how each is read, and for
    /// what happens when a trusted hop's entry cannot be read.
    ///
    /// ```
    /// use tower_pat::{ForwardedHeader, MemoryStore, PatAuthLayer};
    ///
    /// // nginx in 10.0.0.0/8 with `proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;`
    /// let layer = PatAuthLayer::builder(MemoryStore::new())
    ///     .trusted_proxies(["10.0.0.0/8".parse().unwrap()], ForwardedHeader::XForwardedFor)
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn trusted_proxies(
        mut self,
        proxies: impl IntoIterator<Item = IpNet>,
        header: ForwardedHeader,
    ) -> Self {
        self.client_ip = ClientIpSource::new().trust_proxies(proxies, header);
        self
    }

    /// Scopes every request behind the layer needs. They apply to anonymous requests too: with
    /// [`allow_anonymous`](Self::allow_anonymous), a request without credentials then gets 401.
    ///
    /// # Panics
    ///
    /// If a scope string is invalid (see [`Scope::new`](crate::Scope::new)): layers are built from
    /// static configuration, where this is a programming error.
    pub fn require_scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.required = ScopeSet::parse(scopes).unwrap_or_else(|e| panic!("invalid scope: {e}"));
        self
    }

    /// Lets requests without any credentials through without a principal (handlers see
    /// `Option<Principal>` as `None`); a request with bad credentials is still refused.
    ///
    /// Not together with [`require_scopes`](Self::require_scopes): scopes the layer requires
    /// apply to every request, and an anonymous one has none, so it gets the 401 challenge (a
    /// request without a token must never do better than a token lacking the scope, which gets
    /// 403). For routes open to anonymous requests next to routes that need scopes, require the
    /// scopes per route with [`RequireScopesLayer`](crate::RequireScopesLayer), which answers
    /// anonymous requests with the same 401.
    pub fn allow_anonymous(mut self) -> Self {
        self.anonymous = true;
        self
    }

    /// The `Retry-After` of a 503 when the store is unreachable (default 5 s).
    pub fn unavailable_retry_after(mut self, secs: u64) -> Self {
        self.unavailable_retry_after = secs;
        self
    }

    /// Refuses a client network with 429 and `Retry-After` once it has presented `max_failures`
    /// unknown, malformed, revoked or expired tokens within `window`, until the window ends. Off
    /// by default.
    ///
    /// Failures are counted per IPv4 address and per IPv6 /64 (see
    /// [`failure_limit_prefixes`](Self::failure_limit_prefixes)); an IPv4-mapped IPv6 peer counts
    /// as its IPv4 address. The address is the client's (see
    /// [`trusted_proxies`](Self::trusted_proxies)); when a trusted proxy forwarded an entry that
    /// cannot be read, the request counts against the nearest hop that did parse (the last
    /// trusted proxy, ultimately the peer), never against nobody. Only a request without any peer
    /// address (a server that does not record it) is not counted. At most 100 000 networks are
    /// tracked at once.
    pub fn limit_failures(mut self, max_failures: u32, window: Duration) -> Self {
        self.limit_failures = Some((max_failures, window));
        self
    }

    /// The networks [`limit_failures`](Self::limit_failures) counts per: IPv4 addresses per
    /// `/v4_prefix` and IPv6 addresses per `/v6_prefix` (default 32 and 64: a single host usually
    /// holds a whole IPv6 /64). Lengths beyond the address (above 32 or 128) count as the full
    /// address.
    pub fn failure_limit_prefixes(mut self, v4_prefix: u8, v6_prefix: u8) -> Self {
        self.limit_prefixes = (v4_prefix, v6_prefix);
        self
    }

    /// Records when and from where each token was last used, written behind in batches through
    /// [`TokenLookup::record_usage`] (see [`crate::usage`]). The layer must then be built inside a
    /// Tokio runtime, which runs the flusher.
    pub fn track_usage(mut self, config: UsageConfig) -> Self {
        self.usage = Some(config);
        self
    }

    /// Builds the layer and subscribes its cache to the store's change feed.
    ///
    /// # Panics
    ///
    /// With [`track_usage`](Self::track_usage), outside a Tokio runtime.
    pub fn build(self) -> PatAuthLayer {
        let usage = self
            .usage
            .map(|config| UsageRecorder::from_arc(Arc::clone(&self.lookup), config));
        let cache = Cache::new(self.lookup, self.hasher, self.cache);
        if self.anonymous && !self.required.is_empty() {
            tracing::warn!(
                "allow_anonymous has no effect with require_scopes: anonymous requests get 401"
            );
        }
        let limiter = self
            .limit_failures
            .map(|(max, window)| FailureLimit::new(max, window, self.limit_prefixes));
        PatAuthLayer {
            shared: Arc::new(Shared {
                format: self.format,
                cache,
                sources: self.sources,
                challenge: Challenge::new(&self.realm),
                client_ip: self.client_ip,
                anonymous: self.anonymous && self.required.is_empty(),
                required: self.required,
                unavailable_retry_after: self.unavailable_retry_after,
                usage,
                limiter,
            }),
        }
    }
}

impl<S> Layer<S> for PatAuthLayer {
    type Service = PatAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PatAuth {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// The service [`PatAuthLayer`] wraps around an inner service.
#[derive(Clone, Debug)]
pub struct PatAuth<S> {
    inner: S,
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    format: TokenFormat,
    cache: Arc<Cache>,
    sources: Sources,
    challenge: Challenge,
    client_ip: ClientIpSource,
    required: ScopeSet,
    anonymous: bool,
    unavailable_retry_after: u64,
    usage: Option<UsageRecorder>,
    limiter: Option<FailureLimit>,
}

impl std::fmt::Debug for Shared {
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

/// What [`Shared::find`] learned about a well-formed token.
enum Found {
    Cached(Outcome),
    Miss(TokenHash, Vec<TokenHash>),
}

enum Check {
    Pass,
    Reject(Response<Bytes>),
    Miss(TokenHash, Vec<TokenHash>),
}

impl Shared {
    /// The synchronous part of the request path: everything up to and including the cache probe.
    #[inline]
    fn check<B>(&self, req: &mut Request<B>) -> Check {
        if self.limiter.is_some()
            && let Err(e) = self.check_limit(self.client_addr(req).limit_key())
        {
            return self.reject(&e, req);
        }
        let token = match self.extract(req.headers(), req.uri()) {
            Ok(Some(token)) => token,
            Ok(None) if self.anonymous => {
                req.extensions_mut()
                    .insert(Anonymous(self.challenge.clone()));
                return Check::Pass;
            }
            Ok(None) => return self.reject(&AuthError::MissingCredentials, req),
            Err(e) => return self.reject(&e, req),
        };
        // One clock read serves the probe and the expiry check.
        let now = now_ms();
        match self.find(token, now) {
            Ok(Found::Cached(outcome)) => match self.admit(outcome, req, now) {
                Ok(()) => Check::Pass,
                Err(e) => self.reject(&e, req),
            },
            Ok(Found::Miss(hash, previous)) => Check::Miss(hash, previous),
            Err(e) => self.reject(&e, req),
        }
    }

    /// The offline format check, the hash and the cache probe of a token: what the cache knows,
    /// or the hashes to look up (under the current pepper, then the previous ones).
    #[inline]
    fn find(&self, token: &str, now: i64) -> Result<Found, AuthError> {
        if self.format.check(token).is_err() {
            return Err(AuthError::InvalidToken);
        }
        let hasher = self.cache.hasher();
        let hash = hasher.hash(token);
        Ok(match self.cache.probe(&hash, now) {
            Some(outcome) => Found::Cached(outcome),
            // Without previous peppers this is an empty `Vec`: no allocation.
            None => Found::Miss(hash, hasher.previous_hashes(token)),
        })
    }

    #[cold]
    fn reject<B>(&self, err: &AuthError, req: &Request<B>) -> Check {
        Check::Reject(self.refuse(err, req))
    }

    /// The error response for `err`, HTTP or gRPC as the request speaks; a failed credential counts
    /// against the client's failure limit.
    #[cold]
    pub(crate) fn refuse<B>(&self, err: &AuthError, req: &Request<B>) -> Response<Bytes> {
        if self.limiter.is_some() {
            self.count_failure(err, self.client_addr(req).limit_key());
        }
        self.challenge.error_response(err, is_grpc(req))
    }

    /// The request's client address, and the address its failures count against.
    #[inline]
    pub(crate) fn client_addr<B>(&self, req: &Request<B>) -> ClientAddr {
        self.client_ip.client_addr(req.headers(), req.extensions())
    }

    /// `Err(TooManyAttempts)` while the failure limit refuses `key`'s network.
    #[inline]
    fn check_limit(&self, key: Option<IpAddr>) -> Result<(), AuthError> {
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
    fn count_failure(&self, err: &AuthError, key: Option<IpAddr>) {
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
    pub(crate) fn admit<B>(
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
    #[inline]
    fn authorize(
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

    /// The credential of a request from the configured sources; `Ok(None)` without any, an
    /// `invalid_request` error for two different ones or unreadable bytes.
    #[inline]
    fn extract<'a>(
        &self,
        headers: &'a HeaderMap,
        uri: &'a Uri,
    ) -> Result<Option<&'a str>, AuthError> {
        const TWO: AuthError =
            AuthError::InvalidRequest("the request carries more than one credential");
        const BYTES: AuthError =
            AuthError::InvalidRequest("a credential header has invalid characters");
        let mut found: Option<&'a str> = None;
        let mut add = |token: &'a str| match found {
            Some(f) if f != token => Err(TWO),
            _ => {
                found = Some(token);
                Ok(())
            }
        };
        for value in headers.get_all(header::AUTHORIZATION) {
            let value = value.to_str().map_err(|_| BYTES)?;
            if let Some(token) = strip_scheme(value, "bearer") {
                add(token)?;
            } else if self.sources.token_scheme
                && let Some(token) = strip_scheme(value, "token")
            {
                add(token)?;
            } else if self.sources.raw_authorization && !value.trim().contains(' ') {
                add(value.trim())?;
            }
        }
        for name in &self.sources.headers {
            for value in headers.get_all(name) {
                add(value.to_str().map_err(|_| BYTES)?.trim())?;
            }
        }
        if self.sources.query
            && let Some(query) = uri.query()
        {
            for value in query
                .split('&')
                .filter_map(|p| p.strip_prefix("access_token="))
            {
                add(value)?;
            }
        }
        Ok(found)
    }
}

/// The credential after an auth scheme, matched case-insensitively (RFC 7235 §2.1).
#[inline]
fn strip_scheme<'a>(value: &'a str, scheme: &str) -> Option<&'a str> {
    let n = scheme.len();
    let bytes = value.as_bytes();
    if bytes.len() > n && bytes[..n].eq_ignore_ascii_case(scheme.as_bytes()) && bytes[n] == b' ' {
        Some(value[n + 1..].trim())
    } else {
        None
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for PatAuth<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqB>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        match self.shared.check(&mut req) {
            // `self.inner` is the service `poll_ready` prepared: call it directly.
            Check::Pass => ResponseFuture::called(self.inner.call(req)),
            Check::Reject(res) => ResponseFuture::rejected(res),
            Check::Miss(hash, previous) => {
                // The ready service goes with the future; a clone stays for the next request.
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                // The client's address, for its lookup budget (a miss only).
                let client = self.shared.client_addr(&req).limit_key();
                let lookup = Box::pin(Arc::clone(&self.shared.cache).load(hash, previous, client));
                ResponseFuture::lookup(lookup, ready, req, Arc::clone(&self.shared))
            }
        }
    }
}
