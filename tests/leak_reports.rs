//! Leaked-token reports through HTTP: `POST <base>/leak-reports` in GitHub's secret-scanning
//! partner format, signed with ECDSA P-256, revokes the tokens it names; and the regular
//! expression a scanner registers for the token format.

mod common;

use regex::Regex;
use tower_pat::TokenFormat;

/// The scanner pattern finds fresh tokens in text, and not strings that only resemble them.
#[test]
fn the_scanner_pattern_matches_fresh_tokens_and_not_mangled_ones() {
    for format in [
        TokenFormat::new(),
        TokenFormat::with_prefix("acme_pat_").unwrap(),
        TokenFormat::with_prefix("Acme-PAT-").unwrap(),
    ] {
        let re = Regex::new(&format.scanner_pattern()).unwrap();
        for _ in 0..50 {
            let token = format.generate();
            let token = token.expose_secret();
            for text in [
                token.to_owned(),
                format!("export TOKEN={token}\n"),
                format!("\"{token}\","),
                format!("Authorization: Bearer {token}"),
            ] {
                let found = re.find(&text).map(|m| m.as_str());
                assert_eq!(
                    found,
                    Some(token),
                    "{} in {text:?}",
                    format.scanner_pattern()
                );
            }
            let mangled = [
                token[..token.len() - 1].to_owned(),
                format!("{token}a"),
                format!("x{token}"),
                token.replacen(format.prefix(), "zz_", 1),
                format!("{}-{}", &token[..10], &token[11..]),
            ];
            for text in mangled {
                assert!(
                    !re.is_match(&text),
                    "{} matched {text:?}",
                    format.scanner_pattern()
                );
            }
        }
    }
}

/// The README names the default format's pattern, as the code makes it.
#[test]
fn the_readme_documents_the_default_pattern() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let pattern = TokenFormat::new().scanner_pattern();
    assert_eq!(pattern, r"\bpat_[0-9A-Za-z]{38}\b");
    assert!(
        readme.contains(&format!("`{pattern}`")),
        "README.md does not document {pattern}"
    );
}

#[cfg(feature = "secret-scanning")]
mod reports {
    use std::net::SocketAddr;

    use axum::Router;
    use axum::body::Body;
    use axum::routing;
    use base64ct::{Base64, Encoding};
    use http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use p256::ecdsa::signature::Signer;
    use p256::ecdsa::{Signature, SigningKey};
    use p256::pkcs8::{EncodePublicKey, LineEnding};
    use serde_json::{Value, json};
    use sha2::{Digest, Sha256};
    use tokio::sync::mpsc;
    use tower::ServiceExt;
    use tower_pat::admin::{
        self, AdminConfig, EventKind, InvalidPublicKey, KEY_IDENTIFIER_HEADER,
        KEY_SIGNATURE_HEADER, LeakReports, TokenEvent,
    };
    use tower_pat::{
        MemoryStore, NewToken, Principal, TokenFormat, TokenRecord, TokenStore, Tokens,
    };

    use super::common::{CountingStore, rand_suffix};

    const BASE: &str = "/personal-access-tokens";
    const PATH: &str = "/personal-access-tokens/leak-reports";

    /// A P-256 key made from a label, so that every run signs with the same keys.
    fn key(label: &str) -> SigningKey {
        SigningKey::from_slice(&Sha256::digest(label.as_bytes())).unwrap()
    }

    fn pem(key: &SigningKey) -> String {
        key.verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap()
    }

    /// Base64 of the DER signature of `body` by `key`, as GitHub sends it.
    fn sign(key: &SigningKey, body: &[u8]) -> String {
        let signature: Signature = key.sign(body);
        Base64::encode_string(signature.to_der().as_bytes())
    }

    /// The hex SHA-256 of a string, as GitHub's `token_hash` is defined.
    fn sha256_hex(s: &str) -> String {
        Sha256::digest(s.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    struct App {
        app: Router,
        store: CountingStore,
        tokens: Tokens,
        events: mpsc::Receiver<TokenEvent>,
        /// Configured as key `github-1`.
        github: SigningKey,
        /// Configured as key `github-2`.
        second: SigningKey,
    }

    /// The management API with leak reports signed by `github-1` or `github-2`, the reports
    /// changed by `configure`, and `GET /hello` behind the same layer.
    fn app_with(configure: impl FnOnce(LeakReports) -> LeakReports) -> App {
        let store = CountingStore::default();
        let tokens = Tokens::new(store.clone());
        let layer = tokens.layer().build();
        let (github, second) = (key("github-1"), key("github-2"));
        let reports = LeakReports::new()
            .public_key("github-1", &pem(&github))
            .unwrap()
            .public_key("github-2", &pem(&second))
            .unwrap();
        let (tx, events) = mpsc::channel(64);
        let config = AdminConfig::new(&tokens, &layer)
            .unwrap()
            .events(tx)
            .leak_reports(configure(reports));
        let protected = Router::new()
            .route(
                "/hello",
                routing::get(|p: Principal| async move { p.subject().to_owned() }),
            )
            .layer(layer);
        let app = Router::new()
            .nest(BASE, admin::router(config))
            .merge(protected);
        App {
            app,
            store,
            tokens,
            events,
            github,
            second,
        }
    }

    fn app() -> App {
        app_with(|r| r)
    }

    struct Res {
        status: StatusCode,
        text: String,
        body: Value,
    }

    impl App {
        async fn issue(&self, subject: &str) -> (TokenRecord, String) {
            let new = NewToken::new(subject, format!("t-{}", rand_suffix()))
                .scopes(["x:read"])
                .unwrap();
            let (record, secret) = self.tokens.issue(new).await.unwrap();
            (record, secret.expose_secret().to_owned())
        }

        /// `GET /hello` with `token`.
        async fn hello(&self, token: &str) -> StatusCode {
            let req = Request::get("/hello")
                .header("authorization", format!("Bearer {token}"))
                .body(Body::empty())
                .unwrap();
            self.send(req).await.status
        }

        /// Posts `body` with the given key id and signature headers (each left out if `None`).
        async fn post(&self, body: &[u8], key_id: Option<&str>, signature: Option<&str>) -> Res {
            let mut req = Request::post(PATH).header("content-type", "application/json");
            if let Some(id) = key_id {
                req = req.header(KEY_IDENTIFIER_HEADER, id);
            }
            if let Some(sig) = signature {
                req = req.header(KEY_SIGNATURE_HEADER, sig);
            }
            self.send(req.body(Body::from(body.to_vec())).unwrap())
                .await
        }

        /// Posts `body` signed by `github-1`, as GitHub would.
        async fn report(&self, body: &[u8]) -> Res {
            let signature = sign(&self.github, body);
            self.post(body, Some("github-1"), Some(&signature)).await
        }

        async fn send(&self, req: Request<Body>) -> Res {
            send(&self.app, req).await
        }

        fn store_calls(&self) -> usize {
            self.store.calls()
        }

        fn revokes(&self) -> usize {
            self.store.revokes()
        }

        fn events(&mut self) -> Vec<TokenEvent> {
            std::iter::from_fn(|| self.events.try_recv().ok()).collect()
        }
    }

    /// One request through `app`, from 127.0.0.1.
    async fn send(app: &Router, mut req: Request<Body>) -> Res {
        req.extensions_mut()
            .insert(SocketAddr::from(([127, 0, 0, 1], 40000)));
        let res = app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Res { status, text, body }
    }

    fn entry(token: &str) -> Value {
        json!({
            "token": token,
            "type": "tower_pat_token",
            "url": "https://github.com/octo/leaky/blob/abc123/config.env",
            "source": "content"
        })
    }

    fn body(entries: &[Value]) -> Vec<u8> {
        serde_json::to_vec(entries).unwrap()
    }

    /// Asserts a 401 in the crate's error shape.
    fn unauthorized(res: &Res) {
        assert_eq!(res.status, StatusCode::UNAUTHORIZED, "{}", res.text);
        assert_eq!(res.body["status"], 401, "{}", res.text);
        assert_eq!(res.body["code"], "unauthorized", "{}", res.text);
    }

    #[tokio::test]
    async fn a_signed_report_revokes_the_token_everywhere_and_answers_its_hash() {
        let mut t = app();
        let (record, token) = t.issue("alice").await;
        let (_, bystander) = t.issue("bob").await;
        assert_eq!(t.hello(&token).await, StatusCode::OK);
        let foreign = "ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789";

        let res = t.report(&body(&[entry(&token), entry(foreign)])).await;
        assert_eq!(res.status, StatusCode::OK, "{}", res.text);
        assert_eq!(
            res.body,
            json!([
                {"token_hash": sha256_hex(&token), "token_type": "tower_pat_token", "label": "true_positive"},
                {"token_hash": sha256_hex(foreign), "token_type": "tower_pat_token", "label": "false_positive"},
            ])
        );
        assert!(!res.text.contains(&token), "the answer holds the token");

        // The very next request with it is refused (the cache entry is gone), and the record
        // says so; other tokens are untouched.
        assert_eq!(t.hello(&token).await, StatusCode::UNAUTHORIZED);
        assert_eq!(t.hello(&bystander).await, StatusCode::OK);
        let stored = t.store.inner.get(&record.id).await.unwrap().unwrap();
        assert!(stored.is_revoked());

        let events = t.events();
        assert_eq!(events.len(), 1, "{events:?}");
        let event = &events[0];
        assert_eq!(event.event, EventKind::Leaked);
        assert_eq!(event.data.id, record.id);
        assert_eq!(event.data.subject, "alice");
        let leak = event.leak.as_ref().unwrap();
        assert_eq!(
            leak.url,
            "https://github.com/octo/leaky/blob/abc123/config.env"
        );
        assert_eq!(leak.source, "content");
        let wire = serde_json::to_string(event).unwrap();
        assert!(wire.contains("\"personalAccessToken.leaked\""), "{wire}");
        assert!(!wire.contains(&token), "the event holds the token");
    }

    #[tokio::test]
    async fn a_bad_or_missing_signature_is_401_and_reads_and_changes_nothing() {
        let mut t = app();
        let (_, token) = t.issue("alice").await;
        let report = body(&[entry(&token)]);
        let good = sign(&t.github, &report);
        let other_body = sign(&t.github, b"[]");
        let mut flipped = Base64::decode_vec(&good).unwrap();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let flipped = Base64::encode_string(&flipped);

        let before = t.store_calls();
        for (id, sig) in [
            (None, Some(good.as_str())),
            (Some("github-1"), None),
            (Some("github-1"), Some("")),
            (Some("github-1"), Some("not base64 !!")),
            (Some("github-1"), Some("AAAA")),
            (Some("github-1"), Some(flipped.as_str())),
            (Some("github-1"), Some(other_body.as_str())),
            (Some("GITHUB-1"), Some(good.as_str())),
            (Some(""), Some(good.as_str())),
        ] {
            let res = t.post(&report, id, sig).await;
            unauthorized(&res);
            assert!(!res.text.contains(&token));
        }
        assert_eq!(
            t.store_calls(),
            before,
            "a refused report touched the store"
        );
        assert!(t.events().is_empty());
        assert_eq!(t.hello(&token).await, StatusCode::OK);
    }

    #[tokio::test]
    async fn a_signature_by_an_unconfigured_key_is_refused() {
        let mut t = app();
        let (_, token) = t.issue("alice").await;
        let report = body(&[entry(&token)]);
        let attacker = key("attacker");
        let sig = sign(&attacker, &report);
        for id in ["github-1", "github-2", "attacker"] {
            unauthorized(&t.post(&report, Some(id), Some(&sig)).await);
        }
        assert_eq!(t.revokes(), 0);
        assert!(t.events().is_empty());
        assert_eq!(t.hello(&token).await, StatusCode::OK);
    }

    #[tokio::test]
    async fn a_signature_under_another_configured_key_id_is_refused() {
        let mut t = app();
        let (_, token) = t.issue("alice").await;
        let report = body(&[entry(&token)]);
        // Signed by github-1, claimed to be github-2, and the other way round.
        let by_first = sign(&t.github, &report);
        unauthorized(&t.post(&report, Some("github-2"), Some(&by_first)).await);
        let by_second = sign(&t.second, &report);
        unauthorized(&t.post(&report, Some("github-1"), Some(&by_second)).await);
        assert_eq!(t.hello(&token).await, StatusCode::OK);
        // Under its own id, the second key's signature is good.
        let res = t.post(&report, Some("github-2"), Some(&by_second)).await;
        assert_eq!(res.status, StatusCode::OK, "{}", res.text);
        assert_eq!(res.body[0]["label"], "true_positive");
        assert_eq!(t.events().len(), 1);
        assert_eq!(t.hello(&token).await, StatusCode::UNAUTHORIZED);
    }

    /// Go's ECDSA (GitHub's signer) does not normalize `s`: both forms of a signature verify.
    #[tokio::test]
    async fn high_and_low_s_signatures_both_verify() {
        let t = app();
        let (_, token) = t.issue("alice").await;
        let report = body(&[entry(&token)]);
        let signature: Signature = t.github.sign(&report);
        let (r, s) = signature.split_scalars();
        let flipped = Signature::from_scalars(r, -*s).unwrap();
        assert_ne!(flipped, signature);
        for sig in [signature, flipped] {
            let sig = Base64::encode_string(sig.to_der().as_bytes());
            let res = t.post(&report, Some("github-1"), Some(&sig)).await;
            assert_eq!(res.status, StatusCode::OK, "{}", res.text);
            assert_eq!(res.body[0]["label"], "true_positive");
        }
        assert_eq!(t.hello(&token).await, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn a_body_changed_after_signing_is_refused() {
        let mut t = app();
        let (_, token) = t.issue("alice").await;
        let (_, other) = t.issue("alice").await;
        let signed = body(&[entry(&other)]);
        let sig = sign(&t.github, &signed);
        // One byte changed: the url, then whitespace only.
        let mut changed = signed.clone();
        let at = changed.iter().position(|&b| b == b'k').unwrap();
        changed[at] = b'K';
        unauthorized(&t.post(&changed, Some("github-1"), Some(&sig)).await);
        let mut spaced = signed.clone();
        spaced.push(b' ');
        unauthorized(&t.post(&spaced, Some("github-1"), Some(&sig)).await);
        // Another token spliced in, same length.
        let swapped = body(&[entry(&token)]);
        assert_eq!(swapped.len(), signed.len());
        unauthorized(&t.post(&swapped, Some("github-1"), Some(&sig)).await);
        assert_eq!(t.revokes(), 0);
        assert!(t.events().is_empty());
        assert_eq!(t.hello(&token).await, StatusCode::OK);
        assert_eq!(t.hello(&other).await, StatusCode::OK);
    }

    #[tokio::test]
    async fn a_replayed_report_changes_nothing_more() {
        let mut t = app();
        let (record, token) = t.issue("alice").await;
        let report = body(&[entry(&token)]);
        let sig = sign(&t.github, &report);
        let first = t.post(&report, Some("github-1"), Some(&sig)).await;
        assert_eq!(first.status, StatusCode::OK, "{}", first.text);
        let revoked_at = t
            .store
            .inner
            .get(&record.id)
            .await
            .unwrap()
            .unwrap()
            .revoked_at;
        assert!(revoked_at.is_some());
        assert_eq!(t.events().len(), 1);
        let revokes = t.revokes();

        let again = t.post(&report, Some("github-1"), Some(&sig)).await;
        assert_eq!(again.status, StatusCode::OK, "{}", again.text);
        assert_eq!(again.body, first.body, "a replay answers the same");
        assert!(t.events().is_empty(), "a replay emitted another event");
        assert_eq!(t.revokes(), revokes, "a replay wrote again");
        let stored = t.store.inner.get(&record.id).await.unwrap().unwrap();
        assert_eq!(stored.revoked_at, revoked_at);
    }

    #[tokio::test]
    async fn strings_of_another_format_are_false_positives_without_a_store_query() {
        let mut t = app();
        let genuine = TokenFormat::new().generate();
        let genuine = genuine.expose_secret();
        // Right prefix and length, one character changed: the checksum fails.
        let mut typo = genuine.as_bytes().to_vec();
        typo[10] = if typo[10] == b'a' { b'b' } else { b'a' };
        let typo = String::from_utf8(typo).unwrap();
        let other_prefix = TokenFormat::with_prefix("acme_")
            .unwrap()
            .generate()
            .expose_secret()
            .to_owned();
        let strings = [
            "ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789".to_owned(),
            typo,
            other_prefix,
            String::new(),
            format!("{genuine}x"),
        ];
        let entries: Vec<Value> = strings.iter().map(|s| entry(s)).collect();
        let before = t.store_calls();
        let res = t.report(&body(&entries)).await;
        assert_eq!(res.status, StatusCode::OK, "{}", res.text);
        assert_eq!(
            t.store_calls(),
            before,
            "a string of another format cost a query"
        );
        let answer = res.body.as_array().unwrap();
        assert_eq!(answer.len(), strings.len());
        for (label, s) in answer.iter().zip(&strings) {
            assert_eq!(label["label"], "false_positive", "{s}");
            assert_eq!(label["token_hash"], sha256_hex(s));
        }
        assert!(t.events().is_empty());
    }

    #[tokio::test]
    async fn a_well_formed_token_nobody_issued_is_a_false_positive_after_one_lookup() {
        let mut t = app();
        let unknown = TokenFormat::new().generate();
        let before = t.store.lookups();
        let res = t.report(&body(&[entry(unknown.expose_secret())])).await;
        assert_eq!(res.status, StatusCode::OK, "{}", res.text);
        assert_eq!(res.body[0]["label"], "false_positive");
        assert_eq!(t.store.lookups(), before + 1);
        assert_eq!(t.revokes(), 0);
        assert!(t.events().is_empty());
    }

    #[tokio::test]
    async fn a_token_listed_twice_is_revoked_once() {
        let mut t = app();
        let (_, token) = t.issue("alice").await;
        let res = t.report(&body(&[entry(&token), entry(&token)])).await;
        assert_eq!(res.status, StatusCode::OK, "{}", res.text);
        assert_eq!(res.body[0]["label"], "true_positive");
        assert_eq!(res.body[1], res.body[0]);
        assert_eq!(t.revokes(), 1);
        assert_eq!(t.events().len(), 1);
    }

    #[tokio::test]
    async fn a_secret_in_its_rotation_grace_period_revokes_the_token() {
        let mut t = app();
        let (record, old) = t.issue("alice").await;
        let (_, new) = t
            .tokens
            .rotate(&record.id, std::time::Duration::from_secs(3600))
            .await
            .unwrap();
        let new = new.expose_secret().to_owned();
        assert_eq!(t.hello(&old).await, StatusCode::OK);
        let res = t.report(&body(&[entry(&old)])).await;
        assert_eq!(res.body[0]["label"], "true_positive", "{}", res.text);
        assert_eq!(t.hello(&old).await, StatusCode::UNAUTHORIZED);
        assert_eq!(t.hello(&new).await, StatusCode::UNAUTHORIZED);
        assert_eq!(t.events()[0].data.id, record.id);
    }

    #[tokio::test]
    async fn an_oversized_body_is_413_before_anything_else() {
        let mut t = app_with(|r| r.max_body_bytes(1024));
        let (_, token) = t.issue("alice").await;
        let mut padded = entry(&token);
        padded["url"] = Value::String(format!("https://example.com/{}", "a".repeat(2000)));
        let report = body(&[padded]);
        assert!(report.len() > 1024);
        let before = t.store_calls();
        let res = t.report(&report).await;
        assert_eq!(res.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", res.text);
        assert_eq!(res.body["code"], "payload_too_large");
        assert_eq!(t.store_calls(), before);
        assert!(t.events().is_empty());
        assert_eq!(t.hello(&token).await, StatusCode::OK);
    }

    /// A request body whose bytes never come.
    struct Never;

    impl http_body::Body for Never {
        type Data = bytes::Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>>
        {
            std::task::Poll::Pending
        }
    }

    /// No token stands in front of this route: a request without a configured key and a
    /// well-formed signature is refused before its body is read.
    #[tokio::test]
    async fn an_unsigned_report_is_401_before_its_body_is_read() {
        let signature = {
            let t = app();
            sign(&t.github, b"[]")
        };
        for (key_id, sig) in [
            (None, None),
            (Some("github-1"), None),
            (Some("unknown"), Some(signature.as_str())),
            (Some("github-1"), Some("not base64!")),
            (Some("github-1"), Some("AAAA")),
        ] {
            let t = app();
            // A body that never arrives: reading it would wait for ever.
            let never = Never;
            let mut req = Request::post(PATH).header("content-type", "application/json");
            if let Some(id) = key_id {
                req = req.header(KEY_IDENTIFIER_HEADER, id);
            }
            if let Some(sig) = sig {
                req = req.header(KEY_SIGNATURE_HEADER, sig);
            }
            let req = req.body(Body::new(never)).unwrap();
            let res = tokio::time::timeout(std::time::Duration::from_secs(5), t.send(req))
                .await
                .expect("refused without reading the body");
            unauthorized(&res);
            assert_eq!(t.store_calls(), 0);
        }
    }

    /// GitHub's key identifiers are public and any well-formed signature passes the header
    /// check: a forged one with a body that never arrives is a 408 after the body timeout, not
    /// a request held for ever.
    #[tokio::test]
    async fn a_forged_signature_with_a_body_that_never_comes_times_out() {
        let mut t = app_with(|r| r.body_timeout(std::time::Duration::from_millis(200)));
        let forged = sign(&key("someone-else"), b"[]");
        let req = Request::post(PATH)
            .header("content-type", "application/json")
            .header(KEY_IDENTIFIER_HEADER, "github-1")
            .header(KEY_SIGNATURE_HEADER, forged)
            .body(Body::new(Never))
            .unwrap();
        let res = tokio::time::timeout(std::time::Duration::from_secs(5), t.send(req))
            .await
            .expect("the body timeout ends the request");
        assert_eq!(res.status, StatusCode::REQUEST_TIMEOUT, "{}", res.text);
        assert_eq!(res.body["code"], "request_timeout");
        assert_eq!(t.store_calls(), 0);
        assert!(t.events().is_empty());
    }

    #[tokio::test]
    async fn more_entries_than_the_maximum_is_400_and_revokes_nothing() {
        let mut t = app_with(|r| r.max_entries(3));
        let (_, token) = t.issue("alice").await;
        let mut entries = vec![entry(&token)];
        for _ in 0..3 {
            entries.push(entry(TokenFormat::new().generate().expose_secret()));
        }
        let before = t.store_calls();
        let res = t.report(&body(&entries)).await;
        assert_eq!(res.status, StatusCode::BAD_REQUEST, "{}", res.text);
        assert!(res.body["message"].as_str().unwrap().contains("at most 3"));
        assert_eq!(t.store_calls(), before);
        assert!(t.events().is_empty());
        assert_eq!(t.hello(&token).await, StatusCode::OK);
        // Three are fine.
        let res = t.report(&body(&entries[..3])).await;
        assert_eq!(res.status, StatusCode::OK, "{}", res.text);
        assert_eq!(t.hello(&token).await, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn a_signed_body_that_is_not_a_report_is_400_and_does_not_echo_it() {
        let t = app();
        let (_, token) = t.issue("alice").await;
        for bad in [
            format!("{{\"token\": \"{token}\"}}"),
            format!("[{{\"token\": [\"{token}\"]}}]"),
            format!("[{{\"token\": \"{token}\", \"url\": [\"{token}\"]}}]"),
            "[{\"type\": \"x\"}]".to_owned(),
            "not json".to_owned(),
        ] {
            let res = t.report(bad.as_bytes()).await;
            assert_eq!(res.status, StatusCode::BAD_REQUEST, "{bad}: {}", res.text);
            assert!(!res.text.contains(&token), "{}", res.text);
        }
        assert_eq!(t.revokes(), 0);
        assert_eq!(t.hello(&token).await, StatusCode::OK);
    }

    #[tokio::test]
    async fn the_endpoint_does_not_exist_unless_configured() {
        let store = MemoryStore::new();
        let tokens = Tokens::new(store.clone());
        let layer = tokens.layer().build();
        let (record, secret) = tokens
            .issue(NewToken::new("alice", "t").scopes(["x:read"]).unwrap())
            .await
            .unwrap();
        let app = Router::new().nest(
            BASE,
            admin::router(AdminConfig::new(&tokens, &layer).unwrap()),
        );
        let report = body(&[entry(secret.expose_secret())]);
        let sig = sign(&key("github-1"), &report);
        let req = Request::post(PATH)
            .header(KEY_IDENTIFIER_HEADER, "github-1")
            .header(KEY_SIGNATURE_HEADER, sig)
            .body(Body::from(report))
            .unwrap();
        let res = app.oneshot(req).await.unwrap();
        assert_ne!(res.status(), StatusCode::OK);
        assert!(!store.get(&record.id).await.unwrap().unwrap().is_revoked());
    }

    /// A report to node A revokes the token on node B, which had it cached: PostgreSQL's
    /// `LISTEN`/`NOTIFY` carries the revocation, as it does any other.
    #[cfg(feature = "postgres")]
    #[tokio::test(flavor = "multi_thread")]
    async fn a_report_to_one_node_revokes_the_token_on_another() {
        use std::time::{Duration, Instant};
        use tower_pat::PostgresStore;

        let Some(db) = super::common::pg::TestDb::create("leak reports across nodes").await else {
            return;
        };
        let node = || async {
            let store = PostgresStore::builder()
                .connect_with(db.options.clone())
                .await
                .unwrap();
            let tokens = Tokens::new(store);
            let layer = tokens.layer().build();
            (tokens, layer)
        };
        let (a_tokens, a_layer) = node().await;
        let (_, b_layer) = node().await;
        let github = key("github-1");
        let reports = LeakReports::new()
            .public_key("github-1", &pem(&github))
            .unwrap();
        let config = AdminConfig::new(&a_tokens, &a_layer)
            .unwrap()
            .leak_reports(reports);
        let a_app = Router::new().nest(BASE, admin::router(config));
        let (_, secret) = a_tokens
            .issue(NewToken::new("alice", "ci").scopes(["x:read"]).unwrap())
            .await
            .unwrap();
        for _ in 0..2 {
            let res = super::common::send_token(&b_layer, &secret).await;
            assert_eq!(
                res.status,
                StatusCode::OK,
                "node B serves it, then from its cache"
            );
        }

        let report = body(&[entry(secret.expose_secret())]);
        let req = Request::post(PATH)
            .header(KEY_IDENTIFIER_HEADER, "github-1")
            .header(KEY_SIGNATURE_HEADER, sign(&github, &report))
            .body(Body::from(report))
            .unwrap();
        let res = send(&a_app, req).await;
        assert_eq!(res.status, StatusCode::OK, "{}", res.text);
        assert_eq!(res.body[0]["label"], "true_positive");
        let revoked = Instant::now();
        while super::common::send_token(&b_layer, &secret).await.status != StatusCode::UNAUTHORIZED
        {
            assert!(
                revoked.elapsed() < Duration::from_secs(1),
                "node B still accepts the token 1 s after the report"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn a_bad_public_key_is_refused_when_configured() {
        let good = pem(&key("k"));
        assert!(LeakReports::new().public_key("k", &good).is_ok());
        assert_eq!(
            LeakReports::new().public_key("k", "not a key").unwrap_err(),
            InvalidPublicKey::Pem { id: "k".to_owned() }
        );
        let truncated = &good[..good.len() / 2];
        assert!(matches!(
            LeakReports::new().public_key("k", truncated),
            Err(InvalidPublicKey::Pem { .. })
        ));
        for id in ["", "two words", "line\nbreak"] {
            assert_eq!(
                LeakReports::new().public_key(id, &good).unwrap_err(),
                InvalidPublicKey::Identifier
            );
        }
        let err = LeakReports::new()
            .public_key("k", "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("public key k"), "{err}");
        let debug = format!("{:?}", LeakReports::new().public_key("k", &good).unwrap());
        assert!(debug.contains("\"k\""), "{debug}");
    }

    #[tokio::test]
    async fn the_openapi_document_lists_the_endpoint_and_the_event() {
        let t = app();
        let req = Request::get(format!("{BASE}/openapi.json"))
            .body(Body::empty())
            .unwrap();
        let doc = t.send(req).await.body;
        let op = &doc["paths"][PATH]["post"];
        assert!(op.is_object(), "no POST {PATH}");
        assert_eq!(op["security"], json!([{}]), "the endpoint takes no token");
        let headers: Vec<&str> = op["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert!(headers.contains(&"GITHUB-PUBLIC-KEY-SIGNATURE"));
        assert!(headers.contains(&"GITHUB-PUBLIC-KEY-IDENTIFIER"));
        let kinds = doc["components"]["schemas"]["EventKind"].to_string();
        assert!(kinds.contains("personalAccessToken.leaked"), "{kinds}");
        let event = &doc["components"]["schemas"]["TokenEvent"]["properties"];
        assert!(event["leak"].is_object(), "{event}");
        let label = &doc["components"]["schemas"]["LeakLabel"]["properties"];
        assert!(label["token_hash"].is_object() && label["label"].is_object());
        assert!(label.get("token_raw").is_none());
    }
}
