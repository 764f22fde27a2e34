//! Arbitrary credential bytes never panic the layer and always give 400 or 401.

mod common;

use common::*;
use http::{HeaderValue, Request};
use http_body_util::Full;
use proptest::prelude::*;
use tower_pat::{MemoryStore, PatAuthLayer};

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
