//! The errors a client sees: for each refusal one status, one RFC 6750 challenge, one JSON body
//! and one gRPC status, every one marked `Cache-Control: no-store`.

use std::fmt;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::scope::ScopeSet;

/// Why the layer refused a request. Each maps to one status, one `WWW-Authenticate` challenge, one
/// JSON body and one gRPC status code.
///
/// Every refusal response of [`PatAuthLayer`](crate::PatAuthLayer) and
/// [`RequireScopesLayer`](crate::RequireScopesLayer) carries its `AuthError` in the response
/// extensions, for a layer outside (logging, metrics, a gateway) to read the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthError {
    /// No credentials: 401 with a bare `Bearer realm="…"` challenge.
    MissingCredentials,
    /// No credentials where the layer reads them, but something like one where it does not (an
    /// `Authorization` scheme other than `Bearer`, an `X-API-Key` or `PRIVATE-TOKEN` header, an
    /// `access_token` query parameter, none of them enabled): 401 with the bare challenge, like
    /// [`MissingCredentials`](Self::MissingCredentials), and a message that says where the token
    /// goes instead. The message never repeats what the client sent.
    CredentialNotAccepted(&'static str),
    /// A malformed request (two different credentials, unreadable header bytes): 400.
    InvalidRequest(&'static str),
    /// An unknown or malformed token: 401. The message never says which.
    InvalidToken,
    /// The token was revoked: 401.
    Revoked,
    /// The token is disabled (reversibly, by a management change): 401.
    Disabled,
    /// The token expired: 401.
    Expired,
    /// The client address is outside the token's IP restriction: 403.
    IpNotAllowed,
    /// A required scope is missing: 403 with `error="insufficient_scope"` and `scope="…"` naming
    /// every required scope.
    InsufficientScope(ScopeSet),
    /// Too many failed attempts from one client: 429 with `Retry-After`.
    TooManyAttempts {
        /// Seconds until the client may try again.
        retry_after_secs: u64,
    },
    /// The store cannot be reached and the token is not cached: 503 with `Retry-After`.
    Unavailable {
        /// Seconds until the client should try again.
        retry_after_secs: u64,
    },
}

impl AuthError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingCredentials
            | Self::CredentialNotAccepted(_)
            | Self::InvalidToken
            | Self::Revoked
            | Self::Disabled
            | Self::Expired => StatusCode::UNAUTHORIZED,
            Self::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            Self::IpNotAllowed | Self::InsufficientScope(_) => StatusCode::FORBIDDEN,
            Self::TooManyAttempts { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The machine-readable code of the JSON body (and of the RFC 6750 `error` attribute).
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingCredentials | Self::CredentialNotAccepted(_) => "unauthorized",
            Self::InvalidRequest(_) => "invalid_request",
            Self::InvalidToken
            | Self::Revoked
            | Self::Disabled
            | Self::Expired
            | Self::IpNotAllowed => "invalid_token",
            Self::InsufficientScope(_) => "insufficient_scope",
            Self::TooManyAttempts { .. } => "too_many_requests",
            Self::Unavailable { .. } => "temporarily_unavailable",
        }
    }

    /// A human-readable message. It names the reason (revoked, expired) only for a token that
    /// matched a record.
    pub fn message(&self) -> &'static str {
        match self {
            Self::MissingCredentials => "an access token is required",
            Self::CredentialNotAccepted(why) => why,
            Self::InvalidRequest(why) => why,
            Self::InvalidToken => "the access token is invalid",
            Self::Revoked => "the access token has been revoked",
            Self::Disabled => "the access token is disabled",
            Self::Expired => "the access token has expired",
            Self::IpNotAllowed => "the access token may not be used from this address",
            Self::InsufficientScope(_) => "the access token lacks a required scope",
            Self::TooManyAttempts { .. } => "too many failed authentication attempts",
            Self::Unavailable { .. } => "token verification is temporarily unavailable",
        }
    }

    /// The gRPC status code for gRPC requests (HTTP/2 with `content-type: application/grpc…`): 16
    /// (unauthenticated), 7 (permission denied), 8 (resource exhausted) or 14 (unavailable).
    pub fn grpc_code(&self) -> u8 {
        match self.status() {
            StatusCode::FORBIDDEN => 7,
            StatusCode::TOO_MANY_REQUESTS => 8,
            StatusCode::SERVICE_UNAVAILABLE => 14,
            _ => 16,
        }
    }

    /// A short name of the reason, finer than [`code`](Self::code) (`revoked`, `expired`,
    /// `ip_not_allowed`, …): the `reason` field of the layer's refusal events.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Self::MissingCredentials => "missing_credentials",
            Self::CredentialNotAccepted(_) => "credential_not_accepted",
            Self::InvalidRequest(_) => "invalid_request",
            Self::InvalidToken => "invalid_token",
            Self::Revoked => "revoked",
            Self::Disabled => "disabled",
            Self::Expired => "expired",
            Self::IpNotAllowed => "ip_not_allowed",
            Self::InsufficientScope(_) => "insufficient_scope",
            Self::TooManyAttempts { .. } => "too_many_attempts",
            Self::Unavailable { .. } => "unavailable",
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::TooManyAttempts { retry_after_secs } | Self::Unavailable { retry_after_secs } => {
                Some(*retry_after_secs)
            }
            _ => None,
        }
    }
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for AuthError {}

/// The realm and its pre-rendered `WWW-Authenticate` challenge, shared by every error response of
/// one layer.
#[derive(Clone, Debug)]
pub(crate) struct Challenge {
    realm: Box<str>,
    bare: HeaderValue,
}

impl Challenge {
    /// `realm` with `"` and `\` removed (they would need escaping in the quoted string).
    pub(crate) fn new(realm: &str) -> Self {
        let realm: String = realm
            .chars()
            .filter(|c| *c != '"' && *c != '\\' && (' '..='~').contains(c))
            .collect();
        let bare = HeaderValue::try_from(format!("Bearer realm=\"{realm}\""))
            .unwrap_or_else(|_| HeaderValue::from_static("Bearer"));
        Self {
            realm: realm.into(),
            bare,
        }
    }

    /// The realm, as sanitized for the challenge.
    pub(crate) fn realm(&self) -> &str {
        &self.realm
    }

    fn header(&self, err: &AuthError) -> Option<HeaderValue> {
        match err {
            AuthError::MissingCredentials | AuthError::CredentialNotAccepted(_) => {
                Some(self.bare.clone())
            }
            AuthError::TooManyAttempts { .. } | AuthError::Unavailable { .. } => None,
            AuthError::InsufficientScope(scopes) => HeaderValue::try_from(format!(
                "Bearer realm=\"{}\", error=\"insufficient_scope\", error_description=\"{}\", scope=\"{}\"",
                self.realm,
                err.message(),
                scopes.to_space_separated()
            ))
            .ok(),
            _ => HeaderValue::try_from(format!(
                "Bearer realm=\"{}\", error=\"{}\", error_description=\"{}\"",
                self.realm,
                err.code(),
                err.message()
            ))
            .ok(),
        }
    }

    /// The full error response: JSON for HTTP, trailers-only for gRPC, `Cache-Control: no-store`
    /// either way. The body is returned as bytes for the caller to wrap in its body type.
    pub(crate) fn error_response(&self, err: &AuthError, grpc: bool) -> Response<Bytes> {
        let mut res = if grpc {
            grpc_response(err)
        } else {
            self.http_error_response(err)
        };
        res.extensions_mut().insert(err.clone());
        res
    }

    /// The HTTP form of [`error_response`](Self::error_response).
    fn http_error_response(&self, err: &AuthError) -> Response<Bytes> {
        let mut res = json_response(err.status(), err.code(), err.message());
        let headers = res.headers_mut();
        if let Some(v) = self.header(err) {
            headers.insert(header::WWW_AUTHENTICATE, v);
        }
        if let Some(secs) = err.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}

/// A JSON error response `{"code", "message", "status"}` with `Cache-Control: no-store`: the one
/// shape of every error body of the crate, the management API's included.
pub(crate) fn json_response(status: StatusCode, code: &str, message: &str) -> Response<Bytes> {
    /// The body's shape, serialized from borrowed fields (one allocation).
    #[derive(serde::Serialize)]
    struct Body<'a> {
        code: &'a str,
        message: &'a str,
        status: u16,
    }
    let body = serde_json::to_vec(&Body {
        code,
        message,
        status: status.as_u16(),
    })
    .expect("a struct of strings and a number always serializes");
    let mut res = Response::new(Bytes::from(body));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// A trailers-only gRPC response: HTTP 200, `grpc-status`, `grpc-message`, empty body, and like
/// every refusal `Cache-Control: no-store`.
fn grpc_response(err: &AuthError) -> Response<Bytes> {
    let mut res = Response::new(Bytes::new());
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert("grpc-status", HeaderValue::from(u16::from(err.grpc_code())));
    // The messages are plain ASCII without '%', so they need no percent-encoding.
    headers.insert("grpc-message", HeaderValue::from_static(err.message()));
    res
}

/// In the extensions of a refusal of a token that matched a record (revoked, expired, outside its
/// networks, lacking a scope): which token it was, for the logs and metrics of a layer outside.
/// Never on the refusal of an unknown token.
#[derive(Clone, Debug)]
pub struct RefusedToken(pub(crate) crate::Principal);

impl RefusedToken {
    /// The refused token's id.
    pub fn token_id(&self) -> &str {
        self.0.token_id()
    }

    /// The refused token's subject.
    pub fn subject(&self) -> &str {
        self.0.subject()
    }
}

/// Put in the request extensions by an optional layer (see
/// [`PatAuthLayerBuilder::allow_anonymous`](crate::PatAuthLayerBuilder::allow_anonymous)) when a
/// request carries no credentials, so that the `Principal` extractor can answer with the layer's
/// 401 challenge.
#[derive(Clone, Debug)]
pub struct Anonymous(pub(crate) Challenge);

impl Anonymous {
    pub(crate) fn challenge(&self) -> &Challenge {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let c = Challenge::new("my \"api\"");
        let r = c.error_response(&AuthError::MissingCredentials, false);
        assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"my api\"");
        let r = c.error_response(
            &AuthError::InsufficientScope(ScopeSet::parse(["b", "a"]).unwrap()),
            false,
        );
        assert!(
            r.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .ends_with("scope=\"a b\"")
        );
        let r = c.error_response(
            &AuthError::Unavailable {
                retry_after_secs: 2,
            },
            true,
        );
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["cache-control"], "no-store");
    }
}
