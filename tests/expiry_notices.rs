//! Expiry notices (`tower_pat::notices`): `personalAccessToken.expiring` once per token within
//! the lead before its expiry, `personalAccessToken.expired` once it has expired, through the
//! events sinks (a channel, and the signed webhook). Run on the memory store, SQLite (two handles
//! on one file, as two servers, claiming at once) and PostgreSQL (two nodes over one database,
//! with `DATABASE_URL`; skipped with a note without it).
#![cfg(feature = "admin")]

mod common;
mod support_admin;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::mpsc;
use tower_pat::admin::{
    EVENT_HEADER, EventKind, SIGNATURE_HEADER, TIMESTAMP_HEADER, TokenEvent, TokenEvents,
    TokenView, WebhookSink, verify_signature,
};
use tower_pat::notices::{ExpiryNoticeConfig, ExpiryNotices};
use tower_pat::{
    MemoryStore, NewToken, Rotation, TokenPatch, TokenRecord, TokenSecret, TokenStore, Tokens,
};

/// Issues `name` for alice expiring at `expires` (never: `None`).
async fn issue(
    tokens: &Tokens,
    name: &str,
    expires: Option<DateTime<Utc>>,
) -> (TokenRecord, TokenSecret) {
    let mut new = NewToken::new("alice", name).scopes(["api"]).unwrap();
    if let Some(at) = expires {
        new = new.expires_at(at);
    }
    tokens.issue(new).await.unwrap()
}

/// A notice handle (no background task) sending to a channel, and the channel's receiver.
fn notices(
    tokens: &Tokens,
    config: ExpiryNoticeConfig,
) -> (ExpiryNotices, mpsc::Receiver<TokenEvent>) {
    let (tx, rx) = mpsc::channel(1024);
    (tokens.expiry_notices(config).events(tx).build(), rx)
}

fn drain(rx: &mut mpsc::Receiver<TokenEvent>) -> Vec<TokenEvent> {
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    events
}

/// `(kind, token name)` of each event, sorted.
fn names(events: &[TokenEvent]) -> Vec<(EventKind, String)> {
    let mut v: Vec<(EventKind, String)> = events
        .iter()
        .map(|e| (e.event, e.data.name.clone()))
        .collect();
    v.sort_by(|a, b| (a.0.as_str(), &a.1).cmp(&(b.0.as_str(), &b.1)));
    v
}

fn kind(k: EventKind, name: &str) -> (EventKind, String) {
    (k, name.to_owned())
}

#[tokio::test]
async fn each_notice_is_sent_once_and_carries_no_secret() {
    let tokens = Tokens::new(MemoryStore::new());
    let now = Utc::now();
    let (soon, soon_secret) = issue(&tokens, "soon", Some(now + TimeDelta::days(2))).await;
    let (_, expired_secret) = issue(&tokens, "expired", Some(now - TimeDelta::hours(1))).await;
    issue(&tokens, "later", Some(now + TimeDelta::days(30))).await;
    issue(&tokens, "never", None).await;
    let (revoked, _) = issue(&tokens, "revoked", Some(now + TimeDelta::days(1))).await;
    tokens.revoke(&revoked.id).await.unwrap();
    let (revoked_expired, _) =
        issue(&tokens, "revoked-expired", Some(now - TimeDelta::days(1))).await;
    tokens.revoke(&revoked_expired.id).await.unwrap();

    let (notices, mut rx) = notices(&tokens, ExpiryNoticeConfig::default());
    let report = notices.run_once().await.unwrap().unwrap();
    assert_eq!((report.expiring, report.expired), (1, 1));
    for _ in 0..3 {
        let report = notices.run_once().await.unwrap().unwrap();
        assert_eq!((report.expiring, report.expired), (0, 0));
    }
    let events = drain(&mut rx);
    assert_eq!(
        names(&events),
        [
            kind(EventKind::Expired, "expired"),
            kind(EventKind::Expiring, "soon"),
        ]
    );
    let expiring = events
        .iter()
        .find(|e| e.event == EventKind::Expiring)
        .unwrap();
    assert_eq!(expiring.data.id, soon.id);
    assert_eq!(expiring.data.expires_at, soon.expires_at);
    for e in &events {
        let json = serde_json::to_string(e).unwrap();
        for secret in [&soon_secret, &expired_secret] {
            assert!(!json.contains(secret.expose_secret()), "{json}");
        }
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["event"], e.event.as_str());
    }
    let stats = notices.stats();
    assert_eq!(
        (stats.runs, stats.expiring, stats.expired, stats.errors),
        (4, 1, 1, 0)
    );
}

#[tokio::test]
async fn an_extended_token_is_noticed_again() {
    let store = MemoryStore::new();
    let tokens = Tokens::new(store.clone());
    let now = Utc::now();
    let (soon, _) = issue(&tokens, "soon", Some(now + TimeDelta::days(1))).await;
    let (notices, mut rx) = notices(&tokens, ExpiryNoticeConfig::default());
    notices.run_once().await.unwrap();
    assert_eq!(names(&drain(&mut rx)), [kind(EventKind::Expiring, "soon")]);

    // Renamed: no new notice.
    let renamed = store
        .update(&soon.id, &TokenPatch::new(Utc::now()).name("renamed"))
        .await
        .unwrap();
    notices.run_once().await.unwrap();
    assert!(drain(&mut rx).is_empty());

    // Extended within the lead: noticed again, with the new expiry.
    let extended_to = now + TimeDelta::days(5);
    let extended = store
        .update(
            &soon.id,
            &TokenPatch::new(Utc::now()).expires_at(Some(extended_to)),
        )
        .await
        .unwrap();
    notices.run_once().await.unwrap();
    let events = drain(&mut rx);
    assert_eq!(names(&events), [kind(EventKind::Expiring, "renamed")]);
    assert_eq!(events[0].data.expires_at, extended.expires_at);
    assert_eq!(renamed.version + 1, extended.version);

    // Rotated with a new expiry beyond the lead: nothing now, noticed when it comes near.
    let far = now + TimeDelta::days(20);
    // A fresh secret's hash, minted without storing it.
    let (fresh, _) = Tokens::new(MemoryStore::new()).mint(NewToken::new("alice", "x"), Utc::now());
    store
        .rotate(
            &soon.id,
            &Rotation::new(extended.hash, fresh.hash, "pat_x", Utc::now()).expires_at(Some(far)),
        )
        .await
        .unwrap();
    notices.run_once().await.unwrap();
    assert!(drain(&mut rx).is_empty());
    let (near, mut rx2) = notices_with_lead(&tokens, TimeDelta::days(21));
    near.run_once().await.unwrap();
    assert_eq!(
        names(&drain(&mut rx2)),
        [kind(EventKind::Expiring, "renamed")]
    );
}

fn notices_with_lead(
    tokens: &Tokens,
    lead: TimeDelta,
) -> (ExpiryNotices, mpsc::Receiver<TokenEvent>) {
    notices(
        tokens,
        ExpiryNoticeConfig::default().lead(lead.to_std().unwrap()),
    )
}

#[tokio::test]
async fn disabled_notices_send_nothing_and_a_zero_lead_only_expired() {
    let tokens = Tokens::new(MemoryStore::new());
    let now = Utc::now();
    issue(&tokens, "soon", Some(now + TimeDelta::days(1))).await;
    issue(&tokens, "expired", Some(now - TimeDelta::days(1))).await;
    let (off, mut rx) = notices(&tokens, ExpiryNoticeConfig::default().enabled(false));
    assert_eq!(off.run_once().await.unwrap(), None);
    assert!(drain(&mut rx).is_empty());
    let (zero, mut rx) = notices(&tokens, ExpiryNoticeConfig::default().lead(Duration::ZERO));
    zero.run_once().await.unwrap();
    assert_eq!(
        names(&drain(&mut rx)),
        [kind(EventKind::Expired, "expired")]
    );
}

#[tokio::test]
async fn the_background_task_sends_notices_and_stops_at_shutdown() {
    let tokens = Tokens::new(MemoryStore::new());
    let now = Utc::now();
    issue(&tokens, "soon", Some(now + TimeDelta::days(1))).await;
    let (tx, mut rx) = mpsc::channel(16);
    let task = tokens
        .expiry_notices(ExpiryNoticeConfig::default().interval(Duration::from_millis(20)))
        .events(tx)
        .spawn();
    let event = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a notice within 10 s")
        .unwrap();
    assert_eq!(event.event, EventKind::Expiring);
    tokio::time::sleep(Duration::from_millis(100)).await;
    task.shutdown().await;
    assert!(task.stats().runs >= 2, "{:?}", task.stats());
    assert!(rx.try_recv().is_err(), "one notice, however many runs");
}

/// Two handles over one store run at once, many times: every due notice is sent once in all.
async fn two_nodes_send_each_notice_once(a: Tokens, b: Tokens) {
    let now = Utc::now();
    let mut due = Vec::new();
    for i in 0..12 {
        let (r, _) = issue(
            &a,
            &format!("soon-{i}"),
            Some(now + TimeDelta::hours(i + 1)),
        )
        .await;
        due.push((EventKind::Expiring, r.id));
        let (r, _) = issue(
            &a,
            &format!("gone-{i}"),
            Some(now - TimeDelta::hours(i + 1)),
        )
        .await;
        due.push((EventKind::Expired, r.id));
    }
    issue(&a, "later", Some(now + TimeDelta::days(60))).await;
    let config = ExpiryNoticeConfig::default().batch_size(2);
    let (na, mut ra) = notices(&a, config.clone());
    let (nb, mut rb) = notices(&b, config);
    for _ in 0..3 {
        let (x, y) = tokio::join!(
            tokio::spawn({
                let na = na.clone();
                async move { na.run_once().await }
            }),
            tokio::spawn({
                let nb = nb.clone();
                async move { nb.run_once().await }
            }),
        );
        x.unwrap().unwrap();
        y.unwrap().unwrap();
    }
    let mut seen: HashMap<(EventKind, String), usize> = HashMap::new();
    let (ea, eb) = (drain(&mut ra), drain(&mut rb));
    for e in ea.iter().chain(&eb) {
        *seen.entry((e.event, e.data.id.clone())).or_default() += 1;
    }
    for d in &due {
        assert_eq!(seen.get(d), Some(&1), "{d:?} sent {:?} times", seen.get(d));
    }
    assert_eq!(seen.len(), due.len(), "only the due notices are sent");
    let (sa, sb) = (na.stats(), nb.stats());
    assert_eq!(sa.expiring + sb.expiring, 12);
    assert_eq!(sa.expired + sb.expired, 12);
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sqlite_handles_on_one_file_send_each_notice_once() {
    let dir = common::tempdir();
    let path = dir.join("tokens.db");
    let a = tower_pat::SqliteStore::open(&path).await.unwrap();
    let b = tower_pat::SqliteStore::open(&path).await.unwrap();
    two_nodes_send_each_notice_once(Tokens::new(a.clone()), Tokens::new(b.clone())).await;
    a.close().await;
    b.close().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_postgres_nodes_send_each_notice_once() {
    let Some(db) = common::pg::TestDb::create("expiry_notices").await else {
        return;
    };
    let connect = || {
        tower_pat::PostgresStore::builder()
            .max_connections(4)
            .connect_with(db.options.clone())
    };
    let (a, b) = (connect().await.unwrap(), connect().await.unwrap());
    two_nodes_send_each_notice_once(Tokens::new(a.clone()), Tokens::new(b.clone())).await;
    a.pool().close().await;
    b.pool().close().await;
}

/// A sink that can take only 4 events at a time (a channel of 4, read only between runs), and 13
/// notices due: each run sends what the sink takes, half its room (the other half stays for the
/// events that cannot wait), and the claims of the rest are taken back for a later run. Every
/// notice is sent once in all, none is lost.
async fn notices_a_full_sink_cannot_take_are_sent_later(tokens: Tokens) {
    for i in 0..13 {
        issue(
            &tokens,
            &format!("t{i:02}"),
            Some(Utc::now() + TimeDelta::days(1)),
        )
        .await;
    }
    let (tx, mut rx) = mpsc::channel(4);
    let notices = tokens
        .expiry_notices(ExpiryNoticeConfig::default())
        .events(tx)
        .build();
    let mut sent = Vec::new();
    let mut per_run = Vec::new();
    for _ in 0..8 {
        let report = notices.run_once().await.unwrap().unwrap();
        let events = drain(&mut rx);
        assert_eq!(
            report.expiring,
            events.len() as u64,
            "the report counts what was sent"
        );
        per_run.push(report.expiring);
        sent.extend(events);
    }
    assert_eq!(per_run, [2, 2, 2, 2, 2, 2, 1, 0]);
    let mut got = names(&sent);
    got.dedup();
    assert_eq!(got.len(), 13, "each notice once: {got:?}");
    assert!(got.iter().all(|(k, _)| *k == EventKind::Expiring));
    assert_eq!(notices.stats().expiring, 13);
}

#[tokio::test]
async fn notices_a_full_sink_cannot_take_are_sent_by_a_later_run() {
    notices_a_full_sink_cannot_take_are_sent_later(Tokens::new(MemoryStore::new())).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn notices_a_full_sink_cannot_take_are_sent_by_a_later_run_over_sqlite() {
    let dir = common::tempdir();
    let store = tower_pat::SqliteStore::open(dir.join("tokens.db"))
        .await
        .unwrap();
    notices_a_full_sink_cannot_take_are_sent_later(Tokens::new(store.clone())).await;
    store.close().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Mallory's tokens (within the creation limits) all expire a little before alice's, against a
/// webhook whose receiver hangs, so its alerts queue fills: the notices it cannot take are not
/// dropped (nothing counted in `dropped`) but stay due, and a later run with room sends them,
/// alice's among them.
#[tokio::test]
async fn a_notice_the_full_webhook_queue_cannot_take_is_not_lost() {
    let url = support_admin::hanging_receiver().await;
    let sink = WebhookSink::builder(&url, b"k")
        .unwrap()
        .queue_capacity(4)
        .timeout(Duration::from_secs(120))
        .spawn();
    let tokens = Tokens::new(MemoryStore::new());
    for i in 0..12 {
        let new = NewToken::new("mallory", format!("m{i}"))
            .scopes(["api"])
            .unwrap()
            .expires_at(Utc::now() + TimeDelta::days(1));
        tokens.issue(new).await.unwrap();
    }
    issue(&tokens, "victim", Some(Utc::now() + TimeDelta::days(2))).await;
    let webhook = tokens
        .expiry_notices(ExpiryNoticeConfig::default())
        .events(sink.clone())
        .build();
    let first = webhook.run_once().await.unwrap().unwrap();
    assert!(
        first.expiring < 13,
        "the queue of 4 took {} notices",
        first.expiring
    );
    assert_eq!(
        sink.dropped(),
        0,
        "a notice the queue could not take was dropped"
    );
    // The notices took at most half the queue: alerts that cannot wait for a later run (a
    // revocation) still find room, where a backlog of notices offered again by every run would
    // have them dropped.
    let revoked = tokens
        .issue(NewToken::new("bob", "revoked").scopes(["api"]).unwrap())
        .await
        .unwrap()
        .0;
    for _ in 0..2 {
        sink.publish(TokenEvent::new(
            EventKind::Revoked,
            TokenView::new(&revoked, Utc::now()),
            Utc::now(),
        ));
    }
    assert_eq!(
        sink.dropped(),
        0,
        "the notices left no room for a revocation"
    );
    // The queue is still full: nothing more is sent, nothing is lost.
    let second = webhook.run_once().await.unwrap().unwrap();
    assert_eq!(second.expiring, 0);
    assert_eq!(sink.dropped(), 0);
    // A run with room sends every notice the webhook could not take, once.
    let (roomy, mut rx) = notices(&tokens, ExpiryNoticeConfig::default());
    let third = roomy.run_once().await.unwrap().unwrap();
    let events = drain(&mut rx);
    assert_eq!(third.expiring, 13 - first.expiring);
    assert_eq!(events.len() as u64, third.expiring);
    assert!(
        events.iter().any(|e| e.data.subject == "alice"),
        "alice's notice was lost"
    );
}

/// A store that does not implement the claim: the run fails, is counted, and sends nothing.
#[tokio::test]
async fn a_store_without_the_claim_is_reported() {
    struct Plain(MemoryStore);
    #[async_trait::async_trait]
    impl tower_pat::TokenLookup for Plain {
        async fn find_by_hash(
            &self,
            hash: &tower_pat::TokenHash,
        ) -> Result<Option<TokenRecord>, tower_pat::StoreError> {
            self.0.find_by_hash(hash).await
        }
    }
    #[async_trait::async_trait]
    impl TokenStore for Plain {
        async fn insert(&self, r: &TokenRecord) -> Result<(), tower_pat::StoreError> {
            self.0.insert(r).await
        }
        async fn get(&self, id: &str) -> Result<Option<TokenRecord>, tower_pat::StoreError> {
            self.0.get(id).await
        }
        async fn list(
            &self,
            q: &tower_pat::store::ListQuery,
        ) -> Result<tower_pat::store::Page, tower_pat::StoreError> {
            self.0.list(q).await
        }
        async fn update(
            &self,
            id: &str,
            p: &TokenPatch,
        ) -> Result<TokenRecord, tower_pat::StoreError> {
            self.0.update(id, p).await
        }
        async fn rotate(
            &self,
            id: &str,
            r: &Rotation,
        ) -> Result<TokenRecord, tower_pat::StoreError> {
            self.0.rotate(id, r).await
        }
        async fn revoke(
            &self,
            id: &str,
            at: DateTime<Utc>,
        ) -> Result<Option<TokenRecord>, tower_pat::StoreError> {
            self.0.revoke(id, at).await
        }
        async fn delete(&self, id: &str) -> Result<Option<TokenRecord>, tower_pat::StoreError> {
            self.0.delete(id).await
        }
        async fn count_by_subject(&self, s: &str) -> Result<u64, tower_pat::StoreError> {
            self.0.count_by_subject(s).await
        }
    }
    let tokens = Tokens::new(Plain(MemoryStore::new()));
    issue(&tokens, "soon", Some(Utc::now() + TimeDelta::days(1))).await;
    let (n, mut rx) = notices(&tokens, ExpiryNoticeConfig::default());
    let err = n.run_once().await.unwrap_err();
    assert!(
        matches!(
            err,
            tower_pat::StoreError::Unsupported {
                operation: "claim_expiry_notices"
            }
        ),
        "{err}"
    );
    assert_eq!(n.stats().errors, 1);
    assert!(drain(&mut rx).is_empty());
}

/// The webhook receives the notices signed like every other event.
#[tokio::test]
async fn the_webhook_receives_signed_notices() {
    use axum::Router;
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::routing::post;
    use http::HeaderMap;

    const SECRET: &[u8] = b"notice webhook secret";
    type Tx = mpsc::UnboundedSender<(HeaderMap, Bytes)>;
    async fn hook(State(tx): State<Tx>, headers: HeaderMap, body: Bytes) -> http::StatusCode {
        let _ = tx.send((headers, body));
        http::StatusCode::OK
    }
    let (tx, mut deliveries) = mpsc::unbounded_channel();
    let app = Router::new().route("/hook", post(hook)).with_state(tx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let sink = WebhookSink::builder(&format!("http://{addr}/hook"), SECRET)
        .unwrap()
        .spawn();

    let tokens = Tokens::new(MemoryStore::new());
    let (soon, secret) = issue(&tokens, "soon", Some(Utc::now() + TimeDelta::days(3))).await;
    let notices = tokens
        .expiry_notices(ExpiryNoticeConfig::default())
        .events(Arc::new(sink))
        .build();
    notices.run_once().await.unwrap();
    let (headers, body) = tokio::time::timeout(Duration::from_secs(10), deliveries.recv())
        .await
        .expect("a webhook delivery within 10 s")
        .unwrap();
    assert_eq!(headers[EVENT_HEADER], "personalAccessToken.expiring");
    let ts = headers[TIMESTAMP_HEADER].to_str().unwrap();
    let sig = headers[SIGNATURE_HEADER].to_str().unwrap();
    verify_signature(SECRET, ts, &body, sig, Utc::now(), Duration::from_secs(300)).unwrap();
    let text = std::str::from_utf8(&body).unwrap();
    assert!(!text.contains(secret.expose_secret()), "{text}");
    let event: TokenEvent = serde_json::from_slice(&body).unwrap();
    assert_eq!(event.event, EventKind::Expiring);
    assert_eq!(event.data.id, soon.id);
    notices.run_once().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), deliveries.recv())
            .await
            .is_err(),
        "the notice is delivered once"
    );
}

/// Through the management API: a token whose `expiresAt` is changed by `PATCH` is noticed again
/// for its new expiry; a `PATCH` that keeps the expiry, or changes only the name, is not.
#[tokio::test]
async fn a_token_extended_through_the_api_is_noticed_again() {
    use http::StatusCode;
    let t = support_admin::app().await;
    let ours = |events: Vec<TokenEvent>, id: &str| -> Vec<TokenEvent> {
        events.into_iter().filter(|e| e.data.id == id).collect()
    };
    let first = (Utc::now() + TimeDelta::days(2)).to_rfc3339();
    let res = support_admin::create(
        &t.app,
        &t.alice,
        &format!(r#"{{"name": "ext", "expiresAt": "{first}"}}"#),
    )
    .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    let id = res.body["id"].as_str().unwrap().to_owned();
    let uri = format!("{}/{id}", support_admin::BASE);
    let (n, mut rx) = notices(&t.tokens, ExpiryNoticeConfig::default());
    n.run_once().await.unwrap();
    let events = ours(drain(&mut rx), &id);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event, EventKind::Expiring);

    let same = res.body["expiresAt"].as_str().unwrap().to_owned();
    for body in [
        format!(r#"{{"expiresAt": "{same}"}}"#),
        r#"{"name": "renamed"}"#.to_owned(),
    ] {
        let res = support_admin::patch(&t.app, &uri, &t.alice, &body).await;
        assert_eq!(res.status, StatusCode::OK, "{}", res.text);
        n.run_once().await.unwrap();
        assert!(ours(drain(&mut rx), &id).is_empty(), "after {body}");
    }

    let later = (Utc::now() + TimeDelta::days(4)).to_rfc3339();
    let res = support_admin::patch(
        &t.app,
        &uri,
        &t.alice,
        &format!(r#"{{"expiresAt": "{later}"}}"#),
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    n.run_once().await.unwrap();
    let events = ours(drain(&mut rx), &id);
    assert_eq!(events.len(), 1, "the extended token is noticed again");
    assert_eq!(events[0].event, EventKind::Expiring);
    assert_eq!(events[0].data.name, "renamed");
    assert_eq!(
        serde_json::to_value(events[0].data.expires_at).unwrap(),
        res.body["expiresAt"]
    );
    n.run_once().await.unwrap();
    assert!(ours(drain(&mut rx), &id).is_empty());
}

/// A token allowed to manage tokens cannot re-arm its own `expiring` alert: every `PATCH` that
/// changed `expiresAt`, earlier included, cleared the notice claims, so a token shortening its
/// own expiry by a second before each notice run had an alert sent on every run (an alert, ahead
/// of revocations in the webhook's queue). Moving the expiry earlier now leaves the claims; only
/// moving it later, which a token cannot do to itself, makes the notices due again.
#[tokio::test]
async fn a_token_shortening_its_own_expiry_does_not_rearm_its_notice() {
    use http::StatusCode;
    let t = support_admin::app().await;
    let expires = Utc::now() + TimeDelta::days(2);
    let res = support_admin::create(
        &t.app,
        &t.alice,
        &format!(
            r#"{{"name": "self", "scopes": ["personalAccessToken:*"], "expiresAt": "{}"}}"#,
            expires.to_rfc3339()
        ),
    )
    .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    let id = res.body["id"].as_str().unwrap().to_owned();
    let secret = res.body["token"].as_str().unwrap().to_owned();
    let uri = format!("{}/{id}", support_admin::BASE);
    let (n, mut rx) = notices(&t.tokens, ExpiryNoticeConfig::default());
    let ours = |events: Vec<TokenEvent>| -> usize {
        events
            .into_iter()
            .filter(|e| e.data.id == id && e.event == EventKind::Expiring)
            .count()
    };
    n.run_once().await.unwrap();
    assert_eq!(ours(drain(&mut rx)), 1);

    for step in 1..=5 {
        let earlier = expires - TimeDelta::minutes(step);
        let res = support_admin::patch(
            &t.app,
            &uri,
            &secret,
            &format!(r#"{{"expiresAt": "{}"}}"#, earlier.to_rfc3339()),
        )
        .await;
        assert_eq!(res.status, StatusCode::OK, "{}", res.text);
        n.run_once().await.unwrap();
        assert_eq!(ours(drain(&mut rx)), 0, "re-armed by shortening {step} min");
    }
    // Nor can it move its expiry back later than its own.
    let res = support_admin::patch(
        &t.app,
        &uri,
        &secret,
        &format!(r#"{{"expiresAt": "{}"}}"#, expires.to_rfc3339()),
    )
    .await;
    assert_ne!(res.status, StatusCode::OK, "{}", res.text);
    n.run_once().await.unwrap();
    assert_eq!(ours(drain(&mut rx)), 0);
}
