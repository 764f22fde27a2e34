//! tower-pat against what people use instead, in one run, every one wrapping the same trivial
//! handler and called through `tower::ServiceExt::oneshot`:
//!
//! - `no_auth`: the handler alone;
//! - `tower_http_static_bearer`: tower-http's `ValidateRequestHeaderLayer::bearer`, one static token
//!   compared per request: the best-known baseline, with none of the features;
//! - `diy_<store>`: the do-it-yourself approach, tower-http's `AsyncRequireAuthorizationLayer` with a
//!   closure that hashes the bearer token (SHA-256) and asks the store on every request;
//! - `diy_moka_tower_http`, `diy_moka_axum_from_fn`: the same with a moka cache of the records in
//!   front of the store (hit), in tower-http's form and as axum middleware;
//! - `tower_pat`: `PatAuthLayer` on a cache hit; `axum_no_auth` and `axum_tower_pat`, the handler
//!   alone and behind the layer with axum's body type, for the axum form;
//! - `jwt_hs256_verify`: `jsonwebtoken` verifying a 175-byte HS256 JWT, alone.
//!
//! The ratios between them are taken from `benches/interleaved.rs` (same peers, rounds in one
//! process); these are criterion's per-peer detail.
//!
//! `cargo bench --bench peers` (SQLite is a default feature; PostgreSQL with `--features postgres`
//! and `DATABASE_URL` set, in a throwaway database).

mod common;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use chrono::Utc;
use criterion::{BenchmarkGroup, Criterion, measurement::WallTime};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use sha2::{Digest, Sha256};
use tower::{Layer, Service, ServiceExt};
use tower_http::auth::AsyncRequireAuthorizationLayer;
use tower_http::validate_request::ValidateRequestHeaderLayer;
use tower_pat::{MemoryStore, NewToken, ScopeSet, TokenHash, TokenLookup, TokenSecret, TokenStore};

/// Tokens in each store, so that its index is not trivially small.
const TOKENS: usize = 1_000;

#[cfg(feature = "postgres")]
#[allow(dead_code, unreachable_pub)]
#[path = "../tests/common/pg.rs"]
mod pg;

/// The stores the do-it-yourself peer queries, and what removes their data afterwards. A store is
/// a few lines here.
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(unused_mut))]
async fn stores() -> (Vec<(&'static str, Arc<dyn TokenStore>)>, Cleanup) {
    let mut stores: Vec<(&'static str, Arc<dyn TokenStore>)> =
        vec![("memory", Arc::new(MemoryStore::new()))];
    let mut cleanup = Cleanup::default();
    #[cfg(feature = "sqlite")]
    {
        let path = std::env::temp_dir().join(format!("tower-pat-bench-{}.db", std::process::id()));
        let store = tower_pat::SqliteStore::open(&path)
            .await
            .expect("SQLite store");
        cleanup.files.push(path);
        stores.push(("sqlite", Arc::new(store)));
    }
    #[cfg(feature = "postgres")]
    if let Some(db) = pg::TestDb::create("peers/diy_postgres").await {
        let store = tower_pat::PostgresStore::builder()
            .connect_with(db.options.clone())
            .await
            .expect("PostgreSQL store");
        cleanup.databases.push(db);
        stores.push(("postgres", Arc::new(store)));
    }
    (stores, cleanup)
}

/// Removes the benches' SQLite files and PostgreSQL databases when dropped.
#[derive(Default)]
struct Cleanup {
    files: Vec<std::path::PathBuf>,
    #[cfg(feature = "postgres")]
    databases: Vec<pg::TestDb>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for path in &self.files {
            for suffix in ["", "-wal", "-shm"] {
                let mut file = path.clone().into_os_string();
                file.push(suffix);
                let _ = std::fs::remove_file(file);
            }
        }
    }
}

/// Fills a store with [`TOKENS`] tokens and returns the secret of one of them.
async fn populate(store: &dyn TokenStore) -> TokenSecret {
    let tokens = tower_pat::Tokens::new(MemoryStore::new());
    let scopes = ScopeSet::parse(["repo:read", "repo:write"]).expect("valid scopes");
    let mut last = None;
    for i in 0..TOKENS {
        let new = NewToken::new(format!("user-{}", i % 100), format!("token {i}"))
            .scope_set(scopes.clone());
        let (record, secret) = tokens.mint(new, Utc::now());
        store.insert(&record).await.expect("insert");
        last = Some(secret);
    }
    last.expect("at least one token")
}

fn unauthorized() -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::default());
    *res.status_mut() = StatusCode::UNAUTHORIZED;
    res
}

/// What people write today: hash the bearer token and ask the store, on every request. The
/// closure's future is not boxed (tower-http's own example boxes it), in the peer's favour.
fn diy<S>(
    store: Arc<dyn TokenLookup>,
    inner: S,
) -> impl Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible> + Clone
where
    S: Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible> + Clone,
{
    AsyncRequireAuthorizationLayer::new(move |mut req: Request<()>| {
        let store = Arc::clone(&store);
        async move {
            let token = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or_else(unauthorized)?;
            let hash = TokenHash::from_bytes(Sha256::digest(token.as_bytes()).into());
            match store.find_by_hash(&hash).await {
                Ok(Some(record)) if record.is_active_at(Utc::now()) => {
                    req.extensions_mut().insert(record);
                    Ok(req)
                }
                _ => Err(unauthorized()),
            }
        }
    })
    .layer(inner)
}

fn bench_service<S, B>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    rt: &tokio::runtime::Runtime,
    name: &str,
    svc: S,
    auth: &HeaderValue,
) where
    S: Service<Request<()>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
{
    bench_requests(g, rt, name, svc, || common::request(auth));
}

/// [`bench_service`] for any request body: `make` builds each request (untimed).
fn bench_requests<S, ReqB, B>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    rt: &tokio::runtime::Runtime,
    name: &str,
    svc: S,
    make: impl Fn() -> Request<ReqB>,
) where
    S: Service<Request<ReqB>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
{
    let res = rt
        .block_on(svc.clone().oneshot(make()))
        .expect("a response");
    assert_eq!(res.status(), StatusCode::OK, "{name}");
    g.bench_function(name, |b| {
        b.to_async(rt)
            .iter_batched(&make, |req| svc.clone().oneshot(req), common::BATCH)
    });
}

fn peers(c: &mut Criterion) {
    let rt = common::runtime();
    let mut g = c.benchmark_group("peers");
    let (stores, cleanup) = rt.block_on(stores());
    let mut secrets = Vec::new();
    for (_, store) in &stores {
        secrets.push(rt.block_on(populate(&**store)));
    }
    let (_, memory) = &stores[0];
    let auth = common::bearer(secrets[0].expose_secret());

    bench_service(&mut g, &rt, "no_auth", common::pong(), &auth);

    #[allow(deprecated)] // "too basic to be useful in real applications": the point of comparing.
    let static_bearer = ValidateRequestHeaderLayer::bearer(secrets[0].expose_secret());
    bench_service(
        &mut g,
        &rt,
        "tower_http_static_bearer",
        static_bearer.layer(common::pong()),
        &auth,
    );

    for ((name, store), secret) in stores.iter().zip(&secrets) {
        let lookup: Arc<dyn TokenLookup> = Arc::clone(store) as Arc<dyn TokenLookup>;
        let svc = diy(lookup, common::pong());
        let auth = common::bearer(secret.expose_secret());
        bench_service(&mut g, &rt, &format!("diy_{name}"), svc, &auth);
    }

    let diy = rt.block_on(common::peers::diy_cache(std::slice::from_ref(&secrets[0])));
    let moka = common::peers::diy_moka_tower_http(diy.clone(), common::pong());
    bench_service(&mut g, &rt, "diy_moka_tower_http", moka, &auth);
    let axum_request = || {
        let (parts, ()) = common::request(&auth).into_parts();
        Request::from_parts(parts, axum::body::Body::empty())
    };
    let moka_axum = common::peers::diy_moka_axum_from_fn(diy);
    bench_requests(
        &mut g,
        &rt,
        "diy_moka_axum_from_fn",
        moka_axum,
        axum_request,
    );

    let layer = common::layer(Arc::clone(memory) as Arc<dyn TokenLookup>);
    bench_service(&mut g, &rt, "tower_pat", layer.layer(common::pong()), &auth);
    let pong_body = common::peers::pong_body;
    bench_requests(&mut g, &rt, "axum_no_auth", pong_body(), axum_request);
    let axum_pat = layer.layer(pong_body());
    bench_requests(&mut g, &rt, "axum_tower_pat", axum_pat, axum_request);

    let jwt = common::peers::Jwt::new();
    g.bench_function("jwt_hs256_verify", |b| b.iter(|| jwt.verify()));
    g.finish();
    drop(stores);
    drop(cleanup);
}

fn main() {
    common::run(peers);
}
