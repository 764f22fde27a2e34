//! What the management API shows of a token: [`TokenView`] (never the secret or its hash), and
//! [`IssuedToken`], the view plus the secret, returned once by create and rotate.

use std::net::IpAddr;

use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Duration, Utc};
use http::{HeaderValue, StatusCode, header};
use ipnet::IpNet;
use serde::{Deserialize, Serialize, Serializer};
use utoipa::ToSchema;

use crate::record::TokenRecord;
use crate::scope::ScopeSet;
use crate::token::TokenSecret;

/// How close to its expiry a token is flagged [`ExpiryWarning::ExpiresSoon`].
pub const EXPIRY_WARNING_WINDOW: Duration = Duration::days(7);

/// A token as the management API and its events show it (camelCase JSON). It never holds the
/// secret or its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct TokenView {
    /// The token's id.
    pub id: String,
    /// Its name, unique per subject.
    pub name: String,
    /// The non-secret beginning of the token (prefix and four characters).
    pub start: String,
    /// The owner.
    pub subject: String,
    /// The owner again, under the name some clients read.
    pub user_id: String,
    /// The token type (`personal` unless set).
    #[serde(rename = "type")]
    pub token_type: String,
    /// Granted scopes.
    #[schema(value_type = Vec<String>)]
    pub scopes: ScopeSet,
    /// Client networks (CIDR) the token may be used from; empty for anywhere.
    #[schema(value_type = Vec<String>)]
    pub ip_restriction: Vec<IpNet>,
    /// When the token was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// When it stops working; `null` for never.
    pub expires_at: Option<DateTime<Utc>>,
    /// Neither revoked, disabled nor expired.
    pub active: bool,
    /// Whether it is disabled (reversibly: PATCH `active`).
    pub disabled: bool,
    /// Since when it is disabled.
    pub disabled_at: Option<DateTime<Utc>>,
    /// Whether it was revoked.
    pub revoked: bool,
    /// When it was revoked.
    pub revoked_at: Option<DateTime<Utc>>,
    /// `expires-soon` within seven days of the expiry, `expired` after it, else `null`.
    pub expiry_warning: Option<ExpiryWarning>,
    /// When it was last used (written behind, so it may lag a little).
    pub last_used_at: Option<DateTime<Utc>>,
    /// `lastUsedAt` again, under the name some clients read.
    pub seen_at: Option<DateTime<Utc>>,
    /// The most recent client addresses, newest first.
    #[schema(value_type = Vec<String>)]
    pub last_used_ips: Vec<IpAddr>,
    /// When the secret was last rotated.
    pub last_rotated_at: Option<DateTime<Utc>>,
}

/// The `expiryWarning` of a [`TokenView`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ExpiryWarning {
    /// The token expires within [`EXPIRY_WARNING_WINDOW`].
    ExpiresSoon,
    /// The token has expired.
    Expired,
}

impl TokenView {
    /// The view of `record` at `now` (which decides `active` and `expiryWarning`).
    pub fn new(record: &TokenRecord, now: DateTime<Utc>) -> Self {
        let expiry_warning = match record.expires_at {
            Some(at) if at <= now => Some(ExpiryWarning::Expired),
            Some(at) if at - now <= EXPIRY_WARNING_WINDOW => Some(ExpiryWarning::ExpiresSoon),
            _ => None,
        };
        Self {
            id: record.id.clone(),
            name: record.name.clone(),
            start: record.start.clone(),
            subject: record.subject.clone(),
            user_id: record.subject.clone(),
            token_type: record.token_type.clone(),
            scopes: record.scopes.clone(),
            ip_restriction: record.ip_restriction.clone(),
            created_at: record.created_at,
            updated_at: record.updated_at,
            expires_at: record.expires_at,
            active: record.is_active_at(now),
            disabled: record.is_disabled(),
            disabled_at: record.disabled_at,
            revoked: record.is_revoked(),
            revoked_at: record.revoked_at,
            expiry_warning,
            last_used_at: record.last_used_at,
            seen_at: record.last_used_at,
            last_used_ips: record.last_used_ips.clone(),
            last_rotated_at: record.last_rotated_at,
        }
    }

    /// Moves `lastUsedAt` (and `seenAt`) forward to `at` if it is later: a use this process knows
    /// of and the store does not yet.
    pub fn with_used_at(mut self, at: Option<DateTime<Utc>>) -> Self {
        if at > self.last_used_at {
            self.last_used_at = at;
            self.seen_at = at;
        }
        self
    }
}

/// The answer to create and rotate: the token's view plus its secret, under the three names the
/// clients of the seed APIs read (`token`, `secret`, `accessToken`). This is the only time the
/// secret is shown.
// `Debug` does not print the secret (see `ShownSecret`).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct IssuedToken {
    #[serde(flatten)]
    pub(crate) view: TokenView,
    /// The secret: show it to its owner now, it cannot be read again.
    #[schema(value_type = String)]
    pub(crate) token: ShownSecret,
    /// The secret again.
    #[schema(value_type = String)]
    pub(crate) secret: ShownSecret,
    /// The secret again.
    #[schema(value_type = String)]
    pub(crate) access_token: ShownSecret,
    /// After a rotation with a grace period: until when the previous secret keeps working.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) previous_token_valid_until: Option<DateTime<Utc>>,
}

impl IssuedToken {
    pub(crate) fn new(view: TokenView, secret: &TokenSecret) -> Self {
        Self {
            view,
            token: ShownSecret(secret.clone()),
            secret: ShownSecret(secret.clone()),
            access_token: ShownSecret(secret.clone()),
            previous_token_valid_until: None,
        }
    }
}

/// A secret that serializes in clear text (into a create or rotate response only) and stays
/// redacted in `Debug`.
#[derive(Debug, Clone)]
pub(crate) struct ShownSecret(TokenSecret);

impl Serialize for ShownSecret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.expose_secret())
    }
}

/// The answer to DELETE.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct Deleted {
    /// `Personal access token revoked`.
    pub(crate) message: &'static str,
    /// 200.
    pub(crate) status: u16,
}

impl Deleted {
    pub(crate) const OK: Self = Self {
        message: "Personal access token revoked",
        status: 200,
    };
}

/// A JSON response that no cache keeps (`Cache-Control: no-store`: it may hold a secret).
pub(crate) fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut res = (status, body).into_response();
            let headers = res.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            res
        }
        Err(e) => {
            tracing::error!(error = %e, "could not serialize a management API response");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}
