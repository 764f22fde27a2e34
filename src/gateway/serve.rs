//! `patd serve`: the store, the layer and the gate from a [`Config`], and the HTTP servers.
//!
//! - `listen`: `/auth` (forward-auth, any method), `/healthz` (the process is up), `/readyz` (the
//!   store answers and its change feed is connected; 503 with a fixed reason otherwise, the
//!   store's error in the log), `/metrics` (Prometheus text), and the management API under
//!   `/personal-access-tokens` unless `admin_listen` is set, which then serves it alone.
//! - `ext_authz_listen` (feature `ext-authz`): Envoy's ext_authz over gRPC, through the same gate
//!   (layer, route rules, counters) as `/auth`.
//! - `[retention]`: a background task removes revoked and expired records older than `max_age`
//!   (30 days by default; `0` keeps them), every `interval`, logging one line per run.
//! - `[expiry_notices]` (off by default): a background task claims the `expiring` and `expired`
//!   notices in the store, once per token across every process sharing it, and logs each (there
//!   is no webhook in `patd`).
//! - SIGTERM or SIGINT: stop accepting, let requests in flight finish (at most
//!   `shutdown_timeout`), stop the retention and notice tasks, write the pending usage marks,
//!   exit 0.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use http::{HeaderValue, StatusCode, header};

use super::config::{Config, OriginalHeaders, ReuseMode, StoreUrl};
use super::forward_auth::{ForwardAuth, OriginalRequestHeaders};
use super::gate::Gate;
use super::metrics::Metrics;
use crate::admin::{self, AdminConfig, ExpiryPolicy};
use crate::stats::FeedState;
use crate::store::TokenStore;
use crate::{CacheConfig, PatAuthLayer, TokenFormat, TokenHasher, Tokens, UsageConfig};

/// Opens the configured store (creating and migrating an SQLite file, connecting to
/// PostgreSQL and applying its migrations).
pub async fn open_store(config: &Config) -> Result<Arc<dyn TokenStore>, String> {
    match &config.store {
        StoreUrl::Sqlite(path) => crate::SqliteStore::open(path)
            .await
            .map(|s| Arc::new(s) as Arc<dyn TokenStore>)
            .map_err(|e| format!("cannot open the store sqlite:{}: {e}", path.display())),
        StoreUrl::Postgres(url) => crate::PostgresStore::connect(url)
            .await
            .map(|s| Arc::new(s) as Arc<dyn TokenStore>)
            .map_err(|e| {
                let error = config.store.scrub(e.to_string());
                format!("cannot open the store {}: {error}", config.store)
            }),
    }
}

/// The [`Tokens`] handle of the configuration: its token prefix and pepper over `store`.
pub fn tokens(config: &Config, store: Arc<dyn TokenStore>) -> Result<Tokens, String> {
    let mut tokens = Tokens::from_arc(store);
    if let Some(prefix) = &config.token_prefix {
        let format =
            TokenFormat::with_prefix(prefix.clone()).map_err(|e| format!("token_prefix: {e}"))?;
        tokens = tokens.with_format(format);
    }
    if let Some(pepper) = &config.pepper {
        let hasher = TokenHasher::with_pepper(pepper.expose()).with_previous_peppers(
            config
                .previous_peppers
                .iter()
                .map(|p| p.expose().as_bytes().to_vec()),
        );
        tokens = tokens.with_hasher(hasher);
    }
    Ok(tokens)
}

/// The layer of the configuration: token sources, trusted proxies, cache, usage tracking and
/// failure limit.
pub fn layer(config: &Config, tokens: &Tokens) -> PatAuthLayer {
    let mut b = tokens.layer().realm(config.realm.clone());
    if config.sources.token_scheme {
        b = b.accept_token_scheme();
    }
    if config.sources.raw_authorization {
        b = b.accept_raw_authorization();
    }
    for h in &config.sources.headers {
        b = b.accept_header(h.0.clone());
    }
    if config.sources.query {
        b = b.accept_query_parameter();
    }
    if !config.proxy.trusted.is_empty() {
        b = b.trusted_proxies(
            config.proxy.trusted.iter().map(|c| c.0),
            config.proxy.header.into(),
        );
    }
    let c = &config.cache;
    b = b.cache(
        CacheConfig::default()
            .ttl(c.ttl.0)
            .stale_if_error(c.stale_if_error.0)
            .negative_ttl(c.negative_ttl.0)
            .max_concurrent_lookups(c.max_concurrent_lookups)
            .lookup_timeout(c.lookup_timeout.0),
    );
    if config.usage.enabled {
        b = b.track_usage(
            UsageConfig::default()
                .granularity(config.usage.granularity.0)
                .flush_interval(config.usage.flush_interval.0),
        );
    }
    if let Some(max) = config.failure_limit.max_failures {
        b = b.limit_failures(max, config.failure_limit.window.0);
    }
    b = match config.reuse.policy {
        ReuseMode::Off => b,
        // The detection itself logs each reuse; the hook only turns it on.
        ReuseMode::Report => b.on_reuse(|_| {}),
        ReuseMode::RevokeFamily => b.reuse_policy(crate::ReusePolicy::RevokeFamily),
    };
    b.build()
}

/// Everything `patd serve` runs: built from a [`Config`] and an open store.
#[derive(Clone, Debug)]
pub struct Gateway {
    config: Arc<Config>,
    tokens: Tokens,
    layer: PatAuthLayer,
    forward_auth: Arc<ForwardAuth>,
    /// The gate of `/auth`, shared with ext_authz (one set of decision counters).
    #[cfg_attr(not(feature = "ext-authz"), allow(dead_code))]
    gate: Gate,
    metrics: Arc<Metrics>,
    leak_reports: Option<crate::admin::LeakReports>,
    readiness: Arc<Readiness>,
}

impl Gateway {
    /// Builds the gateway over `store`.
    pub fn new(config: Config, store: Arc<dyn TokenStore>) -> Result<Self, String> {
        let tokens = tokens(&config, store)?;
        let layer = layer(&config, &tokens);
        let gate = Gate::with_rules(layer.clone(), config.route_rules());
        let original = match config.forward_auth.original_headers {
            OriginalHeaders::Original => OriginalRequestHeaders::Original,
            _ => OriginalRequestHeaders::Forwarded,
        };
        let forward_auth = ForwardAuth::new(gate.clone(), original)
            .identity_headers((&config.identity_headers).into())
            .nginx_compat(config.forward_auth.nginx_compat);
        let metrics = Metrics::new(layer.clone(), gate.clone());
        let leak_reports = config.leak_reports.build().map_err(|e| e.0)?;
        Ok(Self {
            leak_reports,
            config: Arc::new(config),
            tokens,
            layer,
            forward_auth: Arc::new(forward_auth),
            gate,
            metrics: Arc::new(metrics),
            readiness: Arc::default(),
        })
    }

    /// The layer.
    pub fn layer(&self) -> &PatAuthLayer {
        &self.layer
    }

    /// The retention of the configuration (`[retention]`) over the gateway's store, not started:
    /// [`spawn`](crate::retention::RetentionBuilder::spawn) it, or
    /// [`build`](crate::retention::RetentionBuilder::build) it to purge once.
    pub fn retention(&self) -> crate::retention::RetentionBuilder {
        self.tokens.retention((&self.config.retention).into())
    }

    /// The expiry notices of the configuration (`[expiry_notices]`) over the gateway's store, not
    /// started, each notice logged (target `tower_pat::notices`: the token's id, subject, name
    /// and expiry, never a secret): [`spawn`](crate::notices::ExpiryNoticeBuilder::spawn) it.
    pub fn expiry_notices(&self) -> crate::notices::ExpiryNoticeBuilder {
        self.tokens
            .expiry_notices((&self.config.expiry_notices).into())
            .on_notice(|kind, record, _| {
                let event = match kind {
                    crate::notices::NoticeKind::Expiring => "personalAccessToken.expiring",
                    crate::notices::NoticeKind::Expired => "personalAccessToken.expired",
                };
                tracing::info!(
                    target: "tower_pat::notices",
                    event,
                    id = %record.id,
                    subject = %record.subject,
                    name = %record.name,
                    expires_at = ?record.expires_at,
                    "token expiry notice"
                );
            })
    }

    /// The management API's router (to nest under `/personal-access-tokens`).
    pub fn admin_router(&self) -> Result<Router, String> {
        let mut config = AdminConfig::new(&self.tokens, &self.layer).map_err(|e| e.to_string())?;
        if let Some(lifetime) = &self.config.expiry.default_lifetime {
            config = config.expiry_policy(ExpiryPolicy::DefaultLifetime(lifetime.0));
        }
        if let Some(max) = &self.config.expiry.max_lifetime {
            config = config.max_lifetime(max.0);
        }
        if let Some(reports) = &self.leak_reports {
            config = config.leak_reports(reports.clone());
        }
        Ok(Router::new().nest("/personal-access-tokens", admin::router(config)))
    }

    /// The router of `ext_authz_listen`: Envoy's `envoy.service.auth.v3.Authorization/Check`
    /// (gRPC) through the gate of `/auth` (its layer, route rules and decision counters), with
    /// the configured identity header names. An error for a `patd` built without the
    /// `ext-authz` feature.
    pub fn ext_authz_router(&self) -> Result<Router, String> {
        #[cfg(feature = "ext-authz")]
        {
            let service = super::ext_authz::ExtAuthz::from_gate(self.gate.clone())
                .identity_headers((&self.config.identity_headers).into())
                .into_server();
            // Every gRPC path to the service: it answers `UNIMPLEMENTED` for other methods.
            Ok(Router::new().fallback_service(service))
        }
        #[cfg(not(feature = "ext-authz"))]
        Err(
            "ext_authz_listen is set, but this patd was built without the ext-authz feature"
                .to_owned(),
        )
    }

    /// The router of `listen`: `/auth`, `/healthz`, `/readyz`, `/metrics`, and the management API
    /// when it has no listener of its own.
    pub fn router(&self) -> Result<Router, String> {
        let mut router = Router::new()
            .route("/auth", any(forward_auth))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz));
        if self.config.metrics {
            router = router.route("/metrics", get(metrics));
        }
        let mut router = router.with_state(self.clone());
        if self.config.admin_listen.is_none() {
            router = router.merge(self.admin_router()?);
        }
        Ok(router)
    }
}

async fn forward_auth(State(gw): State<Gateway>, req: Request) -> Response {
    gw.forward_auth
        .check(&req)
        .await
        .map(axum::body::Body::from)
}

async fn healthz() -> Response {
    (
        StatusCode::OK,
        [(header::CACHE_CONTROL, "no-store")],
        "ok\n",
    )
        .into_response()
}

async fn readyz(State(gw): State<Gateway>) -> Response {
    let unready = |why: &str| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CACHE_CONTROL, "no-store")],
            format!("not ready: {why}\n"),
        )
            .into_response()
    };
    if !gw.readiness.store_answers(gw.tokens.store()).await {
        return unready("the store does not answer");
    }
    if let FeedState::Disconnected(d) = gw.layer.stats().feed {
        return unready(&format!(
            "the store's change feed has been disconnected for {} s",
            d.as_secs()
        ));
    }
    (
        StatusCode::OK,
        [(header::CACHE_CONTROL, "no-store")],
        "ready\n",
    )
        .into_response()
}

/// How long one answer of the store to the readiness probe stands for every `/readyz` request.
const READY_TTL: Duration = Duration::from_secs(1);
/// How long the readiness probe waits for the store: a store that hangs reads as not answering.
const READY_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The store's last answer to the readiness probe, shared by every `/readyz` request. `/readyz`
/// needs no token, so a flood of it must not become a flood of store queries, which would take
/// the connections that token lookups need: the store is asked at most once at a time and once
/// per [`READY_TTL`], whatever the rate of requests. The probe runs in a task of its own, so a
/// client that hangs up cannot cancel it and make the next request start another.
#[derive(Debug, Default)]
struct Readiness {
    /// When the last probe ended (on the monotonic clock), and whether the store answered.
    last: std::sync::Mutex<Option<(Instant, bool)>>,
    /// The probe in flight: every request while it runs waits for its answer.
    in_flight: crate::shared_run::SharedRun<bool>,
}

impl Readiness {
    fn fresh(&self) -> Option<bool> {
        let last = *crate::usage::lock(&self.last);
        last.filter(|(at, _)| at.elapsed() < READY_TTL)
            .map(|(_, answers)| answers)
    }

    async fn store_answers(self: &Arc<Self>, store: &Arc<dyn TokenStore>) -> bool {
        if let Some(answers) = self.fresh() {
            return answers;
        }
        let answer = self.in_flight.join_or_start(|| {
            // The probe that just ended stored its answer before it closed.
            if let Some(answers) = self.fresh() {
                return Err(answers);
            }
            let this = Arc::clone(self);
            let store = Arc::clone(store);
            Ok(async move {
                let answers = probe_store(&store).await;
                *crate::usage::lock(&this.last) = Some((Instant::now(), answers));
                this.in_flight.close();
                answers
            })
        });
        answer.await.unwrap_or(false)
    }
}

/// Whether the store answers the readiness probe within [`READY_PROBE_TIMEOUT`]: any answer, even
/// "no such token", means it is reachable. The error's text stays in the log (it can name hosts,
/// users and files), once per probe at most.
async fn probe_store(store: &Arc<dyn TokenStore>) -> bool {
    match tokio::time::timeout(READY_PROBE_TIMEOUT, store.get("patd-readiness-probe")).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            tracing::warn!(target: "tower_pat::gateway", error = %e, "readiness: the store does not answer");
            false
        }
        Err(_) => {
            tracing::warn!(
                target: "tower_pat::gateway",
                timeout_ms = READY_PROBE_TIMEOUT.as_millis() as u64,
                "readiness: the store does not answer in time"
            );
            false
        }
    }
}

async fn metrics(State(gw): State<Gateway>) -> Response {
    let mut res = gw.metrics.render().into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    res
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// How long a client may take to send a request's head, from the connection's start or the end
/// of its previous request: a client that sends a byte now and then cannot hold a connection.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How many connections a listener serves at once by default (`max_connections`); more wait in
/// the kernel's backlog until one closes.
pub const MAX_CONNECTIONS: usize = 4096;

/// How a listener shares its connection slots: at most `max` at once, and while at least half of
/// them are taken, at most `max_connections_per_client` held by one client (and a multiple of it
/// by its wider IPv6 networks: `caps`, [`client_networks`]). Without
/// the second, one client could hold every slot (idle HTTP/2 connections need a request every
/// [`IDLE_TIMEOUT`]) and every other client would wait in the backlog. With a listener less than
/// half full nobody is refused, so a deployment whose clients all arrive from one address (a load
/// balancer that replaces it, a NAT) works as before until it is busy.
#[derive(Debug)]
struct ConnectionLimits {
    /// The listener's slots.
    max: usize,
    /// While the listener is at least half full, the most connections each network of
    /// [`client_networks`] may hold, in its order: the client (at most a quarter of `max`), an
    /// IPv6 /56 (twice that), an IPv6 /48 (four times, at most half of `max`). `None`: no limit.
    caps: Option<[usize; 3]>,
    /// Peers not limited: the trusted proxies, through which every client comes.
    exempt: Vec<ipnet::IpNet>,
    /// The open connections in each network that has any ([`client_networks`]).
    open: std::sync::Mutex<std::collections::HashMap<ipnet::IpNet, usize>>,
    /// Connections this listener closed for their client's limit
    /// (`patd_connections_refused_total`).
    refused: super::metrics::RefusedCount,
}

/// One client's connection, counted in its networks until it is dropped.
struct ClientSlot {
    limits: Arc<ConnectionLimits>,
    networks: [Option<ipnet::IpNet>; 3],
}

impl ConnectionLimits {
    fn new(
        max: usize,
        per_client: usize,
        exempt: Vec<ipnet::IpNet>,
        refused: super::metrics::RefusedCount,
    ) -> Arc<Self> {
        let max = max.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        // A /48 at most half the slots, a client at most a quarter: a limit of half or more
        // would never be reached before the listener is full (where the open-file limit cut
        // `max`, say), since nobody is refused below half full.
        let site = per_client.saturating_mul(4).min(max / 2).max(1);
        let subnet = per_client.saturating_mul(2).min(site);
        let client = per_client.min(max / 4).min(subnet).max(1);
        Arc::new(Self {
            max,
            caps: (per_client > 0).then_some([client, subnet, site]),
            exempt,
            open: std::sync::Mutex::default(),
            refused,
        })
    }

    /// Counts a connection from `peer`, with `in_use` slots taken (this one included): `Err`
    /// with the network over its limit and that limit if the listener is at least half full and
    /// one of the peer's networks ([`client_networks`]) holds its limit (`caps`); `Ok(None)` if
    /// the peer is not limited.
    fn admit(
        self: &Arc<Self>,
        peer: IpAddr,
        in_use: usize,
    ) -> Result<Option<ClientSlot>, (ipnet::IpNet, usize)> {
        let peer = crate::record::canonical_ip(peer);
        let Some(caps) = self.caps else {
            return Ok(None);
        };
        if self.exempt.iter().any(|net| net.contains(&peer)) {
            return Ok(None);
        }
        let networks = client_networks(peer);
        let mut open = crate::usage::lock(&self.open);
        if in_use.saturating_mul(2) >= self.max {
            for (net, cap) in networks.iter().zip(caps) {
                if let Some(net) = net
                    && open.get(net).copied().unwrap_or(0) >= cap
                {
                    self.refused
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Err((*net, cap));
                }
            }
        }
        for net in networks.iter().flatten() {
            *open.entry(*net).or_insert(0) += 1;
        }
        Ok(Some(ClientSlot {
            limits: Arc::clone(self),
            networks,
        }))
    }
}

/// The networks a connection from `peer` counts in, in the order of [`ConnectionLimits::caps`]:
/// the client as the failure limit and the lookup budgets count it (an IPv4 address; an IPv6 /64,
/// what one host is usually given), and for IPv6 its /56 and its /48, since a site is given a /56
/// or a /48 (a tunnel broker hands one out free): otherwise one site would be 256 or 65 536
/// clients.
fn client_networks(peer: IpAddr) -> [Option<ipnet::IpNet>; 3] {
    let (v4, v6) = crate::auth::limit::FailureLimit::DEFAULT_PREFIXES;
    let prefixes = match peer {
        IpAddr::V4(_) => [Some(v4), None, None],
        IpAddr::V6(_) => [Some(v6), Some(56), Some(48)],
    };
    prefixes.map(|prefix| {
        let net = ipnet::IpNet::new(peer, prefix?).ok()?;
        Some(net.trunc())
    })
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = crate::usage::lock(&self.limits.open);
        for net in self.networks.iter().flatten() {
            if let std::collections::hash_map::Entry::Occupied(mut count) = open.entry(*net) {
                *count.get_mut() -= 1;
                if *count.get() == 0 {
                    count.remove();
                }
            }
        }
    }
}

/// Files kept for what is not a client connection: the listeners, the store's connections (the
/// SQLite file and its journal, the PostgreSQL pool), the log.
const RESERVED_FILES: u64 = 256;

/// The open-file limit, raised first to the hard limit where the soft one is lower (Linux; every
/// connection is a file, and a soft limit of 1 024 is common): `None` where unknown or unlimited.
fn raise_open_files_limit() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let limit = getrlimit(Resource::Nofile);
        // `None` is unlimited: a soft limit below the hard one is `Some` and differs from it.
        if limit.current.is_some() && limit.current != limit.maximum {
            let raised = Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            };
            if let Err(e) = setrlimit(Resource::Nofile, raised) {
                tracing::warn!(
                    target: "tower_pat::gateway",
                    error = %e,
                    soft = limit.current,
                    hard = limit.maximum,
                    "cannot raise the open-file limit to its hard limit (above fs.nr_open?)"
                );
            }
        }
        getrlimit(Resource::Nofile).current
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// How many connections each of `listeners` listeners may serve: `configured`, or fewer where
/// `open_files` (beyond [`RESERVED_FILES`]) cannot hold them all. A listener then reaches half
/// full, where the per-client limit starts, before the process runs out of files: otherwise one
/// client could take every file, and the store's connections with them.
fn connection_budget(configured: usize, listeners: usize, open_files: Option<u64>) -> usize {
    let Some(open_files) = open_files else {
        return configured;
    };
    let per_listener = open_files.saturating_sub(RESERVED_FILES) / listeners.max(1) as u64;
    configured
        .min(usize::try_from(per_listener).unwrap_or(usize::MAX))
        .max(1)
}

/// How long a connection's requests may go without one starting or ending while any is in flight
/// (a request whose body never comes, HTTP/2 headers alone): the connection is then closed.
/// Checked by the connection's own tick, so a request costs no timer.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// How often at most a listener warns about one client whose connections it closes for its limit.
const REFUSED_WARNING_INTERVAL: Duration = Duration::from_secs(60);
/// How many clients a listener names in its warnings per [`REFUSED_WARNING_INTERVAL`] at most
/// (the others are counted in `/metrics` only).
const REFUSED_WARNINGS: usize = 64;

/// How long a closing connection may take to finish the requests in flight before it is dropped.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// How long an HTTP/2 connection may stay open with no request in flight after its last one
/// (answering pings). An HTTP/1.1 connection gets [`HEADER_READ_TIMEOUT`] between requests too
/// (hyper runs its header timeout again while it waits for the next request head), so a
/// gateway's upstream keep-alive must be shorter. Before its first request a connection gets
/// [`HEADER_READ_TIMEOUT`], whichever protocol it speaks or whether it sends anything at all.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// What a connection is doing, for closing it when it has been idle too long.
struct Activity {
    started: std::time::Instant,
    /// Requests whose response is not ready yet.
    in_flight: std::sync::atomic::AtomicUsize,
    /// When a request last started or ended, in ms since `started`.
    last_ms: std::sync::atomic::AtomicU64,
    /// Whether a request has come.
    served: std::sync::atomic::AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Self {
            started: std::time::Instant::now(),
            in_flight: 0.into(),
            last_ms: 0.into(),
            served: false.into(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether the connection should be closed: no request in flight for longer than it may
    /// stay idle, or requests in flight and none started or ended for [`REQUEST_TIMEOUT`].
    fn should_close(&self) -> bool {
        use std::sync::atomic::Ordering::{Acquire, Relaxed};
        // Pairs with the release in `Busy::drop`: the count, then the time seen with it.
        let limit = if self.in_flight.load(Acquire) != 0 {
            REQUEST_TIMEOUT
        } else if self.served.load(Relaxed) {
            IDLE_TIMEOUT
        } else {
            HEADER_READ_TIMEOUT
        };
        let quiet = self.now_ms().saturating_sub(self.last_ms.load(Relaxed));
        u128::from(quiet) >= limit.as_millis()
    }
}

/// A request of a connection in flight: counted from the call until its response is ready.
struct Busy(Arc<Activity>);

impl Busy {
    fn new(activity: &Arc<Activity>) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        activity.served.store(true, Relaxed);
        activity.last_ms.store(activity.now_ms(), Relaxed);
        activity.in_flight.fetch_add(1, Relaxed);
        Self(Arc::clone(activity))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::{Relaxed, Release};
        self.0.last_ms.store(self.0.now_ms(), Relaxed);
        self.0.in_flight.fetch_sub(1, Release);
    }
}

/// A connection's service: the router, with the peer's address as `ConnectInfo` in each
/// request (what `into_make_service_with_connect_info` adds), its requests counted in the
/// connection's [`Activity`].
#[derive(Clone)]
struct Tracked {
    router: Router,
    peer: SocketAddr,
    activity: Arc<Activity>,
}

impl<B> tower::Service<http::Request<B>> for Tracked
where
    B: http_body::Body<Data = axum::body::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = TrackedFuture<<Router as tower::Service<http::Request<B>>>::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        tower::Service::<http::Request<B>>::poll_ready(&mut self.router, cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(self.peer));
        TrackedFuture {
            busy: Some(Busy::new(&self.activity)),
            inner: tower::Service::call(&mut self.router, req),
        }
    }
}

/// The response future of [`Tracked`]: the router's, counted in flight until it is ready (or
/// dropped). No box, no timer.
#[pin_project::pin_project]
struct TrackedFuture<F> {
    #[pin]
    inner: F,
    busy: Option<Busy>,
}

impl<F: std::future::Future> std::future::Future for TrackedFuture<F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        this.busy.take();
        std::task::Poll::Ready(out)
    }
}

/// Serves `app` on `listener` (HTTP/1.1 and HTTP/2, the peer address as `ConnectInfo`) until
/// `stop` completes, then lets the requests in flight finish.
///
/// Unlike `axum::serve`, hyper gets a timer, so [`HEADER_READ_TIMEOUT`] holds (without one hyper
/// drops its header timeout silently, and a slow client could keep any number of connections
/// open); a connection is closed (gracefully: HTTP/2 gets a GOAWAY) when it has sent no request
/// within that time (before hyper has even told HTTP/1 from HTTP/2), or had none in flight for
/// [`IDLE_TIMEOUT`], or had requests in flight and none start or end for [`REQUEST_TIMEOUT`] (a
/// body that never comes); and the connections are shared as `limits` says.
async fn serve_http(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Arc<ConnectionLimits>,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(std::time::Duration::from_secs(20)));
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max));
    let local = listener.local_addr()?;
    // The clients named in a warning since `warned_since`: each once per interval.
    let mut warned = std::collections::HashSet::new();
    let mut warned_since = Instant::now();
    let mut stop = std::pin::pin!(stop);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut stop => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: wait a little rather than spin.
                    tracing::warn!(target: "tower_pat::gateway", error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let in_use = limits.max - permits.available_permits();
        let slot = match limits.admit(peer.ip(), in_use) {
            Ok(slot) => slot,
            Err((client, limit)) => {
                if warned_since.elapsed() >= REFUSED_WARNING_INTERVAL {
                    warned.clear();
                    warned_since = Instant::now();
                }
                if warned.len() < REFUSED_WARNINGS && warned.insert(client) {
                    tracing::warn!(
                        target: "tower_pat::gateway",
                        listener = %local,
                        %client,
                        limit,
                        in_use,
                        "a client (or its IPv6 /56 or /48) holds its share of \
                         max_connections_per_client connections of a listener at least half \
                         full: closing its new ones (named once a minute; \
                         patd_connections_refused_total counts them)"
                    );
                }
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        // The router as it is: a layer added per connection would wrap every route, one more
        // boxed service to clone per request.
        let service = Tracked {
            router: app.clone(),
            peer,
            activity: Arc::clone(&activity),
        };
        let service = hyper_util::service::TowerToHyperService::new(service);
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let mut closing = closing_rx.clone();
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Set once the connection was asked to close: dropped if it has not by then.
            let mut deadline: Option<tokio::time::Instant> = None;
            loop {
                tokio::select! {
                    _ = connection.as_mut() => break,
                    _ = tick.tick() => {
                        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                            break;
                        }
                        if deadline.is_none() && activity.should_close() {
                            // HTTP/1.1 closes, HTTP/2 sends GOAWAY, detection stops.
                            connection.as_mut().graceful_shutdown();
                            deadline = Some(tokio::time::Instant::now() + CLOSE_GRACE);
                        }
                    }
                    _ = closing.wait_for(|c| *c), if deadline.is_none() => {
                        connection.as_mut().graceful_shutdown();
                        // The server's own shutdown timeout bounds the drain.
                        deadline = Some(tokio::time::Instant::now() + REQUEST_TIMEOUT);
                    }
                }
            }
            drop(slot);
            drop(permit);
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    // Every connection holds a permit until it has ended.
    let _ = permits
        .acquire_many(u32::try_from(limits.max).unwrap_or(u32::MAX))
        .await;
    Ok(())
}

/// Runs `patd serve` until SIGTERM or SIGINT, then drains and flushes. `ready` is called with
/// the bound addresses once both listeners accept.
///
/// On Linux this raises the process's soft open-file limit to its hard limit (every connection
/// is a file), for the whole process: `patd`'s own, or yours if you call this.
pub async fn serve(
    config: Config,
    ready: impl FnOnce(SocketAddr, Option<SocketAddr>),
) -> Result<(), String> {
    for warning in config.shadow_warnings() {
        tracing::warn!(target: "tower_pat::gateway", "route rules: {warning}");
    }
    let store = open_store(&config).await?;
    let gateway = Gateway::new(config.clone(), Arc::clone(&store))?;
    let retention = gateway.retention().spawn();
    gateway.metrics.track_retention(retention.clone());
    let notices = gateway.expiry_notices().spawn();
    if notices.config().enabled {
        gateway.metrics.track_expiry_notices(notices.clone());
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let admin_listener = match config.admin_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr} (admin_listen): {e}"))?,
        ),
        None => None,
    };
    let ext_authz_listener = match config.ext_authz_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr} (ext_authz_listen): {e}"))?,
        ),
        None => None,
    };
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let admin_local = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut servers = tokio::task::JoinSet::new();
    let app = gateway.router()?;
    let stop = stopped();
    let listeners =
        1 + usize::from(admin_listener.is_some()) + usize::from(ext_authz_listener.is_some());
    let configured = config.max_connections.get() as usize;
    let open_files = raise_open_files_limit();
    let max_connections = connection_budget(configured, listeners, open_files);
    if max_connections < configured {
        tracing::warn!(
            target: "tower_pat::gateway",
            max_connections,
            configured,
            open_files,
            listeners,
            "the process may open too few files for max_connections on every listener: each \
             serves at most {max_connections} (raise the hard limit, LimitNOFILE= under systemd)"
        );
    }
    let clients = |listener: &'static str| {
        let trusted = config
            .proxy
            .trusted
            .iter()
            .map(|net| crate::record::canonical_net(net.0))
            .collect();
        ConnectionLimits::new(
            max_connections,
            config.max_connections_per_client,
            trusted,
            gateway.metrics.connections_refused(listener),
        )
    };
    servers.spawn(serve_http(listener, app, clients("listen"), stop));
    if let Some(admin_listener) = admin_listener {
        let app = gateway.admin_router()?;
        let stop = stopped();
        servers.spawn(serve_http(
            admin_listener,
            app,
            clients("admin_listen"),
            stop,
        ));
    }
    let ext_authz_local = match ext_authz_listener {
        Some(listener) => {
            let local = listener.local_addr().ok();
            let app = gateway.ext_authz_router()?;
            servers.spawn(serve_http(
                listener,
                app,
                clients("ext_authz_listen"),
                stopped(),
            ));
            local
        }
        None => None,
    };
    if config.proxy.trusted.is_empty() {
        // Forward-auth requests come from the gateway: without its address trusted, every client
        // is the gateway to the failure limit, the lookup budgets and the IP restrictions.
        tracing::warn!(
            target: "tower_pat::gateway",
            "no [proxy] trusted: every forward-auth client is read as the gateway's own address \
             (one failure limit and lookup budget for all, IP restrictions matched against the \
             gateway); set [proxy] trusted to the gateway's address"
        );
    }
    tracing::info!(
        listen = %local,
        admin_listen = admin_local.map(tracing::field::display),
        ext_authz_listen = ext_authz_local.map(tracing::field::display),
        store = %config.store,
        "patd serving"
    );
    ready(local, admin_local);
    tokio::select! {
        _ = shutdown_signal() => {}
        Some(done) = servers.join_next() => {
            // A server ended by itself: an error.
            let why = match done {
                Ok(Ok(())) => "a server stopped".to_owned(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            return Err(why);
        }
    }
    tracing::info!("shutting down: draining requests in flight");
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(config.shutdown_timeout.0, async {
        while servers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            timeout_secs = config.shutdown_timeout.0.as_secs(),
            "requests still in flight at the shutdown timeout: closing them"
        );
        servers.abort_all();
    }
    // A run in progress ends after its current batch; a store that hangs does not hold the exit.
    if tokio::time::timeout(config.shutdown_timeout.0, retention.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("the retention run did not end within the shutdown timeout");
    }
    if tokio::time::timeout(config.shutdown_timeout.0, notices.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("the expiry notice run did not end within the shutdown timeout");
    }
    if let Some(usage) = gateway.layer.usage() {
        if tokio::time::timeout(config.shutdown_timeout.0, usage.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("the usage flush did not end within the shutdown timeout");
        }
        let s = usage.stats();
        tracing::info!(
            rows_written = s.rows_written,
            dropped = s.dropped_marks,
            "usage marks flushed"
        );
    }
    drop(gateway);
    drop(store);
    tracing::info!("patd stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_connection_budget_fits_the_open_file_limit() {
        // Enough files: as configured.
        assert_eq!(connection_budget(4096, 3, Some(1 << 20)), 4096);
        assert_eq!(connection_budget(4096, 3, None), 4096);
        // 1 024 files, 256 kept: 768 for one listener, 256 each for three.
        assert_eq!(connection_budget(4096, 1, Some(1024)), 768);
        assert_eq!(connection_budget(4096, 3, Some(1024)), 256);
        // Never none at all.
        assert_eq!(connection_budget(4096, 2, Some(100)), 1);
        assert_eq!(connection_budget(16, 1, Some(1024)), 16);
    }

    #[test]
    fn connections_are_counted_per_client_network_and_freed_on_drop() {
        let net = |s: &str| s.parse::<ipnet::IpNet>().unwrap();
        let refused = Arc::default();
        let trusted = vec![crate::record::canonical_net(net("10.0.0.0/8"))];
        let limits = ConnectionLimits::new(16, 2, trusted, Arc::clone(&refused));
        // Half full (8 of 16 taken, this one included): each client holds at most 2, an IPv6
        // /56 4, a /48 8.
        let full = 8;
        let admit = |peer: &str| limits.admit(ip(peer), full);
        let mut site = Vec::new();
        // An IPv6 /64 is one client, whatever its interface ids.
        site.push(admit("2001:db8::1").unwrap());
        site.push(admit("2001:db8::ffff:2").unwrap());
        assert_eq!(admit("2001:db8::3").err(), Some((net("2001:db8::/64"), 2)));
        // Another /64 of the /56 is another client, until the /56 holds twice the limit.
        site.push(admit("2001:db8:0:1::1").unwrap());
        site.push(admit("2001:db8:0:1::2").unwrap());
        assert_eq!(
            admit("2001:db8:0:2::1").err(),
            Some((net("2001:db8::/56"), 4))
        );
        // Other /56s of the /48, until the /48 holds four times the limit.
        for peer in [
            "2001:db8:0:100::1",
            "2001:db8:0:100::2",
            "2001:db8:0:200::1",
        ] {
            site.push(admit(peer).unwrap());
        }
        site.push(admit("2001:db8:0:200::2").unwrap());
        assert_eq!(
            admit("2001:db8:0:300::1").err(),
            Some((net("2001:db8::/48"), 8))
        );
        assert!(site.iter().all(Option::is_some));
        // Another /48 is another site.
        let elsewhere = admit("2001:db8:1::1").unwrap();
        assert!(elsewhere.is_some());
        // An IPv4-mapped address is the IPv4 address it is.
        let v4 = [
            admit("192.0.2.1").unwrap(),
            admit("::ffff:192.0.2.1").unwrap(),
        ];
        assert_eq!(admit("192.0.2.1").err(), Some((net("192.0.2.1/32"), 2)));
        // Less than half full, nobody is refused, and those connections count too.
        let more = limits.admit(ip("192.0.2.1"), full - 1).unwrap();
        assert!(more.is_some());
        assert_eq!(crate::usage::lock(&limits.open)[&net("192.0.2.1/32")], 3);
        // A trusted proxy is not counted, mapped or not.
        for _ in 0..5 {
            assert!(limits.admit(ip("::ffff:10.1.2.3"), 16).unwrap().is_none());
        }
        assert_eq!(refused.load(std::sync::atomic::Ordering::Relaxed), 4);
        // A closed connection frees its slot in every network; networks with none are forgotten.
        site.remove(0);
        assert!(admit("2001:db8::4").unwrap().is_some());
        drop((site, v4, more, elsewhere));
        assert!(crate::usage::lock(&limits.open).is_empty());
        // The defaults; and where the open-file limit cut the slots, every tier stays below half
        // of them, the only counts a refusal can meet (nobody is refused below half full).
        let caps = |max, per_client| {
            ConnectionLimits::new(max, per_client, Vec::new(), Arc::default())
                .caps
                .unwrap()
        };
        assert_eq!(caps(4096, 256), [256, 512, 1024]);
        assert_eq!(caps(256, 64), [64, 128, 128]);
        assert_eq!(caps(768, 256), [192, 384, 384]);
        // A limit of a quarter of the slots or more is a quarter (never below one).
        assert_eq!(caps(256, 256)[0], 64);
        assert_eq!(caps(2, 256), [1, 1, 1]);
        // 0 is no limit.
        let unlimited = ConnectionLimits::new(16, 0, Vec::new(), Arc::default());
        assert!((0..10).all(|_| unlimited.admit(ip("192.0.2.1"), 16).unwrap().is_none()));
    }
}
