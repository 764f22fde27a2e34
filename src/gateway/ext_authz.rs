//! Envoy's external authorization (`envoy.service.auth.v3.Authorization/Check`, feature
//! `ext-authz`), over the layer.
//!
//! Each `Check` becomes an HTTP request through the [`Gate`]: [`PatAuthLayer`] and the matching
//! route rule (its scopes, or an anonymous pass; those of any method a method override names
//! too, see [`Gate::check`]): the method, path and headers of `attributes.request.http` (its
//! `header_map` too when Envoy sends one), and the peer address from `attributes.source.address`
//! only. A client header such as `X-Forwarded-For` counts only as the layer's trusted-proxy
//! configuration says, exactly as for a request through the layer.
//!
//! - Accepted: `OK`, with the identity headers ([`IdentityHeaders`]) in `ok_response.headers`,
//!   overwriting any the client sent (all four, always: empty on an anonymous route's pass without
//!   a token, and for a value that is not a valid header value), their other spellings in
//!   `headers_to_remove` (CGI-style upstreams read them as the same headers): always `_` for `-`
//!   and the reverse, and every other spelling the request carries (`x-auth_subject`, see
//!   [`IdentityHeaders::is_other_spelling`]), and, with
//!   [`hide_credentials`](ExtAuthz::hide_credentials), the credential headers there too.
//! - Refused: `UNAUTHENTICATED` (401) or `PERMISSION_DENIED` (any other status), with the layer's
//!   HTTP status, headers (`WWW-Authenticate`, `Retry-After`) and JSON body in `denied_response`.
//!
//! ```no_run
//! # async fn run(layer: tower_pat::PatAuthLayer) -> Result<(), Box<dyn std::error::Error>> {
//! use tower_pat::gateway::ext_authz::ExtAuthz;
//!
//! tonic::transport::Server::builder()
//!     .add_service(ExtAuthz::new(layer).into_server())
//!     .serve("127.0.0.1:9191".parse()?)
//!     .await?;
//! # Ok(())
//! # }
//! ```

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use envoy_types::ext_authz::v3::pb::{
    Address, Authorization, AuthorizationServer, CheckRequest, CheckResponse, DeniedHttpResponse,
    HeaderAppendAction, HeaderValue, HeaderValueOption, HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::google::rpc;
use http::{HeaderName, Method, Request};
use http_body_util::Empty;

use super::IdentityHeaders;
use super::gate::{Decision, Gate};
use super::rules::RouteRules;
use crate::{AuthError, PatAuthLayer};

/// gRPC status codes used in `CheckResponse.status`.
const GRPC_OK: i32 = 0;
const GRPC_PERMISSION_DENIED: i32 = 7;
const GRPC_UNAUTHENTICATED: i32 = 16;

/// The `Authorization` service: see the [module docs](self).
#[derive(Clone, Debug)]
pub struct ExtAuthz {
    gate: Gate,
    identity: IdentityHeaders,
    credential_headers: Vec<HeaderName>,
    hide_credentials: bool,
}

impl ExtAuthz {
    /// Verifies with `layer` (its token sources, trusted proxies, required scopes, cache and
    /// store), with no route rules and the default identity headers.
    pub fn new(layer: PatAuthLayer) -> Self {
        Self::from_gate(Gate::new(layer))
    }

    /// Verifies through `gate`: its layer and route rules.
    pub fn from_gate(gate: Gate) -> Self {
        Self {
            gate,
            identity: IdentityHeaders::default(),
            credential_headers: vec![http::header::AUTHORIZATION],
            hide_credentials: false,
        }
    }

    /// Requires each matching rule's scopes on top of the layer's (first match wins), or lets a
    /// request without a token through on an anonymous rule.
    pub fn rules(mut self, rules: RouteRules) -> Self {
        self.gate = Gate::with_rules(self.gate.layer().clone(), rules);
        self
    }

    /// The gate: its decisions so far.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// The names of the identity headers (default `X-Auth-Subject`, …).
    pub fn identity_headers(mut self, identity: IdentityHeaders) -> Self {
        self.identity = identity;
        self
    }

    /// Asks Envoy to remove the credential headers (`credential_headers`, default
    /// `Authorization`) from an accepted request before it goes upstream.
    pub fn hide_credentials(mut self, hide: bool) -> Self {
        self.hide_credentials = hide;
        self
    }

    /// The headers that carry a credential, removed with
    /// [`hide_credentials`](Self::hide_credentials) (default: `Authorization`).
    pub fn credential_headers(mut self, names: Vec<HeaderName>) -> Self {
        self.credential_headers = names;
        self
    }

    /// The tonic service to add to a server.
    pub fn into_server(self) -> AuthorizationServer<Self> {
        AuthorizationServer::new(self)
    }

    /// The HTTP request Envoy describes: method, path, headers and the peer address.
    fn http_request(check: &CheckRequest) -> Result<Request<Empty<Bytes>>, AuthError> {
        let attributes = check.attributes.as_ref();
        // A check without the HTTP request (Envoy's network filter, a misconfiguration), without
        // a method or with a path that does not parse (or has a `#`) is refused: never judged as
        // `GET /`, which an anonymous rule may allow.
        let h = attributes
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .ok_or(AuthError::InvalidRequest(
                "the check carries no HTTP request",
            ))?;
        let mut req = Request::new(Empty::new());
        *req.method_mut() = Method::from_bytes(h.method.as_bytes())
            .map_err(|_| AuthError::InvalidRequest("the request method is not a method"))?;
        *req.uri_mut() =
            super::request_target(h.path.as_bytes(), "the request path is not a valid URI")?;
        let map = h.header_map.iter().flat_map(|m| m.headers.iter()).map(|v| {
            let value = if v.raw_value.is_empty() {
                v.value.as_bytes()
            } else {
                v.raw_value.as_slice()
            };
            (v.key.as_str(), value)
        });
        let pairs = h
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_bytes()))
            .chain(map);
        for (name, value) in pairs {
            // Pseudo-headers (`:path`, …) and malformed ones are not HTTP headers.
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                http::HeaderValue::from_bytes(value),
            ) {
                // `HeaderMap` holds at most 24 576 names (three quarters of its 32 768-slot
                // table; `append` panics past that); a check can list more: refused, never
                // judged on a part of its headers.
                req.headers_mut().try_append(name, value).map_err(|_| {
                    AuthError::InvalidRequest("the request has more headers than can be read")
                })?;
            }
        }
        if let Some(peer) = attributes
            .and_then(|a| a.source.as_ref())
            .and_then(|s| s.address.as_ref())
            .and_then(|a| a.address.as_ref())
            .and_then(|a| match a {
                Address::SocketAddress(s) => {
                    let ip: IpAddr = s.address.parse().ok()?;
                    let port = match s.port_specifier {
                        Some(PortSpecifier::PortValue(p)) => u16::try_from(p).unwrap_or(0),
                        _ => 0,
                    };
                    Some(SocketAddr::new(ip, port))
                }
                _ => None,
            })
        {
            req.extensions_mut().insert(peer);
        }
        Ok(req)
    }
}

fn header(name: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: name.to_owned(),
            value: value.to_owned(),
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let decision = match Self::http_request(request.get_ref()) {
            Ok(req) => self.gate.check(req).await,
            Err(error) => self.gate.refuse(error),
        };
        let response = self.respond(decision, self.other_spellings(request.get_ref()));
        Ok(tonic::Response::new(response))
    }
}

impl ExtAuthz {
    /// The names of the headers of `check` (`headers` and `header_map`) that are identity headers
    /// in another spelling, lower-cased, without repetition.
    fn other_spellings(&self, check: &CheckRequest) -> Vec<String> {
        let Some(h) = check
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
        else {
            return Vec::new();
        };
        let names = h.headers.keys().chain(
            h.header_map
                .iter()
                .flat_map(|m| m.headers.iter().map(|v| &v.key)),
        );
        let mut out: Vec<String> = Vec::new();
        for name in names {
            if self.identity.is_other_spelling(name) {
                let name = name.to_ascii_lowercase();
                if !out.contains(&name) {
                    out.push(name);
                }
            }
        }
        out
    }

    /// The `CheckResponse` for the gate's decision; `other_spellings`: the request's identity
    /// headers in other spellings, removed on a pass.
    fn respond(&self, decision: Decision, other_spellings: Vec<String>) -> CheckResponse {
        match decision {
            Decision::Allowed(principal) => {
                // All four, always, overwriting the client's: empty on an anonymous pass (Envoy
                // keeps empty values from an authorization service) and for a value that is no
                // header value.
                let headers = self
                    .identity
                    .values(principal.as_ref())
                    .into_iter()
                    .map(|(name, value)| {
                        header(
                            name.as_str(),
                            std::str::from_utf8(value.as_bytes()).unwrap_or(""),
                        )
                    })
                    .collect();
                // The identity headers' other spellings go too (`_` for `-`, and `-` for `_`):
                // CGI, FastCGI and WSGI upstreams read a client's `x_auth_subject` as
                // `X-Auth-Subject`.
                let mut headers_to_remove: Vec<String> = self
                    .identity
                    .names()
                    .iter()
                    .flat_map(|name| {
                        let name = name.as_str();
                        [name.replace('-', "_"), name.replace('_', "-")]
                    })
                    .filter(|spelling| self.identity.names().iter().all(|n| n.as_str() != spelling))
                    .collect();
                headers_to_remove.dedup();
                // And every other spelling the request carries (`x-auth_subject`): the same
                // header to those upstreams too.
                for spelling in other_spellings {
                    if !headers_to_remove.contains(&spelling) {
                        headers_to_remove.push(spelling);
                    }
                }
                if self.hide_credentials {
                    headers_to_remove.extend(
                        self.credential_headers
                            .iter()
                            .map(|h| h.as_str().to_owned()),
                    );
                }
                CheckResponse {
                    status: Some(rpc::Status {
                        code: GRPC_OK,
                        ..Default::default()
                    }),
                    http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                        headers,
                        headers_to_remove,
                        ..Default::default()
                    })),
                    ..Default::default()
                }
            }
            Decision::Denied { response, .. } => {
                let status = response.status().as_u16();
                let headers = response
                    .headers()
                    .iter()
                    .filter_map(|(k, v)| Some(header(k.as_str(), v.to_str().ok()?)))
                    .collect();
                CheckResponse {
                    status: Some(rpc::Status {
                        code: if status == 401 {
                            GRPC_UNAUTHENTICATED
                        } else {
                            GRPC_PERMISSION_DENIED
                        },
                        ..Default::default()
                    }),
                    http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                        status: Some(HttpStatus {
                            code: i32::from(status),
                        }),
                        headers,
                        body: String::from_utf8_lossy(response.body()).into_owned(),
                    })),
                    ..Default::default()
                }
            }
        }
    }
}
