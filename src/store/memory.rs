use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::write::{CallerGuard, check_writable};
use super::{
    ChangeHub, ChangeListener, HistorySetting, ListQuery, NoticeKind, Page, Rotation, StoreError,
    SupersededHistory, SupersededSecret, TokenLookup, TokenPatch, TokenStore, superseded_by,
};
use crate::record::TokenRecord;
use crate::record::UsageUpdate;
use crate::scope::ScopeSet;
use crate::token::TokenHash;

/// A store in process memory: for tests, examples and ephemeral setups. Nothing survives a restart.
///
/// Cloning gives another handle to the same records.
#[derive(Clone, Default, Debug)]
pub struct MemoryStore {
    inner: Arc<Shared>,
}

#[derive(Default, Debug)]
struct Shared {
    data: RwLock<Data>,
    hub: ChangeHub,
    history: HistorySetting,
}

#[derive(Default, Debug)]
struct Data {
    by_id: HashMap<String, TokenRecord>,
    by_hash: HashMap<TokenHash, String>,
    /// The expiry notices claimed, by record id: cleared when the expiry moves later.
    notices: HashMap<String, Notices>,
    /// Superseded secrets: the token id and when each stopped working.
    superseded: HashMap<TokenHash, (String, DateTime<Utc>)>,
}

/// When each expiry notice of a record was claimed.
#[derive(Default, Debug)]
struct Notices {
    expiring: Option<DateTime<Utc>>,
    expired: Option<DateTime<Utc>>,
}

impl Notices {
    fn slot(&mut self, kind: NoticeKind) -> &mut Option<DateTime<Utc>> {
        match kind {
            NoticeKind::Expiring => &mut self.expiring,
            NoticeKind::Expired => &mut self.expired,
        }
    }
}

impl Data {
    /// Whether a record other than `id` of `subject` is named `name`.
    fn name_taken(&self, subject: &str, name: &str, id: &str) -> bool {
        self.by_id
            .values()
            .any(|r| r.subject == subject && r.name == name && r.id != id)
    }

    fn index(&mut self, record: &TokenRecord) {
        self.by_hash.insert(record.hash, record.id.clone());
        if let Some((h, _)) = record.previous_hash {
            self.by_hash.insert(h, record.id.clone());
        }
    }

    /// Stores `new` in place of `old`, clearing the expiry-notice claims if the expiry changed.
    fn replace(&mut self, old: &TokenRecord, new: &TokenRecord) {
        if super::expiry_extended(old.expires_at, new.expires_at) {
            self.notices.remove(&new.id);
        }
        self.by_id.insert(new.id.clone(), new.clone());
    }

    /// Records the hashes a rotation of `old` replaced, then keeps only the token's newest
    /// `history.max_per_token` entries within `history.retention`.
    fn supersede(&mut self, old: &TokenRecord, rotation: &Rotation, history: SupersededHistory) {
        for (hash, at) in superseded_by(old, rotation) {
            let entry = self
                .superseded
                .entry(hash)
                .or_insert_with(|| (old.id.clone(), at));
            entry.1 = entry.1.min(at);
        }
        let cutoff = history.cutoff(rotation.at);
        let mut mine: Vec<(TokenHash, DateTime<Utc>)> = self
            .superseded
            .iter()
            .filter(|(_, (id, _))| *id == old.id)
            .map(|(h, (_, at))| (*h, *at))
            .collect();
        mine.sort_by_key(|e| std::cmp::Reverse(e.1));
        let keep = usize::try_from(history.max_per_token).unwrap_or(usize::MAX);
        for (i, (hash, at)) in mine.into_iter().enumerate() {
            if i >= keep || at < cutoff {
                self.superseded.remove(&hash);
            }
        }
    }

    fn unindex(&mut self, record: &TokenRecord) {
        self.by_hash.remove(&record.hash);
        if let Some((h, _)) = record.previous_hash {
            self.by_hash.remove(&h);
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps `history` of superseded secrets from now on (default [`SupersededHistory::default`]):
    /// for every handle to this store.
    #[must_use]
    pub fn superseded_history(self, history: SupersededHistory) -> Self {
        self.inner.history.set(history);
        self
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Data> {
        self.inner.data.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Data> {
        self.inner.data.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Inserts `record` (if its subject has fewer than `max` records, when given) under the
    /// write lock; whether it did.
    fn insert_where(
        &self,
        record: &TokenRecord,
        max: Option<u64>,
        caller: Option<&CallerGuard>,
    ) -> Result<bool, StoreError> {
        let mut data = self.write();
        if let Some(guard) = caller {
            guard.check(data.by_id.get(&guard.id))?;
        }
        if data.by_id.contains_key(&record.id) {
            return Err(StoreError::Conflict { field: "id" });
        }
        if data.by_hash.contains_key(&record.hash) {
            return Err(StoreError::Conflict { field: "hash" });
        }
        if data.name_taken(&record.subject, &record.name, &record.id) {
            return Err(StoreError::Conflict { field: "name" });
        }
        if let Some(max) = max {
            let held = data
                .by_id
                .values()
                .filter(|r| r.subject == record.subject)
                .count() as u64;
            if held >= max {
                return Ok(false);
            }
        }
        data.index(record);
        data.by_id.insert(record.id.clone(), record.clone());
        Ok(true)
    }

    /// Revokes `id` (if `covering`, when given, grants every scope it holds, and the caller,
    /// when given, is still the version named) under the write lock.
    fn revoke_where(
        &self,
        id: &str,
        at: DateTime<Utc>,
        covering: Option<&ScopeSet>,
        caller: Option<&CallerGuard>,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let revoked = {
            let mut data = self.write();
            if let Some(guard) = caller {
                guard.check(data.by_id.get(&guard.id))?;
            }
            let Some(r) = data.by_id.get_mut(id) else {
                return Ok(None);
            };
            if r.revoked_at.is_none() {
                if covering.is_some_and(|c| !c.grants_all(&r.scopes)) {
                    return Err(StoreError::Stale);
                }
                r.revoked_at = Some(at);
                r.updated_at = at;
                // A revocation never fails, not even on an exhausted counter.
                r.version = r.version.saturating_add(1);
            }
            r.clone()
        };
        self.inner.hub.announce(&revoked);
        Ok(Some(revoked))
    }

    /// Removes `id` (if `covering`, when given, grants every scope it holds, and the caller,
    /// when given, is still the version named) under the write lock.
    fn delete_where(
        &self,
        id: &str,
        covering: Option<&ScopeSet>,
        caller: Option<&CallerGuard>,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let removed = {
            let mut data = self.write();
            if let Some(guard) = caller {
                guard.check(data.by_id.get(&guard.id))?;
            }
            let uncovered = |r: &TokenRecord| covering.is_some_and(|c| !c.grants_all(&r.scopes));
            if data.by_id.get(id).is_some_and(uncovered) {
                return Err(StoreError::Stale);
            }
            let removed = data.by_id.remove(id);
            if let Some(r) = &removed {
                data.unindex(r);
                data.notices.remove(id);
                data.superseded.retain(|_, (owner, _)| owner != id);
            }
            removed
        };
        if let Some(r) = &removed {
            self.inner.hub.announce(r);
        }
        Ok(removed)
    }
}

#[async_trait]
impl TokenLookup for MemoryStore {
    async fn find_by_hash(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
        let data = self.read();
        let now = Utc::now();
        Ok(data
            .by_hash
            .get(hash)
            .and_then(|id| data.by_id.get(id))
            .filter(|r| r.matches_hash(hash, now))
            .cloned())
    }

    async fn record_usage(&self, updates: &[UsageUpdate]) -> Result<(), StoreError> {
        let mut data = self.write();
        for u in updates {
            if let Some(r) = data.by_id.get_mut(&u.token_id) {
                r.apply_usage(u);
            }
        }
        Ok(())
    }

    fn subscribe(&self, listener: Weak<dyn ChangeListener>) -> bool {
        self.inner.hub.subscribe(listener);
        true
    }

    async fn find_superseded(
        &self,
        hash: &TokenHash,
    ) -> Result<Option<SupersededSecret>, StoreError> {
        let cutoff = self.inner.history.get().cutoff(Utc::now());
        let data = self.read();
        Ok(data
            .superseded
            .get(hash)
            .filter(|(_, at)| *at >= cutoff)
            .and_then(|(id, at)| {
                let record = data.by_id.get(id)?;
                Some(SupersededSecret::new(record.clone(), *at))
            }))
    }
}

#[async_trait]
impl TokenStore for MemoryStore {
    async fn insert(&self, record: &TokenRecord) -> Result<(), StoreError> {
        self.insert_where(record, None, None).map(|_| ())
    }

    async fn insert_below(&self, record: &TokenRecord, max: u64) -> Result<bool, StoreError> {
        self.insert_where(record, Some(max), None)
    }

    async fn insert_below_guarded(
        &self,
        record: &TokenRecord,
        max: u64,
        caller: &CallerGuard,
    ) -> Result<bool, StoreError> {
        self.insert_where(record, Some(max), Some(caller))
    }

    fn checks_caller_guard(&self) -> bool {
        true
    }

    async fn get(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        Ok(self.read().by_id.get(id).cloned())
    }

    async fn list(&self, query: &ListQuery) -> Result<Page, StoreError> {
        let data = self.read();
        let mut items: Vec<&TokenRecord> =
            data.by_id.values().filter(|r| query.matches(r)).collect();
        items.sort_by(|a, b| query.compare(a, b));
        let total = items.len() as u64;
        let items = items
            .into_iter()
            .skip(usize::try_from(query.offset).unwrap_or(usize::MAX))
            .take(usize::try_from(query.limit).unwrap_or(usize::MAX))
            .cloned()
            .collect();
        Ok(Page { items, total })
    }

    async fn update(&self, id: &str, patch: &TokenPatch) -> Result<TokenRecord, StoreError> {
        let (old, new) = {
            let mut data = self.write();
            if let Some(guard) = &patch.if_caller {
                guard.check(data.by_id.get(&guard.id))?;
            }
            let old = check_writable(
                data.by_id.get(id),
                patch.if_version,
                None,
                patch.if_unexpired,
            )?
            .clone();
            if patch.is_empty() {
                return Ok(old);
            }
            if let Some(name) = &patch.name
                && data.name_taken(&old.subject, name, id)
            {
                return Err(StoreError::Conflict { field: "name" });
            }
            let mut new = old.clone();
            patch.apply(&mut new)?;
            data.replace(&old, &new);
            (old, new)
        };
        self.inner.hub.announce(&old);
        Ok(new)
    }

    async fn rotate(&self, id: &str, rotation: &Rotation) -> Result<TokenRecord, StoreError> {
        let (old, new) = {
            let mut data = self.write();
            if let Some(guard) = &rotation.if_caller {
                guard.check(data.by_id.get(&guard.id))?;
            }
            let old = check_writable(
                data.by_id.get(id),
                rotation.if_version,
                Some(&rotation.old_hash),
                rotation.if_unexpired,
            )?
            .clone();
            if data
                .by_hash
                .get(&rotation.new_hash)
                .is_some_and(|owner| owner != id)
            {
                return Err(StoreError::Conflict { field: "hash" });
            }
            let mut new = old.clone();
            rotation.apply(&mut new)?;
            data.supersede(&old, rotation, self.inner.history.get());
            data.unindex(&old);
            data.index(&new);
            data.replace(&old, &new);
            (old, new)
        };
        self.inner.hub.announce(&old);
        Ok(new)
    }

    async fn revoke(&self, id: &str, at: DateTime<Utc>) -> Result<Option<TokenRecord>, StoreError> {
        self.revoke_where(id, at, None, None)
    }

    async fn delete(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.delete_where(id, None, None)
    }

    async fn revoke_if_covered(
        &self,
        id: &str,
        at: DateTime<Utc>,
        covering: &ScopeSet,
    ) -> Result<Option<TokenRecord>, StoreError> {
        self.revoke_where(id, at, Some(covering), None)
    }

    async fn revoke_if_covered_guarded(
        &self,
        id: &str,
        at: DateTime<Utc>,
        covering: &ScopeSet,
        caller: &CallerGuard,
    ) -> Result<Option<TokenRecord>, StoreError> {
        self.revoke_where(id, at, Some(covering), Some(caller))
    }

    async fn delete_if_covered(
        &self,
        id: &str,
        covering: &ScopeSet,
    ) -> Result<Option<TokenRecord>, StoreError> {
        self.delete_where(id, Some(covering), None)
    }

    async fn delete_if_covered_guarded(
        &self,
        id: &str,
        covering: &ScopeSet,
        caller: &CallerGuard,
    ) -> Result<Option<TokenRecord>, StoreError> {
        self.delete_where(id, Some(covering), Some(caller))
    }

    async fn count_by_subject(&self, subject: &str) -> Result<u64, StoreError> {
        Ok(self
            .read()
            .by_id
            .values()
            .filter(|r| r.subject == subject)
            .count() as u64)
    }

    async fn purge(
        &self,
        cutoff: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<TokenRecord>, StoreError> {
        let removed: Vec<TokenRecord> = {
            let mut data = self.write();
            let ids: Vec<String> = data
                .by_id
                .values()
                .filter(|r| r.is_purgeable(cutoff))
                .take(limit)
                .map(|r| r.id.clone())
                .collect();
            let removed: Vec<TokenRecord> = ids
                .iter()
                .filter_map(|id| {
                    let r = data.by_id.remove(id)?;
                    data.unindex(&r);
                    data.notices.remove(id);
                    Some(r)
                })
                .collect();
            // One pass over the superseded secrets for the whole batch, not one per record.
            if !removed.is_empty() {
                let gone: std::collections::HashSet<&str> =
                    removed.iter().map(|r| r.id.as_str()).collect();
                data.superseded
                    .retain(|_, (owner, _)| !gone.contains(owner.as_str()));
            }
            removed
        };
        for r in &removed {
            self.inner.hub.announce(r);
        }
        Ok(removed)
    }

    async fn claim_expiry_notices(
        &self,
        kind: NoticeKind,
        at: DateTime<Utc>,
        lead: std::time::Duration,
        limit: usize,
    ) -> Result<Vec<TokenRecord>, StoreError> {
        let mut data = self.write();
        let Data { by_id, notices, .. } = &mut *data;
        let mut due: Vec<&TokenRecord> = by_id
            .values()
            .filter(|r| kind.is_due(r, at, lead))
            .filter(|r| {
                notices.get(&r.id).is_none_or(|n| match kind {
                    NoticeKind::Expiring => n.expiring.is_none(),
                    NoticeKind::Expired => n.expired.is_none(),
                })
            })
            .collect();
        due.sort_by(|a, b| {
            a.expires_at
                .cmp(&b.expires_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        due.truncate(limit);
        let claimed: Vec<TokenRecord> = due.into_iter().cloned().collect();
        for r in &claimed {
            *notices.entry(r.id.clone()).or_default().slot(kind) = Some(at);
        }
        Ok(claimed)
    }

    async fn release_expiry_notice(
        &self,
        kind: NoticeKind,
        id: &str,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let mut data = self.write();
        match data.notices.get_mut(id).map(|n| n.slot(kind)) {
            Some(slot) if *slot == Some(at) => {
                *slot = None;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}
