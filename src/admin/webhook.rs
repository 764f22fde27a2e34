//! [`WebhookSink`]: posts [`TokenEvent`]s (and [`PurgeEvent`]s) to a URL as signed JSON, from a bounded queue, with
//! retries and backoff, without ever delaying the API call that caused them.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;
use tokio::sync::mpsc;

use super::events::{EventKind, PurgeEvent, TokenEvent, TokenEvents};
use crate::token::TokenHash;

/// The header holding `sha256=<hex HMAC-SHA256 of "<timestamp>.<body>" under the shared secret>`,
/// where `<timestamp>` is the [`TIMESTAMP_HEADER`] value exactly as sent.
pub const SIGNATURE_HEADER: &str = "x-signature";
/// The header holding the Unix time (seconds) of the delivery attempt; it is covered by the
/// signature.
pub const TIMESTAMP_HEADER: &str = "x-timestamp";
/// The header holding the event name, such as `personalAccessToken.created`.
pub const EVENT_HEADER: &str = "x-event";

/// Posts change events to a webhook URL.
///
/// Each event is serialized and queued by [`TokenEvents::publish`] with `try_send`: a full queue
/// drops the event (counted in [`WebhookSink::dropped`] and logged), so the API call never waits.
///
/// There are two queues, each of [`queue_capacity`](WebhookBuilder::queue_capacity), and the
/// first is always posted first: the **alerts** ([`TokenEvent::is_alert`]: `created`, `revoked`,
/// `deleted`, `leaked`, `expiring`, `expired`, `purged`, and the `reused` that revokes a token),
/// each at most once per token (an expiry notice again only after the expiry was moved later),
/// which a caller can only make as fast as the creation rate limit lets tokens be made, and the
/// **routine** rest (`updated`, `rotated`, `disabled`, `enabled`, other `reused` reports), which
/// a token's holder can repeat at will. A flood of routine events (a token renamed in a loop
/// against a slow receiver) fills only its own queue: it cannot push out the event of a new
/// token, a revocation, a reused secret, or an expiry notice. An expiry notice is queued with
/// [`TokenEvents::try_publish`], and only while, with it taken, at least half of the alerts queue
/// stays free: one it cannot take is not dropped but left for the next notice run, and a backlog
/// of notices never fills the room a revocation or a leak report needs. (With the creation rate
/// limit turned off, nothing bounds the alerts either.)
///
/// Events therefore do not always arrive in the order they happened: a `rotated` or `updated`
/// event may come after the `revoked` or `deleted` that followed it. A receiver that keeps a
/// token's state orders its events by `triggeredAt`, not by arrival, and treats `deleted` as
/// final.
///
/// A background task posts the queues in order as `application/json` with `X-Timestamp: <Unix
/// seconds>`, `X-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">` and `X-Event`; a
/// failed delivery (connection error, timeout, 408, 429 or 5xx) is retried with exponential
/// backoff, each attempt with a fresh timestamp and signature. Plain `http://` only. The task ends
/// when every clone of the sink is dropped and the queue is drained.
///
/// # Verifying a delivery (the receiver's side)
///
/// The signed message is the `X-Timestamp` header value exactly as received, a `.`, then the raw
/// request body (before any JSON parsing), the scheme Stripe- and GitHub-style receivers use. A
/// receiver:
///
/// 1. computes `HMAC-SHA256(secret, timestamp + "." + body)` and compares it with the hex after
///    `sha256=` in `X-Signature` **in constant time** (never with `==` on strings);
/// 2. refuses a timestamp further than a tolerance (5 minutes is usual) from its own clock: a
///    captured delivery replayed later fails here, and replaying it with a fresh `X-Timestamp`
///    fails step 1, because the timestamp is signed;
/// 3. to refuse a replay *within* the tolerance too, remembers the `X-Signature` values it
///    accepted during the last tolerance window and refuses a repeat. (A retry of the same event
///    carries a new timestamp and signature; deduplicate events by their content, such as
///    `event`, `data.id` and `triggeredAt`, if handling one twice matters.)
///
/// In Rust, [`verify_signature`] does steps 1 and 2.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_pat::admin::WebhookSink;
///
/// let sink = WebhookSink::builder("http://127.0.0.1:9000/hooks/pat", b"shared secret")?
///     .queue_capacity(1024)
///     .spawn();
/// # let _ = sink;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct WebhookSink {
    /// The alerts' queue, posted first.
    alerts: mpsc::Sender<Delivery>,
    /// Every other event's.
    routine: mpsc::Sender<Delivery>,
    stats: Arc<Stats>,
}

/// Configures a [`WebhookSink`]; [`WebhookBuilder::spawn`] starts it.
#[must_use]
pub struct WebhookBuilder {
    url: Uri,
    key: Hmac<Sha256>,
    queue_capacity: usize,
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    timeout: Duration,
}

impl fmt::Debug for WebhookBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only where it goes: a URL's user info, path or query may be a credential (a receiver
        // that authenticates by a secret path).
        let port = self.url.port().map(|p| format!(":{p}")).unwrap_or_default();
        let host = self.url.host().unwrap_or_default();
        f.debug_struct("WebhookBuilder")
            .field("url", &format_args!("http://{host}{port}/<redacted>"))
            .field("key", &"[redacted]")
            .field("queue_capacity", &self.queue_capacity)
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Why a webhook sink was refused: its URL, or an empty signing secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidWebhookUrl(&'static str);

impl fmt::Display for InvalidWebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for InvalidWebhookUrl {}

#[derive(Debug, Default)]
struct Stats {
    delivered: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
}

struct Delivery {
    event: &'static str,
    body: Bytes,
}

impl WebhookSink {
    /// A sink posting to `url` (`http://host:port/path`) and signing with `secret`, which must
    /// not be empty (a receiver could not tell its events from anyone's).
    pub fn builder(
        url: &str,
        secret: impl AsRef<[u8]>,
    ) -> Result<WebhookBuilder, InvalidWebhookUrl> {
        let url: Uri = url
            .parse()
            .map_err(|_| InvalidWebhookUrl("the webhook URL is not a valid URI"))?;
        if url.scheme_str() != Some("http") || url.host().is_none() {
            return Err(InvalidWebhookUrl(
                "the webhook URL must be an absolute http:// URL",
            ));
        }
        if secret.as_ref().is_empty() {
            return Err(InvalidWebhookUrl(
                "the webhook signing secret must not be empty",
            ));
        }
        Ok(WebhookBuilder {
            url,
            key: <Hmac<Sha256> as Mac>::new_from_slice(secret.as_ref())
                .expect("HMAC accepts keys of any length"),
            queue_capacity: 1024,
            max_attempts: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
        })
    }

    /// Events posted with a 2xx answer.
    pub fn delivered(&self) -> u64 {
        self.stats.delivered.load(Ordering::Relaxed)
    }

    /// Events given up after the last attempt (or refused with a 4xx other than 408 and 429).
    pub fn failed(&self) -> u64 {
        self.stats.failed.load(Ordering::Relaxed)
    }

    /// Events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.stats.dropped.load(Ordering::Relaxed)
    }

    /// Events waiting in the queues.
    pub fn queued(&self) -> usize {
        [&self.alerts, &self.routine]
            .iter()
            .map(|tx| tx.max_capacity() - tx.capacity())
            .sum()
    }
}

impl WebhookSink {
    /// Serializes and queues one event; `token_id` (none for a purge) only names it in the log
    /// line of a drop. Whether it was queued. A `deferrable` event (an expiry notice, which the
    /// caller keeps: [`TokenEvents::try_publish`]) is queued only while half of its queue stays
    /// free ([`room_to_defer`](super::events::room_to_defer)), and one that is not queued is not
    /// counted or logged as dropped: a backlog of notices, offered again by every run until it is
    /// sent, must not keep the alerts queue full, where a revocation or a leak report, which
    /// cannot wait for a later run, would be dropped. Any other event is dropped (counted and
    /// logged) when its queue is full.
    fn enqueue(
        &self,
        kind: EventKind,
        alert: bool,
        event: &impl serde::Serialize,
        token_id: Option<&str>,
        deferrable: bool,
    ) -> bool {
        let queue = if alert { &self.alerts } else { &self.routine };
        if deferrable && !super::events::room_to_defer(queue) {
            return false;
        }
        let body = match serde_json::to_vec(event) {
            Ok(body) => Bytes::from(body),
            Err(e) => {
                tracing::error!(error = %e, "could not serialize a token event");
                return false;
            }
        };
        let delivery = Delivery {
            event: kind.as_str(),
            body,
        };
        if queue.try_send(delivery).is_ok() {
            return true;
        }
        if !deferrable {
            let dropped = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(
                event = kind.as_str(),
                token_id,
                dropped,
                "webhook queue full or closed; token event dropped"
            );
        }
        false
    }
}

impl TokenEvents for WebhookSink {
    fn publish(&self, event: TokenEvent) {
        self.enqueue(
            event.event,
            event.is_alert(),
            &event,
            Some(&event.data.id),
            false,
        );
    }

    fn publish_purge(&self, event: PurgeEvent) {
        self.enqueue(event.event, event.event.is_alert(), &event, None, false);
    }

    /// Queues the event if its queue keeps half its room free for the events that cannot wait
    /// (see [`WebhookSink`]); else answers `false` and counts nothing as
    /// [`dropped`](WebhookSink::dropped).
    fn try_publish(&self, event: TokenEvent) -> bool {
        self.enqueue(
            event.event,
            event.is_alert(),
            &event,
            Some(&event.data.id),
            true,
        )
    }
}

impl WebhookBuilder {
    /// How many events may wait in each of the two queues, alerts and routine (default 1024, at
    /// least 2: an expiry notice never takes the last half of the alerts queue); more are
    /// dropped.
    pub fn queue_capacity(mut self, capacity: usize) -> Self {
        self.queue_capacity = capacity.max(2);
        self
    }

    /// Attempts per event, the first included (default 5).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The wait before the first retry, doubled for each next one up to `max` (default 500 ms
    /// and 30 s).
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// How long one attempt may take (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Starts the delivery task.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub fn spawn(self) -> WebhookSink {
        let (alerts, alerts_rx) = mpsc::channel(self.queue_capacity);
        let (routine, routine_rx) = mpsc::channel(self.queue_capacity);
        let stats = Arc::new(Stats::default());
        let client = Client::builder(TokioExecutor::new()).build_http();
        let queues = (alerts_rx, routine_rx);
        tokio::spawn(deliver_all(self, client, queues, Arc::clone(&stats)));
        WebhookSink {
            alerts,
            routine,
            stats,
        }
    }

    /// `sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`.
    fn signature(&self, timestamp: &str, body: &[u8]) -> HeaderValue {
        let mut mac = self.key.clone();
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        let hex = TokenHash::hex_of(&mac.finalize().into_bytes());
        HeaderValue::try_from(format!("sha256={hex}")).expect("hex is a valid header value")
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Posts the alerts first, then the routine events, until every sender is gone and both queues
/// are drained.
async fn deliver_all(
    config: WebhookBuilder,
    client: HttpClient,
    (mut alerts, mut routine): (mpsc::Receiver<Delivery>, mpsc::Receiver<Delivery>),
    stats: Arc<Stats>,
) {
    loop {
        let delivery = tokio::select! {
            biased;
            Some(delivery) = alerts.recv() => delivery,
            Some(delivery) = routine.recv() => delivery,
            else => break,
        };
        let mut backoff = config.initial_backoff;
        for attempt in 1..=config.max_attempts {
            let outcome = attempt_once(&config, &client, &delivery).await;
            let retry = match outcome {
                Ok(status) if status.is_success() => {
                    stats.delivered.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Ok(status) => {
                    status.is_server_error()
                        || status == StatusCode::REQUEST_TIMEOUT
                        || status == StatusCode::TOO_MANY_REQUESTS
                }
                Err(_) => true,
            };
            if !retry || attempt == config.max_attempts {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    event = delivery.event,
                    attempts = attempt,
                    outcome = ?outcome,
                    "webhook delivery failed; event given up"
                );
                break;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(config.max_backoff);
        }
    }
}

async fn attempt_once(
    config: &WebhookBuilder,
    client: &HttpClient,
    delivery: &Delivery,
) -> Result<StatusCode, String> {
    let timestamp = Utc::now().timestamp().to_string();
    let signature = config.signature(&timestamp, &delivery.body);
    let request = Request::builder()
        .method(Method::POST)
        .uri(config.url.clone())
        .header(header::CONTENT_TYPE, "application/json")
        .header(
            header::USER_AGENT,
            concat!("tower-pat/", env!("CARGO_PKG_VERSION")),
        )
        .header(SIGNATURE_HEADER, signature)
        .header(TIMESTAMP_HEADER, timestamp)
        .header(EVENT_HEADER, delivery.event)
        .body(Full::new(delivery.body.clone()))
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(config.timeout, client.request(request)).await {
        Ok(Ok(response)) => Ok(response.status()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".to_owned()),
    }
}

/// Why [`verify_signature`] refused a delivery. Says nothing about the secret or the expected
/// signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignatureError {
    /// The timestamp is not a Unix time in seconds (1 to 19 ASCII digits).
    MalformedTimestamp,
    /// The signature is not `sha256=` followed by 64 hex digits.
    MalformedSignature,
    /// The signature does not match: another secret, or an altered body or timestamp.
    Mismatch,
    /// Correctly signed, but the timestamp is further from `now` than the tolerance: a replay, or
    /// a clock far off.
    Stale,
    /// The receiver's own secret is empty (an unset environment variable, say): anyone can sign
    /// with the empty key, so nothing is accepted under it, whatever the delivery. A
    /// [`WebhookSink`] refuses an empty secret too.
    EmptySecret,
}

impl fmt::Display for SignatureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::MalformedTimestamp => "the webhook timestamp is not a Unix time in seconds",
            Self::MalformedSignature => "the webhook signature is not sha256=<64 hex digits>",
            Self::Mismatch => "the webhook signature does not match",
            Self::Stale => "the webhook timestamp is outside the accepted tolerance",
            Self::EmptySecret => "the webhook secret is empty; no delivery is accepted under it",
        })
    }
}

impl std::error::Error for SignatureError {}

/// Verifies a [`WebhookSink`] delivery on the receiver's side: `signature` (the
/// [`SIGNATURE_HEADER`] value) must be the HMAC-SHA256 under `secret` of `timestamp` (the
/// [`TIMESTAMP_HEADER`] value, as received), `.` and the raw `body`, compared in constant time;
/// and `timestamp` must be within `tolerance` of `now`, in either direction. An empty `secret`
/// is refused ([`SignatureError::EmptySecret`]) before the delivery is read: a receiver whose
/// secret is unset would otherwise accept anything signed with the empty key.
///
/// Header values may be passed as `&str`, `&[u8]` or [`HeaderValue`]. This refuses a replay
/// older than `tolerance`; to refuse one within it, remember the signatures accepted during the
/// last `tolerance` and refuse a repeat (see [`WebhookSink`]).
///
/// ```
/// use std::time::Duration;
/// use tower_pat::admin::{SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature};
///
/// fn accept(secret: &[u8], headers: &http::HeaderMap, body: &[u8]) -> bool {
///     let (Some(timestamp), Some(signature)) =
///         (headers.get(TIMESTAMP_HEADER), headers.get(SIGNATURE_HEADER))
///     else {
///         return false;
///     };
///     let now = chrono::Utc::now();
///     verify_signature(secret, timestamp, body, signature, now, Duration::from_secs(300)).is_ok()
/// }
/// # assert!(!accept(b"k", &http::HeaderMap::new(), b"{}"));
/// ```
pub fn verify_signature(
    secret: impl AsRef<[u8]>,
    timestamp: impl AsRef<[u8]>,
    body: &[u8],
    signature: impl AsRef<[u8]>,
    now: DateTime<Utc>,
    tolerance: Duration,
) -> Result<(), SignatureError> {
    if secret.as_ref().is_empty() {
        return Err(SignatureError::EmptySecret);
    }
    let timestamp = timestamp.as_ref();
    if timestamp.is_empty() || timestamp.len() > 19 || !timestamp.iter().all(u8::is_ascii_digit) {
        return Err(SignatureError::MalformedTimestamp);
    }
    let sent: i64 = std::str::from_utf8(timestamp)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or(SignatureError::MalformedTimestamp)?;
    let given = signature
        .as_ref()
        .strip_prefix(b"sha256=")
        .and_then(|hex| std::str::from_utf8(hex).ok())
        .and_then(TokenHash::from_hex)
        .ok_or(SignatureError::MalformedSignature)?;
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_ref())
        .map_err(|_| SignatureError::Mismatch)?;
    mac.update(timestamp);
    mac.update(b".");
    mac.update(body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(given.as_bytes())
        .map_err(|_| SignatureError::Mismatch)?;
    if now.timestamp().abs_diff(sent) > tolerance.as_secs() {
        return Err(SignatureError::Stale);
    }
    Ok(())
}
