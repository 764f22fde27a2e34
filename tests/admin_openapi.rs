//! The OpenAPI document: served at `<base>/openapi.json`, version 3.1, every route and status, and
//! schemas that match what the API really answers.

mod support_admin;

use std::collections::BTreeSet;

use http::{Method, StatusCode};
use serde_json::Value;
use support_admin::*;

async fn document(t: &TestApp) -> Value {
    // Public: no token needed.
    let res = call(
        &t.app,
        Method::GET,
        &format!("{BASE}/openapi.json"),
        None,
        None,
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    assert_eq!(res.headers["content-type"], "application/json");
    res.body
}

fn statuses(doc: &Value, path: &str, method: &str) -> BTreeSet<String> {
    doc["paths"][path][method]["responses"]
        .as_object()
        .unwrap_or_else(|| panic!("no {method} {path}"))
        .keys()
        .cloned()
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn every_route_and_status_is_documented() {
    let t = app().await;
    let doc = document(&t).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));

    let id = format!("{BASE}/{{id}}");
    let paths: BTreeSet<String> = doc["paths"].as_object().unwrap().keys().cloned().collect();
    let expected = set(&[
        BASE,
        &format!("{BASE}/self"),
        &format!("{BASE}/self/rotate"),
        &id,
        &format!("{BASE}/{{id}}/rotate"),
        &format!("{BASE}/openapi.json"),
    ]);
    // Not `/leak-reports`: this server has no leak reports configured, and serves no such route
    // (tests/leak_reports.rs reads the document of one that does).
    assert_eq!(paths, expected);
    let expect = [
        (
            BASE.to_owned(),
            "post",
            &["201", "400", "401", "403", "409", "413", "429", "500"][..],
        ),
        (BASE.to_owned(), "get", &["200", "400", "401", "403", "500"]),
        (
            format!("{BASE}/self"),
            "get",
            &["200", "401", "403", "404", "500"],
        ),
        (
            format!("{BASE}/self"),
            "delete",
            &["204", "401", "403", "404", "500"],
        ),
        (
            format!("{BASE}/self/rotate"),
            "post",
            &[
                "201", "400", "401", "403", "404", "409", "410", "413", "429", "500",
            ],
        ),
        (id.clone(), "get", &["200", "401", "403", "404", "500"]),
        (
            id.clone(),
            "patch",
            &[
                "200", "400", "401", "403", "404", "409", "410", "413", "500",
            ],
        ),
        (
            id.clone(),
            "delete",
            &["200", "401", "403", "404", "409", "500"],
        ),
        (
            format!("{BASE}/{{id}}/rotate"),
            "post",
            &[
                "201", "400", "401", "403", "404", "409", "410", "413", "429", "500",
            ],
        ),
        (format!("{BASE}/openapi.json"), "get", &["200"]),
    ];
    for (path, method, codes) in expect.iter().cloned() {
        assert_eq!(statuses(&doc, &path, method), set(codes), "{method} {path}");
    }
    if cfg!(feature = "secret-scanning") {
        // The library's document lists the endpoint with the feature, for a router that has it.
        let lib = serde_json::to_value(tower_pat::admin::openapi()).unwrap();
        assert_eq!(
            statuses(&lib, "/leak-reports", "post"),
            set(&["200", "400", "401", "408", "413", "500"])
        );
    }
    // The scopes each operation needs.
    assert_eq!(
        doc["paths"][BASE]["post"]["security"][0]["bearer"],
        serde_json::json!(["personalAccessToken:write"])
    );
    assert_eq!(
        doc["paths"][&id]["get"]["security"][0]["bearer"],
        serde_json::json!(["personalAccessToken:read"])
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    // Headers and parameters.
    assert!(doc["paths"][BASE]["post"]["responses"]["201"]["headers"]["Location"].is_object());
    assert!(doc["paths"][BASE]["get"]["responses"]["200"]["headers"]["X-Total-Count"].is_object());
    let params: BTreeSet<String> = doc["paths"][BASE]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        params,
        set(&[
            "page",
            "limit",
            "sort",
            "search",
            "lastUsed",
            "lastUsedBefore",
            "lastUsedAfter",
            "createdAfter",
            "createdBefore",
            "state",
            "ownerId",
            "subject"
        ])
    );
}

fn properties(doc: &Value, schema: &str) -> BTreeSet<String> {
    let s = &doc["components"]["schemas"][schema];
    let mut out: BTreeSet<String> = s["properties"]
        .as_object()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    // A request whose rules depend on each other (the expiry acknowledgment) is an anyOf of
    // whole-object branches: the properties of any of them.
    for branch in s["anyOf"].as_array().into_iter().flatten() {
        if let Some(p) = branch["properties"].as_object() {
            out.extend(p.keys().cloned());
        }
    }
    // A flattened struct is an allOf of its parts.
    for part in s["allOf"].as_array().into_iter().flatten() {
        if let Some(r) = part["$ref"].as_str() {
            out.extend(properties(doc, r.rsplit('/').next().unwrap()));
        }
        out.extend(
            part["properties"]
                .as_object()
                .into_iter()
                .flat_map(|p| p.keys().cloned()),
        );
    }
    out
}

#[tokio::test]
async fn the_schemas_are_what_the_api_answers() {
    let t = app().await;
    let doc = document(&t).await;

    let created = create(
        &t.app,
        &t.alice,
        r#"{"name": "doc", "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    let id = created.body["id"].as_str().unwrap();
    let rotated = post(
        &t.app,
        &format!("{BASE}/{id}/rotate"),
        &t.alice,
        r#"{"gracePeriodSeconds": 60}"#,
    )
    .await;
    let answered: BTreeSet<String> = rotated.body.as_object().unwrap().keys().cloned().collect();
    assert_eq!(properties(&doc, "IssuedToken"), answered);
    // Creation answers the same but for the grace period's end.
    let mut answered: BTreeSet<String> =
        created.body.as_object().unwrap().keys().cloned().collect();
    answered.insert("previousTokenValidUntil".to_owned());
    assert_eq!(properties(&doc, "IssuedToken"), answered);

    let view = get(&t.app, &format!("{BASE}/{id}"), &t.alice).await;
    let answered: BTreeSet<String> = view.body.as_object().unwrap().keys().cloned().collect();
    assert_eq!(properties(&doc, "TokenView"), answered);
    for field in [
        "id",
        "name",
        "start",
        "subject",
        "userId",
        "type",
        "scopes",
        "ipRestriction",
        "createdAt",
        "updatedAt",
        "expiresAt",
        "active",
        "disabled",
        "disabledAt",
        "revoked",
        "expiryWarning",
        "lastUsedAt",
        "seenAt",
        "lastUsedIps",
        "lastRotatedAt",
    ] {
        assert!(answered.contains(field), "{field}");
    }

    let err = post(&t.app, BASE, &t.alice, "{}").await;
    let answered: BTreeSet<String> = err.body.as_object().unwrap().keys().cloned().collect();
    assert_eq!(properties(&doc, "ErrorBody"), answered);

    assert_eq!(
        properties(&doc, "CreateTokenRequest"),
        set(&[
            "active",
            "revoked",
            "name",
            "scopes",
            "expiresAt",
            "userAwareTokenNeverExpires",
            "ipRestriction",
            "type"
        ])
    );
    assert_eq!(
        properties(&doc, "PatchTokenRequest"),
        set(&[
            "active",
            "name",
            "scopes",
            "expiresAt",
            "userAwareTokenNeverExpires",
            "ipRestriction",
            "revoked"
        ])
    );
    assert_eq!(
        properties(&doc, "TokenEvent"),
        set(&["event", "data", "triggeredAt", "leak", "reuse"])
    );
}

#[test]
fn the_unprefixed_document_is_available_to_merge() {
    let doc = serde_json::to_value(tower_pat::admin::openapi()).unwrap();
    let paths: BTreeSet<String> = doc["paths"].as_object().unwrap().keys().cloned().collect();
    let mut expected = set(&[
        "/",
        "/self",
        "/self/rotate",
        "/{id}",
        "/{id}/rotate",
        "/openapi.json",
    ]);
    if cfg!(feature = "secret-scanning") {
        expected.insert("/leak-reports".to_owned());
    }
    assert_eq!(paths, expected);
}

/// The served document names every event a sink can receive, the expiry notices included.
#[tokio::test]
async fn the_document_lists_every_event_kind() {
    let t = app().await;
    let doc = document(&t).await;
    let kind = &doc["components"]["schemas"]["EventKind"];
    let names: BTreeSet<String> = kind["enum"]
        .as_array()
        .or_else(|| kind["oneOf"].as_array())
        .unwrap_or_else(|| panic!("EventKind is not an enum: {kind}"))
        .iter()
        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
        .collect();
    assert_eq!(
        names,
        set(&[
            "personalAccessToken.created",
            "personalAccessToken.updated",
            "personalAccessToken.rotated",
            "personalAccessToken.revoked",
            "personalAccessToken.deleted",
            "personalAccessToken.disabled",
            "personalAccessToken.enabled",
            "personalAccessToken.purged",
            "personalAccessToken.leaked",
            "personalAccessToken.expiring",
            "personalAccessToken.expired",
            "personalAccessToken.reused",
        ])
    );
    let event = &doc["components"]["schemas"]["TokenEvent"]["properties"]["event"];
    assert!(event.to_string().contains("EventKind"), "{event}");
}
