//! The OpenAPI document tells the truth: each rule it states about a request is the rule the server
//! applies. The patterns are read from the served document and judged with a regular-expression
//! engine against the server's own verdict, value by value (`scripts/schemathesis.sh` does the
//! same with a fuzzer nobody here wrote).

mod support_admin;

use std::time::Duration;

use http::{Method, StatusCode};
use regex::Regex;
use serde_json::{Value, json};
use support_admin::*;
use tower_pat::NewToken;
use tower_pat::admin::ExpiryPolicy;
use tower_pat::store::TokenStore;

async fn document(t: &TestApp) -> Value {
    let res = call(
        &t.app,
        Method::GET,
        &format!("{BASE}/openapi.json"),
        None,
        None,
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    res.body
}

/// The request schema `name` of the served document, with its branches (`anyOf`) if it has them.
fn branches(doc: &Value, name: &str) -> Vec<Value> {
    let schema = &doc["components"]["schemas"][name];
    match schema["anyOf"].as_array() {
        Some(branches) => branches.clone(),
        None => vec![schema.clone()],
    }
}

/// The property's schemas: itself, or the alternatives of its `anyOf`.
fn alternatives(property: &Value) -> Vec<Value> {
    match property["anyOf"].as_array() {
        Some(a) => a.clone(),
        None => vec![property.clone()],
    }
}

/// Whether `value` is a string the string schema `schema` accepts (pattern and lengths).
fn string_fits(schema: &Value, value: &str) -> bool {
    let string = |t: &Value| t == "string";
    let typed = match &schema["type"] {
        Value::Array(types) => types.iter().any(string),
        t => string(t),
    };
    if !typed {
        return false;
    }
    let chars = value.chars().count() as u64;
    let pattern_ok = schema["pattern"]
        .as_str()
        .is_none_or(|p| Regex::new(p).unwrap().is_match(value));
    pattern_ok
        && schema["minLength"].as_u64().is_none_or(|m| chars >= m)
        && schema["maxLength"].as_u64().is_none_or(|m| chars <= m)
}

/// Whether `value` fits one of the property's alternatives: a string, or an array of strings.
fn fits(property: &Value, value: &Value) -> bool {
    alternatives(property).iter().any(|alt| match value {
        Value::String(s) => string_fits(alt, s),
        Value::Array(items) => {
            (alt["type"] == "array"
                || alt["type"]
                    .as_array()
                    .is_some_and(|t| t.contains(&json!("array"))))
                && alt["maxItems"]
                    .as_u64()
                    .is_none_or(|m| items.len() as u64 <= m)
                && items
                    .iter()
                    .all(|i| i.as_str().is_some_and(|s| string_fits(&alt["items"], s)))
        }
        _ => false,
    })
}

/// The server's verdict on one field: refused (400 naming the field) or not.
async fn server_accepts(t: &TestApp, field: &str, value: &Value, n: usize) -> bool {
    let mut body = json!({"name": format!("sample {n}"), "userAwareTokenNeverExpires": true});
    body[field] = value.clone();
    let res = post(&t.app, BASE, &t.alice, &body.to_string()).await;
    if res.status == StatusCode::BAD_REQUEST {
        let message = res.body["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with(&format!("{field}:")),
            "{field} = {value}: {}",
            res.text
        );
        return false;
    }
    assert!(
        [
            StatusCode::CREATED,
            StatusCode::CONFLICT,
            StatusCode::FORBIDDEN
        ]
        .contains(&res.status),
        "{field} = {value}: {}",
        res.text
    );
    true
}

#[tokio::test]
async fn each_field_rule_in_the_document_is_the_servers() {
    // One creation per value: more than the default rate limit allows.
    let t = app_with(|c| c.creation_rate_limit(1_000, Duration::from_secs(60))).await;
    let doc = document(&t).await;
    let create_branches = branches(&doc, "CreateTokenRequest");
    let props = &create_branches[0]["properties"];
    let long = "x".repeat(256);
    let cases: Vec<(&str, Vec<Value>)> = vec![
        (
            "name",
            [
                "a",
                " padded ",
                "",
                "   ",
                "\t",
                "a\tb",
                "a\u{85}",
                "\u{a0}",
                "\u{3000}x",
                "é ü 名前",
                "x\u{7f}",
                // Invisible characters: refused, and the document says so.
                "a\u{202E}b",
                "\u{200B}",
                "ci\u{200B}",
                "\u{FEFF}x",
                "a\u{2028}b",
                "x\u{AD}y",
                "a\u{2066}b\u{2069}",
                "ci\u{3164}",
                "\u{2800}",
                "e\u{301}",
                // Visible ones beyond the plane, and the narrow no-break space: accepted.
                "\u{1F680} deploy",
                "a\u{202F}b",
                &long,
                &format!("{long}x"),
                &format!(" {long}"),
            ]
            .iter()
            .map(|s| json!(s))
            .collect(),
        ),
        (
            "type",
            [
                "service",
                " ci ",
                "",
                " ",
                "t\n",
                &"t".repeat(64),
                &"t".repeat(65),
            ]
            .iter()
            .map(|s| json!(s))
            .collect(),
        ),
        (
            "scopes",
            vec![
                json!(["x:read"]),
                json!([" x:read "]),
                json!(["", "x:read"]),
                json!(["a b"]),
                json!(["x\"y"]),
                json!(["é"]),
                json!(["x".repeat(128)]),
                json!(["x".repeat(129)]),
                json!("x:read x:write"),
                json!("  "),
                json!("x:read\u{7f}"),
                json!(vec!["x:read"; 101]),
            ],
        ),
        (
            "ipRestriction",
            vec![
                json!("127.0.0.1"),
                json!("10.0.0.0/8"),
                json!(" 10.0.0.1/32 , 192.168.0.0/16"),
                json!(["::1", "fe80::/10"]),
                json!("1:2:3:4:5:6:7::"),
                // The last 32 bits written as IPv4, in every position a `::` can take.
                json!("::ffff:192.0.2.1"),
                json!("::ffff:192.0.2.0/120"),
                json!("::ffff:192.0.2.0/64"),
                json!("64:ff9b::198.51.100.7"),
                json!("::1.2.3.4"),
                json!("1:2:3:4:5:6:1.2.3.4"),
                json!("1:2:3:4:5::1.2.3.4"),
                json!("1::2:3:4:5:1.2.3.4"),
                json!("1:2:3:4:5:6::1.2.3.4"),
                json!("1:2:3:4:5:6:7:1.2.3.4"),
                json!("1::2:3:4:5:6:1.2.3.4"),
                json!("::ffff:1.2.3"),
                json!("::ffff:01.2.3.4"),
                json!(":::1.2.3.4"),
                json!("2001:db8::/129"),
                json!("1.2.3.4/33"),
                json!("256.1.1.1"),
                json!("01.2.3.4"),
                json!("fe80::1%eth0"),
                json!("localhost"),
                json!(""),
                json!(["", " "]),
                json!("10.0.0.1,"),
            ],
        ),
    ];
    for invisible in [
        "a\u{202E}b",
        "\u{200B}",
        "ci\u{200B}",
        "\u{FEFF}x",
        "x\u{AD}y",
    ] {
        assert!(
            !server_accepts(&t, "name", &json!(invisible), 0).await,
            "{invisible:?}"
        );
    }
    let mut n = 0;
    for (field, values) in cases {
        for value in values {
            n += 1;
            let documented = fits(&props[field], &value);
            let accepted = server_accepts(&t, field, &value, n).await;
            assert_eq!(
                documented, accepted,
                "{field} = {value}: the document says {documented}, the server {accepted}"
            );
        }
    }
}

#[tokio::test]
async fn the_document_states_this_servers_configuration() {
    let t = app_with(|c| c.max_scopes_per_token(3)).await;
    let doc = document(&t).await;
    // The default policy: a date, or the acknowledgment, in whole-object branches.
    let created = branches(&doc, "CreateTokenRequest");
    assert_eq!(created.len(), 2);
    assert_eq!(created[0]["required"], json!(["name", "expiresAt"]));
    assert_eq!(
        created[1]["required"],
        json!(["name", "userAwareTokenNeverExpires"])
    );
    assert_eq!(
        created[1]["properties"]["userAwareTokenNeverExpires"]["enum"],
        json!([true])
    );
    for branch in created.iter().chain(&branches(&doc, "PatchTokenRequest")) {
        assert_eq!(branch["additionalProperties"], false);
        let scopes = alternatives(&branch["properties"]["scopes"]);
        assert_eq!(scopes[0]["maxItems"], 3);
    }
    assert_eq!(branches(&doc, "PatchTokenRequest").len(), 3);
    let rotate = &doc["components"]["schemas"]["RotateTokenRequest"];
    assert_eq!(rotate["additionalProperties"], false);
    assert_eq!(
        rotate["properties"]["revoked"]["enum"],
        json!([false, null])
    );
    // A default lifetime: no acknowledgment is needed, so no branches.
    let t = app_with(|c| c.expiry_policy(ExpiryPolicy::DefaultLifetime(Duration::from_secs(3600))))
        .await;
    let doc = document(&t).await;
    assert!(doc["components"]["schemas"]["CreateTokenRequest"]["anyOf"].is_null());
    let res = create(&t.app, &t.alice, r#"{"name": "plain"}"#).await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    // The document the library hands out for merging states the defaults.
    let merged = serde_json::to_value(tower_pat::admin::openapi()).unwrap();
    assert_eq!(
        merged["components"]["schemas"]["RotateTokenRequest"]["properties"]["gracePeriodSeconds"]["maximum"],
        86_400
    );
}

#[tokio::test]
async fn what_the_schema_allows_is_never_capped_or_refused() {
    let t = app().await;
    // The last page the document allows, and one beyond it.
    let res = get(&t.app, &format!("{BASE}?page=10000000"), &t.alice).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    assert_eq!(res.body, json!([]));
    let res = get(&t.app, &format!("{BASE}?page=10000001"), &t.alice).await;
    assert!(res.error(400).starts_with("page:"));
    // A rotation body of `null`, as the document allows, is no body.
    let made = create(
        &t.app,
        &t.alice,
        r#"{"name": "r", "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    let id = made.body["id"].as_str().unwrap().to_owned();
    let res = post(&t.app, &format!("{BASE}/{id}/rotate"), &t.alice, "null").await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    for body in ["[]", "1", "\"x\""] {
        let res = post(&t.app, &format!("{BASE}/{id}/rotate"), &t.alice, body).await;
        assert_eq!(res.status, StatusCode::BAD_REQUEST, "{body}: {}", res.text);
    }
}

#[tokio::test]
async fn owner_id_and_subject_combine_as_filters() {
    let t = app().await;
    let bob = issue(&t.tokens, "bob", &["personalAccessToken:read"]).await;
    // alice holds the admin scope: two subjects at once match no token (an empty page, not a 400).
    let res = get(
        &t.app,
        &format!("{BASE}?ownerId=alice&subject=bob"),
        &t.alice,
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    assert_eq!(res.body, json!([]));
    assert_eq!(res.headers["x-total-count"], "0");
    let res = get(&t.app, &format!("{BASE}?ownerId=bob&subject=bob"), &t.alice).await;
    assert_eq!(res.body.as_array().unwrap().len(), 1, "{}", res.text);
    // Without it, naming another subject in either parameter is a 403, whatever the other says.
    for query in ["ownerId=bob&subject=alice", "ownerId=alice&subject=bob"] {
        let res = get(&t.app, &format!("{BASE}?{query}"), &bob).await;
        assert_eq!(res.status, StatusCode::FORBIDDEN, "{query}: {}", res.text);
    }
    let res = get(&t.app, &format!("{BASE}?ownerId=bob&subject=bob"), &bob).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
}

#[tokio::test]
async fn an_expired_token_is_a_conflict_not_a_bad_request() {
    let t = app().await;
    let mut expired = NewToken::new("alice", "expired");
    expired.expires_at = Some(chrono::Utc::now() - chrono::Duration::hours(1));
    let (record, _) = t.tokens.issue(expired).await.unwrap();
    let res = patch(
        &t.app,
        &format!("{BASE}/{}", record.id),
        &t.alice,
        r#"{"active": true}"#,
    )
    .await;
    assert!(res.error(409).starts_with("active:"));
    assert_eq!(res.body["code"], "token_expired");
    // Nor does a new expiry bring it back (the second way to the same end).
    for body in [
        format!(r#"{{"expiresAt": "{}"}}"#, in_days(1)),
        r#"{"expiresAt": null, "userAwareTokenNeverExpires": true}"#.to_owned(),
    ] {
        let res = patch(&t.app, &format!("{BASE}/{}", record.id), &t.alice, &body).await;
        assert!(res.error(409).starts_with("expiresAt:"), "{body}");
    }
    let stored = t.store.get(&record.id).await.unwrap().unwrap();
    assert_eq!(stored, record);
}
