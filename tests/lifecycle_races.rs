//! Management writes that race each other through the HTTP API: a rename, a rotation and a
//! revocation of one token, interleaved. Whatever the order, a revocation is never undone and a
//! secret rotated away never works again.
//!
//! The same for a token that acts on itself or on another token while it is changed: it never
//! undoes its own narrowing, disabling or shortened expiry, nor hands another token what it has
//! just lost, nor deletes or revokes another token with a scope it has just lost (or once
//! disabled).
//!
//! First deterministically (a store wrapper holds a handler between its read of the record and
//! its write, or lands another write there), then as a stress test over real databases: two "nodes" (two stores, two layers,
//! two admin routers) over one SQLite file, and over one PostgreSQL database (with
//! `DATABASE_URL`; without it those tests say they are skipped).

mod common;
mod support_admin;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::routing;
use chrono::{DateTime, Utc};
use http::{Method, StatusCode};
use support_admin::{BASE, patch, post};
use tokio::sync::{mpsc, oneshot};
use tower_pat::admin::{self, AdminConfig, EventKind, TokenEvent};
use tower_pat::store::{ChangeListener, ListQuery, Page};
use tower_pat::{
    CallerGuard, MemoryStore, NewToken, PatAuthLayer, Principal, Rotation, ScopeSet, StoreError,
    TokenHash, TokenLookup, TokenPatch, TokenRecord, TokenStore, Tokens, UsageUpdate,
};

// ---------------------------------------------------------------------------------------------
// A store whose `get` can be held

/// Holds the next `get` of one id after it has read the record, until released.
#[derive(Clone, Default)]
struct Gate(Arc<Mutex<Option<Armed>>>);

struct Armed {
    id: String,
    reached: oneshot::Sender<()>,
    release: oneshot::Receiver<()>,
}

/// The test's side of an armed gate.
struct Held {
    reached: oneshot::Receiver<()>,
    release: oneshot::Sender<()>,
}

impl Gate {
    /// Arms the gate for the next `get` of `id`.
    fn arm(&self, id: &str) -> Held {
        let (reached_tx, reached_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        *self.0.lock().unwrap() = Some(Armed {
            id: id.to_owned(),
            reached: reached_tx,
            release: release_rx,
        });
        Held {
            reached: reached_rx,
            release: release_tx,
        }
    }

    fn take(&self, id: &str) -> Option<Armed> {
        let mut armed = self.0.lock().unwrap();
        if armed.as_ref().is_some_and(|a| a.id == id) {
            armed.take()
        } else {
            None
        }
    }
}

/// A [`MemoryStore`] whose `get` stops at the [`Gate`] once it has read the record: the handler
/// that called it holds a snapshot that the test then makes stale.
#[derive(Clone, Default)]
struct GatedStore {
    inner: MemoryStore,
    gate: Gate,
    /// A token renamed right after every read of it: its holder changing it all the time.
    churn: Arc<Mutex<Option<String>>>,
    /// Holds the next `update` or `rotate` of one id before it writes.
    write_gate: Gate,
}

#[async_trait]
impl TokenLookup for GatedStore {
    async fn find_by_hash(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
        self.inner.find_by_hash(hash).await
    }

    async fn record_usage(&self, updates: &[UsageUpdate]) -> Result<(), StoreError> {
        self.inner.record_usage(updates).await
    }

    fn subscribe(&self, listener: std::sync::Weak<dyn ChangeListener>) -> bool {
        self.inner.subscribe(listener)
    }
}

impl GatedStore {
    /// Stops at the write gate if it is armed for `id`.
    async fn hold_write(&self, id: &str) {
        if let Some(armed) = self.write_gate.take(id) {
            let _ = armed.reached.send(());
            let _ = armed.release.await;
        }
    }
}

#[async_trait]
impl TokenStore for GatedStore {
    async fn insert(&self, record: &TokenRecord) -> Result<(), StoreError> {
        self.inner.insert(record).await
    }

    async fn get(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        let snapshot = self.inner.get(id).await;
        let churned = self.churn.lock().unwrap().as_deref() == Some(id);
        if churned {
            // Another name and other scopes, all within what the token had.
            let n = common::rand_suffix();
            let scopes = if n.is_multiple_of(2) {
                ScopeSet::parse(["x:a"])
            } else {
                ScopeSet::parse(["x:a", "personalAccessToken:read"])
            };
            let patch = TokenPatch::new(Utc::now())
                .name(format!("churn-{n}"))
                .scopes(scopes.unwrap());
            let _ = self.inner.update(id, &patch).await;
        }
        if let Some(armed) = self.gate.take(id) {
            let _ = armed.reached.send(());
            let _ = armed.release.await;
        }
        snapshot
    }

    async fn list(&self, query: &ListQuery) -> Result<Page, StoreError> {
        self.inner.list(query).await
    }

    async fn update(&self, id: &str, patch: &TokenPatch) -> Result<TokenRecord, StoreError> {
        self.hold_write(id).await;
        self.inner.update(id, patch).await
    }

    async fn rotate(&self, id: &str, rotation: &Rotation) -> Result<TokenRecord, StoreError> {
        self.hold_write(id).await;
        self.inner.rotate(id, rotation).await
    }

    async fn revoke(&self, id: &str, at: DateTime<Utc>) -> Result<Option<TokenRecord>, StoreError> {
        self.inner.revoke(id, at).await
    }

    async fn delete(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.inner.delete(id).await
    }

    async fn revoke_if_covered(
        &self,
        id: &str,
        at: DateTime<Utc>,
        covering: &ScopeSet,
    ) -> Result<Option<TokenRecord>, StoreError> {
        self.inner.revoke_if_covered(id, at, covering).await
    }

    async fn delete_if_covered(
        &self,
        id: &str,
        covering: &ScopeSet,
    ) -> Result<Option<TokenRecord>, StoreError> {
        self.inner.delete_if_covered(id, covering).await
    }

    async fn count_by_subject(&self, subject: &str) -> Result<u64, StoreError> {
        self.inner.count_by_subject(subject).await
    }
}

// ---------------------------------------------------------------------------------------------
// A store that lands another write at a chosen moment

/// Another node's write, landed at a chosen moment: `patch` applied to `target`.
struct Landing {
    target: String,
    patch: TokenPatch,
}

/// A memory store that applies a [`Landing`] after the `pass`th `get` of one id, right before
/// the next `get` of it or the next management write or insertion (`arm_get`), or right before
/// the next management write or insertion (`arm_write`).
/// `guarded`: whether it forwards the caller guard ([`TokenStore::checks_caller_guard`],
/// `insert_below_guarded`, `revoke_if_covered_guarded`, `delete_if_covered_guarded`); without,
/// the management API falls back to reading the caller again.
#[derive(Clone)]
struct Interleave {
    inner: MemoryStore,
    guarded: bool,
    on_get: Arc<Mutex<Option<(String, u32, Landing)>>>,
    on_write: Arc<Mutex<Option<Landing>>>,
}

impl Interleave {
    fn new(guarded: bool) -> Self {
        Self {
            inner: MemoryStore::new(),
            guarded,
            on_get: Arc::default(),
            on_write: Arc::default(),
        }
    }

    fn arm_get(&self, id: &str, pass: u32, target: &str, patch: TokenPatch) {
        let landing = Landing {
            target: target.to_owned(),
            patch,
        };
        *self.on_get.lock().unwrap() = Some((id.to_owned(), pass, landing));
    }

    /// Lands a write armed for a `get` that never came (the request made no further store call):
    /// it lands after the request, as the other node's write would have.
    async fn land_pending(&self) {
        let pending = self.on_get.lock().unwrap().take().map(|(_, _, l)| l);
        self.land(pending).await;
    }

    fn arm_write(&self, target: &str, patch: TokenPatch) {
        *self.on_write.lock().unwrap() = Some(Landing {
            target: target.to_owned(),
            patch,
        });
    }

    async fn land(&self, landing: Option<Landing>) {
        if let Some(l) = landing {
            self.inner
                .update(&l.target, &l.patch)
                .await
                .expect("the other write");
        }
    }

    /// Lands the write armed for the next write, and one armed for a `get` whose passes are
    /// spent: it lands before the next read of its id or the next write, whichever comes first.
    async fn before_write(&self) {
        let landing = self.on_write.lock().unwrap().take();
        self.land(landing).await;
        let spent = {
            let mut armed = self.on_get.lock().unwrap();
            match armed.as_ref() {
                Some((_, 0, _)) => armed.take().map(|(_, _, l)| l),
                _ => None,
            }
        };
        self.land(spent).await;
    }
}

#[async_trait]
impl TokenLookup for Interleave {
    async fn find_by_hash(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
        self.inner.find_by_hash(hash).await
    }
    async fn record_usage(&self, updates: &[UsageUpdate]) -> Result<(), StoreError> {
        self.inner.record_usage(updates).await
    }
    fn subscribe(&self, listener: std::sync::Weak<dyn ChangeListener>) -> bool {
        self.inner.subscribe(listener)
    }
}

#[async_trait]
impl TokenStore for Interleave {
    async fn insert(&self, record: &TokenRecord) -> Result<(), StoreError> {
        self.before_write().await;
        self.inner.insert(record).await
    }
    async fn get(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        let landing = {
            let mut armed = self.on_get.lock().unwrap();
            match armed.as_mut() {
                Some((armed_id, 0, _)) if armed_id == id => armed.take().map(|(_, _, l)| l),
                Some((armed_id, pass, _)) if armed_id == id => {
                    *pass -= 1;
                    None
                }
                _ => None,
            }
        };
        self.land(landing).await;
        self.inner.get(id).await
    }
    async fn list(&self, query: &ListQuery) -> Result<Page, StoreError> {
        self.inner.list(query).await
    }
    async fn update(&self, id: &str, patch: &TokenPatch) -> Result<TokenRecord, StoreError> {
        self.before_write().await;
        self.inner.update(id, patch).await
    }
    async fn rotate(&self, id: &str, rotation: &Rotation) -> Result<TokenRecord, StoreError> {
        self.before_write().await;
        self.inner.rotate(id, rotation).await
    }
    async fn revoke(&self, id: &str, at: DateTime<Utc>) -> Result<Option<TokenRecord>, StoreError> {
        self.inner.revoke(id, at).await
    }
    async fn delete(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.inner.delete(id).await
    }
    async fn revoke_if_covered(
        &self,
        id: &str,
        at: DateTime<Utc>,
        covering: &ScopeSet,
    ) -> Result<Option<TokenRecord>, StoreError> {
        self.before_write().await;
        self.inner.revoke_if_covered(id, at, covering).await
    }
    async fn delete_if_covered(
        &self,
        id: &str,
        covering: &ScopeSet,
    ) -> Result<Option<TokenRecord>, StoreError> {
        self.before_write().await;
        self.inner.delete_if_covered(id, covering).await
    }
    async fn revoke_if_covered_guarded(
        &self,
        id: &str,
        at: DateTime<Utc>,
        covering: &ScopeSet,
        caller: &CallerGuard,
    ) -> Result<Option<TokenRecord>, StoreError> {
        if !self.guarded {
            return Err(StoreError::Unsupported {
                operation: "revoke_if_covered_guarded",
            });
        }
        self.before_write().await;
        self.inner
            .revoke_if_covered_guarded(id, at, covering, caller)
            .await
    }
    async fn delete_if_covered_guarded(
        &self,
        id: &str,
        covering: &ScopeSet,
        caller: &CallerGuard,
    ) -> Result<Option<TokenRecord>, StoreError> {
        if !self.guarded {
            return Err(StoreError::Unsupported {
                operation: "delete_if_covered_guarded",
            });
        }
        self.before_write().await;
        self.inner
            .delete_if_covered_guarded(id, covering, caller)
            .await
    }
    async fn count_by_subject(&self, subject: &str) -> Result<u64, StoreError> {
        self.inner.count_by_subject(subject).await
    }
    async fn insert_below(&self, record: &TokenRecord, max: u64) -> Result<bool, StoreError> {
        self.before_write().await;
        self.inner.insert_below(record, max).await
    }
    async fn insert_below_guarded(
        &self,
        record: &TokenRecord,
        max: u64,
        caller: &CallerGuard,
    ) -> Result<bool, StoreError> {
        if !self.guarded {
            return Err(StoreError::Unsupported {
                operation: "insert_below_guarded",
            });
        }
        self.before_write().await;
        self.inner.insert_below_guarded(record, max, caller).await
    }
    fn checks_caller_guard(&self) -> bool {
        self.guarded && self.inner.checks_caller_guard()
    }
}

fn scopes(s: &[&str]) -> ScopeSet {
    ScopeSet::parse(s.iter().copied()).unwrap()
}

const WIDE: [&str; 3] = ["personalAccessToken:*", "x:a", "x:b"];
const NARROW: [&str; 2] = ["personalAccessToken:*", "x:a"];

// ---------------------------------------------------------------------------------------------
// Deterministic: a token changed while it acts on itself or on another token

/// A token narrowed (x:b taken away) right after the handler's check of the caller PATCHes itself
/// back to x:b: x:b stays gone (the PATCH changes nothing as read, or is refused). Before, the
/// handler read the token a second time as its target, conditioned the write on that read, and
/// the token undid its own narrowing.
#[tokio::test]
async fn a_token_cannot_undo_its_own_narrowing_racing_its_patch() {
    let store = Interleave::new(true);
    let node = Node::new(store.clone());
    let (id, secret) = node.issue(&WIDE).await;
    // Past the check's read of the caller, before the next read of it.
    store.arm_get(
        &id,
        1,
        &id,
        TokenPatch::new(Utc::now()).scopes(scopes(&NARROW)),
    );
    let body = r#"{"scopes": ["personalAccessToken:*", "x:a", "x:b"]}"#;
    let res = patch(&node.app, &format!("{BASE}/{id}"), &secret, body).await;
    store.land_pending().await;
    assert!(
        [StatusCode::OK, StatusCode::CONFLICT].contains(&res.status),
        "{}",
        res.text
    );
    assert!(
        !node.record(&id).await.scopes.grants("x:b"),
        "x:b came back"
    );
}

/// A token disabled right after the handler's check of the caller PATCHes itself `active: true`:
/// it stays disabled (as for the narrowing).
#[tokio::test]
async fn a_disabled_token_cannot_enable_itself_racing_the_disabling() {
    let store = Interleave::new(true);
    let node = Node::new(store.clone());
    let (id, secret) = node.issue(&WIDE).await;
    store.arm_get(&id, 1, &id, TokenPatch::new(Utc::now()).disable());
    let res = patch(
        &node.app,
        &format!("{BASE}/{id}"),
        &secret,
        r#"{"active": true}"#,
    )
    .await;
    store.land_pending().await;
    assert!(
        [StatusCode::OK, StatusCode::CONFLICT].contains(&res.status),
        "{}",
        res.text
    );
    assert!(
        node.record(&id).await.disabled_at.is_some(),
        "it enabled itself"
    );
}

/// A token whose expiry is cut short right after the handler's check of the caller rotates itself
/// (`POST /self/rotate`, no scope needed) with `expiresAt` just before its old expiry: refused,
/// and the short expiry stays.
#[tokio::test]
async fn a_token_cannot_restore_its_shortened_expiry_by_rotating_itself() {
    let store = Interleave::new(true);
    let node = Node::new(store.clone());
    let long = Utc::now() + chrono::Duration::days(30);
    let short = Utc::now() + chrono::Duration::hours(1);
    let new = NewToken::new("alice", "long")
        .scopes(WIDE)
        .unwrap()
        .expires_at(long);
    let (record, secret) = node.tokens.issue(new).await.unwrap();
    let (id, secret) = (record.id, secret.expose_secret().to_owned());
    store.arm_get(
        &id,
        1,
        &id,
        TokenPatch::new(Utc::now()).expires_at(Some(short)),
    );
    let body = format!(
        r#"{{"expiresAt": "{}"}}"#,
        (long - chrono::Duration::seconds(1)).to_rfc3339()
    );
    let res = post(&node.app, &format!("{BASE}/self/rotate"), &secret, &body).await;
    assert_eq!(res.status, StatusCode::CONFLICT, "{}", res.text);
    let stored = node.record(&id).await;
    assert!(
        stored.expires_at.unwrap() <= short,
        "expiry extended: {:?}",
        stored.expires_at
    );
    assert_eq!(stored.hash, record.hash, "the rotation applied");
}

/// Token A (x:a, x:b) gives token B (x:a) the scope x:b; A loses x:b after the handler checked A
/// and before the write (in the store's guard) or before the read of B (the fallback of a store
/// without the guard). Refused (409); B never gets x:b from a token that no longer has it.
#[tokio::test]
async fn a_token_narrowed_during_its_patch_hands_another_nothing_it_lost() {
    for (guarded, at_write) in [(true, true), (true, false), (false, false)] {
        let store = Interleave::new(guarded);
        let node = Node::new(store.clone());
        let (a, secret) = node.issue(&WIDE).await;
        let (b, _) = node.issue(&["x:a"]).await;
        let narrowing = TokenPatch::new(Utc::now()).scopes(scopes(&NARROW));
        if at_write {
            store.arm_write(&a, narrowing);
        } else {
            store.arm_get(&b, 0, &a, narrowing);
        }
        let res = patch(
            &node.app,
            &format!("{BASE}/{b}"),
            &secret,
            r#"{"scopes": ["x:a", "x:b"]}"#,
        )
        .await;
        assert!(!node.record(&a).await.scopes.grants("x:b"));
        assert_eq!(
            res.status,
            StatusCode::CONFLICT,
            "guard {guarded}, at write {at_write}: {}",
            res.text
        );
        assert!(
            !node.record(&b).await.scopes.grants("x:b"),
            "B got x:b (guard {guarded}, at write {at_write})"
        );
    }
}

/// Token A rotates token B with an `expiresAt` within A's expiry; A's expiry is cut short before
/// the write: refused (409), B keeps its secret and expiry.
#[tokio::test]
async fn a_token_shortened_during_a_rotation_gives_another_no_longer_expiry() {
    let store = Interleave::new(true);
    let node = Node::new(store.clone());
    let long = Utc::now() + chrono::Duration::days(30);
    let short = Utc::now() + chrono::Duration::hours(1);
    let issue = |name: &str, scopes: &[&str]| {
        NewToken::new("alice", name)
            .scopes(scopes)
            .unwrap()
            .expires_at(long)
    };
    let (a, secret) = node.tokens.issue(issue("a", &WIDE)).await.unwrap();
    let (b, _) = node.tokens.issue(issue("b", &["x:a"])).await.unwrap();
    store.arm_write(&a.id, TokenPatch::new(Utc::now()).expires_at(Some(short)));
    let body = format!(
        r#"{{"expiresAt": "{}"}}"#,
        (long - chrono::Duration::days(1)).to_rfc3339()
    );
    let res = post(
        &node.app,
        &format!("{BASE}/{}/rotate", b.id),
        secret.expose_secret(),
        &body,
    )
    .await;
    assert_eq!(res.status, StatusCode::CONFLICT, "{}", res.text);
    assert_eq!(node.record(&b.id).await, b, "B changed");
}

/// Token A creates a child with x:b; A loses x:b between the handler's check and the insert:
/// refused (409), no child with x:b.
#[tokio::test]
async fn a_token_narrowed_during_a_create_mints_no_child_with_what_it_lost() {
    let store = Interleave::new(true);
    let node = Node::new(store.clone());
    let (a, secret) = node.issue(&WIDE).await;
    store.arm_write(&a, TokenPatch::new(Utc::now()).scopes(scopes(&NARROW)));
    let body = r#"{"name": "child", "scopes": ["x:b"], "userAwareTokenNeverExpires": true}"#;
    let res = post(&node.app, BASE, &secret, body).await;
    assert_eq!(res.status, StatusCode::CONFLICT, "{}", res.text);
    assert_eq!(
        node.store.count_by_subject("alice").await.unwrap(),
        1,
        "a child was minted with a scope its creator lost"
    );
}

/// Token A (x:a, x:b) deletes or revokes token B; A is changed (`change`: x:b taken away, or
/// disabled) after the handler checked A, and before the write (in the store's guard) or before
/// the read of B (the fallback of a store without the guard). Refused (409), B intact: §8, acting
/// on a token needs every scope it holds, and A deletes with the scopes it had when checked.
async fn a_changed_caller_acts_on_nothing(delete: bool, target: &[&str], change: TokenPatch) {
    for (guarded, at_write) in [(true, true), (true, false), (false, false)] {
        let store = Interleave::new(guarded);
        let node = Node::new(store.clone());
        let (a, secret) = node.issue(&WIDE).await;
        let (b, _) = node.issue(target).await;
        let before = node.record(&b).await;
        if at_write {
            store.arm_write(&a, change.clone());
        } else {
            store.arm_get(&b, 0, &a, change.clone());
        }
        let res = if delete {
            support_admin::call(
                &node.app,
                Method::DELETE,
                &format!("{BASE}/{b}"),
                Some(&secret),
                None,
            )
            .await
        } else {
            patch(
                &node.app,
                &format!("{BASE}/{b}"),
                &secret,
                r#"{"revoked": true}"#,
            )
            .await
        };
        let stored_a = node.record(&a).await;
        assert!(
            stored_a.version > 0 && (stored_a.is_disabled() || !stored_a.scopes.grants("x:b")),
            "the change of A landed"
        );
        assert_eq!(
            res.status,
            StatusCode::CONFLICT,
            "delete {delete}, guard {guarded}, at write {at_write}: {}",
            res.text
        );
        assert_eq!(
            node.store.get(&b).await.unwrap().as_ref(),
            Some(&before),
            "B {} by a caller changed since its check (guard {guarded}, at write {at_write})",
            if delete { "deleted" } else { "revoked" }
        );
    }
}

/// A (x:a, x:b) deletes B (x:b); A loses x:b after the handler checked it: B stays.
#[tokio::test]
async fn a_token_narrowed_during_a_delete_does_not_delete_what_it_no_longer_covers() {
    let narrowing = TokenPatch::new(Utc::now()).scopes(scopes(&NARROW));
    a_changed_caller_acts_on_nothing(true, &["x:b"], narrowing).await;
}

/// The same through `PATCH {"revoked": true}`: B stays unrevoked.
#[tokio::test]
async fn a_token_narrowed_during_a_revocation_does_not_revoke_what_it_no_longer_covers() {
    let narrowing = TokenPatch::new(Utc::now()).scopes(scopes(&NARROW));
    a_changed_caller_acts_on_nothing(false, &["x:b"], narrowing).await;
}

/// A (x:a, x:b) deletes B (x:a), a scope A keeps; A is disabled after the handler checked it: a
/// disabled token deletes nothing.
#[tokio::test]
async fn a_token_disabled_during_a_delete_deletes_nothing() {
    a_changed_caller_acts_on_nothing(true, &["x:a"], TokenPatch::new(Utc::now()).disable()).await;
}

// ---------------------------------------------------------------------------------------------
// A node: a store, a layer, the admin API and one protected route

struct Node {
    app: Router,
    store: Arc<dyn TokenStore>,
    tokens: Tokens,
    layer: PatAuthLayer,
}

impl Node {
    fn new<S: TokenStore + Clone>(store: S) -> Self {
        Self::with_events(store, None)
    }

    /// A node whose admin API sends its change events to `events`, if given.
    fn with_events<S: TokenStore + Clone>(
        store: S,
        events: Option<mpsc::Sender<TokenEvent>>,
    ) -> Self {
        let tokens = Tokens::new(store);
        let layer = tokens.layer().build();
        let mut config = AdminConfig::new(&tokens, &layer).unwrap();
        if let Some(events) = events {
            config = config.events(events);
        }
        let protected = Router::new()
            .route(
                "/hello",
                routing::get(|p: Principal| async move { p.subject().to_owned() }),
            )
            .layer(layer.clone());
        let app = Router::new()
            .nest(BASE, admin::router(config))
            .merge(protected);
        Self {
            app,
            store: Arc::clone(tokens.store()),
            tokens,
            layer,
        }
    }

    /// Inserts a never-expiring token of `alice` with `scopes`; returns its id and secret.
    async fn issue(&self, scopes: &[&str]) -> (String, String) {
        let name = format!("t-{}", common::rand_suffix());
        let new = NewToken::new("alice", name).scopes(scopes).unwrap();
        let (record, secret) = self.tokens.issue(new).await.unwrap();
        (record.id, secret.expose_secret().to_owned())
    }

    /// A token that may manage every token of `alice`.
    async fn manager(&self) -> String {
        self.issue(&["personalAccessToken:*", "x:*"]).await.1
    }

    /// The status of `GET /hello` with `secret` on this node.
    async fn hello(&self, secret: &str) -> StatusCode {
        support_admin::get(&self.app, "/hello", secret).await.status
    }

    async fn record(&self, id: &str) -> TokenRecord {
        self.store.get(id).await.unwrap().expect("the record")
    }
}

fn is_refusal(status: StatusCode) -> bool {
    status == StatusCode::CONFLICT || status == StatusCode::GONE
}

// ---------------------------------------------------------------------------------------------
// Deterministic races

/// A deletion or a revocation reads the record and checks that the caller holds its scopes; the
/// token is then given a scope the caller lacks; then the write: it finds the token changed, reads
/// and checks it again, and refuses (403), the token, now more than the caller, still there.
/// Acting on a token needs every scope it holds when the write lands, not only when it was read.
/// (A rename in between only makes it read again: `renames_racing_revocations_on_two_nodes`.)
#[tokio::test]
async fn a_delete_or_revocation_racing_a_widening_acts_on_nothing() {
    let store = GatedStore::default();
    let node = Node::new(store.clone());
    let (_, weak) = node.issue(&["personalAccessToken:*", "x:a"]).await;
    let manager = node.manager().await;
    for action in ["delete", "revoke"] {
        let (target, _) = node.issue(&["x:a"]).await;
        let held = store.gate.arm(&target);
        let (app, uri, caller) = (node.app.clone(), format!("{BASE}/{target}"), weak.clone());
        let write = tokio::spawn(async move {
            match action {
                "delete" => {
                    support_admin::call(&app, http::Method::DELETE, &uri, Some(&caller), None).await
                }
                _ => patch(&app, &uri, &caller, r#"{"revoked": true}"#).await,
            }
        });
        held.reached.await.unwrap();
        let widened = patch(
            &node.app,
            &format!("{BASE}/{target}"),
            &manager,
            r#"{"scopes": ["x:a", "x:b"]}"#,
        )
        .await;
        assert_eq!(widened.status, StatusCode::OK, "{}", widened.text);
        held.release.send(()).unwrap();
        let res = write.await.unwrap();
        assert_eq!(res.status, StatusCode::FORBIDDEN, "{action}: {}", res.text);
        assert_eq!(res.body["code"], "insufficient_scope");
        let stored = node.record(&target).await;
        assert!(!stored.is_revoked(), "{action}: revoked");
        assert!(
            stored.scopes.grants("x:b"),
            "{action}: not the widened token"
        );
    }
}

/// The holder of a leaked token changes it after every read of it (a new name and other scopes
/// within its own, as its holder may; a rotation needs no scope at all) while its owner revokes
/// it, or deletes it: both go through at once. Their condition is that the owner holds every scope
/// the token holds when it is written, which none of these changes; a condition on the version,
/// or on the exact scopes, would fail every time.
#[tokio::test]
async fn a_token_changed_after_every_read_is_still_revoked_and_deleted() {
    let store = GatedStore::default();
    let node = Node::new(store.clone());
    let manager = node.manager().await;
    for action in ["revoke", "delete"] {
        let (target, secret) = node.issue(&["personalAccessToken:*", "x:a"]).await;
        *store.churn.lock().unwrap() = Some(target.clone());
        let uri = format!("{BASE}/{target}");
        let res = match action {
            "delete" => {
                support_admin::call(&node.app, http::Method::DELETE, &uri, Some(&manager), None)
                    .await
            }
            _ => patch(&node.app, &uri, &manager, r#"{"revoked": true}"#).await,
        };
        *store.churn.lock().unwrap() = None;
        assert_eq!(res.status, StatusCode::OK, "{action}: {}", res.text);
        assert_eq!(
            node.hello(&secret).await,
            StatusCode::UNAUTHORIZED,
            "{action}"
        );
        let stored = node.store.get(&target).await.unwrap();
        match action {
            "delete" => assert!(stored.is_none(), "deleted"),
            _ => assert!(stored.is_some_and(|r| r.is_revoked()), "revoked"),
        }
    }
}

/// A new expiry (or a rotation) is checked against a token that has not expired yet, and written
/// after it has (the write is held at the store): the write finds it expired (409
/// `token_expired`) and the token stays expired, as if the request had come a moment later.
#[tokio::test]
async fn a_token_expiring_between_the_check_and_the_write_is_not_revived() {
    let store = GatedStore::default();
    let node = Node::new(store.clone());
    let manager = node.manager().await;
    for action in ["expiry", "rotate"] {
        let expires = Utc::now() + chrono::Duration::milliseconds(300);
        let new = NewToken::new("alice", format!("short-{action}"))
            .scopes(["x:a"])
            .unwrap()
            .expires_at(expires);
        let (record, _) = node.tokens.issue(new).await.unwrap();
        let held = store.write_gate.arm(&record.id);
        let (app, uri, caller) = (
            node.app.clone(),
            format!("{BASE}/{}", record.id),
            manager.clone(),
        );
        let body = format!(
            r#"{{"expiresAt": "{}"}}"#,
            (Utc::now() + chrono::Duration::hours(1)).to_rfc3339()
        );
        let write = tokio::spawn(async move {
            match action {
                "expiry" => patch(&app, &uri, &caller, &body).await,
                _ => post(&app, &format!("{uri}/rotate"), &caller, "{}").await,
            }
        });
        held.reached.await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        held.release.send(()).unwrap();
        let res = write.await.unwrap();
        assert_eq!(res.status, StatusCode::CONFLICT, "{action}: {}", res.text);
        assert_eq!(res.body["code"], "token_expired", "{action}");
        let stored = node.record(&record.id).await;
        assert_eq!(stored.expires_at, record.expires_at, "{action}: revived");
        assert_eq!(stored.hash, record.hash, "{action}: rotated");
    }
}

/// Two revocations of one token race: the first reads the token (active) and is held; the second
/// revokes it; the first then writes and finds it revoked already. Both succeed (a revocation is
/// idempotent), and one `personalAccessToken.revoked` event is sent, by the request whose write
/// revoked the token: the other's record carries the earlier revocation time. Both ways a
/// revocation is asked for: `DELETE /self` twice, and `PATCH {"revoked": true}` racing
/// `DELETE /self`.
#[tokio::test]
async fn racing_revocations_send_one_revoked_event() {
    let (tx, mut events) = mpsc::channel::<TokenEvent>(64);
    let store = GatedStore::default();
    let node = Node::with_events(store.clone(), Some(tx));
    let manager = node.manager().await;
    for first in ["DELETE /self", "PATCH"] {
        let (id, secret) = node.issue(&["x:read"]).await;
        let uri = format!("{BASE}/{id}");
        let self_uri = format!("{BASE}/self");
        // The first request stops once it has read the token: `DELETE /self` at its check of
        // its own token, the `PATCH` at its read of the target.
        let held = store.gate.arm(&id);
        let (app, secret2, manager2) = (node.app.clone(), secret.clone(), manager.clone());
        let (uri2, self_uri2) = (uri.clone(), self_uri.clone());
        let held_request = tokio::spawn(async move {
            match first {
                "PATCH" => patch(&app, &uri2, &manager2, r#"{"revoked": true}"#).await,
                _ => {
                    let method = http::Method::DELETE;
                    support_admin::call(&app, method, &self_uri2, Some(&secret2), None).await
                }
            }
        });
        held.reached.await.unwrap();
        let method = http::Method::DELETE;
        let second = support_admin::call(&node.app, method, &self_uri, Some(&secret), None).await;
        assert_eq!(second.status, StatusCode::NO_CONTENT, "{}", second.text);
        let revoked_at = node.record(&id).await.revoked_at.expect("revoked");
        held.release.send(()).unwrap();
        let held_response = held_request.await.unwrap();
        match first {
            "PATCH" => {
                assert_eq!(
                    held_response.status,
                    StatusCode::OK,
                    "{}",
                    held_response.text
                );
                assert_eq!(held_response.body["revoked"], true);
            }
            _ => assert_eq!(
                held_response.status,
                StatusCode::NO_CONTENT,
                "{}",
                held_response.text
            ),
        }
        assert_eq!(node.record(&id).await.revoked_at, Some(revoked_at));
        let mut revoked = Vec::new();
        while let Ok(event) = events.try_recv() {
            if event.event == EventKind::Revoked && event.data.id == id {
                assert!(event.is_alert());
                revoked.push(event.triggered_at);
            }
        }
        assert_eq!(
            revoked,
            [revoked_at],
            "{first} racing DELETE /self: one revocation, {} `revoked` events",
            revoked.len()
        );
    }
}

/// A rename reads the record, a revocation lands, then the rename writes: the token stays revoked.
#[tokio::test]
async fn a_rename_racing_a_revocation_never_undoes_it() {
    let store = GatedStore::default();
    let node = Node::new(store.clone());
    let manager = node.manager().await;
    let (id, secret) = node.issue(&["x:read"]).await;
    let uri = format!("{BASE}/{id}");
    assert_eq!(node.hello(&secret).await, StatusCode::OK);

    let held = store.gate.arm(&id);
    let rename = {
        let (app, uri, manager) = (node.app.clone(), uri.clone(), manager.clone());
        tokio::spawn(async move { patch(&app, &uri, &manager, r#"{"name": "renamed"}"#).await })
    };
    held.reached.await.unwrap();
    let revoke = patch(&node.app, &uri, &manager, r#"{"revoked": true}"#).await;
    assert_eq!(revoke.status, StatusCode::OK, "{}", revoke.text);
    held.release.send(()).unwrap();
    let renamed = rename.await.unwrap();

    let stored = node.record(&id).await;
    assert!(stored.revoked_at.is_some(), "the revocation was undone");
    assert_eq!(node.hello(&secret).await, StatusCode::UNAUTHORIZED);
    assert_eq!(renamed.status, StatusCode::GONE, "{}", renamed.text);
    assert_eq!(renamed.body["code"], "token_revoked");
    assert_ne!(stored.name, "renamed");
}

/// A rotation reads the record, a revocation lands, then the rotation writes: neither the old
/// secret nor any new one works.
#[tokio::test]
async fn a_rotation_racing_a_revocation_never_undoes_it() {
    let store = GatedStore::default();
    let node = Node::new(store.clone());
    let manager = node.manager().await;
    let (id, old) = node.issue(&["x:read"]).await;
    let uri = format!("{BASE}/{id}");
    assert_eq!(node.hello(&old).await, StatusCode::OK);

    let held = store.gate.arm(&id);
    let rotate = {
        let (app, uri, manager) = (node.app.clone(), uri.clone(), manager.clone());
        tokio::spawn(async move { post(&app, &format!("{uri}/rotate"), &manager, "").await })
    };
    held.reached.await.unwrap();
    let revoke = patch(&node.app, &uri, &manager, r#"{"revoked": true}"#).await;
    assert_eq!(revoke.status, StatusCode::OK, "{}", revoke.text);
    held.release.send(()).unwrap();
    let rotated = rotate.await.unwrap();

    assert!(
        node.record(&id).await.revoked_at.is_some(),
        "the revocation was undone"
    );
    assert_eq!(node.hello(&old).await, StatusCode::UNAUTHORIZED);
    if let Some(new) = rotated.body["token"].as_str() {
        assert_eq!(
            node.hello(new).await,
            StatusCode::UNAUTHORIZED,
            "the new secret works"
        );
    }
    assert_eq!(rotated.status, StatusCode::GONE, "{}", rotated.text);
    assert_eq!(rotated.body["code"], "token_revoked");
}

/// A rename reads the record, a rotation lands (the old secret leaked), then the rename writes:
/// the old secret never works again and the new one keeps working.
#[tokio::test]
async fn a_rename_racing_a_rotation_never_restores_the_old_secret() {
    let store = GatedStore::default();
    let node = Node::new(store.clone());
    let manager = node.manager().await;
    let (id, old) = node.issue(&["x:read"]).await;
    let uri = format!("{BASE}/{id}");

    let held = store.gate.arm(&id);
    let rename = {
        let (app, uri, manager) = (node.app.clone(), uri.clone(), manager.clone());
        tokio::spawn(async move { patch(&app, &uri, &manager, r#"{"name": "renamed"}"#).await })
    };
    held.reached.await.unwrap();
    let rotated = post(&node.app, &format!("{uri}/rotate"), &manager, "").await;
    assert_eq!(rotated.status, StatusCode::CREATED, "{}", rotated.text);
    let new = rotated.body["token"].as_str().unwrap().to_owned();
    held.release.send(()).unwrap();
    let renamed = rename.await.unwrap();

    assert_eq!(
        node.hello(&old).await,
        StatusCode::UNAUTHORIZED,
        "the old secret is back"
    );
    assert_eq!(node.hello(&new).await, StatusCode::OK);
    assert_eq!(renamed.status, StatusCode::CONFLICT, "{}", renamed.text);
    assert_eq!(renamed.body["code"], "conflict");
    let stored = node.record(&id).await;
    assert_eq!(stored.hash, node.layer.hasher().hash(&new));
    assert_ne!(stored.name, "renamed");
}

// ---------------------------------------------------------------------------------------------
// Stress: two nodes over one database

/// `rounds` times: a fresh token, renamed through node `a` while node `b` revokes it. Then no
/// revocation is undone and both nodes refuse every token.
async fn rename_revoke_races(a: &Node, b: &Node, rounds: usize) {
    let manager = a.manager().await;
    let (mut undone, mut served, mut refused, mut odd) = (0, 0, 0, Vec::new());
    for round in 0..rounds {
        let (id, secret) = a.issue(&["x:read"]).await;
        let uri = format!("{BASE}/{id}");
        let rename = {
            let (app, uri, manager) = (a.app.clone(), uri.clone(), manager.clone());
            let body = format!(r#"{{"name": "renamed-{round}"}}"#);
            tokio::spawn(async move { patch(&app, &uri, &manager, &body).await })
        };
        let revoke = {
            let (app, uri, manager) = (b.app.clone(), uri.clone(), manager.clone());
            tokio::spawn(async move { patch(&app, &uri, &manager, r#"{"revoked": true}"#).await })
        };
        let (rename, revoke) = (rename.await.unwrap(), revoke.await.unwrap());
        if revoke.status != StatusCode::OK {
            odd.push(format!("revoke {}: {}", revoke.status, revoke.text));
        }
        if is_refusal(rename.status) {
            refused += 1;
        } else if rename.status != StatusCode::OK {
            odd.push(format!("rename {}: {}", rename.status, rename.text));
        }
        if a.record(&id).await.revoked_at.is_none() {
            undone += 1;
        }
        for node in [a, b] {
            if node.hello(&secret).await != StatusCode::UNAUTHORIZED {
                served += 1;
            }
        }
    }
    // How often the race was lost by the other write (seen with --nocapture).
    println!("{refused} of {rounds} writes refused after the revocation");
    assert_eq!(undone, 0, "{undone} of {rounds} revocations undone");
    assert_eq!(served, 0, "{served} requests with a revoked token served");
    assert!(odd.is_empty(), "unexpected answers: {odd:?}");
}

/// `rounds` times: a fresh token, rotated through node `a` while node `b` revokes it. Then no
/// revocation is undone and neither the old nor the new secret works on either node.
async fn rotate_revoke_races(a: &Node, b: &Node, rounds: usize) {
    let manager = a.manager().await;
    let (mut undone, mut served, mut refused, mut odd) = (0, 0, 0, Vec::new());
    for _ in 0..rounds {
        let (id, old) = a.issue(&["x:read"]).await;
        let uri = format!("{BASE}/{id}");
        let rotate = {
            let (app, uri, manager) = (a.app.clone(), uri.clone(), manager.clone());
            tokio::spawn(async move { post(&app, &format!("{uri}/rotate"), &manager, "").await })
        };
        let revoke = {
            let (app, uri, manager) = (b.app.clone(), uri.clone(), manager.clone());
            tokio::spawn(async move { patch(&app, &uri, &manager, r#"{"revoked": true}"#).await })
        };
        let (rotate, revoke) = (rotate.await.unwrap(), revoke.await.unwrap());
        if revoke.status != StatusCode::OK {
            odd.push(format!("revoke {}: {}", revoke.status, revoke.text));
        }
        if is_refusal(rotate.status) {
            refused += 1;
        } else if rotate.status != StatusCode::CREATED {
            odd.push(format!("rotate {}: {}", rotate.status, rotate.text));
        }
        if a.record(&id).await.revoked_at.is_none() {
            undone += 1;
        }
        let new = rotate.body["token"].as_str().map(str::to_owned);
        for node in [a, b] {
            for secret in std::iter::once(&old).chain(new.as_ref()) {
                if node.hello(secret).await != StatusCode::UNAUTHORIZED {
                    served += 1;
                }
            }
        }
    }
    // How often the race was lost by the other write (seen with --nocapture).
    println!("{refused} of {rounds} writes refused after the revocation");
    assert_eq!(undone, 0, "{undone} of {rounds} revocations undone");
    assert_eq!(served, 0, "{served} requests with a revoked token served");
    assert!(odd.is_empty(), "unexpected answers: {odd:?}");
}

/// `rounds` times: a fresh token T with x:a and x:b. On node b a manager takes x:b away from T
/// (or disables it, `disable`) while T, on node a, PATCHes itself back to what it had (four
/// requests at once). Panics if, in a round where the manager's write succeeded, T ends with x:b
/// (or enabled) again.
async fn self_undo_races(a: &Node, b: &Node, disable: bool, rounds: usize) {
    let manager = a.manager().await;
    let (admin_body, self_body) = if disable {
        (r#"{"active": false}"#, r#"{"active": true}"#)
    } else {
        (
            r#"{"scopes": ["personalAccessToken:*", "x:a"]}"#,
            r#"{"scopes": ["personalAccessToken:*", "x:a", "x:b"]}"#,
        )
    };
    let (mut undone, mut applied) = (0, 0);
    for round in 0..rounds {
        let (id, secret) = a.issue(&WIDE).await;
        let uri = format!("{BASE}/{id}");
        let mut selfs = Vec::new();
        for _ in 0..4 {
            let (app, uri, secret) = (a.app.clone(), uri.clone(), secret.clone());
            selfs.push(tokio::spawn(async move {
                patch(&app, &uri, &secret, self_body).await
            }));
            tokio::task::yield_now().await;
            if round % 2 == 0 {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        let by_admin = patch(&b.app, &uri, &manager, admin_body).await;
        for s in selfs {
            s.await.unwrap();
        }
        if by_admin.status != StatusCode::OK {
            continue;
        }
        applied += 1;
        let stored = a.record(&id).await;
        if (disable && stored.disabled_at.is_none()) || (!disable && stored.scopes.grants("x:b")) {
            undone += 1;
        }
    }
    assert!(applied > 0, "the manager's write never applied");
    assert_eq!(
        undone, 0,
        "{undone} of {applied} changes undone by the token itself"
    );
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use tower_pat::store::SqliteStore;

    use super::{Node, rename_revoke_races, rotate_revoke_races};

    /// Two stores over one fresh SQLite file, and the directory to remove afterwards.
    async fn two_nodes() -> (Node, Node, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "tower-pat-races-{}-{}",
            std::process::id(),
            super::common::rand_suffix()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens.db");
        let a = SqliteStore::open(&path).await.unwrap();
        let b = SqliteStore::open(&path).await.unwrap();
        (Node::new(a), Node::new(b), dir)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn renames_racing_revocations_on_two_nodes() {
        let (a, b, dir) = two_nodes().await;
        rename_revoke_races(&a, &b, 300).await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rotations_racing_revocations_on_two_nodes() {
        let (a, b, dir) = two_nodes().await;
        rotate_revoke_races(&a, &b, 100).await;
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use tower_pat::store::PostgresStore;

    use super::common::pg::TestDb;
    use super::{Node, rename_revoke_races, rotate_revoke_races, self_undo_races};

    /// Two stores over one fresh database; `None` without `DATABASE_URL`.
    async fn two_nodes() -> Option<(Node, Node, TestDb)> {
        let db = TestDb::create("lifecycle_races").await?;
        let a = PostgresStore::builder()
            .connect_with(db.options.clone())
            .await
            .unwrap();
        let b = PostgresStore::builder()
            .connect_with(db.options.clone())
            .await
            .unwrap();
        Some((Node::new(a), Node::new(b), db))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn renames_racing_revocations_on_two_nodes() {
        let Some((a, b, _db)) = two_nodes().await else {
            return;
        };
        rename_revoke_races(&a, &b, 300).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rotations_racing_revocations_on_two_nodes() {
        let Some((a, b, _db)) = two_nodes().await else {
            return;
        };
        rotate_revoke_races(&a, &b, 100).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn self_patches_racing_a_narrowing_on_two_nodes_never_undo_it() {
        let Some((a, b, _db)) = two_nodes().await else {
            return;
        };
        self_undo_races(&a, &b, false, 200).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn self_patches_racing_a_disabling_on_two_nodes_never_undo_it() {
        let Some((a, b, _db)) = two_nodes().await else {
            return;
        };
        self_undo_races(&a, &b, true, 200).await;
    }
}
