//! [`PatAuthLayer`]: the layer's handle, its accessors and [`PatAuthLayer::verify`].

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::builder::PatAuthLayerBuilder;
use super::error::AuthError;
use super::verify::{Probe, Refusal, Verifier};
use crate::cache::{CacheConfig, Outcome, now_ms};
use crate::client_ip::ClientIpSource;
use crate::principal::Principal;
use crate::scope::ScopeSet;
use crate::stats::{AuthStats, Counter};
use crate::store::TokenLookup;
use crate::token::{TokenFormat, TokenHash, TokenHasher};
use crate::usage::UsageRecorder;

/// The Tower layer that authenticates every request with a personal access token.
///
/// Build it once with [`PatAuthLayer::builder`] and apply it with `.layer(…)`; clones share the
/// cache. For each request it extracts the token, checks its format offline, hashes it, finds it in
/// the cache (or, once per token, in the store) and enforces revocation, expiry, IP restriction and
/// scopes, then puts the [`Principal`] in the request extensions. A refused request never reaches
/// the inner service; it gets one of the answers of [`AuthError`].
///
/// Any [`Service`](tower::Service) that takes an [`http::Request`] and returns an [`http::Response`] can sit
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
    pub(super) verifier: Arc<Verifier>,
}

impl PatAuthLayer {
    /// Starts a layer over a store (anything implementing [`TokenLookup`], an `Arc` of one
    /// included).
    pub fn builder<L: TokenLookup>(lookup: L) -> PatAuthLayerBuilder {
        PatAuthLayerBuilder::new(Arc::new(lookup))
    }

    /// The usage recorder, when the layer tracks usage
    /// ([`PatAuthLayerBuilder::track_usage`]): its stats, and `shutdown().await` before exit.
    pub fn usage(&self) -> Option<&UsageRecorder> {
        self.verifier.usage.as_ref()
    }

    /// Drops whatever the cache holds for this token, as a store event would. Stores with a change
    /// feed do this by themselves; call it after changing a record behind the store's back.
    pub fn invalidate(&self, token_id: &str, hash: &TokenHash) {
        self.verifier.cache.invalidate(token_id, hash);
    }

    /// Drops every cached entry.
    pub fn clear_cache(&self) {
        self.verifier.cache.clear();
    }

    /// A snapshot of the layer's counters, for metrics: requests by outcome, cache hits and
    /// misses, store lookups and their latency, cache sizes, usage tracking and the change feed.
    /// Counting costs the request path one relaxed add into a per-thread shard (see
    /// [`stats`](crate::stats)).
    ///
    /// ```
    /// # async fn run() {
    /// use tower_pat::{MemoryStore, PatAuthLayer};
    ///
    /// let layer = PatAuthLayer::builder(MemoryStore::new()).build();
    /// let stats = layer.stats();
    /// assert_eq!(stats.outcomes.ok, 0);
    /// assert_eq!(stats.cache.misses, 0);
    /// # }
    /// ```
    pub fn stats(&self) -> AuthStats {
        let cache = &self.verifier.cache;
        let (outcomes, counts, lookup_latency, store_lookup_failures) = cache.stats.snapshot();
        AuthStats {
            outcomes,
            cache: counts,
            store_lookups: cache.store_lookups(),
            store_lookup_failures,
            lookup_latency,
            cached_tokens: cache.len() as u64,
            negative_entries: cache.negative_len(),
            lookups_in_flight: cache.lookups_in_flight() as u64,
            usage: self.verifier.usage.as_ref().map(UsageRecorder::stats),
            feed: cache.feed_state(),
            reused_secrets: cache.reused_secrets(),
        }
    }

    /// The layer's HTTP refusal for `err` (status, challenge, JSON body), for a gateway that
    /// refuses a request before it reaches the layer.
    #[cfg(feature = "gateway")]
    pub(crate) fn error_response(&self, err: &AuthError) -> http::Response<bytes::Bytes> {
        self.verifier.challenge.error_response(err, false)
    }

    /// Number of tokens in the positive cache.
    pub fn cached_tokens(&self) -> usize {
        self.verifier.cache.len()
    }

    /// How many store lookups this layer has made: a metric, and a way for tests to see the cache
    /// at work.
    pub fn store_lookups(&self) -> u64 {
        self.verifier.cache.store_lookups()
    }

    /// How many store lookups are in flight, running or waiting for a slot (concurrent requests
    /// for one token share one). A metric; it returns to zero when no request waits for the store,
    /// whether the requests finished or were dropped (a lookup nobody waits for any more is
    /// cancelled).
    pub fn lookups_in_flight(&self) -> usize {
        self.verifier.cache.lookups_in_flight()
    }

    /// Test hook: `hook` runs on every load or refresh just before the cache stores what the store
    /// answered (after the store query), so a test can fire an invalidation at that exact moment.
    /// Set once; returns `false` if a hook was already set. Not part of the stable API.
    #[doc(hidden)]
    pub fn set_cache_insert_hook(&self, hook: impl Fn() + Send + Sync + 'static) -> bool {
        self.verifier.cache.set_insert_hook(Box::new(hook))
    }

    /// How old the oldest state this layer may act on can be: how long a change made elsewhere
    /// (a revocation through another node) may have gone unseen here.
    ///
    /// - Zero while the store's change feed is connected and its queries succeed.
    /// - While the feed is down, or its next confirmation is overdue, the time since it last
    ///   confirmed that it had heard everything (`TokenLookup::feed_unconfirmed_since`: for
    ///   `PostgresStore` the last answered heartbeat, overdue a second after the heartbeat
    ///   interval, see `PostgresStoreBuilder::heartbeat`; for `SqliteStore` the last poll). So a
    ///   feed that falls silent shows here a second after a heartbeat was due, and from its last
    ///   confirmation, before and after the heartbeat's timeout declares it down. Meanwhile no
    ///   entry serves past the TTL, so a revocation made elsewhere is honoured here within the
    ///   heartbeat's interval and timeout plus the TTL.
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
        self.verifier.cache.max_staleness()
    }

    /// The token format the layer accepts.
    pub fn format(&self) -> &TokenFormat {
        &self.verifier.format
    }

    /// The hasher the layer uses; the management API must store hashes made by the same one.
    pub fn hasher(&self) -> &TokenHasher {
        self.verifier.cache.hasher()
    }

    /// The realm of the layer's `WWW-Authenticate` challenges (for a
    /// [`RequireScopesLayer`](crate::RequireScopesLayer) behind it).
    pub fn realm(&self) -> &str {
        self.verifier.challenge.realm()
    }

    /// The cache settings.
    pub fn cache_config(&self) -> &CacheConfig {
        self.verifier.cache.config()
    }

    /// Where the layer reads the client address from ([`PatAuthLayerBuilder::trusted_proxies`]):
    /// a gateway that verifies tokens with [`verify`](Self::verify) reads addresses the same way.
    pub fn client_ip_source(&self) -> &ClientIpSource {
        &self.verifier.client_ip
    }

    /// Verifies a bare token with every rule the layer applies to a request, for callers that are
    /// not HTTP requests through the layer (another transport, a gateway, a job): the offline
    /// format check, the cache and store lookup, revocation, expiry, the token's IP restriction
    /// against `client`, the layer's own required scopes plus `required`, the failure limit (when
    /// [`limit_failures`](PatAuthLayerBuilder::limit_failures) is on, counted against `client`)
    /// and usage tracking. It is the request path's own code, and its refusals are logged as a
    /// request's are (see [Logging](crate::auth#logging)).
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
        let verifier = &self.verifier;
        let stats = &verifier.cache.stats;
        let mut positive = false;
        // Dropped after a refusal was counted (see `Verifier::lookup_attempt`).
        let mut attempt = None;
        let result = async {
            verifier.check_limit(client)?;
            let mut probe = verifier.probe(token, now_ms())?;
            // At most twice: a cached entry of a rotated-out secret that has expired is looked up
            // again as a miss (see `Refusal::look_up`), which never answers from the positive map.
            let mut looked_up = false;
            loop {
                let outcome = match probe {
                    Probe::Cached(outcome) => {
                        positive = matches!(outcome, Outcome::Found(_));
                        outcome
                    }
                    Probe::Uncached(keys) => {
                        stats.add(Counter::Miss);
                        attempt = verifier.lookup_attempt(client).await?;
                        Arc::clone(&verifier.cache)
                            .load(
                                keys.slot,
                                keys.hash,
                                keys.previous,
                                crate::client_ip::ClientAddr::from_ip(client),
                            )
                            .await
                    }
                };
                match verifier.authorize(outcome, now_ms(), Some(required), || client) {
                    Err(Refusal {
                        look_up: Some(slot),
                        ..
                    }) if !looked_up => {
                        looked_up = true;
                        positive = false;
                        probe = verifier.probe_miss(token, slot)?;
                    }
                    result => break result,
                }
            }
        }
        .await;
        match (&result, positive) {
            (Ok(_), true) => stats.add(Counter::OkHit),
            (Ok(_), false) => stats.add(Counter::OkMiss),
            (Err(_), true) => stats.add(Counter::HitRefused),
            (Err(_), false) => {}
        }
        let result = result.map_err(|refusal: Refusal| {
            verifier.refused(&refusal, client, client);
            refusal.error
        });
        drop(attempt);
        result
    }
}
