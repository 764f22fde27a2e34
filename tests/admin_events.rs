//! Change events: what a sink receives, and the webhook sink's signed deliveries, retries and
//! bounded queue.

mod support_admin;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post as post_route;
use hmac::{Hmac, Mac};
use http::{HeaderMap, Method, StatusCode};
use sha2::Sha256;
use support_admin::*;
use tokio::sync::mpsc;
use tower_pat::admin::{
    EVENT_HEADER, EventKind, SIGNATURE_HEADER, SignatureError, TIMESTAMP_HEADER, TokenEvent,
    WebhookSink, verify_signature,
};

const SECRET: &[u8] = b"webhook shared secret";

#[tokio::test]
async fn every_change_emits_one_event_without_the_secret() {
    let (tx, mut rx) = mpsc::channel::<TokenEvent>(16);
    let t = app_with(|c| c.events(tx)).await;
    let res = create(
        &t.app,
        &t.alice,
        r#"{"name": "ev", "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    let id = res.body["id"].as_str().unwrap().to_owned();
    let mut secrets = vec![res.body["token"].as_str().unwrap().to_owned()];
    let uri = format!("{BASE}/{id}");
    patch(&t.app, &uri, &t.alice, r#"{"name": "ev2"}"#).await;
    let res = post(&t.app, &format!("{uri}/rotate"), &t.alice, "").await;
    secrets.push(res.body["token"].as_str().unwrap().to_owned());
    patch(&t.app, &uri, &t.alice, r#"{"revoked": true}"#).await;
    call(&t.app, Method::DELETE, &uri, Some(&t.alice), None).await;
    // A refused change emits nothing.
    patch(&t.app, &uri, &t.alice, r#"{"name": "gone"}"#)
        .await
        .error(404);

    let mut kinds = Vec::new();
    while let Ok(event) = rx.try_recv() {
        assert_eq!(event.data.id, id);
        let json = serde_json::to_string(&event).unwrap();
        for s in &secrets {
            assert!(!json.contains(s.as_str()), "{json}");
        }
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert!(value["triggeredAt"].is_string());
        assert_eq!(value["event"], event.event.as_str());
        kinds.push((event.event, event.data.name.clone(), event.data.revoked));
    }
    assert_eq!(
        kinds,
        [
            (EventKind::Created, "ev".to_owned(), false),
            (EventKind::Updated, "ev2".to_owned(), false),
            (EventKind::Rotated, "ev2".to_owned(), false),
            (EventKind::Revoked, "ev2".to_owned(), true),
            (EventKind::Deleted, "ev2".to_owned(), true),
        ]
    );
}

/// A webhook receiver on 127.0.0.1: answers each request with the next scripted status (200
/// once the script is used up) and forwards what it received.
async fn receiver(script: &[u16]) -> (String, mpsc::UnboundedReceiver<(HeaderMap, Bytes)>) {
    type Shared = (
        Arc<Mutex<VecDeque<u16>>>,
        mpsc::UnboundedSender<(HeaderMap, Bytes)>,
    );
    async fn hook(
        State((script, tx)): State<Shared>,
        headers: HeaderMap,
        body: Bytes,
    ) -> StatusCode {
        let _ = tx.send((headers, body));
        let status = script.lock().unwrap().pop_front().unwrap_or(200);
        StatusCode::from_u16(status).unwrap()
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let state: Shared = (Arc::new(Mutex::new(script.iter().copied().collect())), tx);
    let app = Router::new()
        .route("/hook", post_route(hook))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), rx)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`, computed here independently of the crate.
fn expected_signature(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex(&mac.finalize().into_bytes()))
}

fn verify(headers: &HeaderMap, body: &[u8]) {
    let timestamp = headers[TIMESTAMP_HEADER].to_str().unwrap();
    let expected = expected_signature(SECRET, timestamp, body);
    assert_eq!(headers[SIGNATURE_HEADER], expected.as_str());
    let ts: i64 = timestamp.parse().unwrap();
    assert!((chrono::Utc::now().timestamp() - ts).abs() < 60);
    assert_eq!(headers["content-type"], "application/json");
}

async fn next(rx: &mut mpsc::UnboundedReceiver<(HeaderMap, Bytes)>) -> (HeaderMap, Bytes) {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a webhook delivery within 10 s")
        .unwrap()
}

#[tokio::test]
async fn the_webhook_receives_a_correctly_signed_event() {
    let (url, mut rx) = receiver(&[]).await;
    let sink = WebhookSink::builder(&url, SECRET).unwrap().spawn();
    let t = app_with(|c| c.events(sink.clone())).await;
    let res = create(
        &t.app,
        &t.alice,
        r#"{"name": "hooked", "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    let secret = res.body["token"].as_str().unwrap();

    let (headers, body) = next(&mut rx).await;
    verify(&headers, &body);
    assert_eq!(headers[EVENT_HEADER], "personalAccessToken.created");
    let text = std::str::from_utf8(&body).unwrap();
    assert!(!text.contains(secret));
    let event: TokenEvent = serde_json::from_slice(&body).unwrap();
    assert_eq!(event.event, EventKind::Created);
    assert_eq!(event.data.name, "hooked");
    assert_eq!(event.data.id, res.body["id"].as_str().unwrap());
    let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(value["event"], "personalAccessToken.created");
    assert_eq!(value["data"]["userId"], "alice");

    // Another secret would not verify.
    let timestamp = headers[TIMESTAMP_HEADER].to_str().unwrap();
    assert_ne!(
        headers[SIGNATURE_HEADER],
        expected_signature(b"another secret", timestamp, &body).as_str()
    );
    for _ in 0..100 {
        if sink.delivered() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!((sink.delivered(), sink.failed(), sink.dropped()), (1, 0, 0));
}

/// A replay: the attacker captured one delivery and sends it again later with a fresh
/// `X-Timestamp` to get past the receiver's age check. The signature covers the timestamp, so
/// the fresh timestamp does not verify; neither does a tampered body.
#[tokio::test]
async fn the_signature_covers_the_timestamp_so_a_replay_with_a_fresh_one_fails() {
    let (url, mut rx) = receiver(&[]).await;
    let sink = WebhookSink::builder(&url, SECRET).unwrap().spawn();
    let t = app_with(|c| c.events(sink.clone())).await;
    create(
        &t.app,
        &t.alice,
        r#"{"name": "replayed", "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    let (headers, body) = next(&mut rx).await;
    let signature = headers[SIGNATURE_HEADER].to_str().unwrap();
    let timestamp = headers[TIMESTAMP_HEADER].to_str().unwrap();
    assert_eq!(signature, expected_signature(SECRET, timestamp, &body));

    let sent: i64 = timestamp.parse().unwrap();
    let fresh = (sent + 3600).to_string();
    assert_ne!(
        signature,
        expected_signature(SECRET, &fresh, &body),
        "a fresh timestamp must not verify under the old signature"
    );
    let mut tampered = body.to_vec();
    tampered.extend_from_slice(b" ");
    assert_ne!(signature, expected_signature(SECRET, timestamp, &tampered));

    // The crate's receiver-side helper agrees: the delivery as sent verifies, the replays do not.
    let now = chrono::Utc::now();
    let tolerance = Duration::from_secs(300);
    let sig = &headers[SIGNATURE_HEADER];
    let ts = &headers[TIMESTAMP_HEADER];
    assert_eq!(
        verify_signature(SECRET, ts, &body, sig, now, tolerance),
        Ok(())
    );
    assert_eq!(
        verify_signature(SECRET, &fresh, &body, sig, now, tolerance),
        Err(SignatureError::Mismatch)
    );
    assert_eq!(
        verify_signature(SECRET, ts, &tampered, sig, now, tolerance),
        Err(SignatureError::Mismatch)
    );
    // Replayed as is, an hour later: correctly signed, but stale.
    let later = now + chrono::Duration::seconds(3600);
    assert_eq!(
        verify_signature(SECRET, ts, &body, sig, later, tolerance),
        Err(SignatureError::Stale)
    );
}

#[test]
fn verify_signature_refuses_every_malformed_or_out_of_window_delivery() {
    let body = br#"{"event":"personalAccessToken.revoked"}"#;
    let now = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
    let tol = Duration::from_secs(300);
    let ts = "1700000000";
    let good = expected_signature(SECRET, ts, body);
    assert_eq!(verify_signature(SECRET, ts, body, &good, now, tol), Ok(()));
    // Upper-case hex is the same signature.
    let upper = format!("sha256={}", good["sha256=".len()..].to_ascii_uppercase());
    assert_eq!(verify_signature(SECRET, ts, body, &upper, now, tol), Ok(()));

    // The tolerance holds in both directions, inclusive at its edge.
    for (skew, ok) in [(-300, true), (300, true), (-301, false), (301, false)] {
        let at = now + chrono::Duration::seconds(skew);
        let expected = if ok {
            Ok(())
        } else {
            Err(SignatureError::Stale)
        };
        assert_eq!(
            verify_signature(SECRET, ts, body, &good, at, tol),
            expected,
            "{skew}"
        );
    }
    assert_eq!(
        verify_signature(b"another secret", ts, body, &good, now, tol),
        Err(SignatureError::Mismatch)
    );
    // A timestamp written differently (leading zero, sign, spaces) is another message: it must
    // be refused, not normalised into the signed one.
    for bad_ts in ["01700000000", "+1700000000", " 1700000000", "1700000000 "] {
        let sig = expected_signature(SECRET, ts, body);
        assert!(
            verify_signature(SECRET, bad_ts, body, &sig, now, tol).is_err(),
            "{bad_ts:?}"
        );
    }
    for bad_ts in ["", "-1", "17e8", "99999999999999999999", "１７"] {
        let sig = expected_signature(SECRET, bad_ts, body);
        assert_eq!(
            verify_signature(SECRET, bad_ts, body, &sig, now, tol),
            Err(SignatureError::MalformedTimestamp),
            "{bad_ts:?}"
        );
    }
    let hex_part = &good["sha256=".len()..];
    for bad_sig in [
        String::new(),
        hex_part.to_owned(),
        format!("sha1={hex_part}"),
        format!("sha256={}", &hex_part[..62]),
        format!("sha256={hex_part}00"),
        format!("sha256={}zz", &hex_part[..62]),
        format!("SHA256={hex_part}"),
    ] {
        assert_eq!(
            verify_signature(SECRET, ts, body, &bad_sig, now, tol),
            Err(SignatureError::MalformedSignature),
            "{bad_sig:?}"
        );
    }
    // The error says nothing of the secret or the expected signature.
    let shown = format!(
        "{:?} {}",
        SignatureError::Mismatch,
        SignatureError::Mismatch
    );
    assert!(!shown.contains(hex_part) && !shown.contains("webhook shared secret"));
}

#[test]
fn verify_signature_refuses_a_delivery_forged_with_an_empty_secret() {
    // A receiver whose secret is unset (an empty environment variable) must not accept what
    // anyone can sign with the empty key, even correctly signed and fresh.
    let body = br#"{"event":"personalAccessToken.revoked"}"#;
    let now = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
    let tol = Duration::from_secs(300);
    let ts = "1700000000";
    let forged = expected_signature(b"", ts, body);
    assert_eq!(
        verify_signature(b"", ts, body, &forged, now, tol),
        Err(SignatureError::EmptySecret)
    );
    assert_eq!(
        verify_signature("", ts, body, &forged, now, tol),
        Err(SignatureError::EmptySecret)
    );
    // Whatever the delivery: a malformed one is refused for the same reason.
    assert_eq!(
        verify_signature(b"", "", body, "", now, tol),
        Err(SignatureError::EmptySecret)
    );
    // The forged delivery does not verify under a real secret either.
    assert_eq!(
        verify_signature(SECRET, ts, body, &forged, now, tol),
        Err(SignatureError::Mismatch)
    );
}

#[tokio::test]
async fn failed_deliveries_are_retried_with_backoff_then_given_up() {
    // 503, 500, then 200: three attempts of the same signed body.
    let (url, mut rx) = receiver(&[503, 500]).await;
    let sink = WebhookSink::builder(&url, SECRET)
        .unwrap()
        .backoff(Duration::from_millis(20), Duration::from_millis(100))
        .spawn();
    let t = app_with(|c| c.events(sink.clone())).await;
    create(
        &t.app,
        &t.alice,
        r#"{"name": "retry", "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    let first = next(&mut rx).await;
    let second = next(&mut rx).await;
    let third = next(&mut rx).await;
    for (headers, body) in [&first, &second, &third] {
        verify(headers, body);
        assert_eq!(body, &first.1);
    }
    for _ in 0..100 {
        if sink.delivered() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!((sink.delivered(), sink.failed()), (1, 0));

    // A 400 is not retried; two 500s with two attempts are given up.
    let (url, mut rx) = receiver(&[400, 500, 500]).await;
    let sink = WebhookSink::builder(&url, SECRET)
        .unwrap()
        .max_attempts(2)
        .backoff(Duration::from_millis(10), Duration::from_millis(10))
        .spawn();
    let t = app_with(|c| c.events(sink.clone())).await;
    for name in ["a", "b"] {
        create(
            &t.app,
            &t.alice,
            &format!(r#"{{"name": "{name}", "userAwareTokenNeverExpires": true}}"#),
        )
        .await;
    }
    for _ in 0..3 {
        next(&mut rx).await;
    }
    for _ in 0..100 {
        if sink.failed() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!((sink.delivered(), sink.failed()), (0, 2));
    assert!(rx.try_recv().is_err(), "no fourth attempt");
}

#[tokio::test]
async fn a_full_queue_drops_events_and_never_delays_the_api() {
    let url = support_admin::hanging_receiver().await;
    let sink = WebhookSink::builder(&url, SECRET)
        .unwrap()
        .queue_capacity(2)
        .timeout(Duration::from_secs(120))
        .spawn();
    let t = app_with(|c| c.events(sink.clone())).await;
    let calls = async {
        for i in 0..6 {
            create(
                &t.app,
                &t.alice,
                &format!(r#"{{"name": "n{i}", "userAwareTokenNeverExpires": true}}"#),
            )
            .await;
        }
    };
    // A hang guard, not a speed measure: the webhook never answers, the API must not wait for it.
    tokio::time::timeout(Duration::from_secs(20), calls)
        .await
        .expect("the API calls completed while the webhook hangs");
    // One event in flight (or still queued), two queued, the rest dropped.
    assert!(sink.dropped() >= 3, "dropped {}", sink.dropped());
    assert_eq!(sink.delivered(), 0);
}

#[test]
fn webhook_urls_must_be_absolute_http() {
    for bad in [
        "not a url",
        "/relative",
        "https://example.test/hook",
        "ftp://h/x",
    ] {
        assert!(WebhookSink::builder(bad, SECRET).is_err(), "{bad}");
    }
    assert!(WebhookSink::builder("http://127.0.0.1:9/x", SECRET).is_ok());
    let debug = format!(
        "{:?}",
        WebhookSink::builder("http://127.0.0.1:9/x", SECRET).unwrap()
    );
    assert!(!debug.contains("webhook shared secret"));
}

/// What goes in the alerts queue: what happens at most once per token (or purge run). What a
/// caller with write access can repeat at will is routine, so that it cannot crowd them out.
#[test]
fn alerts_are_what_a_caller_cannot_repeat_at_will() {
    for kind in [
        EventKind::Created,
        EventKind::Revoked,
        EventKind::Deleted,
        EventKind::Leaked,
        EventKind::Expiring,
        EventKind::Expired,
        EventKind::Purged,
    ] {
        assert!(kind.is_alert(), "{kind:?}");
    }
    for kind in [
        EventKind::Updated,
        EventKind::Rotated,
        EventKind::Disabled,
        EventKind::Enabled,
        EventKind::Reused,
    ] {
        assert!(!kind.is_alert(), "{kind:?}");
    }
}

#[test]
fn event_names_match_their_json() {
    for kind in [
        EventKind::Created,
        EventKind::Updated,
        EventKind::Rotated,
        EventKind::Revoked,
        EventKind::Deleted,
        EventKind::Disabled,
        EventKind::Enabled,
        EventKind::Purged,
        EventKind::Leaked,
        EventKind::Expiring,
        EventKind::Expired,
        EventKind::Reused,
    ] {
        assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        assert_eq!(kind.to_string(), kind.as_str());
    }
}

/// The builder's `Debug` names where events go, not a URL's credentials (user info, a secret
/// path, a query); an empty signing secret is refused.
#[test]
fn the_webhook_builder_hides_the_url_and_refuses_an_empty_secret() {
    let builder = WebhookSink::builder(
        "http://hook:pw-s3cret@receiver:9000/T0/B0/xoxb-s3cret?k=s3cret",
        SECRET,
    )
    .unwrap();
    let shown = format!("{builder:?}");
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(shown.contains("receiver:9000"), "{shown}");
    let err = WebhookSink::builder("http://receiver:9000/hook", b"").unwrap_err();
    assert!(err.to_string().contains("secret"), "{err}");
}

/// A caller with write access renames its token in a loop against a slow receiver, filling the
/// queue, then creates a token: the creation is still delivered (and first), because renames
/// queue apart from the alerts.
#[tokio::test]
async fn a_flood_of_renames_cannot_push_out_a_creation() {
    async fn slow(
        headers: HeaderMap,
        State(tx): State<mpsc::UnboundedSender<String>>,
    ) -> StatusCode {
        let event = headers[EVENT_HEADER].to_str().unwrap().to_owned();
        let _ = tx.send(event);
        tokio::time::sleep(Duration::from_millis(100)).await;
        StatusCode::OK
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let app = Router::new()
        .route("/hook", post_route(slow))
        .with_state(tx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let sink = WebhookSink::builder(&format!("http://{addr}/hook"), SECRET)
        .unwrap()
        .queue_capacity(4)
        .spawn();
    let t = app_with(|c| c.events(sink.clone())).await;
    let res = create(
        &t.app,
        &t.alice,
        r#"{"name": "flood", "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    let uri = format!("{BASE}/{}", res.body["id"].as_str().unwrap());
    for i in 0..40 {
        let body = format!(r#"{{"name": "flood{i}"}}"#);
        assert_eq!(
            patch(&t.app, &uri, &t.alice, &body).await.status,
            StatusCode::OK
        );
    }
    assert!(sink.dropped() > 0, "the renames overflow their queue");
    let dropped = sink.dropped();
    create(
        &t.app,
        &t.alice,
        r#"{"name": "hidden", "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    assert_eq!(sink.dropped(), dropped, "the creation was dropped");
    let mut seen = Vec::new();
    let created = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(event) = rx.recv().await {
            seen.push(event.clone());
            if seen.len() > 1 && event == "personalAccessToken.created" {
                return;
            }
        }
    })
    .await;
    assert!(created.is_ok(), "the creation never arrived: {seen:?}");
    // The first creation, then at most the renames in flight before the second creation.
    assert!(seen.len() <= 4, "{seen:?}");
}
