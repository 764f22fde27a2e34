//! The conditional management writes: [`TokenPatch`] for [`TokenStore::update`] and [`Rotation`]
//! for [`TokenStore::rotate`], and the one rule every store applies before either: the record
//! exists, is not revoked and is still the version (and for a rotation, the hash) the caller read.
//!
//! [`TokenStore::update`]: super::TokenStore::update
//! [`TokenStore::rotate`]: super::TokenStore::rotate

use std::fmt;

use chrono::{DateTime, Utc};
use ipnet::IpNet;

use super::StoreError;
use crate::record::TokenRecord;
use crate::scope::ScopeSet;
use crate::token::TokenHash;

/// A condition on another record than the one written: the token that makes the write (the
/// management API's caller) must still exist at this [`version`](TokenRecord::version) when the
/// write is made ([`StoreError::CallerChanged`] otherwise). Every ceiling a write is held to (the
/// caller's scopes, expiry and networks) was checked against the caller as it was read; a caller
/// narrowed, disabled, rotated, revoked or deleted since must not pass on what it no longer has.
///
/// Carried by [`TokenPatch::if_caller`] and [`Rotation::if_caller`], and given to
/// [`TokenStore::insert_below_guarded`](super::TokenStore::insert_below_guarded). A store checks it
/// under the same lock, or in the same transaction, as the write (PostgreSQL: the caller's row
/// locked `FOR SHARE` with the written row's `FOR UPDATE`), and says that it does with
/// [`TokenStore::checks_caller_guard`](super::TokenStore::checks_caller_guard).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerGuard {
    /// The caller's token id.
    pub id: String,
    /// The caller's record's version as read when its ceilings were checked.
    pub version: u64,
}

impl CallerGuard {
    /// The condition that record `id` still has version `version`.
    pub fn new(id: impl Into<String>, version: u64) -> Self {
        Self {
            id: id.into(),
            version,
        }
    }

    /// Whether `current` (the caller's record as stored now, under the write's lock) passes:
    /// it exists and has the version read ([`StoreError::CallerChanged`] otherwise).
    pub(crate) fn check(&self, current: Option<&TokenRecord>) -> Result<(), StoreError> {
        match current {
            Some(r) if r.version == self.version => Ok(()),
            _ => Err(StoreError::CallerChanged),
        }
    }
}

/// The fields [`TokenStore::update`](super::TokenStore::update) changes, and the condition it
/// changes them under. A field left `None` is kept as stored; the hashes, the revocation and the
/// usage fields are never part of a patch.
///
/// ```
/// use chrono::Utc;
/// use tower_pat::TokenPatch;
///
/// let patch = TokenPatch::new(Utc::now()).if_version(3).name("laptop").expires_at(None);
/// assert!(!patch.is_empty());
/// assert!(TokenPatch::new(Utc::now()).if_version(3).is_empty());
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPatch {
    /// Apply only if the record still has this [`version`](TokenRecord::version) (else
    /// [`StoreError::Stale`]); `None` applies to whatever version is stored.
    pub if_version: Option<u64>,
    /// Apply only if the record has not expired when the write is made (the store's clock,
    /// under its write lock; else [`StoreError::Expired`]): a patch that gives a token a new
    /// expiry, or enables it, must not bring back one that expired after it was read.
    pub if_unexpired: bool,
    /// Apply only if the caller's own record is still the version it was read at (else
    /// [`StoreError::CallerChanged`]); `None`: no such condition. Only a store whose
    /// [`checks_caller_guard`](super::TokenStore::checks_caller_guard) is `true` checks it.
    pub if_caller: Option<CallerGuard>,
    /// A new name (unique per subject).
    pub name: Option<String>,
    /// New scopes.
    pub scopes: Option<ScopeSet>,
    /// A new expiry: `Some(None)` for never, `None` to keep it.
    pub expires_at: Option<Option<DateTime<Utc>>>,
    /// New client networks (empty for anywhere).
    pub ip_restriction: Option<Vec<IpNet>>,
    /// Disable (`Some(Some(at))`) or enable (`Some(None)`) the token, `None` to keep it as it is.
    pub disabled_at: Option<Option<DateTime<Utc>>>,
    /// When the change is made: the record's new `updated_at`.
    pub at: DateTime<Utc>,
}

impl TokenPatch {
    /// A patch made at `at` that changes nothing yet, under no version condition.
    pub fn new(at: DateTime<Utc>) -> Self {
        Self {
            if_version: None,
            if_unexpired: false,
            if_caller: None,
            name: None,
            scopes: None,
            expires_at: None,
            ip_restriction: None,
            disabled_at: None,
            at,
        }
    }

    /// Applies only while the record's version is `version`.
    #[must_use]
    pub fn if_version(mut self, version: u64) -> Self {
        self.if_version = Some(version);
        self
    }

    /// Applies only if the record has not expired when the write is made
    /// ([`if_unexpired`](Self::if_unexpired)).
    #[must_use]
    pub fn if_unexpired(mut self) -> Self {
        self.if_unexpired = true;
        self
    }

    /// Applies only while the caller's own record is still the version named
    /// ([`if_caller`](Self::if_caller)).
    #[must_use]
    pub fn if_caller(mut self, guard: CallerGuard) -> Self {
        self.if_caller = Some(guard);
        self
    }

    /// Sets the name.
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets the scopes.
    #[must_use]
    pub fn scopes(mut self, scopes: ScopeSet) -> Self {
        self.scopes = Some(scopes);
        self
    }

    /// Sets the expiry (`None`: never).
    #[must_use]
    pub fn expires_at(mut self, expires_at: Option<DateTime<Utc>>) -> Self {
        self.expires_at = Some(expires_at.map(crate::record::micros));
        self
    }

    /// Sets the allowed client networks (none: anywhere).
    #[must_use]
    pub fn ip_restriction(mut self, nets: impl IntoIterator<Item = IpNet>) -> Self {
        self.ip_restriction = Some(nets.into_iter().collect());
        self
    }

    /// Disables the token from the patch's time on: every layer refuses it ("the access token is
    /// disabled") until a patch [enables](Self::enable) it again. Unlike a revocation, reversible.
    #[must_use]
    pub fn disable(mut self) -> Self {
        self.disabled_at = Some(Some(self.at));
        self
    }

    /// Enables a disabled token again.
    #[must_use]
    pub fn enable(mut self) -> Self {
        self.disabled_at = Some(None);
        self
    }

    /// Whether the patch names no field to change.
    pub fn is_empty(&self) -> bool {
        self.name.is_none()
            && self.scopes.is_none()
            && self.expires_at.is_none()
            && self.ip_restriction.is_none()
            && self.disabled_at.is_none()
    }

    /// The patch applied to `record`: the named fields, `updated_at`, and the version bumped.
    ///
    /// What the built-in stores do once the write's conditions hold; a store written outside this
    /// crate that keeps whole records calls it too, so that it changes exactly what they change.
    ///
    /// # Errors
    /// [`StoreError::Backend`] if the version would overflow.
    pub fn apply(&self, record: &mut TokenRecord) -> Result<(), StoreError> {
        record.version = next_version(record.version)?;
        if let Some(name) = &self.name {
            record.name.clone_from(name);
        }
        if let Some(scopes) = &self.scopes {
            record.scopes = scopes.clone();
        }
        if let Some(expires_at) = self.expires_at {
            record.expires_at = expires_at;
        }
        if let Some(nets) = &self.ip_restriction {
            record.ip_restriction.clone_from(nets);
        }
        if let Some(disabled_at) = self.disabled_at {
            record.disabled_at = disabled_at.map(crate::record::micros);
        }
        record.updated_at = self.at;
        Ok(())
    }
}

/// A new secret for a record, for [`TokenStore::rotate`](super::TokenStore::rotate): applied only
/// while `old_hash` is the record's current hash, so a rotation made from a stale read can never
/// bring back a hash that was rotated away.
///
/// `Debug` names neither hash.
#[non_exhaustive]
#[derive(Clone, PartialEq, Eq)]
pub struct Rotation {
    /// Apply only if the record still has this [`version`](TokenRecord::version) (else
    /// [`StoreError::Stale`]); `None` applies to whatever version is stored.
    pub if_version: Option<u64>,
    /// Apply only if the record has not expired when the write is made (else
    /// [`StoreError::Expired`]), as [`TokenPatch::if_unexpired`].
    pub if_unexpired: bool,
    /// Apply only if the caller's own record is still the version it was read at (else
    /// [`StoreError::CallerChanged`]), as [`TokenPatch::if_caller`].
    pub if_caller: Option<CallerGuard>,
    /// The hash being replaced: the rotation applies only while it is the record's current hash
    /// (else [`StoreError::Stale`]).
    pub old_hash: TokenHash,
    /// The new secret's hash.
    pub new_hash: TokenHash,
    /// The new secret's non-secret beginning ([`TokenRecord::start`]).
    pub new_start: String,
    /// Until when `old_hash` keeps answering; `None`: it stops at once. Any earlier grace hash
    /// stops at once either way.
    pub grace_until: Option<DateTime<Utc>>,
    /// A new expiry (`Some(None)` for never), or `None` to keep it.
    pub expires_at: Option<Option<DateTime<Utc>>>,
    /// When the rotation is made: the record's new `last_rotated_at` and `updated_at`.
    pub at: DateTime<Utc>,
}

impl fmt::Debug for Rotation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rotation")
            .field("if_version", &self.if_version)
            .field("if_unexpired", &self.if_unexpired)
            .field("if_caller", &self.if_caller)
            .field("new_start", &self.new_start)
            .field("grace_until", &self.grace_until)
            .field("expires_at", &self.expires_at)
            .field("at", &self.at)
            .finish_non_exhaustive()
    }
}

impl Rotation {
    /// Replaces `old_hash` by `new_hash` (whose secret begins with `new_start`) at `at`, without
    /// a grace period, keeping the expiry, under no version condition.
    pub fn new(
        old_hash: TokenHash,
        new_hash: TokenHash,
        new_start: impl Into<String>,
        at: DateTime<Utc>,
    ) -> Self {
        Self {
            if_version: None,
            if_unexpired: false,
            if_caller: None,
            old_hash,
            new_hash,
            new_start: new_start.into(),
            grace_until: None,
            expires_at: None,
            at,
        }
    }

    /// Applies only while the record's version is `version`.
    #[must_use]
    pub fn if_version(mut self, version: u64) -> Self {
        self.if_version = Some(version);
        self
    }

    /// Applies only if the record has not expired when the write is made
    /// ([`if_unexpired`](Self::if_unexpired)).
    #[must_use]
    pub fn if_unexpired(mut self) -> Self {
        self.if_unexpired = true;
        self
    }

    /// Applies only while the caller's own record is still the version named
    /// ([`if_caller`](Self::if_caller)).
    #[must_use]
    pub fn if_caller(mut self, guard: CallerGuard) -> Self {
        self.if_caller = Some(guard);
        self
    }

    /// Until when the old secret keeps working (`None`: it stops at once).
    #[must_use]
    pub fn grace_until(mut self, until: Option<DateTime<Utc>>) -> Self {
        self.grace_until = until;
        self
    }

    /// Sets a new expiry with the rotation (`None`: never).
    #[must_use]
    pub fn expires_at(mut self, expires_at: Option<DateTime<Utc>>) -> Self {
        self.expires_at = Some(expires_at.map(crate::record::micros));
        self
    }

    /// The rotation applied to `record`: the new hash and start, the old hash kept for the grace
    /// period (if any), `last_rotated_at`, `updated_at`, the new expiry (if any) and the version
    /// bumped. Like [`TokenPatch::apply`], for stores that keep whole records.
    ///
    /// # Errors
    /// [`StoreError::Backend`] if the version would overflow.
    pub fn apply(&self, record: &mut TokenRecord) -> Result<(), StoreError> {
        record.version = next_version(record.version)?;
        record.hash = self.new_hash;
        record.start.clone_from(&self.new_start);
        record.previous_hash = self.grace_until.map(|until| (self.old_hash, until));
        record.last_rotated_at = Some(self.at);
        record.updated_at = self.at;
        if let Some(expires_at) = self.expires_at {
            record.expires_at = expires_at;
        }
        Ok(())
    }
}

/// The rule every store applies, under its write lock, before [`TokenStore::update`] or
/// [`TokenStore::rotate`]: `current` (the record as stored now) exists ([`StoreError::NotFound`]),
/// is not revoked ([`StoreError::Revoked`]), has the version `if_version` names and, for a
/// rotation, the hash it replaces ([`StoreError::Stale`]), and with `if_unexpired` has not
/// expired now ([`StoreError::Expired`]).
///
/// [`TokenStore::update`]: super::TokenStore::update
/// [`TokenStore::rotate`]: super::TokenStore::rotate
pub(crate) fn check_writable<'r>(
    current: Option<&'r TokenRecord>,
    if_version: Option<u64>,
    current_hash: Option<&TokenHash>,
    if_unexpired: bool,
) -> Result<&'r TokenRecord, StoreError> {
    let record = current.ok_or(StoreError::NotFound)?;
    if record.is_revoked() {
        return Err(StoreError::Revoked);
    }
    if if_version.is_some_and(|v| v != record.version)
        || current_hash.is_some_and(|h| *h != record.hash)
    {
        return Err(StoreError::Stale);
    }
    if if_unexpired && record.is_expired_at(Utc::now()) {
        return Err(StoreError::Expired);
    }
    Ok(record)
}

/// The version after a management write.
pub(crate) fn next_version(version: u64) -> Result<u64, StoreError> {
    version
        .checked_add(1)
        .ok_or_else(|| StoreError::backend("the token's version counter is exhausted"))
}
