//! [`AdminConfig`]: what the management API needs (the store, the layer) and its policies.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::error::ApiError;
use super::events::TokenEvents;
use super::input::{Limits, MAX_PAGE_SIZE};
use crate::auth::PatAuthLayer;
use crate::store::TokenStore;
use crate::tokens::{LayerMismatch, Tokens};

/// The longest rotation grace period a default [`AdminConfig`] allows: one day.
pub(crate) const DEFAULT_MAX_ROTATION_GRACE: Duration = Duration::from_secs(86_400);

/// What a new token without `expiresAt` gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ExpiryPolicy {
    /// No `expiresAt` requires `userAwareTokenNeverExpires: true`, and the token never expires;
    /// otherwise 400 naming both fields (SailPoint's rule). The default.
    #[default]
    RequireAcknowledgment,
    /// No `expiresAt` means now plus this lifetime (capped by the maximum lifetime, if any, and
    /// cut to the creating token's own expiry when that is sooner: a token never outlives the
    /// token that creates it); `userAwareTokenNeverExpires: true` still asks for a token that
    /// never expires. An explicit `expiresAt` beyond the creating token's expiry is refused (403),
    /// not cut.
    DefaultLifetime(Duration),
}

/// The configuration of [`router`](super::router): the [`Tokens`] handle it issues and changes
/// tokens through, the layer built from that handle (so that the API issues tokens the layer
/// accepts, and every change reaches the layer's cache at once), and the policies.
///
/// ```
/// use std::time::Duration;
/// use tower_pat::admin::{AdminConfig, ExpiryPolicy};
/// use tower_pat::{MemoryStore, Tokens};
///
/// # fn main() -> Result<(), tower_pat::LayerMismatch> {
/// let tokens = Tokens::new(MemoryStore::new());
/// let layer = tokens.layer().build();
/// let config = AdminConfig::new(&tokens, &layer)?
///     .expiry_policy(ExpiryPolicy::DefaultLifetime(Duration::from_secs(30 * 86_400)))
///     .max_lifetime(Duration::from_secs(365 * 86_400))
///     .max_tokens_per_subject(20);
/// let api: axum::Router = tower_pat::admin::router(config);
/// # let _ = api;
/// # Ok(())
/// # }
/// ```
#[must_use]
#[derive(Clone)]
pub struct AdminConfig {
    pub(crate) tokens: Tokens,
    pub(crate) store: Arc<dyn TokenStore>,
    pub(crate) layer: PatAuthLayer,
    pub(crate) expiry: ExpiryPolicy,
    pub(crate) max_lifetime: Option<Duration>,
    pub(crate) max_tokens_per_subject: u64,
    pub(crate) max_rotation_grace: Duration,
    pub(crate) default_page_size: u64,
    pub(crate) creation_limit: Option<(u32, Duration)>,
    pub(crate) rotation_limit: Option<(u32, Duration)>,
    pub(crate) limits: Limits,
    pub(crate) max_body_bytes: usize,
    pub(crate) events: Option<Arc<dyn TokenEvents>>,
    #[cfg(feature = "secret-scanning")]
    pub(crate) leak_reports: Option<super::leaks::LeakReports>,
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut f = f.debug_struct("AdminConfig");
        f.field("layer", &self.layer)
            .field("expiry", &self.expiry)
            .field("max_lifetime", &self.max_lifetime)
            .field("max_tokens_per_subject", &self.max_tokens_per_subject)
            .field("max_rotation_grace", &self.max_rotation_grace)
            .field("default_page_size", &self.default_page_size)
            .field("creation_limit", &self.creation_limit)
            .field("rotation_limit", &self.rotation_limit)
            .field("max_scopes_per_token", &self.limits.scopes)
            .field("max_networks_per_token", &self.limits.networks)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("events", &self.events.is_some());
        #[cfg(feature = "secret-scanning")]
        f.field("leak_reports", &self.leak_reports);
        f.finish_non_exhaustive()
    }
}

/// The default of [`AdminConfig::max_body_bytes`].
const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;

impl AdminConfig {
    /// The API over `tokens`, for requests authenticated by `layer`, which must be built from the
    /// same handle ([`Tokens::layer`]): a layer with another token format or hasher would refuse
    /// the tokens the API issues, and is refused with [`LayerMismatch`]. The defaults: [`ExpiryPolicy::RequireAcknowledgment`], no maximum lifetime, 100
    /// tokens per subject, rotation grace periods of at most a day, pages of 50, at most 30 new
    /// tokens per subject per minute, at most 10 rotations of one token per minute, at most 100 scopes and 100 networks per token, request
    /// bodies of at most 64 KiB, no events.
    pub fn new(tokens: &Tokens, layer: &PatAuthLayer) -> Result<Self, LayerMismatch> {
        tokens.check_layer(layer)?;
        Ok(Self {
            tokens: tokens.clone(),
            store: Arc::clone(tokens.store()),
            layer: layer.clone(),
            expiry: ExpiryPolicy::default(),
            max_lifetime: None,
            max_tokens_per_subject: 100,
            max_rotation_grace: DEFAULT_MAX_ROTATION_GRACE,
            default_page_size: 50,
            creation_limit: Some((30, Duration::from_secs(60))),
            rotation_limit: Some((10, Duration::from_secs(60))),
            limits: Limits::default(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            events: None,
            #[cfg(feature = "secret-scanning")]
            leak_reports: None,
        })
    }

    /// What a token created without `expiresAt` gets.
    pub fn expiry_policy(mut self, policy: ExpiryPolicy) -> Self {
        self.expiry = policy;
        self
    }

    /// The longest a token may live from its creation (or from the change that sets its expiry);
    /// with it, tokens that never expire are refused. Off by default.
    pub fn max_lifetime(mut self, max: Duration) -> Self {
        self.max_lifetime = Some(max);
        self
    }

    /// How many tokens (revoked and expired ones included, until deleted) one subject may have;
    /// one more is refused with 403. Default 100.
    pub fn max_tokens_per_subject(mut self, max: u64) -> Self {
        self.max_tokens_per_subject = max;
        self
    }

    /// The longest `gracePeriodSeconds` a rotation may ask for; a longer one is refused (400), and
    /// the OpenAPI document the router serves states this maximum. Default one day.
    pub fn max_rotation_grace(mut self, max: Duration) -> Self {
        self.max_rotation_grace = max;
        self
    }

    /// The page size of a listing without `limit`, 1 to 100. Default 50.
    pub fn default_page_size(mut self, size: u64) -> Self {
        self.default_page_size = size.clamp(1, MAX_PAGE_SIZE);
        self
    }

    /// At most `max` tokens created per subject per `window`; more get 429 with `Retry-After`.
    /// Counted in this process: with several nodes, each allows as many (a subject can create
    /// `max` per window on every node). The cap that holds across nodes is
    /// [`max_tokens_per_subject`](Self::max_tokens_per_subject), checked in the store when the
    /// token is inserted. At most 100 000 subjects are tracked at once, none forgotten before its
    /// window ends; while that many are, the others share one window of `max`. Default 30 per
    /// minute. `max == 0` turns the limit off.
    pub fn creation_rate_limit(mut self, max: u32, window: Duration) -> Self {
        self.creation_limit = (max > 0).then_some((max, window));
        self
    }

    /// At most `max` rotations of one token per `window`, whoever asks (`POST /{id}/rotate` or
    /// the token itself, `POST /self/rotate`, which needs no scope); more get 429 with
    /// `Retry-After`. Each rotation is a store write, an event and, with PostgreSQL, a
    /// notification to every node: without this limit any token could have them made as fast as
    /// it can send requests. Counted per token, not per subject, so that a token of a subject
    /// cannot use up another's rotations, and an administrator rotating many tokens is not
    /// held back. Counted in this process (with several nodes, each allows as many), before the
    /// store write (a rotation answered 409 counts too). A holder of a leaked token can use up
    /// its rotations; revoking it is never limited. At most 100 000 tokens are tracked at once,
    /// none forgotten before its window ends; while that many are, the others share one window of
    /// `max`. Default 10 per minute. `max == 0` turns the limit off.
    pub fn rotation_rate_limit(mut self, max: u32, window: Duration) -> Self {
        self.rotation_limit = (max > 0).then_some((max, window));
        self
    }

    /// The most scopes one token may have: a create or PATCH listing more is refused with 400
    /// naming the field. Default 100; at least 1.
    pub fn max_scopes_per_token(mut self, max: usize) -> Self {
        self.limits.scopes = max.max(1);
        self
    }

    /// The most networks (CIDRs or addresses) one token's `ipRestriction` may have: a create or
    /// PATCH listing more is refused with 400 naming the field. Every request on a token scans
    /// its networks, so keep this small. Default 100; at least 1.
    pub fn max_networks_per_token(mut self, max: usize) -> Self {
        self.limits.networks = max.max(1);
        self
    }

    /// The largest request body the API reads, in bytes; a larger one is refused with 413
    /// (`payload_too_large`) before it is parsed. Default 64 KiB, room for 100 scopes of 128
    /// characters, 100 networks and a name of 256 characters several times over.
    pub fn max_body_bytes(mut self, max: usize) -> Self {
        self.max_body_bytes = max;
        self
    }

    /// Where change events go (for example a [`WebhookSink`](super::WebhookSink)).
    pub fn events(mut self, sink: impl TokenEvents) -> Self {
        self.events = Some(Arc::new(sink));
        self
    }

    /// Adds `POST <base>/leak-reports`: secret-scanning reports in GitHub's partner format,
    /// signed by one of the configured keys, revoke the tokens they name (feature
    /// `secret-scanning`; see [`LeakReports`](super::LeakReports)). Off by default: without it
    /// the path does not exist.
    #[cfg(feature = "secret-scanning")]
    pub fn leak_reports(mut self, reports: super::leaks::LeakReports) -> Self {
        self.leak_reports = Some(reports);
        self
    }

    /// The request rules of this configuration that the served OpenAPI document states.
    pub(crate) fn openapi_rules(&self) -> super::openapi::Rules {
        super::openapi::Rules {
            max_grace_seconds: self.max_rotation_grace.as_secs(),
            max_scopes: self.limits.scopes,
            max_networks: self.limits.networks,
            expiry_needs_acknowledgment: matches!(self.expiry, ExpiryPolicy::RequireAcknowledgment),
            #[cfg(feature = "secret-scanning")]
            leak_reports: self.leak_reports.is_some(),
            #[cfg(not(feature = "secret-scanning"))]
            leak_reports: false,
        }
    }

    /// The expiry of a token given `expires_at` and the never-expires acknowledgment at `now`,
    /// under the expiry policy and the maximum lifetime.
    pub(crate) fn resolve_expiry(
        &self,
        expires_at: Option<DateTime<Utc>>,
        never_expires: bool,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, ApiError> {
        let latest = self.max_lifetime.map(|max| crate::record::after(now, max));
        match (expires_at, never_expires, self.expiry) {
            (Some(at), ..) if at <= now => {
                Err(ApiError::invalid("expiresAt", "must be in the future"))
            }
            (Some(at), ..) => match latest {
                Some(latest) if at > latest => Err(ApiError::invalid(
                    "expiresAt",
                    format!("must be at most the maximum lifetime from now ({latest})"),
                )),
                _ => Ok(Some(at)),
            },
            (None, true, _) if latest.is_some() => Err(ApiError::invalid(
                "userAwareTokenNeverExpires",
                "tokens that never expire are not allowed here; set expiresAt",
            )),
            (None, true, _) => Ok(None),
            (None, false, ExpiryPolicy::RequireAcknowledgment) => Err(ApiError::bad_request(
                "expiresAt: required unless userAwareTokenNeverExpires is true (acknowledging a \
                 token that never expires)",
            )),
            (None, false, ExpiryPolicy::DefaultLifetime(lifetime)) => {
                let at = crate::record::after(now, lifetime);
                Ok(Some(latest.map_or(at, |latest| at.min(latest))))
            }
        }
    }
}
