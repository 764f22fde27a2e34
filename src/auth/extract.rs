//! Credential extraction: where the layer looks for a token in a request.

use http::{HeaderMap, HeaderName, HeaderValue, Uri, header};

use super::error::AuthError;

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
    /// `invalid_request` error for two different ones or unreadable bytes.
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
                    let value = header_str(value)?;
                    return Ok(strip_scheme(value, "bearer"));
                }
                _ => {}
            }
        }
        self.extract_general(headers, uri)
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
        for value in headers.get_all(header::AUTHORIZATION) {
            let value = header_str(value)?;
            if let Some(token) = strip_scheme(value, "bearer") {
                add(token)?;
            } else if self.token_scheme
                && let Some(token) = strip_scheme(value, "token")
            {
                add(token)?;
            } else if self.raw_authorization && !value.trim().contains(' ') {
                add(value.trim())?;
            }
        }
        for name in &self.headers {
            for value in headers.get_all(name) {
                add(header_str(value)?.trim())?;
            }
        }
        if self.query
            && let Some(query) = uri.query()
        {
            for value in query
                .split('&')
                .filter_map(|p| p.strip_prefix("access_token="))
            {
                add(value)?;
            }
        }
        Ok(found)
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
            && uri.query().is_some_and(|q| {
                q.split('&').any(|p| {
                    p.split('=')
                        .next()
                        .is_some_and(|k| k.eq_ignore_ascii_case("access_token"))
                })
            })
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

/// A credential header as text: what [`HeaderValue::to_str`] accepts (visible ASCII and tabs), and
/// the same answer, checked eight bytes at a time (`to_str` checks a byte at a time: a tenth of a
/// cache hit's time).
#[inline]
fn header_str(value: &HeaderValue) -> Result<&str, AuthError> {
    const LOW: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    /// Visible ASCII or a tab, byte by byte: `to_str`'s rule.
    fn exact(bytes: &[u8]) -> bool {
        bytes
            .iter()
            .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
    }
    let bytes = value.as_bytes();
    let mut words = bytes.chunks_exact(8);
    for chunk in &mut words {
        let w = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
        // A byte of 0x80 or more, or 0x7f (which the add carries into the high bit; a carry out
        // of a byte needs one of 0x80 or more, caught anyway), or below 0x20 (a borrow needs such
        // a byte): then this word is checked exactly (a tab is below 0x20 and allowed).
        let suspect = ((w | w.wrapping_add(LOW)) & HIGH) | (w.wrapping_sub(0x20 * LOW) & !w & HIGH);
        if suspect != 0 && !exact(chunk) {
            return Err(BYTES);
        }
    }
    if !exact(words.remainder()) {
        return Err(BYTES);
    }
    // All ASCII by now: valid UTF-8, checked again at ASCII speed.
    std::str::from_utf8(bytes).map_err(|_| BYTES)
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

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::header_str;

    #[test]
    fn header_str_accepts_exactly_what_to_str_accepts() {
        let base = b"Bearer pat_0123456789abcdefghijABCDEFGHIJ0123";
        // Every byte value at every position, and at two positions at once (a word's edges).
        for at in 0..base.len() {
            for b in 0..=255u8 {
                for second in [None, Some((at + 7) % base.len())] {
                    let mut bytes = base.to_vec();
                    bytes[at] = b;
                    if let Some(s) = second {
                        bytes[s] = b;
                    }
                    let Ok(value) = HeaderValue::from_bytes(&bytes) else {
                        continue;
                    };
                    assert_eq!(
                        header_str(&value).ok(),
                        value.to_str().ok(),
                        "byte {b:#04x} at {at}"
                    );
                }
            }
        }
        // Lengths around the word size.
        for len in 0..40 {
            let value = HeaderValue::from_bytes(&base[..len]).unwrap();
            assert_eq!(header_str(&value).ok(), value.to_str().ok());
            let mut tabbed = base[..len].to_vec();
            tabbed.push(b'\t');
            let value = HeaderValue::from_bytes(&tabbed).unwrap();
            assert_eq!(header_str(&value).ok(), value.to_str().ok());
        }
    }
}
