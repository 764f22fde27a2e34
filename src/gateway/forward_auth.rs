//! Forward auth: the contract of nginx's `auth_request`, Caddy's `forward_auth` and Traefik's
//! `forwardAuth`. The gateway sends each client request's headers to an endpoint of the
//! authenticator (without the body), adding the original method and URI in headers of its own;
//! a 2xx lets the request through, with headers of the answer copied onto it; anything else is
//! the client's answer.
//!
//! [`ForwardAuth::check`] reads the original method and URI from the headers of the configured
//! [`OriginalRequestHeaders`] only, and refuses (400) a request without them: a client could
//! send the other pair itself, and a request judged as some other path could pass a rule meant
//! for that path. An original URI with a raw `#` is refused (400) too: a request target carries
//! no fragment, and what follows the `#` is part of the path to some upstreams. So is a request
//! carrying an identity header in another spelling (`X-Auth_Subject`, `x_auth_subject`): CGI,
//! FastCGI and WSGI upstreams read it as the identity header, which the gateway overwrites in its
//! exact spelling only ([`IdentityHeaders::is_other_spelling`]). The client address is the
//! connection's peer (the gateway) unless the layer trusts it as a proxy, in which case the
//! layer's forwarded header names the client, exactly as for a request through the layer.
//! Everything the layer enforces applies (expiry, revocation, IP restriction, scopes, failure
//! limit), plus the matching [route rule](super::rules): those of the method sent and of any a
//! method override names ([`Gate::check`]).
//!
//! - Accepted: 200 with the identity headers ([`IdentityHeaders`]), all four, always: empty on an
//!   anonymous route's pass without a token, and for a value that is not a valid header value.
//!   Configure the gateway to set these headers on the upstream request from the answer (and so
//!   to overwrite any the client sent).
//! - Refused: the layer's status, `WWW-Authenticate`, `Retry-After` and JSON body. In
//!   [`nginx compatibility`](ForwardAuth::nginx_compat) mode a status other than 401 and 403
//!   becomes 403 (nginx turns any other into 500), and `X-Auth-Status` carries the real one on
//!   every refusal.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Empty;

use super::IdentityHeaders;
use super::gate::{Decision, Gate};
use crate::AuthError;
use crate::client_ip::peer_addr;

/// The header a refusal's real status is in, in [nginx compatibility](ForwardAuth::nginx_compat)
/// mode.
pub const AUTH_STATUS: HeaderName = HeaderName::from_static("x-auth-status");

/// Which headers carry the original request's method and URI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OriginalRequestHeaders {
    /// `X-Forwarded-Method` and `X-Forwarded-Uri`: what Traefik and Caddy send.
    #[default]
    Forwarded,
    /// `X-Original-Method` and `X-Original-URI`: what the nginx recipe sets
    /// (`proxy_set_header X-Original-URI $request_uri;`).
    Original,
}

impl OriginalRequestHeaders {
    /// The names of the method and URI headers.
    pub fn names(self) -> (HeaderName, HeaderName) {
        match self {
            Self::Forwarded => (
                HeaderName::from_static("x-forwarded-method"),
                HeaderName::from_static("x-forwarded-uri"),
            ),
            Self::Original => (
                HeaderName::from_static("x-original-method"),
                HeaderName::from_static("x-original-uri"),
            ),
        }
    }
}

/// The forward-auth endpoint: see the [module docs](self).
#[derive(Clone, Debug)]
pub struct ForwardAuth {
    gate: Gate,
    identity: IdentityHeaders,
    original: OriginalRequestHeaders,
    nginx_compat: bool,
}

impl ForwardAuth {
    /// Decides through `gate`, reading the original request from `original`'s headers, with the
    /// default identity headers.
    pub fn new(gate: Gate, original: OriginalRequestHeaders) -> Self {
        Self {
            gate,
            identity: IdentityHeaders::default(),
            original,
            nginx_compat: false,
        }
    }

    /// The names of the identity headers (default `X-Auth-Subject`, …).
    pub fn identity_headers(mut self, identity: IdentityHeaders) -> Self {
        self.identity = identity;
        self
    }

    /// nginx compatibility: refusals other than 401 and 403 are sent as 403, and every refusal
    /// carries its real status in `X-Auth-Status` (nginx's `auth_request` turns any status but
    /// 2xx, 401 and 403 into 500).
    pub fn nginx_compat(mut self, on: bool) -> Self {
        self.nginx_compat = on;
        self
    }

    /// The gate: its layer, rules and decisions.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// Answers one forward-auth request (any method; its body is ignored). The request is read
    /// before the returned future starts, which does not borrow it.
    pub fn check<B>(&self, req: &Request<B>) -> impl Future<Output = Response<Bytes>> + Send + '_ {
        let original = self.original_request(req);
        async move {
            let decision = match original {
                Ok(original) => self.gate.check(original).await,
                Err(error) => self.gate.refuse(error),
            };
            self.respond(decision)
        }
    }

    /// The original request as the gateway describes it: method and URI from the configured
    /// headers, every other header as sent, and the connection's peer address.
    fn original_request<B>(&self, req: &Request<B>) -> Result<Request<Empty<Bytes>>, AuthError> {
        let (method_header, uri_header) = self.original.names();
        let one = |name: &HeaderName, missing: &'static str| {
            let mut values = req.headers().get_all(name).iter();
            match (values.next(), values.next()) {
                (Some(v), None) => Ok(v),
                _ => Err(AuthError::InvalidRequest(missing)),
            }
        };
        let (method_missing, uri_missing) = match self.original {
            OriginalRequestHeaders::Forwarded => (
                "the gateway must send exactly one X-Forwarded-Method",
                "the gateway must send exactly one X-Forwarded-Uri",
            ),
            OriginalRequestHeaders::Original => (
                "the gateway must send exactly one X-Original-Method",
                "the gateway must send exactly one X-Original-URI",
            ),
        };
        let method = Method::from_bytes(one(&method_header, method_missing)?.as_bytes())
            .map_err(|_| AuthError::InvalidRequest("the original method is not a method"))?;
        let uri = super::request_target(
            one(&uri_header, uri_missing)?.as_bytes(),
            "the original URI is not a valid URI",
        )?;
        // Origin form only: an absolute URI's path could differ from what the gateway routes.
        if uri.scheme().is_some() || !uri.path().starts_with('/') {
            return Err(AuthError::InvalidRequest(
                "the original URI must be a path (origin form)",
            ));
        }
        // The gateway overwrites the identity headers it copies from the answer, in their exact
        // spelling only; another (`X-Auth_Subject`) would reach a CGI-style upstream as the same
        // header, and forward-auth cannot ask for a header to be removed.
        if req
            .headers()
            .keys()
            .any(|name| self.identity.is_other_spelling(name.as_str()))
        {
            return Err(AuthError::InvalidRequest(
                "the request carries an identity header in another spelling (`_` for `-`)",
            ));
        }
        let mut original = Request::new(Empty::new());
        *original.method_mut() = method;
        *original.uri_mut() = uri;
        let headers = original.headers_mut();
        for (name, value) in req.headers() {
            if name != method_header
                && name != uri_header
                && name != header::CONTENT_LENGTH
                && name != header::TRANSFER_ENCODING
            {
                headers.append(name.clone(), value.clone());
            }
        }
        if let Some(peer) = peer_addr(req.extensions()) {
            original.extensions_mut().insert(peer);
        }
        Ok(original)
    }

    fn respond(&self, decision: Decision) -> Response<Bytes> {
        match decision {
            Decision::Allowed(principal) => {
                let mut res = Response::new(Bytes::new());
                res.headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                // Always all four, empty on an anonymous pass or for a value that is no header
                // value: a gateway that copies them then overwrites whatever the client sent
                // (Caddy before 2.10 would otherwise copy its placeholder text).
                for (name, value) in self.identity.values(principal.as_ref()) {
                    res.headers_mut().insert(name.clone(), value);
                }
                res
            }
            Decision::Denied { mut response, .. } => {
                let status = response.status();
                if self.nginx_compat {
                    response
                        .headers_mut()
                        .insert(AUTH_STATUS, HeaderValue::from(status.as_u16()));
                    if status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN {
                        *response.status_mut() = StatusCode::FORBIDDEN;
                    }
                }
                response
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemoryStore, NewToken, Tokens};

    /// A forward-auth request for `GET uri` from the gateway at 192.0.2.1.
    fn forwarded(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        original(OriginalRequestHeaders::Forwarded, "GET", uri, headers)
    }

    /// A forward-auth request for `method uri`, in the `pair` of headers, from the gateway at
    /// 192.0.2.1.
    fn original(
        pair: OriginalRequestHeaders,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> Request<()> {
        let (method_header, uri_header) = pair.names();
        let mut req = Request::builder()
            .uri("/auth")
            .header(method_header, method)
            .header(uri_header, uri);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let mut req = req.body(()).unwrap();
        req.extensions_mut()
            .insert("192.0.2.1:4000".parse::<std::net::SocketAddr>().unwrap());
        req
    }

    #[tokio::test]
    async fn an_identity_value_that_is_no_header_value_is_sent_empty() {
        let tokens = Tokens::new(MemoryStore::new());
        // The library takes any name; a newline cannot go in a header.
        let (record, secret) = tokens
            .issue(NewToken::new("alice", "ci\nx-auth-subject: root"))
            .await
            .unwrap();
        let auth = ForwardAuth::new(
            Gate::new(tokens.layer().build()),
            OriginalRequestHeaders::Forwarded,
        );
        let bearer = format!("Bearer {}", secret.expose_secret());
        let req = forwarded(
            "/x",
            &[("authorization", &bearer), ("x-auth-token-name", "admin")],
        );
        let res = auth.check(&req).await;
        assert_eq!(res.status(), StatusCode::OK);
        let headers = res.headers();
        assert_eq!(
            headers
                .get_all("x-auth-token-name")
                .iter()
                .collect::<Vec<_>>(),
            [""],
            "present and empty, so that the gateway overwrites the client's"
        );
        assert_eq!(headers["x-auth-subject"], "alice");
        assert_eq!(headers["x-auth-token-id"], record.id.as_str());
        assert_eq!(headers["x-auth-scopes"], "");
    }

    /// Rails (Rack::MethodOverride), Symfony, Laravel, Express's `method-override` and Spring's
    /// HiddenHttpMethodFilter run a `POST` with `X-HTTP-Method-Override: DELETE` (or `_method=DELETE`
    /// in the query) as a `DELETE`: the request must satisfy the rules of both methods.
    #[tokio::test]
    async fn a_method_override_is_judged_as_the_method_it_names_too() {
        use super::super::rules::{RouteRule, RouteRules};
        let tokens = Tokens::new(MemoryStore::new());
        let (_, secret) = tokens
            .issue(
                NewToken::new("mallory", "ci").scope_set(crate::ScopeSet::parse(["read"]).unwrap()),
            )
            .await
            .unwrap();
        let rules = RouteRules::new(vec![RouteRule {
            methods: vec![Method::DELETE],
            scopes: crate::ScopeSet::parse(["admin"]).unwrap(),
            ..RouteRule::new("/api")
        }]);
        let auth = ForwardAuth::new(
            Gate::with_rules(tokens.layer().build(), rules),
            OriginalRequestHeaders::Original,
        );
        let bearer = format!("Bearer {}", secret.expose_secret());
        let post = |uri: &str, headers: &[(&str, &str)]| {
            let mut headers = headers.to_vec();
            headers.push(("authorization", &bearer));
            original(OriginalRequestHeaders::Original, "POST", uri, &headers)
        };
        // The control: a plain POST passes.
        let res = auth.check(&post("/api/users/1", &[])).await;
        assert_eq!(res.status(), StatusCode::OK);
        for (uri, headers) in [
            ("/api/users/1", &[("x-http-method-override", "DELETE")][..]),
            ("/api/users/1", &[("X-HTTP-Method", "DELETE")]),
            ("/api/users/1", &[("x-method-override", "delete")]),
            // `HTTP_X_HTTP_METHOD_OVERRIDE` to Rack too.
            ("/api/users/1", &[("x_http_method_override", "DELETE")]),
            ("/api/users/1?_method=DELETE", &[]),
            ("/api/users/1?a=1&%5Fmethod=delete", &[]),
            ("/api/users/1?a=1;_method=DELETE", &[]),
        ] {
            let res = auth.check(&post(uri, headers)).await;
            assert_eq!(res.status(), StatusCode::FORBIDDEN, "{uri} {headers:?}");
        }
        // An override that names no method: refused, never ignored.
        for (uri, headers) in [
            (
                "/api/users/1",
                &[("x-http-method-override", "DELETE, PUT")][..],
            ),
            ("/api/users/1", &[("x-http-method-override", "")]),
            ("/api/users/1?_method=DE%20LETE", &[]),
            ("/api/users/1?_method", &[]),
        ] {
            let res = auth.check(&post(uri, headers)).await;
            assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{uri} {headers:?}");
        }
        // Names that only look alike change nothing.
        for (uri, headers) in [
            ("/api/users/1", &[("x-http-method-overrides", "DELETE")][..]),
            ("/api/users/1?my_method=DELETE&_methods=DELETE", &[]),
        ] {
            let res = auth.check(&post(uri, headers)).await;
            assert_eq!(res.status(), StatusCode::OK, "{uri} {headers:?}");
        }
    }

    /// CGI, FastCGI and WSGI upstreams (Caddy's fastcgi transport, old Puma) read `X-Auth_Subject`
    /// and `x_auth_subject` as `X-Auth-Subject`; the gateway overwrites only the exact spelling,
    /// and forward-auth cannot remove a header: a request carrying another spelling is refused.
    #[tokio::test]
    async fn an_identity_header_in_another_spelling_is_refused() {
        let tokens = Tokens::new(MemoryStore::new());
        let anonymous = super::super::rules::RouteRules::default().default_rule(
            super::super::rules::RouteRule {
                anonymous: true,
                ..super::super::rules::RouteRule::new("/")
            },
        );
        let auth = ForwardAuth::new(
            Gate::with_rules(tokens.layer().build(), anonymous),
            OriginalRequestHeaders::Forwarded,
        );
        for name in [
            "x-auth_subject",
            "X_Auth_Subject",
            "x_auth-token-id",
            "x-auth-token_name",
            "X-AUTH_SCOPES",
        ] {
            let res = auth.check(&forwarded("/x", &[(name, "root")])).await;
            assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{name}");
        }
        // The exact spelling is the gateway's to overwrite; the headers that only look alike pass.
        for name in [
            "X-Auth-Subject",
            "x-auth-subjects",
            "x-auth_subject2",
            "x-auth",
        ] {
            let res = auth.check(&forwarded("/x", &[(name, "root")])).await;
            assert_eq!(res.status(), StatusCode::OK, "{name}");
        }
        // Configured names count, whatever their own spelling.
        let auth = auth.identity_headers(IdentityHeaders {
            subject: HeaderName::from_static("remote_user"),
            ..IdentityHeaders::default()
        });
        let res = auth
            .check(&forwarded("/x", &[("remote-user", "root")]))
            .await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST);
        let res = auth
            .check(&forwarded("/x", &[("remote_user", "root")]))
            .await;
        assert_eq!(res.status(), StatusCode::OK);
    }

    /// nginx passes `$request_uri` as the client sent it, a raw `#` included, and `http::Uri`
    /// drops everything from the `#`: `/public#/../admin/secret.txt` was judged as `/public`,
    /// while Go's `http.FileServer` serves `/admin/secret.txt`. A request target never carries a
    /// fragment: refused with 400, with a token or without.
    #[tokio::test]
    async fn a_raw_fragment_in_the_original_uri_is_refused() {
        use super::super::rules::{RouteRule, RouteRules};
        let tokens = Tokens::new(MemoryStore::new());
        let (_, secret) = tokens.issue(NewToken::new("mallory", "ci")).await.unwrap();
        let rules = RouteRules::new(vec![
            RouteRule {
                scopes: crate::ScopeSet::parse(["admin"]).unwrap(),
                ..RouteRule::new("/admin")
            },
            RouteRule {
                anonymous: true,
                ..RouteRule::new("/public")
            },
        ]);
        let auth = ForwardAuth::new(
            Gate::with_rules(tokens.layer().build(), rules),
            OriginalRequestHeaders::Forwarded,
        );
        let bearer = format!("Bearer {}", secret.expose_secret());
        for uri in [
            "/public#/../admin/secret.txt",
            "/public?x=1#/../../admin/secret.txt",
            "/public#",
            "/public/%23/x#y",
        ] {
            for headers in [&[][..], &[("authorization", bearer.as_str())]] {
                let res = auth.check(&forwarded(uri, headers)).await;
                assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{uri}");
            }
        }
        // An escaped `#` is a character of the path: judged as written.
        let res = auth.check(&forwarded("/public/%23x", &[])).await;
        assert_eq!(res.status(), StatusCode::OK);
    }
}
