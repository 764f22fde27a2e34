//! The management API's JSON bodies, query strings and paths through `admin::router` (tower
//! `oneshot`), as a short sequence of requests by a token holding the admin scope (or by a token
//! an earlier request of the sequence issued, or by nobody), on a fresh store each run.
//!
//! Properties: never panics, never a 5xx; a JSON error has the crate's error shape; no response
//! shows a seeded token's secret or hash. And the trust rules of DESIGN.md §8 (issue 9 items 2,
//! 3 and 4), checked against the seeded caller, whose every descendant is bounded by it: a
//! create asking for a revoked or inactive token never yields an active one; a secret handed out belongs to a token within
//! the caller's scopes, expiry and networks; no write touches a token holding a scope the caller
//! lacks; no write widens expiry or networks beyond the caller's.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use arbitrary::Arbitrary;
use bytes::Bytes;
use chrono::{DateTime, Duration, Utc};
use http::{HeaderValue, Method, Request, header};
use http_body_util::{BodyExt, Full};
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use tower::ServiceExt;
use tower_pat::admin::{self, AdminConfig, ExpiryPolicy};
use tower_pat::{MemoryStore, NewToken, TokenRecord, TokenStore, Tokens};
use tower_pat_fuzz::block_on;

const CALLER_SCOPES: &[&str] = &[
    "personalAccessToken:read",
    "personalAccessToken:write",
    "personalAccessToken:admin",
    "x:*",
];
const CALLER_NETS: &[&str] = &["127.0.0.0/8", "::1/128"];
const PEER: [u8; 4] = [127, 0, 0, 1];

const FIELDS: &[&str] = &[
    "name",
    "description",
    "scopes",
    "scope",
    "expiresAt",
    "expirationDate",
    "expireAt",
    "userAwareTokenNeverExpires",
    "ipRestriction",
    "type",
    "revoked",
    "active",
    "gracePeriodSeconds",
    "id",
    "token",
    "secret",
    "subject",
    "userId",
    "createdAt",
    "lastUsedAt",
    "hash",
];
const SCOPES: &[&str] = &[
    "personalAccessToken:read",
    "personalAccessToken:write",
    "personalAccessToken:admin",
    "personalAccessToken:*",
    "x:*",
    "x:read",
    "x:read:more",
    "y:read",
    "*",
    "",
    "a b",
    "x:\"",
];
const NETS: &[&str] = &[
    "127.0.0.0/8",
    "127.0.0.1",
    "127.0.0.1/32",
    "::1",
    "::ffff:127.0.0.1/128",
    "::ffff:127.0.0.0/104",
    "0.0.0.0/0",
    "::/0",
    "10.0.0.0/8",
    "127.0.0.1/33",
    "127.0.0.0/8, 10.0.0.0/8",
    "not a network",
    "",
];
const TIMES: &[&str] = &[
    "9999-12-31T23:59:59Z",
    "0000-01-01T00:00:00Z",
    "+275760-09-13T00:00:00Z",
    "2030-06-30T23:59:60Z",
    "2030-01-01T00:00:00+14:00",
    "2030-01-01",
    "1970-01-01T00:00:00Z",
];
const QUERY_KEYS: &[&str] = &[
    "page",
    "limit",
    "sort",
    "search",
    "lastUsed",
    "lastUsedBefore",
    "ownerId",
];

#[derive(Arbitrary, Debug)]
enum Json<'a> {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(&'a str),
    Scope(u8),
    Scopes(Vec<u8>),
    SpacedScopes(Vec<u8>),
    /// Now plus this many seconds, in RFC 3339.
    Time(i32),
    TimeEdge(u8),
    Net(u8),
    Nets(Vec<u8>),
    Array(Vec<Json<'a>>),
}

impl Json<'_> {
    fn value(&self, now: DateTime<Utc>, depth: u8) -> Value {
        let pick = |list: &[&str], i: u8| Value::from(list[usize::from(i) % list.len()]);
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::from(*b),
            Json::Int(i) => Value::from(*i),
            Json::UInt(u) => Value::from(*u),
            Json::Float(f) => Value::from(*f),
            Json::Str(s) => Value::from(*s),
            Json::Scope(i) => pick(SCOPES, *i),
            Json::Scopes(list) => list.iter().take(8).map(|i| pick(SCOPES, *i)).collect(),
            Json::SpacedScopes(list) => Value::from(
                list.iter()
                    .take(8)
                    .map(|i| SCOPES[usize::from(*i) % SCOPES.len()])
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            Json::Time(secs) => {
                Value::from((now + Duration::seconds(i64::from(*secs))).to_rfc3339())
            }
            Json::TimeEdge(i) => pick(TIMES, *i),
            Json::Net(i) => pick(NETS, *i),
            Json::Nets(list) => list.iter().take(8).map(|i| pick(NETS, *i)).collect(),
            Json::Array(items) if depth < 3 => items
                .iter()
                .take(8)
                .map(|j| j.value(now, depth + 1))
                .collect(),
            Json::Array(_) => Value::Array(Vec::new()),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Body<'a> {
    Empty,
    Raw(&'a [u8]),
    Object(Vec<(Field<'a>, Json<'a>)>),
}

#[derive(Arbitrary, Debug)]
enum Field<'a> {
    Known(u8),
    Raw(&'a str),
}

/// Which token a path names.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Who<'a> {
    Seed(u8),
    /// The last token a request of this sequence issued.
    LastIssued,
    Raw(&'a str),
}

#[derive(Arbitrary, Debug)]
enum Target<'a> {
    Root,
    SelfPath,
    OpenApi,
    Id(Who<'a>),
    Rotate(Who<'a>),
    Raw(&'a str),
}

#[derive(Arbitrary, Debug)]
enum Auth {
    Caller,
    LastIssued,
    None,
}

#[derive(Arbitrary, Debug)]
enum Query<'a> {
    None,
    Pairs(Vec<(u8, &'a str)>),
    Raw(&'a str),
}

#[derive(Arbitrary, Debug)]
struct Op<'a> {
    method: u8,
    target: Target<'a>,
    query: Query<'a>,
    body: Body<'a>,
    json_content_type: bool,
    auth: Auth,
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    policy: u8,
    ops: Vec<Op<'a>>,
}

struct Seeded {
    record: TokenRecord,
    secret: String,
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `net` with an IPv4-mapped IPv6 network written as the IPv4 network it is.
fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).unwrap_or(net),
            None => net,
        },
        _ => net,
    }
}

fn seed(store: &MemoryStore, tokens: &Tokens, now: DateTime<Utc>) -> Vec<Seeded> {
    let specs: [(&str, &[&str], bool); 6] = [
        ("alice", CALLER_SCOPES, false),
        ("alice", &["x:read"], false),
        ("alice", &["*"], false),
        ("alice", &["x:read"], true),
        ("bob", &["x:read"], false),
        ("bob", &["*"], false),
    ];
    let mut out = Vec::new();
    for (i, (subject, scopes, revoked)) in specs.into_iter().enumerate() {
        let mut new = NewToken::new(subject, format!("seed{i}"))
            .scopes(scopes)
            .unwrap();
        if i == 0 {
            new = new
                .expires_at(now + Duration::days(1))
                .ip_restriction(CALLER_NETS.iter().map(|n| n.parse().unwrap()));
        }
        let (mut record, secret) = tokens.mint(new, now);
        if revoked {
            record.revoked_at = Some(now);
        }
        block_on(store.insert(&record)).expect("insert a seed");
        out.push(Seeded {
            record,
            secret: secret.expose_secret().to_owned(),
        });
    }
    out
}

fuzz_target!(|input: Input<'_>| {
    if input.ops.is_empty() {
        return;
    }
    let now = Utc::now();
    let store = MemoryStore::new();
    let tokens = Tokens::new(store.clone());
    let layer = tokens.layer().build();
    let mut config = AdminConfig::new(&tokens, &layer).expect("the handle's own layer");
    match input.policy % 3 {
        0 => {}
        1 => {
            config = config.expiry_policy(ExpiryPolicy::DefaultLifetime(
                std::time::Duration::from_secs(30 * 86_400),
            ))
        }
        _ => config = config.max_lifetime(std::time::Duration::from_secs(7 * 86_400)),
    }
    let app = admin::router(config);
    let seeds = seed(&store, &tokens, now);
    let caller = &seeds[0].record;

    let mut last_issued: Option<(String, String)> = None; // (id, secret)
    for op in input.ops.iter().take(4) {
        let methods = [
            Method::GET,
            Method::POST,
            Method::PATCH,
            Method::DELETE,
            Method::PUT,
        ];
        let method = methods[usize::from(op.method) % methods.len()].clone();
        let who = |w: Who<'_>| match w {
            Who::Seed(i) => seeds[usize::from(i) % seeds.len()].record.id.clone(),
            Who::LastIssued => last_issued
                .as_ref()
                .map_or_else(String::new, |l| l.0.clone()),
            Who::Raw(s) => percent_encode(s),
        };
        let mut uri = match op.target {
            Target::Root => "/".to_owned(),
            Target::SelfPath => "/self".to_owned(),
            Target::OpenApi => "/openapi.json".to_owned(),
            Target::Id(w) => format!("/{}", who(w)),
            Target::Rotate(w) => format!("/{}/rotate", who(w)),
            Target::Raw(s) => format!("/{s}"),
        };
        match &op.query {
            Query::None => {}
            Query::Pairs(pairs) => {
                let q: Vec<String> = pairs
                    .iter()
                    .take(8)
                    .map(|(k, v)| {
                        format!(
                            "{}={}",
                            QUERY_KEYS[usize::from(*k) % QUERY_KEYS.len()],
                            percent_encode(v)
                        )
                    })
                    .collect();
                uri = format!("{uri}?{}", q.join("&"));
            }
            Query::Raw(s) => uri = format!("{uri}?{s}"),
        }
        let body = match &op.body {
            Body::Empty => Vec::new(),
            Body::Raw(bytes) => bytes.to_vec(),
            Body::Object(fields) => {
                let mut obj = Map::new();
                for (field, value) in fields.iter().take(12) {
                    let name = match field {
                        Field::Known(i) => FIELDS[usize::from(*i) % FIELDS.len()].to_owned(),
                        Field::Raw(s) => (*s).to_owned(),
                    };
                    obj.insert(name, value.value(now, 0));
                }
                serde_json::to_vec(&Value::Object(obj)).unwrap()
            }
        };
        // What a create asks for that must not be dropped: `revoked: true`, `active: false`.
        let create_fields = (method == Method::POST && matches!(op.target, Target::Root))
            .then(|| serde_json::from_slice::<Value>(&body).ok())
            .flatten();
        let asks = |field: &str, value: bool| {
            create_fields
                .as_ref()
                .is_some_and(|v| v.get(field) == Some(&Value::Bool(value)))
        };
        let (create_revoked, create_inactive) = (asks("revoked", true), asks("active", false));
        let Ok(mut req) = Request::builder()
            .method(method)
            .uri(uri.as_str())
            .body(Full::new(Bytes::from(body)))
        else {
            continue;
        };
        if op.json_content_type {
            req.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        let secret = match op.auth {
            Auth::Caller => Some(seeds[0].secret.clone()),
            Auth::LastIssued => last_issued.as_ref().map(|l| l.1.clone()),
            Auth::None => None,
        };
        if let Some(secret) = secret {
            req.headers_mut().insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {secret}")).unwrap(),
            );
        }
        req.extensions_mut().insert(SocketAddr::from((PEER, 40000)));

        let res = block_on(app.clone().oneshot(req)).expect("infallible");
        let status = res.status();
        let content_type = res.headers().get(header::CONTENT_TYPE).cloned();
        let body = block_on(res.into_body().collect())
            .expect("a body")
            .to_bytes();
        let text = String::from_utf8_lossy(&body);
        assert!(!status.is_server_error(), "{status} for {uri}: {text}");
        for s in &seeds {
            assert!(
                !text.contains(&s.secret),
                "a seeded secret in a response: {text}"
            );
            assert!(
                !text.contains(&s.record.hash.to_hex()),
                "a stored hash in a response: {text}"
            );
        }
        let json_body = content_type
            .as_ref()
            .is_some_and(|c| c.as_bytes().starts_with(b"application/json"));
        if status.is_client_error() && json_body {
            let v: Value = serde_json::from_slice(&body).expect("a JSON error body");
            assert_eq!(v["status"], status.as_u16(), "{text}");
            assert!(v["code"].is_string() && v["message"].is_string(), "{text}");
        }
        assert!(
            !(create_revoked && status.is_success()),
            "issue 9 item 2: a create with \"revoked\": true answered {status}: {text}"
        );
        if status.is_success() && json_body {
            let v: Value = serde_json::from_slice(&body).expect("a JSON body");
            assert!(
                !(create_inactive && v["active"] == Value::Bool(true)),
                "issue 9 item 2: a create with \"active\": false made an active token: {text}"
            );
            if let (Some(id), Some(secret)) = (v["id"].as_str(), v["token"].as_str()) {
                assert_eq!(v["secret"], secret);
                let record = block_on(store.get(id))
                    .unwrap()
                    .expect("an issued token is stored");
                issue9_within_caller(caller, &record, "issued");
                last_issued = Some((id.to_owned(), secret.to_owned()));
            }
        }
    }

    // After the sequence: what changed stayed within the caller's reach.
    for s in &seeds {
        let old = &s.record;
        let new = block_on(store.get(&old.id)).unwrap();
        issue9_acted_on(caller, old, new.as_ref());
    }
    if let Some((id, _)) = &last_issued
        && let Some(record) = block_on(store.get(id)).unwrap()
    {
        issue9_within_caller(caller, &record, "issued, after the sequence");
    }
});

/// Issue 9 item 4: `record`, issued or changed through the API, is within the caller's scopes,
/// expiry and networks.
fn issue9_within_caller(caller: &TokenRecord, record: &TokenRecord, what: &str) {
    assert!(
        caller.scopes.grants_all(&record.scopes),
        "{what} token has scopes {:?} beyond the caller's {:?}",
        record.scopes,
        caller.scopes
    );
    let ceiling = caller.expires_at.expect("the caller expires");
    assert!(
        record.expires_at.is_some_and(|at| at <= ceiling),
        "{what} token expires {:?}, after the caller ({ceiling})",
        record.expires_at
    );
    within_networks(caller, &record.ip_restriction, what);
}

fn within_networks(caller: &TokenRecord, nets: &[IpNet], what: &str) {
    assert!(
        !nets.is_empty(),
        "{what} token has no IP restriction, the caller has {:?}",
        caller.ip_restriction
    );
    for net in nets {
        let net = canonical_net(*net);
        assert!(
            caller.ip_restriction.iter().any(|c| c.contains(&net)),
            "{what} token allows {net}, outside the caller's {:?}",
            caller.ip_restriction
        );
    }
}

/// Issue 9 item 3: a token the sequence changed, revoked or deleted held no scope the caller
/// lacks; and what changed about it stayed within the caller's ceilings (item 4).
fn issue9_acted_on(caller: &TokenRecord, old: &TokenRecord, new: Option<&TokenRecord>) {
    let changed = match new {
        None => true,
        Some(new) => {
            new.updated_at != old.updated_at
                || new.revoked_at != old.revoked_at
                || new.hash != old.hash
                || new.scopes != old.scopes
                || new.expires_at != old.expires_at
                || new.ip_restriction != old.ip_restriction
        }
    };
    if !changed {
        return;
    }
    assert!(
        caller.scopes.grants_all(&old.scopes),
        "a token holding {:?} was changed ({}) by a caller holding {:?}",
        old.scopes,
        if new.is_none() { "deleted" } else { "updated" },
        caller.scopes
    );
    let Some(new) = new else { return };
    assert!(caller.scopes.grants_all(&new.scopes));
    if new.expires_at != old.expires_at {
        let ceiling = caller.expires_at.expect("the caller expires");
        assert!(
            new.expires_at.is_some_and(|at| at <= ceiling),
            "an update set expiresAt {:?}, after the caller ({ceiling})",
            new.expires_at
        );
    }
    if new.ip_restriction != old.ip_restriction {
        within_networks(caller, &new.ip_restriction, "an updated");
    }
}
