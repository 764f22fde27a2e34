//! The OpenAPI 3.1 document, generated with utoipa from the handlers' attributes and the real
//! request and response types, so it cannot drift from the code.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{OpenApi as Document, Paths};
use utoipa::{Modify, OpenApi};

use super::error::{
    ErrorBody, NotFound, PayloadTooLarge, ReadScopeMissing, StoreFailed, TokenRevoked,
    Unauthorized, WriteScopeMissing,
};
use super::events::{EventKind, LeakSource, TokenEvent};
use super::input::{
    CreateTokenRequest, IpRestriction, LastUsedParam, PatchTokenRequest, RotateTokenRequest,
    SortParam,
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
        IpRestriction,
        SortParam,
        LastUsedParam,
        TokenEvent,
        EventKind,
        LeakSource,
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
/// (`/`, `/{id}`, …): merge it into an application's document, or read it at
/// `GET <base>/openapi.json`, where the paths carry the base.
pub fn openapi() -> Document {
    let doc = AdminApi::openapi();
    #[cfg(feature = "secret-scanning")]
    let doc = doc.merge_from(LeakApi::openapi());
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

/// The document with every path under `base` (`/personal-access-tokens`; empty at the root).
pub(crate) fn document(base: &str) -> Document {
    let mut doc = openapi();
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
