//! Credential extraction: where the layer looks for a token in a request.

use http::{HeaderMap, HeaderName, Uri, header};

use super::error::AuthError;
use super::verify::{is_access_token_key, query_pairs};

/// Put in the request extensions by a [`PatAuthLayer`](crate::PatAuthLayer) built with
/// [`pass_foreign_credentials`](crate::PatAuthLayerBuilder::pass_foreign_credentials) when the
/// request carried a credential that is not one of its tokens (no token prefix: a JWT, a session
/// token, another `Authorization` scheme) and was let through without a [`Principal`]. An
/// authentication layer behind it can look for this marker and verify the credential itself.
///
/// It holds nothing of the credential: read it from the request again.
///
/// [`Principal`]: crate::Principal
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ForeignCredential;

/// Two different credentials in one request.
const TWO: AuthError = AuthError::InvalidRequest("the request carries more than one credential");
/// A credential header that is not visible ASCII.
const BYTES: AuthError = AuthError::InvalidRequest("a credential header has invalid characters");

/// The configured credential sources. `Authorization: Bearer` is always read; the others are
/// opt-in ([`PatAuthLayerBuilder`](crate::PatAuthLayerBuilder)'s `accept_*` methods).
#[derive(Clone, Debug, Default)]
pub(super) struct Sources {
    pub(super) token_scheme: bool,
    pub(super) raw_authorization: bool,
    pub(super) headers: Vec<HeaderName>,
    pub(super) query: bool,
}

impl Sources {
    /// The credential of a request from the configured sources; `Ok(None)` without any, an
    /// `invalid_request` error for two different ones (a second `Authorization` field that is
    /// not the same token counts as one) or unreadable bytes.
    #[inline]
    pub(super) fn extract<'a>(
        &self,
        headers: &'a HeaderMap,
        uri: &'a Uri,
    ) -> Result<Option<&'a str>, AuthError> {
        if self.bearer_only() {
            // The common case: `Authorization: Bearer` is the only source, and the request has
            // one `Authorization` header. Anything else takes the general path below.
            let mut values = headers.get_all(header::AUTHORIZATION).iter();
            match (values.next(), values.next()) {
                (None, _) => return Ok(None),
                (Some(value), None) => {
                    let value = value.to_str().map_err(|_| BYTES)?;
                    return Ok(strip_scheme(value, "bearer"));
                }
                _ => {}
            }
        }
        self.extract_general(headers, uri)
    }

    /// The token of the common request, by its bytes: `Authorization: Bearer` is the only source
    /// configured, the request has one `Authorization` header, and it is the scheme, one space and
    /// exactly `len` bytes. Those bytes are not checked: they are only for the cache probe, and a
    /// hit proves them (it is a token that passed the format check when it was cached, and no
    /// other string has its slot). Anything else, and a miss, goes to [`extract`](Self::extract),
    /// which reads the value as [`HeaderValue::to_str`](http::HeaderValue::to_str) allows.
    #[inline]
    pub(super) fn bearer_bytes<'a>(&self, headers: &'a HeaderMap, len: usize) -> Option<&'a [u8]> {
        const SCHEME: &[u8] = b"bearer ";
        if !self.bearer_only() {
            return None;
        }
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return None;
        };
        let (scheme, token) = value.as_bytes().split_at_checked(SCHEME.len())?;
        (token.len() == len && scheme.eq_ignore_ascii_case(SCHEME)).then_some(token)
    }

    /// Whether `Authorization: Bearer` is the only source configured.
    #[inline]
    fn bearer_only(&self) -> bool {
        !self.token_scheme && !self.raw_authorization && !self.query && self.headers.is_empty()
    }

    /// [`extract`](Self::extract) for any configuration and any number of headers.
    #[inline(never)]
    fn extract_general<'a>(
        &self,
        headers: &'a HeaderMap,
        uri: &'a Uri,
    ) -> Result<Option<&'a str>, AuthError> {
        let mut found: Option<&'a str> = None;
        let mut add = |token: &'a str| match found {
            Some(f) if f != token => Err(TWO),
            _ => {
                found = Some(token);
                Ok(())
            }
        };
        // RFC 9110 allows one `Authorization` field. Several are read only when every one is the
        // same token in a form the layer accepts: any other value (another scheme, an empty one)
        // is a second credential: a component behind the layer that reads the first field would
        // see another identity than the principal's.
        let authorization = headers.get_all(header::AUTHORIZATION);
        let several = authorization.iter().nth(1).is_some();
        for value in authorization {
            let value = value.to_str().map_err(|_| BYTES)?;
            match self.authorization_token(value) {
                Some(token) => add(token)?,
                None if several => return Err(TWO),
                None => {}
            }
        }
        for name in &self.headers {
            for value in headers.get_all(name) {
                add(value.to_str().map_err(|_| BYTES)?.trim())?;
            }
        }
        if self.query
            && let Some(query) = uri.query()
        {
            // Every key an application behind may read as `access_token` (`%61ccess_token`,
            // `access.token`, another letter case, after a `;`): a second token there is a
            // second credential. The value is taken as it is: an encoded one fails the format
            // check.
            for (_, value) in query_pairs(query).filter(|(key, _)| is_access_token_key(key)) {
                add(value)?;
            }
        }
        Ok(found)
    }

    /// The token of one `Authorization` value, in a form this configuration accepts: `Bearer`,
    /// `Token`, or the raw value.
    fn authorization_token<'a>(&self, value: &'a str) -> Option<&'a str> {
        if let Some(token) = strip_scheme(value, "bearer") {
            Some(token)
        } else if self.token_scheme
            && let Some(token) = strip_scheme(value, "token")
        {
            Some(token)
        } else if self.raw_authorization && !value.trim().contains(' ') {
            Some(value.trim())
        } else {
            None
        }
    }

    /// Where a request without a credential the layer reads put one the layer does not read
    /// (this configuration's sources left out), as the message of the 401: `None` when there is
    /// nothing like a credential. Never echoes the request.
    #[cold]
    pub(super) fn unread_credential(&self, headers: &HeaderMap, uri: &Uri) -> Option<&'static str> {
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let value = value.as_bytes().trim_ascii();
            let scheme = value
                .split(|b| *b == b' ' || *b == b'\t')
                .next()
                .unwrap_or_default();
            return Some(if scheme.eq_ignore_ascii_case(b"bearer") {
                // `Bearer` with nothing after it.
                "the `Authorization: Bearer` header carries no token: send the token as `Authorization: Bearer <token>`"
            } else if scheme.eq_ignore_ascii_case(b"token") {
                "the `Token` scheme is not accepted here: send the token as `Authorization: Bearer <token>`"
            } else if scheme.len() == value.len() {
                "an `Authorization` value without a scheme is not accepted here: send the token as `Authorization: Bearer <token>`"
            } else {
                "this `Authorization` scheme is not accepted here: send the token as `Authorization: Bearer <token>`"
            });
        }
        for (name, message) in [
            (
                "x-api-key",
                "the `X-API-Key` header is not read here: send the token as `Authorization: Bearer <token>`",
            ),
            (
                "private-token",
                "the `PRIVATE-TOKEN` header is not read here: send the token as `Authorization: Bearer <token>`",
            ),
            (
                "x-auth-token",
                "the `X-Auth-Token` header is not read here: send the token as `Authorization: Bearer <token>`",
            ),
        ] {
            if headers.contains_key(name) && !self.headers.iter().any(|h| h == name) {
                return Some(message);
            }
        }
        if !self.query
            && uri
                .query()
                .is_some_and(|q| query_pairs(q).any(|(key, _)| is_access_token_key(key)))
        {
            return Some(
                "the `access_token` query parameter is not accepted here: send the token as `Authorization: Bearer <token>`",
            );
        }
        None
    }

    /// Whether a request without a credential the layer reads still carries an `Authorization`
    /// header: a credential of another scheme (`Basic`, a custom one), foreign to the layer.
    #[cold]
    pub(super) fn other_authorization(headers: &HeaderMap) -> bool {
        headers.contains_key(header::AUTHORIZATION)
    }
}

/// The credential after an auth scheme, matched case-insensitively (RFC 7235 §2.1).
#[inline]
fn strip_scheme<'a>(value: &'a str, scheme: &str) -> Option<&'a str> {
    let n = scheme.len();
    let bytes = value.as_bytes();
    if bytes.len() > n && bytes[..n].eq_ignore_ascii_case(scheme.as_bytes()) && bytes[n] == b' ' {
        Some(value[n + 1..].trim())
    } else {
        None
    }
}
