//! The layer's own work on a request: header in, principal in the extensions (or the error response
//! out), with `PatAuth::call` invoked directly on a ready trivial service so that nothing but the
//! layer is timed.
//!
//! - `hit_1`, `hit_1k`, `hit_1m`: cache hits with 1, 1 000 and 1 000 000 tokens cached, the
//!   requests going to each token in turn (see [`common::spread`]): with a million, every probe
//!   misses the CPU caches, as with traffic spread over all the tokens;
//! - `hit_1m_hot`: a million cached, the requests going to a thousand of them;
//! - `negative_hit`: a well-formed token the store does not know, remembered as unknown;
//! - `malformed`: a token whose checksum does not match, refused before the cache;
//! - `no_layer`: the same calls on the trivial service alone, to subtract: the layer's own cost is
//!   `hit_* − no_layer`.
//!
//! `cargo bench --bench verify`

mod common;

use criterion::{BenchmarkGroup, Criterion, measurement::WallTime};
use http::{HeaderValue, StatusCode};
use tower::{Layer, Service};
use tower_pat::{AuthError, PatAuthLayer};

fn bench_requests(
    g: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    layer: &PatAuthLayer,
    headers: &[HeaderValue],
    expect: StatusCode,
) {
    // Once untimed: the right outcome, and a warm cache.
    let mut check = layer.layer(common::needs_principal());
    for h in headers {
        let res = common::poll_now(check.call(common::request(h))).expect("infallible");
        assert_eq!(res.status(), expect, "{name}");
    }
    bench_calls(g, name, layer.layer(common::echo()), headers);
}

/// Times `poll_ready`, `call` and one poll of the response future, the request built untimed.
fn bench_calls<S>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    mut svc: S,
    headers: &[HeaderValue],
) where
    S: Service<http::Request<()>>,
    S::Error: std::fmt::Debug,
{
    let mut i = 0;
    g.bench_function(name, |b| {
        b.iter_batched(
            || {
                i = (i + 1) % headers.len();
                common::request(&headers[i])
            },
            |req| {
                common::poll_now(std::future::poll_fn(|cx| svc.poll_ready(cx)))
                    .expect("a ready service");
                common::poll_now(svc.call(req))
            },
            common::BATCH,
        )
    });
}

fn verify(c: &mut Criterion) {
    let rt = common::runtime();
    let sizes: &[(&str, usize)] = if common::full_run() {
        &[("hit_1", 1), ("hit_1k", 1_000), ("hit_1m", 1_000_000)]
    } else {
        &[("hit_1", 1), ("hit_1k", 1_000)]
    };
    let mut g = c.benchmark_group("verify");
    if common::selected("verify", "no_layer") {
        // The same calls on the trivial service alone: what the harness costs without the layer.
        let headers = [common::bearer(common::unknown_token().expose_secret())];
        bench_calls(&mut g, "no_layer", common::echo(), &headers);
    }
    for &(name, n) in sizes {
        let extra = match n {
            1_000 => ["negative_hit", "malformed"]
                .iter()
                .any(|b| common::selected("verify", b)),
            1_000_000 => common::selected("verify", "hit_1m_hot"),
            _ => false,
        };
        if !common::selected("verify", name) && !extra {
            continue;
        }
        let started = std::time::Instant::now();
        let (store, secrets) = common::ManyTokens::issue(n);
        let layer = common::layer(store);
        rt.block_on(common::fill(&layer, &secrets));
        assert_eq!(layer.cached_tokens(), n);
        eprintln!(
            "{name}: {n} tokens issued and cached in {:.1?}",
            started.elapsed()
        );
        let headers = common::spread(&secrets);
        drop(secrets);
        bench_requests(&mut g, name, &layer, &headers, StatusCode::OK);
        if n == 1_000_000 {
            // The same million cached, the requests going to a thousand of them: a working set
            // that fits the CPU's caches, as when a few clients make most of the traffic.
            let hot = &headers[..1_000];
            bench_requests(&mut g, "hit_1m_hot", &layer, hot, StatusCode::OK);
        }
        if n == 1_000 {
            let unknown = common::unknown_token();
            let err = rt.block_on(layer.verify(
                unknown.expose_secret(),
                None,
                &tower_pat::ScopeSet::empty(),
            ));
            assert_eq!(err.err(), Some(AuthError::InvalidToken));
            let lookups = layer.store_lookups();
            let negative = [common::bearer(unknown.expose_secret())];
            bench_requests(
                &mut g,
                "negative_hit",
                &layer,
                &negative,
                StatusCode::UNAUTHORIZED,
            );
            assert_eq!(layer.store_lookups(), lookups, "served from the cache");
            let malformed = [common::bearer(&common::malformed_token())];
            bench_requests(
                &mut g,
                "malformed",
                &layer,
                &malformed,
                StatusCode::UNAUTHORIZED,
            );
        }
    }
    g.finish();
}

fn main() {
    common::run(verify);
}
