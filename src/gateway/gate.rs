//! [`Gate`]: the one check behind every gateway contract. A gateway's question (forward-auth,
//! ext_authz) becomes an HTTP request through [`PatAuthLayer`], the layer's answer and the
//! matching route rule's scopes become a [`Decision`].

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{BodyExt, Empty};
use tower::{Layer, ServiceExt};

use super::rules::RouteRules;
use crate::stats::{Counter, Outcomes, Stats};
use crate::{AuthError, PatAuthLayer, Principal, RefusedToken};

/// What the gate decided for one request.
#[derive(Debug)]
pub enum Decision {
    /// The request may go on: with the token's principal, or without one on an anonymous route
    /// when it carried no token.
    Allowed(Option<Principal>),
    /// Refused: the layer's response (status, `WWW-Authenticate`, `Retry-After`, JSON body) and
    /// the reason.
    Denied {
        /// The refusal as the layer answered it, its body collected.
        response: Response<Bytes>,
        /// Why.
        error: AuthError,
    },
}

/// Verifies gateway requests through a layer and route rules. Cloning is cheap and clones share
/// the counters.
#[derive(Clone, Debug)]
pub struct Gate {
    layer: PatAuthLayer,
    rules: RouteRules,
    decisions: std::sync::Arc<Stats>,
}

impl Gate {
    /// Verifies with `layer` (its token sources, trusted proxies, required scopes, cache and
    /// store), with no route rules: every request needs a valid token.
    pub fn new(layer: PatAuthLayer) -> Self {
        Self::with_rules(layer, RouteRules::default())
    }

    /// Verifies with `layer` and `rules`: the scopes of the rules the request's path matches (see
    /// [`RouteRules::requirement`]) on top of the layer's.
    pub fn with_rules(layer: PatAuthLayer, rules: RouteRules) -> Self {
        Self {
            layer,
            rules,
            decisions: Default::default(),
        }
    }

    /// The layer the gate verifies with.
    pub fn layer(&self) -> &PatAuthLayer {
        &self.layer
    }

    /// The route rules.
    pub fn rules(&self) -> &RouteRules {
        &self.rules
    }

    /// The gate's decisions so far, by outcome (a route rule's scope refusal counts as
    /// `scope_denied`; an anonymous route's pass without a token as `anonymous`).
    pub fn decisions(&self) -> Outcomes {
        self.decisions.snapshot().0
    }

    /// Refuses a request the gateway could not translate, with the layer's response for `error`.
    pub fn refuse(&self, error: AuthError) -> Decision {
        self.decisions.refused(&error);
        tracing::info!(
            target: "tower_pat::gateway",
            reason = error.reason(),
            message = error.message(),
            "request refused"
        );
        Decision::Denied {
            response: self.layer.error_response(&error),
            error,
        }
    }

    /// Decides `req`: its method, URI, headers and peer address (the `SocketAddr` or
    /// `ConnectInfo` extension) are what the layer sees. The request's `Content-Type` is dropped,
    /// so that a gRPC request gets the layer's HTTP answer, which the gateway translates.
    ///
    /// The route rules are those of every method the request may be run as: its own and any a
    /// method override names (`X-HTTP-Method-Override`, `X-HTTP-Method`, `X-Method-Override`, a
    /// `_method` query parameter, also under a name PHP renames to it, and in the query that an
    /// escaped `?` in the path starts for an upstream that decodes once more), as Rails,
    /// Symfony, Laravel and Express do; an override that names no method, or overrides that name more
    /// than one, are refused (400). A `_method` field of a form or JSON body is not seen.
    ///
    /// Every refusal is logged (target `tower_pat::gateway`, level info) with its reason, the
    /// route rule, the method, the client address and, for a token that matched a record, its
    /// id; never the path (its query may hold a token) nor a secret.
    pub async fn check(&self, mut req: Request<Empty<Bytes>>) -> Decision {
        req.headers_mut().remove(header::CONTENT_TYPE);
        // Every rule some reading of the path and method matches counts (fail closed); a path
        // that cannot be read, or an override that names no method, is refused like a URI that
        // does not parse.
        let rule = match methods(&req)
            .and_then(|methods| self.rules.requirement_any(&methods, req.uri().path()))
        {
            Ok(requirement) => requirement,
            Err(error) => return self.refuse(error),
        };
        let method = req.method().clone();
        let client = self
            .layer
            .client_ip_source()
            .client_addr(req.headers(), req.extensions())
            .ip();
        let Ok(res) = self
            .layer
            .layer(tower::service_fn(accepted))
            .oneshot(req)
            .await;
        let (parts, body) = res.into_parts();
        let error = parts.extensions.get::<AuthError>().cloned();
        let principal = parts.extensions.get::<Principal>().cloned();
        let decision = match (error, principal) {
            (None, Some(principal)) if parts.status.is_success() => {
                if principal.scopes().grants_all(&rule.scopes) {
                    Decision::Allowed(Some(principal))
                } else {
                    let error = AuthError::InsufficientScope(rule.scopes.clone());
                    let mut response = self.layer.error_response(&error);
                    response.extensions_mut().insert(RefusedToken(principal));
                    Decision::Denied { response, error }
                }
            }
            (Some(AuthError::MissingCredentials | AuthError::CredentialNotAccepted(_)), _)
                if rule.anonymous =>
            {
                Decision::Allowed(None)
            }
            (error, _) => {
                // A pass without a principal is no identity: refused like a missing token.
                let error = error.unwrap_or(AuthError::MissingCredentials);
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let mut response = Response::from_parts(parts, body);
                if response.status().is_success() {
                    *response.status_mut() = error.status();
                }
                Decision::Denied { response, error }
            }
        };
        match &decision {
            Decision::Allowed(Some(_)) => self.decisions.add(Counter::OkHit),
            Decision::Allowed(None) => self.decisions.add(Counter::Anonymous),
            Decision::Denied { response, error } => {
                self.decisions.refused(error);
                let route = rule
                    .rules
                    .iter()
                    .map(|&i| match i {
                        Some(_) => self.rules.rule(i).path_prefix.as_str(),
                        None => "(default)",
                    })
                    .collect::<Vec<_>>()
                    .join(" ");
                tracing::info!(
                    target: "tower_pat::gateway",
                    reason = error.reason(),
                    status = response.status().as_u16(),
                    route = route.as_str(),
                    method = %method,
                    client = client.map(tracing::field::display),
                    token_id = response.extensions().get::<RefusedToken>().map(RefusedToken::token_id),
                    "request refused"
                );
            }
        }
        decision
    }
}

/// The headers that ask an upstream to run a request as another method: Rails
/// (Rack::MethodOverride), Symfony, Laravel, Express's `method-override`, Spring.
const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// The methods an upstream may run `req` as: its own, and every one a method override names (one
/// of [`METHOD_OVERRIDE_HEADERS`], in any spelling a CGI-style upstream reads as it, or a
/// `_method` query parameter, `&` or `;` separated, percent-decoded, also in the query an escaped
/// `?` in the path starts). An override that names no
/// method (empty, a list, a space) is refused: never ignored; so are overrides that name more
/// than one method (the same in another case counts as one). (A `_method` field of a form or
/// JSON body is not seen: the gateway sends no body.)
fn methods(req: &Request<Empty<Bytes>>) -> Result<Vec<http::Method>, AuthError> {
    let mut methods = vec![req.method().clone()];
    // Every override met, all the same method in some letter case.
    let mut overrides = std::collections::HashSet::new();
    let mut add = |value: &[u8]| {
        let method = http::Method::from_bytes(value).map_err(|_| {
            AuthError::InvalidRequest(
                "a method override (X-HTTP-Method-Override, _method) names no method",
            )
        })?;
        // One method at most, in any case: more is no request a client means, and each would
        // multiply the work of judging the path.
        if overrides.iter().next().is_some_and(|first: &http::Method| {
            !first.as_str().eq_ignore_ascii_case(method.as_str())
        }) {
            return Err(AuthError::InvalidRequest(
                "the method overrides (X-HTTP-Method-Override, _method) name more than one method",
            ));
        }
        if overrides.insert(method.clone()) && method != methods[0] {
            methods.push(method);
        }
        Ok::<_, AuthError>(())
    };
    for (name, value) in req.headers() {
        if METHOD_OVERRIDE_HEADERS
            .iter()
            .any(|h| super::same_header_to_cgi(h, name.as_str()))
        {
            add(value.as_bytes())?;
        }
    }
    let mut query = |query: &str| {
        for (key, value) in crate::auth::query_pairs(query) {
            if crate::auth::query_key(key) == b"_method" {
                add(&crate::auth::percent_decode(value.as_bytes()))?;
            }
        }
        Ok::<_, AuthError>(())
    };
    query(req.uri().query().unwrap_or(""))?;
    // An escaped `?` in the path (`/users/1%3F_method=DELETE`) starts a query to an upstream
    // that decodes once more and parses again, as the route rules read the path too
    // ([`RouteRules::requirement`](super::rules::RouteRules::requirement)).
    for round in super::rules::decode_rounds(req.uri().path())
        .0
        .iter()
        .skip(1)
    {
        if let Some((_, rest)) = round.split_once('?') {
            query(rest.split('#').next().unwrap_or(""))?;
        }
    }
    Ok(methods)
}

/// The inner service behind the layer: answers 200 carrying the request's principal.
async fn accepted(req: Request<Empty<Bytes>>) -> Result<Response<Empty<Bytes>>, Infallible> {
    let mut res = Response::new(Empty::new());
    if let Some(p) = req.extensions().get::<Principal>() {
        res.extensions_mut().insert(p.clone());
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn methods_of(method: &str, uri: &str) -> Result<Vec<String>, AuthError> {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Empty::<Bytes>::new())
            .unwrap();
        methods(&req).map(|m| m.iter().map(|m| m.as_str().to_owned()).collect())
    }

    /// Overrides name one method at most (in any case): more is refused before any rule is
    /// read, so a long query of them costs no more than one.
    #[test]
    fn overrides_name_one_method_at_most() {
        let got = methods_of("POST", "/x?_method=DELETE&_method=delete&.method=DELETE");
        assert_eq!(got.unwrap(), ["POST", "DELETE", "delete"]);
        for uri in [
            "/x?_method=DELETE&_method=PUT",
            "/x?_method=POST&_method=DELETE",
            "/x?_method=DELETE&.method=PATCH",
        ] {
            assert!(
                matches!(methods_of("POST", uri), Err(AuthError::InvalidRequest(_))),
                "{uri}"
            );
        }
        let req = Request::builder()
            .method("POST")
            .uri("/x?_method=DELETE")
            .header("x-http-method-override", "PUT")
            .body(Empty::<Bytes>::new())
            .unwrap();
        assert!(methods(&req).is_err());
    }

    /// An escaped `?` in the path starts a query to an upstream that decodes once more: a
    /// `_method` there counts, under the same rules (one method at most).
    #[test]
    fn an_override_behind_an_escaped_question_mark_counts() {
        for uri in [
            "/api/users/1%3F_method=DELETE",
            "/api/users/1%253F_method=DELETE",
            "/api/users/1%3Fa=1%26.method=DELETE",
        ] {
            assert_eq!(
                methods_of("POST", uri).unwrap(),
                ["POST", "DELETE"],
                "{uri}"
            );
        }
        assert!(methods_of("POST", "/api/users/1%3F_method=PUT?_method=DELETE").is_err());
        assert_eq!(
            methods_of("POST", "/api/users/1%3Fmethod=DELETE").unwrap(),
            ["POST"]
        );
    }

    /// PHP renames `$_GET` keys (Symfony and Laravel read `_method` there): each of these is
    /// `$_GET['_method'] === 'DELETE'`, so each is an override.
    #[test]
    fn php_renamed_query_keys_are_method_overrides() {
        for query in [
            "_method=DELETE",
            ".method=DELETE",
            "%2Emethod=DELETE",
            "+_method=DELETE",
            "%20_method=DELETE",
            "++.method=DELETE",
            "%5Bmethod=DELETE",
            "_method%00=DELETE",
            "_method%00x=DELETE",
            "a=1&_method%00.x=DELETE",
        ] {
            let got = methods_of("POST", &format!("/api/users/1?{query}")).unwrap();
            assert_eq!(got, ["POST", "DELETE"], "{query}");
        }
        // Other names stay other parameters.
        for query in [
            "x_method=DELETE",
            "_methodx=DELETE",
            "__method=DELETE",
            "%00_method=DELETE",
        ] {
            let got = methods_of("POST", &format!("/api/users/1?{query}")).unwrap();
            assert_eq!(got, ["POST"], "{query}");
        }
    }
}
