//! Pieces of the `patd` gateway program (feature `gateway`): route rules, the identity headers a
//! gateway hands to the upstream, and (feature `ext-authz`) Envoy's external authorization service.
//!
//! Everything here verifies through [`PatAuthLayer`](crate::PatAuthLayer) itself: a gateway
//! contract is a translation of the gateway's request into an HTTP request through the layer, and
//! of the layer's answer back.

pub mod cli;
pub mod config;
#[cfg(feature = "ext-authz")]
pub mod ext_authz;
pub mod forward_auth;
pub mod gate;
pub mod metrics;
pub mod rules;
pub mod serve;

/// `raw`, a request target as a gateway describes it (forward-auth's original URI, ext_authz's
/// path), parsed; refused with 400 (`invalid` when it is no URI at all) where `http::Uri` would
/// not keep all of it.
///
/// A request target never carries a fragment (RFC 9112 §3.2), but a gateway may pass a raw `#`
/// on (nginx's `$request_uri`), and `http::Uri` drops it and everything after it, unchecked:
/// `/public#/../admin` would be judged as `/public`, while an upstream that keeps the `#` in the
/// path (Go's `http.FileServer`) serves `/admin`. So a `#` anywhere is refused. It is the one byte
/// `http::Uri` accepts without keeping: it decodes and normalizes nothing, and refuses every
/// other byte it does not keep (controls, spaces, bytes that are not UTF-8, a target over 64 KiB).
pub(crate) fn request_target(
    raw: &[u8],
    invalid: &'static str,
) -> Result<http::Uri, crate::AuthError> {
    if raw.contains(&b'#') {
        return Err(crate::AuthError::InvalidRequest(
            "the request target has a `#`: a request carries no fragment",
        ));
    }
    http::Uri::try_from(raw).map_err(|_| crate::AuthError::InvalidRequest(invalid))
}

/// Whether `a` and `b` name the same header to an upstream that reads `_` as `-` (CGI, FastCGI,
/// WSGI: `X-Auth_Subject` and `x_auth_subject` are both `HTTP_X_AUTH_SUBJECT`): equal once
/// lower-cased with `_` read as `-`.
pub(crate) fn same_header_to_cgi(a: &str, b: &str) -> bool {
    let fold = |c: u8| {
        if c == b'_' {
            b'-'
        } else {
            c.to_ascii_lowercase()
        }
    };
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| fold(x) == fold(y))
}

/// The names of the headers that carry a verified principal to the upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityHeaders {
    /// The token's subject (default `x-auth-subject`).
    pub subject: http::HeaderName,
    /// The token's id (default `x-auth-token-id`).
    pub token_id: http::HeaderName,
    /// The token's name (default `x-auth-token-name`).
    pub token_name: http::HeaderName,
    /// The token's scopes, space-separated (default `x-auth-scopes`).
    pub scopes: http::HeaderName,
}

impl Default for IdentityHeaders {
    fn default() -> Self {
        Self {
            subject: http::HeaderName::from_static("x-auth-subject"),
            token_id: http::HeaderName::from_static("x-auth-token-id"),
            token_name: http::HeaderName::from_static("x-auth-token-name"),
            scopes: http::HeaderName::from_static("x-auth-scopes"),
        }
    }
}

impl IdentityHeaders {
    /// The four header names.
    pub fn names(&self) -> [&http::HeaderName; 4] {
        [
            &self.subject,
            &self.token_id,
            &self.token_name,
            &self.scopes,
        ]
    }

    /// Whether `name` is one of the identity headers in a spelling other than its own
    /// (`X-Auth_Subject` or `x_auth_subject` for `X-Auth-Subject`): the same header to CGI,
    /// FastCGI and WSGI upstreams, which read `_` as `-`, but not to a gateway that overwrites the
    /// identity header. (Header names are compared without regard to ASCII case.)
    pub fn is_other_spelling(&self, name: &str) -> bool {
        self.names().iter().any(|identity| {
            let identity = identity.as_str();
            same_header_to_cgi(identity, name) && !identity.eq_ignore_ascii_case(name)
        })
    }

    /// The identity headers for `principal`, as `(name, value)` pairs, the values as the record
    /// holds them (not necessarily valid header values: see [`values`](Self::values)).
    pub fn for_principal(&self, principal: &crate::Principal) -> [(&http::HeaderName, String); 4] {
        [
            (&self.subject, principal.subject().to_owned()),
            (&self.token_id, principal.token_id().to_owned()),
            (&self.token_name, principal.token_name().to_owned()),
            (&self.scopes, principal.scopes().to_space_separated()),
        ]
    }

    /// The four identity headers a gateway must set on an accepted request, overwriting any the
    /// client sent: `principal`'s values, or all empty on an anonymous pass (`None`).
    ///
    /// Every header is always present: a value that is not a valid header value (a name with a
    /// control character, say) is sent empty, with a warning naming the header and the token id
    /// (never the value), since leaving it out would let the client's own header of that name
    /// through.
    pub fn values(
        &self,
        principal: Option<&crate::Principal>,
    ) -> [(&http::HeaderName, http::HeaderValue); 4] {
        let empty = || http::HeaderValue::from_static("");
        let Some(principal) = principal else {
            return self.names().map(|name| (name, empty()));
        };
        self.for_principal(principal).map(|(name, value)| {
            let value = http::HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| {
                tracing::warn!(
                    target: "tower_pat::gateway",
                    header = name.as_str(),
                    token_id = principal.token_id(),
                    "an identity header's value is not a valid header value: sent empty"
                );
                empty()
            });
            (name, value)
        })
    }
}
