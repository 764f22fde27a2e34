//! Change events: [`TokenEvents`] receives a [`TokenEvent`] after every change the management API
//! makes and for every [expiry notice](crate::notices), and a [`PurgeEvent`] after every run of
//! [retention](crate::retention).
//! [`WebhookSink`](super::WebhookSink) posts both to a URL.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::view::TokenView;

/// Receives the management API's change events.
///
/// `publish` is called on the request's task right after the change is stored, before the
/// response is sent: return at once (hand the event to a queue), never block or wait.
pub trait TokenEvents: Send + Sync + 'static {
    /// Takes one event.
    fn publish(&self, event: TokenEvent);

    /// Takes the event of one [retention](crate::retention) run: how many records it removed and
    /// the cutoff it removed them before.
    ///
    /// The default drops it (logged at debug), for sinks written before it existed and for the
    /// channel sink, whose item type is [`TokenEvent`]; [`WebhookSink`](super::WebhookSink)
    /// posts it like the others.
    fn publish_purge(&self, event: PurgeEvent) {
        tracing::debug!(
            event = event.event.as_str(),
            count = event.data.count,
            "this token event sink does not take purge events; dropped"
        );
    }

    /// Takes one event if it can be queued at once, and says whether it was: `false` hands it
    /// back to the caller's care (nothing is logged or counted as dropped). The
    /// [expiry notices](crate::notices) publish this way, so that a notice a full queue cannot
    /// take is sent by a later run rather than lost.
    ///
    /// The default calls [`publish`](Self::publish) and answers `true`, for sinks written before
    /// it existed (a notice they drop is then lost, as it was); the channel sink and
    /// [`WebhookSink`](super::WebhookSink) answer `false` once half their queue is taken, so that
    /// a backlog of notices, offered again by every run, never fills the room an event that
    /// cannot wait (a revocation) needs.
    fn try_publish(&self, event: TokenEvent) -> bool {
        self.publish(event);
        true
    }
}

/// What changed: `{"event": "personalAccessToken.created", "data": <token view>, "triggeredAt":
/// <RFC 3339>}`, with `"leak": {"url", "source"}` for `personalAccessToken.leaked` and
/// `"reuse": {"clientAddress", "supersededAt", "revoked"}` for `personalAccessToken.reused`. The
/// data never holds the secret, nor its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct TokenEvent {
    /// The kind of change.
    pub event: EventKind,
    /// The token after the change (before it, for a deletion).
    pub data: TokenView,
    /// When the change happened.
    pub triggered_at: DateTime<Utc>,
    /// Where the token was found, for [`EventKind::Leaked`]; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leak: Option<LeakSource>,
    /// Who presented a rotated-out secret, for [`EventKind::Reused`]; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reuse: Option<ReuseDetails>,
}

/// A rotated-out secret presented after its grace period ([`EventKind::Reused`]): never the
/// secret, nor its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct ReuseDetails {
    /// The address of the client that presented it, as the layer read it; `null` when unknown.
    #[schema(format = "ip")]
    pub client_address: Option<String>,
    /// When the secret stopped working: its rotation, or the end of its grace period.
    pub superseded_at: DateTime<Utc>,
    /// Whether the token (and so its current secret) is revoked under
    /// [`ReusePolicy::RevokeFamily`](crate::ReusePolicy::RevokeFamily).
    pub revoked: bool,
}

/// Where a leaked token was found, as the secret-scanning report says: never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct LeakSource {
    /// The public location of the leak (for GitHub, the URL of the commit, issue or gist).
    pub url: String,
    /// Where the scanner found it (for GitHub: `content`, `commit`, `pull_request_description`,
    /// …).
    pub source: String,
}

impl LeakSource {
    /// A leak found at `url` by the scanner's `source`.
    pub fn new(url: impl Into<String>, source: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            source: source.into(),
        }
    }
}

impl TokenEvent {
    /// An event of `kind` about `data` at `at`.
    pub fn new(kind: EventKind, data: TokenView, at: DateTime<Utc>) -> Self {
        Self {
            event: kind,
            data,
            triggered_at: at,
            leak: None,
            reuse: None,
        }
    }

    /// The `personalAccessToken.reused` event of a detected reuse (see [`crate::reuse`]): the
    /// token's view, and the client address, when the secret was superseded and whether the
    /// token was revoked.
    pub fn reused(reuse: &crate::reuse::SecretReuse) -> Self {
        let mut event = Self::new(
            EventKind::Reused,
            TokenView::new(&reuse.record, reuse.detected_at),
            reuse.detected_at,
        );
        event.reuse = Some(ReuseDetails {
            client_address: reuse.client_address.map(|ip| ip.to_string()),
            superseded_at: reuse.superseded_at,
            revoked: reuse.revoked,
        });
        event
    }

    /// Whether a webhook posts this event from its alerts queue: its kind's
    /// [`is_alert`](EventKind::is_alert), and a reuse that revoked the token as it was detected
    /// (at most once per token: a revocation is set once).
    pub fn is_alert(&self) -> bool {
        match self.event {
            EventKind::Reused => self.data.revoked_at == Some(self.triggered_at),
            kind => kind.is_alert(),
        }
    }

    /// The event with where the token leaked ([`EventKind::Leaked`]).
    #[must_use]
    pub fn with_leak(mut self, leak: LeakSource) -> Self {
        self.leak = Some(leak);
        self
    }
}

/// What one [retention](crate::retention) run did: `{"event": "personalAccessToken.purged",
/// "data": {"count": 3, "cutoff": <RFC 3339>}, "triggeredAt": <RFC 3339>}`. It names no token:
/// no id, no subject, no hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct PurgeEvent {
    /// Always [`EventKind::Purged`].
    pub event: EventKind,
    /// What the run removed.
    pub data: PurgeSummary,
    /// When the run ended.
    pub triggered_at: DateTime<Utc>,
}

/// The data of a [`PurgeEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct PurgeSummary {
    /// How many records the run removed (zero included: one event per run).
    pub count: u64,
    /// Records revoked or expired before this time were removed.
    pub cutoff: DateTime<Utc>,
}

impl PurgeEvent {
    /// The event of a run that removed `count` records revoked or expired before `cutoff`,
    /// ending at `at`.
    pub fn new(count: u64, cutoff: DateTime<Utc>, at: DateTime<Utc>) -> Self {
        Self {
            event: EventKind::Purged,
            data: PurgeSummary { count, cutoff },
            triggered_at: at,
        }
    }
}

/// The kinds of [`TokenEvent`] (and [`EventKind::Purged`], the kind of [`PurgeEvent`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub enum EventKind {
    /// A token was created.
    #[serde(rename = "personalAccessToken.created")]
    Created,
    /// Its name, scopes, expiry or IP restriction changed.
    #[serde(rename = "personalAccessToken.updated")]
    Updated,
    /// Its secret was rotated.
    #[serde(rename = "personalAccessToken.rotated")]
    Rotated,
    /// It was revoked (the record is kept).
    #[serde(rename = "personalAccessToken.revoked")]
    Revoked,
    /// It was deleted.
    #[serde(rename = "personalAccessToken.deleted")]
    Deleted,
    /// It was disabled (`active: false`): refused until enabled again.
    #[serde(rename = "personalAccessToken.disabled")]
    Disabled,
    /// It was enabled again (`active: true`).
    #[serde(rename = "personalAccessToken.enabled")]
    Enabled,
    /// Revoked and expired records past the retention period were removed: a [`PurgeEvent`],
    /// one per [retention](crate::retention) run.
    #[serde(rename = "personalAccessToken.purged")]
    Purged,
    /// A secret-scanning report named it as leaked in public, and it was revoked (the record is
    /// kept). The event carries the report's `url` and `source`; no
    /// `personalAccessToken.revoked` is sent for this revocation.
    #[serde(rename = "personalAccessToken.leaked")]
    Leaked,
    /// It expires soon: sent once per token, the configured lead time (7 days by default) before
    /// its expiry, by the [expiry notices](crate::notices) task.
    #[serde(rename = "personalAccessToken.expiring")]
    Expiring,
    /// It has expired: sent once per token by the [expiry notices](crate::notices) task.
    #[serde(rename = "personalAccessToken.expired")]
    Expired,
    /// A secret a rotation replaced was presented after its grace period (see
    /// [`crate::reuse`]): the request was refused, and under
    /// [`ReusePolicy::RevokeFamily`](crate::ReusePolicy::RevokeFamily) the token was revoked. The
    /// event carries `reuse: {clientAddress, supersededAt, revoked}`; no
    /// `personalAccessToken.revoked` is sent for this revocation. Sent by the layer
    /// ([`PatAuthLayerBuilder::reuse_events`](crate::PatAuthLayerBuilder::reuse_events)).
    #[serde(rename = "personalAccessToken.reused")]
    Reused,
}

impl EventKind {
    /// Whether a webhook posts events of this kind from its alerts queue, ahead of the others: a
    /// token made, revoked, deleted, reported leaked, about to expire or expired, and purges.
    /// Each happens at most once per token (or per purge run; the expiry notices again only once
    /// the token's expiry is moved later, which a token cannot do to itself, see
    /// [`crate::notices`]), so a caller cannot make them faster than tokens can be made: a flood of the others (renames, rotations, disabling and
    /// enabling, which a caller with write access can repeat at will) cannot crowd them out.
    /// `reused` is routine as a kind (a token's holder can rotate and present the old secret
    /// again and again); the one reuse that revokes the token is an alert
    /// ([`TokenEvent::is_alert`]). (Every kind is classified here: a new one must be.)
    pub fn is_alert(self) -> bool {
        match self {
            Self::Created
            | Self::Revoked
            | Self::Deleted
            | Self::Leaked
            | Self::Expiring
            | Self::Expired
            | Self::Purged => true,
            Self::Updated | Self::Rotated | Self::Disabled | Self::Enabled | Self::Reused => false,
        }
    }

    /// The name on the wire, such as `personalAccessToken.created`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "personalAccessToken.created",
            Self::Updated => "personalAccessToken.updated",
            Self::Rotated => "personalAccessToken.rotated",
            Self::Revoked => "personalAccessToken.revoked",
            Self::Deleted => "personalAccessToken.deleted",
            Self::Disabled => "personalAccessToken.disabled",
            Self::Enabled => "personalAccessToken.enabled",
            Self::Purged => "personalAccessToken.purged",
            Self::Leaked => "personalAccessToken.leaked",
            Self::Expiring => "personalAccessToken.expiring",
            Self::Expired => "personalAccessToken.expired",
            Self::Reused => "personalAccessToken.reused",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether `queue` may take an event its sender can keep for later
/// ([`TokenEvents::try_publish`]): while, with it taken, at least half of the queue stays free
/// for the events that cannot wait (one of two, two of four or five), or when the queue is empty
/// (a queue of one must not starve them: it is then theirs while they wait).
pub(crate) fn room_to_defer<T>(queue: &tokio::sync::mpsc::Sender<T>) -> bool {
    let (free, max) = (queue.capacity(), queue.max_capacity());
    free > max.div_ceil(2) || free == max
}

/// A Tokio channel as a sink: `try_send`, so a full channel drops the event (with a warning)
/// rather than delay the request.
impl TokenEvents for tokio::sync::mpsc::Sender<TokenEvent> {
    fn publish(&self, event: TokenEvent) {
        if let Err(e) = self.try_send(event) {
            tracing::warn!(error = %e, "token event dropped");
        }
    }

    /// Sends while the channel keeps half its room free for the events that cannot wait (or is
    /// empty), else `false`.
    fn try_publish(&self, event: TokenEvent) -> bool {
        room_to_defer(self) && self.try_send(event).is_ok()
    }
}

impl<T: TokenEvents + ?Sized> TokenEvents for std::sync::Arc<T> {
    fn publish(&self, event: TokenEvent) {
        (**self).publish(event);
    }

    fn publish_purge(&self, event: PurgeEvent) {
        (**self).publish_purge(event);
    }

    fn try_publish(&self, event: TokenEvent) -> bool {
        (**self).try_publish(event)
    }
}

#[cfg(test)]
mod tests {
    use super::room_to_defer;

    /// How many events a sender that can keep them for later puts in an empty queue of each
    /// size: never the last half (so events that cannot wait find room), never none (a queue of
    /// one would starve them).
    #[test]
    fn deferrable_events_leave_half_the_queue_free_and_never_starve() {
        for (max, taken) in [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (1024, 512)] {
            let (tx, _rx) = tokio::sync::mpsc::channel::<()>(max);
            let mut n = 0;
            while room_to_defer(&tx) {
                tx.try_send(()).unwrap();
                n += 1;
            }
            assert_eq!(n, taken, "a queue of {max}");
            // What is left takes the events that cannot wait.
            for _ in n..max {
                tx.try_send(()).unwrap();
            }
        }
    }
}
