//! [`Tokens`]: one handle that owns the store, the token format and the hasher, and hands them to
//! the layer and the management API, so that every token it issues is one the layer accepts.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::auth::{PatAuthLayer, PatAuthLayerBuilder};
use crate::notices::{ExpiryNoticeBuilder, ExpiryNoticeConfig, ExpiryNotices};
use crate::record::{NewToken, TokenRecord};
use crate::retention::{Retention, RetentionBuilder, RetentionConfig};
use crate::store::{ListQuery, Page, Rotation, StoreError, TokenStore};
use crate::token::{TokenFormat, TokenHasher, TokenSecret};

/// The one place tokens are issued: a store together with the [`TokenFormat`] and
/// [`TokenHasher`] its records are made with.
///
/// Build the layer from it ([`Tokens::layer`]) and the management API too
/// (`AdminConfig::new(&tokens, &layer)`, feature `admin`): both then read and write the same store
/// with the same format and hasher. A layer configured with another format or hasher is refused by
/// [`Tokens::check_layer`] and by the management API.
///
/// Cloning is cheap and gives another handle to the same store.
///
/// ```
/// use tower_pat::{MemoryStore, NewToken, Tokens};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let tokens = Tokens::new(MemoryStore::new());
/// let layer = tokens.layer().realm("api").build();
///
/// // Show the secret once; the store keeps only its hash.
/// let (record, secret) = tokens
///     .issue(NewToken::new("alice", "laptop").scopes(["repo:read"])?)
///     .await?;
/// assert!(record.scopes.contains("repo:read"));
///
/// // The layer built from the handle accepts it.
/// let principal = layer.verify(secret.expose_secret(), None, &Default::default()).await?;
/// assert_eq!(principal.subject(), "alice");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Tokens {
    store: Arc<dyn TokenStore>,
    format: TokenFormat,
    hasher: TokenHasher,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field("format", &self.format)
            .field("hasher", &self.hasher)
            .finish_non_exhaustive()
    }
}

/// Why a layer cannot be paired with a [`Tokens`] handle: it accepts another token format, or
/// hashes with another hasher, so it would refuse the tokens the handle issues. Build the layer
/// with [`Tokens::layer`] and leave its format and hasher as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LayerMismatch {
    /// The layer accepts another token format (another prefix).
    Format,
    /// The layer hashes tokens with another hasher (another pepper, or none).
    Hasher,
}

impl fmt::Display for LayerMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Format => {
                "the layer accepts another token format than the Tokens handle issues; build it \
                 with Tokens::layer"
            }
            Self::Hasher => {
                "the layer hashes tokens with another hasher than the Tokens handle; build it \
                 with Tokens::layer"
            }
        })
    }
}

impl std::error::Error for LayerMismatch {}

/// What two hashers are compared on: not a token of any format, so never a real secret.
const HASHER_PROBE: &str = "tower-pat hasher comparison probe";

/// Whether two hashers make the same hashes, current and previous peppers alike. The peppers are
/// never compared or exposed, only the hashes of a fixed non-secret probe.
fn same_hasher(a: &TokenHasher, b: &TokenHasher) -> bool {
    a.hash(HASHER_PROBE) == b.hash(HASHER_PROBE)
        && a.previous_hashes(HASHER_PROBE) == b.previous_hashes(HASHER_PROBE)
}

impl Tokens {
    /// A handle over `store` (any [`TokenStore`], an `Arc` of one included) with the default format
    /// (prefix `pat_`) and hasher (plain SHA-256).
    pub fn new<S: TokenStore>(store: S) -> Self {
        Self::from_arc(Arc::new(store))
    }

    /// A handle over a shared store.
    pub fn from_arc(store: Arc<dyn TokenStore>) -> Self {
        Self {
            store,
            format: TokenFormat::default(),
            hasher: TokenHasher::default(),
        }
    }

    /// Issues tokens in `format` (default: prefix `pat_`). Set it before building the layer.
    #[must_use]
    pub fn with_format(mut self, format: TokenFormat) -> Self {
        self.format = format;
        self
    }

    /// Hashes tokens with `hasher` (default: plain SHA-256). Set it before building the layer.
    #[must_use]
    pub fn with_hasher(mut self, hasher: TokenHasher) -> Self {
        self.hasher = hasher;
        self
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn TokenStore> {
        &self.store
    }

    /// The token format.
    pub fn format(&self) -> &TokenFormat {
        &self.format
    }

    /// The hasher.
    pub fn hasher(&self) -> &TokenHasher {
        &self.hasher
    }

    /// A layer builder over this handle's store, with its format and hasher. Do not set another
    /// format or hasher on it: [`check_layer`](Self::check_layer) and the management API refuse
    /// such a layer.
    pub fn layer(&self) -> PatAuthLayerBuilder {
        let mut builder = PatAuthLayer::builder(Arc::clone(&self.store))
            .format(self.format.clone())
            .hasher(self.hasher.clone());
        // What `ReusePolicy::RevokeFamily` revokes through.
        builder.reuse_store = Some(Arc::clone(&self.store));
        builder
    }

    /// Whether `layer` accepts the tokens this handle issues: the same format and the same hasher.
    /// (The layer must also read this handle's store, or one that shares its records; build it
    /// with [`layer`](Self::layer) to be sure.)
    pub fn check_layer(&self, layer: &PatAuthLayer) -> Result<(), LayerMismatch> {
        if *layer.format() != self.format {
            return Err(LayerMismatch::Format);
        }
        if !same_hasher(layer.hasher(), &self.hasher) {
            return Err(LayerMismatch::Hasher);
        }
        Ok(())
    }

    /// Makes the secret and the record for `token` at `now` without storing it, for a caller that
    /// inserts the record itself (for example in its own transaction). Prefer
    /// [`issue`](Self::issue).
    pub fn mint(&self, token: NewToken, now: DateTime<Utc>) -> (TokenRecord, TokenSecret) {
        token.build(&self.format, &self.hasher, now)
    }

    /// Issues `token` now: makes its secret, stores the record (which keeps only the secret's
    /// hash) and returns both. Show the secret once; it cannot be read back.
    ///
    /// Fails with the store's error, for example [`StoreError::Conflict`] (`name`) when the
    /// subject already has a token of that name.
    pub async fn issue(&self, token: NewToken) -> Result<(TokenRecord, TokenSecret), StoreError> {
        self.issue_at(token, crate::record::now()).await
    }

    /// [`issue`](Self::issue) with the creation time given.
    pub async fn issue_at(
        &self,
        token: NewToken,
        now: DateTime<Utc>,
    ) -> Result<(TokenRecord, TokenSecret), StoreError> {
        let (record, secret) = self.mint(token, now);
        self.store.insert(&record).await?;
        Ok((record, secret))
    }

    /// The record with this id ([`TokenStore::get`]).
    pub async fn get(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.store.get(id).await
    }

    /// A page of records ([`TokenStore::list`]).
    pub async fn list(&self, query: &ListQuery) -> Result<Page, StoreError> {
        self.store.list(query).await
    }

    /// Revokes the token now ([`TokenStore::revoke`]); every layer reading the store refuses it
    /// from the moment this returns. `None` if the id is unknown.
    pub async fn revoke(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.store.revoke(id, crate::record::now()).await
    }

    /// Replaces the token's secret now and returns the record and the new secret (show it once).
    /// The old secret keeps working for `grace` (zero: it stops at once). The rotation is
    /// conditional on the record read here: it fails with [`StoreError::Stale`], changing
    /// nothing, if the token changed in between (retry), with [`StoreError::NotFound`] for an
    /// unknown id and [`StoreError::Revoked`] for a revoked token. The expiry is kept.
    pub async fn rotate(
        &self,
        id: &str,
        grace: std::time::Duration,
    ) -> Result<(TokenRecord, TokenSecret), StoreError> {
        let record = self.store.get(id).await?.ok_or(StoreError::NotFound)?;
        if record.is_revoked() {
            return Err(StoreError::Revoked);
        }
        let now = crate::record::now();
        let grace_until = (!grace.is_zero()).then(|| crate::record::after(now, grace));
        let (fresh, secret) = self.mint(NewToken::new(&*record.subject, &*record.name), now);
        let rotation = Rotation::new(record.hash, fresh.hash, fresh.start, now)
            .if_version(record.version)
            .grace_until(grace_until);
        let record = self.store.rotate(id, &rotation).await?;
        Ok((record, secret))
    }

    /// Retention over this handle's store: revoked and expired records older than
    /// [`max_age`](crate::RetentionConfig::max_age) removed in batches. Finish with
    /// [`spawn`](crate::retention::RetentionBuilder::spawn) for the background task (after
    /// [`events`](crate::retention::RetentionBuilder::events), feature `admin`, to send an event
    /// per run), or [`build`](crate::retention::RetentionBuilder::build) to purge only on
    /// demand. See [`retention`](crate::retention).
    pub fn retention(&self, config: RetentionConfig) -> RetentionBuilder {
        Retention::builder(Arc::clone(&self.store), config)
    }

    /// Expiry notices over this handle's store: `personalAccessToken.expiring` once per token
    /// [`lead`](crate::ExpiryNoticeConfig::lead) before its expiry, `personalAccessToken.expired`
    /// once it has expired. Finish with [`spawn`](crate::notices::ExpiryNoticeBuilder::spawn)
    /// for the background task (after [`events`](crate::notices::ExpiryNoticeBuilder::events),
    /// feature `admin`, to send the events to a sink), or
    /// [`build`](crate::notices::ExpiryNoticeBuilder::build) to run only on demand. See
    /// [`notices`](crate::notices).
    pub fn expiry_notices(&self, config: ExpiryNoticeConfig) -> ExpiryNoticeBuilder {
        ExpiryNotices::builder(Arc::clone(&self.store), config)
    }

    /// Removes the record ([`TokenStore::delete`]). `None` if the id is unknown.
    pub async fn delete(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.store.delete(id).await
    }
}
