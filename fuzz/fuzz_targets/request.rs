//! A full request through `PatAuthLayer` with every token source enabled (`Bearer`, `Token`, a
//! raw `Authorization` value, `X-API-Key`, the `access_token` query parameter), over a
//! `MemoryStore` holding a few known tokens, with trusted proxies and the failure counter on.
//! The method, URI, headers, peer and HTTP version come from the input.
//!
//! Properties: never panics; the inner service is reached only by a request that carries the
//! secret of a known, active token holding the required scope, from an allowed address, and the
//! principal is that token's; every refusal has a documented status with the JSON error shape (or
//! a gRPC status for a gRPC request), and no response shows a secret; a clean request with one
//! `Bearer` token gets exactly the answer its token deserves.
#![no_main]

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::time::Duration;

use arbitrary::Arbitrary;
use bytes::Bytes;
use chrono::Utc;
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
};
use http_body_util::{BodyExt, Full};
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use tower::{Layer, ServiceExt};
use tower_pat::{
    ForwardedHeader, MemoryStore, NewToken, PatAuthLayer, Principal, TokenStore, Tokens,
};
use tower_pat_fuzz::{Addr, block_on, canonical};

const REQUIRED: &str = "api:read";
const TRUSTED: &[&str] = &["10.0.0.0/8", "fd00::/8"];
const RESTRICTED_TO: &[&str] = &["192.0.2.0/24", "2001:db8::/32"];

/// What a token deserves when it arrives cleanly.
#[derive(Debug, Clone)]
enum Expect {
    Ok,
    MissingScope,
    /// Ok from these networks, 403 elsewhere.
    Restricted(Vec<IpNet>),
    Revoked,
    Expired,
    Unknown,
}

struct Known {
    secret: String,
    id: String,
    expect: Expect,
}

struct Fixture {
    layer: PatAuthLayer,
    tokens: Vec<Known>,
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|n| n.parse().expect("a CIDR")).collect()
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let store = MemoryStore::new();
        let trusted = nets(TRUSTED);
        let handle = Tokens::new(store.clone());
        let layer = handle
            .layer()
            .realm("fuzz")
            .accept_token_scheme()
            .accept_raw_authorization()
            .accept_header(HeaderName::from_static("x-api-key"))
            .accept_query_parameter()
            .trusted_proxies(trusted, ForwardedHeader::XForwardedFor)
            .require_scopes([REQUIRED])
            // Counts every failure (the counting path runs) without ever blocking.
            .limit_failures(u32::MAX, Duration::from_secs(1))
            .build();
        let now = Utc::now();
        let specs: Vec<(&[&str], Expect)> = vec![
            (&["api:read"], Expect::Ok),
            (&["*"], Expect::Ok),
            (&["other:read", "api:write"], Expect::MissingScope),
            (&["api:*"], Expect::Restricted(nets(RESTRICTED_TO))),
            (&["api:read"], Expect::Revoked),
            (&["api:read"], Expect::Expired),
            (&["api:read"], Expect::Unknown),
        ];
        let mut tokens = Vec::new();
        for (i, (scopes, expect)) in specs.into_iter().enumerate() {
            let mut new = NewToken::new("fuzz", format!("t{i}"))
                .scopes(scopes)
                .unwrap();
            if let Expect::Restricted(nets) = &expect {
                new = new.ip_restriction(nets.clone());
            }
            let (mut record, secret) = handle.mint(new, now);
            match expect {
                Expect::Revoked => record.revoked_at = Some(now),
                Expect::Expired => record.expires_at = Some(now - chrono::Duration::hours(1)),
                _ => {}
            }
            if !matches!(expect, Expect::Unknown) {
                block_on(store.insert(&record)).expect("insert a fixture token");
            }
            tokens.push(Known {
                secret: secret.expose_secret().to_owned(),
                id: record.id,
                expect,
            });
        }
        Fixture { layer, tokens }
    })
}

#[derive(Arbitrary, Debug)]
enum Cred<'a> {
    Known(u8),
    /// A known token with one byte replaced by an ASCII byte.
    Mutated(u8, u8, u8),
    Raw(&'a str),
}

impl Cred<'_> {
    fn render(&self, fx: &Fixture) -> String {
        let pick = |i: &u8| &fx.tokens[usize::from(*i) % fx.tokens.len()].secret;
        match self {
            Cred::Known(i) => pick(i).clone(),
            Cred::Mutated(i, at, byte) => {
                let mut bytes = pick(i).clone().into_bytes();
                let at = usize::from(*at) % bytes.len();
                bytes[at] = byte & 0x7f;
                String::from_utf8(bytes).expect("ASCII")
            }
            Cred::Raw(s) => (*s).to_owned(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Scheme<'a> {
    Bearer(u8),
    Token(u8),
    Basic,
    /// No scheme: the raw value.
    None,
    Custom(&'a str),
}

#[derive(Arbitrary, Debug)]
enum Header<'a> {
    Authorization {
        scheme: Scheme<'a>,
        cred: Cred<'a>,
        pad: u8,
    },
    ApiKey {
        cred: Cred<'a>,
        pad: u8,
    },
    Forwarded(Vec<(Addr, u8)>),
    XForwardedFor(Vec<(Addr, u8)>),
    ContentType(u8),
    Te(bool),
    Raw {
        name: &'a str,
        value: &'a [u8],
    },
}

#[derive(Arbitrary, Debug)]
enum QueryPart<'a> {
    AccessToken(Cred<'a>),
    Raw(&'a str),
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    method: u8,
    path: &'a str,
    query: Vec<QueryPart<'a>>,
    headers: Vec<Header<'a>>,
    peer: Option<(Addr, u16)>,
    http2: bool,
}

fn pad(value: &str, pad: u8) -> String {
    match pad % 6 {
        0 => value.to_owned(),
        1 => format!(" {value}"),
        2 => format!("{value} "),
        3 => format!("\t{value}\t"),
        4 => format!("{value} extra"),
        _ => format!("{value}\u{7f}"),
    }
}

fn case(word: &str, variant: u8) -> String {
    match variant % 3 {
        0 => word.to_owned(),
        1 => word.to_ascii_lowercase(),
        _ => word.to_ascii_uppercase(),
    }
}

fn node(addr: Addr, style: u8) -> String {
    let ip = addr.ip();
    match (style % 3, ip) {
        (0, _) => ip.to_string(),
        (1, IpAddr::V6(v6)) => format!("\"[{v6}]:443\""),
        (1, IpAddr::V4(v4)) => format!("{v4}:443"),
        _ => "unknown".to_owned(),
    }
}

fn header(h: &Header<'_>, fx: &Fixture) -> Option<(HeaderName, HeaderValue)> {
    let (name, value): (HeaderName, Vec<u8>) = match h {
        Header::Authorization {
            scheme,
            cred,
            pad: p,
        } => {
            let cred = cred.render(fx);
            let value = match scheme {
                Scheme::Bearer(c) => format!("{} {cred}", case("Bearer", *c)),
                Scheme::Token(c) => format!("{} {cred}", case("Token", *c)),
                Scheme::Basic => format!("Basic {cred}"),
                Scheme::None => cred,
                Scheme::Custom(s) => format!("{s} {cred}"),
            };
            (http::header::AUTHORIZATION, pad(&value, *p).into_bytes())
        }
        Header::ApiKey { cred, pad: p } => (
            HeaderName::from_static("x-api-key"),
            pad(&cred.render(fx), *p).into_bytes(),
        ),
        Header::Forwarded(nodes) => {
            let list: Vec<String> = nodes
                .iter()
                .take(8)
                .map(|(a, s)| format!("for={}", node(*a, *s)))
                .collect();
            (http::header::FORWARDED, list.join(", ").into_bytes())
        }
        Header::XForwardedFor(nodes) => {
            let list: Vec<String> = nodes.iter().take(8).map(|(a, s)| node(*a, *s)).collect();
            (
                HeaderName::from_static("x-forwarded-for"),
                list.join(", ").into_bytes(),
            )
        }
        Header::ContentType(v) => {
            let value = [
                "application/grpc",
                "application/grpc+proto",
                "application/json",
                "text/plain",
            ][usize::from(*v) % 4];
            (http::header::CONTENT_TYPE, value.as_bytes().to_vec())
        }
        Header::Te(trailers) => (
            http::header::TE,
            if *trailers {
                &b"trailers"[..]
            } else {
                &b"gzip"[..]
            }
            .to_vec(),
        ),
        Header::Raw { name, value } => (
            HeaderName::from_bytes(name.as_bytes()).ok()?,
            value.to_vec(),
        ),
    };
    Some((name, HeaderValue::from_bytes(&value).ok()?))
}

fn uri(input: &Input<'_>, fx: &Fixture, with_raw: bool) -> Option<Uri> {
    let path: String = input
        .path
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "/-._~".contains(*c))
        .take(64)
        .collect();
    let parts: Vec<String> = input
        .query
        .iter()
        .take(8)
        .filter_map(|p| match p {
            QueryPart::AccessToken(cred) => Some(format!("access_token={}", cred.render(fx))),
            QueryPart::Raw(s) if with_raw => Some((*s).to_owned()),
            QueryPart::Raw(_) => None,
        })
        .collect();
    let mut text = format!("/{path}");
    if !parts.is_empty() {
        text.push('?');
        text.push_str(&parts.join("&"));
    }
    text.parse().ok()
}

fn secrets_absent(fx: &Fixture, bytes: &[u8], what: &str) {
    let text = String::from_utf8_lossy(bytes);
    for t in &fx.tokens {
        assert!(!text.contains(&t.secret), "a secret in the {what}: {text}");
    }
}

/// The inner service: 200 with the principal's token id in `x-principal-id`.
async fn inner(req: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let id = req
        .extensions()
        .get::<Principal>()
        .map(|p| p.token_id().to_owned())
        .unwrap_or_default();
    let mut res = Response::new(Full::new(Bytes::from_static(b"reached")));
    res.headers_mut().insert(
        "x-principal-id",
        HeaderValue::from_str(&id).expect("an id is ASCII"),
    );
    Ok(res)
}

fuzz_target!(|input: Input<'_>| {
    let fx = fixture();
    let methods = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
        Method::PATCH,
    ];
    let method = methods[usize::from(input.method) % methods.len()].clone();
    let Some(uri) = uri(&input, fx, true).or_else(|| uri(&input, fx, false)) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for h in input.headers.iter().take(12) {
        if let Some((name, value)) = header(h, fx) {
            headers.append(name, value);
        }
    }
    let peer = input.peer.map(|(a, port)| SocketAddr::new(a.ip(), port));

    let mut req = Request::new(Full::new(Bytes::new()));
    *req.method_mut() = method;
    *req.uri_mut() = uri.clone();
    *req.version_mut() = if input.http2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    *req.headers_mut() = headers.clone();
    if let Some(peer) = peer {
        req.extensions_mut().insert(peer);
    }

    let service = fx.layer.layer(tower::service_fn(inner));
    let res = block_on(service.oneshot(req)).expect("infallible");
    let status = res.status();
    let res_headers = res.headers().clone();
    let body = block_on(res.into_body().collect())
        .expect("infallible")
        .to_bytes();

    for value in res_headers.values() {
        secrets_absent(fx, value.as_bytes(), "response headers");
    }
    secrets_absent(fx, &body, "response body");

    let mut carried = uri.to_string().into_bytes();
    for value in headers.values() {
        carried.push(b'\n');
        carried.extend_from_slice(value.as_bytes());
    }
    let carried = String::from_utf8_lossy(&carried).into_owned();
    let client_ip = || {
        let mut ext = http::Extensions::new();
        if let Some(peer) = peer {
            ext.insert(peer);
        }
        fx.layer.client_ip_source().client_ip(&headers, &ext)
    };

    let reached = res_headers.get("x-principal-id");
    if let Some(id) = reached {
        // Sound: only a known, active, scoped token from an allowed address gets through.
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..], b"reached");
        let id = id.to_str().unwrap();
        let token = fx
            .tokens
            .iter()
            .find(|t| t.id == id)
            .unwrap_or_else(|| panic!("reached with principal {id:?}, not a known token"));
        assert!(
            carried.contains(&token.secret),
            "the principal's secret is not in the request"
        );
        match &token.expect {
            Expect::Ok => {}
            Expect::Restricted(nets) => {
                let ip = client_ip().expect("a restricted token passed without a client address");
                assert!(
                    nets.iter().any(|n| n.contains(&ip)),
                    "{ip} is outside the restriction"
                );
            }
            other => panic!("a {other:?} token got through"),
        }
    } else {
        check_refusal(status, &res_headers, &body, &headers);
        issue9_item10(status, &res_headers, input.http2, &headers);
    }

    // A clean request (one `Bearer` token, nothing else) gets what its token deserves.
    if let (
        Some(peer),
        [
            Header::Authorization {
                scheme: Scheme::Bearer(_),
                cred: Cred::Known(i),
                pad: 0,
            },
        ],
    ) = (peer, input.headers.as_slice())
        && !uri.query().is_some_and(|q| q.contains("access_token"))
    {
        let token = &fx.tokens[usize::from(*i) % fx.tokens.len()];
        let client = canonical(peer.ip());
        let expected = match &token.expect {
            Expect::Ok => StatusCode::OK,
            Expect::MissingScope => StatusCode::FORBIDDEN,
            Expect::Restricted(nets) if nets.iter().any(|n| n.contains(&client)) => StatusCode::OK,
            Expect::Restricted(_) => StatusCode::FORBIDDEN,
            Expect::Revoked | Expect::Expired | Expect::Unknown => StatusCode::UNAUTHORIZED,
        };
        assert_eq!(
            status, expected,
            "a clean request with a {:?} token",
            token.expect
        );
        assert_eq!(reached.is_some(), expected == StatusCode::OK);
    }
});

/// A refusal is one of the documented answers (DESIGN.md §3).
fn check_refusal(status: StatusCode, headers: &HeaderMap, body: &[u8], req_headers: &HeaderMap) {
    let grpc_form = headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc_form {
        assert_eq!(status, StatusCode::OK, "a gRPC refusal is trailers-only");
        assert!(body.is_empty());
        let code = headers
            .get("grpc-status")
            .expect("a grpc-status")
            .to_str()
            .unwrap();
        assert!(["7", "8", "16"].contains(&code), "grpc-status {code}");
        assert!(
            req_headers
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc")),
            "a gRPC refusal for a request that did not speak gRPC"
        );
        return;
    }
    // The store is in memory and never fails: no 503.
    let codes: &[&str] = match status.as_u16() {
        400 => &["invalid_request"],
        401 => &["unauthorized", "invalid_token"],
        403 => &["invalid_token", "insufficient_scope"],
        429 => &["too_many_requests"],
        other => panic!("undocumented refusal status {other}"),
    };
    let json: serde_json::Value = serde_json::from_slice(body).expect("a JSON error body");
    assert_eq!(json["status"], status.as_u16());
    let code = json["code"].as_str().expect("a code");
    assert!(codes.contains(&code), "code {code} with {status}");
    assert!(json["message"].is_string());
    assert_eq!(headers[http::header::CACHE_CONTROL], "no-store");
    if status == StatusCode::UNAUTHORIZED {
        let challenge = headers[http::header::WWW_AUTHENTICATE].to_str().unwrap();
        assert!(
            challenge.starts_with("Bearer realm=\"fuzz\""),
            "{challenge}"
        );
    }
    if code == "insufficient_scope" {
        let challenge = headers[http::header::WWW_AUTHENTICATE].to_str().unwrap();
        assert!(
            challenge.ends_with(&format!("scope=\"{REQUIRED}\"")),
            "{challenge}"
        );
    }
}

/// Issue 9 item 10 (DESIGN.md §8): every refusal carries `Cache-Control: no-store`, and only
/// HTTP/2 requests get gRPC statuses (or HTTP/1.1 ones that also send `te: trailers`, which the
/// fix may choose to accept).
fn issue9_item10(status: StatusCode, headers: &HeaderMap, http2: bool, req_headers: &HeaderMap) {
    assert_eq!(
        headers
            .get(http::header::CACHE_CONTROL)
            .map(HeaderValue::as_bytes),
        Some(&b"no-store"[..]),
        "a refusal ({status}) without Cache-Control: no-store"
    );
    if headers.contains_key("grpc-status") {
        let te_trailers = req_headers.get_all(http::header::TE).iter().any(|v| {
            v.as_bytes()
                .windows(8)
                .any(|w| w.eq_ignore_ascii_case(b"trailers"))
        });
        assert!(
            http2 || te_trailers,
            "a gRPC refusal to an HTTP/1.1 request without te: trailers"
        );
    }
}
