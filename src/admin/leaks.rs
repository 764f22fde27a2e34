//! Leaked-token reports (feature `secret-scanning`): `POST <base>/leak-reports` takes a
//! secret-scanning alert in GitHub's partner format, verifies its ECDSA P-256 signature with a
//! configured public key, and revokes every token it names.
//!
//! The request is `[{"token", "type", "url", "source"}, …]`, signed over the raw body: the
//! base64 of an ASN.1 DER ECDSA P-256 SHA-256 signature in `GITHUB-PUBLIC-KEY-SIGNATURE`, made by
//! the key named in `GITHUB-PUBLIC-KEY-IDENTIFIER`. The keys are configured
//! ([`LeakReports::public_key`]); nothing is fetched at run time. The answer is one
//! `{"token_hash", "token_type", "label"}` per entry, in order, where `token_hash` is the hex
//! SHA-256 of the reported string (never the string itself) and `label` is `true_positive` for a
//! token of this deployment (revoked now, or already) and `false_positive` for anything else.
//! (Without a pepper, `token_hash` is also the hash the store keeps; the scanner sent the token
//! itself, so it learns nothing from it, and nobody else sees the answer.)
//!
//! A store failure midway answers 500 after revoking the entries before it; the scanner's retry
//! finds those already revoked (`true_positive`, no second event) and goes on.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use axum::extract::{FromRequest, State};
use axum::response::Response;
use base64ct::{Base64, Encoding};
use chrono::{DateTime, Utc};
use http::{HeaderMap, StatusCode};
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody, PayloadTooLarge, StoreFailed};
use super::events::{EventKind, LeakSource, TokenEvent};
use super::routes::{Admin, RequestBody, TAG};
use super::view::{TokenView, json};
use crate::token::TokenHasher;

/// The path of the endpoint, relative to where the management API is nested.
pub(crate) const PATH: &str = "/leak-reports";

/// The header naming the public key a report is signed with.
pub const KEY_IDENTIFIER_HEADER: &str = "github-public-key-identifier";
/// The header holding a report's signature: base64 of an ASN.1 DER ECDSA P-256 SHA-256 signature
/// over the raw body.
pub const KEY_SIGNATURE_HEADER: &str = "github-public-key-signature";

/// The default of [`LeakReports::max_entries`].
const DEFAULT_MAX_ENTRIES: usize = 1000;
/// The default of [`LeakReports::max_body_bytes`].
const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// How long a report's body may take to arrive, by default.
const DEFAULT_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The longest DER encoding of a P-256 ECDSA signature (two 33-byte integers and their headers).
const MAX_DER_SIGNATURE: usize = 72;

/// The configuration of the leaked-token report endpoint: the public keys its reports may be
/// signed with, and its limits. Hand it to
/// [`AdminConfig::leak_reports`](super::AdminConfig::leak_reports).
///
/// ```
/// use tower_pat::admin::LeakReports;
///
/// # fn main() -> Result<(), tower_pat::admin::InvalidPublicKey> {
/// let pem = "-----BEGIN PUBLIC KEY-----
/// MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEXOpw6qjcqsauqveNqG5RBCU6yV7A
/// +DHWhS3iZmoc6Frn0Ni0n1HRPgI5/LWEm9lOJGcmfUpU7HP1GzeKhtjpQA==
/// -----END PUBLIC KEY-----";
/// let reports = LeakReports::new()
///     .public_key("90a421169f0a406205f1563a953312f0be898d3c7b6c06b681aa86a874555f4a", pem)?
///     .max_entries(500);
/// assert_eq!(reports.key_ids().count(), 1);
/// assert!(LeakReports::new().public_key("k", "not a key").is_err());
/// # Ok(())
/// # }
/// ```
#[must_use]
#[derive(Clone)]
pub struct LeakReports {
    keys: Vec<(String, VerifyingKey)>,
    pub(crate) max_entries: usize,
    pub(crate) max_body_bytes: usize,
    body_timeout: std::time::Duration,
}

impl fmt::Debug for LeakReports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeakReports")
            .field(
                "key_ids",
                &self.keys.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            )
            .field("max_entries", &self.max_entries)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("body_timeout", &self.body_timeout)
            .finish()
    }
}

impl Default for LeakReports {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a public key given to [`LeakReports::public_key`] was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidPublicKey {
    /// The key identifier is empty or not a visible ASCII header value.
    Identifier,
    /// The key is not a P-256 public key in PEM (`-----BEGIN PUBLIC KEY-----`, SubjectPublicKeyInfo).
    Pem {
        /// The key's identifier.
        id: String,
    },
}

impl fmt::Display for InvalidPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Identifier => {
                f.write_str("a public key identifier must be non-empty visible ASCII")
            }
            Self::Pem { id } => write!(
                f,
                "public key {id}: not an ECDSA P-256 public key in PEM (\"BEGIN PUBLIC KEY\") form"
            ),
        }
    }
}

impl std::error::Error for InvalidPublicKey {}

impl LeakReports {
    /// No keys yet (every report is refused with 401 until one is added), at most 1000 entries
    /// per report, bodies of at most 1 MiB.
    pub fn new() -> Self {
        Self {
            keys: Vec::new(),
            max_entries: DEFAULT_MAX_ENTRIES,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            body_timeout: DEFAULT_BODY_TIMEOUT,
        }
    }

    /// Accepts reports signed by the key `id` (the `GITHUB-PUBLIC-KEY-IDENTIFIER` value), given
    /// as PEM (`-----BEGIN PUBLIC KEY-----`, as GitHub publishes them). A key added again under
    /// the same identifier replaces the earlier one.
    ///
    /// # Errors
    ///
    /// [`InvalidPublicKey`] if the identifier is empty or not visible ASCII, or the PEM is not an
    /// ECDSA P-256 public key.
    pub fn public_key(
        mut self,
        id: impl Into<String>,
        pem: &str,
    ) -> Result<Self, InvalidPublicKey> {
        let id = id.into();
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidPublicKey::Identifier);
        }
        let key = VerifyingKey::from_public_key_pem(pem.trim())
            .map_err(|_| InvalidPublicKey::Pem { id: id.clone() })?;
        self.keys.retain(|(known, _)| *known != id);
        self.keys.push((id, key));
        Ok(self)
    }

    /// The most entries one report may have; a longer report is refused with 400 and changes
    /// nothing. Each entry of this deployment's format costs a store lookup (one more per
    /// previous pepper) and at most one revocation. Default 1000; at least 1.
    pub fn max_entries(mut self, max: usize) -> Self {
        self.max_entries = max.max(1);
        self
    }

    /// The largest report body read, in bytes; a larger one is a 413, before its signature is
    /// verified (but after its headers name a configured key and a well-formed signature: a
    /// request without them is a 401 before its body is read; see also
    /// [`body_timeout`](Self::body_timeout)). Default 1 MiB.
    pub fn max_body_bytes(mut self, max: usize) -> Self {
        self.max_body_bytes = max;
        self
    }

    /// How long a report's body may take to arrive once its headers named a configured key and
    /// a well-formed signature; a slower one is a 408. This route has no token in front of it,
    /// and GitHub's key identifiers are public: anyone can send headers that pass the first
    /// check, so a body that trickles in must not hold the server for long. Default 10 s.
    pub fn body_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.body_timeout = timeout;
        self
    }

    /// The identifiers of the configured keys.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(id, _)| id.as_str())
    }

    /// The key and signature the headers name: a configured key, a base64 DER signature. Read
    /// before the body, so that a request without them costs no body read.
    fn signer(&self, headers: &HeaderMap) -> Result<(&VerifyingKey, Signature), ApiError> {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .ok_or_else(ApiError::bad_signature)
        };
        let id = header(KEY_IDENTIFIER_HEADER)?;
        let key = self
            .keys
            .iter()
            .find(|(known, _)| known == id)
            .map(|(_, key)| key)
            .ok_or_else(ApiError::bad_signature)?;
        let mut der = [0u8; MAX_DER_SIGNATURE];
        let der = Base64::decode(header(KEY_SIGNATURE_HEADER)?, &mut der)
            .map_err(|_| ApiError::bad_signature())?;
        let signature = Signature::from_der(der).map_err(|_| ApiError::bad_signature())?;
        Ok((key, signature))
    }
}

/// One entry of a report, in GitHub's secret-scanning partner format.
#[derive(Deserialize, ToSchema)]
pub(crate) struct LeakedToken {
    /// The string found: perhaps one of this deployment's tokens.
    token: String,
    /// The token type the scanner registered for the pattern that matched.
    #[serde(rename = "type", default)]
    token_type: String,
    /// The public location of the leak.
    #[serde(default)]
    url: String,
    /// Where the scanner found it (`content`, `commit`, …).
    #[serde(default)]
    source: String,
}

/// The answer for one entry, in GitHub's secret-scanning partner format.
#[derive(Serialize, ToSchema)]
pub(crate) struct LeakLabel {
    /// The hex SHA-256 of the reported string (the string itself is never answered).
    token_hash: String,
    /// The entry's `type`, repeated.
    token_type: String,
    /// `true_positive`: a token of this deployment, revoked now or before. `false_positive`:
    /// anything else.
    #[schema(pattern = "^(true_positive|false_positive)$")]
    label: &'static str,
}

/// Report leaked tokens (GitHub secret scanning partner program).
///
/// Not authenticated by a token: the ECDSA P-256 signature over the raw body, by a configured key,
/// is the only authentication. A missing or bad signature, or an unknown key, is a 401 and
/// nothing is read or changed. Every entry that is a token of this deployment (its format and
/// checksum, then its record, a secret in its rotation grace period included) is revoked at once
/// for every node, and `personalAccessToken.leaked` is emitted with the report's `url` and
/// `source`; a token already revoked is answered `true_positive` without another event. Anything
/// else is `false_positive`, and a string that is not of this format costs no store lookup.
/// Replaying a report changes nothing more.
#[utoipa::path(
    post,
    path = "/leak-reports",
    tag = TAG,
    params(
        ("GITHUB-PUBLIC-KEY-IDENTIFIER" = String, Header, description = "The identifier of the configured public key that signed the body"),
        ("GITHUB-PUBLIC-KEY-SIGNATURE" = String, Header, description = "Base64 of the ASN.1 DER ECDSA P-256 SHA-256 signature over the raw body"),
    ),
    request_body = Vec<LeakedToken>,
    responses(
        (status = 200, description = "One label per entry, in order; matching tokens are revoked", body = Vec<LeakLabel>),
        (status = 400, description = "The body is not a JSON array of entries with a string `token`, or has more entries than the configured maximum (nothing is revoked)", body = ErrorBody),
        (status = 401, description = "The signature is missing, malformed, by an unknown key (refused before the body is read) or not over this body (nothing is revoked)", body = ErrorBody),
        (status = 408, description = "The body did not arrive within the configured time (nothing is revoked)", body = ErrorBody),
        (status = 413, response = PayloadTooLarge),
        (status = 500, response = StoreFailed),
    ),
    security(())
)]
pub(crate) async fn report(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let Some(config) = &admin.config().leak_reports else {
        return Err(ApiError::bad_signature());
    };
    // The headers first: an unsigned request or an unknown key is refused before its body is
    // read (this route has no token in front of it).
    let (key, signature) = config.signer(&headers)?;
    let read = RequestBody::from_request(request, &());
    let RequestBody(body) = tokio::time::timeout(config.body_timeout, read)
        .await
        .map_err(|_| ApiError::body_timeout())??;
    key.verify(&body, &signature)
        .map_err(|_| ApiError::bad_signature())?;
    let entries: Vec<LeakedToken> = serde_json::from_slice(&body).map_err(|e| {
        // The parser's message may quote a value of the body: only its position is answered.
        ApiError::bad_request(format!(
            "the body is not a JSON array of {{\"token\", \"type\", \"url\", \"source\"}} \
             (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    if entries.len() > config.max_entries {
        return Err(ApiError::bad_request(format!(
            "a report may have at most {} entries",
            config.max_entries
        )));
    }
    let now = crate::record::now();
    let mut labels: HashMap<&str, bool> = HashMap::with_capacity(entries.len());
    for entry in &entries {
        if !labels.contains_key(entry.token.as_str()) {
            let ours = leaked(&admin, entry, now).await?;
            labels.insert(&entry.token, ours);
        }
    }
    let sha256 = TokenHasher::sha256();
    let answer: Vec<LeakLabel> = entries
        .iter()
        .map(|entry| LeakLabel {
            token_hash: sha256.hash(&entry.token).to_hex(),
            token_type: entry.token_type.clone(),
            label: if labels[entry.token.as_str()] {
                "true_positive"
            } else {
                "false_positive"
            },
        })
        .collect();
    Ok(json(StatusCode::OK, &answer))
}

/// Revokes the token `entry` names, if it is one of this deployment's, and says whether it is.
async fn leaked(admin: &Admin, entry: &LeakedToken, now: DateTime<Utc>) -> Result<bool, ApiError> {
    let config = admin.config();
    let token = entry.token.as_str();
    if config.tokens.format().check(token).is_err() {
        return Ok(false);
    }
    let hasher = config.tokens.hasher();
    let mut found = config.store.find_by_hash(&hasher.hash(token)).await?;
    for previous in hasher.previous_hashes(token) {
        if found.is_some() {
            break;
        }
        found = config.store.find_by_hash(&previous).await?;
    }
    let Some(record) = found else {
        return Ok(false);
    };
    if record.is_revoked() {
        return Ok(true);
    }
    // The one revocation path: conditional and atomic in the store, which drops every cache
    // entry for the token (on every node, for stores with a change feed) before it returns.
    let Some(revoked) = config.store.revoke(&record.id, now).await? else {
        // Deleted meanwhile: it was ours, and it works no more.
        return Ok(true);
    };
    if revoked.revoked_by_write_at(now) {
        // This call revoked it (a concurrent report or revocation did not): one event.
        let view = TokenView::new(&revoked, now);
        tracing::warn!(
            target: "tower_pat::admin",
            event = EventKind::Leaked.as_str(),
            token_id = %view.id,
            subject = %view.subject,
            url = %entry.url,
            source = %entry.source,
            "leaked token revoked"
        );
        admin.publish(
            TokenEvent::new(EventKind::Leaked, view, now)
                .with_leak(LeakSource::new(&*entry.url, &*entry.source)),
        );
    }
    Ok(true)
}
