//! One suite, the same test bodies, run against every store: `MemoryStore`, `SqliteStore`
//! (feature `sqlite`) and `PostgresStore` (feature `postgres`, with `DATABASE_URL`; each test in a
//! database of its own).
//!
//! The SQL stores keep times to the microsecond, so the records here are made with such times.

mod common;

use std::net::IpAddr;
use std::sync::{Arc, Mutex, Weak};

use chrono::{DateTime, SubsecRound, TimeDelta, Utc};
use tower_pat::record::{MAX_LAST_USED_IPS, parse_ip_net};
use tower_pat::store::{
    ChangeListener, LastUsedFilter, ListQuery, SortKey, StoreError, StoreEvent,
};
use tower_pat::{
    MemoryStore, NewToken, Rotation, ScopeSet, TokenHash, TokenLookup, TokenPatch, TokenRecord,
    TokenStore, Tokens, UsageUpdate,
};

// ---------------------------------------------------------------------------------------------
// Fixtures

fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn token(subject: &str, name: &str) -> TokenRecord {
    let new = NewToken::new(subject, name)
        .scopes(["repo:read", "user:*"])
        .unwrap();
    // A record made as the handle makes them, without storing it: each test inserts it itself.
    Tokens::new(MemoryStore::new()).mint(new, now()).0
}

fn other_hash() -> TokenHash {
    token("x", "x").hash
}

/// Records every event it hears.
#[derive(Default)]
struct Events(Mutex<Vec<StoreEvent>>);

impl ChangeListener for Events {
    fn on_event(&self, event: &StoreEvent) {
        self.0.lock().unwrap().push(event.clone());
    }
}

impl Events {
    fn subscribe<S: TokenStore>(store: &S) -> Arc<Self> {
        let events = Arc::new(Self::default());
        let weak: Weak<dyn ChangeListener> = Arc::downgrade(&events) as Weak<dyn ChangeListener>;
        assert!(store.subscribe(weak), "the store has a change feed");
        events
    }

    /// Whether `Changed` for this id and hash was heard (a shared store may deliver it twice:
    /// locally, then through its feed).
    fn heard(&self, id: &str, hash: TokenHash) -> bool {
        self.0.lock().unwrap().contains(&StoreEvent::Changed {
            id: id.to_owned(),
            hash,
        })
    }

    fn clear(&self) {
        self.0.lock().unwrap().clear();
    }
}

fn assert_conflict<T: std::fmt::Debug>(result: Result<T, StoreError>, field: &str) {
    match result {
        Err(StoreError::Conflict { field: f }) => assert_eq!(f, field),
        other => panic!("expected a conflict on {field}, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The suite

async fn insert_and_get_round_trip<S: TokenStore>(store: S) {
    let t = now();
    let mut r = token("alice", "laptop")
        .expires_at_for_test(t + TimeDelta::days(30))
        .token_type_for_test("service");
    r.ip_restriction = vec![
        parse_ip_net("10.0.0.0/8").unwrap(),
        parse_ip_net("2001:db8::/32").unwrap(),
    ];
    r.last_used_at = Some(t - TimeDelta::seconds(5));
    r.last_used_ips = vec![ip("10.1.2.3"), ip("2001:db8::7")];
    r.last_rotated_at = Some(t - TimeDelta::hours(1));
    r.previous_hash = Some((other_hash(), t + TimeDelta::minutes(10)));
    r.name = "Ärger über CI".to_owned();
    store.insert(&r).await.unwrap();

    assert_eq!(store.get(&r.id).await.unwrap(), Some(r.clone()));
    assert_eq!(store.get("no-such-id").await.unwrap(), None);

    let plain = token("alice", "desktop");
    store.insert(&plain).await.unwrap();
    assert_eq!(store.get(&plain.id).await.unwrap(), Some(plain.clone()));
    assert_eq!(store.count_by_subject("alice").await.unwrap(), 2);
    assert_eq!(store.count_by_subject("bob").await.unwrap(), 0);
}

async fn uniqueness<S: TokenStore>(store: S) {
    let a = token("alice", "ci");
    store.insert(&a).await.unwrap();

    let mut same_id = token("alice", "other");
    same_id.id = a.id.clone();
    assert_conflict(store.insert(&same_id).await, "id");

    let mut same_hash = token("alice", "third");
    same_hash.hash = a.hash;
    assert_conflict(store.insert(&same_hash).await, "hash");

    assert_conflict(store.insert(&token("alice", "ci")).await, "name");
    // Names are unique per subject, and compared exactly.
    store.insert(&token("bob", "ci")).await.unwrap();
    store.insert(&token("alice", "CI")).await.unwrap();
    assert_eq!(store.count_by_subject("alice").await.unwrap(), 2);
}

async fn lookup_by_hash<S: TokenStore>(store: S) {
    let r = token("alice", "ci");
    store.insert(&r).await.unwrap();
    assert_eq!(store.find_by_hash(&r.hash).await.unwrap(), Some(r.clone()));
    assert_eq!(store.find_by_hash(&other_hash()).await.unwrap(), None);
}

async fn revoked_and_expired_are_found<S: TokenStore>(store: S) {
    let t = now();
    let expired = token("alice", "old").expires_at_for_test(t - TimeDelta::seconds(1));
    store.insert(&expired).await.unwrap();
    let found = store.find_by_hash(&expired.hash).await.unwrap().unwrap();
    assert!(found.is_expired_at(Utc::now()));

    let r = token("alice", "ci");
    store.insert(&r).await.unwrap();
    store.revoke(&r.id, t).await.unwrap();
    let found = store.find_by_hash(&r.hash).await.unwrap().unwrap();
    assert_eq!(found.revoked_at, Some(t));
}

async fn previous_hash_only_within_grace<S: TokenStore>(store: S) {
    let t = now();
    let r = token("alice", "ci");
    store.insert(&r).await.unwrap();

    // Rotate with a grace period: both hashes answer.
    let new = other_hash();
    let rotation =
        Rotation::new(r.hash, new, "pat_new", t).grace_until(Some(t + TimeDelta::minutes(5)));
    let rotated = store.rotate(&r.id, &rotation).await.unwrap();
    assert_eq!(
        store.find_by_hash(&new).await.unwrap(),
        Some(rotated.clone())
    );
    assert_eq!(store.find_by_hash(&r.hash).await.unwrap(), Some(rotated));

    // Once the grace period is over, the old hash is unknown.
    let mut ended = token("alice", "ended");
    let old = other_hash();
    ended.previous_hash = Some((old, t - TimeDelta::seconds(1)));
    store.insert(&ended).await.unwrap();
    assert_eq!(store.find_by_hash(&old).await.unwrap(), None);
    assert!(store.find_by_hash(&ended.hash).await.unwrap().is_some());
}

async fn update_changes_only_the_named_fields<S: TokenStore>(store: S) {
    let t = now();
    let mut r = token("alice", "ci");
    r.previous_hash = Some((other_hash(), t + TimeDelta::minutes(5)));
    r.expires_at = Some(t + TimeDelta::days(3));
    r.ip_restriction = vec![parse_ip_net("10.0.0.0/8").unwrap()];
    let sibling = token("alice", "deploy");
    store.insert(&r).await.unwrap();
    store.insert(&sibling).await.unwrap();
    store
        .record_usage(&[UsageUpdate::new(&r.id, t, vec![ip("10.0.0.1")])])
        .await
        .unwrap();
    let before = store.get(&r.id).await.unwrap().unwrap();
    assert_eq!(before.version, 0, "usage marks are not management writes");
    let events = Events::subscribe(&store);

    // One field: the others are kept.
    let at = t + TimeDelta::seconds(1);
    let renamed = store
        .update(&r.id, &TokenPatch::new(at).if_version(0).name("ci-2"))
        .await
        .unwrap();
    let mut expected = before.clone();
    expected.name = "ci-2".to_owned();
    expected.updated_at = at;
    expected.version = 1;
    assert_eq!(renamed, expected);
    assert_eq!(store.get(&r.id).await.unwrap(), Some(expected.clone()));
    assert!(events.heard(&r.id, r.hash), "the hash is announced");
    assert!(
        events.heard(&r.id, r.previous_hash.unwrap().0),
        "the grace hash is announced too"
    );

    // Every field at once; the expiry can be cleared.
    let at = t + TimeDelta::seconds(2);
    let patch = TokenPatch::new(at)
        .scopes(ScopeSet::parse(["admin"]).unwrap())
        .expires_at(None)
        .ip_restriction([parse_ip_net("192.168.0.0/16").unwrap()]);
    let changed = store.update(&r.id, &patch).await.unwrap();
    expected.scopes = ScopeSet::parse(["admin"]).unwrap();
    expected.expires_at = None;
    expected.ip_restriction = vec![parse_ip_net("192.168.0.0/16").unwrap()];
    expected.updated_at = at;
    expected.version = 2;
    assert_eq!(changed, expected);
    assert_eq!(store.get(&r.id).await.unwrap(), Some(expected.clone()));
    // The renamed record is found under its new name, by the search too.
    let found = store
        .list(&ListQuery::for_subject("alice").search("CI-2"))
        .await
        .unwrap();
    assert_eq!(found.items, vec![expected.clone()]);

    // An expiry set, an empty restriction: anywhere.
    let exp = t + TimeDelta::days(1);
    let patch = TokenPatch::new(at).expires_at(Some(exp)).ip_restriction([]);
    let changed = store.update(&r.id, &patch).await.unwrap();
    assert_eq!(changed.expires_at, Some(exp));
    assert!(changed.ip_restriction.is_empty());
    assert_eq!(changed.version, 3);
    expected = changed;

    // An empty patch writes nothing.
    let same = store
        .update(&r.id, &TokenPatch::new(at + TimeDelta::hours(1)))
        .await
        .unwrap();
    assert_eq!(same, expected);
    assert_eq!(store.get(&r.id).await.unwrap(), Some(expected.clone()));

    // A name another token of the subject has.
    assert_conflict(
        store
            .update(&r.id, &TokenPatch::new(at).name(sibling.name.clone()))
            .await,
        "name",
    );
    assert_eq!(store.get(&r.id).await.unwrap(), Some(expected));
    assert!(matches!(
        store
            .update("no-such-id", &TokenPatch::new(at).name("x"))
            .await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.update("no-such-id", &TokenPatch::new(at)).await,
        Err(StoreError::NotFound)
    ));
}

async fn update_never_clears_a_revocation<S: TokenStore>(store: S) {
    let t = now();
    let r = token("alice", "ci");
    store.insert(&r).await.unwrap();
    // A caller read the record, then it was revoked.
    let read = store.get(&r.id).await.unwrap().unwrap();
    let revoked = store.revoke(&r.id, t).await.unwrap().unwrap();
    assert_eq!(revoked.version, read.version + 1);

    for patch in [
        TokenPatch::new(t).if_version(read.version).name("renamed"),
        TokenPatch::new(t).name("renamed"),
        TokenPatch::new(t).expires_at(None),
        TokenPatch::new(t),
    ] {
        match store.update(&r.id, &patch).await {
            Err(StoreError::Revoked) => {}
            other => panic!("expected Revoked for {patch:?}, got {other:?}"),
        }
    }
    let stored = store.get(&r.id).await.unwrap().unwrap();
    assert_eq!(stored, revoked, "nothing was written");
    assert_eq!(stored.revoked_at, Some(t));
}

async fn stale_writes_change_nothing<S: TokenStore>(store: S) {
    let t = now();
    let r = token("alice", "ci");
    store.insert(&r).await.unwrap();
    let read = store.get(&r.id).await.unwrap().unwrap();
    // Someone else changes the record meanwhile.
    let current = store
        .update(&r.id, &TokenPatch::new(t).name("theirs"))
        .await
        .unwrap();
    assert_eq!(current.version, read.version + 1);

    let mine = TokenPatch::new(t).if_version(read.version).name("mine");
    assert!(matches!(
        store.update(&r.id, &mine).await,
        Err(StoreError::Stale)
    ));
    // An empty patch checks the version too.
    let empty = TokenPatch::new(t).if_version(read.version);
    assert!(matches!(
        store.update(&r.id, &empty).await,
        Err(StoreError::Stale)
    ));
    let rotation = Rotation::new(read.hash, other_hash(), "pat_x", t).if_version(read.version);
    assert!(matches!(
        store.rotate(&r.id, &rotation).await,
        Err(StoreError::Stale)
    ));
    assert_eq!(store.get(&r.id).await.unwrap(), Some(current.clone()));

    // With the current version, it applies.
    let mine = TokenPatch::new(t).if_version(current.version).name("mine");
    assert_eq!(store.update(&r.id, &mine).await.unwrap().name, "mine");
}

async fn rotate_replaces_the_secret<S: TokenStore>(store: S) {
    let t = now();
    let mut r = token("alice", "ci");
    r.expires_at = Some(t + TimeDelta::days(3));
    store.insert(&r).await.unwrap();
    store
        .record_usage(&[UsageUpdate::new(&r.id, t, vec![ip("10.0.0.1")])])
        .await
        .unwrap();
    let before = store.get(&r.id).await.unwrap().unwrap();
    let events = Events::subscribe(&store);

    // With a grace period, the old hash keeps answering until it ends.
    let (first, grace) = (other_hash(), t + TimeDelta::minutes(5));
    let at = t + TimeDelta::seconds(1);
    let rotation = Rotation::new(r.hash, first, "pat_first", at)
        .if_version(0)
        .grace_until(Some(grace));
    let rotated = store.rotate(&r.id, &rotation).await.unwrap();
    let mut expected = before.clone();
    expected.hash = first;
    expected.start = "pat_first".to_owned();
    expected.previous_hash = Some((r.hash, grace));
    expected.last_rotated_at = Some(at);
    expected.updated_at = at;
    expected.version = 1;
    assert_eq!(rotated, expected);
    assert_eq!(store.get(&r.id).await.unwrap(), Some(expected.clone()));
    assert!(events.heard(&r.id, r.hash));
    assert_eq!(
        store.find_by_hash(&first).await.unwrap(),
        Some(expected.clone())
    );
    assert_eq!(
        store.find_by_hash(&r.hash).await.unwrap(),
        Some(expected.clone())
    );

    // Rotated again without one: the grace hash stops at once, and is announced with the
    // current one.
    events.clear();
    let second = other_hash();
    let exp = t + TimeDelta::days(9);
    let at = t + TimeDelta::seconds(2);
    let rotation = Rotation::new(first, second, "pat_second", at).expires_at(Some(exp));
    let rotated = store.rotate(&r.id, &rotation).await.unwrap();
    assert_eq!(rotated.hash, second);
    assert_eq!(rotated.previous_hash, None);
    assert_eq!(rotated.expires_at, Some(exp));
    assert_eq!(rotated.version, 2);
    assert_eq!(rotated.last_used_ips, vec![ip("10.0.0.1")], "usage is kept");
    assert!(events.heard(&r.id, first), "the replaced hash is announced");
    assert!(events.heard(&r.id, r.hash), "the grace hash is announced");
    assert_eq!(store.find_by_hash(&r.hash).await.unwrap(), None);
    assert_eq!(store.find_by_hash(&first).await.unwrap(), None);
    assert_eq!(
        store.find_by_hash(&second).await.unwrap(),
        Some(rotated.clone())
    );

    // The expiry can be lifted by a rotation too.
    let rotation = Rotation::new(second, other_hash(), "pat_third", at).expires_at(None);
    assert_eq!(
        store.rotate(&r.id, &rotation).await.unwrap().expires_at,
        None
    );

    assert!(matches!(
        store
            .rotate(
                "no-such-id",
                &Rotation::new(r.hash, other_hash(), "pat_x", at)
            )
            .await,
        Err(StoreError::NotFound)
    ));
}

async fn rotate_never_restores_a_replaced_hash<S: TokenStore>(store: S) {
    let t = now();
    let r = token("alice", "ci");
    let sibling = token("alice", "deploy");
    store.insert(&r).await.unwrap();
    store.insert(&sibling).await.unwrap();
    let first = other_hash();
    let current = store
        .rotate(&r.id, &Rotation::new(r.hash, first, "pat_first", t))
        .await
        .unwrap();

    // A rotation that read the record before: its old hash is no longer the record's.
    let late = Rotation::new(r.hash, other_hash(), "pat_late", t);
    assert!(matches!(
        store.rotate(&r.id, &late).await,
        Err(StoreError::Stale)
    ));
    // The refused rotation changed nothing, and the replaced hash stays unknown.
    assert_eq!(store.get(&r.id).await.unwrap(), Some(current.clone()));
    assert_eq!(store.find_by_hash(&r.hash).await.unwrap(), None);

    // Another record's hash is taken.
    let clash = Rotation::new(first, sibling.hash, "pat_clash", t);
    assert_conflict(store.rotate(&r.id, &clash).await, "hash");
    assert_eq!(store.get(&r.id).await.unwrap(), Some(current));
}

async fn rotate_refuses_a_revoked_token<S: TokenStore>(store: S) {
    let t = now();
    let r = token("alice", "ci");
    store.insert(&r).await.unwrap();
    let read = store.get(&r.id).await.unwrap().unwrap();
    let revoked = store.revoke(&r.id, t).await.unwrap().unwrap();
    let new = other_hash();
    for rotation in [
        Rotation::new(read.hash, new, "pat_x", t).if_version(read.version),
        Rotation::new(read.hash, new, "pat_x", t),
        Rotation::new(read.hash, new, "pat_x", t).if_version(revoked.version),
    ] {
        match store.rotate(&r.id, &rotation).await {
            Err(StoreError::Revoked) => {}
            other => panic!("expected Revoked, got {other:?}"),
        }
    }
    assert_eq!(store.get(&r.id).await.unwrap(), Some(revoked));
    assert_eq!(store.find_by_hash(&new).await.unwrap(), None);
}

async fn versions_count_management_writes<S: TokenStore>(store: S) {
    let t = now();
    let r = token("alice", "ci");
    assert_eq!(r.version, 0, "a new record is at version 0");
    store.insert(&r).await.unwrap();
    let v = || async { store.get(&r.id).await.unwrap().unwrap().version };
    assert_eq!(v().await, 0);
    store
        .record_usage(&[UsageUpdate::new(&r.id, t, vec![ip("10.0.0.1")])])
        .await
        .unwrap();
    assert_eq!(v().await, 0, "usage marks do not count");
    store
        .update(&r.id, &TokenPatch::new(t).name("b"))
        .await
        .unwrap();
    assert_eq!(v().await, 1);
    let h = store.get(&r.id).await.unwrap().unwrap().hash;
    store
        .rotate(&r.id, &Rotation::new(h, other_hash(), "pat_x", t))
        .await
        .unwrap();
    assert_eq!(v().await, 2);
    store.revoke(&r.id, t).await.unwrap();
    assert_eq!(v().await, 3);
    store.revoke(&r.id, t + TimeDelta::hours(1)).await.unwrap();
    assert_eq!(v().await, 3, "revoking again changes nothing");
    store
        .record_usage(&[UsageUpdate::new(&r.id, t + TimeDelta::seconds(1), vec![])])
        .await
        .unwrap();
    assert_eq!(v().await, 3);
}

async fn revoke_keeps_the_first_time<S: TokenStore>(store: S) {
    let t = now();
    let r = token("alice", "ci");
    store.insert(&r).await.unwrap();
    let events = Events::subscribe(&store);

    let revoked = store.revoke(&r.id, t).await.unwrap().unwrap();
    assert_eq!(revoked.revoked_at, Some(t));
    assert_eq!(revoked.updated_at, t);
    assert!(events.heard(&r.id, r.hash));

    let again = store
        .revoke(&r.id, t + TimeDelta::hours(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.revoked_at, Some(t));
    assert_eq!(again.updated_at, t);
    assert_eq!(store.get(&r.id).await.unwrap(), Some(again));
    assert_eq!(store.revoke("no-such-id", t).await.unwrap(), None);
}

async fn delete_removes<S: TokenStore>(store: S) {
    let r = token("alice", "ci");
    store.insert(&r).await.unwrap();
    let events = Events::subscribe(&store);

    assert_eq!(store.delete(&r.id).await.unwrap(), Some(r.clone()));
    assert!(events.heard(&r.id, r.hash));
    assert_eq!(store.get(&r.id).await.unwrap(), None);
    assert_eq!(store.find_by_hash(&r.hash).await.unwrap(), None);
    assert_eq!(store.delete(&r.id).await.unwrap(), None);
    assert_eq!(store.count_by_subject("alice").await.unwrap(), 0);
    // The name is free again.
    store.insert(&token("alice", "ci")).await.unwrap();
}

async fn usage_is_monotonic<S: TokenStore>(store: S) {
    let t = now();
    let a = token("alice", "a");
    let b = token("alice", "b");
    store.insert(&a).await.unwrap();
    store.insert(&b).await.unwrap();
    let (mut ref_a, mut ref_b) = (a.clone(), b.clone());

    let batches = [
        vec![
            UsageUpdate::new(&a.id, t, vec![ip("10.0.0.2"), ip("10.0.0.1")]),
            UsageUpdate::new(&b.id, t - TimeDelta::seconds(30), vec![]),
            UsageUpdate::new("no-such-id", t, vec![ip("10.9.9.9")]),
        ],
        // Out of order: an older mark for `a` arrives late; its address goes after the newer ones.
        vec![UsageUpdate::new(
            &a.id,
            t - TimeDelta::seconds(10),
            vec![ip("10.0.0.9")],
        )],
        // Retried: the same batch again changes nothing.
        vec![UsageUpdate::new(
            &a.id,
            t - TimeDelta::seconds(10),
            vec![ip("10.0.0.9")],
        )],
        vec![UsageUpdate::new(
            &b.id,
            t + TimeDelta::seconds(1),
            vec![ip("2001:db8::1")],
        )],
        vec![],
    ];
    for batch in &batches {
        store.record_usage(batch).await.unwrap();
        for u in batch {
            if u.token_id == a.id {
                ref_a.apply_usage(u);
            } else if u.token_id == b.id {
                ref_b.apply_usage(u);
            }
        }
    }
    let got_a = store.get(&a.id).await.unwrap().unwrap();
    let got_b = store.get(&b.id).await.unwrap().unwrap();
    assert_eq!(got_a, ref_a, "TokenRecord::apply_usage is the rule");
    assert_eq!(got_b, ref_b);
    assert_eq!(got_a.last_used_at, Some(t));
    assert_eq!(
        got_a.last_used_ips,
        vec![ip("10.0.0.2"), ip("10.0.0.1"), ip("10.0.0.9")]
    );
    assert_eq!(got_b.last_used_at, Some(t + TimeDelta::seconds(1)));
    assert_eq!(got_b.last_used_ips, vec![ip("2001:db8::1")]);
    assert!(store.get("no-such-id").await.unwrap().is_none());
}

async fn usage_keeps_newest_addresses_capped<S: TokenStore>(store: S) {
    let t = now();
    let r = token("alice", "ci");
    store.insert(&r).await.unwrap();
    let mut reference = r.clone();
    for i in 0..8u8 {
        let u = UsageUpdate::new(
            &r.id,
            t + TimeDelta::seconds(i64::from(i)),
            vec![IpAddr::from([10, 0, 0, i])],
        );
        store.record_usage(std::slice::from_ref(&u)).await.unwrap();
        reference.apply_usage(&u);
    }
    // A repeat of an address already in the list moves it to the front.
    let u = UsageUpdate::new(&r.id, t + TimeDelta::seconds(20), vec![ip("10.0.0.5")]);
    store.record_usage(std::slice::from_ref(&u)).await.unwrap();
    reference.apply_usage(&u);

    let got = store.get(&r.id).await.unwrap().unwrap();
    assert_eq!(got, reference);
    assert_eq!(got.last_used_ips.len(), MAX_LAST_USED_IPS);
    assert_eq!(
        got.last_used_ips,
        vec![
            ip("10.0.0.5"),
            ip("10.0.0.7"),
            ip("10.0.0.6"),
            ip("10.0.0.4"),
            ip("10.0.0.3")
        ]
    );
}

async fn list_matches_the_reference<S: TokenStore>(store: S) {
    let t = now();
    let names = [
        ("alice", "laptop"),
        ("alice", "CI runner"),
        ("alice", "ci-deploy"),
        ("alice", "Ärger"),
        ("alice", "zeta"),
        ("bob", "laptop"),
        ("bob", "backup"),
        ("carol", "ci"),
    ];
    let mut ids = Vec::new();
    for (i, (subject, name)) in names.iter().enumerate() {
        let i = i64::try_from(i).unwrap();
        let mut r = token(subject, name);
        // Ties on created_at between some records: the id breaks them.
        r.created_at = t - TimeDelta::minutes(i % 5);
        r.expires_at = (i % 3 != 0).then(|| t + TimeDelta::days(i % 4));
        store.insert(&r).await.unwrap();
        if i % 2 == 0 {
            store
                .record_usage(&[UsageUpdate::new(&r.id, t - TimeDelta::hours(i % 3), vec![])])
                .await
                .unwrap();
        }
        ids.push(r.id);
    }
    let mut all = Vec::new();
    for id in &ids {
        all.push(store.get(id).await.unwrap().unwrap());
    }

    let reference = |q: &ListQuery| {
        let mut matching: Vec<&TokenRecord> = all.iter().filter(|r| q.matches(r)).collect();
        matching.sort_by(|a, b| q.compare(a, b));
        let total = matching.len() as u64;
        let page: Vec<TokenRecord> = matching
            .into_iter()
            .skip(q.offset as usize)
            .take(q.limit as usize)
            .cloned()
            .collect();
        (page, total)
    };

    let filters = [
        (None, None, LastUsedFilter::Any),
        (Some("alice"), None, LastUsedFilter::Any),
        (None, Some("CI"), LastUsedFilter::Any),
        (Some("alice"), Some("är"), LastUsedFilter::Any),
        (None, Some(""), LastUsedFilter::Never),
        (None, None, LastUsedFilter::Never),
        // Not used since an instant half a microsecond after one stored use.
        (
            None,
            None,
            LastUsedFilter::Before(t - TimeDelta::hours(1) + TimeDelta::nanoseconds(500)),
        ),
        (Some("bob"), None, LastUsedFilter::Before(t)),
        (Some("nobody"), None, LastUsedFilter::Any),
    ];
    let sorts = [
        SortKey::CreatedAt,
        SortKey::Name,
        SortKey::LastUsedAt,
        SortKey::ExpiresAt,
    ];
    let pages = [(0, 50), (0, 3), (3, 3), (7, 10), (20, 5), (0, 0)];
    let mut checked = 0;
    for (subject, search, last_used) in filters {
        for sort in sorts {
            for descending in [false, true] {
                for (offset, limit) in pages {
                    let mut q = ListQuery::default();
                    if let Some(subject) = subject {
                        q = q.subject(subject);
                    }
                    if let Some(search) = search {
                        q = q.search(search);
                    }
                    let q = q
                        .last_used(last_used)
                        .sort(sort)
                        .descending(descending)
                        .offset(offset)
                        .limit(limit);
                    let page = store.list(&q).await.unwrap();
                    let (items, total) = reference(&q);
                    assert_eq!(page.total, total, "{q:?}");
                    assert_eq!(page.items, items, "{q:?}");
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 9 * 4 * 2 * 6);

    // A few answers spelled out, so the reference cannot be wrong in the same way.
    let ci = store
        .list(&ListQuery::default().search("CI").sort(SortKey::Name))
        .await
        .unwrap();
    let names: Vec<&str> = ci.items.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["CI runner", "ci", "ci-deploy"]);
    let umlaut = store
        .list(&ListQuery::default().search("ÄR"))
        .await
        .unwrap();
    assert_eq!(umlaut.total, 1);
    assert_eq!(umlaut.items[0].name, "Ärger");
    let bob = store.list(&ListQuery::for_subject("bob")).await.unwrap();
    assert_eq!(bob.total, 2);
}

// ---------------------------------------------------------------------------------------------
// Small record builders the public API does not need.

trait ForTest {
    fn expires_at_for_test(self, at: DateTime<Utc>) -> Self;
    fn token_type_for_test(self, t: &str) -> Self;
}

impl ForTest for TokenRecord {
    fn expires_at_for_test(mut self, at: DateTime<Utc>) -> Self {
        self.expires_at = Some(at);
        self
    }
    fn token_type_for_test(mut self, t: &str) -> Self {
        self.token_type = t.to_owned();
        self
    }
}

// ---------------------------------------------------------------------------------------------
// The stores

macro_rules! for_each_store {
    ($($test:ident),* $(,)?) => {
        mod memory {
            use super::MemoryStore;
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(MemoryStore::new()).await;
                }
            )*
        }

        #[cfg(feature = "sqlite")]
        mod sqlite {
            use tower_pat::store::SqliteStore;
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(SqliteStore::in_memory().await.unwrap()).await;
                }
            )*
        }

        #[cfg(feature = "sqlite")]
        mod sqlite_file {
            use super::tempdir;
            use tower_pat::store::SqliteStore;
            $(
                #[tokio::test]
                async fn $test() {
                    let dir = tempdir();
                    let store = SqliteStore::open(dir.join("tokens.db")).await.unwrap();
                    super::$test(store.clone()).await;
                    store.close().await;
                    let _ = std::fs::remove_dir_all(dir);
                }
            )*
        }

        #[cfg(feature = "postgres")]
        mod postgres {
            use super::common;
            use tower_pat::store::PostgresStore;
            $(
                #[tokio::test]
                async fn $test() {
                    let Some(db) = common::pg::TestDb::create("store_conformance").await else {
                        return;
                    };
                    let store = PostgresStore::builder()
                        .connect_with(db.options.clone())
                        .await
                        .unwrap();
                    super::$test(store.clone()).await;
                    store.pool().close().await;
                    drop(store);
                    drop(db);
                }
            )*
        }
    };
}

for_each_store!(
    insert_and_get_round_trip,
    uniqueness,
    lookup_by_hash,
    revoked_and_expired_are_found,
    previous_hash_only_within_grace,
    update_changes_only_the_named_fields,
    update_never_clears_a_revocation,
    stale_writes_change_nothing,
    rotate_replaces_the_secret,
    rotate_never_restores_a_replaced_hash,
    rotate_refuses_a_revoked_token,
    versions_count_management_writes,
    revoke_keeps_the_first_time,
    delete_removes,
    usage_is_monotonic,
    usage_keeps_newest_addresses_capped,
    list_matches_the_reference,
);

/// A fresh directory under the system's temporary one.
#[cfg(feature = "sqlite")]
fn tempdir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tower-pat-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Tokens in a SQLite file survive closing and reopening it; migrations run once.
#[cfg(feature = "sqlite")]
#[tokio::test]
async fn sqlite_file_survives_reopen() {
    use tower_pat::store::SqliteStore;
    let dir = tempdir();
    let path = dir.join("tokens.db");
    let r = token("alice", "ci");
    {
        let store = SqliteStore::open(&path).await.unwrap();
        store.insert(&r).await.unwrap();
        store.close().await;
    }
    let store = SqliteStore::open(&path).await.unwrap();
    assert_eq!(store.find_by_hash(&r.hash).await.unwrap(), Some(r.clone()));
    assert_eq!(store.count_by_subject("alice").await.unwrap(), 1);
    store.close().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// A database at schema version 1 (before `version`) gets the column on open, its records at 0,
/// and conditional writes work on them.
#[cfg(feature = "sqlite")]
#[tokio::test]
async fn sqlite_schema_1_gains_versions() {
    use tower_pat::store::SqliteStore;
    use tower_pat::store::sqlx::{self, ConnectOptions, Executor};
    let dir = tempdir();
    let path = dir.join("tokens.db");
    let r = token("alice", "ci");
    {
        let store = SqliteStore::open(&path).await.unwrap();
        store.insert(&r).await.unwrap();
        store.close().await;
    }
    // Back to schema 1.
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .connect()
        .await
        .unwrap();
    conn.execute(
        "ALTER TABLE tower_pat_tokens DROP COLUMN version; \
         DELETE FROM tower_pat_schema_version WHERE version = 2;",
    )
    .await
    .unwrap();
    drop(conn);

    let store = SqliteStore::open(&path).await.unwrap();
    assert_eq!(store.get(&r.id).await.unwrap(), Some(r.clone()));
    let patch = TokenPatch::new(now()).if_version(0).name("renamed");
    assert_eq!(store.update(&r.id, &patch).await.unwrap().version, 1);
    store.close().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// The same on PostgreSQL.
#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_schema_1_gains_versions() {
    use tower_pat::store::PostgresStore;
    use tower_pat::store::sqlx::Executor;
    let Some(db) = common::pg::TestDb::create("store_conformance").await else {
        return;
    };
    let r = token("alice", "ci");
    {
        let store = PostgresStore::builder()
            .connect_with(db.options.clone())
            .await
            .unwrap();
        store.insert(&r).await.unwrap();
        store
            .pool()
            .execute(
                "ALTER TABLE tower_pat_tokens DROP COLUMN version; \
                 DELETE FROM tower_pat_schema_version WHERE version = 2;",
            )
            .await
            .unwrap();
        store.pool().close().await;
    }
    let store = PostgresStore::builder()
        .connect_with(db.options.clone())
        .await
        .unwrap();
    assert_eq!(store.get(&r.id).await.unwrap(), Some(r.clone()));
    let patch = TokenPatch::new(now()).if_version(0).name("renamed");
    assert_eq!(store.update(&r.id, &patch).await.unwrap().version, 1);
    store.pool().close().await;
}
