//! [`PatAuthLayerBuilder`]: how a [`PatAuthLayer`] is configured.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use bytes::Bytes;
use http::Response;

use http::HeaderName;
use ipnet::IpNet;

use super::error::{AuthError, Challenge};
use super::extract::Sources;
use super::layer::PatAuthLayer;
use super::limit::FailureLimit;
use super::verify::{RejectHook, Verifier};
use crate::cache::{Cache, CacheConfig};
use crate::client_ip::{ClientIpSource, ForwardedHeader};
use crate::reuse::{ReuseDetection, ReuseHook, ReusePolicy, SecretReuse};
use crate::scope::{InvalidScope, ScopeSet};
use crate::store::{TokenLookup, TokenStore};
use crate::token::{TokenFormat, TokenHasher};
use crate::usage::{UsageConfig, UsageRecorder};

/// Configures a [`PatAuthLayer`].
#[must_use]
pub struct PatAuthLayerBuilder {
    pub(super) lookup: Arc<dyn TokenLookup>,
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
    pass_foreign: bool,
    on_reject: Option<RejectHook>,
    expiration_header: bool,
    reuse_policy: ReusePolicy,
    on_reuse: Option<ReuseHook>,
    /// The store to revoke through under [`ReusePolicy::RevokeFamily`] ([`Tokens::layer`]).
    ///
    /// [`Tokens::layer`]: crate::Tokens::layer
    pub(crate) reuse_store: Option<Arc<dyn TokenStore>>,
}

impl std::fmt::Debug for dyn TokenLookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dyn TokenLookup")
    }
}

impl std::fmt::Debug for PatAuthLayerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PatAuthLayerBuilder")
            .field("format", &self.format)
            .field("hasher", &self.hasher)
            .field("cache", &self.cache)
            .field("sources", &self.sources)
            .field("realm", &self.realm)
            .field("client_ip", &self.client_ip)
            .field("required", &self.required)
            .field("anonymous", &self.anonymous)
            .field("usage", &self.usage)
            .field("limit_failures", &self.limit_failures)
            .field("pass_foreign", &self.pass_foreign)
            .field("on_reject", &self.on_reject.is_some())
            .field("expiration_header", &self.expiration_header)
            .field("reuse_policy", &self.reuse_policy)
            .field("on_reuse", &self.on_reuse.is_some())
            .finish_non_exhaustive()
    }
}

impl PatAuthLayerBuilder {
    pub(super) fn new(lookup: Arc<dyn TokenLookup>) -> Self {
        Self {
            lookup,
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
            pass_foreign: false,
            on_reject: None,
            expiration_header: false,
            reuse_policy: ReusePolicy::Report,
            on_reuse: None,
            reuse_store: None,
        }
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
    ///
    /// A different token in two sources is refused (400), but an `Authorization` header of a
    /// scheme the layer does not read (`Basic`) next to a token in this header is not: a proxy's
    /// basic authentication in front of the API sends both. The request goes on as the token's
    /// principal with that header in it; remove it before a component that would read it as the
    /// caller's identity.
    pub fn accept_header(mut self, name: HeaderName) -> Self {
        self.sources.headers.push(name);
        self
    }

    /// Also accepts the `access_token` query parameter. Off by default: RFC 6750 §2.3 discourages
    /// it, since URLs end up in logs and browser history.
    ///
    /// Every key an application behind may read as `access_token` counts: another letter case,
    /// a percent-encoded key (`%61ccess_token`), the names PHP renames to it (`access.token`),
    /// after a `;` as well as an `&`. Two different tokens among them are two credentials (400).
    /// The value is read as sent: a percent-encoded token is refused.
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
    /// static configuration, where this is a programming error. For scopes read from
    /// configuration, use [`try_require_scopes`](Self::try_require_scopes).
    pub fn require_scopes<I, S>(self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.try_require_scopes(scopes)
            .unwrap_or_else(|e| panic!("invalid scope: {e}"))
    }

    /// [`require_scopes`](Self::require_scopes), or the first invalid scope string.
    ///
    /// ```
    /// use tower_pat::{MemoryStore, PatAuthLayer};
    ///
    /// let builder = PatAuthLayer::builder(MemoryStore::new());
    /// assert!(builder.try_require_scopes(["not a scope"]).is_err());
    /// ```
    pub fn try_require_scopes<I, S>(mut self, scopes: I) -> Result<Self, InvalidScope>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.required = ScopeSet::parse(scopes)?;
        Ok(self)
    }

    /// Lets requests without any credentials through without a principal (handlers see
    /// `Option<Principal>` as `None`); a request with bad credentials is still refused, also a
    /// credential that starts with the token prefix in a spelling or source the layer does not
    /// read (`Bearer<TAB>pat_…`, `Token pat_…` without
    /// [`accept_token_scheme`](Self::accept_token_scheme), `?access_token=pat_…` without
    /// [`accept_query_parameter`](Self::accept_query_parameter)). A credential the layer does not
    /// read and that is not one of its tokens (`Authorization: Basic …`) counts as none; see
    /// [`pass_foreign_credentials`](Self::pass_foreign_credentials) to mark such requests.
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
    /// address (a server that does not record it) is not counted.
    ///
    /// At most 100 000 networks are tracked at once, and none is forgotten before its window
    /// ends: a network refused stays refused until then, whatever other networks do. While that
    /// many are tracked, the failures of any other network count in one window they share (of
    /// `max_failures`, like a network's): a flood from more networks than the table holds gets,
    /// all together, `max_failures` more guesses per window, and meanwhile a network that has no
    /// window of its own may get 429 for a token that needs a store lookup (never for one the
    /// cache holds).
    ///
    /// A token sent to the store counts as a failure until the store has answered: requests
    /// sent at once get no more store lookups than `max_failures` leaves, and those beyond it
    /// wait for the lookups in progress (at most [`CacheConfig::lookup_wait`], then 429 with
    /// `Retry-After: 1`). So a burst of guesses gets 429, while a network with room left has its
    /// valid tokens looked up, as many at once as that room (a network one failure from the
    /// limit: one at a time). A window that ends while requests wait gives them the next one's
    /// room: at a window's end a burst gets at most twice `max_failures`.
    ///
    /// [`CacheConfig::lookup_wait`]: crate::CacheConfig::lookup_wait
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

    /// Lets a request whose credential is not one of this layer's tokens through, without a
    /// [`Principal`](crate::Principal) and with a [`ForeignCredential`](crate::ForeignCredential)
    /// marker in its extensions, so that an authentication layer behind it (JWT, sessions) can
    /// decide. Off by default: such a credential gets 401 (`invalid_token` for a bearer value,
    /// the bare challenge for another scheme).
    ///
    /// Foreign means: the credential read from the configured sources does not start with the
    /// token prefix ([`TokenFormat::prefix`]), or the request carries no credential the layer reads
    /// but one `Authorization` header of another scheme (`Basic`, …). A request with more than one
    /// `Authorization` header is refused (400 `invalid_request`, two credentials) unless each holds
    /// the same token, also with this option. A credential with the prefix that fails any check
    /// (malformed, unknown, revoked, expired, wrong address, missing scope) is still refused —
    /// also in any other spelling (`Bearer<TAB>`, a scheme the layer does not read, a
    /// percent-encoded query value): a request where a credential *starts* with the prefix is
    /// never foreign — and counts against [`limit_failures`](Self::limit_failures) as
    /// before; a foreign one does not. A network the failure limit refuses is refused whatever
    /// it sends. A request without any credential is treated as before (see
    /// [`allow_anonymous`](Self::allow_anonymous)).
    ///
    /// Not together with [`require_scopes`](Self::require_scopes), for the same reason as
    /// `allow_anonymous`: a foreign credential has no scopes the layer knows, so it is then refused.
    /// Require scopes per route instead, once the layer behind has decided.
    pub fn pass_foreign_credentials(mut self) -> Self {
        self.pass_foreign = true;
        self
    }

    /// Lets the application shape refusal responses: `hook` gets the error and the response the
    /// layer built (JSON body `{"code","message","status"}`), and may replace its body or add
    /// headers. What the protocol needs stays the layer's and is put back after the hook runs: the
    /// status, `WWW-Authenticate`, `Retry-After`, `Cache-Control: no-store`, `grpc-status` and
    /// `grpc-message` (none on an HTTP refusal); for a gRPC request also its content type and the
    /// empty body. It shapes the
    /// refusals of this layer only (not those of a [`RequireScopesLayer`](crate::RequireScopesLayer)
    /// or of the `Principal` extractor).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use tower_pat::{MemoryStore, PatAuthLayer};
    ///
    /// let layer = PatAuthLayer::builder(MemoryStore::new())
    ///     .on_reject(|err, res| {
    ///         *res.body_mut() = Bytes::from(format!("<h1>{}</h1>", err.message()));
    ///         res.headers_mut()
    ///             .insert(http::header::CONTENT_TYPE, "text/html".parse().unwrap());
    ///     })
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn on_reject(
        mut self,
        hook: impl Fn(&AuthError, &mut Response<Bytes>) + Send + Sync + 'static,
    ) -> Self {
        self.on_reject = Some(Arc::new(hook));
        self
    }

    /// Adds `X-Token-Expiration` to every response to a request authenticated with a token that
    /// expires, as GitHub sends `GitHub-Authentication-Token-Expiration`, so that clients see a
    /// token is about to expire. The value is the time the token stops working, in RFC 3339, UTC,
    /// to the second: `X-Token-Expiration: 2025-01-01T00:00:00Z` (for a secret superseded by a
    /// rotation, the earlier of the token's expiry and the end of the grace period). Tokens that
    /// never expire get no header, nor do refusals (this layer's, and 401/403 answers from behind
    /// it such as a route's `RequireScopesLayer`) and anonymous requests. Off by default; off, it
    /// costs nothing.
    pub fn token_expiration_header(mut self) -> Self {
        self.expiration_header = true;
        self
    }

    /// Calls `hook` when a secret that a rotation replaced is presented after its grace period:
    /// see [reuse detection](crate::reuse). The request is refused as any unknown token is; the
    /// hook gets the token, the client address, when the secret was superseded and whether the
    /// token was revoked ([`reuse_policy`](Self::reuse_policy)). It runs on the lookup's task:
    /// return at once (hand the report to a queue), never block.
    ///
    /// Off by default. With no hook and [`ReusePolicy::Report`], the layer never reads the
    /// store's history; on, it costs a miss of an unknown token one more store query, and a cache
    /// hit nothing.
    ///
    /// ```
    /// use tower_pat::reuse::ReusePolicy;
    /// use tower_pat::{MemoryStore, Tokens};
    ///
    /// let tokens = Tokens::new(MemoryStore::new());
    /// let layer = tokens
    ///     .layer()
    ///     .reuse_policy(ReusePolicy::RevokeFamily)
    ///     .on_reuse(|reuse| eprintln!("token {} reused from {:?}", reuse.record.id, reuse.client_address))
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn on_reuse(mut self, hook: impl Fn(&SecretReuse) + Send + Sync + 'static) -> Self {
        self.on_reuse = Some(Arc::new(hook));
        self
    }

    /// Sends a `personalAccessToken.reused` [`TokenEvent`](crate::admin::TokenEvent) to `sink`
    /// (for example the management API's [`WebhookSink`](crate::admin::WebhookSink)) when a
    /// rotated-out secret is presented: [`on_reuse`](Self::on_reuse) with the event as hook.
    #[cfg(feature = "admin")]
    pub fn reuse_events(self, sink: impl crate::admin::TokenEvents) -> Self {
        self.on_reuse(move |reuse| sink.publish(crate::admin::TokenEvent::reused(reuse)))
    }

    /// What the layer does about a rotated-out secret presented after its grace period (default
    /// [`ReusePolicy::Report`]). [`ReusePolicy::RevokeFamily`] revokes the token it was rotated
    /// into, through the store: only on a layer built with [`Tokens::layer`](crate::Tokens::layer)
    /// (elsewhere a warning says it only reports). See [reuse detection](crate::reuse).
    pub fn reuse_policy(mut self, policy: ReusePolicy) -> Self {
        self.reuse_policy = policy;
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
        let reuse = ReuseDetection::new(self.reuse_policy, self.on_reuse, self.reuse_store);
        let cache = Cache::new(self.lookup, self.hasher, self.cache, reuse);
        if self.anonymous && !self.required.is_empty() {
            tracing::warn!(
                target: "tower_pat::auth",
                "allow_anonymous has no effect with require_scopes: anonymous requests get 401"
            );
        }
        if self.pass_foreign && !self.required.is_empty() {
            tracing::warn!(
                target: "tower_pat::auth",
                "pass_foreign_credentials has no effect with require_scopes: foreign credentials get 401"
            );
        }
        let limiter = self
            .limit_failures
            .map(|(max, window)| FailureLimit::new(max, window, self.limit_prefixes));
        PatAuthLayer {
            verifier: Arc::new(Verifier {
                format: self.format,
                cache,
                sources: self.sources,
                challenge: Challenge::new(&self.realm),
                client_ip: self.client_ip,
                anonymous: self.anonymous && self.required.is_empty(),
                pass_foreign: self.pass_foreign && self.required.is_empty(),
                on_reject: self.on_reject,
                expiration_header: self.expiration_header,
                required: self.required,
                unavailable_retry_after: self.unavailable_retry_after,
                usage,
                limiter,
                unkeyed_warned: AtomicBool::new(false),
            }),
        }
    }
}
