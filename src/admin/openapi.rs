//! The OpenAPI 3.1 document, generated with utoipa from the handlers' attributes and the real
//! request and response types, so it cannot drift from the code.

use serde_json::{Value, json};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{OpenApi as Document, Paths};
use utoipa::{Modify, OpenApi};

use super::error::{
    ErrorBody, NotFound, PayloadTooLarge, ReadScopeMissing, StoreFailed, TokenRevoked,
    Unauthorized, WriteScopeMissing,
};
use super::events::{EventKind, LeakSource, PurgeEvent, PurgeSummary, ReuseDetails, TokenEvent};
use super::input::{
    CreateTokenRequest, LastUsedParam, PatchTokenRequest, RotateTokenRequest, SortParam,
};
use super::routes;
use super::view::{Deleted, ExpiryWarning, IssuedToken, TokenView};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Personal access tokens",
        description = "Create, list, read, update, rotate, revoke and delete personal access \
            tokens. Reads need `personalAccessToken:read`, changes `personalAccessToken:write`, \
            and acting on another subject's tokens `personalAccessToken:admin`. A token never \
            gets more than the token that creates or changes it (scopes, expiry, networks), and \
            acting on a token needs every scope it holds."
    ),
    paths(
        routes::create,
        routes::list,
        routes::get_self,
        routes::rotate_self,
        routes::revoke_self,
        routes::get_one,
        routes::update,
        routes::rotate,
        routes::delete,
        routes::openapi_json,
    ),
    components(schemas(
        TokenView,
        ExpiryWarning,
        IssuedToken,
        Deleted,
        ErrorBody,
        CreateTokenRequest,
        PatchTokenRequest,
        RotateTokenRequest,
        SortParam,
        LastUsedParam,
        TokenEvent,
        PurgeEvent,
        PurgeSummary,
        EventKind,
        LeakSource,
        ReuseDetails,
    ), responses(
        Unauthorized,
        ReadScopeMissing,
        WriteScopeMissing,
        NotFound,
        TokenRevoked,
        StoreFailed,
        PayloadTooLarge,
    )),
    modifiers(&BearerAuth),
    tags((name = routes::TAG, description = "Personal access tokens"))
)]
struct AdminApi;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut Document) {
        doc.components.get_or_insert_default().add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The management API's OpenAPI 3.1 document, with paths relative to where the router is nested
/// (`/`, `/{id}`, …), stating the request rules of the default [`AdminConfig`](super::AdminConfig):
/// merge it into an application's document, or read it at `GET <base>/openapi.json`, where the
/// paths carry the base and the rules are the server's own configuration. With feature
/// `secret-scanning` it lists `POST /leak-reports` too, which a router serves (and lists at
/// `openapi.json`) only with [`AdminConfig::leak_reports`](super::AdminConfig).
pub fn openapi() -> Document {
    with_rules(
        base_document(cfg!(feature = "secret-scanning")),
        &Rules::default(),
    )
}

/// The derived document, with the leaked-token report endpoint if `leak_reports` (and feature
/// `secret-scanning`).
fn base_document(leak_reports: bool) -> Document {
    let doc = AdminApi::openapi();
    #[cfg(feature = "secret-scanning")]
    let doc = if leak_reports {
        doc.merge_from(LeakApi::openapi())
    } else {
        doc
    };
    #[cfg(not(feature = "secret-scanning"))]
    let _ = leak_reports;
    doc
}

/// The leaked-token report endpoint (feature `secret-scanning`): listed only where it exists.
#[cfg(feature = "secret-scanning")]
#[derive(OpenApi)]
#[openapi(
    paths(super::leaks::report),
    components(schemas(super::leaks::LeakedToken, super::leaks::LeakLabel))
)]
struct LeakApi;

/// The document a server serves: every path under `base` (`/personal-access-tokens`; empty at
/// the root), and the request rules it is configured with.
pub(crate) fn document(base: &str, rules: &Rules) -> Document {
    let mut doc = with_rules(base_document(rules.leak_reports), rules);
    if !base.is_empty() {
        let paths = std::mem::take(&mut doc.paths.paths);
        let mut prefixed = Paths::new();
        for (path, item) in paths {
            let full = if path == "/" {
                base.to_owned()
            } else {
                format!("{base}{path}")
            };
            prefixed.paths.insert(full, item);
        }
        doc.paths = prefixed;
    }
    doc
}

/// The request rules that depend on a server's configuration, stated in the document it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rules {
    /// The longest `gracePeriodSeconds`.
    pub(crate) max_grace_seconds: u64,
    /// The most scopes a request may give.
    pub(crate) max_scopes: usize,
    /// The most networks a request may give.
    pub(crate) max_networks: usize,
    /// Whether a create without `expiresAt`, or a PATCH removing it, needs
    /// `userAwareTokenNeverExpires: true` ([`ExpiryPolicy::RequireAcknowledgment`](super::ExpiryPolicy)).
    pub(crate) expiry_needs_acknowledgment: bool,
    /// Whether `POST /leak-reports` is served: listed only then.
    pub(crate) leak_reports: bool,
}

impl Default for Rules {
    /// The rules of a default [`AdminConfig`](super::AdminConfig).
    fn default() -> Self {
        let limits = super::input::Limits::default();
        Self {
            max_grace_seconds: super::config::DEFAULT_MAX_ROTATION_GRACE.as_secs(),
            max_scopes: limits.scopes,
            max_networks: limits.networks,
            expiry_needs_acknowledgment: matches!(
                super::ExpiryPolicy::default(),
                super::ExpiryPolicy::RequireAcknowledgment
            ),
            leak_reports: false,
        }
    }
}

/// White space as the server trims it (`char::is_whitespace`), for a regular expression's class.
const WS: &str = r"\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000";
/// One scope (RFC 6749 scope-token, 1 to 128 characters), for a regular expression.
const SCOPE: &str = r"[!#-\[\]-~]{1,128}";
/// An IPv4 address.
const V4: &str = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}";
/// An IPv6 address: eight groups, or fewer around one `::`; the last two groups may be written as
/// an IPv4 address (`::ffff:192.0.2.1`, `64:ff9b::198.51.100.7`), with at most five groups beside
/// it around a `::` (which stands for at least one), as the server's parser reads them.
const V6: &str = concat!(
    r"(([0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}|([0-9a-fA-F]{1,4}:){1,7}:",
    r"|([0-9a-fA-F]{1,4}:){1,6}:[0-9a-fA-F]{1,4}|([0-9a-fA-F]{1,4}:){1,5}(:[0-9a-fA-F]{1,4}){1,2}",
    r"|([0-9a-fA-F]{1,4}:){1,4}(:[0-9a-fA-F]{1,4}){1,3}|([0-9a-fA-F]{1,4}:){1,3}(:[0-9a-fA-F]{1,4}){1,4}",
    r"|([0-9a-fA-F]{1,4}:){1,2}(:[0-9a-fA-F]{1,4}){1,5}|[0-9a-fA-F]{1,4}:(:[0-9a-fA-F]{1,4}){1,6}",
    r"|:((:[0-9a-fA-F]{1,4}){1,7}|:)",
    // The last 32 bits as an IPv4 address.
    r"|(([0-9a-fA-F]{1,4}:){6}|::([0-9a-fA-F]{1,4}:){0,5}",
    r"|([0-9a-fA-F]{1,4}:){1}:([0-9a-fA-F]{1,4}:){0,4}|([0-9a-fA-F]{1,4}:){2}:([0-9a-fA-F]{1,4}:){0,3}",
    r"|([0-9a-fA-F]{1,4}:){3}:([0-9a-fA-F]{1,4}:){0,2}|([0-9a-fA-F]{1,4}:){4}:([0-9a-fA-F]{1,4}:)?",
    r"|([0-9a-fA-F]{1,4}:){5}:)",
    r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3})"
);

/// The patterns of the request fields, as the parsers in `input.rs` apply them.
struct Patterns {
    /// A name or type: no control or invisible character, not blank.
    label: String,
    /// A scope in an array (trimmed; a blank one is dropped).
    scope: String,
    /// Scopes in one string, separated by white space.
    scopes: String,
    /// A network in an array: an address or CIDR (trimmed; a blank one is dropped).
    net: String,
    /// Networks in one string, separated by commas.
    nets: String,
    /// A blank string (no date).
    blank: String,
}

impl Patterns {
    fn new() -> Self {
        let net = format!(
            "[{WS}]*({V4}(/(3[0-2]|[12]?[0-9]))?|{V6}(/(12[0-8]|1[01][0-9]|[1-9]?[0-9]))?)?[{WS}]*"
        );
        // Control characters, and the invisible ones `record::label` refuses.
        let refused: String = std::iter::once(r"\x00-\x1f\x7f-\x9f".to_owned())
            .chain(
                crate::record::INVISIBLE
                    .iter()
                    .map(|(lo, hi)| format!(r"\u{:04x}-\u{:04x}", *lo as u32, *hi as u32)),
            )
            .collect();
        Self {
            label: format!("^[^{refused}]*[^{refused}{WS}][^{refused}]*$"),
            scope: format!("^[{WS}]*({SCOPE})?[{WS}]*$"),
            scopes: format!("^[{WS}]*({SCOPE}([{WS}]+{SCOPE})*)?[{WS}]*$"),
            nets: format!("^{net}(,{net})*$"),
            net: format!("^{net}$"),
            blank: format!("^[{WS}]*$"),
        }
    }
}

/// States in the request schemas the rules the derive cannot: the patterns of names, types, scopes
/// and networks, `""` as no date, the values `revoked` and `active` may take, unknown fields
/// refused, the configured limits, and `userAwareTokenNeverExpires` where the expiry policy needs
/// it. A test runs Schemathesis against the served document (`scripts/schemathesis.sh`).
fn with_rules(doc: Document, rules: &Rules) -> Document {
    let mut value = match serde_json::to_value(&doc) {
        Ok(value) => value,
        Err(e) => {
            tracing::error!(error = %e, "could not state the request rules in the OpenAPI document");
            return doc;
        }
    };
    let Some(schemas) = value
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    else {
        return doc;
    };
    let p = Patterns::new();
    let expires_at = json!({"anyOf": [
        {"type": "string", "format": "date-time"},
        {"type": "string", "pattern": p.blank},
        {"type": "null"},
    ]});
    let scopes = json!({"anyOf": [
        {"type": "array", "items": {"type": "string", "pattern": p.scope}, "maxItems": rules.max_scopes},
        {"type": "string", "pattern": p.scopes},
        {"type": "null"},
    ]});
    let networks = json!({"anyOf": [
        {"type": "array", "items": {"type": "string", "pattern": p.net}, "maxItems": rules.max_networks},
        {"type": "string", "pattern": p.nets},
        {"type": "null"},
    ]});
    let only = |v: bool| json!({"type": ["boolean", "null"], "enum": [v, null]});
    for (name, schema) in schemas.iter_mut() {
        let create = name == "CreateTokenRequest";
        let patch = name == "PatchTokenRequest";
        let rotate = name == "RotateTokenRequest";
        if !(create || patch || rotate) {
            continue;
        }
        schema["additionalProperties"] = json!(false);
        let props = &mut schema["properties"];
        restate(&mut props["expiresAt"], &expires_at);
        if rotate {
            props["gracePeriodSeconds"]["maximum"] = json!(rules.max_grace_seconds);
        } else {
            props["name"]["pattern"] = json!(p.label);
            restate(&mut props["scopes"], &scopes);
            restate(&mut props["ipRestriction"], &networks);
        }
        if create || rotate {
            restate(&mut props["revoked"], &only(false));
            restate(&mut props["active"], &only(true));
        }
        if create {
            props["type"]["pattern"] = json!(p.label);
        }
        if (create || patch) && rules.expiry_needs_acknowledgment {
            *schema = expiry_acknowledged(schema, patch);
        }
    }
    match serde_json::from_value(value) {
        Ok(stated) => stated,
        Err(e) => {
            tracing::error!(error = %e, "could not state the request rules in the OpenAPI document");
            doc
        }
    }
}

/// `schema` split into the bodies the expiry policy accepts (each a whole object schema, which
/// generators and validators read alike): one with a date in `expiresAt`, one with
/// `userAwareTokenNeverExpires: true`, and for a PATCH (`patch`) one that leaves the expiry alone.
fn expiry_acknowledged(schema: &Value, patch: bool) -> Value {
    let mut base = schema.clone();
    let description = base.as_object_mut().and_then(|o| o.remove("description"));
    let with = |field: &str, property: Value| {
        let mut branch = base.clone();
        restate(&mut branch["properties"][field], &property);
        match branch["required"].as_array_mut() {
            Some(required) => required.push(json!(field)),
            None => branch["required"] = json!([field]),
        }
        branch
    };
    let mut branches = vec![
        with(
            "expiresAt",
            json!({"type": "string", "format": "date-time"}),
        ),
        with(
            "userAwareTokenNeverExpires",
            json!({"type": "boolean", "enum": [true]}),
        ),
    ];
    if patch {
        let mut unchanged = base.clone();
        if let Some(props) = unchanged["properties"].as_object_mut() {
            props.remove("expiresAt");
        }
        branches.push(unchanged);
    }
    let mut split = json!({"anyOf": branches});
    if let Some(description) = description {
        split["description"] = description;
    }
    split
}

/// Replaces a property's schema with `with`, keeping its description.
fn restate(property: &mut Value, with: &Value) {
    let description = property.get("description").cloned();
    *property = with.clone();
    if let Some(description) = description {
        property["description"] = description;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_survive_into_the_document() {
        let doc = AdminApi::openapi();
        let stated = with_rules(doc, &Rules::default());
        let v = serde_json::to_value(&stated).unwrap();
        let rotate = &v["components"]["schemas"]["RotateTokenRequest"];
        assert_eq!(rotate["additionalProperties"], json!(false), "{rotate}");
    }
}
