//! Envoy ext_authz (`envoy.service.auth.v3.Authorization/Check`) over the layer, called through a
//! tonic client of the same protos (Envoy itself is not packaged here).
#![cfg(all(feature = "ext-authz", feature = "sqlite"))]

mod common;
mod support_patd;

use std::collections::HashMap;
use std::net::SocketAddr;

use envoy_types::pb::envoy::config::core::v3::{
    Address as CoreAddress, HeaderMap, HeaderValue, SocketAddress, address::Address,
    header_value_option::HeaderAppendAction, socket_address::PortSpecifier,
};
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, attribute_context,
    authorization_client::AuthorizationClient, check_response::HttpResponse,
};
use tonic::transport::{Channel, Server};
use tower_pat::gateway::ext_authz::ExtAuthz;
use tower_pat::gateway::rules::{RouteRule, RouteRules};
use tower_pat::{MemoryStore, NewToken, PatAuthLayer, TokenRecord, Tokens};

async fn serve(service: ExtAuthz) -> AuthorizationClient<Channel> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .add_service(service.into_server())
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    AuthorizationClient::new(channel)
}

/// A `CheckRequest` for `GET path` from `source` with these headers.
fn check_request(path: &str, source: &str, headers: &[(&str, &str)]) -> CheckRequest {
    let source: SocketAddr = source.parse().unwrap();
    let headers: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .chain([(":path".to_owned(), path.to_owned())])
        .collect();
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(attribute_context::Peer {
                address: Some(CoreAddress {
                    address: Some(Address::SocketAddress(SocketAddress {
                        address: source.ip().to_string(),
                        port_specifier: Some(PortSpecifier::PortValue(u32::from(source.port()))),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    method: "GET".to_owned(),
                    path: path.to_owned(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// The HTTP request of a check made by [`check_request`], to change.
fn http_mut(req: &mut CheckRequest) -> &mut attribute_context::HttpRequest {
    req.attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
        .expect("a check made by check_request has an HTTP request")
}

/// The service over `s`, with one route rule: paths under `prefix` are anonymous.
async fn serve_anonymous(s: &Setup, prefix: &str) -> AuthorizationClient<Channel> {
    let rules = RouteRules::new(vec![RouteRule {
        anonymous: true,
        ..RouteRule::new(prefix)
    }]);
    serve(ExtAuthz::new(s.layer.clone()).rules(rules)).await
}

async fn check(client: &mut AuthorizationClient<Channel>, req: CheckRequest) -> CheckResponse {
    client.check(req).await.unwrap().into_inner()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The OK response's headers, as name → (value, overwrites).
fn ok_headers(res: &CheckResponse) -> HashMap<String, (String, bool)> {
    let Some(HttpResponse::OkResponse(ok)) = &res.http_response else {
        panic!("not an OK response: {res:?}");
    };
    ok.headers
        .iter()
        .map(|h| {
            let v = h.header.as_ref().unwrap();
            (
                v.key.clone(),
                (
                    v.value.clone(),
                    h.append_action == HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                ),
            )
        })
        .collect()
}

/// The denied response's HTTP status, `WWW-Authenticate` and JSON body.
fn denied(res: &CheckResponse) -> (i32, Option<String>, serde_json::Value) {
    let Some(HttpResponse::DeniedResponse(d)) = &res.http_response else {
        panic!("not a denied response: {res:?}");
    };
    let www = d
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .find(|h| h.key.eq_ignore_ascii_case("www-authenticate"))
        .map(|h| h.value.clone());
    (
        d.status.as_ref().unwrap().code,
        www,
        serde_json::from_str(&d.body).unwrap(),
    )
}

fn grpc_code(res: &CheckResponse) -> i32 {
    res.status.as_ref().unwrap().code
}

struct Setup {
    tokens: Tokens,
    layer: PatAuthLayer,
}

fn setup() -> Setup {
    let tokens = Tokens::new(MemoryStore::new());
    let layer = tokens.layer().build();
    Setup { tokens, layer }
}

async fn issue(tokens: &Tokens, new: NewToken) -> (TokenRecord, String) {
    let (r, s) = tokens.issue(new).await.unwrap();
    (r, s.expose_secret().to_owned())
}

#[tokio::test]
async fn a_valid_token_is_ok_with_identity_headers_that_overwrite_the_clients() {
    let s = setup();
    let (record, token) = issue(&s.tokens, common::new_token("alice", &["api", "read"])).await;
    let mut client = serve(ExtAuthz::new(s.layer.clone())).await;
    let res = check(
        &mut client,
        check_request(
            "/thing",
            "192.0.2.1:4000",
            &[
                ("authorization", &bearer(&token)),
                ("x-auth-subject", "root"),
                ("x-auth_token-id", "1"),
            ],
        ),
    )
    .await;
    assert_eq!(grpc_code(&res), 0);
    let h = ok_headers(&res);
    assert_eq!(h["x-auth-subject"], ("alice".to_owned(), true));
    assert_eq!(h["x-auth-token-id"], (record.id.clone(), true));
    assert_eq!(h["x-auth-token-name"].0, record.name);
    assert_eq!(h["x-auth-scopes"].0, "api read");
    let Some(HttpResponse::OkResponse(ok)) = &res.http_response else {
        unreachable!()
    };
    // The identity headers' underscore spellings, which CGI-style upstreams read as the same
    // headers, are removed, and so is every other spelling the request carries (a mixed one is
    // the same header to them too); the credential stays.
    let underscored = [
        "x_auth_subject",
        "x_auth_token_id",
        "x_auth_token_name",
        "x_auth_scopes",
    ]
    .map(str::to_owned);
    assert_eq!(
        ok.headers_to_remove,
        [&underscored[..], &["x-auth_token-id".to_owned()]].concat()
    );

    // hide_credentials: the credential header is removed before the request goes upstream.
    let mut client = serve(ExtAuthz::new(s.layer.clone()).hide_credentials(true)).await;
    let res = check(
        &mut client,
        check_request(
            "/thing",
            "192.0.2.1:4000",
            &[("authorization", &bearer(&token))],
        ),
    )
    .await;
    let Some(HttpResponse::OkResponse(ok)) = &res.http_response else {
        panic!("refused: {res:?}")
    };
    assert_eq!(
        ok.headers_to_remove,
        [&underscored[..], &["authorization".to_owned()]].concat()
    );
}

/// CGI, FastCGI and WSGI upstreams (and Caddy's fastcgi transport, which maps every `-` to `_`
/// and upper-cases the name) read `X-Auth_Subject` as `X-Auth-Subject`: every spelling of an
/// identity header the request carries, in `headers` or `header_map`, is removed, on an anonymous
/// pass too.
#[tokio::test]
async fn every_spelling_of_an_identity_header_the_request_carries_is_removed() {
    let s = setup();
    let mut client = serve_anonymous(&s, "/").await;
    let mut req = check_request(
        "/x",
        "192.0.2.1:4000",
        &[("x-auth_subject", "root"), ("x-auth-scopes", "admin")],
    );
    http_mut(&mut req).header_map = Some(HeaderMap {
        headers: vec![HeaderValue {
            key: "X_Auth-Token-Name".to_owned(),
            raw_value: b"root".to_vec(),
            ..Default::default()
        }],
    });
    let res = check(&mut client, req).await;
    let Some(HttpResponse::OkResponse(ok)) = &res.http_response else {
        panic!("not allowed: {res:?}");
    };
    for spelling in ["x-auth_subject", "x_auth-token-name", "x_auth_scopes"] {
        assert!(
            ok.headers_to_remove.iter().any(|h| h == spelling),
            "{spelling} stays: {:?}",
            ok.headers_to_remove
        );
    }
    // The exact spelling is overwritten, not removed.
    assert!(!ok.headers_to_remove.iter().any(|h| h == "x-auth-scopes"));
    assert_eq!(ok_headers(&res)["x-auth-scopes"], (String::new(), true));
}

#[tokio::test]
async fn the_credential_is_read_from_header_map_too() {
    let s = setup();
    let (_, token) = issue(&s.tokens, common::new_token("alice", &["api"])).await;
    let mut client = serve(ExtAuthz::new(s.layer.clone())).await;
    let mut req = check_request("/", "192.0.2.1:4000", &[]);
    let http = http_mut(&mut req);
    http.header_map = Some(HeaderMap {
        headers: vec![HeaderValue {
            key: "authorization".to_owned(),
            raw_value: bearer(&token).into_bytes(),
            ..Default::default()
        }],
    });
    let res = check(&mut client, req).await;
    assert_eq!(grpc_code(&res), 0, "{res:?}");
}

/// A `POST` with `X-HTTP-Method-Override: DELETE` (or `_method=DELETE` in the query) is a
/// `DELETE` to Rails, Symfony, Laravel and Express's `method-override`: it must satisfy the
/// rules of both methods.
#[tokio::test]
async fn a_method_override_is_judged_as_the_method_it_names_too() {
    let s = setup();
    let (_, token) = issue(&s.tokens, common::new_token("alice", &["read"])).await;
    let rules = RouteRules::new(vec![RouteRule {
        methods: vec![http::Method::DELETE],
        scopes: tower_pat::ScopeSet::parse(["admin"]).unwrap(),
        ..RouteRule::new("/api")
    }]);
    let mut client = serve(ExtAuthz::new(s.layer.clone()).rules(rules)).await;
    let post = |path: &str, headers: &[(&str, &str)]| {
        let auth = bearer(&token);
        let mut headers = headers.to_vec();
        headers.push(("authorization", &auth));
        let mut req = check_request(path, "192.0.2.1:4000", &headers);
        http_mut(&mut req).method = "POST".to_owned();
        req
    };
    let res = check(&mut client, post("/api/users/1", &[])).await;
    assert_eq!(grpc_code(&res), 0, "{res:?}");
    for req in [
        post("/api/users/1", &[("x-http-method-override", "DELETE")]),
        post("/api/users/1?_method=DELETE", &[]),
    ] {
        let res = check(&mut client, req).await;
        assert_eq!(denied(&res).0, 403, "{res:?}");
    }
    let res = check(
        &mut client,
        post("/api/users/1", &[("x-http-method", "not a method")]),
    )
    .await;
    assert_eq!(denied(&res).0, 400, "{res:?}");
}

#[tokio::test]
async fn no_token_is_401_with_a_challenge_and_a_json_body() {
    let s = setup();
    let mut client = serve(ExtAuthz::new(s.layer.clone())).await;
    let res = check(&mut client, check_request("/", "192.0.2.1:4000", &[])).await;
    assert_eq!(grpc_code(&res), 16);
    let (status, www, body) = denied(&res);
    assert_eq!(status, 401);
    assert!(www.unwrap().starts_with("Bearer"));
    assert_eq!(body["code"], "unauthorized", "{body}");
    assert_eq!(body["status"], 401);
}

#[tokio::test]
async fn a_route_rule_scope_the_token_lacks_is_403() {
    let s = setup();
    let (_, token) = issue(&s.tokens, common::new_token("alice", &["api"])).await;
    let rules = RouteRules::new(vec![RouteRule {
        scopes: common::scopes(&["admin:write"]),
        ..RouteRule::new("/admin")
    }]);
    let mut client = serve(ExtAuthz::new(s.layer.clone()).rules(rules)).await;
    let auth = bearer(&token);
    let res = check(
        &mut client,
        check_request(
            "/admin/users",
            "192.0.2.1:4000",
            &[("authorization", &auth)],
        ),
    )
    .await;
    assert_eq!(grpc_code(&res), 7);
    let (status, _, body) = denied(&res);
    assert_eq!(status, 403);
    assert_eq!(body["code"], "insufficient_scope", "{body}");
    let res = check(
        &mut client,
        check_request("/public", "192.0.2.1:4000", &[("authorization", &auth)]),
    )
    .await;
    assert_eq!(grpc_code(&res), 0);
}

#[tokio::test]
async fn the_client_address_comes_from_the_source_never_from_a_forwarded_header() {
    let s = setup();
    let new = common::new_token("alice", &["api"]).ip_restriction(["10.0.0.0/8".parse().unwrap()]);
    let (_, token) = issue(&s.tokens, new).await;
    let mut client = serve(ExtAuthz::new(s.layer.clone())).await;
    let auth = bearer(&token);
    let res = check(
        &mut client,
        check_request("/", "10.1.2.3:4000", &[("authorization", &auth)]),
    )
    .await;
    assert_eq!(grpc_code(&res), 0);
    let res = check(
        &mut client,
        check_request("/", "192.0.2.1:4000", &[("authorization", &auth)]),
    )
    .await;
    assert_eq!(denied(&res).0, 403);
    // A client-supplied X-Forwarded-For (or Forwarded) naming an allowed address changes nothing.
    for (name, value) in [
        ("x-forwarded-for", "10.1.2.3"),
        ("forwarded", "for=10.1.2.3"),
    ] {
        let res = check(
            &mut client,
            check_request(
                "/",
                "192.0.2.1:4000",
                &[("authorization", &auth), (name, value)],
            ),
        )
        .await;
        assert_eq!(denied(&res).0, 403, "{name} was believed");
    }
}

#[tokio::test]
async fn a_revoked_token_is_401() {
    let s = setup();
    let (record, token) = issue(&s.tokens, common::new_token("alice", &["api"])).await;
    let mut client = serve(ExtAuthz::new(s.layer.clone())).await;
    let auth = bearer(&token);
    let req = || check_request("/", "192.0.2.1:4000", &[("authorization", &auth)]);
    assert_eq!(grpc_code(&check(&mut client, req()).await), 0);
    s.tokens.revoke(&record.id).await.unwrap().unwrap();
    let res = check(&mut client, req()).await;
    assert_eq!(grpc_code(&res), 16);
    let (status, www, body) = denied(&res);
    assert_eq!(status, 401);
    assert!(www.is_some());
    assert_eq!(body["code"], "invalid_token", "{body}");
}

/// With an explicit trusted-proxy configuration on the layer, `X-Forwarded-For` counts, but only
/// when the source itself is a trusted proxy.
#[tokio::test]
async fn a_forwarded_header_counts_only_from_a_configured_trusted_proxy() {
    let tokens = Tokens::new(MemoryStore::new());
    let layer = tokens
        .layer()
        .trusted_proxies(
            ["127.0.0.0/8".parse().unwrap()],
            tower_pat::ForwardedHeader::XForwardedFor,
        )
        .build();
    let new = common::new_token("alice", &["api"]).ip_restriction(["10.0.0.0/8".parse().unwrap()]);
    let (_, token) = issue(&tokens, new).await;
    let mut client = serve(ExtAuthz::new(layer)).await;
    let auth = bearer(&token);
    let via = |source| {
        check_request(
            "/",
            source,
            &[("authorization", &auth), ("x-forwarded-for", "10.1.2.3")],
        )
    };
    assert_eq!(
        grpc_code(&check(&mut client, via("127.0.0.1:5000")).await),
        0
    );
    assert_eq!(
        denied(&check(&mut client, via("192.0.2.1:5000")).await).0,
        403
    );
}

#[tokio::test]
async fn an_anonymous_pass_overwrites_every_identity_header_with_an_empty_value() {
    let s = setup();
    let mut client = serve_anonymous(&s, "/public").await;
    // The client names itself root: Envoy must not pass that on.
    let res = check(
        &mut client,
        check_request(
            "/public/a",
            "192.0.2.1:4000",
            &[("x-auth-subject", "root"), ("x-auth-scopes", "admin")],
        ),
    )
    .await;
    assert_eq!(grpc_code(&res), 0, "{res:?}");
    let h = ok_headers(&res);
    for name in [
        "x-auth-subject",
        "x-auth-token-id",
        "x-auth-token-name",
        "x-auth-scopes",
    ] {
        assert_eq!(h.get(name), Some(&(String::new(), true)), "{name}: {res:?}");
    }
    // Through `;` parameters, the admin path behind the public prefix is no anonymous route.
    let res = check(
        &mut client,
        check_request("/public/..;/admin/users", "192.0.2.1:4000", &[]),
    )
    .await;
    assert_eq!(grpc_code(&res), 16, "{res:?}");
}

/// A check that does not describe an HTTP request (Envoy's network filter, a misconfigured
/// filter) or names no method is refused with 400: never judged as `GET /`, which an anonymous
/// rule may let through.
#[tokio::test]
async fn a_check_without_an_http_request_or_a_method_is_refused_not_judged_as_get_slash() {
    let s = setup();
    let mut client = serve_anonymous(&s, "/").await;
    // The control: `GET /` itself is anonymous here.
    let res = check(&mut client, check_request("/", "192.0.2.1:4000", &[])).await;
    assert_eq!(grpc_code(&res), 0, "{res:?}");

    let mut no_http = check_request("/", "192.0.2.1:4000", &[]);
    no_http.attributes.as_mut().unwrap().request = None;
    let mut no_method = check_request("/", "192.0.2.1:4000", &[]);
    http_mut(&mut no_method).method = String::new();
    for req in [no_http, no_method, CheckRequest::default()] {
        let res = check(&mut client, req).await;
        assert_ne!(grpc_code(&res), 0, "{res:?}");
        assert_eq!(denied(&res).0, 400, "{res:?}");
    }
}

/// `http::HeaderMap` holds at most 24 576 names, and a check can list more (40 000 one-byte
/// headers are ~300 KB, far below tonic's 4 MiB): such a check is refused with 400, even where
/// the route is anonymous. It used to panic the handler, resetting the stream without a
/// CheckResponse, which Envoy's `failure_mode_allow` lets through.
#[tokio::test(flavor = "multi_thread")]
async fn a_check_with_more_headers_than_a_header_map_holds_is_refused() {
    let s = setup();
    let mut client = serve_anonymous(&s, "/").await;
    let many = |n: usize| (0..n).map(|i| (format!("h{i}"), "v".to_owned()));
    let mut in_header_map = check_request("/", "192.0.2.1:4000", &[]);
    http_mut(&mut in_header_map).header_map = Some(HeaderMap {
        headers: many(40_000)
            .map(|(key, value)| HeaderValue {
                key,
                value,
                ..Default::default()
            })
            .collect(),
    });
    let mut in_headers = check_request("/", "192.0.2.1:4000", &[]);
    http_mut(&mut in_headers).headers.extend(many(40_000));
    for req in [in_header_map, in_headers] {
        let res = client
            .check(req)
            .await
            .expect("a CheckResponse")
            .into_inner();
        assert_ne!(grpc_code(&res), 0, "{res:?}");
        assert_eq!(denied(&res).0, 400, "{res:?}");
    }
    // The control: as many as fit are judged (anonymous here).
    let mut fits = check_request("/", "192.0.2.1:4000", &[]);
    http_mut(&mut fits).headers.extend(many(20_000));
    let res = check(&mut client, fits).await;
    assert_eq!(grpc_code(&res), 0, "{res:?}");
}

/// A path with a raw `#` is refused with 400: `http::Uri` drops everything from the `#`, so
/// `/public#/../admin` would be judged as `/public`, while an upstream that keeps the `#` in the
/// path (Go's `http.FileServer`) serves `/admin`.
#[tokio::test]
async fn a_path_with_a_fragment_is_refused() {
    let s = setup();
    let mut client = serve_anonymous(&s, "/public").await;
    for path in [
        "/public#/../admin/secret.txt",
        "/public?x#/../admin",
        "/public#",
    ] {
        let res = check(&mut client, check_request(path, "192.0.2.1:4000", &[])).await;
        assert_ne!(grpc_code(&res), 0, "{path}: {res:?}");
        assert_eq!(denied(&res).0, 400, "{path}: {res:?}");
    }
    let res = check(
        &mut client,
        check_request("/public/%23", "192.0.2.1:4000", &[]),
    )
    .await;
    assert_eq!(grpc_code(&res), 0, "{res:?}");
}

#[tokio::test]
async fn an_identity_value_that_is_no_header_value_is_sent_empty() {
    let s = setup();
    // The library takes any name; a newline cannot go in a header.
    let new =
        NewToken::new("alice", "ci\nx-auth-subject: root").scope_set(common::scopes(&["api"]));
    let (record, token) = issue(&s.tokens, new).await;
    let mut client = serve(ExtAuthz::new(s.layer.clone())).await;
    let res = check(
        &mut client,
        check_request(
            "/thing",
            "192.0.2.1:4000",
            &[
                ("authorization", &bearer(&token)),
                ("x-auth-token-name", "admin"),
            ],
        ),
    )
    .await;
    assert_eq!(grpc_code(&res), 0, "{res:?}");
    let h = ok_headers(&res);
    assert_eq!(h["x-auth-token-name"], (String::new(), true), "{res:?}");
    assert_eq!(h["x-auth-subject"], ("alice".to_owned(), true));
    assert_eq!(h["x-auth-token-id"], (record.id, true));
    assert_eq!(h["x-auth-scopes"], ("api".to_owned(), true));
}

/// `patd serve` with `ext_authz_listen`: Envoy's check over gRPC through the same gate as `/auth`
/// (the configured route rules and identity header names), on its own address.
#[tokio::test(flavor = "multi_thread")]
async fn patd_serves_ext_authz_on_its_own_address() {
    let port = support_patd::free_port();
    let dir = support_patd::Dir::new(&format!(
        "ext_authz_listen = \"127.0.0.1:{port}\"\n\
         [identity_headers]\nsubject = \"x_user\"\n\
         [[rule]]\npath_prefix = \"/admin\"\nscopes = [\"admin\"]\n\
         [[rule]]\npath_prefix = \"/public\"\nanonymous = true\n"
    ));
    let (token, id) = dir.issue(&[
        "--subject",
        "alice",
        "--name",
        "envoy",
        "--scope",
        "read",
        "--never-expires",
    ]);
    let _server = dir.serve();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    support_patd::wait_listening(addr).await;
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = AuthorizationClient::new(channel);
    let source = "192.0.2.7:5000";

    let ok = check(
        &mut client,
        check_request("/x", source, &[("authorization", &bearer(&token))]),
    )
    .await;
    assert_eq!(grpc_code(&ok), 0, "{ok:?}");
    let headers = ok_headers(&ok);
    assert_eq!(headers["x_user"], ("alice".to_owned(), true));
    assert_eq!(headers["x-auth-token-id"], (id, true));
    // The configured name's other spelling is removed: a CGI-style upstream reads a client's
    // `x-user` as `x_user`.
    let Some(HttpResponse::OkResponse(ok_response)) = &ok.http_response else {
        unreachable!()
    };
    assert!(
        ok_response.headers_to_remove.contains(&"x-user".to_owned()),
        "{:?}",
        ok_response.headers_to_remove
    );

    // The route rules of the configuration: a scope the token lacks, an anonymous route.
    let admin = check(
        &mut client,
        check_request(
            "/admin/users",
            source,
            &[("authorization", &bearer(&token))],
        ),
    )
    .await;
    assert_eq!(denied(&admin).0, 403);
    let none = check(&mut client, check_request("/x", source, &[])).await;
    assert_eq!(grpc_code(&none), 16, "UNAUTHENTICATED");
    assert_eq!(denied(&none).0, 401);
    let public = check(
        &mut client,
        check_request("/public/page", source, &[("x_user", "root")]),
    )
    .await;
    assert_eq!(grpc_code(&public), 0);
    assert_eq!(ok_headers(&public)["x_user"], (String::new(), true));
}
