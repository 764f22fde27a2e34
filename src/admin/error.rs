//! The management API's errors: a status, a machine-readable code and a message, rendered as the
//! crate's one error body (`{"code", "message", "status"}`, see [`crate::auth::json_response`]).

use std::borrow::Cow;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use utoipa::{ToResponse, ToSchema};

use crate::store::StoreError;

/// The JSON body of every error response, the authentication layer's included.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    /// A machine-readable code: `invalid_request`, `unauthorized`, `invalid_token`,
    /// `insufficient_scope`, `forbidden`, `token_limit_reached`, `not_found`, `conflict`,
    /// `token_revoked`, `payload_too_large`, `too_many_requests` or `server_error`.
    pub(crate) code: String,
    /// A human-readable message; for a bad field it starts with the field's name.
    pub(crate) message: String,
    /// The HTTP status, repeated.
    pub(crate) status: u16,
}

// The error answers several operations share, as reusable OpenAPI responses.

/// No valid access token.
#[derive(ToResponse)]
#[allow(dead_code)] // documentation only
pub(crate) struct Unauthorized(ErrorBody);

/// `personalAccessToken:read` is missing.
#[derive(ToResponse)]
#[allow(dead_code)]
pub(crate) struct ReadScopeMissing(ErrorBody);

/// `personalAccessToken:write` is missing.
#[derive(ToResponse)]
#[allow(dead_code)]
pub(crate) struct WriteScopeMissing(ErrorBody);

/// No such token, or another subject's without `personalAccessToken:admin`.
#[derive(ToResponse)]
#[allow(dead_code)]
pub(crate) struct NotFound(ErrorBody);

/// The token is revoked: it cannot be changed or rotated.
#[derive(ToResponse)]
#[allow(dead_code)]
pub(crate) struct TokenRevoked(ErrorBody);

/// The token store failed.
#[derive(ToResponse)]
#[allow(dead_code)]
pub(crate) struct StoreFailed(ErrorBody);

/// The request body is larger than the configured maximum.
#[derive(ToResponse)]
#[allow(dead_code)]
pub(crate) struct PayloadTooLarge(ErrorBody);

/// Why a management request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) message: Cow<'static, str>,
    /// Seconds for `Retry-After` (429 only).
    pub(crate) retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400: a field (or the body, or a query parameter) is missing, of the wrong type or invalid.
    /// The message names it.
    pub(crate) fn invalid(field: &str, problem: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{field}: {problem}"),
        )
    }

    /// 400 for the request as a whole (a rule that is not about one field).
    pub(crate) fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 401: the caller's token was revoked, deleted or expired while the request was processed
    /// (its body arrived after the layer let it in).
    pub(crate) fn caller_gone() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "the access token was revoked, deleted or expired while this request was processed",
        )
    }

    /// 409: the caller's own token changed (its scopes, expiry or networks) after the layer
    /// authenticated the request, so the ceilings the request would be held to are not the
    /// token's any more.
    pub(crate) fn caller_changed() -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "conflict",
            "the access token that authenticates this request changed (its scopes, expiry or \
             networks) while the request was processed; send the request again",
        )
    }

    /// 401: a leaked-token report whose signature is missing, malformed, by an unknown key or
    /// not over this body.
    #[cfg(feature = "secret-scanning")]
    pub(crate) fn bad_signature() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the report's signature is missing or does not verify with a configured public key",
        )
    }

    /// 403: the caller may not do this.
    pub(crate) fn forbidden(code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }

    /// 404: no such token, or not one the caller may see.
    pub(crate) fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no personal access token with this id",
        )
    }

    /// 409: the subject already has a token with this name.
    pub(crate) fn name_taken() -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "conflict",
            "name: a personal access token with this name already exists",
        )
    }

    /// 408: a leaked-token report whose body did not arrive in time.
    #[cfg(feature = "secret-scanning")]
    pub(crate) fn body_timeout() -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request body did not arrive in time",
        )
    }

    /// 413: the body is larger than the configured maximum.
    pub(crate) fn too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the request body is larger than this API accepts",
        )
    }

    /// 409: the token changed between this request's read and its write.
    pub(crate) fn stale() -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "conflict",
            "the token changed while this request was processed; read it again and retry",
        )
    }

    /// 409: the token expired, so it cannot be rotated or made active again (a state of the
    /// token, not a fault of the request: create a new one).
    pub(crate) fn token_expired(message: &'static str) -> Self {
        Self::new(StatusCode::CONFLICT, "token_expired", message)
    }

    /// 410: the token is revoked, for good.
    pub(crate) fn token_revoked() -> Self {
        Self::new(
            StatusCode::GONE,
            "token_revoked",
            "the token is revoked: it cannot be changed or rotated",
        )
    }

    /// 410: a revoked token asked to be active again (`"revoked": false`): a state the token
    /// is in, not a malformed request.
    pub(crate) fn token_not_reinstated() -> Self {
        Self::new(
            StatusCode::GONE,
            "token_revoked",
            "the token is revoked: it cannot be reinstated; create a new one",
        )
    }

    /// 429 with `Retry-After`.
    pub(crate) fn too_many(what: &str, retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after.max(1)),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                format!("too many {what}; try again later"),
            )
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound => Self::not_found(),
            StoreError::Revoked => Self::token_revoked(),
            StoreError::Stale => Self::stale(),
            StoreError::CallerChanged => Self::caller_changed(),
            StoreError::Expired => Self::token_expired(
                "the token expired while this request was processed; create a new one",
            ),
            StoreError::Conflict { field: "name" } => Self::name_taken(),
            StoreError::Conflict { field } => Self::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("{field}: already taken; retry the request"),
            ),
            err => {
                tracing::error!(error = %err, "token store failed in the management API");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "the token store failed",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = crate::auth::json_response(self.status, self.code, &self.message);
        if let Some(secs) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res.map(axum::body::Body::from)
    }
}
