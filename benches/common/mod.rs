//! What the benches share: tokens and records, a lookup that holds a million of them, the request
//! they send, short criterion settings for a small shared machine, and the summary that reads the
//! figures of one run back from criterion's output.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::HashSet;
use std::convert::Infallible;
use std::future::{Ready, ready};
use std::path::PathBuf;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use chrono::Utc;
use http::{HeaderValue, Request, Response, header};
use http_body_util::Full;
use tower::Service;
use tower_pat::store::StoreError;
use tower_pat::{
    CacheConfig, PatAuthLayer, ScopeSet, TokenFormat, TokenHash, TokenHasher, TokenLookup,
};
use tower_pat::{TokenRecord, TokenSecret};

/// Whether the binary runs under `cargo bench` (which passes `--bench`) rather than `cargo test`,
/// where the benches only smoke-test themselves with small sizes.
pub fn full_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// Whether `group/bench` passes the filter given on the command line (a substring, or anchored
/// with `^` and `$`, as criterion's regex filter takes these plain names), so that the setup of a
/// bench that will not run (a million tokens) is skipped.
pub fn selected(group: &str, bench: &str) -> bool {
    let id = format!("{group}/{bench}");
    let mut args = std::env::args().skip(1);
    let mut filter = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            // Criterion options that take a value.
            "--profile-time"
            | "--save-baseline"
            | "--baseline"
            | "--load-baseline"
            | "--sample-size"
            | "--warm-up-time"
            | "--measurement-time"
            | "--nresamples"
            | "--noise-threshold"
            | "--confidence-level"
            | "--significance-level"
            | "--output-format"
            | "--color"
            | "--plotting-backend"
            | "--format" => {
                args.next();
            }
            a if a.starts_with('-') => {}
            a => filter = Some(a.to_owned()),
        }
    }
    let Some(f) = filter else { return true };
    match (f.strip_prefix('^'), f.strip_suffix('$')) {
        (Some(p), _) if p.ends_with('$') => id == p.trim_end_matches('$'),
        (Some(p), None) => id.starts_with(p),
        (None, Some(s)) => id.ends_with(s),
        _ => id.contains(&f),
    }
}

/// The batch of `iter_batched`: small, so that the inputs and outputs of a batch (requests of a few
/// hundred bytes) stay in memory the allocator reuses. Criterion's `SmallInput` makes batches of
/// up to 10% of the iterations: vectors of megabytes, fresh pages, and page faults inside the timed
/// section that double what a cheap routine seems to cost.
pub const BATCH: criterion::BatchSize = criterion::BatchSize::NumIterations(128);

/// Settings for a 2-core machine shared with others: the whole `cargo bench` takes a few minutes.
pub fn criterion() -> criterion::Criterion {
    criterion::Criterion::default()
        .output_directory(&criterion_dir())
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(40)
        .configure_from_args()
}

/// The `main` of a criterion bench: runs `bench`, then (under `cargo bench`) prints the summary.
pub fn run(bench: fn(&mut criterion::Criterion)) {
    let mut c = criterion();
    bench(&mut c);
    c.final_summary();
    if full_run() {
        summary();
    }
}

/// A single-threaded runtime: one core for the benches, the other for everything else.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// `target/` of this build: the bench binary lives in `target/<profile>/deps/`.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the bench binary's path");
    exe.ancestors()
        .nth(3)
        .map_or_else(|| PathBuf::from("target"), PathBuf::from)
}

fn criterion_dir() -> PathBuf {
    target_dir().join("criterion")
}

/// Polls a future that completes without waiting (a cache hit, a ready inner service).
pub fn poll_now<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("the future was expected to complete at once"),
    }
}

/// The future of a handler that answers at once.
pub type Reply<T> = Ready<Result<Response<T>, Infallible>>;

/// A trivial handler: answers at once with a `T` body, never fails, cheap to clone.
pub trait Handler<B, T>:
    Service<Request<B>, Response = Response<T>, Error = Infallible, Future = Reply<T>> + Clone
{
}

impl<S, B, T> Handler<B, T> for S where
    S: Service<Request<B>, Response = Response<T>, Error = Infallible, Future = Reply<T>> + Clone
{
}

/// The trivial handler behind every layer: answers "pong" and drops the request.
pub fn pong<B>() -> impl Handler<B, Full<Bytes>> {
    tower::service_fn(|_req: Request<B>| ready(Ok(Response::new(Full::from("pong")))))
}

/// A handler that hands the request back, so that dropping it (extensions, principal) happens
/// outside the timed section: the measured path ends with the principal in the extensions.
pub fn echo() -> impl Handler<(), Request<()>> {
    tower::service_fn(|req: Request<()>| ready(Ok(Response::new(req))))
}

/// A handler that answers 200 if the request carries a principal, 500 if not: to check, untimed,
/// that a bench measures what it says.
pub fn needs_principal() -> impl Handler<(), ()> {
    tower::service_fn(|req: Request<()>| {
        let mut res = Response::new(());
        if req.extensions().get::<tower_pat::Principal>().is_none() {
            *res.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
        }
        ready(Ok(res))
    })
}

/// `Authorization: Bearer <token>`.
pub fn bearer(token: &str) -> HeaderValue {
    HeaderValue::try_from(format!("Bearer {token}")).expect("a token is a valid header value")
}

/// The request every bench sends: a few ordinary headers and the credential.
pub fn request(auth: &HeaderValue) -> Request<()> {
    Request::get("/ping")
        .header(header::HOST, "localhost")
        .header(header::USER_AGENT, "bench/1.0")
        .header(header::ACCEPT, "*/*")
        .header(header::AUTHORIZATION, auth.clone())
        .body(())
        .expect("a valid request")
}

/// A stored record as a real store would hand it back: every field its own allocation.
pub fn record_for(hash: TokenHash, n: u64) -> TokenRecord {
    let now = Utc::now();
    let hex = hash.to_hex();
    TokenRecord {
        id: format!(
            "{}-{}-4{}-a{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[13..16],
            &hex[17..20],
            &hex[20..32]
        ),
        subject: format!("user-{n}"),
        name: format!("token {n}"),
        scopes: ScopeSet::parse(["repo:read", "repo:write"]).expect("valid scopes"),
        token_type: "personal".to_owned(),
        ip_restriction: Vec::new(),
        created_at: now,
        updated_at: now,
        expires_at: Some(now + chrono::Duration::days(90)),
        revoked_at: None,
        disabled_at: None,
        last_used_at: None,
        last_used_ips: Vec::new(),
        last_rotated_at: None,
        hash,
        start: "pat_abcd".to_owned(),
        previous_hash: None,
        version: 0,
    }
}

/// A read-only store of many tokens that keeps only their hashes and makes each record when it is
/// asked for, as a database would: the memory of the process is then the cache's. `MemoryStore`
/// suits a thousand tokens; a million need this.
#[derive(Debug, Default)]
pub struct ManyTokens {
    known: HashSet<TokenHash>,
}

impl ManyTokens {
    /// Issues `n` tokens of the default format: the store, and the secrets.
    pub fn issue(n: usize) -> (Self, Vec<TokenSecret>) {
        let format = TokenFormat::new();
        let hasher = TokenHasher::sha256();
        let secrets: Vec<TokenSecret> = (0..n).map(|_| format.generate()).collect();
        let known = secrets
            .iter()
            .map(|s| hasher.hash(s.expose_secret()))
            .collect();
        (Self { known }, secrets)
    }
}

#[async_trait]
impl TokenLookup for ManyTokens {
    async fn find_by_hash(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
        Ok(self
            .known
            .contains(hash)
            .then(|| record_for(*hash, hash.as_bytes()[0].into())))
    }
}

/// A layer over `lookup` whose cache entries outlive the bench (TTLs of an hour), so that no
/// refresh or expiry happens while it is timed.
pub fn layer<L: TokenLookup>(lookup: L) -> PatAuthLayer {
    let hour = Duration::from_secs(3600);
    PatAuthLayer::builder(lookup)
        .cache(CacheConfig::default().ttl(hour).negative_ttl(hour))
        .build()
}

/// Loads every token into the layer's cache, as their first requests would.
pub async fn fill(layer: &PatAuthLayer, secrets: &[TokenSecret]) {
    for s in secrets {
        layer
            .verify(s.expose_secret(), None, &ScopeSet::empty())
            .await
            .expect("an issued token authenticates");
    }
}

/// The `Authorization` headers of `secrets`, in the order of their hashes: an order unrelated to
/// the one their cache entries were allocated in, so that going through them in turn defeats the
/// CPU's prefetchers as traffic spread over many tokens would.
pub fn spread(secrets: &[TokenSecret]) -> Vec<HeaderValue> {
    let hasher = TokenHasher::sha256();
    let mut by_hash: Vec<(TokenHash, &TokenSecret)> = secrets
        .iter()
        .map(|s| (hasher.hash(s.expose_secret()), s))
        .collect();
    by_hash.sort_unstable_by_key(|(h, _)| *h);
    by_hash
        .into_iter()
        .map(|(_, s)| bearer(s.expose_secret()))
        .collect()
}

/// A token of the right shape that no store knows.
pub fn unknown_token() -> TokenSecret {
    TokenFormat::new().generate()
}

/// A token whose checksum does not match (its last character changed).
pub fn malformed_token() -> String {
    let mut t = TokenFormat::new().generate().expose_secret().to_owned();
    let last = t.pop().expect("a non-empty token");
    t.push(if last == 'A' { 'B' } else { 'A' });
    t
}

/// A criterion median in nanoseconds, with the age of the figure; `None` if the bench has not run.
pub fn median_ns(group: &str, bench: &str) -> Option<(f64, Duration)> {
    let path = criterion_dir()
        .join(group)
        .join(bench)
        .join("new")
        .join("estimates.json");
    let text = std::fs::read_to_string(&path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let median = json["median"]["point_estimate"].as_f64()?;
    let age = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .unwrap_or_default();
    Some((median, age))
}

/// The floor's steps, in the order of the request path; the probe is `probe_1k` (the map in the
/// CPU's caches) or `probe_1m` (every probe a miss), and the sum is taken with each.
pub const FLOOR_STEPS: [&str; 5] = [
    "bearer_parse",
    "checksum",
    "sha256",
    "arc_clone",
    "extension_insert",
];

/// Prints what criterion's output holds for the floor, verify and peers groups, with the ratios
/// the targets are stated in. Each bench prints it at its end, so the last one of a `cargo bench`
/// run prints the whole picture; figures older than ten minutes are marked with their age.
pub fn summary() {
    let show = |group: &str, bench: &str| -> Option<f64> {
        let (ns, age) = median_ns(group, bench)?;
        let stale = if age > Duration::from_secs(600) {
            format!("   (from {} min ago)", age.as_secs() / 60)
        } else {
            String::new()
        };
        println!("  {:<36} {ns:>9.1} ns{stale}", format!("{group}/{bench}"));
        Some(ns)
    };
    let derived = |label: &str, value: String| println!("    {label:<34} {value}");
    println!("\n== summary (criterion medians) ==");
    let steps = FLOOR_STEPS
        .iter()
        .map(|s| show("floor", s))
        .sum::<Option<f64>>();
    let floor = |probe: &str| {
        let sum = steps.zip(show("floor", probe)).map(|(s, p)| s + p);
        if let Some(sum) = sum {
            derived(&format!("floor sum with {probe}"), format!("{sum:>9.1} ns"));
        }
        sum
    };
    let (floor_1k, floor_1m) = (floor("probe_1k"), floor("probe_1m"));
    let base = show("verify", "no_layer");
    for bench in [
        "hit_1",
        "hit_1k",
        "hit_1m",
        "hit_1m_hot",
        "negative_hit",
        "malformed",
    ] {
        let Some(ns) = show("verify", bench) else {
            continue;
        };
        let Some(base) = base else { continue };
        let own = ns - base;
        let (floor, target) = match bench {
            // Criterion's medians are per-step detail; the targets are judged on the interleaved
            // runner's ratios (BENCHMARKS.md).
            "hit_1k" | "hit_1m_hot" => (floor_1k, ""),
            "hit_1m" => (floor_1m, ""),
            _ => (None, ""),
        };
        let ratio = floor.map_or(String::new(), |sum| {
            format!(" = {:.2}× its floor", own / sum)
        });
        derived(
            &format!("{bench} − no_layer"),
            format!("{own:>9.1} ns{ratio}{target}"),
        );
    }
    let none = show("peers", "no_auth");
    show("peers", "tower_http_static_bearer");
    let pat = show("peers", "tower_pat");
    if let (Some(pat), Some(none)) = (pat, none) {
        derived("tower_pat − no_auth", format!("{:>9.1} ns", pat - none));
    }
    for store in ["memory", "sqlite", "postgres"] {
        let diy = show("peers", &format!("diy_{store}"));
        if let (Some(diy), Some(pat)) = (diy, pat) {
            let target = if store == "sqlite" {
                "   (target ≥ 20×)"
            } else {
                ""
            };
            derived(
                &format!("diy_{store} ÷ tower_pat"),
                format!("{:>9.1}×{target}", diy / pat),
            );
        }
    }
    // The rest of the peers; their ratios come from the interleaved runner.
    for peer in [
        "diy_moka_tower_http",
        "diy_moka_axum_from_fn",
        "axum_no_auth",
        "axum_tower_pat",
        "jwt_hs256_verify",
    ] {
        show("peers", peer);
    }
}

/// The peers of `benches/peers.rs` (criterion) and `benches/interleaved.rs` (the ratios): what
/// people write instead of tower-pat, defined once.
pub mod peers {
    use std::convert::Infallible;
    use std::future::ready;
    use std::sync::Arc;

    use http::{Request, Response, StatusCode, header};
    use sha2::{Digest, Sha256};
    use tower::{Layer, Service};
    use tower_pat::{TokenHash, TokenRecord, TokenSecret};

    /// The do-it-yourself cache: SHA-256 of the bearer token → the record, in moka's async cache.
    pub type DiyCache = moka::future::Cache<[u8; 32], Arc<TokenRecord>>;

    /// The SHA-256 of the request's bearer token.
    pub fn bearer_digest<B>(req: &Request<B>) -> Option<[u8; 32]> {
        let token = req
            .headers()
            .get(header::AUTHORIZATION)?
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")?;
        Some(Sha256::digest(token.as_bytes()).into())
    }

    /// A bare 401.
    pub fn unauthorized<B: Default>() -> Response<B> {
        let mut res = Response::new(B::default());
        *res.status_mut() = StatusCode::UNAUTHORIZED;
        res
    }

    /// A do-it-yourself cache holding a record for each of `secrets`, as its loader would have
    /// filled it.
    pub async fn diy_cache(secrets: &[TokenSecret]) -> DiyCache {
        let diy: DiyCache = moka::future::Cache::builder().max_capacity(100_000).build();
        for (n, s) in secrets.iter().enumerate() {
            let digest: [u8; 32] = Sha256::digest(s.expose_secret().as_bytes()).into();
            let record = super::record_for(TokenHash::from_bytes(digest), n as u64);
            diy.insert(digest, Arc::new(record)).await;
        }
        diy
    }

    /// The do-it-yourself layer in tower-http's form (`AsyncRequireAuthorizationLayer` with a
    /// closure: digest, cache lookup, expiry and revocation check, record into the extensions)
    /// in front of `inner`. Its future is not boxed, in the peer's favour.
    pub fn diy_moka_tower_http<S, T>(
        diy: DiyCache,
        inner: S,
    ) -> impl Service<Request<()>, Response = Response<T>, Error = Infallible> + Clone
    where
        S: Service<Request<()>, Response = Response<T>, Error = Infallible> + Clone,
        T: Default,
    {
        tower_http::auth::AsyncRequireAuthorizationLayer::new(move |mut req: Request<()>| {
            let diy = diy.clone();
            async move {
                let digest = bearer_digest(&req).ok_or_else(unauthorized)?;
                match diy.get(&digest).await {
                    Some(record) if record.is_active_at(chrono::Utc::now()) => {
                        req.extensions_mut().insert(record);
                        Ok(req)
                    }
                    _ => Err(unauthorized()),
                }
            }
        })
        .layer(inner)
    }

    /// The handler of the axum forms: an empty 200.
    pub fn pong_body() -> impl Service<
        Request<axum::body::Body>,
        Response = Response<axum::body::Body>,
        Error = Infallible,
        Future = std::future::Ready<Result<Response<axum::body::Body>, Infallible>>,
    > + Clone {
        tower::service_fn(|_req: Request<axum::body::Body>| {
            ready(Ok::<_, Infallible>(
                Response::new(axum::body::Body::empty()),
            ))
        })
    }

    /// The same do-it-yourself check as axum middleware (`axum::middleware::from_fn`), in front
    /// of [`pong_body`].
    pub fn diy_moka_axum_from_fn(
        diy: DiyCache,
    ) -> impl Service<
        Request<axum::body::Body>,
        Response = Response<axum::body::Body>,
        Error = Infallible,
        Future = impl Send,
    > + Clone {
        axum::middleware::from_fn(
            move |mut req: axum::extract::Request, next: axum::middleware::Next| {
                let diy = diy.clone();
                async move {
                    let Some(digest) = bearer_digest(&req) else {
                        return unauthorized();
                    };
                    match diy.get(&digest).await {
                        Some(record) if record.is_active_at(chrono::Utc::now()) => {
                            req.extensions_mut().insert(record);
                            next.run(req).await
                        }
                        _ => unauthorized(),
                    }
                }
            },
        )
        .layer(pong_body())
    }

    /// An HS256 JWT (175 bytes, four claims) and what verifies it: `jsonwebtoken`'s signature
    /// and `exp` check, the claims decoded to JSON.
    pub struct Jwt {
        pub token: String,
        key: jsonwebtoken::DecodingKey,
        validation: jsonwebtoken::Validation,
    }

    impl Jwt {
        pub fn new() -> Self {
            const SECRET: &[u8] = b"a secret of thirty-two bytes....";
            let claims = serde_json::json!({
                "sub": "user-1", "iat": 1_700_000_000u64, "exp": 4_100_000_000u64,
                "scope": "repo:read"
            });
            let token = jsonwebtoken::encode(
                &jsonwebtoken::Header::default(),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(SECRET),
            )
            .expect("a JWT");
            Self {
                token,
                key: jsonwebtoken::DecodingKey::from_secret(SECRET),
                validation: jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256),
            }
        }

        /// Verifies the token and decodes its claims.
        pub fn verify(&self) -> serde_json::Value {
            jsonwebtoken::decode::<serde_json::Value>(&self.token, &self.key, &self.validation)
                .expect("a valid JWT")
                .claims
        }
    }
}
