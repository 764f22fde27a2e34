//! Rotation reuse detection: a secret that a rotation replaced, presented after its grace period,
//! is a sign that the old secret leaked (a rotated credential should no longer be in anyone's
//! hands). The layer reports it, and under [`ReusePolicy::RevokeFamily`] revokes the token the
//! secret was rotated into: the whole credential family is treated as compromised.
//!
//! # How it works
//!
//! Every [`rotate`](crate::TokenStore::rotate) of the built-in stores records the hash it
//! replaces in a bounded history ([`SupersededHistory`](crate::store::SupersededHistory): the
//! newest 10 per token, for 30 days, by default). When a request presents a well-formed token
//! that the cache does not know and the store does not find
//! ([`find_by_hash`](crate::TokenLookup::find_by_hash): no current secret, and no secret still
//! in its grace period, which is valid), the layer asks the history
//! ([`find_superseded`](crate::TokenLookup::find_superseded)). If the secret is there, the layer
//! calls the hook set with [`PatAuthLayerBuilder::on_reuse`] (or
//! [`reuse_events`](PatAuthLayerBuilder::reuse_events), feature `admin`: a
//! `personalAccessToken.reused` event) with a [`SecretReuse`]: the token, the client address,
//! when the secret was superseded, and whether it was revoked. A warning is logged too (target
//! `tower_pat::auth`: the token id and the client address, never the secret or its hash).
//!
//! The request itself is refused exactly as any unknown token is: 401 `invalid_token`, the same
//! body and challenge, so the caller cannot tell that it presented a rotated-out secret. A secret
//! that was presented during its grace period is cached under its own hash until the grace period
//! ends; presented later, that entry is dropped and the token looked up as if the cache did not
//! know it, so the first presentation after the grace period is refused and reported like any
//! other (not answered "expired" from the cache).
//!
//! # What it costs
//!
//! Nothing on a cache hit: a hit never reaches this code. Detection is on only when a hook is set
//! or the policy is [`ReusePolicy::RevokeFamily`]; then a miss that the store answers "unknown"
//! costs one more query (one per pepper candidate), run in the same single-flight lookup, under
//! the same lookup slots and client budgets. The history lookup, the revocation and the hook run
//! in a task of their own, which the lookup awaits for at most
//! [`lookup_timeout`](crate::CacheConfig::lookup_timeout): a presenter that drops its request
//! cannot cancel them, nor get the lookup's slots back before the history has answered, so
//! detections stay within the same bounds as lookups. Each history query has `lookup_timeout`,
//! like a lookup's: one that takes longer is a store failure (a warning, target
//! `tower_pat::store`; nothing is reported), so a store that hangs keeps the slots no longer than
//! it would a lookup's. The revocation and the hook, only for a secret found in the history, run
//! after the slots are given back. The lookup's answer is remembered like any unknown token,
//! in the negative cache: the same dead secret presented again and again is looked up, and
//! reported, at most once per [`negative_ttl`](crate::CacheConfig::negative_ttl) per layer
//! (concurrent presentations share one lookup; the event then carries the address of the request
//! that started it). Reports are counted in
//! [`AuthStats::reused_secrets`](crate::AuthStats::reused_secrets).
//!
//! # Revoking the family
//!
//! With [`ReusePolicy::RevokeFamily`] the layer revokes the token through
//! [`TokenStore::revoke`], the store's one conditional revocation: the
//! change feed drops the token from every node's cache, so its current secret stops working
//! everywhere at once. The layer needs the store to do it: build it with
//! [`Tokens::layer`](crate::Tokens::layer). A layer built from
//! [`PatAuthLayer::builder`](crate::PatAuthLayer::builder) over a bare lookup only reports (a
//! warning says so when it is built). The revocation sends no `personalAccessToken.revoked`
//! event: the `reused` event says `revoked: true`.
//!
//! A store that keeps no history (one that does not override `find_superseded`) never detects
//! reuse; everything else works as before.
//!
//! [`PatAuthLayerBuilder::on_reuse`]: crate::PatAuthLayerBuilder::on_reuse
//! [`PatAuthLayerBuilder`]: crate::PatAuthLayerBuilder

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::record::TokenRecord;
use crate::store::{StoreError, SupersededSecret, TokenLookup, TokenStore};
use crate::token::TokenHash;

#[cfg(doc)]
use crate::PatAuthLayerBuilder;

/// What a layer does when a rotated-out secret is presented after its grace period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReusePolicy {
    /// Report it (the hook, a warning); the token keeps working with its current secret.
    #[default]
    Report,
    /// Report it and revoke the token the secret was rotated into: every secret of the family
    /// stops working, on every node.
    ///
    /// Whoever holds a rotated-out secret can trigger this, and that is the point (a leaked and
    /// rotated family is treated as compromised), but it is also a denial of service in the hands
    /// of whoever found a secret that leaked in public: rotating such a token only buys a new
    /// secret until the old one is presented again (for as long as the history keeps it, 30 days
    /// by default). Revoke a leaked token (and issue a new one) rather than rotating it, and roll
    /// rotations out with a grace period long enough for every holder of the old secret.
    RevokeFamily,
}

/// A rotated-out secret was presented: what the [reuse hook](crate::PatAuthLayerBuilder::on_reuse)
/// gets. Holds neither the secret nor its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SecretReuse {
    /// The token the secret belonged to, as it is now (revoked, if this detection revoked it).
    pub record: TokenRecord,
    /// The address of the client that presented it, as the layer read it (see
    /// [`client_ip`](crate::client_ip)); `None` when unknown.
    pub client_address: Option<IpAddr>,
    /// When the secret stopped working: its rotation, or the end of its grace period.
    pub superseded_at: DateTime<Utc>,
    /// Whether the token is revoked under [`ReusePolicy::RevokeFamily`] (now, or already before).
    pub revoked: bool,
    /// When the reuse was detected.
    pub detected_at: DateTime<Utc>,
}

/// The application's reuse hook.
pub(crate) type ReuseHook = Arc<dyn Fn(&SecretReuse) + Send + Sync>;

/// The layer's reuse detection: on only when something listens or the policy revokes.
pub(crate) struct ReuseDetection {
    pub(crate) policy: ReusePolicy,
    pub(crate) hook: Option<ReuseHook>,
    /// The store to revoke through, under [`ReusePolicy::RevokeFamily`].
    pub(crate) store: Option<Arc<dyn TokenStore>>,
    /// Rotated-out secrets reported so far ([`AuthStats::reused_secrets`]).
    ///
    /// [`AuthStats::reused_secrets`]: crate::AuthStats::reused_secrets
    reported: AtomicU64,
}

impl std::fmt::Debug for ReuseDetection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReuseDetection")
            .field("policy", &self.policy)
            .field("hook", &self.hook.is_some())
            .field("revokes", &self.revokes())
            .finish()
    }
}

impl ReuseDetection {
    /// The detection configured, or `None` when it would do nothing (no hook, and no revocation
    /// possible): the layer then never reads the history.
    pub(crate) fn new(
        policy: ReusePolicy,
        hook: Option<ReuseHook>,
        store: Option<Arc<dyn TokenStore>>,
    ) -> Option<Self> {
        let store = store.filter(|_| policy == ReusePolicy::RevokeFamily);
        if policy == ReusePolicy::RevokeFamily && store.is_none() {
            tracing::warn!(
                target: "tower_pat::auth",
                "ReusePolicy::RevokeFamily has no effect on a layer without a TokenStore: build \
                 it with Tokens::layer; reuse is only reported"
            );
        }
        (hook.is_some() || store.is_some()).then_some(Self {
            policy,
            hook,
            store,
            reported: AtomicU64::new(0),
        })
    }

    /// Rotated-out secrets reported so far.
    pub(crate) fn reported(&self) -> u64 {
        self.reported.load(Ordering::Relaxed)
    }

    fn revokes(&self) -> bool {
        self.store.is_some()
    }

    /// Looks the hashes of a token the store does not know up in the history, each query given
    /// at most `timeout` (one that takes longer is a store failure, and ends the search). Returns
    /// how many store queries it made, and the secret found, if any.
    #[cold]
    pub(crate) async fn find(
        &self,
        lookup: &dyn TokenLookup,
        hashes: &[TokenHash],
        timeout: Duration,
    ) -> (u64, Result<Option<SupersededSecret>, StoreError>) {
        let mut queries = 0;
        for hash in hashes {
            queries += 1;
            let found = tokio::time::timeout(timeout, lookup.find_superseded(hash))
                .await
                .unwrap_or_else(|_| {
                    Err(StoreError::backend(format!(
                        "the store did not answer a superseded secret lookup within {timeout:?}"
                    )))
                });
            match found {
                Ok(None) => {}
                found => return (queries, found),
            }
        }
        (queries, Ok(None))
    }

    /// Applies the policy to a secret [`Self::find`] found, and reports it, unless its time
    /// has not come (a racing rotation).
    #[cold]
    pub(crate) async fn apply(&self, found: SupersededSecret, client: Option<IpAddr>) {
        let now = crate::record::now();
        if found.superseded_at <= now {
            self.report(found.record, found.superseded_at, client, now)
                .await;
        }
    }

    async fn report(
        &self,
        record: TokenRecord,
        superseded_at: DateTime<Utc>,
        client: Option<IpAddr>,
        now: DateTime<Utc>,
    ) {
        let (record, revoked) = match &self.store {
            Some(_) if record.is_revoked() => (record, true),
            Some(store) => match store.revoke(&record.id, now).await {
                Ok(Some(revoked)) => (revoked, true),
                Ok(None) => (record, false),
                Err(e) => {
                    tracing::warn!(
                        target: "tower_pat::store",
                        token_id = %record.id,
                        error = %e,
                        "revoking a token whose rotated-out secret was presented failed"
                    );
                    (record, false)
                }
            },
            None => (record, false),
        };
        self.reported.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            target: "tower_pat::auth",
            token_id = %record.id,
            client = client.map(tracing::field::display),
            revoked,
            "a rotated-out secret was presented"
        );
        if let Some(hook) = &self.hook {
            hook(&SecretReuse {
                record,
                client_address: client,
                superseded_at,
                revoked,
                detected_at: now,
            });
        }
    }
}
