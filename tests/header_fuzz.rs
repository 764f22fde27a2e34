//! Arbitrary credential bytes never panic the layer and always give 400 or 401.

mod common;

use common::*;
use http::{HeaderValue, Request};
use http_body_util::Full;
use proptest::prelude::*;
use tower_pat::{MemoryStore, PatAuthLayer, TokenSecret};

/// Bytes a header value may hold (visible ASCII, space, tab, obs-text), so every case reaches the
/// layer.
fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![
            4 => 0x20u8..0x7f,
            1 => 0x80u8..=0xff,
            1 => Just(b'\t'),
        ],
        0..120,
    )
}

/// Strings shaped like tokens: the prefix, then base62 characters around the right length.
fn token_like() -> impl Strategy<Value = Vec<u8>> {
    "pat_[0-9A-Za-z]{30,40}".prop_map(String::into_bytes)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_credential_bytes(
        body in prop_oneof![header_bytes(), token_like()],
        prefix in 0usize..4,
    ) {
        let mut value = match prefix {
            0 => b"Bearer ".to_vec(),
            1 => b"bEaReR  ".to_vec(),
            2 => b"Token ".to_vec(),
            _ => Vec::new(),
        };
        value.extend(body);
        let value = HeaderValue::from_bytes(&value).expect("the strategy makes legal header bytes");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let status = rt.block_on(async {
            let layer = PatAuthLayer::builder(MemoryStore::new())
                .accept_token_scheme()
                .accept_raw_authorization()
                .accept_header(http::HeaderName::from_static("x-api-key"))
                .build();
            let req = Request::builder()
                .header("authorization", value.clone())
                .header("x-api-key", value)
                .body(Full::default())
                .unwrap();
            send(&layer, req).await.status
        });
        prop_assert!(status == 400 || status == 401, "status {}", status);
    }
}

/// A store holding one token of alice's, and its secret.
async fn alice() -> (MemoryStore, TokenSecret) {
    let store = MemoryStore::new();
    let (_, secret) = Tokens::new(store.clone())
        .issue(new_token("alice", &[]))
        .await
        .unwrap();
    (store, secret)
}

/// The layer's answer to `values` as `Authorization` headers: status, body and challenge.
async fn answer(layer: &PatAuthLayer, values: &[Vec<u8>]) -> (u16, String, String) {
    let mut req = Request::get("/").body(Full::default()).unwrap();
    for v in values {
        req.headers_mut().append(
            http::header::AUTHORIZATION,
            HeaderValue::from_bytes(v).unwrap(),
        );
    }
    let reply = send(layer, req).await;
    let challenge = reply.www_authenticate().to_owned();
    (reply.status.as_u16(), reply.body, challenge)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// With `Authorization: Bearer` as the only source the layer takes a specialised path (and on
    /// a cached token it reads the header's bytes, not its text); a layer with one more source (a
    /// header no request here carries) takes the general one. Both must answer every request
    /// alike, with the token cached (`warm`) or not: one, two or three `Authorization` headers of
    /// arbitrary bytes, with the valid token, its near misses of the same length (one byte
    /// changed to anything a header may hold, the letter case, a space in front), and odd
    /// spellings of the scheme among them. And only a value that carries the exact token is
    /// admitted.
    #[test]
    fn the_bearer_fast_path_answers_exactly_as_the_general_path(
        picks in proptest::collection::vec((0usize..13, header_bytes(), any::<prop::sample::Index>(), 0x09u8..=0xff), 0..4),
        warm in any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (store, secret) = alice().await;
            let token = secret.expose_secret();
            let fast = PatAuthLayer::builder(store.clone()).build();
            let general = PatAuthLayer::builder(store)
                .accept_header(http::HeaderName::from_static("x-unused-credential"))
                .build();
            if warm {
                let valid = [format!("Bearer {token}").into_bytes()];
                prop_assert_eq!(answer(&fast, &valid).await.0, 200);
                prop_assert_eq!(answer(&general, &valid).await.0, 200);
            }
            let values: Vec<Vec<u8>> = picks
                .into_iter()
                .map(|(kind, noise, at, byte)| match kind {
                    0 => format!("Bearer {token}").into_bytes(),
                    1 => format!("bearer   {token}  ").into_bytes(),
                    2 => format!("Bearer\t{token}").into_bytes(),
                    3 => format!("Bearer {}", &token[..token.len() - 1]).into_bytes(),
                    4 => b"Bearer".to_vec(),
                    5 => format!("Basic {token}").into_bytes(),
                    6 => [b"Bearer ".to_vec(), noise].concat(),
                    7 => noise,
                    8 => format!("Bearer {token}\u{e9}").into_bytes(),
                    // Same length as the token: what the fast path probes.
                    9 => {
                        let mut t = token.as_bytes().to_vec();
                        let i = at.index(t.len());
                        // Not 0x7f, nor a control character but tab: no header value holds them.
                        t[i] = if byte == 0x7f || (byte < b' ' && byte != b'\t') { b'~' } else { byte };
                        [b"Bearer ".to_vec(), t].concat()
                    }
                    10 => format!("bEARER {token}").into_bytes(),
                    // Another scheme of the same length.
                    11 => format!("Digest {token}").into_bytes(),
                    _ => format!("Bearer  {}", &token[..token.len() - 1]).into_bytes(),
                })
                .collect();
            let answer_fast = answer(&fast, &values).await;
            prop_assert_eq!(&answer_fast, &answer(&general, &values).await);
            // And they count alike: outcomes, cache answers, store lookups.
            let (f, g) = (fast.stats(), general.stats());
            prop_assert_eq!((f.outcomes, f.cache, f.store_lookups), (g.outcomes, g.cache, g.store_lookups));
            if answer_fast.0 == 200 {
                // Admitted: some value is `Bearer` and the exact token, and none is another
                // `Bearer` credential; of several values, every one is (RFC 9110 allows one
                // `Authorization` field: any other value is a second credential).
                let bearer = |v: &Vec<u8>| {
                    v.get(..7)
                        .filter(|s| s.eq_ignore_ascii_case(b"bearer "))
                        .map(|_| v[7..].trim_ascii().to_vec())
                };
                let credentials: Vec<_> = values.iter().filter_map(bearer).collect();
                prop_assert!(!credentials.is_empty());
                prop_assert!(credentials.iter().all(|c| c == token.as_bytes()));
                prop_assert!(values.len() == 1 || credentials.len() == values.len());
            }
            Ok(())
        })?;
    }
}

/// The fast path's hit, seen from outside: a cached token in the common form is answered by the
/// cache (no store lookup, one hit counted), whatever the scheme's letter case; a value of the
/// same length that is not the token is never admitted, and gets the general path's answer.
#[tokio::test]
async fn a_cached_token_in_the_common_form_is_a_hit_and_its_near_misses_are_not() {
    let (store, secret) = alice().await;
    let token = secret.expose_secret();
    let layer = PatAuthLayer::builder(store).build();
    let status = |values: Vec<Vec<u8>>| {
        let layer = layer.clone();
        async move { answer(&layer, &values).await.0 }
    };
    let bearer = |t: &str| format!("Bearer {t}").into_bytes();
    assert_eq!(status(vec![bearer(token)]).await, 200);
    assert_eq!(layer.store_lookups(), 1);

    for value in [bearer(token), format!("bEARER {token}").into_bytes()] {
        let hits = layer.stats().cache.hits;
        assert_eq!(status(vec![value]).await, 200);
        assert_eq!(layer.stats().cache.hits, hits + 1, "answered by the cache");
        assert_eq!(layer.store_lookups(), 1, "no store lookup on a hit");
    }

    // Same length after the scheme, not the token.
    let mut accented = token.as_bytes().to_vec();
    accented[token.len() - 1] = 0xe9;
    let mut last_changed = token.as_bytes().to_vec();
    last_changed[token.len() - 1] ^= 1;
    let cases: [(Vec<Vec<u8>>, u16); 5] = [
        // Another scheme of six letters.
        (vec![format!("Digest {token}").into_bytes()], 401),
        // A byte that is not text: the general path's 400.
        (vec![[b"Bearer ".as_slice(), &accented].concat()], 400),
        // One character off: malformed (the checksum, or a character outside base62), refused
        // without a lookup.
        (vec![[b"Bearer ".as_slice(), &last_changed].concat()], 401),
        // A space in front, one character short.
        (vec![format!("Bearer  {}", &token[1..]).into_bytes()], 401),
        // The token next to another credential: two credentials.
        (
            vec![
                bearer(token),
                [b"Bearer ".as_slice(), &last_changed].concat(),
            ],
            400,
        ),
    ];
    for (values, expected) in cases {
        let ok = layer.stats().outcomes.ok;
        assert_eq!(status(values.clone()).await, expected, "{values:?}");
        assert_eq!(layer.stats().outcomes.ok, ok, "not admitted");
    }
    assert_eq!(layer.store_lookups(), 1, "no near miss reached the store");
}
