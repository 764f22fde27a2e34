use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{ChangeHub, ChangeListener, ListQuery, Page, StoreError, TokenLookup, TokenStore};
use crate::record::TokenRecord;
use crate::token::TokenHash;
use crate::usage::UsageUpdate;

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
}

#[derive(Default, Debug)]
struct Data {
    by_id: HashMap<String, TokenRecord>,
    by_hash: HashMap<TokenHash, String>,
}

impl Data {
    fn name_taken(&self, record: &TokenRecord) -> bool {
        self.by_id
            .values()
            .any(|r| r.subject == record.subject && r.name == record.name && r.id != record.id)
    }

    fn index(&mut self, record: &TokenRecord) {
        self.by_hash.insert(record.hash, record.id.clone());
        if let Some((h, _)) = record.previous_hash {
            self.by_hash.insert(h, record.id.clone());
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
}

#[async_trait]
impl TokenStore for MemoryStore {
    async fn insert(&self, record: &TokenRecord) -> Result<(), StoreError> {
        let mut data = self.write();
        if data.by_id.contains_key(&record.id) {
            return Err(StoreError::Conflict { field: "id" });
        }
        if data.by_hash.contains_key(&record.hash) {
            return Err(StoreError::Conflict { field: "hash" });
        }
        if data.name_taken(record) {
            return Err(StoreError::Conflict { field: "name" });
        }
        data.index(record);
        data.by_id.insert(record.id.clone(), record.clone());
        Ok(())
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

    async fn update(&self, record: &TokenRecord) -> Result<(), StoreError> {
        let old = {
            let mut data = self.write();
            let Some(old) = data.by_id.get(&record.id).cloned() else {
                return Err(StoreError::NotFound);
            };
            if data.name_taken(record) {
                return Err(StoreError::Conflict { field: "name" });
            }
            if record.hash != old.hash
                && data
                    .by_hash
                    .get(&record.hash)
                    .is_some_and(|id| *id != record.id)
            {
                return Err(StoreError::Conflict { field: "hash" });
            }
            data.unindex(&old);
            let mut new = record.clone();
            new.last_used_at = old.last_used_at;
            new.last_used_ips = old.last_used_ips.clone();
            data.index(&new);
            data.by_id.insert(new.id.clone(), new);
            old
        };
        self.inner.hub.announce(&old);
        Ok(())
    }

    async fn revoke(&self, id: &str, at: DateTime<Utc>) -> Result<Option<TokenRecord>, StoreError> {
        let revoked = {
            let mut data = self.write();
            let Some(r) = data.by_id.get_mut(id) else {
                return Ok(None);
            };
            if r.revoked_at.is_none() {
                r.revoked_at = Some(at);
                r.updated_at = at;
            }
            r.clone()
        };
        self.inner.hub.announce(&revoked);
        Ok(Some(revoked))
    }

    async fn delete(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        let removed = {
            let mut data = self.write();
            let removed = data.by_id.remove(id);
            if let Some(r) = &removed {
                data.unindex(r);
            }
            removed
        };
        if let Some(r) = &removed {
            self.inner.hub.announce(r);
        }
        Ok(removed)
    }

    async fn count_by_subject(&self, subject: &str) -> Result<u64, StoreError> {
        Ok(self
            .read()
            .by_id
            .values()
            .filter(|r| r.subject == subject)
            .count() as u64)
    }
}
