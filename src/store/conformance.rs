//! The store conformance suite (feature `test-util`): the rules every [`TokenStore`] must keep,
//! as async checks a store author runs from their own tests.
//!
//! Call [`run_all`] with a factory that makes a fresh, empty store (each check gets its own), or
//! call the checks one by one, one test each, to see which rule a store breaks. A check panics
//! with a message naming the rule, and says which check it was. [`CHECKS`] names them all.
//!
//! What the checks require, in short: conditional writes ([`TokenStore::update`] and
//! [`TokenStore::rotate`] refuse an unknown id with [`StoreError::NotFound`], a revoked record
//! with [`StoreError::Revoked`], a stale version or hash with [`StoreError::Stale`], an expired
//! record written `if_unexpired` with [`StoreError::Expired`], taken values with
//! [`StoreError::Conflict`], and then change nothing); versions that count management writes;
//! a revocation that is permanent; management writes on another token conditional, when a
//! [`CallerGuard`] is given, on the caller's record being the version named
//! ([`StoreError::CallerChanged`]; a store without the guarded operations passes those checks);
//! a [`StoreEvent::Changed`] for every hash a record answered to
//! before each `update`, `rotate`, `revoke` and `delete` (so
//! [`TokenLookup::subscribe`](super::TokenLookup::subscribe) must return `true`: embed a
//! [`ChangeHub`](super::ChangeHub)); usage merged by [`TokenRecord::apply_usage`]'s rule; and
//! listings that agree with [`ListQuery::matches`] and [`ListQuery::compare`]; an id, subject or
//! search text with a NUL character that matches nothing (not a backend error); and a
//! [`TokenStore::purge`] that removes exactly the records [`TokenRecord::is_purgeable`] names, at
//! most the limit, announcing each (a store whose `purge` answers [`StoreError::Unsupported`],
//! the trait's default, passes those checks: it removes nothing, and retention reports it); and a
//! [`TokenStore::claim_expiry_notices`] that claims each due notice ([`NoticeKind::is_due`]) once,
//! at most the limit, and again after the expiry moves later or its claim is taken back
//! ([`TokenStore::release_expiry_notice`]) (`Unsupported` passes those checks too).
//!
//! The records are made with times truncated to the microsecond, the precision of the SQL stores;
//! a store must give back every field it was given, at least to that precision.
//!
//! # Example: a store of your own
//!
//! A complete store over a `Mutex<HashMap>`, passing the suite. A real store would do the same
//! checks inside one transaction or one conditional statement.
//!
//! ```
//! use std::collections::HashMap;
//! use std::sync::{Mutex, Weak};
//!
//! use async_trait::async_trait;
//! use chrono::{DateTime, Utc};
//! use tower_pat::store::{ChangeHub, ChangeListener, ListQuery, Page};
//! use tower_pat::{
//!     Rotation, StoreError, TokenHash, TokenLookup, TokenPatch, TokenRecord, TokenStore,
//!     UsageUpdate,
//! };
//!
//! #[derive(Default)]
//! struct MapStore {
//!     records: Mutex<HashMap<String, TokenRecord>>,
//!     hub: ChangeHub,
//! }
//!
//! /// The stored record `id`, if it may be written: not revoked, at the version (and for a
//! /// rotation, the hash) the caller read, and if asked, not expired now.
//! fn writable<'a>(
//!     records: &'a HashMap<String, TokenRecord>,
//!     id: &str,
//!     if_version: Option<u64>,
//!     old_hash: Option<&TokenHash>,
//!     if_unexpired: bool,
//! ) -> Result<&'a TokenRecord, StoreError> {
//!     let r = records.get(id).ok_or(StoreError::NotFound)?;
//!     if r.revoked_at.is_some() {
//!         return Err(StoreError::Revoked);
//!     }
//!     if if_version.is_some_and(|v| v != r.version) || old_hash.is_some_and(|h| *h != r.hash) {
//!         return Err(StoreError::Stale);
//!     }
//!     if if_unexpired && r.is_expired_at(Utc::now()) {
//!         return Err(StoreError::Expired);
//!     }
//!     Ok(r)
//! }
//!
//! /// Whether another record than `id` answers to `hash`.
//! fn hash_taken(records: &HashMap<String, TokenRecord>, hash: &TokenHash, id: &str) -> bool {
//!     records.values().any(|r| {
//!         r.id != id && (r.hash == *hash || r.previous_hash.is_some_and(|(h, _)| h == *hash))
//!     })
//! }
//!
//! /// Whether another record than `id` of `subject` is named `name`.
//! fn name_taken(records: &HashMap<String, TokenRecord>, subject: &str, name: &str, id: &str) -> bool {
//!     records.values().any(|r| r.id != id && r.subject == subject && r.name == name)
//! }
//!
//! impl MapStore {
//!     fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, TokenRecord>> {
//!         self.records.lock().unwrap_or_else(|e| e.into_inner())
//!     }
//! }
//!
//! #[async_trait]
//! impl TokenLookup for MapStore {
//!     async fn find_by_hash(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
//!         let now = Utc::now();
//!         Ok(self.lock().values().find(|r| r.matches_hash(hash, now)).cloned())
//!     }
//!
//!     async fn record_usage(&self, updates: &[UsageUpdate]) -> Result<(), StoreError> {
//!         let mut records = self.lock();
//!         for u in updates {
//!             if let Some(r) = records.get_mut(&u.token_id) {
//!                 r.apply_usage(u);
//!             }
//!         }
//!         Ok(())
//!     }
//!
//!     fn subscribe(&self, listener: Weak<dyn ChangeListener>) -> bool {
//!         self.hub.subscribe(listener);
//!         true
//!     }
//! }
//!
//! #[async_trait]
//! impl TokenStore for MapStore {
//!     async fn insert(&self, record: &TokenRecord) -> Result<(), StoreError> {
//!         let mut records = self.lock();
//!         if records.contains_key(&record.id) {
//!             return Err(StoreError::Conflict { field: "id" });
//!         }
//!         if hash_taken(&records, &record.hash, &record.id) {
//!             return Err(StoreError::Conflict { field: "hash" });
//!         }
//!         if name_taken(&records, &record.subject, &record.name, &record.id) {
//!             return Err(StoreError::Conflict { field: "name" });
//!         }
//!         records.insert(record.id.clone(), record.clone());
//!         Ok(())
//!     }
//!
//!     async fn get(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
//!         Ok(self.lock().get(id).cloned())
//!     }
//!
//!     async fn list(&self, query: &ListQuery) -> Result<Page, StoreError> {
//!         let records = self.lock();
//!         let mut items: Vec<&TokenRecord> = records.values().filter(|r| query.matches(r)).collect();
//!         items.sort_by(|a, b| query.compare(a, b));
//!         let total = items.len() as u64;
//!         let skip = usize::try_from(query.offset).unwrap_or(usize::MAX);
//!         let take = usize::try_from(query.limit).unwrap_or(usize::MAX);
//!         let items = items.into_iter().skip(skip).take(take).cloned().collect();
//!         Ok(Page::new(items, total))
//!     }
//!
//!     async fn update(&self, id: &str, patch: &TokenPatch) -> Result<TokenRecord, StoreError> {
//!         let (old, new) = {
//!             let mut records = self.lock();
//!             let old = writable(&records, id, patch.if_version, None, patch.if_unexpired)?.clone();
//!             if patch.is_empty() {
//!                 return Ok(old);
//!             }
//!             if let Some(name) = &patch.name {
//!                 if name_taken(&records, &old.subject, name, id) {
//!                     return Err(StoreError::Conflict { field: "name" });
//!                 }
//!             }
//!             let mut new = old.clone();
//!             patch.apply(&mut new)?;
//!             records.insert(id.to_owned(), new.clone());
//!             (old, new)
//!         };
//!         // After the lock is released: listeners run synchronously.
//!         self.hub.announce(&old);
//!         Ok(new)
//!     }
//!
//!     async fn rotate(&self, id: &str, rotation: &Rotation) -> Result<TokenRecord, StoreError> {
//!         let (old, new) = {
//!             let mut records = self.lock();
//!             let old = writable(
//!                 &records,
//!                 id,
//!                 rotation.if_version,
//!                 Some(&rotation.old_hash),
//!                 rotation.if_unexpired,
//!             )?
//!             .clone();
//!             if hash_taken(&records, &rotation.new_hash, id) {
//!                 return Err(StoreError::Conflict { field: "hash" });
//!             }
//!             let mut new = old.clone();
//!             rotation.apply(&mut new)?;
//!             records.insert(id.to_owned(), new.clone());
//!             (old, new)
//!         };
//!         self.hub.announce(&old);
//!         Ok(new)
//!     }
//!
//!     async fn revoke(&self, id: &str, at: DateTime<Utc>) -> Result<Option<TokenRecord>, StoreError> {
//!         let revoked = {
//!             let mut records = self.lock();
//!             let Some(r) = records.get_mut(id) else {
//!                 return Ok(None);
//!             };
//!             if r.revoked_at.is_none() {
//!                 r.revoked_at = Some(at);
//!                 r.updated_at = at;
//!                 r.version = r.version.saturating_add(1);
//!             }
//!             r.clone()
//!         };
//!         self.hub.announce(&revoked);
//!         Ok(Some(revoked))
//!     }
//!
//!     async fn delete(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
//!         let removed = self.lock().remove(id);
//!         if let Some(r) = &removed {
//!             self.hub.announce(r);
//!         }
//!         Ok(removed)
//!     }
//!
//!     async fn count_by_subject(&self, subject: &str) -> Result<u64, StoreError> {
//!         Ok(self.lock().values().filter(|r| r.subject == subject).count() as u64)
//!     }
//!
//!     // Optional (the default answers `StoreError::Unsupported`): what retention calls.
//!     async fn purge(&self, cutoff: DateTime<Utc>, limit: usize) -> Result<Vec<TokenRecord>, StoreError> {
//!         let removed: Vec<TokenRecord> = {
//!             let mut records = self.lock();
//!             let ids: Vec<String> = records
//!                 .values()
//!                 .filter(|r| r.is_purgeable(cutoff))
//!                 .take(limit)
//!                 .map(|r| r.id.clone())
//!                 .collect();
//!             ids.iter().filter_map(|id| records.remove(id)).collect()
//!         };
//!         for r in &removed {
//!             self.hub.announce(r);
//!         }
//!         Ok(removed)
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // In your tests: `#[tokio::test] async fn conformance() { run_all(...).await }`.
//! tower_pat::store::conformance::run_all(|| async { MapStore::default() }).await;
//! # }
//! ```

use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, Weak};

use chrono::{DateTime, SubsecRound, TimeDelta, Utc};
use ipnet::IpNet;

use super::{
    CallerGuard, ChangeListener, LastUsedFilter, ListQuery, NoticeKind, Rotation, SortKey,
    StoreError, StoreEvent, TokenPatch, TokenState, TokenStore,
};
use crate::record::UsageUpdate;
use crate::record::{MAX_LAST_USED_IPS, NewToken, TokenRecord, parse_ip_net};
use crate::scope::ScopeSet;
use crate::token::{TokenFormat, TokenHash, TokenHasher};

macro_rules! suite {
    ($($check:ident),* $(,)?) => {
        /// The names of every check, in the order [`run_all`] runs them: each is a public function
        /// of this module taking a fresh store.
        pub const CHECKS: &[&str] = &[$(stringify!($check)),*];

        /// Runs every check, each on a fresh store from `make_store`. Panics at the first rule the
        /// store breaks, naming the check and the rule.
        pub async fn run_all<S, F, Fut>(mut make_store: F)
        where
            S: TokenStore,
            F: FnMut() -> Fut,
            Fut: Future<Output = S>,
        {
            $($check(make_store().await).await;)*
        }
    };
}

suite!(
    insert_and_get_round_trip,
    uniqueness,
    lookup_by_hash,
    revoked_and_expired_are_found,
    previous_hash_only_within_grace,
    update_changes_only_the_named_fields,
    update_never_clears_a_revocation,
    disable_and_enable,
    stale_writes_change_nothing,
    writes_on_the_condition_of_an_unexpired_token,
    rotate_replaces_the_secret,
    rotate_never_restores_a_replaced_hash,
    rotate_refuses_a_revoked_token,
    versions_count_management_writes,
    revoke_keeps_the_first_time,
    delete_removes,
    conditional_revoke_and_delete,
    texts_with_a_nul_match_nothing,
    insert_below_holds_the_limit_under_concurrency,
    caller_guard_conditions_writes,
    caller_guards_of_tokens_acting_on_each_other,
    caller_guard_conditions_revocations_and_deletions,
    usage_is_monotonic,
    usage_keeps_newest_addresses_capped,
    list_matches_the_reference,
    purge_removes_only_old_revoked_and_expired,
    purge_respects_the_limit,
    purge_keeps_what_changed_after_the_cutoff,
    expiry_notices_are_claimed_once,
    expiry_notices_respect_the_limit,
    expiry_notices_return_when_the_expiry_changes,
    expiry_notices_with_a_lead_too_long_to_add,
    expiry_notice_claims_are_taken_back,
    superseded_secrets_are_remembered,
    superseded_history_is_bounded_and_forgotten,
);

// ---------------------------------------------------------------------------------------------
// Fixtures

/// A fresh record of `subject` named `name`, with scopes `repo:read user:*`, created now (to the
/// microsecond), at version 0: what the checks insert. Its secret is discarded.
pub fn record(subject: &str, name: &str) -> TokenRecord {
    NewToken::new(subject, name)
        .scopes(["repo:read", "user:*"])
        .expect("valid scopes")
        .build(&TokenFormat::new(), &TokenHasher::sha256(), now())
        .0
}

/// Now, truncated to the microsecond.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("a valid address")
}

fn net(s: &str) -> IpNet {
    parse_ip_net(s).expect("a valid network")
}

fn new_hash() -> TokenHash {
    record("x", "x").hash
}

trait Expiring {
    fn expiring(self, at: DateTime<Utc>) -> Self;
}

impl Expiring for TokenRecord {
    fn expiring(mut self, at: DateTime<Utc>) -> Self {
        self.expires_at = Some(at);
        self
    }
}

/// Names the check in the output when it panics.
struct Check(&'static str);

impl Drop for Check {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "store conformance: check `{}` failed; see its documentation in \
                 tower_pat::store::conformance for the rules it checks",
                self.0
            );
        }
    }
}

/// Unwrapping a store call that must succeed, with a message saying so.
trait Must<T> {
    fn must(self) -> T;
}

impl<T> Must<T> for Result<T, StoreError> {
    #[track_caller]
    fn must(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => panic!("store conformance: a store call that must succeed failed: {e}"),
        }
    }
}

/// Unwrapping a store call that must find a record.
trait Found {
    fn found(self) -> TokenRecord;
}

impl Found for Result<Option<TokenRecord>, StoreError> {
    #[track_caller]
    fn found(self) -> TokenRecord {
        match self {
            Ok(Some(r)) => r,
            Ok(None) => panic!("store conformance: a record that exists was not found"),
            Err(e) => panic!("store conformance: a store call that must succeed failed: {e}"),
        }
    }
}

/// Records every event it hears.
#[derive(Default)]
struct Events(Mutex<Vec<StoreEvent>>);

impl ChangeListener for Events {
    fn on_event(&self, event: &StoreEvent) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event.clone());
    }
}

impl Events {
    #[track_caller]
    fn subscribe<S: TokenStore>(store: &S) -> Arc<Self> {
        let events = Arc::new(Self::default());
        let weak: Weak<dyn ChangeListener> = Arc::downgrade(&events) as Weak<dyn ChangeListener>;
        assert!(
            store.subscribe(weak),
            "store conformance: TokenLookup::subscribe must return true: a TokenStore publishes \
             StoreEvent::Changed for its writes (embed a ChangeHub)"
        );
        events
    }

    /// Whether `Changed` for this id and hash was heard (a shared store may deliver it twice:
    /// locally, then through its feed).
    fn heard(&self, id: &str, hash: TokenHash) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&StoreEvent::Changed {
                id: id.to_owned(),
                hash,
            })
    }

    fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

#[track_caller]
fn assert_conflict<T: std::fmt::Debug>(result: Result<T, StoreError>, field: &str, rule: &str) {
    match result {
        Err(StoreError::Conflict { field: f }) if f == field => {}
        other => panic!(
            "store conformance: {rule}: expected StoreError::Conflict {{ field: {field:?} }}, \
             got {other:?}"
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// The checks

/// Every field of a record survives `insert` then `get` unchanged (times to the microsecond, IPv4
/// and IPv6 networks and addresses, a grace hash, non-ASCII names); `get` of an unknown id is
/// `None`; `count_by_subject` counts per subject.
pub async fn insert_and_get_round_trip<S: TokenStore>(store: S) {
    let _check = Check("insert_and_get_round_trip");
    let t = now();
    let mut r = record("alice", "laptop").expiring(t + TimeDelta::days(30));
    r.token_type = "service".to_owned();
    r.ip_restriction = vec![net("10.0.0.0/8"), net("2001:db8::/32")];
    r.last_used_at = Some(t - TimeDelta::seconds(5));
    r.last_used_ips = vec![ip("10.1.2.3"), ip("2001:db8::7")];
    r.last_rotated_at = Some(t - TimeDelta::hours(1));
    r.previous_hash = Some((new_hash(), t + TimeDelta::minutes(10)));
    r.name = "Ärger über CI".to_owned();
    store.insert(&r).await.must();

    assert_eq!(
        store.get(&r.id).await.must(),
        Some(r.clone()),
        "insert then get must give back every field unchanged"
    );
    assert_eq!(
        store.get("no-such-id").await.must(),
        None,
        "get of an unknown id must be None"
    );

    let plain = record("alice", "desktop");
    store.insert(&plain).await.must();
    assert_eq!(
        store.get(&plain.id).await.must(),
        Some(plain.clone()),
        "insert then get must give back every field unchanged"
    );
    assert_eq!(
        store.count_by_subject("alice").await.must(),
        2,
        "count_by_subject counts the subject's records"
    );
    assert_eq!(
        store.count_by_subject("bob").await.must(),
        0,
        "count_by_subject of a subject without records is 0"
    );
}

/// `insert` refuses a taken id, a taken hash and a name the subject already uses, each with
/// [`StoreError::Conflict`] naming the field; names are unique per subject and compared exactly.
pub async fn uniqueness<S: TokenStore>(store: S) {
    let _check = Check("uniqueness");
    let a = record("alice", "ci");
    store.insert(&a).await.must();

    let mut same_id = record("alice", "other");
    same_id.id = a.id.clone();
    assert_conflict(store.insert(&same_id).await, "id", "insert with a taken id");

    let mut same_hash = record("alice", "third");
    same_hash.hash = a.hash;
    assert_conflict(
        store.insert(&same_hash).await,
        "hash",
        "insert with a taken hash",
    );

    assert_conflict(
        store.insert(&record("alice", "ci")).await,
        "name",
        "insert with a name the subject already uses",
    );
    // Names are unique per subject, and compared exactly.
    store.insert(&record("bob", "ci")).await.must();
    store.insert(&record("alice", "CI")).await.must();
    assert_eq!(
        store.count_by_subject("alice").await.must(),
        2,
        "a refused insert must write nothing"
    );
}

/// `find_by_hash` finds a record by its current hash and nothing by an unknown hash.
pub async fn lookup_by_hash<S: TokenStore>(store: S) {
    let _check = Check("lookup_by_hash");
    let r = record("alice", "ci");
    store.insert(&r).await.must();
    assert_eq!(
        store.find_by_hash(&r.hash).await.must(),
        Some(r.clone()),
        "find_by_hash must find a record by its current hash"
    );
    assert_eq!(
        store.find_by_hash(&new_hash()).await.must(),
        None,
        "find_by_hash of an unknown hash must be None"
    );
}

/// `find_by_hash` returns revoked and expired records too: the layer names the reason.
pub async fn revoked_and_expired_are_found<S: TokenStore>(store: S) {
    let _check = Check("revoked_and_expired_are_found");
    let t = now();
    let expired = record("alice", "old").expiring(t - TimeDelta::seconds(1));
    store.insert(&expired).await.must();
    let found = store.find_by_hash(&expired.hash).await.found();
    assert!(
        found.is_expired_at(Utc::now()),
        "find_by_hash must return an expired record as it is"
    );

    let r = record("alice", "ci");
    store.insert(&r).await.must();
    store.revoke(&r.id, t).await.must();
    let found = store.find_by_hash(&r.hash).await.found();
    assert_eq!(
        found.revoked_at,
        Some(t),
        "find_by_hash must return a revoked record, revoked"
    );
}

/// After a rotation with a grace period both hashes answer; a grace hash whose period is over
/// answers nothing.
pub async fn previous_hash_only_within_grace<S: TokenStore>(store: S) {
    let _check = Check("previous_hash_only_within_grace");
    let t = now();
    let r = record("alice", "ci");
    store.insert(&r).await.must();

    // Rotate with a grace period: both hashes answer.
    let new = new_hash();
    let rotation =
        Rotation::new(r.hash, new, "pat_new", t).grace_until(Some(t + TimeDelta::minutes(5)));
    let rotated = store.rotate(&r.id, &rotation).await.must();
    assert_eq!(
        store.find_by_hash(&new).await.must(),
        Some(rotated.clone()),
        "after a rotation, find_by_hash must find the record by the new hash"
    );
    assert_eq!(
        store.find_by_hash(&r.hash).await.must(),
        Some(rotated),
        "during the grace period, find_by_hash must find the record by the previous hash"
    );

    // Once the grace period is over, the old hash is unknown.
    let mut ended = record("alice", "ended");
    let old = new_hash();
    ended.previous_hash = Some((old, t - TimeDelta::seconds(1)));
    store.insert(&ended).await.must();
    assert_eq!(
        store.find_by_hash(&old).await.must(),
        None,
        "a previous hash whose grace period is over must find nothing"
    );
    assert!(
        store.find_by_hash(&ended.hash).await.must().is_some(),
        "the current hash of a record with an ended grace period must still be found"
    );
}

/// `update` writes exactly the fields the patch names, sets `updated_at`, bumps the version by
/// one, announces the hash and the grace hash; an empty patch writes nothing; a name another
/// token of the subject has is a `name` conflict; an unknown id is [`StoreError::NotFound`].
pub async fn update_changes_only_the_named_fields<S: TokenStore>(store: S) {
    let _check = Check("update_changes_only_the_named_fields");
    let t = now();
    let mut r = record("alice", "ci");
    r.previous_hash = Some((new_hash(), t + TimeDelta::minutes(5)));
    r.expires_at = Some(t + TimeDelta::days(3));
    r.ip_restriction = vec![net("10.0.0.0/8")];
    let sibling = record("alice", "deploy");
    store.insert(&r).await.must();
    store.insert(&sibling).await.must();
    store
        .record_usage(&[UsageUpdate::new(&r.id, t, vec![ip("10.0.0.1")])])
        .await
        .must();
    let before = store.get(&r.id).await.found();
    assert_eq!(before.version, 0, "usage marks are not management writes");
    let events = Events::subscribe(&store);

    // One field: the others are kept.
    let at = t + TimeDelta::seconds(1);
    let renamed = store
        .update(&r.id, &TokenPatch::new(at).if_version(0).name("ci-2"))
        .await
        .must();
    let mut expected = before.clone();
    expected.name = "ci-2".to_owned();
    expected.updated_at = at;
    expected.version = 1;
    assert_eq!(
        renamed, expected,
        "update must change the named field, updated_at and the version (+1), nothing else"
    );
    assert_eq!(
        store.get(&r.id).await.must(),
        Some(expected.clone()),
        "update must store the record it returns"
    );
    assert!(
        events.heard(&r.id, r.hash),
        "update must publish Changed for the hash"
    );
    assert!(
        events.heard(&r.id, r.previous_hash.unwrap().0),
        "update must publish Changed for the grace hash too"
    );

    // Every field at once; the expiry can be cleared.
    let at = t + TimeDelta::seconds(2);
    let patch = TokenPatch::new(at)
        .scopes(ScopeSet::parse(["admin"]).unwrap())
        .expires_at(None)
        .ip_restriction([net("192.168.0.0/16")]);
    let changed = store.update(&r.id, &patch).await.must();
    expected.scopes = ScopeSet::parse(["admin"]).unwrap();
    expected.expires_at = None;
    expected.ip_restriction = vec![net("192.168.0.0/16")];
    expected.updated_at = at;
    expected.version = 2;
    assert_eq!(
        changed, expected,
        "update must change every named field, and can clear the expiry"
    );
    assert_eq!(
        store.get(&r.id).await.must(),
        Some(expected.clone()),
        "update must store the record it returns"
    );
    // The renamed record is found under its new name, by the search too.
    let found = store
        .list(&ListQuery {
            search: Some("CI-2".to_owned()),
            ..ListQuery::for_subject("alice")
        })
        .await
        .must();
    assert_eq!(
        found.items,
        vec![expected.clone()],
        "a renamed record must be listed under its new name"
    );

    // An expiry set, an empty restriction: anywhere.
    let exp = t + TimeDelta::days(1);
    let patch = TokenPatch::new(at).expires_at(Some(exp)).ip_restriction([]);
    let changed = store.update(&r.id, &patch).await.must();
    assert_eq!(changed.expires_at, Some(exp), "update must set the expiry");
    assert!(
        changed.ip_restriction.is_empty(),
        "update must set an empty IP restriction"
    );
    assert_eq!(
        changed.version, 3,
        "each update must add one to the version"
    );
    expected = changed;

    // An empty patch writes nothing.
    let same = store
        .update(&r.id, &TokenPatch::new(at + TimeDelta::hours(1)))
        .await
        .must();
    assert_eq!(
        same, expected,
        "an empty patch must return the record unchanged"
    );
    assert_eq!(
        store.get(&r.id).await.must(),
        Some(expected.clone()),
        "an empty patch must write nothing (not even updated_at or the version)"
    );

    // A name another token of the subject has.
    assert_conflict(
        store
            .update(&r.id, &TokenPatch::new(at).name(sibling.name.clone()))
            .await,
        "name",
        "update to a name another token of the subject has",
    );
    assert_eq!(
        store.get(&r.id).await.must(),
        Some(expected),
        "a refused update must write nothing"
    );
    assert!(
        matches!(
            store
                .update("no-such-id", &TokenPatch::new(at).name("x"))
                .await,
            Err(StoreError::NotFound)
        ),
        "update of an unknown id must fail with NotFound"
    );
    assert!(
        matches!(
            store.update("no-such-id", &TokenPatch::new(at)).await,
            Err(StoreError::NotFound)
        ),
        "an empty update of an unknown id must fail with NotFound"
    );
}

/// `update` of a revoked record fails with [`StoreError::Revoked`] and writes nothing, whatever the
/// patch and version.
pub async fn update_never_clears_a_revocation<S: TokenStore>(store: S) {
    let _check = Check("update_never_clears_a_revocation");
    let t = now();
    let r = record("alice", "ci");
    store.insert(&r).await.must();
    // A caller read the record, then it was revoked.
    let read = store.get(&r.id).await.found();
    let revoked = store.revoke(&r.id, t).await.found();
    assert_eq!(
        revoked.version,
        read.version + 1,
        "revoke must add one to the version"
    );

    for patch in [
        TokenPatch::new(t).if_version(read.version).name("renamed"),
        TokenPatch::new(t).name("renamed"),
        TokenPatch::new(t).expires_at(None),
        TokenPatch::new(t),
    ] {
        match store.update(&r.id, &patch).await {
            Err(StoreError::Revoked) => {}
            other => panic!(
                "store conformance: update of a revoked record must fail with StoreError::Revoked \
                 (a revocation is permanent); {patch:?} gave {other:?}"
            ),
        }
    }
    let stored = store.get(&r.id).await.found();
    assert_eq!(
        stored, revoked,
        "a refused update of a revoked record must write nothing"
    );
    assert_eq!(
        stored.revoked_at,
        Some(t),
        "a revocation is permanent: no update clears revoked_at"
    );
}

/// A patch that disables a record stores `disabled_at` (the record is still found by its hash, so
/// the layer can say why it refuses it), an enabling patch clears it, each as one management write
/// under the version condition; other fields are untouched; a revoked record stays revoked.
pub async fn disable_and_enable<S: TokenStore>(store: S) {
    let _check = Check("disable_and_enable");
    let t = now();
    let r = record("alice", "ci");
    store.insert(&r).await.must();
    let disabled = store
        .update(&r.id, &TokenPatch::new(t).if_version(r.version).disable())
        .await
        .must();
    assert_eq!(
        disabled.disabled_at,
        Some(t),
        "disable must store disabled_at"
    );
    assert_eq!(
        disabled.version,
        r.version + 1,
        "disable is one management write"
    );
    assert_eq!(
        (
            disabled.name.as_str(),
            &disabled.scopes,
            disabled.expires_at
        ),
        (r.name.as_str(), &r.scopes, r.expires_at),
        "disable must change nothing else"
    );
    let found = store.find_by_hash(&r.hash).await.must();
    assert_eq!(
        found.as_ref().and_then(|f| f.disabled_at),
        Some(t),
        "a disabled record must still be found by its hash, disabled"
    );
    // An enable from a read older than the disable changes nothing.
    match store
        .update(&r.id, &TokenPatch::new(t).if_version(r.version).enable())
        .await
    {
        Err(StoreError::Stale) => {}
        other => panic!(
            "store conformance: update with an old if_version must fail with Stale (an enable \
             from a read older than the disable); got {other:?}"
        ),
    }
    let enabled = store
        .update(
            &r.id,
            &TokenPatch::new(t).if_version(disabled.version).enable(),
        )
        .await
        .must();
    assert_eq!(enabled.disabled_at, None, "enable must clear disabled_at");
    assert_eq!(store.get(&r.id).await.found(), enabled);
    store.revoke(&r.id, t).await.found();
    match store.update(&r.id, &TokenPatch::new(t).enable()).await {
        Err(StoreError::Revoked) => {}
        other => panic!("store conformance: enabling a revoked record must fail; got {other:?}"),
    }
}

/// `update` and `rotate` with an `if_version` that is no longer the stored version fail with
/// [`StoreError::Stale`] and write nothing; with the current version they apply.
pub async fn stale_writes_change_nothing<S: TokenStore>(store: S) {
    let _check = Check("stale_writes_change_nothing");
    let t = now();
    let r = record("alice", "ci");
    store.insert(&r).await.must();
    let read = store.get(&r.id).await.found();
    // Someone else changes the record meanwhile.
    let current = store
        .update(&r.id, &TokenPatch::new(t).name("theirs"))
        .await
        .must();
    assert_eq!(
        current.version,
        read.version + 1,
        "update must add one to the version"
    );

    let mine = TokenPatch::new(t).if_version(read.version).name("mine");
    assert!(
        matches!(store.update(&r.id, &mine).await, Err(StoreError::Stale)),
        "update with an old if_version must fail with Stale"
    );
    // An empty patch checks the version too.
    let empty = TokenPatch::new(t).if_version(read.version);
    assert!(
        matches!(store.update(&r.id, &empty).await, Err(StoreError::Stale)),
        "an empty update with an old if_version must fail with Stale"
    );
    let rotation = Rotation::new(read.hash, new_hash(), "pat_x", t).if_version(read.version);
    assert!(
        matches!(store.rotate(&r.id, &rotation).await, Err(StoreError::Stale)),
        "rotate with an old if_version must fail with Stale"
    );
    assert_eq!(
        store.get(&r.id).await.must(),
        Some(current.clone()),
        "a stale write must change nothing"
    );

    // With the current version, it applies.
    let mine = TokenPatch::new(t).if_version(current.version).name("mine");
    assert_eq!(
        store.update(&r.id, &mine).await.must().name,
        "mine",
        "update with the current if_version must apply"
    );
}

/// `rotate` replaces hash and start, keeps the old hash as grace hash only when asked, drops an
/// earlier grace hash, sets `last_rotated_at`/`updated_at`, changes the expiry only when asked,
/// keeps usage, bumps the version, and announces every hash the record answered to.
pub async fn rotate_replaces_the_secret<S: TokenStore>(store: S) {
    let _check = Check("rotate_replaces_the_secret");
    let t = now();
    let mut r = record("alice", "ci");
    r.expires_at = Some(t + TimeDelta::days(3));
    store.insert(&r).await.must();
    store
        .record_usage(&[UsageUpdate::new(&r.id, t, vec![ip("10.0.0.1")])])
        .await
        .must();
    let before = store.get(&r.id).await.found();
    let events = Events::subscribe(&store);

    // With a grace period, the old hash keeps answering until it ends.
    let (first, grace) = (new_hash(), t + TimeDelta::minutes(5));
    let at = t + TimeDelta::seconds(1);
    let rotation = Rotation::new(r.hash, first, "pat_first", at)
        .if_version(0)
        .grace_until(Some(grace));
    let rotated = store.rotate(&r.id, &rotation).await.must();
    let mut expected = before.clone();
    expected.hash = first;
    expected.start = "pat_first".to_owned();
    expected.previous_hash = Some((r.hash, grace));
    expected.last_rotated_at = Some(at);
    expected.updated_at = at;
    expected.version = 1;
    assert_eq!(
        rotated, expected,
        "rotate must set hash, start, previous_hash (old hash, grace end), last_rotated_at, \
         updated_at and the version (+1), nothing else"
    );
    assert_eq!(
        store.get(&r.id).await.must(),
        Some(expected.clone()),
        "rotate must store the record it returns"
    );
    assert!(
        events.heard(&r.id, r.hash),
        "rotate must publish Changed for the replaced hash"
    );
    assert_eq!(
        store.find_by_hash(&first).await.must(),
        Some(expected.clone()),
        "after a rotation, find_by_hash must find the record by the new hash"
    );
    assert_eq!(
        store.find_by_hash(&r.hash).await.must(),
        Some(expected.clone()),
        "during the grace period, find_by_hash must find the record by the previous hash"
    );

    // Rotated again without one: the grace hash stops at once, and is announced with the
    // current one.
    events.clear();
    let second = new_hash();
    let exp = t + TimeDelta::days(9);
    let at = t + TimeDelta::seconds(2);
    let rotation = Rotation::new(first, second, "pat_second", at).expires_at(Some(exp));
    let rotated = store.rotate(&r.id, &rotation).await.must();
    assert_eq!(rotated.hash, second, "rotate must set the new hash");
    assert_eq!(
        rotated.previous_hash, None,
        "a rotation without a grace period must leave no previous hash (an earlier grace hash \
         never survives a rotation)"
    );
    assert_eq!(
        rotated.expires_at,
        Some(exp),
        "rotate must set the expiry it names"
    );
    assert_eq!(
        rotated.version, 2,
        "each rotation must add one to the version"
    );
    assert_eq!(
        rotated.last_used_ips,
        vec![ip("10.0.0.1")],
        "rotate must keep the usage fields"
    );
    assert!(
        events.heard(&r.id, first),
        "rotate must publish Changed for the replaced hash"
    );
    assert!(
        events.heard(&r.id, r.hash),
        "rotate must publish Changed for the grace hash too"
    );
    assert_eq!(
        store.find_by_hash(&r.hash).await.must(),
        None,
        "an earlier grace hash must find nothing after a rotation without grace"
    );
    assert_eq!(
        store.find_by_hash(&first).await.must(),
        None,
        "a hash rotated away without grace must find nothing"
    );
    assert_eq!(
        store.find_by_hash(&second).await.must(),
        Some(rotated.clone()),
        "after a rotation, find_by_hash must find the record by the new hash"
    );

    // The expiry can be lifted by a rotation too.
    let rotation = Rotation::new(second, new_hash(), "pat_third", at).expires_at(None);
    assert_eq!(
        store.rotate(&r.id, &rotation).await.must().expires_at,
        None,
        "a rotation can lift the expiry"
    );

    assert!(
        matches!(
            store
                .rotate(
                    "no-such-id",
                    &Rotation::new(r.hash, new_hash(), "pat_x", at)
                )
                .await,
            Err(StoreError::NotFound)
        ),
        "rotate of an unknown id must fail with NotFound"
    );
}

/// A rotation whose `old_hash` is no longer current fails with [`StoreError::Stale`] (a replaced
/// secret never comes back); a new hash another record has is a `hash` conflict.
pub async fn rotate_never_restores_a_replaced_hash<S: TokenStore>(store: S) {
    let _check = Check("rotate_never_restores_a_replaced_hash");
    let t = now();
    let r = record("alice", "ci");
    let sibling = record("alice", "deploy");
    store.insert(&r).await.must();
    store.insert(&sibling).await.must();
    let first = new_hash();
    let current = store
        .rotate(&r.id, &Rotation::new(r.hash, first, "pat_first", t))
        .await
        .must();

    // A rotation that read the record before: its old hash is no longer the record's.
    let late = Rotation::new(r.hash, new_hash(), "pat_late", t);
    assert!(
        matches!(store.rotate(&r.id, &late).await, Err(StoreError::Stale)),
        "rotate whose old_hash is no longer the record's hash must fail with Stale"
    );
    // The refused rotation changed nothing, and the replaced hash stays unknown.
    assert_eq!(
        store.get(&r.id).await.must(),
        Some(current.clone()),
        "a stale rotation must change nothing"
    );
    assert_eq!(
        store.find_by_hash(&r.hash).await.must(),
        None,
        "a hash rotated away must never answer again"
    );

    // Another record's hash is taken.
    let clash = Rotation::new(first, sibling.hash, "pat_clash", t);
    assert_conflict(
        store.rotate(&r.id, &clash).await,
        "hash",
        "rotate to another record's hash",
    );
    assert_eq!(
        store.get(&r.id).await.must(),
        Some(current),
        "a refused rotation must change nothing"
    );
}

/// `rotate` of a revoked record fails with [`StoreError::Revoked`], whatever the version, and the
/// new hash answers nothing.
pub async fn rotate_refuses_a_revoked_token<S: TokenStore>(store: S) {
    let _check = Check("rotate_refuses_a_revoked_token");
    let t = now();
    let r = record("alice", "ci");
    store.insert(&r).await.must();
    let read = store.get(&r.id).await.found();
    let revoked = store.revoke(&r.id, t).await.found();
    let new = new_hash();
    for rotation in [
        Rotation::new(read.hash, new, "pat_x", t).if_version(read.version),
        Rotation::new(read.hash, new, "pat_x", t),
        Rotation::new(read.hash, new, "pat_x", t).if_version(revoked.version),
    ] {
        match store.rotate(&r.id, &rotation).await {
            Err(StoreError::Revoked) => {}
            other => panic!(
                "store conformance: rotate of a revoked record must fail with StoreError::Revoked, \
                 got {other:?}"
            ),
        }
    }
    assert_eq!(
        store.get(&r.id).await.must(),
        Some(revoked),
        "a refused rotation of a revoked record must write nothing"
    );
    assert_eq!(
        store.find_by_hash(&new).await.must(),
        None,
        "the new hash of a refused rotation must find nothing"
    );
}

/// The version starts at 0 and goes up by one per `update`, `rotate` and first `revoke`; usage
/// marks and a second revocation leave it alone.
pub async fn versions_count_management_writes<S: TokenStore>(store: S) {
    let _check = Check("versions_count_management_writes");
    let t = now();
    let r = record("alice", "ci");
    assert_eq!(r.version, 0, "a new record is at version 0");
    store.insert(&r).await.must();
    let v = || async { store.get(&r.id).await.found().version };
    assert_eq!(v().await, 0, "insert must store the version given (0)");
    store
        .record_usage(&[UsageUpdate::new(&r.id, t, vec![ip("10.0.0.1")])])
        .await
        .must();
    assert_eq!(v().await, 0, "usage marks must not change the version");
    store
        .update(&r.id, &TokenPatch::new(t).name("b"))
        .await
        .must();
    assert_eq!(v().await, 1, "update must add one to the version");
    let h = store.get(&r.id).await.found().hash;
    store
        .rotate(&r.id, &Rotation::new(h, new_hash(), "pat_x", t))
        .await
        .must();
    assert_eq!(v().await, 2, "rotate must add one to the version");
    store.revoke(&r.id, t).await.must();
    assert_eq!(v().await, 3, "revoke must add one to the version");
    store.revoke(&r.id, t + TimeDelta::hours(1)).await.must();
    assert_eq!(
        v().await,
        3,
        "revoking a revoked record must not change the version"
    );
    store
        .record_usage(&[UsageUpdate::new(&r.id, t + TimeDelta::seconds(1), vec![])])
        .await
        .must();
    assert_eq!(v().await, 3, "usage marks must not change the version");
}

/// `revoke` sets `revoked_at` and `updated_at` once and announces the hash; revoking again keeps
/// the first time; an unknown id is `None`.
pub async fn revoke_keeps_the_first_time<S: TokenStore>(store: S) {
    let _check = Check("revoke_keeps_the_first_time");
    let t = now();
    let r = record("alice", "ci");
    store.insert(&r).await.must();
    let events = Events::subscribe(&store);

    let revoked = store.revoke(&r.id, t).await.found();
    assert_eq!(revoked.revoked_at, Some(t), "revoke must set revoked_at");
    assert_eq!(revoked.updated_at, t, "revoke must set updated_at");
    assert!(
        events.heard(&r.id, r.hash),
        "revoke must publish Changed for the hash"
    );

    let again = store.revoke(&r.id, t + TimeDelta::hours(1)).await.found();
    assert_eq!(
        again.revoked_at,
        Some(t),
        "revoking again must keep the first revoked_at"
    );
    assert_eq!(again.updated_at, t, "revoking again must write nothing");
    assert_eq!(
        store.get(&r.id).await.must(),
        Some(again),
        "revoke must store the record it returns"
    );
    assert_eq!(
        store.revoke("no-such-id", t).await.must(),
        None,
        "revoke of an unknown id must be None"
    );
}

/// `delete` returns the record, announces its hash, and frees its id, hash and name; deleting
/// again is `None`.
pub async fn delete_removes<S: TokenStore>(store: S) {
    let _check = Check("delete_removes");
    let r = record("alice", "ci");
    store.insert(&r).await.must();
    let events = Events::subscribe(&store);

    assert_eq!(
        store.delete(&r.id).await.must(),
        Some(r.clone()),
        "delete must return the removed record"
    );
    assert!(
        events.heard(&r.id, r.hash),
        "delete must publish Changed for the hash"
    );
    assert_eq!(
        store.get(&r.id).await.must(),
        None,
        "a deleted record must not be found by id"
    );
    assert_eq!(
        store.find_by_hash(&r.hash).await.must(),
        None,
        "a deleted record must not be found by hash"
    );
    assert_eq!(
        store.delete(&r.id).await.must(),
        None,
        "delete of an unknown id must be None"
    );
    assert_eq!(
        store.count_by_subject("alice").await.must(),
        0,
        "a deleted record must not be counted"
    );
    // The name is free again.
    store.insert(&record("alice", "ci")).await.must();
}

/// A patch or a rotation made [`if_unexpired`](TokenPatch::if_unexpired) fails with
/// [`StoreError::Expired`] on a record that has expired, and changes nothing; without the
/// condition the same write goes through (the store gives no meaning of its own to expiry).
pub async fn writes_on_the_condition_of_an_unexpired_token<S: TokenStore>(store: S) {
    let _check = Check("writes_on_the_condition_of_an_unexpired_token");
    let t = now();
    let mut r = record("alice", "ci");
    r.expires_at = Some(t - TimeDelta::seconds(1));
    store.insert(&r).await.must();
    let later = Some(t + TimeDelta::hours(1));
    let patch = TokenPatch::new(t).expires_at(later).if_unexpired();
    assert!(
        matches!(store.update(&r.id, &patch).await, Err(StoreError::Expired)),
        "update if_unexpired of an expired record must be Expired"
    );
    let (new_hash, new_start) = (TokenHasher::sha256().hash("pat_replacement"), "pat_repl");
    let rotation = Rotation::new(r.hash, new_hash, new_start, t).if_unexpired();
    assert!(
        matches!(
            store.rotate(&r.id, &rotation).await,
            Err(StoreError::Expired)
        ),
        "rotate if_unexpired of an expired record must be Expired"
    );
    assert_eq!(
        store.get(&r.id).await.must(),
        Some(r.clone()),
        "a write whose condition failed must change nothing"
    );
    let patched = store
        .update(&r.id, &TokenPatch::new(t).expires_at(later))
        .await
        .must();
    assert_eq!(
        patched.expires_at, later,
        "without the condition it applies"
    );
    let live = store
        .update(&r.id, &TokenPatch::new(t).name("renamed").if_unexpired())
        .await
        .must();
    assert_eq!(live.name, "renamed", "an unexpired record is written");
}

/// A [`CallerGuard`] on a write ([`TokenPatch::if_caller`], [`Rotation::if_caller`],
/// [`TokenStore::insert_below_guarded`]) lets it apply only while the caller's record is still
/// the version named: once the caller changed, or is gone, the write fails with
/// [`StoreError::CallerChanged`] and changes nothing. A store whose
/// [`checks_caller_guard`](TokenStore::checks_caller_guard) is `false` passes the update and
/// rotation parts (the management API then checks the caller itself), one whose
/// `insert_below_guarded` is [`StoreError::Unsupported`] the creation part.
pub async fn caller_guard_conditions_writes<S: TokenStore>(store: S) {
    let _check = Check("caller_guard_conditions_writes");
    let t = now();
    let caller = record("alice", "caller");
    let target = record("bob", "target");
    store.insert(&caller).await.must();
    store.insert(&target).await.must();
    let read = CallerGuard::new(&*caller.id, caller.version);
    let mut target = target;
    if store.checks_caller_guard() {
        // The caller as read: the writes apply.
        let patch = TokenPatch::new(t)
            .if_version(target.version)
            .if_caller(read.clone())
            .name("renamed");
        target = store.update(&target.id, &patch).await.must();
        assert_eq!(
            target.name, "renamed",
            "an update whose caller guard holds must apply"
        );
        let rotation = Rotation::new(target.hash, new_hash(), "pat_x", t)
            .if_version(target.version)
            .if_caller(read.clone());
        target = store.rotate(&target.id, &rotation).await.must();
        // A guard naming the record written itself, at its version, holds too.
        let own = CallerGuard::new(&*target.id, target.version);
        target = store
            .update(&target.id, &TokenPatch::new(t).if_caller(own).name("own"))
            .await
            .must();
    }
    // Someone changes the caller (here: narrows it).
    let changed = store
        .update(
            &caller.id,
            &TokenPatch::new(t).scopes(ScopeSet::parse(["repo:read"]).unwrap()),
        )
        .await
        .must();
    let refused = |what: &str, r: Result<TokenRecord, StoreError>| {
        assert!(
            matches!(r, Err(StoreError::CallerChanged)),
            "{what} whose caller changed since the guard's version must fail with CallerChanged, \
             got {r:?}"
        );
    };
    if store.checks_caller_guard() {
        let patch = TokenPatch::new(t)
            .if_version(target.version)
            .if_caller(read.clone())
            .scopes(ScopeSet::parse(["repo:read", "user:*"]).unwrap())
            .disable();
        refused("an update", store.update(&target.id, &patch).await);
        let empty = TokenPatch::new(t).if_caller(read.clone());
        refused("an empty update", store.update(&target.id, &empty).await);
        let rotation = Rotation::new(target.hash, new_hash(), "pat_y", t)
            .if_version(target.version)
            .if_caller(read.clone());
        refused("a rotation", store.rotate(&target.id, &rotation).await);
        assert_eq!(
            store.get(&target.id).await.must(),
            Some(target.clone()),
            "a write whose caller guard failed must change nothing"
        );
    }
    let child = record("alice", "child");
    match store.insert_below_guarded(&child, 100, &read).await {
        Err(StoreError::Unsupported { .. }) => {}
        Err(StoreError::CallerChanged) => {
            assert_eq!(
                store.get(&child.id).await.must(),
                None,
                "insert_below_guarded whose caller guard failed must insert nothing"
            );
            let now_read = CallerGuard::new(&*changed.id, changed.version);
            assert!(
                store
                    .insert_below_guarded(&child, 100, &now_read)
                    .await
                    .must(),
                "insert_below_guarded whose caller guard holds must insert"
            );
            assert_eq!(store.get(&child.id).await.must(), Some(child.clone()));
            assert!(
                !store
                    .insert_below_guarded(&record("alice", "full"), 2, &now_read)
                    .await
                    .must(),
                "insert_below_guarded must keep the limit"
            );
        }
        other => panic!(
            "store conformance: insert_below_guarded whose caller changed must fail with \
             CallerChanged, got {other:?}"
        ),
    }
    // A caller revoked, then one gone: the guard fails too.
    let revoked = store
        .revoke(&caller.id, t)
        .await
        .must()
        .expect("the caller exists");
    let gone = CallerGuard::new(&*revoked.id, revoked.version);
    store.delete(&caller.id).await.must();
    if store.checks_caller_guard() {
        let patch = TokenPatch::new(t).if_caller(gone.clone()).name("late");
        refused(
            "an update by a deleted caller",
            store.update(&target.id, &patch).await,
        );
    }
    if !matches!(
        store
            .insert_below_guarded(&record("alice", "orphan"), 100, &gone)
            .await,
        Err(StoreError::Unsupported { .. } | StoreError::CallerChanged)
    ) {
        panic!("store conformance: insert_below_guarded by a deleted caller must fail");
    }
}

/// Two tokens that act on each other at once, each write guarded by its caller
/// ([`CallerGuard`]), never fail as a backend error (a deadlock between the two rows' locks): each
/// applies, or fails with [`StoreError::CallerChanged`] (or [`StoreError::Stale`]).
pub async fn caller_guards_of_tokens_acting_on_each_other<S: TokenStore>(store: S) {
    let _check = Check("caller_guards_of_tokens_acting_on_each_other");
    if !store.checks_caller_guard() {
        return;
    }
    let a = record("alice", "a");
    let b = record("alice", "b");
    store.insert(&a).await.must();
    store.insert(&b).await.must();
    let store = std::sync::Arc::new(store);
    for round in 0..20 {
        let (a, b) = (
            store.get(&a.id).await.found(),
            store.get(&b.id).await.found(),
        );
        let racers: Vec<_> = [(a.clone(), b.clone()), (b, a)]
            .into_iter()
            .flat_map(|(caller, target)| [(caller.clone(), target.clone()), (caller, target)])
            .enumerate()
            .map(|(i, (caller, target))| {
                let store = std::sync::Arc::clone(&store);
                tokio::spawn(async move {
                    let patch = TokenPatch::new(now())
                        .if_caller(CallerGuard::new(&*caller.id, caller.version))
                        .name(format!(
                            "{}-{round}-{i}",
                            target.name.split('-').next().unwrap_or("t")
                        ));
                    store.update(&target.id, &patch).await
                })
            })
            .collect();
        for racer in racers {
            match racer.await.expect("a racer panicked") {
                Ok(_) | Err(StoreError::CallerChanged | StoreError::Stale) => {}
                Err(e) => panic!(
                    "store conformance: guarded writes of two tokens on each other must apply \
                     or fail with CallerChanged, got {e}"
                ),
            }
        }
    }
}

/// A [`CallerGuard`] on a revocation or deletion of another token
/// ([`TokenStore::revoke_if_covered_guarded`], [`TokenStore::delete_if_covered_guarded`]) lets it
/// apply only while the caller's record is still the version named, checked in the same atomic
/// write as `covering`: once the caller was narrowed, disabled, revoked or deleted, the write
/// fails with [`StoreError::CallerChanged`] and changes nothing, however much `covering` grants
/// (the caller's scopes as they were), and a target already revoked, or gone, is no exception.
/// With the guard holding, `covering` is still checked ([`StoreError::Stale`]). A store that
/// answers [`StoreError::Unsupported`] for both passes (the management API then reads the
/// caller again right before the write); supporting one without the other does not.
pub async fn caller_guard_conditions_revocations_and_deletions<S: TokenStore>(store: S) {
    let _check = Check("caller_guard_conditions_revocations_and_deletions");
    let t = now();
    let caller = record("alice", "caller");
    let target = record("alice", "target");
    let other = record("alice", "other");
    for r in [&caller, &target, &other] {
        store.insert(r).await.must();
    }
    let covering = ScopeSet::parse(["repo:*", "user:*"]).unwrap();
    let uncovering = ScopeSet::parse(["repo:read"]).unwrap();
    let read = CallerGuard::new(&*caller.id, caller.version);
    match store
        .revoke_if_covered_guarded(&other.id, t, &uncovering, &read)
        .await
    {
        Err(StoreError::Unsupported { .. }) => {
            assert!(
                matches!(
                    store
                        .delete_if_covered_guarded(&other.id, &covering, &read)
                        .await,
                    Err(StoreError::Unsupported { .. })
                ),
                "a store without revoke_if_covered_guarded must not half-support \
                 delete_if_covered_guarded"
            );
            return;
        }
        Err(StoreError::Stale) => {}
        other => panic!(
            "store conformance: revoke_if_covered_guarded whose guard holds, with scopes that do \
             not grant the record's, must be Stale, got {other:?}"
        ),
    }
    assert!(
        matches!(
            store
                .delete_if_covered_guarded(&other.id, &uncovering, &read)
                .await,
            Err(StoreError::Stale)
        ),
        "delete_if_covered_guarded whose guard holds, with scopes that do not grant the \
         record's, must be Stale"
    );
    // The caller as read: both apply.
    let revoked = store
        .revoke_if_covered_guarded(&other.id, t, &covering, &read)
        .await
        .found();
    assert!(
        revoked.is_revoked(),
        "a revocation whose caller guard holds must apply"
    );
    assert!(
        store
            .delete_if_covered_guarded(&other.id, &covering, &read)
            .await
            .must()
            .is_some(),
        "a deletion whose caller guard holds must apply"
    );
    assert_eq!(store.get(&other.id).await.must(), None);

    // Someone narrows the caller: the guard at the version read fails, changing nothing.
    let narrowed = store
        .update(&caller.id, &TokenPatch::new(t).scopes(uncovering.clone()))
        .await
        .must();
    let refused = |what: &str, r: Result<Option<TokenRecord>, StoreError>| {
        assert!(
            matches!(r, Err(StoreError::CallerChanged)),
            "{what} whose caller changed since the guard's version must fail with \
             CallerChanged, got {r:?}"
        );
    };
    refused(
        "a revocation",
        store
            .revoke_if_covered_guarded(&target.id, t, &covering, &read)
            .await,
    );
    refused(
        "a deletion",
        store
            .delete_if_covered_guarded(&target.id, &covering, &read)
            .await,
    );
    refused(
        "a revocation of an unknown id",
        store
            .revoke_if_covered_guarded("no-such-id", t, &covering, &read)
            .await,
    );
    refused(
        "a deletion of an unknown id",
        store
            .delete_if_covered_guarded("no-such-id", &covering, &read)
            .await,
    );
    assert_eq!(
        store.get(&target.id).await.must(),
        Some(target.clone()),
        "a revocation or deletion whose caller guard failed must change nothing"
    );

    // At the caller's new version the guard holds again.
    let now_read = CallerGuard::new(&*narrowed.id, narrowed.version);
    let target = store
        .revoke_if_covered_guarded(&target.id, t, &covering, &now_read)
        .await
        .found();
    assert!(target.is_revoked());

    // A caller disabled since: its guard fails, on a revoked target too.
    let disabled = store
        .update(&caller.id, &TokenPatch::new(t).disable())
        .await
        .must();
    refused(
        "a revocation of a revoked record",
        store
            .revoke_if_covered_guarded(&target.id, t, &covering, &now_read)
            .await,
    );
    refused(
        "a deletion by a disabled caller",
        store
            .delete_if_covered_guarded(&target.id, &covering, &now_read)
            .await,
    );
    // A caller revoked, then gone: the guard fails too.
    let gone = CallerGuard::new(&*disabled.id, disabled.version);
    store.revoke(&caller.id, t).await.must();
    refused(
        "a deletion by a revoked caller",
        store
            .delete_if_covered_guarded(&target.id, &covering, &gone)
            .await,
    );
    store.delete(&caller.id).await.must();
    refused(
        "a deletion by a deleted caller",
        store
            .delete_if_covered_guarded(&target.id, &covering, &gone)
            .await,
    );
    assert_eq!(
        store.get(&target.id).await.must(),
        Some(target),
        "a deletion whose caller guard failed must remove nothing"
    );
}

/// `insert_below` inserts while the subject has fewer records than the limit (revoked ones
/// count), refuses with `Ok(false)` at it, and holds it under concurrent creations: eight at once
/// with room for three insert exactly three. Other subjects are not counted. A store that answers
/// [`StoreError::Unsupported`] (the trait's default) passes: the management API then counts and
/// inserts one creation at a time in its own process.
pub async fn insert_below_holds_the_limit_under_concurrency<S: TokenStore>(store: S) {
    let _check = Check("insert_below_holds_the_limit_under_concurrency");
    let first = record("alice", "first");
    match store.insert_below(&first, 4).await {
        Err(StoreError::Unsupported { .. }) => return,
        Ok(true) => {}
        other => {
            panic!("store conformance: insert_below under the limit must insert, got {other:?}")
        }
    }
    assert_eq!(store.get(&first.id).await.must(), Some(first.clone()));
    store.revoke(&first.id, now()).await.must();
    store.insert(&record("bob", "other")).await.must();
    let store = std::sync::Arc::new(store);
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let store = std::sync::Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .insert_below(&record("alice", &format!("r{i}")), 4)
                    .await
            })
        })
        .collect();
    let mut inserted = 0;
    for racer in racers {
        if racer.await.expect("a racer panicked").must() {
            inserted += 1;
        }
    }
    assert_eq!(
        inserted, 3,
        "insert_below with room for 3 (one revoked record counts) must insert exactly 3 of 8 concurrent creations"
    );
    assert_eq!(store.count_by_subject("alice").await.must(), 4);
    let late = record("alice", "late");
    assert!(
        !store.insert_below(&late, 4).await.must(),
        "insert_below at the limit must refuse"
    );
    assert_eq!(store.get(&late.id).await.must(), None);
    assert!(
        store.insert_below(&record("bob", "more"), 2).await.must(),
        "another subject's records must not count"
    );
}

/// `revoke_if_covered` and `delete_if_covered` act only on a record whose every scope the scopes
/// given grant: one holding a scope they do not grant is [`StoreError::Stale`] and changes nothing;
/// a rename, or other scopes within them, in between is no condition; an unknown id is `None`; a
/// revoked record is revoked as it is, whatever its scopes, but deleted only under the condition.
/// A store that answers [`StoreError::Unsupported`] (the trait's default) passes: the management
/// API then acts without the condition.
pub async fn conditional_revoke_and_delete<S: TokenStore>(store: S) {
    let _check = Check("conditional_revoke_and_delete");
    let t = now();
    let r = record("alice", "ci");
    store.insert(&r).await.must();
    // Grants `repo:read`, not the record's `user:*`.
    let other_scopes = ScopeSet::parse(["repo:read"]).unwrap();
    let wider = ScopeSet::parse(["repo:*", "user:*"]).unwrap();
    match store.revoke_if_covered(&r.id, t, &other_scopes).await {
        Err(StoreError::Unsupported { .. }) => {
            assert!(
                matches!(
                    store.delete_if_covered(&r.id, &other_scopes).await,
                    Err(StoreError::Unsupported { .. })
                ),
                "a store without revoke_if_covered must not half-support delete_if_covered"
            );
            return;
        }
        Err(StoreError::Stale) => {}
        other => panic!(
            "store conformance: revoke_if_covered with scopes that do not grant the record's must \
             be Stale, got {other:?}"
        ),
    }
    assert!(
        matches!(
            store.delete_if_covered(&r.id, &other_scopes).await,
            Err(StoreError::Stale)
        ),
        "delete_if_covered with scopes that do not grant the record's must be Stale"
    );
    assert_eq!(
        store.get(&r.id).await.must(),
        Some(r.clone()),
        "a conditional write whose condition failed must change nothing"
    );
    assert_eq!(
        store
            .revoke_if_covered("no-such-id", t, &r.scopes)
            .await
            .must(),
        None,
        "revoke_if_covered of an unknown id must be None"
    );
    assert_eq!(
        store
            .delete_if_covered("no-such-id", &r.scopes)
            .await
            .must(),
        None,
        "delete_if_covered of an unknown id must be None"
    );

    // A rename in between is no condition, nor are scopes within the ones given.
    let renamed = store
        .update(&r.id, &TokenPatch::new(t).name("renamed"))
        .await
        .must();
    let events = Events::subscribe(&store);
    let revoked = store.revoke_if_covered(&r.id, t, &wider).await.found();
    assert_eq!(revoked.revoked_at, Some(t), "revoke_if_covered must revoke");
    assert!(
        revoked.version > renamed.version,
        "revoke_if_covered must count as a management write"
    );
    assert!(
        events.heard(&r.id, r.hash),
        "revoke_if_covered must publish Changed for the hash"
    );
    let again = store
        .revoke_if_covered(&r.id, t + TimeDelta::hours(1), &other_scopes)
        .await
        .found();
    assert_eq!(
        again, revoked,
        "a revoked record must be returned as it is, whatever the scopes given"
    );
    assert!(
        matches!(
            store.delete_if_covered(&r.id, &other_scopes).await,
            Err(StoreError::Stale)
        ),
        "a revoked record must be deleted only under the condition"
    );

    let other = record("alice", "other");
    store.insert(&other).await.must();
    assert_eq!(
        store
            .delete_if_covered(&other.id, &other.scopes)
            .await
            .must(),
        Some(other.clone()),
        "delete_if_covered with the record's scopes must remove it"
    );
    assert!(
        events.heard(&other.id, other.hash),
        "delete_if_covered must publish Changed for the hash"
    );
    assert_eq!(store.get(&other.id).await.must(), None, "deleted");
}

/// An id, subject or search text with a NUL character (`%00` in a URL) matches no record, as any
/// other unknown value: `get` is `None`, `update` and `rotate` fail with
/// [`StoreError::NotFound`], `revoke`, `delete` and their conditional forms are `None` (or
/// `Unsupported`), `count_by_subject` is 0 and a listing is empty. Never a backend error (a
/// database may refuse the character in text, as PostgreSQL does), and nothing changes.
pub async fn texts_with_a_nul_match_nothing<S: TokenStore>(store: S) {
    let _check = Check("texts_with_a_nul_match_nothing");
    let t = now();
    let r = record("alice", "ci");
    store.insert(&r).await.must();
    let events = Events::subscribe(&store);
    for id in [
        "\0".to_owned(),
        format!("{}\0", r.id),
        format!("\0{}", r.id),
    ] {
        assert_eq!(
            store.get(&id).await.must(),
            None,
            "get of an id with a NUL must be None"
        );
        assert!(
            matches!(
                store.update(&id, &TokenPatch::new(t).name("renamed")).await,
                Err(StoreError::NotFound)
            ),
            "update of an id with a NUL must be NotFound"
        );
        let rotation = Rotation::new(r.hash, new_hash(), "pat_x", t);
        assert!(
            matches!(
                store.rotate(&id, &rotation).await,
                Err(StoreError::NotFound)
            ),
            "rotate of an id with a NUL must be NotFound"
        );
        assert_eq!(
            store.revoke(&id, t).await.must(),
            None,
            "revoke of an id with a NUL must be None"
        );
        assert_eq!(
            store.delete(&id).await.must(),
            None,
            "delete of an id with a NUL must be None"
        );
        assert!(
            matches!(
                store.revoke_if_covered(&id, t, &r.scopes).await,
                Ok(None) | Err(StoreError::Unsupported { .. })
            ),
            "revoke_if_covered of an id with a NUL must be None"
        );
        assert!(
            matches!(
                store.delete_if_covered(&id, &r.scopes).await,
                Ok(None) | Err(StoreError::Unsupported { .. })
            ),
            "delete_if_covered of an id with a NUL must be None"
        );
    }
    for subject in ["\0", "alice\0", "\0alice"] {
        assert_eq!(
            store.count_by_subject(subject).await.must(),
            0,
            "count_by_subject of a subject with a NUL must be 0"
        );
        let page = store
            .list(&ListQuery::default().subject(subject))
            .await
            .must();
        assert_eq!(
            (page.items.len(), page.total),
            (0, 0),
            "a listing of a subject with a NUL must be empty"
        );
    }
    for search in ["\0", "ci\0", "\0ci", "C\0"] {
        let page = store
            .list(&ListQuery::default().search(search))
            .await
            .must();
        assert_eq!(
            (page.items.len(), page.total),
            (0, 0),
            "a listing searching a text with a NUL must be empty"
        );
    }
    assert_eq!(
        store.get(&r.id).await.found(),
        r,
        "a write naming an id with a NUL must change nothing"
    );
    assert!(
        !events.heard(&r.id, r.hash),
        "a write naming an id with a NUL must announce nothing"
    );
}

/// `record_usage` follows [`TokenRecord::apply_usage`]: `last_used_at` never moves backwards,
/// late marks put their addresses after newer ones, retries change nothing, unknown ids are
/// ignored.
pub async fn usage_is_monotonic<S: TokenStore>(store: S) {
    let _check = Check("usage_is_monotonic");
    let t = now();
    let a = record("alice", "a");
    let b = record("alice", "b");
    store.insert(&a).await.must();
    store.insert(&b).await.must();
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
        store.record_usage(batch).await.must();
        for u in batch {
            if u.token_id == a.id {
                ref_a.apply_usage(u);
            } else if u.token_id == b.id {
                ref_b.apply_usage(u);
            }
        }
    }
    let got_a = store.get(&a.id).await.found();
    let got_b = store.get(&b.id).await.found();
    const RULE: &str = "record_usage must merge as TokenRecord::apply_usage does: last_used_at \
                        never moves backwards, addresses newest first";
    assert_eq!(got_a, ref_a, "{RULE}");
    assert_eq!(got_b, ref_b, "{RULE}");
    assert_eq!(got_a.last_used_at, Some(t), "{RULE}");
    assert_eq!(
        got_a.last_used_ips,
        vec![ip("10.0.0.2"), ip("10.0.0.1"), ip("10.0.0.9")],
        "{RULE}"
    );
    assert_eq!(
        got_b.last_used_at,
        Some(t + TimeDelta::seconds(1)),
        "{RULE}"
    );
    assert_eq!(got_b.last_used_ips, vec![ip("2001:db8::1")], "{RULE}");
    assert!(
        store.get("no-such-id").await.must().is_none(),
        "record_usage must ignore unknown ids, not create records"
    );
}

/// `last_used_ips` keeps the newest distinct addresses first, at most [`MAX_LAST_USED_IPS`]; a
/// repeated address moves to the front.
pub async fn usage_keeps_newest_addresses_capped<S: TokenStore>(store: S) {
    let _check = Check("usage_keeps_newest_addresses_capped");
    let t = now();
    let r = record("alice", "ci");
    store.insert(&r).await.must();
    let mut reference = r.clone();
    for i in 0..8u8 {
        let u = UsageUpdate::new(
            &r.id,
            t + TimeDelta::seconds(i64::from(i)),
            vec![IpAddr::from([10, 0, 0, i])],
        );
        store.record_usage(std::slice::from_ref(&u)).await.must();
        reference.apply_usage(&u);
    }
    // A repeat of an address already in the list moves it to the front.
    let u = UsageUpdate::new(&r.id, t + TimeDelta::seconds(20), vec![ip("10.0.0.5")]);
    store.record_usage(std::slice::from_ref(&u)).await.must();
    reference.apply_usage(&u);

    let got = store.get(&r.id).await.found();
    const RULE: &str = "last_used_ips must keep the newest distinct addresses first, at most \
                        MAX_LAST_USED_IPS, as TokenRecord::apply_usage does";
    assert_eq!(got, reference, "{RULE}");
    assert_eq!(got.last_used_ips.len(), MAX_LAST_USED_IPS, "{RULE}");
    assert_eq!(
        got.last_used_ips,
        vec![
            ip("10.0.0.5"),
            ip("10.0.0.7"),
            ip("10.0.0.6"),
            ip("10.0.0.4"),
            ip("10.0.0.3")
        ],
        "{RULE}"
    );
}

/// `list` agrees with [`ListQuery::matches`] and [`ListQuery::compare`] for every filter, sort
/// key, direction and page (ties broken by id; case-insensitive, Unicode-aware search), and
/// `total` counts every match.
pub async fn list_matches_the_reference<S: TokenStore>(store: S) {
    let _check = Check("list_matches_the_reference");
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
        let mut r = record(subject, name);
        // Ties on created_at between some records: the id breaks them.
        r.created_at = t - TimeDelta::minutes(i % 5);
        r.expires_at = (i % 3 != 0).then(|| t + TimeDelta::days(i % 4));
        store.insert(&r).await.must();
        if i % 2 == 0 {
            store
                .record_usage(&[UsageUpdate::new(&r.id, t - TimeDelta::hours(i % 3), vec![])])
                .await
                .must();
        }
        ids.push(r.id);
    }
    // One of each state: revoked, disabled, expired (the rest are active or expire later).
    store.revoke(&ids[1], t).await.found();
    let read = store.get(&ids[2]).await.found();
    store
        .update(
            &ids[2],
            &TokenPatch::new(t).if_version(read.version).disable(),
        )
        .await
        .must();
    let mut all = Vec::new();
    for id in &ids {
        all.push(store.get(id).await.found());
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
                    let q = ListQuery {
                        subject: subject.map(str::to_owned),
                        search: search.map(str::to_owned),
                        last_used,
                        sort,
                        descending,
                        offset,
                        limit,
                        ..ListQuery::default()
                    };
                    let page = store.list(&q).await.must();
                    let (items, total) = reference(&q);
                    assert_eq!(
                        page.total, total,
                        "list: total must count every record ListQuery::matches, for {q:?}"
                    );
                    assert_eq!(
                        page.items, items,
                        "list: the page must be the records ListQuery::matches, in \
                         ListQuery::compare order, offset then limit applied, for {q:?}"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 9 * 4 * 2 * 6);

    // The time and state filters, each alone and with a subject, at instants between stored
    // microseconds too.
    let half = TimeDelta::nanoseconds(500);
    let mut extra: Vec<ListQuery> = Vec::new();
    for subject in [None, Some("alice")] {
        let base = ListQuery {
            subject: subject.map(str::to_owned),
            ..ListQuery::default()
        };
        for at in [
            t - TimeDelta::minutes(2),
            t - TimeDelta::minutes(2) + half,
            t,
        ] {
            extra.push(base.clone().created_after(at));
            extra.push(base.clone().created_before(at));
        }
        for at in [t - TimeDelta::hours(2), t - TimeDelta::hours(1) + half, t] {
            extra.push(base.clone().last_used_after(at));
        }
        for state in [
            TokenState::Active,
            TokenState::Revoked,
            TokenState::Disabled,
            TokenState::Expired,
        ] {
            for at in [t, t + TimeDelta::days(2), t + TimeDelta::days(1) + half] {
                extra.push(base.clone().state(state, at));
            }
        }
    }
    for q in &extra {
        let page = store.list(q).await.must();
        let (items, total) = reference(q);
        assert_eq!(
            (page.items, page.total),
            (items, total),
            "list: the time and state filters must match ListQuery::matches, for {q:?}"
        );
    }
    let revoked = store
        .list(&ListQuery::default().state(TokenState::Revoked, t))
        .await
        .must();
    assert_eq!(
        revoked
            .items
            .iter()
            .map(|r| r.id.as_str())
            .collect::<Vec<_>>(),
        [ids[1].as_str()],
        "list: state=revoked finds exactly the revoked record"
    );
    let disabled = store
        .list(&ListQuery::default().state(TokenState::Disabled, t))
        .await
        .must();
    assert_eq!(
        disabled.total, 1,
        "list: state=disabled finds the disabled record"
    );

    // A few answers spelled out, so the reference cannot be wrong in the same way.
    let ci = store
        .list(&ListQuery {
            search: Some("CI".to_owned()),
            sort: SortKey::Name,
            ..ListQuery::default()
        })
        .await
        .must();
    let names: Vec<&str> = ci.items.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        ["CI runner", "ci", "ci-deploy"],
        "list: search is case-insensitive, sort by name is by the exact name"
    );
    let umlaut = store
        .list(&ListQuery {
            search: Some("ÄR".to_owned()),
            ..ListQuery::default()
        })
        .await
        .must();
    assert_eq!(
        umlaut.total, 1,
        "list: search is case-insensitive beyond ASCII"
    );
    assert_eq!(
        umlaut.items.first().map(|r| r.name.as_str()),
        Some("Ärger"),
        "list: search is case-insensitive beyond ASCII"
    );
    let bob = store.list(&ListQuery::for_subject("bob")).await.must();
    assert_eq!(bob.total, 2, "list: the subject filter");
}

/// The records `purge` removes, or `None` (after saying so on stderr) for a store that does not
/// support it.
async fn purged<S: TokenStore>(
    store: &S,
    cutoff: DateTime<Utc>,
    limit: usize,
) -> Option<Vec<TokenRecord>> {
    match store.purge(cutoff, limit).await {
        Ok(removed) => Some(removed),
        Err(StoreError::Unsupported { .. }) => {
            eprintln!("store conformance: purge is not supported by this store; skipped");
            None
        }
        Err(e) => panic!("store conformance: a store call that must succeed failed: {e}"),
    }
}

/// Sorted ids, to compare sets of records.
fn ids<'a>(records: impl IntoIterator<Item = &'a TokenRecord>) -> Vec<String> {
    let mut ids: Vec<String> = records.into_iter().map(|r| r.id.clone()).collect();
    ids.sort();
    ids
}

/// `purge(cutoff, limit)` removes and returns records revoked before `cutoff` and records expired
/// before it, announcing every hash they answered to (a grace hash too); it keeps a record revoked
/// after the cutoff, an active one however old, one that never expires, one that expires after
/// the cutoff (expired or not), and a disabled one that has not expired.
pub async fn purge_removes_only_old_revoked_and_expired<S: TokenStore>(store: S) {
    let _check = Check("purge_removes_only_old_revoked_and_expired");
    let t = now();
    let cutoff = t - TimeDelta::days(30);
    let long_ago = t - TimeDelta::days(400);

    let mut old_revoked = record("alice", "old-revoked");
    old_revoked.created_at = long_ago;
    old_revoked.revoked_at = Some(cutoff - TimeDelta::days(1));
    let old_expired = record("alice", "old-expired").expiring(cutoff - TimeDelta::seconds(1));
    let mut rotated = record("alice", "old-rotated").expiring(cutoff - TimeDelta::days(2));
    rotated.previous_hash = Some((new_hash(), t + TimeDelta::hours(1)));
    let mut recent_revoked = record("alice", "recent-revoked");
    recent_revoked.created_at = long_ago;
    recent_revoked.revoked_at = Some(t - TimeDelta::days(1));
    let mut active_old = record("alice", "active-old").expiring(t + TimeDelta::days(1));
    active_old.created_at = long_ago;
    active_old.updated_at = long_ago;
    let mut never_expires = record("alice", "never-expires");
    never_expires.created_at = long_ago;
    let recently_expired = record("alice", "recently-expired").expiring(t - TimeDelta::days(1));
    let at_cutoff = record("alice", "at-cutoff").expiring(cutoff);
    let mut disabled_old = record("alice", "disabled-old");
    disabled_old.created_at = long_ago;
    disabled_old.disabled_at = Some(long_ago);

    let gone = [&old_revoked, &old_expired, &rotated];
    let kept = [
        &recent_revoked,
        &active_old,
        &never_expires,
        &recently_expired,
        &at_cutoff,
        &disabled_old,
    ];
    for r in gone.iter().chain(&kept) {
        store.insert(r).await.must();
    }
    let events = Events::subscribe(&store);

    let Some(removed) = purged(&store, cutoff, 100).await else {
        return;
    };
    assert_eq!(
        ids(&removed),
        ids(gone),
        "purge must remove and return exactly the records revoked or expired before the cutoff"
    );
    assert!(
        removed.contains(&rotated),
        "purge must return the records as they were stored"
    );
    for r in gone {
        assert_eq!(
            store.get(&r.id).await.must(),
            None,
            "a purged record must be gone"
        );
        assert_eq!(
            store.find_by_hash(&r.hash).await.must(),
            None,
            "a purged record must not be found by hash"
        );
        assert!(
            events.heard(&r.id, r.hash),
            "purge must publish Changed for every removed record's hash"
        );
    }
    let (grace, _) = rotated.previous_hash.expect("a grace hash");
    assert!(
        events.heard(&rotated.id, grace),
        "purge must publish Changed for a removed record's grace hash too"
    );
    for r in kept {
        assert_eq!(
            store.get(&r.id).await.must().as_ref(),
            Some(r),
            "purge must keep (unchanged) a record not revoked or expired before the cutoff"
        );
    }
    assert_eq!(
        purged(&store, cutoff, 100).await.map(|r| r.len()),
        Some(0),
        "a second purge with the same cutoff must remove nothing"
    );
    assert_eq!(
        store.count_by_subject("alice").await.must(),
        kept.len() as u64,
        "purged records must not be counted"
    );
}

/// `purge` removes at most `limit` records per call (none for 0), and successive calls remove
/// the rest, each record once.
pub async fn purge_respects_the_limit<S: TokenStore>(store: S) {
    let _check = Check("purge_respects_the_limit");
    let t = now();
    let cutoff = t - TimeDelta::days(1);
    let mut all = Vec::new();
    for i in 0..7 {
        let r = record("alice", &format!("old-{i}")).expiring(cutoff - TimeDelta::hours(i + 1));
        store.insert(&r).await.must();
        all.push(r);
    }
    let Some(none) = purged(&store, cutoff, 0).await else {
        return;
    };
    assert!(
        none.is_empty(),
        "purge with a limit of 0 must remove nothing"
    );
    let mut removed = Vec::new();
    for expected in [3, 3, 1, 0] {
        let batch = purged(&store, cutoff, 3).await.unwrap_or_default();
        assert_eq!(
            batch.len(),
            expected,
            "purge must remove at most `limit` records, and all of them over successive calls"
        );
        removed.extend(batch);
    }
    assert_eq!(
        ids(&removed),
        ids(&all),
        "successive purges must remove every purgeable record exactly once"
    );
    assert_eq!(store.count_by_subject("alice").await.must(), 0);
}

/// `purge` judges each record as it is when it removes it: a record revoked after the cutoff
/// (even one that had expired long before and was extended) stays, and so does one whose
/// expiry was extended past the cutoff; revoking a record again never moves its revocation into
/// the purge window.
pub async fn purge_keeps_what_changed_after_the_cutoff<S: TokenStore>(store: S) {
    let _check = Check("purge_keeps_what_changed_after_the_cutoff");
    let t = now();
    let cutoff = t - TimeDelta::days(30);
    let long_ago = t - TimeDelta::days(90);

    // Expired long ago, then given a new expiry: active again.
    let extended = record("alice", "extended").expiring(long_ago);
    store.insert(&extended).await.must();
    store
        .update(
            &extended.id,
            &TokenPatch::new(t).expires_at(Some(t + TimeDelta::days(10))),
        )
        .await
        .must();

    // Revoked just after the cutoff, then revoked again with an old time: the first time stays.
    let revoked_late = record("alice", "revoked-late");
    store.insert(&revoked_late).await.must();
    store
        .revoke(&revoked_late.id, cutoff + TimeDelta::seconds(1))
        .await
        .must();
    store.revoke(&revoked_late.id, long_ago).await.must();

    // Revoked exactly at the cutoff: not before it.
    let revoked_at_cutoff = record("alice", "revoked-at-cutoff");
    store.insert(&revoked_at_cutoff).await.must();
    store.revoke(&revoked_at_cutoff.id, cutoff).await.must();

    let Some(removed) = purged(&store, cutoff, 100).await else {
        return;
    };
    assert!(
        removed.is_empty(),
        "purge must keep a record extended past the cutoff and one revoked at or after it, \
         removed {:?}",
        ids(&removed)
    );
    for r in [&extended, &revoked_late, &revoked_at_cutoff] {
        assert!(
            store.get(&r.id).await.must().is_some(),
            "purge must keep a record that changed after the cutoff"
        );
    }
    // A minute later the late revocation falls in the window.
    let removed = purged(&store, cutoff + TimeDelta::minutes(1), 100)
        .await
        .unwrap_or_default();
    assert_eq!(
        ids(&removed),
        ids([&revoked_late, &revoked_at_cutoff]),
        "purge must remove records revoked before a later cutoff"
    );
}

/// A lead too long to add to `at` (a configuration of `Duration::MAX`) reaches the latest time
/// a lifetime can reach (9999-12-31T23:59:59Z, the latest expiry the management API writes): the
/// claim succeeds, where a store that
/// refuses times that far away would fail every notice run, and it claims every token not
/// revoked that expires after `at`, the one expiring at that latest time included.
pub async fn expiry_notices_with_a_lead_too_long_to_add<S: TokenStore>(store: S) {
    let _check = Check("expiry_notices_with_a_lead_too_long_to_add");
    let t = now();
    let soon = record("alice", "soon").expiring(t + TimeDelta::days(1));
    let far = record("alice", "far").expiring(t + TimeDelta::days(365 * 1000));
    let last = record("alice", "last").expiring(crate::record::latest());
    let never = record("alice", "never");
    for r in [&soon, &far, &last, &never] {
        store.insert(r).await.must();
    }
    let Some(expiring) = claimed_within(
        &store,
        NoticeKind::Expiring,
        t,
        std::time::Duration::MAX,
        100,
    )
    .await
    else {
        return;
    };
    assert_eq!(
        ids(&expiring),
        ids([&soon, &far, &last]),
        "claim_expiry_notices(Expiring) with a lead too long to add must claim every token \
         expiring after `at`"
    );
}

/// The lead of the expiry-notice checks: 7 days.
const LEAD: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// `release_expiry_notice` takes back the claim made at its time, and only that one: the notice
/// is claimed again by the next claim. A release with another time, of the other notice, or a
/// second release takes back nothing, and none changes the version. (A store answering
/// `Unsupported` passes: the notice task then loses such a notice, as before the method existed.)
pub async fn expiry_notice_claims_are_taken_back<S: TokenStore>(store: S) {
    let _check = Check("expiry_notice_claims_are_taken_back");
    let t = now();
    let first = record("alice", "first").expiring(t + TimeDelta::days(1));
    let second = record("alice", "second").expiring(t + TimeDelta::days(2));
    for r in [&first, &second] {
        store.insert(r).await.must();
    }
    let Some(batch) = claimed(&store, NoticeKind::Expiring, t, 100).await else {
        return;
    };
    assert_eq!(ids(&batch), ids([&first, &second]));
    let later = t + TimeDelta::microseconds(1);
    match store
        .release_expiry_notice(NoticeKind::Expiring, &first.id, later)
        .await
    {
        Ok(released) => assert!(
            !released,
            "release_expiry_notice must take back only the claim made at its time"
        ),
        Err(StoreError::Unsupported { .. }) => {
            eprintln!(
                "store conformance: release_expiry_notice is not supported by this store; skipped"
            );
            return;
        }
        Err(e) => panic!("store conformance: a store call that must succeed failed: {e}"),
    }
    assert!(
        store
            .release_expiry_notice(NoticeKind::Expiring, &first.id, t)
            .await
            .must(),
        "release_expiry_notice must take back the claim made at its time"
    );
    assert!(
        !store
            .release_expiry_notice(NoticeKind::Expiring, &first.id, t)
            .await
            .must(),
        "a second release must take back nothing"
    );
    assert!(
        !store
            .release_expiry_notice(NoticeKind::Expired, &second.id, t)
            .await
            .must(),
        "a release of a notice not claimed must take back nothing"
    );
    let again = claimed(&store, NoticeKind::Expiring, t, 100)
        .await
        .unwrap_or_default();
    assert_eq!(
        ids(&again),
        ids([&first]),
        "a notice whose claim was taken back must be claimed again, and only it"
    );
    let stored = store.get(&first.id).await.must().map(|r| r.version);
    assert_eq!(
        stored,
        Some(first.version),
        "a release must not change the version"
    );
}

/// The records `claim_expiry_notices` claims, or `None` (after saying so on stderr) for a store
/// that does not support it.
async fn claimed<S: TokenStore>(
    store: &S,
    kind: NoticeKind,
    at: DateTime<Utc>,
    limit: usize,
) -> Option<Vec<TokenRecord>> {
    claimed_within(store, kind, at, LEAD, limit).await
}

/// [`claimed`] with a lead of its own.
async fn claimed_within<S: TokenStore>(
    store: &S,
    kind: NoticeKind,
    at: DateTime<Utc>,
    lead: std::time::Duration,
    limit: usize,
) -> Option<Vec<TokenRecord>> {
    match store.claim_expiry_notices(kind, at, lead, limit).await {
        Ok(claimed) => Some(claimed),
        Err(StoreError::Unsupported { .. }) => {
            eprintln!(
                "store conformance: claim_expiry_notices is not supported by this store; skipped"
            );
            None
        }
        Err(e) => panic!("store conformance: a store call that must succeed failed: {e}"),
    }
}

/// `claim_expiry_notices` claims exactly the tokens due the notice ([`NoticeKind::is_due`]): for
/// `Expiring`, those not revoked expiring after `at` and within the lead (a disabled one too);
/// for `Expired`, those not revoked expired at `at`. A second claim returns none of them, and a
/// claim changes neither the version nor `updated_at`.
pub async fn expiry_notices_are_claimed_once<S: TokenStore>(store: S) {
    let _check = Check("expiry_notices_are_claimed_once");
    let t = now();
    let soon = record("alice", "soon").expiring(t + TimeDelta::days(1));
    let at_lead = record("alice", "at-lead").expiring(t + TimeDelta::days(7));
    let later = record("alice", "later").expiring(t + TimeDelta::days(7) + TimeDelta::seconds(1));
    let never = record("alice", "never");
    let expired = record("alice", "expired").expiring(t - TimeDelta::hours(1));
    let at_now = record("alice", "at-now").expiring(t);
    let revoked_soon = record("alice", "revoked-soon").expiring(t + TimeDelta::days(1));
    let revoked_expired = record("alice", "revoked-expired").expiring(t - TimeDelta::days(1));
    let mut disabled_soon = record("alice", "disabled-soon").expiring(t + TimeDelta::days(2));
    disabled_soon.disabled_at = Some(t - TimeDelta::days(1));
    for r in [
        &soon,
        &at_lead,
        &later,
        &never,
        &expired,
        &at_now,
        &revoked_soon,
        &revoked_expired,
        &disabled_soon,
    ] {
        store.insert(r).await.must();
    }
    store.revoke(&revoked_soon.id, t).await.must();
    store.revoke(&revoked_expired.id, t).await.must();

    let Some(expiring) = claimed(&store, NoticeKind::Expiring, t, 100).await else {
        return;
    };
    assert_eq!(
        ids(&expiring),
        ids([&soon, &at_lead, &disabled_soon]),
        "claim_expiry_notices(Expiring) must claim the tokens not revoked expiring after `at` \
         and at most `lead` after it"
    );
    let claimed_soon = expiring.iter().find(|r| r.id == soon.id);
    assert_eq!(
        claimed_soon.map(|r| (r.version, r.updated_at, r.expires_at)),
        Some((soon.version, soon.updated_at, soon.expires_at)),
        "a claim must return the record as stored, and change neither version nor updated_at"
    );
    assert_eq!(
        claimed(&store, NoticeKind::Expiring, t, 100)
            .await
            .map(|r| r.len()),
        Some(0),
        "a second claim must return nothing: each notice is claimed once"
    );
    let expired_now = claimed(&store, NoticeKind::Expired, t, 100)
        .await
        .unwrap_or_default();
    assert_eq!(
        ids(&expired_now),
        ids([&expired, &at_now]),
        "claim_expiry_notices(Expired) must claim the tokens not revoked with expires_at <= at"
    );
    assert_eq!(
        claimed(&store, NoticeKind::Expired, t, 100)
            .await
            .map(|r| r.len()),
        Some(0),
        "a second claim must return nothing: each notice is claimed once"
    );
    // Later, `soon` has expired and `later` is within the lead: each is claimed once more, for
    // the notice it was not yet sent.
    let t2 = t + TimeDelta::days(1);
    let expiring2 = claimed(&store, NoticeKind::Expiring, t2, 100)
        .await
        .unwrap_or_default();
    assert_eq!(
        ids(&expiring2),
        ids([&later]),
        "a later claim must claim only the tokens newly due"
    );
    let expired2 = claimed(&store, NoticeKind::Expired, t2, 100)
        .await
        .unwrap_or_default();
    assert_eq!(
        ids(&expired2),
        ids([&soon]),
        "a token noticed as expiring must still be claimed once it has expired"
    );
    let stored = store.get(&soon.id).await.must().map(|r| r.version);
    assert_eq!(
        stored,
        Some(soon.version),
        "a claim must not change the version"
    );
}

/// `claim_expiry_notices` claims at most `limit` tokens per call (none for 0), and successive
/// calls claim every due token exactly once.
pub async fn expiry_notices_respect_the_limit<S: TokenStore>(store: S) {
    let _check = Check("expiry_notices_respect_the_limit");
    let t = now();
    let mut all = Vec::new();
    for i in 0..5 {
        let r = record("alice", &format!("soon-{i}")).expiring(t + TimeDelta::hours(i + 1));
        store.insert(&r).await.must();
        all.push(r);
    }
    let Some(none) = claimed(&store, NoticeKind::Expiring, t, 0).await else {
        return;
    };
    assert!(
        none.is_empty(),
        "a claim with a limit of 0 must claim nothing"
    );
    let mut got = Vec::new();
    for expected in [2, 2, 1, 0] {
        let batch = claimed(&store, NoticeKind::Expiring, t, 2)
            .await
            .unwrap_or_default();
        assert_eq!(
            batch.len(),
            expected,
            "a claim must claim at most `limit` tokens, and all of them over successive calls"
        );
        got.extend(batch);
    }
    assert_eq!(
        ids(&got),
        ids(&all),
        "successive claims must claim every due token exactly once"
    );
}

/// An `update` or `rotate` that moves the expiry later clears the claims, so the token is
/// noticed again as its new expiry comes near; one that leaves the expiry as it was (another
/// field, or the same expiry) or moves it earlier clears nothing ([`expiry_extended`]).
///
/// [`expiry_extended`]: super::expiry_extended
pub async fn expiry_notices_return_when_the_expiry_changes<S: TokenStore>(store: S) {
    let _check = Check("expiry_notices_return_when_the_expiry_changes");
    let t = now();
    let soon = record("alice", "soon").expiring(t + TimeDelta::days(1));
    store.insert(&soon).await.must();
    let Some(first) = claimed(&store, NoticeKind::Expiring, t, 10).await else {
        return;
    };
    assert_eq!(ids(&first), ids([&soon]));

    // Renamed, and given the expiry it has: no new notice.
    store
        .update(
            &soon.id,
            &TokenPatch::new(t)
                .name("renamed")
                .expires_at(soon.expires_at),
        )
        .await
        .must();
    assert_eq!(
        claimed(&store, NoticeKind::Expiring, t, 10)
            .await
            .map(|r| r.len()),
        Some(0),
        "an update that keeps the expiry must not clear the notice"
    );

    // Shortened: not noticed again (else a token could re-arm its own alert at will).
    store
        .update(
            &soon.id,
            &TokenPatch::new(t).expires_at(Some(t + TimeDelta::hours(20))),
        )
        .await
        .must();
    assert_eq!(
        claimed(&store, NoticeKind::Expiring, t, 10)
            .await
            .map(|r| r.len()),
        Some(0),
        "an update that moves the expiry earlier must not clear the notice"
    );

    // Extended, but still within the lead: noticed again.
    let updated = store
        .update(
            &soon.id,
            &TokenPatch::new(t).expires_at(Some(t + TimeDelta::days(3))),
        )
        .await
        .must();
    let again = claimed(&store, NoticeKind::Expiring, t, 10)
        .await
        .unwrap_or_default();
    assert_eq!(
        ids(&again),
        ids([&soon]),
        "an update that moves the expiry later must clear the notice"
    );

    // Rotated with a new expiry: noticed again; rotated keeping it: not.
    let rotated = store
        .rotate(
            &soon.id,
            &Rotation::new(updated.hash, new_hash(), "pat_new".to_owned(), t)
                .expires_at(Some(t + TimeDelta::days(4))),
        )
        .await
        .must();
    let again = claimed(&store, NoticeKind::Expiring, t, 10)
        .await
        .unwrap_or_default();
    assert_eq!(
        ids(&again),
        ids([&soon]),
        "a rotation that moves the expiry later must clear the notice"
    );
    store
        .rotate(
            &soon.id,
            &Rotation::new(rotated.hash, new_hash(), "pat_new2".to_owned(), t),
        )
        .await
        .must();
    assert_eq!(
        claimed(&store, NoticeKind::Expiring, t, 10)
            .await
            .map(|r| r.len()),
        Some(0),
        "a rotation that keeps the expiry must not clear the notice"
    );

    // Expired and noticed, then extended: both notices come again in their time.
    let t2 = t + TimeDelta::days(5);
    let expired = claimed(&store, NoticeKind::Expired, t2, 10)
        .await
        .unwrap_or_default();
    assert_eq!(ids(&expired), ids([&soon]));
    store
        .update(
            &soon.id,
            &TokenPatch::new(t2).expires_at(Some(t2 + TimeDelta::days(1))),
        )
        .await
        .must();
    assert_eq!(
        claimed(&store, NoticeKind::Expired, t2, 10)
            .await
            .map(|r| r.len()),
        Some(0),
        "an extended token has not expired"
    );
    let again = claimed(&store, NoticeKind::Expiring, t2, 10)
        .await
        .unwrap_or_default();
    assert_eq!(
        ids(&again),
        ids([&soon]),
        "an extended token is noticed again"
    );
    let t3 = t2 + TimeDelta::days(2);
    let expired = claimed(&store, NoticeKind::Expired, t3, 10)
        .await
        .unwrap_or_default();
    assert_eq!(
        ids(&expired),
        ids([&soon]),
        "an extended token's expiry is noticed again"
    );
}

/// Says on stderr that the store under test keeps no superseded history (the trait's default
/// [`find_superseded`](crate::TokenLookup::find_superseded), which never detects reuse), so that
/// the history checks pass it, as the other optional operations' checks pass `Unsupported`.
/// Returns `true`, for use in a condition.
fn keeps_no_history() -> bool {
    eprintln!(
        "store conformance: this store keeps no superseded history (find_superseded is the \
         trait's default, so reuse is never detected); the history checks are skipped"
    );
    true
}

/// [`find_superseded`](crate::TokenLookup::find_superseded): a rotation records the hash it
/// replaces (stopping at the rotation, or at the end of its grace period), a later rotation cuts
/// an earlier grace hash's time short, the record found is the token as it is now, and a hash
/// never superseded (current, unknown) is not found. A store that keeps no history (the trait's
/// default) passes this check and the next with a line on stderr: it never detects reuse.
pub async fn superseded_secrets_are_remembered<S: TokenStore>(store: S) {
    let _check = Check("superseded_secrets_are_remembered");
    let t = now();
    let r = record("alice", "ci");
    store.insert(&r).await.must();
    assert_eq!(
        store.find_superseded(&r.hash).await.must(),
        None,
        "a current hash is not superseded"
    );
    let first = new_hash();
    let rotated = store
        .rotate(&r.id, &Rotation::new(r.hash, first, "pat_first", t))
        .await
        .must();
    let found = store.find_superseded(&r.hash).await.must();
    if found.is_none() && keeps_no_history() {
        return;
    }
    assert_eq!(
        found.as_ref().map(|s| (&s.record, s.superseded_at)),
        Some((&rotated, t)),
        "a hash replaced without grace is superseded at the rotation, with the record as it is now"
    );
    assert_eq!(
        store.find_superseded(&first).await.must(),
        None,
        "the new hash is not superseded"
    );
    assert_eq!(
        store.find_superseded(&new_hash()).await.must(),
        None,
        "an unknown hash is not superseded"
    );

    // With a grace period: superseded when the grace period ends...
    let t2 = t + chrono::Duration::seconds(1);
    let until = t2 + chrono::Duration::hours(1);
    let second = new_hash();
    store
        .rotate(
            &r.id,
            &Rotation::new(first, second, "pat_second", t2).grace_until(Some(until)),
        )
        .await
        .must();
    let at = |s: Option<crate::store::SupersededSecret>| s.map(|s| s.superseded_at);
    assert_eq!(
        at(store.find_superseded(&first).await.must()),
        Some(until),
        "a hash replaced with a grace period is superseded when the grace period ends"
    );
    // ...unless another rotation ends the grace period first.
    let t3 = t2 + chrono::Duration::seconds(1);
    let third = new_hash();
    let latest = store
        .rotate(&r.id, &Rotation::new(second, third, "pat_third", t3))
        .await
        .must();
    assert_eq!(
        at(store.find_superseded(&first).await.must()),
        Some(t3),
        "a later rotation cuts an earlier grace hash short"
    );
    let found = store.find_superseded(&second).await.must();
    assert_eq!(
        found.as_ref().map(|s| &s.record),
        Some(&latest),
        "every superseded hash leads to the record as it is now"
    );
    assert_eq!(
        at(store.find_superseded(&r.hash).await.must()),
        Some(t),
        "older entries keep their time"
    );
}

/// The history keeps the newest [`SupersededHistory::default`] `max_per_token` (10) entries per
/// token, and deleting or purging the token removes them.
///
/// [`SupersededHistory::default`]: crate::store::SupersededHistory::default
pub async fn superseded_history_is_bounded_and_forgotten<S: TokenStore>(store: S) {
    let _check = Check("superseded_history_is_bounded_and_forgotten");
    let keep = crate::store::SupersededHistory::default().max_per_token as usize;
    let t = now();
    let r = record("alice", "ci");
    let other = record("bob", "ci");
    store.insert(&r).await.must();
    store.insert(&other).await.must();
    let mut hashes = vec![r.hash];
    for i in 0..keep + 2 {
        let next = new_hash();
        let at = t + chrono::Duration::seconds(i64::try_from(i).unwrap_or(0));
        let last = *hashes.last().unwrap_or(&r.hash);
        store
            .rotate(&r.id, &Rotation::new(last, next, "pat_next", at))
            .await
            .must();
        hashes.push(next);
    }
    if store.find_superseded(&hashes[keep]).await.must().is_none() && keeps_no_history() {
        return;
    }
    // A secret superseded longer ago than the retention (30 days) is not reported, and the next
    // rotation (of any token) prunes it.
    let ancient = record("carol", "ci");
    store.insert(&ancient).await.must();
    let long_ago = t - chrono::Duration::days(40);
    store
        .rotate(
            &ancient.id,
            &Rotation::new(ancient.hash, new_hash(), "pat_a", long_ago),
        )
        .await
        .must();
    assert_eq!(
        store.find_superseded(&ancient.hash).await.must(),
        None,
        "a secret superseded beyond the retention is forgotten"
    );
    let other_new = new_hash();
    store
        .rotate(&other.id, &Rotation::new(other.hash, other_new, "pat_o", t))
        .await
        .must();
    // hashes[0..keep + 2] were superseded, the last one is current.
    let superseded = &hashes[..hashes.len() - 1];
    let mut found = Vec::new();
    for h in superseded {
        found.push(store.find_superseded(h).await.must().is_some());
    }
    let expected: Vec<bool> = (0..superseded.len())
        .map(|i| i >= superseded.len() - keep)
        .collect();
    assert_eq!(
        found, expected,
        "only the newest {keep} superseded hashes of a token are kept"
    );
    store.delete(&r.id).await.must();
    for h in superseded {
        assert_eq!(
            store.find_superseded(h).await.must(),
            None,
            "deleting a token removes its history"
        );
    }
    assert!(
        store.find_superseded(&other.hash).await.must().is_some(),
        "another token's history is kept"
    );
    // Purging a token removes its history too.
    store.revoke(&other.id, t).await.must();
    let purged = store
        .purge(t + chrono::Duration::seconds(1), 10)
        .await
        .must();
    assert_eq!(purged.len(), 1, "the revoked token is purged");
    assert_eq!(
        store.find_superseded(&other.hash).await.must(),
        None,
        "purging a token removes its history"
    );
}
