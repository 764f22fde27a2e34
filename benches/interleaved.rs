//! The source of the ratios in BENCHMARKS.md: every variant measured in the same process, in
//! rounds, the order rotated every round, so that what the machine does meanwhile (other builds,
//! frequency changes) falls on all of them alike. Each round runs each variant for `CALLS` calls
//! and records its ns per call; a ratio is taken per round and reported as the median of the
//! rounds with the 10th and 90th percentiles. `scripts/bench.sh` runs it in several processes.
//!
//! Sets (a filter argument keeps only the sets whose name contains it):
//!
//! - `hit`: the layer's cache hit with 1 000 tokens cached (`PatAuth::call` on a ready trivial
//!   service, one poll), the trivial service alone (`no_layer`), and each step of a hit alone: the
//!   bearer parse, the keyed PRF, a probe of a 1 000-entry map with the `Arc` clone, the clock,
//!   the extension insert. The layer's own work is `layer_hit_1k − no_layer`.
//! - `prf`: the cache key candidates on a 42-character token: SipHash-1-3-128, SipHash-2-4-128,
//!   AES-128-CMAC (AES-NI when the CPU has it), and SHA-256 (the store's hash).
//! - `peers`: the same trivial handler behind tower-http's static bearer, a competent
//!   do-it-yourself layer (moka `future::Cache` keyed by SHA-256 in tower-http's
//!   `AsyncRequireAuthorizationLayer`, and the same in axum's `middleware::from_fn`), and
//!   tower-pat, all driven the same way (one `block_on` per round); and `jsonwebtoken`'s HS256
//!   verification of a 171-byte JWT alone.
//! - `contention`: two threads authenticating with one hot token against two threads on two
//!   different tokens; per-thread calls per second.
//! - `spread_1m` (only with `SPREAD_1M=1`: filling a million entries takes a while): hits spread
//!   over 1 000 000 cached tokens against a bare probe of a 1 000 000-entry map, the same keys in
//!   the same order.
//!
//! `cargo bench --bench interleaved` (`ROUNDS`, default 60, and `CALLS`, default 10 000); under
//! `cargo test` it runs 3 rounds of 200 calls as a smoke test.

mod common;

use std::hash::Hasher;
use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;
use http::{HeaderValue, Request, StatusCode, header};
use sha2::{Digest, Sha256};
use tower::{Layer, Service, ServiceExt};
use tower_pat::{PatAuthLayer, TokenSecret};

/// One variant: runs its operation `n` times and returns the nanoseconds per call.
type Variant = Box<dyn FnMut(usize) -> f64>;

struct Settings {
    rounds: usize,
    calls: usize,
    filter: Option<String>,
}

impl Settings {
    fn from_env() -> Self {
        let full = common::full_run();
        let env = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let filter = std::env::args()
            .skip(1)
            .find(|a| !a.starts_with('-'))
            .filter(|a| !a.is_empty());
        Self {
            rounds: if full { env("ROUNDS", 60) } else { 3 },
            calls: if full { env("CALLS", 10_000) } else { 200 },
            filter,
        }
    }

    fn wants(&self, set: &str) -> bool {
        self.filter.as_deref().is_none_or(|f| set.contains(f))
    }
}

/// Runs `variants` in rotated rounds; returns each one's ns per call, one value per round.
///
/// With `ONLY=<name>` in the environment it runs just that variant, once, for `CALLS` calls and
/// returns `None`: what `scripts/callgrind.sh` counts instructions of.
#[inline(never)] // `scripts/callgrind.sh` counts what runs inside it
fn rounds(settings: &Settings, variants: &mut [(&'static str, Variant)]) -> Option<Vec<Vec<f64>>> {
    if let Ok(only) = std::env::var("ONLY") {
        for (name, v) in variants.iter_mut() {
            if *name == only {
                v(settings.calls);
            }
        }
        return None;
    }
    let n = variants.len();
    let mut out = vec![Vec::with_capacity(settings.rounds); n];
    // One untimed round first: caches, branch predictors, lazy initialisation.
    for (_, v) in variants.iter_mut() {
        v(settings.calls.min(1_000));
    }
    for round in 0..settings.rounds {
        for k in 0..n {
            let i = (round + k) % n;
            out[i].push((variants[i].1)(settings.calls));
        }
    }
    Some(out)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Median with 10th and 90th percentiles, as `m (p10–p90)`.
fn spread(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    (
        percentile(&v, 0.5),
        percentile(&v, 0.1),
        percentile(&v, 0.9),
    )
}

fn show(name: &str, values: &[f64], unit: &str) {
    let (m, lo, hi) = spread(values);
    // Ratios to two decimals: a target such as 1.15× is judged on them.
    let d = if unit == "×" { 2 } else { 1 };
    println!("  {name:<34} {m:>10.d$} {unit}  ({lo:.d$} to {hi:.d$})");
}

/// Per-round values of `f(round)`: ratios and differences taken within a round.
fn per_round(rounds: usize, f: impl Fn(usize) -> f64) -> Vec<f64> {
    (0..rounds).map(f).collect()
}

/// How many inputs are prepared at a time: a batch of requests stays in the CPU's caches (10 000
/// requests of ~250 bytes would not, and moving them would be what is timed).
const BATCH: usize = 128;

/// Times `n` calls of `op` on inputs prepared untimed, a batch at a time; the outputs are dropped
/// after the clock stops.
fn timed<I, O>(mut inputs: impl FnMut(usize) -> I, n: usize, mut op: impl FnMut(I) -> O) -> f64 {
    let mut batch: Vec<I> = Vec::with_capacity(BATCH);
    let mut outputs: Vec<O> = Vec::with_capacity(BATCH);
    let mut elapsed = std::time::Duration::ZERO;
    let mut done = 0;
    while done < n {
        let size = BATCH.min(n - done);
        batch.extend((done..done + size).map(&mut inputs));
        let start = Instant::now();
        for input in batch.drain(..) {
            outputs.push(op(input));
        }
        elapsed += start.elapsed();
        outputs.clear();
        done += size;
    }
    elapsed.as_nanos() as f64 / n as f64
}

/// A request whose `Authorization` value is a fresh copy, as a server that just parsed it holds
/// it: in the CPU's caches, wherever the original lies among a million others.
fn fresh(auth: &HeaderValue) -> Request<()> {
    common::request(&HeaderValue::from_bytes(auth.as_bytes()).expect("a header value"))
}

/// The same calls as [`layer_calls`] on `echo` alone: the harness, subtracted from a hit.
fn no_layer_calls(headers: Vec<HeaderValue>) -> Variant {
    calls(common::echo(), headers)
}

/// `PatAuth::call` on a ready `echo` service, one poll: what `benches/verify.rs` times.
fn layer_calls(layer: &PatAuthLayer, headers: Vec<HeaderValue>) -> Variant {
    let mut check = layer.layer(common::needs_principal());
    for h in &headers {
        let res = common::poll_now(check.call(common::request(h))).expect("infallible");
        assert_eq!(res.status(), StatusCode::OK, "every header authenticates");
    }
    calls(layer.layer(common::echo()), headers)
}

/// One ready check and one call of `svc` per request, polled once, the requests going to
/// `headers` in turn: the loop both variants above time.
fn calls<S>(mut svc: S, headers: Vec<HeaderValue>) -> Variant
where
    S: Service<Request<()>> + 'static,
    S::Error: std::fmt::Debug,
{
    Box::new(move |n| {
        timed(
            |i| fresh(&headers[i % headers.len()]),
            n,
            |req| {
                common::poll_now(std::future::poll_fn(|cx| svc.poll_ready(cx))).expect("ready");
                common::poll_now(svc.call(req))
            },
        )
    })
}

fn issue(rt: &tokio::runtime::Runtime, n: usize) -> (PatAuthLayer, Vec<TokenSecret>) {
    let (store, secrets) = common::ManyTokens::issue(n);
    let layer = common::layer(store);
    rt.block_on(common::fill(&layer, &secrets));
    (layer, secrets)
}

/// The SipHash key of the runner's own maps and PRF steps (the layer draws its own).
const KEY: (u64, u64) = (0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210);

/// The slot of each `Bearer` header's token under [`KEY`], as the bare probes key their maps.
fn slots_of(headers: &[HeaderValue]) -> Vec<u128> {
    headers
        .iter()
        .map(|h| {
            sip24(
                KEY,
                &h.to_str().expect("a token is text")["Bearer ".len()..],
            )
        })
        .collect()
}

/// SipHash-2-4-128 in one pass, as the layer computes a slot.
fn sip24(k: (u64, u64), token: &str) -> u128 {
    siphasher::sip128::SipHasher24::new_with_keys(k.0, k.1)
        .hash(token.as_bytes())
        .as_u128()
}

/// SipHash-1-3-128 in one pass.
fn sip13(k: (u64, u64), token: &str) -> u128 {
    siphasher::sip128::SipHasher13::new_with_keys(k.0, k.1)
        .hash(token.as_bytes())
        .as_u128()
}

/// AES-128-CMAC (RFC 4493) as a cache key would compute it: the key schedule and subkeys made
/// once, one AES block encryption per 16 bytes, the chaining value xored as one vector. The
/// `cmac` crate's `Cmac` copies its cipher state per message (a clone) or rebuilds its buffers (a
/// reset): measured that way, AES-CMAC looked three to six times slower than it is here. Checked
/// against the crate at setup.
struct Cmac {
    cipher: aes::Aes128Enc,
    k1: [u8; 16],
    k2: [u8; 16],
}

impl Cmac {
    fn new(key: [u8; 16]) -> Self {
        use aes::cipher::KeyInit;
        let cipher = aes::Aes128Enc::new(&key.into());
        let l = Self::encrypt(&cipher, [0; 16]);
        let double = |b: [u8; 16]| {
            let v = u128::from_be_bytes(b);
            ((v << 1) ^ if v >> 127 == 1 { 0x87 } else { 0 }).to_be_bytes()
        };
        let (k1, k2) = (double(l), double(double(l)));
        Self { cipher, k1, k2 }
    }

    fn encrypt(cipher: &aes::Aes128Enc, block: [u8; 16]) -> [u8; 16] {
        use aes::cipher::BlockEncrypt;
        let mut block = aes::Block::from(block);
        cipher.encrypt_block(&mut block);
        block.into()
    }

    fn tag(&self, message: &[u8]) -> u128 {
        let xor = |a: [u8; 16], b: [u8; 16]| -> [u8; 16] { std::array::from_fn(|i| a[i] ^ b[i]) };
        let last_len = match message.len() % 16 {
            0 if !message.is_empty() => 16,
            n => n,
        };
        let (blocks, last) = message.split_at(message.len() - last_len);
        let mut x = [0u8; 16];
        for block in blocks.chunks_exact(16) {
            x = Self::encrypt(&self.cipher, xor(x, block.try_into().expect("16 bytes")));
        }
        let mut padded = [0u8; 16];
        padded[..last.len()].copy_from_slice(last);
        let subkey = if last.len() == 16 {
            self.k1
        } else {
            padded[last.len()] = 0x80;
            self.k2
        };
        u128::from_le_bytes(Self::encrypt(&self.cipher, xor(xor(x, padded), subkey)))
    }
}

/// The identity hash of a uniformly random key, as the cache uses.
#[derive(Default, Clone)]
struct Identity(u64);

impl Hasher for Identity {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes.iter().take(8) {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type SlotMap<V> = DashMap<u128, Arc<V>, std::hash::BuildHasherDefault<Identity>>;

/// An entry of the size the cache's is, for the bare probes; `next` chains the 1M probes.
struct Payload {
    expires_ms: i64,
    next: u128,
    _rest: [u8; 200],
}

#[cfg(target_os = "linux")]
fn coarse_ms() -> i64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
    t.tv_sec * 1_000 + t.tv_nsec / 1_000_000
}

#[cfg(not(target_os = "linux"))]
fn coarse_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The steps of a hit that do not touch the map, each alone, on the tokens of `headers`: the
/// bearer parse, the PRF, the clock, the extension insert.
fn unmapped_steps(headers: &[HeaderValue]) -> Vec<(&'static str, Variant)> {
    let tokens: Arc<Vec<String>> = Arc::new(
        headers
            .iter()
            .map(|h| h.to_str().unwrap()["Bearer ".len()..].to_owned())
            .collect(),
    );
    let h3 = headers.to_vec();
    vec![
        (
            "step_bearer_parse",
            Box::new(move |n| {
                timed(
                    |i| fresh(&h3[i % h3.len()]),
                    n,
                    // The header's bytes after the scheme: a hit needs no more of them.
                    |req| {
                        let len = req
                            .headers()
                            .get(header::AUTHORIZATION)
                            .and_then(|v| v.as_bytes().get(7..))
                            .map_or(0, <[u8]>::len);
                        (req, len)
                    },
                )
            }),
        ),
        (
            "step_prf_sip24",
            Box::new(move |n| timed(|i| &tokens[i % tokens.len()], n, |t| sip24(KEY, t))),
        ),
        (
            "step_clock",
            Box::new(|n| timed(|_| (), n, |()| coarse_ms())),
        ),
        (
            "step_extension_insert",
            Box::new(move |n| {
                let value = Arc::new(0u64);
                timed(
                    |_| (Request::new(()), Arc::clone(&value)),
                    n,
                    |(mut req, v)| {
                        req.extensions_mut().insert(v);
                        req
                    },
                )
            }),
        ),
    ]
}

fn hit_set(settings: &Settings, rt: &tokio::runtime::Runtime) {
    let (layer, secrets) = issue(rt, 1_000);
    let headers = common::spread(&secrets);
    let map: Arc<SlotMap<Payload>> = Arc::new(DashMap::default());
    let slots = slots_of(&headers);
    for slot in &slots {
        let p = Payload {
            expires_ms: i64::MAX,
            next: 0,
            _rest: [0; 200],
        };
        map.insert(*slot, Arc::new(p));
    }
    let mut variants: Vec<(&'static str, Variant)> = vec![
        ("layer_hit_1k", layer_calls(&layer, headers.clone())),
        ("no_layer", no_layer_calls(headers.clone())),
        ("step_probe_1k_arc", {
            let map = Arc::clone(&map);
            Box::new(move |n| {
                timed(
                    |i| slots[i % slots.len()],
                    n,
                    |s| map.get(&s).map(|e| Arc::clone(e.value())),
                )
            })
        }),
    ];
    // Indices 3 to 6.
    variants.extend(unmapped_steps(&headers));
    // One token over and over: after 16 hits this thread serves it from its hot replica.
    variants.push((
        "layer_hit_one_token",
        layer_calls(&layer, headers[..1].to_vec()),
    ));
    let Some(r) = rounds(settings, &mut variants) else {
        return;
    };
    println!("== hit: 1 000 tokens cached, ns per call");
    for ((name, _), values) in variants.iter().zip(&r) {
        show(name, values, "ns");
    }
    let own = per_round(settings.rounds, |i| r[0][i] - r[1][i]);
    let steps = per_round(settings.rounds, |i| (2..7).map(|v| r[v][i]).sum());
    show("layer's own work (hit − no_layer)", &own, "ns");
    show("sum of the steps alone", &steps, "ns");
    show(
        "own work ÷ sum of steps",
        &per_round(settings.rounds, |i| own[i] / steps[i]),
        "×",
    );
    show(
        "one token's own work (hot replica)",
        &per_round(settings.rounds, |i| r[7][i] - r[1][i]),
        "ns",
    );
}

fn prf_set(settings: &Settings) {
    use aes::cipher::KeyInit;
    use cmac::Mac;
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..4_096)
            .map(|_| {
                tower_pat::TokenFormat::new()
                    .generate()
                    .expose_secret()
                    .to_owned()
            })
            .collect(),
    );
    let cmac = Cmac::new([7; 16]);
    for len in 0..=64 {
        let message: Vec<u8> = (0..len).collect();
        let mut theirs =
            <cmac::Cmac<aes::Aes128> as KeyInit>::new_from_slice(&[7; 16]).expect("a key");
        theirs.update(&message);
        let expected = u128::from_le_bytes(theirs.finalize().into_bytes().into());
        assert_eq!(cmac.tag(&message), expected, "CMAC of {len} bytes");
    }
    let (t1, t2, t3, t4) = (
        Arc::clone(&tokens),
        Arc::clone(&tokens),
        Arc::clone(&tokens),
        Arc::clone(&tokens),
    );
    let mut variants: Vec<(&'static str, Variant)> = vec![
        (
            "siphash_1_3_128",
            Box::new(move |n| timed(|i| &t1[i % t1.len()], n, |t| sip13(KEY, t))),
        ),
        (
            "siphash_2_4_128",
            Box::new(move |n| timed(|i| &t2[i % t2.len()], n, |t| sip24(KEY, t))),
        ),
        (
            "aes_128_cmac",
            Box::new(move |n| timed(|i| &t3[i % t3.len()], n, |t| cmac.tag(t.as_bytes()))),
        ),
        (
            "sha256",
            Box::new(move |n| {
                timed(
                    |i| &t4[i % t4.len()],
                    n,
                    |t| <[u8; 32]>::from(Sha256::digest(t.as_bytes())),
                )
            }),
        ),
    ];
    let Some(r) = rounds(settings, &mut variants) else {
        return;
    };
    println!("== prf: the cache key of a 42-character token, ns per call");
    for ((name, _), values) in variants.iter().zip(&r) {
        show(name, values, "ns");
    }
}

/// `n` requests through `svc` inside one `block_on`: ready, call, await.
fn driven<S, B>(
    rt: Arc<tokio::runtime::Runtime>,
    mut svc: S,
    make: impl Fn(usize) -> Request<B> + 'static,
) -> Variant
where
    S: Service<Request<B>> + 'static,
    S::Error: std::fmt::Debug,
    S::Response: 'static,
    B: 'static,
{
    Box::new(move |n| {
        let mut elapsed = std::time::Duration::ZERO;
        let mut outputs = Vec::with_capacity(BATCH);
        let mut done = 0;
        while done < n {
            let size = BATCH.min(n - done);
            let requests: Vec<Request<B>> = (done..done + size).map(&make).collect();
            let start = Instant::now();
            rt.block_on(async {
                for req in requests {
                    let svc = svc.ready().await.expect("ready");
                    outputs.push(svc.call(req).await.expect("a response"));
                }
            });
            elapsed += start.elapsed();
            outputs.clear();
            done += size;
        }
        elapsed.as_nanos() as f64 / n as f64
    })
}

fn peers_set(settings: &Settings) {
    use tower_http::validate_request::ValidateRequestHeaderLayer;
    let rt = Arc::new(common::runtime());
    let (layer, secrets) = issue(&rt, 1_000);
    let headers: Arc<Vec<HeaderValue>> = Arc::new(common::spread(&secrets));
    let diy = rt.block_on(common::peers::diy_cache(&secrets));
    let req = {
        let headers = Arc::clone(&headers);
        move |i: usize| common::request(&headers[i % headers.len()])
    };
    let body_req = {
        let headers = Arc::clone(&headers);
        move |i: usize| {
            let (parts, ()) = common::request(&headers[i % headers.len()]).into_parts();
            Request::from_parts(parts, axum::body::Body::empty())
        }
    };
    let pong_body = common::peers::pong_body;
    #[allow(deprecated)] // "too basic to be useful in real applications": the point of comparing.
    let static_bearer = ValidateRequestHeaderLayer::bearer(secrets[0].expose_secret());
    let diy_tower = common::peers::diy_moka_tower_http(diy.clone(), common::pong());
    let diy_axum = common::peers::diy_moka_axum_from_fn(diy);
    let jwt = common::peers::Jwt::new();
    let jwt_len = jwt.token.len();
    let mut variants: Vec<(&'static str, Variant)> = vec![
        (
            "no_auth",
            driven(Arc::clone(&rt), common::pong(), req.clone()),
        ),
        (
            "tower_http_static_bearer",
            driven(Arc::clone(&rt), static_bearer.layer(common::pong()), {
                let secret = common::bearer(secrets[0].expose_secret());
                move |_| common::request(&secret)
            }),
        ),
        (
            "diy_moka_tower_http",
            driven(Arc::clone(&rt), diy_tower.clone(), req.clone()),
        ),
        (
            "tower_pat",
            driven(Arc::clone(&rt), layer.layer(common::pong()), req.clone()),
        ),
        (
            "axum_no_auth",
            driven(Arc::clone(&rt), pong_body(), body_req.clone()),
        ),
        (
            "diy_moka_axum_from_fn",
            driven(Arc::clone(&rt), diy_axum, body_req.clone()),
        ),
        (
            "axum_tower_pat",
            driven(Arc::clone(&rt), layer.layer(pong_body()), body_req.clone()),
        ),
        (
            "jwt_hs256_verify",
            Box::new(move |n| timed(|_| (), n, |()| jwt.verify())),
        ),
    ];
    // Every variant answers 200 with this input (untimed).
    let res = rt
        .block_on(diy_tower.oneshot(common::request(&headers[0])))
        .expect("a response");
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "the do-it-yourself layer admits"
    );
    let Some(r) = rounds(settings, &mut variants) else {
        return;
    };
    println!("== peers: ns per request (the JWT is {jwt_len} bytes)");
    for ((name, _), values) in variants.iter().zip(&r) {
        show(name, values, "ns");
    }
    let r = &r;
    let over = |v: usize, base: usize| per_round(settings.rounds, move |i| r[v][i] - r[base][i]);
    let pat = over(3, 0);
    let ratio = |a: &[f64], b: &[f64]| per_round(settings.rounds, |i| a[i] / b[i]);
    show("tower-pat over no_auth", &pat, "ns");
    show(
        "diy (tower-http) ÷ tower-pat, over no_auth",
        &ratio(&over(2, 0), &pat),
        "×",
    );
    let axum_pat = over(6, 4);
    show("tower-pat over axum_no_auth", &axum_pat, "ns");
    show(
        "diy (axum from_fn) ÷ tower-pat, over no_auth",
        &ratio(&over(5, 4), &axum_pat),
        "×",
    );
    show("jwt HS256 ÷ tower-pat", &ratio(&r[7], &pat), "×");
}

fn contention_set(settings: &Settings, rt: &tokio::runtime::Runtime) {
    let (layer, secrets) = issue(rt, 2);
    let headers = common::spread(&secrets);
    let run = |shared: bool| -> [f64; 2] {
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let calls = settings.calls;
        let per_thread: Vec<f64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|t| {
                    let header = if shared {
                        headers[0].clone()
                    } else {
                        headers[t].clone()
                    };
                    let mut svc = layer.layer(common::echo());
                    let barrier = Arc::clone(&barrier);
                    s.spawn(move || {
                        barrier.wait();
                        let ns = timed(
                            |_| common::request(&header),
                            calls,
                            |req| {
                                common::poll_now(std::future::poll_fn(|cx| svc.poll_ready(cx)))
                                    .expect("ready");
                                common::poll_now(svc.call(req))
                            },
                        );
                        1e3 / ns
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a thread"))
                .collect()
        });
        [per_thread[0], per_thread[1]]
    };
    let mut hot = Vec::new();
    let mut apart = Vec::new();
    run(true);
    for round in 0..settings.rounds {
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for shared in order {
            let r = run(shared);
            if shared { &mut hot } else { &mut apart }.extend(r);
        }
    }
    println!("== contention: millions of hits per second per thread, 2 threads");
    show("one hot token", &hot, "M/s");
    show("two different tokens", &apart, "M/s");
    let ratio: Vec<f64> = hot.iter().zip(&apart).map(|(h, a)| h / a).collect();
    show("hot ÷ different (per thread)", &ratio, "×");
}

fn spread_1m_set(settings: &Settings, rt: &tokio::runtime::Runtime) {
    let n = if common::full_run() { 1_000_000 } else { 2_000 };
    let (layer, secrets) = issue(rt, n);
    let headers = common::spread(&secrets);
    let map: Arc<SlotMap<Payload>> = Arc::new(DashMap::default());
    let slots = slots_of(&headers);
    // Inserted in issue order, probed in hash order, as the layer's entries are; each probe
    // reads the next key from the entry it found: one request at a time, so their memory
    // accesses cannot overlap (the layer's requests are too long to overlap either).
    let next_of: std::collections::HashMap<u128, u128> = slots
        .iter()
        .zip(slots.iter().cycle().skip(1))
        .map(|(a, b)| (*a, *b))
        .collect();
    for s in secrets.iter() {
        let slot = sip24(KEY, s.expose_secret());
        let p = Payload {
            expires_ms: i64::MAX,
            next: next_of[&slot],
            _rest: [0; 200],
        };
        map.insert(slot, Arc::new(p));
    }
    drop(next_of);
    let steps = unmapped_steps(&headers);
    let mut variants: Vec<(&'static str, Variant)> = vec![
        ("layer_hit_spread", layer_calls(&layer, headers.clone())),
        ("no_layer", no_layer_calls(headers)),
        ("bare_probe", {
            let mut at = slots[0];
            Box::new(move |n| {
                timed(
                    |_| (),
                    n,
                    |()| {
                        let e = map.get(&at).expect("every key is in the map");
                        at = e.value().next;
                        e.value().expires_ms
                    },
                )
            })
        }),
    ];
    // Indices 3 to 6: what a hit does besides the map, which a bare probe does not.
    variants.extend(steps);
    let Some(r) = rounds(settings, &mut variants) else {
        return;
    };
    println!("== spread: {n} tokens cached, each request to the next token in hash order");
    for ((name, _), values) in variants.iter().zip(&r) {
        show(name, values, "ns");
    }
    let own = per_round(settings.rounds, |i| r[0][i] - r[1][i]);
    show("layer's own work", &own, "ns");
    show(
        "own work ÷ bare probe",
        &per_round(settings.rounds, |i| own[i] / r[2][i]),
        "×",
    );
    show(
        "own work ÷ (bare probe + the other steps)",
        &per_round(settings.rounds, |i| {
            own[i] / (r[2][i] + (3..7).map(|v| r[v][i]).sum::<f64>())
        }),
        "×",
    );
}

fn main() {
    let settings = Settings::from_env();
    let rt = common::runtime();
    println!(
        "interleaved: {} rounds × {} calls, order rotated each round; median (10th to 90th percentile)",
        settings.rounds, settings.calls
    );
    if settings.wants("hit") {
        hit_set(&settings, &rt);
    }
    if settings.wants("prf") {
        prf_set(&settings);
    }
    if settings.wants("peers") {
        peers_set(&settings);
    }
    if settings.wants("contention") {
        contention_set(&settings, &rt);
    }
    if settings.wants("spread_1m")
        && (std::env::var_os("SPREAD_1M").is_some() || !common::full_run())
    {
        spread_1m_set(&settings, &rt);
    }
}
