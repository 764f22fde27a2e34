//! The floor: each step a cache-hit verification cannot avoid, measured alone on a real 42-character
//! token, and their sum. `verify` is held against this sum.
//!
//! `cargo bench --bench floor`

mod common;

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::hint::black_box;
use std::sync::Arc;

use criterion::Criterion;
use http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use tower_pat::{MemoryStore, NewToken, ScopeSet, TokenFormat, TokenHash, TokenStore};

/// How many distinct tokens the parse, checksum and hash steps cycle through.
const CYCLED: usize = 4096;

/// A value as large as the cache's entry for a token (its `Arc`, times, scopes and the allocation
/// of its names: 288 bytes of heap): what a million of them span, and so the TLB misses of a
/// probe, is that of a real cache. A bare `u64` would span a tenth of it.
type EntrySized = [u64; ENTRY_WORDS];
const ENTRY_WORDS: usize = 34;

/// The identity hasher a digest-keyed map uses: the key is already uniformly random.
#[derive(Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn write(&mut self, _: &[u8]) {
        unreachable!("TokenHash feeds a u64")
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// `Authorization: Bearer <token>`, the scheme matched case-insensitively.
#[inline]
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case("bearer ").then_some(token)
}

type DigestMap = HashMap<TokenHash, Arc<EntrySized>, BuildHasherDefault<Identity>>;

/// An identity-hashed map of `n` digests, and its keys in an order unrelated to the order the
/// values were allocated in, as `verify` goes through its tokens: with a million, every probe
/// misses the CPU caches.
fn digest_map(n: usize) -> (DigestMap, Vec<TokenHash>) {
    let mut map = DigestMap::with_capacity_and_hasher(n, BuildHasherDefault::default());
    for i in 0..n {
        let hash = TokenHash::from_bytes(Sha256::digest(i.to_le_bytes()).into());
        let mut value = [0; ENTRY_WORDS];
        value[0] = i as u64;
        map.insert(hash, Arc::new(value));
    }
    let mut keys: Vec<TokenHash> = map.keys().copied().collect();
    keys.sort_unstable();
    (map, keys)
}

fn floor(c: &mut Criterion) {
    let rt = common::runtime();
    let store = MemoryStore::new();
    let layer = common::layer(store.clone());
    let scopes = ScopeSet::parse(["repo:read", "repo:write"]).expect("valid scopes");
    let tokens = tower_pat::Tokens::new(store.clone());
    let new = NewToken::new("alice", "laptop").scope_set(scopes);
    let (record, secret) = tokens.mint(new, chrono::Utc::now());
    let token = secret.expose_secret();
    assert_eq!(token.len(), 42);
    let principal = rt.block_on(async {
        store.insert(&record).await.expect("insert");
        layer
            .verify(token, None, &tower_pat::ScopeSet::empty())
            .await
            .expect("a valid token")
    });
    let auth = common::bearer(token);
    let format = TokenFormat::new();
    // The steps cycle through many tokens, as `verify` does: a token's characters are random,
    // and one token repeated would let the branch predictor learn it.
    let tokens: Vec<String> = (0..CYCLED)
        .map(|_| format.generate().expose_secret().to_owned())
        .collect();
    let requests: Vec<_> = tokens
        .iter()
        .map(|t| common::request(&common::bearer(t)))
        .collect();

    let n = if common::full_run() {
        1_000_000
    } else {
        10_000
    };
    let (map_1m, keys_1m) = digest_map(n);
    let (map_1k, keys_1k) = digest_map(1_000);

    let mut g = c.benchmark_group("floor");
    let mut i = 0;
    let mut next = move || {
        i = (i + 1) % CYCLED;
        i
    };
    g.bench_function("bearer_parse", |b| {
        b.iter(|| bearer_token(black_box(requests[next()].headers())).map(str::len))
    });
    g.bench_function("checksum", |b| {
        b.iter(|| format.check(black_box(&tokens[next()])))
    });
    g.bench_function("sha256", |b| {
        b.iter(|| <[u8; 32]>::from(Sha256::digest(black_box(&tokens[next()]).as_bytes())))
    });
    for (name, map, keys) in [
        ("probe_1k", &map_1k, &keys_1k),
        ("probe_1m", &map_1m, &keys_1m),
    ] {
        g.bench_function(name, |b| {
            let mut j = 0;
            b.iter(|| {
                // Find the slot and read the entry behind it, as a cache must (its expiry). The
                // next key depends on what was read: requests come one at a time, so each probe's
                // cache misses are paid in full, not overlapped with the next probe's.
                let v = map.get(black_box(&keys[j])).map_or(0, |v| v[0]);
                j = (j + 1 + (v >> 63) as usize) % keys.len();
                v
            })
        });
    }
    g.bench_function("arc_clone", |b| {
        b.iter_batched(|| (), |()| principal.clone(), common::BATCH)
    });
    g.bench_function("extension_insert", |b| {
        b.iter_batched(
            || (common::request(&auth), principal.clone()),
            |(mut req, p)| {
                req.extensions_mut().insert(p);
                req
            },
            common::BATCH,
        )
    });
    g.finish();
}

fn main() {
    common::run(floor);
}
