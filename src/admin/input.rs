//! The requests of the management API, parsed field by field from JSON (and the query string), so
//! that a field of the wrong type gets a 400 that names it, and the aliases the seed APIs' clients
//! send are accepted. These types are also the request schemas of the OpenAPI document.

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};

use super::error::ApiError;
use crate::record::{TokenRecord, parse_ip_net};
use crate::scope::{Scope, ScopeSet};
use crate::store::{LastUsedFilter, ListQuery, SortKey, StateFilter, TokenState};

pub(crate) use crate::record::MAX_NAME_CHARS;
/// The longest token type, in characters.
const MAX_TYPE_CHARS: usize = 64;
/// The largest page.
pub(crate) const MAX_PAGE_SIZE: u64 = 100;
/// The last page number a query may ask for (so that an offset always fits the stores' integers).
const MAX_PAGE: u64 = 10_000_000;

/// How many entries a token's `scopes` and `ipRestriction` may have (each request's list is
/// refused beyond, with a 400 naming the field). Every request on a token scans its networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// The most scopes.
    pub(crate) scopes: usize,
    /// The most networks.
    pub(crate) networks: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            scopes: 100,
            networks: 100,
        }
    }
}

/// `POST /`: a new token.
///
/// Every field is honoured or refused, never dropped: `revoked` may only be `false` and `active`
/// only `true` (a token cannot be created revoked or inactive), `subject`, `userId` and `ownerId`
/// may only name the caller's own subject, and an unknown field is a 400 naming it (a misspelt
/// `ip_restriction` would otherwise create an unrestricted token). Only the fields the server
/// sets (`id`, `secret`, `token`, `accessToken`, `start`, `createdAt`, `updatedAt`, `seenAt`,
/// `lastUsedAt`, `lastUsedIps`, `lastRotatedAt`, `revokedAt`, `expiryWarning`,
/// `previousTokenValidUntil`) are ignored, so a token read back may be sent as it is.
#[derive(Debug, Clone, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CreateTokenRequest {
    /// At most 256 characters, no control characters, not blank; unique among the caller's tokens
    /// (leading and trailing white space is trimmed). Alias: `description`.
    #[schema(min_length = 1, max_length = 256)]
    pub(crate) name: String,
    /// Scopes, each held by the caller (a token never exceeds its owner); none if left out. Alias:
    /// `scope`. A space-separated string is accepted too. At most 100 (configurable).
    #[schema(value_type = Option<Vec<String>>)]
    pub(crate) scopes: ScopeSet,
    /// RFC 3339, in the future, at most 9999-12-31T23:59:59Z, and no later than the caller's own
    /// expiry. Aliases: `expirationDate`, `expireAt`. Without it, the server's expiry policy
    /// applies: by default `userAwareTokenNeverExpires: true` is required; a default lifetime is
    /// cut to the caller's expiry.
    pub(crate) expires_at: Option<DateTime<Utc>>,
    /// The caller's acknowledgment that the token never expires (when `expiresAt` is left out);
    /// only a caller that never expires may create one.
    #[schema(value_type = Option<bool>)]
    pub(crate) user_aware_token_never_expires: bool,
    /// Client networks: one CIDR or address, several separated by commas, or an array of them; at
    /// most 100 (configurable). Each must lie within one of the caller's networks; without it the
    /// token gets the caller's networks (anywhere for an unrestricted caller).
    #[schema(value_type = Option<Vec<String>>)]
    pub(crate) ip_restriction: Vec<IpNet>,
    /// A free-form type, `personal` by default: at most 64 characters, no control characters,
    /// not blank (trimmed like the name).
    #[serde(rename = "type")]
    #[schema(value_type = Option<String>, min_length = 1, max_length = 64)]
    pub(crate) token_type: String,
    /// The subjects the request names (`subject`, `userId`, `ownerId`): each must be the caller's.
    #[schema(ignore)]
    pub(crate) owners: Vec<(&'static str, String)>,
}

/// `PATCH /{id}`: a JSON merge patch (RFC 7396). Fields left out stay as they are; `null` clears
/// `expiresAt` (with `userAwareTokenNeverExpires: true`), `ipRestriction` and `scopes`.
///
/// The caller must hold every scope the token holds, and the new scopes, expiry and networks must
/// be within the caller's own (so a token may narrow, never widen, itself). `type`, `subject`,
/// `userId` and `ownerId` cannot change: they are accepted only with the token's current value.
/// `active: false` disables the token and `active: true` enables it again (reversible);
/// `revoked: true` revokes it for good. Unknown fields are refused and server-set ones ignored, as
/// in a create.
#[derive(Debug, Clone, Default, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PatchTokenRequest {
    /// A new name, under the rules of a create's; it cannot be removed (`null`). Alias:
    /// `description`.
    #[schema(nullable = false, min_length = 1, max_length = 256)]
    pub(crate) name: Option<String>,
    /// New scopes, each held by the caller. Alias: `scope`. At most 100 (configurable).
    #[schema(value_type = Option<Vec<String>>)]
    pub(crate) scopes: Option<ScopeSet>,
    /// A new expiry (at most 9999-12-31T23:59:59Z), no later than the caller's, or `null` for
    /// never (which needs `userAwareTokenNeverExpires: true` under the default policy, and a
    /// caller that never expires). Aliases: `expirationDate`, `expireAt`.
    #[schema(value_type = Option<DateTime<Utc>>)]
    pub(crate) expires_at: Option<Option<DateTime<Utc>>>,
    /// Acknowledges a token that never expires.
    #[schema(value_type = Option<bool>)]
    pub(crate) user_aware_token_never_expires: bool,
    /// New client networks, each within one of the caller's, or `null` for anywhere (an
    /// unrestricted caller only). At most 100 (configurable).
    #[schema(value_type = Option<Vec<String>>)]
    pub(crate) ip_restriction: Option<Vec<IpNet>>,
    /// `true` revokes the token (the record is kept); `false` on a revoked token is refused.
    pub(crate) revoked: Option<bool>,
    /// `false` disables the token (refused by every layer with "the access token is disabled"
    /// until enabled again), `true` enables it; reversible, unlike `revoked`. `true` on an
    /// expired token is refused (409 `token_expired`); any `active` on a revoked token is 410.
    pub(crate) active: Option<bool>,
    /// `type`, accepted only as the token's current type.
    #[schema(ignore)]
    pub(crate) token_type: Option<String>,
    /// `subject`, `userId`, `ownerId`: accepted only as the token's subject.
    #[schema(ignore)]
    pub(crate) owners: Vec<(&'static str, String)>,
}

/// `POST /{id}/rotate`: the body is optional.
///
/// A rotation hands the caller the token's new secret, so the caller must hold every scope the
/// token holds, the token's networks must be within the caller's, and its expiry (the new one, if
/// given) no later than the caller's. Name, scopes, type and networks carry over: sending them is
/// refused (PATCH the token first); so are `revoked: true`, `active: false`, a `subject`,
/// `userId` or `ownerId` other than the token's, and unknown fields.
#[derive(Debug, Clone, Default, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RotateTokenRequest {
    /// How long the previous secret keeps working, in seconds (default 0: it stops at once). At
    /// most the server's configured maximum (86 400 by default; the document a server serves
    /// states its own); more is refused.
    pub(crate) grace_period_seconds: Option<u64>,
    /// A new expiry (RFC 3339, in the future, at most 9999-12-31T23:59:59Z, no later than the
    /// caller's); the current one is
    /// kept without it. Aliases: `expirationDate`, `expireAt`.
    pub(crate) expires_at: Option<DateTime<Utc>>,
    /// `subject`, `userId`, `ownerId`: accepted only as the token's subject.
    #[schema(ignore)]
    pub(crate) owners: Vec<(&'static str, String)>,
}

/// `GET /`: which tokens, in which order, which page.
#[derive(Debug, Clone, Default, IntoParams)]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
pub(crate) struct ListParams {
    /// The page, from 1 (default 1) to 10 000 000.
    #[param(minimum = 1, maximum = 10_000_000)]
    pub(crate) page: Option<u64>,
    /// Tokens per page, 1–100 (default 50, or the server's configured page size).
    #[param(minimum = 1, maximum = 100)]
    pub(crate) limit: Option<u64>,
    /// The order.
    #[param(inline)]
    pub(crate) sort: Option<SortParam>,
    /// Only tokens whose name contains this text (case-insensitive).
    pub(crate) search: Option<String>,
    /// `never`: only tokens never used.
    #[param(inline)]
    pub(crate) last_used: Option<LastUsedParam>,
    /// Only tokens not used since this time (RFC 3339); never-used ones included.
    pub(crate) last_used_before: Option<DateTime<Utc>>,
    /// Only tokens used after this time (RFC 3339); never-used ones excluded.
    pub(crate) last_used_after: Option<DateTime<Utc>>,
    /// Only tokens created after this time (RFC 3339).
    pub(crate) created_after: Option<DateTime<Utc>>,
    /// Only tokens created before this time (RFC 3339).
    pub(crate) created_before: Option<DateTime<Utc>>,
    /// Only tokens in this state now.
    #[param(inline)]
    pub(crate) state: Option<StateParam>,
    /// Another subject's tokens (needs `personalAccessToken:admin`).
    pub(crate) owner_id: Option<String>,
    /// The same as `ownerId` (GitLab's and GitHub's name). Filters combine: `ownerId` and
    /// `subject` naming two subjects match no token.
    pub(crate) subject: Option<String>,
}

/// The `state` values: exactly one holds for a token (revoked before disabled before expired).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) enum StateParam {
    /// Neither revoked, disabled nor expired.
    Active,
    /// Revoked.
    Revoked,
    /// Expired (and neither revoked nor disabled).
    Expired,
    /// Disabled (and not revoked).
    Disabled,
}

/// The `sort` values: a key, `-` first for descending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
pub(crate) enum SortParam {
    /// Oldest first (the default).
    #[serde(rename = "createdAt")]
    CreatedAt,
    /// Newest first.
    #[serde(rename = "-createdAt")]
    CreatedAtDesc,
    /// By name.
    #[serde(rename = "name")]
    Name,
    /// By name, reversed.
    #[serde(rename = "-name")]
    NameDesc,
    /// Least recently used first (never used before all).
    #[serde(rename = "lastUsedAt")]
    LastUsedAt,
    /// Most recently used first.
    #[serde(rename = "-lastUsedAt")]
    LastUsedAtDesc,
    /// Soonest expiry first (never-expiring last).
    #[serde(rename = "expiresAt")]
    ExpiresAt,
    /// Latest expiry first.
    #[serde(rename = "-expiresAt")]
    ExpiresAtDesc,
}

impl SortParam {
    fn key(self) -> (SortKey, bool) {
        match self {
            Self::CreatedAt => (SortKey::CreatedAt, false),
            Self::CreatedAtDesc => (SortKey::CreatedAt, true),
            Self::Name => (SortKey::Name, false),
            Self::NameDesc => (SortKey::Name, true),
            Self::LastUsedAt => (SortKey::LastUsedAt, false),
            Self::LastUsedAtDesc => (SortKey::LastUsedAt, true),
            Self::ExpiresAt => (SortKey::ExpiresAt, false),
            Self::ExpiresAtDesc => (SortKey::ExpiresAt, true),
        }
    }
}

/// The `lastUsed` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) enum LastUsedParam {
    /// Only tokens never used.
    Never,
}

const NAME: &[&str] = &["name", "description"];
const SCOPES: &[&str] = &["scopes", "scope"];
const EXPIRES_AT: &[&str] = &["expiresAt", "expirationDate", "expireAt"];
const NEVER_EXPIRES: &[&str] = &["userAwareTokenNeverExpires"];
const IP_RESTRICTION: &[&str] = &["ipRestriction"];
const TYPE: &[&str] = &["type"];
const REVOKED: &[&str] = &["revoked"];
const ACTIVE: &[&str] = &["active"];
const GRACE: &[&str] = &["gracePeriodSeconds"];
/// The names a request may give the owner under (each checked on its own: a token read back has
/// both `subject` and `userId`).
const OWNER: &[&str] = &["subject", "userId", "ownerId"];
/// What the server sets: ignored when a client sends it (Unleash documents that it ignores them,
/// and a client may send back a token it read).
const SERVER_SET: &[&str] = &[
    "id",
    "secret",
    "token",
    "accessToken",
    "start",
    "createdAt",
    "updatedAt",
    "seenAt",
    "lastUsedAt",
    "lastUsedIps",
    "lastRotatedAt",
    "revokedAt",
    "expiryWarning",
    "previousTokenValidUntil",
];

impl CreateTokenRequest {
    pub(crate) fn from_json(body: &[u8], limits: Limits) -> Result<Self, ApiError> {
        let obj = object(body, false)?;
        only_known(
            &obj,
            &[
                NAME,
                SCOPES,
                EXPIRES_AT,
                NEVER_EXPIRES,
                IP_RESTRICTION,
                TYPE,
                REVOKED,
                ACTIVE,
            ],
        )?;
        let name = match field(&obj, NAME)? {
            Some((f, v)) => name(f, v)?,
            None => return Err(ApiError::invalid("name", "required")),
        };
        if flag(&obj, REVOKED)? == Some(true) {
            return Err(ApiError::invalid(
                "revoked",
                "a token cannot be created revoked",
            ));
        }
        if flag(&obj, ACTIVE)? == Some(false) {
            return Err(ApiError::invalid(
                "active",
                "a token cannot be created inactive",
            ));
        }
        Ok(Self {
            name,
            scopes: field(&obj, SCOPES)?
                .map(|(f, v)| scopes(f, v, limits.scopes))
                .transpose()?
                .unwrap_or_default(),
            expires_at: field(&obj, EXPIRES_AT)?
                .map(|(f, v)| time(f, v))
                .transpose()?
                .flatten(),
            user_aware_token_never_expires: field(&obj, NEVER_EXPIRES)?
                .map(|(f, v)| boolean(f, v))
                .transpose()?
                .unwrap_or(false),
            ip_restriction: field(&obj, IP_RESTRICTION)?
                .map(|(f, v)| networks(f, v, limits.networks))
                .transpose()?
                .unwrap_or_default(),
            token_type: field(&obj, TYPE)?
                .map(|(f, v)| token_type(f, v))
                .transpose()?
                .unwrap_or_else(|| "personal".to_owned()),
            owners: owners(&obj)?,
        })
    }

    /// Refuses a request naming another subject than the caller's: it is not quietly created for
    /// the caller instead.
    pub(crate) fn check_owner(&self, subject: &str) -> Result<(), ApiError> {
        same_owner(
            &self.owners,
            subject,
            "a token is created for the caller's own subject, never for another one",
        )
    }
}

impl PatchTokenRequest {
    pub(crate) fn from_json(body: &[u8], limits: Limits) -> Result<Self, ApiError> {
        let obj = object(body, false)?;
        only_known(
            &obj,
            &[
                NAME,
                SCOPES,
                EXPIRES_AT,
                NEVER_EXPIRES,
                IP_RESTRICTION,
                REVOKED,
                ACTIVE,
                TYPE,
            ],
        )?;
        Ok(Self {
            name: patched(&obj, NAME)?
                .map(|(f, v)| match v {
                    Some(v) => name(f, v),
                    None => Err(ApiError::invalid(f, "cannot be removed")),
                })
                .transpose()?,
            scopes: patched(&obj, SCOPES)?
                .map(|(f, v)| v.map_or(Ok(ScopeSet::empty()), |v| scopes(f, v, limits.scopes)))
                .transpose()?,
            expires_at: patched(&obj, EXPIRES_AT)?
                .map(|(f, v)| v.map_or(Ok(None), |v| time(f, v)))
                .transpose()?,
            user_aware_token_never_expires: field(&obj, NEVER_EXPIRES)?
                .map(|(f, v)| boolean(f, v))
                .transpose()?
                .unwrap_or(false),
            ip_restriction: patched(&obj, IP_RESTRICTION)?
                .map(|(f, v)| v.map_or(Ok(Vec::new()), |v| networks(f, v, limits.networks)))
                .transpose()?,
            revoked: flag(&obj, REVOKED)?,
            active: flag(&obj, ACTIVE)?,
            token_type: field(&obj, TYPE)?
                .map(|(f, v)| token_type(f, v))
                .transpose()?,
            owners: owners(&obj)?,
        })
    }

    /// Refuses the fields a PATCH cannot honour on `record` rather than dropping them: another
    /// type or subject, `active: true` on a revoked or expired token, a new `expiresAt` on an
    /// expired one.
    pub(crate) fn check_unchangeable(
        &self,
        record: &TokenRecord,
        now: DateTime<Utc>,
    ) -> Result<(), ApiError> {
        if self
            .token_type
            .as_ref()
            .is_some_and(|t| *t != record.token_type)
        {
            return Err(ApiError::invalid(
                "type",
                "a token's type cannot be changed; create a new token",
            ));
        }
        same_owner(
            &self.owners,
            &record.subject,
            "a token's subject cannot be changed",
        )?;
        match self.active {
            Some(true) if record.is_revoked() => Err(ApiError::token_revoked()),
            Some(true) if record.is_expired_at(now) => Err(ApiError::token_expired(
                "active: an expired token cannot be made active again; create a new one",
            )),
            // A new expiry would bring it back as surely as `active: true`.
            _ if self.expires_at.is_some() && record.is_expired_at(now) => {
                Err(ApiError::token_expired(
                    "expiresAt: an expired token cannot be given a new expiry; create a new one",
                ))
            }
            _ => Ok(()),
        }
    }
}

impl RotateTokenRequest {
    pub(crate) fn from_json(body: &[u8]) -> Result<Self, ApiError> {
        let obj = object(body, true)?;
        for names in [NAME, SCOPES, IP_RESTRICTION, TYPE, NEVER_EXPIRES] {
            if let Some(&name) = names.iter().find(|n| obj.contains_key(**n)) {
                return Err(ApiError::invalid(
                    name,
                    "a rotation keeps the token as it is but for its secret and expiresAt; PATCH \
                     the token to change it",
                ));
            }
        }
        only_known(&obj, &[GRACE, EXPIRES_AT, REVOKED, ACTIVE])?;
        if flag(&obj, REVOKED)? == Some(true) {
            return Err(ApiError::invalid(
                "revoked",
                "a rotation cannot revoke a token; PATCH it with revoked: true",
            ));
        }
        if flag(&obj, ACTIVE)? == Some(false) {
            return Err(ApiError::invalid(
                "active",
                "a rotation cannot deactivate a token; PATCH it with revoked: true",
            ));
        }
        Ok(Self {
            grace_period_seconds: field(&obj, GRACE)?
                .map(|(f, v)| {
                    whole_number(v)
                        .ok_or_else(|| ApiError::invalid(f, "must be a non-negative integer"))
                })
                .transpose()?,
            expires_at: field(&obj, EXPIRES_AT)?
                .map(|(f, v)| time(f, v))
                .transpose()?
                .flatten(),
            owners: owners(&obj)?,
        })
    }

    /// Refuses a `subject` (`userId`, `ownerId`) other than `record`'s.
    pub(crate) fn check_owner(&self, record: &TokenRecord) -> Result<(), ApiError> {
        same_owner(
            &self.owners,
            &record.subject,
            "a token's subject cannot be changed",
        )
    }
}

impl ListParams {
    /// Parses a query string; unknown parameters are ignored, a repeated one's last value wins.
    pub(crate) fn from_query(query: &str) -> Result<Self, ApiError> {
        let mut params = Self::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let value = value.trim();
            match &*key {
                "page" => params.page = Some(count("page", value, 1, MAX_PAGE)?),
                "limit" => params.limit = Some(count("limit", value, 1, MAX_PAGE_SIZE)?),
                "sort" => params.sort = Some(keyword("sort", value)?),
                "search" => params.search = Some(value.to_owned()).filter(|s| !s.is_empty()),
                "lastUsed" => params.last_used = Some(keyword("lastUsed", value)?),
                "lastUsedBefore" => {
                    params.last_used_before = Some(rfc3339("lastUsedBefore", value)?)
                }
                "lastUsedAfter" => params.last_used_after = Some(rfc3339("lastUsedAfter", value)?),
                "createdAfter" => params.created_after = Some(rfc3339("createdAfter", value)?),
                "createdBefore" => params.created_before = Some(rfc3339("createdBefore", value)?),
                "state" => params.state = Some(keyword("state", value)?),
                "ownerId" => params.owner_id = Some(value.to_owned()).filter(|s| !s.is_empty()),
                "subject" => params.subject = Some(value.to_owned()).filter(|s| !s.is_empty()),
                _ => {}
            }
        }
        if params.owner_id.is_none() {
            params.owner_id = params.subject.clone();
        }
        Ok(params)
    }

    /// The subjects whose tokens the query names (`ownerId`, `subject`), each once.
    pub(crate) fn named_subjects(&self) -> impl Iterator<Item = &str> {
        let other = self
            .subject
            .as_deref()
            .filter(|s| Some(*s) != self.owner_id.as_deref());
        self.owner_id.as_deref().into_iter().chain(other)
    }

    /// Whether `ownerId` and `subject` name two subjects: filters combine, and no token has two
    /// subjects, so the answer is an empty list.
    pub(crate) fn names_two_subjects(&self) -> bool {
        self.named_subjects().nth(1).is_some()
    }

    /// Whether the query reads the last use (a filter or the order), which must then include the
    /// usage marks not yet written.
    pub(crate) fn reads_last_use(&self) -> bool {
        self.last_used.is_some()
            || self.last_used_before.is_some()
            || self.last_used_after.is_some()
            || matches!(
                self.sort,
                Some(SortParam::LastUsedAt | SortParam::LastUsedAtDesc)
            )
    }

    /// The store query for `subject`'s tokens, states judged at `now`.
    pub(crate) fn to_query(
        &self,
        subject: &str,
        default_limit: u64,
        now: DateTime<Utc>,
    ) -> ListQuery {
        let limit = self.limit.unwrap_or(default_limit);
        let (sort, descending) = self.sort.unwrap_or(SortParam::CreatedAt).key();
        ListQuery {
            subject: Some(subject.to_owned()),
            search: self.search.clone(),
            last_used: match (self.last_used, self.last_used_before) {
                (Some(LastUsedParam::Never), _) => LastUsedFilter::Never,
                (None, Some(t)) => LastUsedFilter::Before(t),
                (None, None) => LastUsedFilter::Any,
            },
            last_used_after: self.last_used_after,
            created_after: self.created_after,
            created_before: self.created_before,
            state: self.state.map(|s| StateFilter {
                state: match s {
                    StateParam::Active => TokenState::Active,
                    StateParam::Revoked => TokenState::Revoked,
                    StateParam::Expired => TokenState::Expired,
                    StateParam::Disabled => TokenState::Disabled,
                },
                at: now,
            }),
            sort,
            descending,
            offset: self
                .page
                .unwrap_or(1)
                .saturating_sub(1)
                .saturating_mul(limit),
            limit,
        }
    }
}

/// An RFC 3339 date-time query parameter.
fn rfc3339(field: &str, value: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.to_utc())
        .map_err(|_| ApiError::invalid(field, "must be an RFC 3339 date-time"))
}

/// The body as a JSON object (an empty body, or `null`, as an empty object if `empty_ok`).
fn object(body: &[u8], empty_ok: bool) -> Result<Map<String, Value>, ApiError> {
    if empty_ok && body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(Value::Null) if empty_ok => Ok(Map::new()),
        Ok(_) => Err(ApiError::bad_request(
            "the request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::bad_request(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

/// Refuses a field that is neither one of `honoured` (by any of its names), an owner name, nor set
/// by the server: a field the API does not know is never silently dropped.
fn only_known(obj: &Map<String, Value>, honoured: &[&[&str]]) -> Result<(), ApiError> {
    let known = |key: &str| {
        SERVER_SET.contains(&key)
            || OWNER.contains(&key)
            || honoured.iter().any(|names| names.contains(&key))
    };
    match obj.keys().find(|key| !known(key)) {
        None => Ok(()),
        Some(key) => {
            // The name is the client's: quote at most 64 characters of it.
            let shown: String = key.chars().take(64).collect();
            Err(ApiError::invalid(
                &shown,
                "unknown field (refused rather than ignored; see the OpenAPI document for the \
                 fields this operation accepts)",
            ))
        }
    }
}

/// An optional boolean field (`null` counts as absent).
fn flag(obj: &Map<String, Value>, names: &[&'static str]) -> Result<Option<bool>, ApiError> {
    field(obj, names)?.map(|(f, v)| boolean(f, v)).transpose()
}

/// The subjects a request names, each under the name it came with.
fn owners(obj: &Map<String, Value>) -> Result<Vec<(&'static str, String)>, ApiError> {
    let mut out = Vec::new();
    for &name in OWNER {
        if let Some((f, v)) = field(obj, &[name])? {
            out.push((f, string(f, v)?.trim().to_owned()));
        }
    }
    Ok(out)
}

/// Every named owner must be `subject`; otherwise a 400 naming the field with `problem`.
fn same_owner(
    owners: &[(&'static str, String)],
    subject: &str,
    problem: &str,
) -> Result<(), ApiError> {
    match owners.iter().find(|(_, named)| named != subject) {
        Some((f, _)) => Err(ApiError::invalid(f, problem)),
        None => Ok(()),
    }
}

/// The value of a field that may go by several names (`null` counts as absent), and the name it
/// came under. The same field under two names is refused.
fn field<'a>(
    obj: &'a Map<String, Value>,
    names: &[&'static str],
) -> Result<Option<(&'static str, &'a Value)>, ApiError> {
    Ok(patched(obj, names)?.and_then(|(f, v)| v.map(|v| (f, v))))
}

/// Like [`field`], but tells a `null` (`Some((name, None))`) from an absent field (`None`), as a
/// merge patch must.
fn patched<'a>(
    obj: &'a Map<String, Value>,
    names: &[&'static str],
) -> Result<Option<(&'static str, Option<&'a Value>)>, ApiError> {
    let mut found: Option<(&'static str, Option<&'a Value>)> = None;
    for &name in names {
        let Some(value) = obj.get(name) else { continue };
        let value = (!value.is_null()).then_some(value);
        match found {
            Some((first, Some(_))) if value.is_some() => {
                return Err(ApiError::invalid(
                    first,
                    format!("given twice, also as {name}"),
                ));
            }
            Some((_, Some(_))) => {}
            _ => found = Some((name, value)),
        }
    }
    Ok(found)
}

/// A non-negative integer, also written with a zero fraction (`60.0`), as JSON Schema's
/// `integer` allows.
fn whole_number(value: &Value) -> Option<u64> {
    value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.fract() == 0.0 && (0.0..u64::MAX as f64).contains(f))
            .map(|f| f as u64)
    })
}

fn string<'a>(field: &str, value: &'a Value) -> Result<&'a str, ApiError> {
    value
        .as_str()
        .ok_or_else(|| ApiError::invalid(field, "must be a string"))
}

fn boolean(field: &str, value: &Value) -> Result<bool, ApiError> {
    value
        .as_bool()
        .ok_or_else(|| ApiError::invalid(field, "must be a boolean"))
}

/// A name or type under [`crate::record::label`]'s rule (the schema's `pattern` and `maxLength`).
fn label(field: &str, value: &Value, max: usize) -> Result<String, ApiError> {
    crate::record::label(string(field, value)?, max)
        .map(str::to_owned)
        .map_err(|problem| ApiError::invalid(field, problem))
}

fn name(field: &str, value: &Value) -> Result<String, ApiError> {
    label(field, value, MAX_NAME_CHARS)
}

fn token_type(field: &str, value: &Value) -> Result<String, ApiError> {
    label(field, value, MAX_TYPE_CHARS)
}

/// An RFC 3339 date-time; an empty string is no date.
fn time(field: &str, value: &Value) -> Result<Option<DateTime<Utc>>, ApiError> {
    let s = string(field, value)?.trim();
    if s.is_empty() {
        return Ok(None);
    }
    match crate::record::parse_time(s) {
        Ok(t) => Ok(Some(t)),
        Err(crate::record::TimeError::NotRfc3339) => {
            Err(ApiError::invalid(field, "must be an RFC 3339 date-time"))
        }
        Err(crate::record::TimeError::TooLate) => Err(ApiError::invalid(
            field,
            "must be at most 9999-12-31T23:59:59Z",
        )),
    }
}

/// An array of strings, or one string split at `separator`: at most `max` non-empty ones, each
/// `what`.
fn list<'a>(
    field: &str,
    value: &'a Value,
    separator: fn(char) -> bool,
    max: usize,
    what: &str,
) -> Result<Vec<&'a str>, ApiError> {
    let items: Vec<&str> = match value {
        Value::String(s) => s.split(separator).collect(),
        Value::Array(items) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| ApiError::invalid(field, "must be an array of strings"))
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(ApiError::invalid(field, "must be an array of strings")),
    };
    let items: Vec<&str> = items
        .into_iter()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if items.len() > max {
        return Err(ApiError::invalid(
            field,
            format!(
                "at most {max} {what} are allowed, {} were given",
                items.len()
            ),
        ));
    }
    Ok(items)
}

fn scopes(field: &str, value: &Value, max: usize) -> Result<ScopeSet, ApiError> {
    list(field, value, char::is_whitespace, max, "scopes")?
        .into_iter()
        .map(|s| Scope::new(s).map_err(|e| ApiError::invalid(field, format!("{s:?}: {e}"))))
        .collect()
}

fn networks(field: &str, value: &Value, max: usize) -> Result<Vec<IpNet>, ApiError> {
    list(field, value, |c| c == ',', max, "networks")?
        .into_iter()
        .map(|s| {
            parse_ip_net(s).map_err(|_| {
                ApiError::invalid(field, format!("{s:?} is not an IP address or CIDR network"))
            })
        })
        .collect()
}

/// A whole number in `min..=max` from the query string.
fn count(param: &str, value: &str, min: u64, max: u64) -> Result<u64, ApiError> {
    value
        .parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| {
            ApiError::invalid(param, format!("must be a whole number from {min} to {max}"))
        })
}

/// One of an enum's names from the query string.
fn keyword<T: for<'de> Deserialize<'de>>(param: &str, value: &str) -> Result<T, ApiError> {
    T::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(value))
        .map_err(|_| ApiError::invalid(param, format!("unknown value {value:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_and_types() {
        let r = CreateTokenRequest::from_json(
            br#"{"description":" ci ","scope":["a:read"],"expirationDate":"2999-01-01T00:00:00Z","ipRestriction":"10.0.0.0/8, 2001:db8::1","id":"x","token":"y"}"#,
            Limits::default(),
        )
        .unwrap();
        assert_eq!(r.name, "ci");
        assert_eq!(r.scopes.to_space_separated(), "a:read");
        assert!(r.expires_at.is_some());
        assert_eq!(r.ip_restriction.len(), 2);
        assert_eq!(r.token_type, "personal");

        let e = CreateTokenRequest::from_json(
            br#"{"name":"x","scopes":"a","type":3}"#,
            Limits::default(),
        )
        .unwrap_err();
        assert!(e.message.starts_with("type:"), "{}", e.message);
        let e =
            CreateTokenRequest::from_json(br#"{"name":"x","description":"y"}"#, Limits::default())
                .unwrap_err();
        assert!(e.message.contains("name") && e.message.contains("description"));
        let e = CreateTokenRequest::from_json(
            br#"{"name":"x","expiresAt":"tomorrow"}"#,
            Limits::default(),
        )
        .unwrap_err();
        assert!(e.message.starts_with("expiresAt:"));
    }

    #[test]
    fn merge_patch_nulls() {
        let p = PatchTokenRequest::from_json(
            br#"{"expiresAt":null,"ipRestriction":null}"#,
            Limits::default(),
        )
        .unwrap();
        assert_eq!(p.expires_at, Some(None));
        assert_eq!(p.ip_restriction, Some(Vec::new()));
        assert_eq!(p.name, None);
        assert!(PatchTokenRequest::from_json(br#"{"name":null}"#, Limits::default()).is_err());
    }

    #[test]
    fn every_field_is_honoured_refused_or_set_by_the_server() {
        let limits = Limits::default();
        let create = |body: &str| CreateTokenRequest::from_json(body.as_bytes(), limits);
        let e = create(r#"{"name":"x","revoked":true}"#).unwrap_err();
        assert_eq!(e.message, "revoked: a token cannot be created revoked");
        assert!(
            create(r#"{"name":"x","active":false}"#)
                .unwrap_err()
                .message
                .starts_with("active:")
        );
        assert!(
            create(r#"{"name":"x","ip_restriction":"10.0.0.1"}"#)
                .unwrap_err()
                .message
                .starts_with("ip_restriction: unknown field")
        );
        let long = format!(r#"{{"name":"x","{}":1}}"#, "k".repeat(1000));
        assert!(create(&long).unwrap_err().message.len() < 300);
        let r = create(r#"{"name":"x","revoked":false,"active":true,"subject":"a","userId":"b","id":"i","seenAt":null}"#)
            .unwrap();
        assert_eq!(
            r.owners,
            [("subject", "a".to_owned()), ("userId", "b".to_owned())]
        );
        assert!(
            r.check_owner("a")
                .unwrap_err()
                .message
                .starts_with("userId:")
        );

        let rotate = |body: &str| RotateTokenRequest::from_json(body.as_bytes());
        for f in [
            "name",
            "scope",
            "ipRestriction",
            "type",
            "userAwareTokenNeverExpires",
        ] {
            let e = rotate(&format!(r#"{{"{f}":null}}"#)).unwrap_err();
            assert!(e.message.starts_with(&format!("{f}:")), "{}", e.message);
        }
        assert!(rotate(r#"{"revoked":false,"active":true,"gracePeriodSeconds":1}"#).is_ok());
        assert!(rotate("").is_ok());
    }

    #[test]
    fn lists_are_capped() {
        let limits = Limits {
            scopes: 2,
            networks: 3,
        };
        let create = |body: &str| CreateTokenRequest::from_json(body.as_bytes(), limits);
        assert!(create(r#"{"name":"x","scopes":"a b"}"#).is_ok());
        let e = create(r#"{"name":"x","scope":"a b c"}"#).unwrap_err();
        assert!(
            e.message.starts_with("scope: at most 2 scopes"),
            "{}",
            e.message
        );
        assert!(create(r#"{"name":"x","ipRestriction":"10.0.0.1, 10.0.0.2,,10.0.0.3"}"#).is_ok());
        let e =
            create(r#"{"name":"x","ipRestriction":["10.0.0.1","10.0.0.2","10.0.0.3","10.0.0.4"]}"#)
                .unwrap_err();
        assert!(
            e.message.starts_with("ipRestriction: at most 3 networks"),
            "{}",
            e.message
        );
        let e = PatchTokenRequest::from_json(br#"{"scopes":["a","b","c"]}"#, limits).unwrap_err();
        assert!(e.message.starts_with("scopes:"), "{}", e.message);
    }

    #[test]
    fn query() {
        let p =
            ListParams::from_query("page=2&limit=10&sort=-lastUsedAt&lastUsed=never&x=1").unwrap();
        let q = p.to_query("alice", 50, Utc::now());
        assert_eq!(
            (q.offset, q.limit, q.sort, q.descending),
            (10, 10, SortKey::LastUsedAt, true)
        );
        assert_eq!(q.last_used, LastUsedFilter::Never);
        assert!(
            ListParams::from_query("limit=101")
                .unwrap_err()
                .message
                .starts_with("limit:")
        );
        assert!(
            ListParams::from_query("sort=size")
                .unwrap_err()
                .message
                .starts_with("sort:")
        );
    }
}
