//! The endpoints: one handler per operation, each documented for the OpenAPI document by its
//! `#[utoipa::path]` attribute, and the router that puts them behind the layer and the scopes.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{
    DefaultBodyLimit, FromRequest, FromRequestParts, NestedPath, Path, RawQuery, Request, State,
};
use axum::handler::Handler;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use http::request::Parts;
use http::{HeaderValue, StatusCode, header};
use tokio::sync::Mutex;

use super::config::AdminConfig;
use super::error::{
    ApiError, ErrorBody, NotFound, PayloadTooLarge, ReadScopeMissing, StoreFailed, TokenRevoked,
    Unauthorized,
};
use super::events::{EventKind, TokenEvent};
use super::input::{CreateTokenRequest, ListParams, PatchTokenRequest, RotateTokenRequest};
use super::openapi;
use super::policy;
use super::view::{Deleted, IssuedToken, TokenView, json};
use super::{ADMIN_SCOPE, READ_SCOPE, WRITE_SCOPE};
use crate::auth::RequireScopesLayer;
use crate::auth::limit::WindowCounter;
use crate::principal::Principal;
use crate::record::{NewToken, TokenRecord};
use crate::scope::ScopeSet;
use crate::store::{CallerGuard, Rotation, StoreError, TokenPatch};

/// The tag of every operation.
pub(crate) const TAG: &str = "personal-access-tokens";

/// How many subjects the creation limit, and tokens the rotation limit, track at once (those
/// beyond share one window: see [`WindowCounter`]).
const LIMIT_CAPACITY: u64 = 100_000;

/// The router's state: the configuration and what the policies need at run time.
pub(crate) struct Admin {
    config: AdminConfig,
    /// Token creations per subject.
    creations: Option<WindowCounter<String>>,
    /// Rotations per token id.
    rotations: Option<WindowCounter<String>>,
    /// Serializes the count-then-insert of token creation, so the per-subject maximum holds
    /// against concurrent requests to this process.
    create: Mutex<()>,
}

type AppState = State<Arc<Admin>>;

pub(crate) fn router(config: AdminConfig) -> Router {
    let layer = config.layer.clone();
    let body_limit = DefaultBodyLimit::max(config.max_body_bytes);
    #[cfg(feature = "secret-scanning")]
    let leak_body_limit = config
        .leak_reports
        .as_ref()
        .map(|r| DefaultBodyLimit::max(r.max_body_bytes));
    let scope = |scope: &str| RequireScopesLayer::new([scope]).realm(layer.realm());
    let (read, write) = (scope(READ_SCOPE), scope(WRITE_SCOPE));
    let state = Arc::new(Admin {
        creations: config
            .creation_limit
            .map(|(max, window)| WindowCounter::new(max, window, LIMIT_CAPACITY)),
        rotations: config
            .rotation_limit
            .map(|(max, window)| WindowCounter::new(max, window, LIMIT_CAPACITY)),
        create: Mutex::new(()),
        config,
    });
    let router = Router::new()
        .route(
            "/",
            get(list.layer(read.clone())).post(create.layer(write.clone())),
        )
        .route(
            "/self",
            get(get_self.layer(read.clone())).delete(revoke_self),
        )
        .route("/self/rotate", post(rotate_self))
        .route(
            "/{id}",
            get(get_one.layer(read))
                .patch(update.layer(write.clone()))
                .delete(delete.layer(write.clone())),
        )
        .route("/{id}/rotate", post(rotate.layer(write)))
        .layer(body_limit)
        .layer(layer)
        // The document is public: it describes the API, it reveals nothing about tokens.
        .route("/openapi.json", get(openapi_json));
    // Called by a secret scanner, not with a token: its signature is its authentication.
    #[cfg(feature = "secret-scanning")]
    let router = match leak_body_limit {
        Some(limit) => router.route(super::leaks::PATH, post(super::leaks::report.layer(limit))),
        None => router,
    };
    router.with_state(state)
}

/// The request body, read up to [`AdminConfig::max_body_bytes`]: a larger one is a 413 in the
/// API's error shape, before any of it is parsed.
pub(crate) struct RequestBody(pub(crate) Bytes);

impl<S: Send + Sync> FromRequest<S> for RequestBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Bytes::from_request(req, state).await {
            Ok(body) => Ok(Self(body)),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::too_large()),
            Err(e) => Err(ApiError::bad_request(format!(
                "the request body could not be read: {}",
                e.body_text()
            ))),
        }
    }
}

/// Where the router is nested (`/personal-access-tokens`), empty at the root.
pub(crate) struct Base(String);

impl<S: Send + Sync> FromRequestParts<S> for Base {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let base = parts
            .extensions
            .get::<NestedPath>()
            .map_or("", |p| p.as_str().trim_end_matches('/'));
        Ok(Self(base.to_owned()))
    }
}

impl Admin {
    /// The configuration.
    #[cfg(feature = "secret-scanning")]
    pub(crate) fn config(&self) -> &AdminConfig {
        &self.config
    }

    /// Whether the caller's own token may still act, read from the store after the request body
    /// arrived: the layer authenticated the headers, and a slow body must not carry a token past
    /// its revocation (or deletion, or expiry). A secret superseded by a rotation, still in its
    /// grace period, may authenticate requests but not manage tokens.
    ///
    /// Every ceiling a write is held to (the caller's scopes, expiry and networks) is read from
    /// the principal, so the stored token must still have the ones the principal has: a token
    /// narrowed while its request's body was on the way, or while this node's cache had not yet
    /// heard of the change, would otherwise undo its own narrowing or hand a child what it lost.
    /// Such a request is refused (409 `conflict`: send it again, it then runs under the token as
    /// it is). Only a self-revocation ([`revoke_self`]) skips this: it gives nothing, and must not
    /// wait for a lagging cache.
    ///
    /// Returns the caller's record as read and compared: a write that acts on the caller's own
    /// token starts from it ([`target`](Self::target)), so that the version its write is
    /// conditioned on is the one compared here.
    async fn caller_may_act(&self, caller: &Principal) -> Result<TokenRecord, ApiError> {
        self.caller_check(caller, true).await
    }

    /// [`caller_may_act`](Self::caller_may_act), with the ceilings compared (`ceilings`) or not.
    async fn caller_check(
        &self,
        caller: &Principal,
        ceilings: bool,
    ) -> Result<TokenRecord, ApiError> {
        let now = Utc::now();
        match self.config.store.get(caller.token_id()).await? {
            Some(own) if own.is_active_at(now) && own.hash == caller.0.stored_hash() => {
                // To the millisecond, and the networks as a set: a layer may be built over a
                // lookup that shares the records but keeps them otherwise.
                let ms = |t: Option<DateTime<Utc>>| t.map(|t| t.timestamp_millis());
                let nets = |n: &[ipnet::IpNet]| n.iter().copied().collect::<BTreeSet<_>>();
                let unchanged = own.scopes == *caller.scopes()
                    && ms(own.expires_at) == ms(caller.expires_at())
                    && nets(&own.ip_restriction) == nets(caller.ip_restriction());
                if ceilings && !unchanged {
                    return Err(ApiError::caller_changed());
                }
                Ok(own)
            }
            Some(own)
                if own.is_active_at(now) && own.matches_hash(&caller.0.stored_hash(), now) =>
            {
                Err(ApiError::forbidden(
                    "forbidden",
                    "a secret replaced by a rotation cannot manage tokens; use the new secret",
                ))
            }
            _ => Err(ApiError::caller_gone()),
        }
    }

    /// Revokes `id` if `covering` grants every scope it holds
    /// ([`TokenStore::revoke_if_covered`](crate::TokenStore::revoke_if_covered)) and, with
    /// `own` (the caller's record as [`caller_may_act`](Self::caller_may_act) read and compared
    /// it; `None` when the caller revokes itself, which gives nothing), the caller is still that
    /// version, checked in the same atomic write
    /// ([`revoke_if_covered_guarded`](crate::TokenStore::revoke_if_covered_guarded)): a caller
    /// narrowed, disabled or revoked since its check revokes nothing on the strength of what it
    /// was. On a store without the guarded write, the caller is read again right before it
    /// ([`caller_still`](Self::caller_still): a narrower window, not none); on one
    /// without the conditional write, without the condition.
    async fn revoke_checked(
        &self,
        id: &str,
        at: DateTime<Utc>,
        covering: &ScopeSet,
        own: Option<&TokenRecord>,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let store = &self.config.store;
        if let Some(own) = own {
            let guard = CallerGuard::new(&*own.id, own.version);
            match store
                .revoke_if_covered_guarded(id, at, covering, &guard)
                .await
            {
                Err(StoreError::Unsupported { .. }) => self.caller_still(&guard).await?,
                other => return other,
            }
        }
        match store.revoke_if_covered(id, at, covering).await {
            Err(StoreError::Unsupported { .. }) => store.revoke(id, at).await,
            other => other,
        }
    }

    /// Deletes `id` if `covering` grants every scope it holds
    /// ([`TokenStore::delete_if_covered`](crate::TokenStore::delete_if_covered)) and, with `own`,
    /// the caller is still that version, as [`revoke_checked`](Self::revoke_checked)
    /// ([`delete_if_covered_guarded`](crate::TokenStore::delete_if_covered_guarded)).
    async fn delete_checked(
        &self,
        id: &str,
        covering: &ScopeSet,
        own: Option<&TokenRecord>,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let store = &self.config.store;
        if let Some(own) = own {
            let guard = CallerGuard::new(&*own.id, own.version);
            match store.delete_if_covered_guarded(id, covering, &guard).await {
                Err(StoreError::Unsupported { .. }) => self.caller_still(&guard).await?,
                other => return other,
            }
        }
        match store.delete_if_covered(id, covering).await {
            Err(StoreError::Unsupported { .. }) => store.delete(id).await,
            other => other,
        }
    }

    /// The caller's record read again: still the version `guard` names, or
    /// [`StoreError::CallerChanged`]. The fallback of a store that cannot check a
    /// [`CallerGuard`] in its write, run right before each attempt of it.
    async fn caller_still(&self, guard: &CallerGuard) -> Result<(), StoreError> {
        guard.check(self.config.store.get(&guard.id).await?.as_ref())
    }

    /// Runs `write` (a revocation or deletion of `id` on the condition that the scopes it is
    /// given, the caller's, grant every scope the token holds when it is written) as `caller`
    /// may, the token read and checked already. Only a token given a scope the caller lacks fails
    /// the condition: it is then read and checked again, and refused (403). Renames, rotations
    /// and changes within the caller's scopes are no condition, so the holder of a leaked token
    /// cannot keep its revocation failing.
    async fn act_checked<F, Fut>(
        &self,
        caller: &Principal,
        id: &str,
        write: F,
    ) -> Result<Option<TokenRecord>, ApiError>
    where
        F: Fn(ScopeSet) -> Fut,
        Fut: Future<Output = Result<Option<TokenRecord>, StoreError>>,
    {
        // A retry only after a widening that was taken back before the re-check.
        for _ in 0..4 {
            match write(caller.scopes().clone()).await {
                Err(StoreError::Stale) => {
                    let record = self.load(caller, id).await?;
                    policy::may_act_on(caller, &record)?;
                }
                done => return Ok(done?),
            }
        }
        Err(ApiError::stale())
    }

    /// The record `id` if the caller may act on it: its own, or any with the admin scope.
    /// Anything else is 404, so ids of other subjects' tokens cannot be probed.
    async fn load(&self, caller: &Principal, id: &str) -> Result<TokenRecord, ApiError> {
        match self.config.store.get(id).await? {
            Some(r) if r.subject == caller.subject() || caller.has_scope(ADMIN_SCOPE) => Ok(r),
            _ => Err(ApiError::not_found()),
        }
    }

    /// The record `id` that `caller` means to change, as [`load`](Self::load) would answer it,
    /// `own` being the caller's record as [`caller_may_act`](Self::caller_may_act) read and
    /// compared it. For the caller's own token that record itself, not a second read: a write
    /// conditioned on the version of a second read would undo whatever changed the token in
    /// between (a narrowing, a disabling, a shorter expiry), every ceiling being the principal's.
    async fn target(
        &self,
        caller: &Principal,
        own: &TokenRecord,
        id: &str,
    ) -> Result<TokenRecord, ApiError> {
        if id != own.id {
            return self.load(caller, id).await;
        }
        if own.subject == caller.subject() || caller.has_scope(ADMIN_SCOPE) {
            Ok(own.clone())
        } else {
            Err(ApiError::not_found())
        }
    }

    /// The condition that `own` (the caller's record as [`caller_may_act`](Self::caller_may_act)
    /// read and compared it) puts on a write to token `id`, made under its ceilings. None for
    /// the caller's own token: the write is conditioned on `own`'s version already
    /// ([`target`](Self::target)). For another token, its [`CallerGuard`], which the store checks
    /// in the write itself, so that a caller narrowed (or disabled, rotated, revoked) since its
    /// check never hands another token what it lost. A store that does not check the guard
    /// ([`TokenStore::checks_caller_guard`](crate::TokenStore::checks_caller_guard) `false`)
    /// would ignore it: the caller is then read again here, as late as possible before the write,
    /// and the request refused (409) if it changed; a narrower window than the check's, not none.
    async fn caller_guard(
        &self,
        own: &TokenRecord,
        id: &str,
    ) -> Result<Option<CallerGuard>, ApiError> {
        if id == own.id {
            return Ok(None);
        }
        let guard = CallerGuard::new(&*own.id, own.version);
        if self.config.store.checks_caller_guard() {
            return Ok(Some(guard));
        }
        self.caller_still(&guard).await?;
        Ok(None)
    }

    /// The view of a record with the usage marks not yet written behind merged in, so that
    /// `lastUsedAt` and `lastUsedIps` are fresh.
    fn view(&self, record: &TokenRecord, now: DateTime<Utc>) -> TokenView {
        match self
            .config
            .layer
            .usage()
            .and_then(|u| u.pending(&record.id))
        {
            Some(pending) => {
                let mut fresh = record.clone();
                fresh.apply_usage(&pending);
                TokenView::new(&fresh, now)
            }
            None => TokenView::new(record, now),
        }
    }

    /// Logs the change (one info line: the event, the token's id and subject, never a secret)
    /// and publishes its event.
    fn emit(&self, kind: EventKind, view: impl FnOnce() -> TokenView, at: DateTime<Utc>) {
        let view = view();
        tracing::info!(
            target: "tower_pat::admin",
            event = kind.as_str(),
            token_id = %view.id,
            subject = %view.subject,
            "token changed"
        );
        self.publish(TokenEvent::new(kind, view, at));
    }

    /// [`emit`](Self::emit)s `personalAccessToken.revoked` for `record`, as a revocation written
    /// at `at` returned it, only if that write is the one that revoked it: of two concurrent
    /// revocations (a self-revocation sent twice, a `PATCH` racing a `DELETE /self`), the one
    /// that found the token revoked already sends nothing.
    fn emit_revoked(&self, record: &TokenRecord, at: DateTime<Utc>) {
        if record.revoked_by_write_at(at) {
            self.emit(EventKind::Revoked, || TokenView::new(record, at), at);
        }
    }

    /// Hands `event` to the configured sink, if any.
    pub(crate) fn publish(&self, event: TokenEvent) {
        if let Some(sink) = &self.config.events {
            sink.publish(event);
        }
    }
}

/// Create a personal access token.
///
/// The answer is the only time the secret is shown: as `token`, `secret` and `accessToken`.
///
/// The new token never gets more than the token that creates it: its scopes are all the caller's,
/// its expiry is no later than the caller's (a default lifetime is cut to it), and its networks
/// lie within the caller's (it inherits them when the request names none).
#[utoipa::path(
    post,
    path = "/",
    tag = TAG,
    request_body = CreateTokenRequest,
    responses(
        (status = 201, description = "Created; the secret is shown this once", body = IssuedToken,
            headers(("Location" = String, description = "The new token's URL"))),
        (status = 400, description = "A field is missing, unknown, of the wrong type or invalid (the message names it; also `revoked: true`, `active: false`, another subject, too many scopes or networks), or the expiry rule is broken", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 403, description = "A scope is missing (`personalAccessToken:write`, or a requested scope the caller lacks: `insufficient_scope`), the token would outlive the caller or reach beyond its networks (`forbidden`), or the subject has the maximum number of tokens", body = ErrorBody),
        (status = 409, description = "The caller already has a token with this name, or the caller's own token changed (scopes, expiry, networks) while the request was processed (`conflict`: send it again)", body = ErrorBody),
        (status = 413, response = PayloadTooLarge),
        (status = 429, description = "Too many tokens created recently; see `Retry-After`", body = ErrorBody),
        (status = 500, response = StoreFailed),
    ),
    security(("bearer" = ["personalAccessToken:write"]))
)]
pub(crate) async fn create(
    State(admin): AppState,
    caller: Principal,
    Base(base): Base,
    RequestBody(body): RequestBody,
) -> Result<Response, ApiError> {
    let req = CreateTokenRequest::from_json(&body, admin.config.limits)?;
    let own = admin.caller_may_act(&caller).await?;
    let now = crate::record::now();
    req.check_owner(caller.subject())?;
    policy::scopes_held(&caller, &req.scopes)?;
    let expires_at =
        admin
            .config
            .resolve_expiry(req.expires_at, req.user_aware_token_never_expires, now)?;
    let expires_at = if req.expires_at.is_none() && !req.user_aware_token_never_expires {
        // The server's default, not the client's request: cut to the caller's expiry.
        policy::default_expiry(&caller, expires_at)
    } else {
        policy::expiry_within(&caller, expires_at)?;
        expires_at
    };
    let ip_restriction = policy::child_networks(&caller, req.ip_restriction)?;
    if let Some(limiter) = &admin.creations {
        limiter
            .try_count(caller.subject().to_owned())
            .map_err(|retry| ApiError::too_many("personal access tokens created", retry))?;
    }
    let mut token = NewToken::new(caller.subject(), req.name)
        .scope_set(req.scopes)
        .token_type(req.token_type)
        .ip_restriction(ip_restriction);
    token.expires_at = expires_at.map(crate::record::micros);
    let (record, secret) = admin.config.tokens.mint(token, now);
    let max = admin.config.max_tokens_per_subject;
    let store = &admin.config.store;
    // On the condition that the caller is still the version whose ceilings the new token was
    // checked against: a caller narrowed meanwhile never mints a child with what it lost.
    let guard = CallerGuard::new(&*own.id, own.version);
    let inserted = match store.insert_below_guarded(&record, max, &guard).await {
        // A store without the guard: the caller read again just before the insert (see
        // `caller_guard`).
        Err(StoreError::Unsupported { .. }) => {
            admin.caller_still(&guard).await?;
            match store.insert_below(&record, max).await {
                // A store without the conditional insert: one creation at a time in this
                // process.
                Err(StoreError::Unsupported { .. }) => {
                    let _one_at_a_time = admin.create.lock().await;
                    let below = store.count_by_subject(caller.subject()).await? < max;
                    if below {
                        store.insert(&record).await?;
                    }
                    below
                }
                inserted => inserted?,
            }
        }
        inserted => inserted?,
    };
    if !inserted {
        return Err(ApiError::forbidden(
            "token_limit_reached",
            format!("a subject may have at most {max} personal access tokens"),
        ));
    }
    let view = TokenView::new(&record, now);
    admin.emit(EventKind::Created, || view.clone(), now);
    let mut res = json(StatusCode::CREATED, &IssuedToken::new(view, &secret));
    if let Ok(location) = HeaderValue::try_from(format!("{base}/{}", record.id)) {
        res.headers_mut().insert(header::LOCATION, location);
    }
    Ok(res)
}

/// List personal access tokens: the caller's, or another subject's with `ownerId` or `subject`
/// (admin scope), filtered by name, last use, creation time and state.
///
/// The total number of matching tokens is in `X-Total-Count`.
#[utoipa::path(
    get,
    path = "/",
    tag = TAG,
    params(ListParams),
    responses(
        (status = 200, description = "One page of tokens", body = Vec<TokenView>,
            headers(("X-Total-Count" = u64, description = "How many tokens match in all"))),
        (status = 400, description = "A query parameter is invalid (the message names it)", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 403, description = "`personalAccessToken:read` is missing, or `personalAccessToken:admin` for another subject's tokens", body = ErrorBody),
        (status = 500, response = StoreFailed),
    ),
    security(("bearer" = ["personalAccessToken:read"]))
)]
pub(crate) async fn list(
    State(admin): AppState,
    caller: Principal,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = ListParams::from_query(query.as_deref().unwrap_or(""))?;
    if !caller.has_scope(ADMIN_SCOPE) && params.named_subjects().any(|s| s != caller.subject()) {
        return Err(ApiError::forbidden(
            "insufficient_scope",
            format!(
                "ownerId: another subject's tokens need the {ADMIN_SCOPE} scope (also as subject)"
            ),
        ));
    }
    if params.names_two_subjects() {
        // No token has two subjects.
        let mut res = json(StatusCode::OK, &Vec::<TokenView>::new());
        res.headers_mut()
            .insert("x-total-count", HeaderValue::from(0u64));
        return Ok(res);
    }
    let subject = params.owner_id.as_deref().unwrap_or(caller.subject());
    // A filter or order on the last use must see the marks not yet written behind, as the
    // views do: they are written first.
    if params.reads_last_use()
        && let Some(usage) = admin.config.layer.usage()
    {
        usage.flush().await?;
    }
    let now = crate::record::now();
    let page = admin
        .config
        .store
        .list(&params.to_query(subject, admin.config.default_page_size, now))
        .await?;
    let views: Vec<TokenView> = page.items.iter().map(|r| admin.view(r, now)).collect();
    let mut res = json(StatusCode::OK, &views);
    res.headers_mut()
        .insert("x-total-count", HeaderValue::from(page.total));
    Ok(res)
}

/// The token that authenticated this request.
#[utoipa::path(
    get,
    path = "/self",
    tag = TAG,
    responses(
        (status = 200, description = "The caller's own token", body = TokenView),
        (status = 401, response = Unauthorized),
        (status = 403, response = ReadScopeMissing),
        (status = 404, description = "The token was deleted meanwhile", body = ErrorBody),
        (status = 500, response = StoreFailed),
    ),
    security(("bearer" = ["personalAccessToken:read"]))
)]
pub(crate) async fn get_self(
    State(admin): AppState,
    caller: Principal,
) -> Result<Response, ApiError> {
    let record = admin.load(&caller, caller.token_id()).await?;
    let view = admin
        .view(&record, Utc::now())
        .with_used_at(caller.last_used_at());
    Ok(json(StatusCode::OK, &view))
}

/// One personal access token.
#[utoipa::path(
    get,
    path = "/{id}",
    tag = TAG,
    params(("id" = String, Path, description = "The token's id")),
    responses(
        (status = 200, description = "The token", body = TokenView),
        (status = 401, response = Unauthorized),
        (status = 403, response = ReadScopeMissing),
        (status = 404, response = NotFound),
        (status = 500, response = StoreFailed),
    ),
    security(("bearer" = ["personalAccessToken:read"]))
)]
pub(crate) async fn get_one(
    State(admin): AppState,
    caller: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let record = admin.load(&caller, &id).await?;
    Ok(json(StatusCode::OK, &admin.view(&record, Utc::now())))
}

/// Update, disable, enable or revoke a personal access token (JSON merge patch).
///
/// `active: false` disables the token (every layer refuses it, "the access token is disabled",
/// from the next request on) and `active: true` enables it again; `revoked: true` revokes it for
/// good.
///
/// The caller must hold every scope the token holds, whoever owns it; new scopes must be the
/// caller's, a new expiry no later than the caller's and new networks within the caller's (so a
/// token can narrow itself, never widen itself).
#[utoipa::path(
    patch,
    path = "/{id}",
    tag = TAG,
    params(("id" = String, Path, description = "The token's id")),
    request_body(content = PatchTokenRequest, content_type = "application/merge-patch+json"),
    responses(
        (status = 200, description = "The updated token", body = TokenView),
        (status = 400, description = "A field is unknown, of the wrong type or invalid (the message names it; also a change of `type` or subject, too many scopes or networks)", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 403, description = "`personalAccessToken:write` is missing, the caller lacks a scope the token holds or a requested one (`insufficient_scope`), or the change would make the token outlive the caller or reach beyond its networks (`forbidden`)", body = ErrorBody),
        (status = 404, response = NotFound),
        (status = 409, description = "The subject already has a token with this name, or the token or the caller's own token changed while the request was processed (`conflict`: read it again and retry), or `active: true` or a new `expiresAt` for an expired token (`token_expired`). With `revoked: true` next to other fields, the other fields are written first: a 403 or 409 of the revocation may leave them written; the request may be sent again", body = ErrorBody),
        (status = 410, response = TokenRevoked),
        (status = 413, response = PayloadTooLarge),
        (status = 500, response = StoreFailed),
    ),
    security(("bearer" = ["personalAccessToken:write"]))
)]
pub(crate) async fn update(
    State(admin): AppState,
    caller: Principal,
    Path(id): Path<String>,
    RequestBody(body): RequestBody,
) -> Result<Response, ApiError> {
    let patch = PatchTokenRequest::from_json(&body, admin.config.limits)?;
    let own = admin.caller_may_act(&caller).await?;
    let mut record = admin.target(&caller, &own, &id).await?;
    let now = crate::record::now();
    policy::may_act_on(&caller, &record)?;
    patch.check_unchangeable(&record, now)?;
    if let Some(scopes) = &patch.scopes {
        policy::scopes_held(&caller, scopes)?;
    }
    let expires_at = patch
        .expires_at
        .map(|at| {
            admin
                .config
                .resolve_expiry(at, patch.user_aware_token_never_expires, now)
        })
        .transpose()?;
    if let Some(at) = expires_at {
        policy::expiry_within(&caller, at)?;
    }
    if let Some(nets) = &patch.ip_restriction {
        policy::networks_within(&caller, nets)?;
    }
    if patch.revoked == Some(false) && record.is_revoked() {
        return Err(ApiError::token_not_reinstated());
    }
    if record.is_revoked()
        && (patch.name.is_some()
            || patch.scopes.is_some()
            || patch.expires_at.is_some()
            || patch.ip_restriction.is_some()
            || patch.active.is_some())
    {
        return Err(ApiError::token_revoked());
    }
    let before = record.clone();
    if let Some(name) = patch.name {
        record.name = name;
    }
    if let Some(scopes) = patch.scopes {
        record.scopes = scopes;
    }
    if let Some(expires_at) = expires_at {
        record.expires_at = expires_at;
    }
    if let Some(nets) = patch.ip_restriction {
        record.ip_restriction = nets;
    }
    match patch.active {
        Some(false) if !record.is_disabled() => record.disabled_at = Some(now),
        Some(true) => record.disabled_at = None,
        _ => {}
    }
    policy::grants_within(&caller, &before, &record)?;
    if record != before {
        // Only what this request changes, and only if nobody changed the token since it was read:
        // a write from a stale read would undo the other change (a revocation, a rotation). Nor
        // the caller, whose ceilings the change was checked against.
        let mut patch = changes(&before, &record, now);
        if let Some(guard) = admin.caller_guard(&own, &id).await? {
            patch = patch.if_caller(guard);
        }
        record = admin.config.store.update(&id, &patch).await?;
        let kind = match (before.is_disabled(), record.is_disabled()) {
            (false, true) => EventKind::Disabled,
            (true, false) => EventKind::Enabled,
            _ => EventKind::Updated,
        };
        admin.emit(kind, || TokenView::new(&record, now), now);
    }
    if patch.revoked == Some(true) && !record.is_revoked() {
        // On the condition that the caller still holds every scope the token holds when it is
        // written: one given a scope the caller lacks meanwhile is not revoked on the strength
        // of the check above. Nor if the caller changed since its check (another token only:
        // a token revoking itself gives nothing, and its own write above changed its version).
        let guard = (id != own.id).then_some(&own);
        record = admin
            .act_checked(&caller, &id, |covering| {
                let (admin, id) = (&admin, id.as_str());
                async move { admin.revoke_checked(id, now, &covering, guard).await }
            })
            .await?
            .ok_or_else(ApiError::not_found)?;
        admin.emit_revoked(&record, now);
    }
    Ok(json(StatusCode::OK, &admin.view(&record, now)))
}

/// Rotate a personal access token's secret.
///
/// Name, scopes, type, IP restriction and (unless `expiresAt` is given) expiry carry over. The
/// previous secret stops working at once, or after `gracePeriodSeconds`.
///
/// The caller receives the new secret, so the token must be no more than the caller: the caller
/// holds every scope it holds, its networks lie within the caller's, and its expiry (the new one,
/// if given) is no later than the caller's.
#[utoipa::path(
    post,
    path = "/{id}/rotate",
    tag = TAG,
    params(("id" = String, Path, description = "The token's id")),
    request_body(content = Option<RotateTokenRequest>, description = "Optional"),
    responses(
        (status = 201, description = "Rotated; the new secret is shown this once", body = IssuedToken),
        (status = 400, description = "The token is expired, or a field is unknown, invalid or one a rotation keeps (name, scopes, type, networks)", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 403, description = "`personalAccessToken:write` is missing, the caller lacks a scope the token holds (`insufficient_scope`), or the token would outlive the caller or reaches beyond its networks (`forbidden`)", body = ErrorBody),
        (status = 404, response = NotFound),
        (status = 409, description = "The token or the caller's own token changed (another rotation, an update) while the request was processed (`conflict`: read it again and retry), or it expired (`token_expired`)", body = ErrorBody),
        (status = 410, response = TokenRevoked),
        (status = 413, response = PayloadTooLarge),
        (status = 429, description = "The token was rotated too often recently (`rotation_rate_limit`); see `Retry-After`", body = ErrorBody),
        (status = 500, response = StoreFailed),
    ),
    security(("bearer" = ["personalAccessToken:write"]))
)]
pub(crate) async fn rotate(
    State(admin): AppState,
    caller: Principal,
    Path(id): Path<String>,
    RequestBody(body): RequestBody,
) -> Result<Response, ApiError> {
    rotate_token(&admin, &caller, id, &body).await
}

/// Rotate the secret of the token that authenticates this request (GitLab's self-rotation).
///
/// Needs no scope: any token may replace its own secret, under the rules of a rotation (it keeps
/// its name, scopes, networks and, unless `expiresAt` is given, its expiry; a new expiry is no later
/// than the current one). Only the current secret may rotate (not one in its grace period), and
/// the new secret is answered once.
#[utoipa::path(
    post,
    path = "/self/rotate",
    tag = TAG,
    request_body(content = Option<RotateTokenRequest>, description = "Optional"),
    responses(
        (status = 201, description = "Rotated; the new secret is shown this once", body = IssuedToken),
        (status = 400, description = "A field is unknown, invalid or one a rotation keeps (name, scopes, type, networks)", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 403, description = "The request used a secret replaced by a rotation (`forbidden`), or asked for an expiry later than the token's own (`forbidden`)", body = ErrorBody),
        (status = 404, description = "The token was deleted meanwhile", body = ErrorBody),
        (status = 409, description = "The token changed while the request was processed (`conflict`: retry), or it expired (`token_expired`)", body = ErrorBody),
        (status = 410, response = TokenRevoked),
        (status = 413, response = PayloadTooLarge),
        (status = 429, description = "The token was rotated too often recently (`rotation_rate_limit`); see `Retry-After`", body = ErrorBody),
        (status = 500, response = StoreFailed),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn rotate_self(
    State(admin): AppState,
    caller: Principal,
    RequestBody(body): RequestBody,
) -> Result<Response, ApiError> {
    let id = caller.token_id().to_owned();
    rotate_token(&admin, &caller, id, &body).await
}

/// Revoke the token that authenticates this request (GitLab's self-revocation): it stops working
/// at once, for good.
#[utoipa::path(
    delete,
    path = "/self",
    tag = TAG,
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, response = Unauthorized),
        (status = 403, description = "The request used a secret replaced by a rotation (`forbidden`)", body = ErrorBody),
        (status = 404, description = "The token was deleted meanwhile", body = ErrorBody),
        (status = 500, response = StoreFailed),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn revoke_self(
    State(admin): AppState,
    caller: Principal,
) -> Result<Response, ApiError> {
    admin.caller_check(&caller, false).await?;
    let now = crate::record::now();
    let record = admin
        .config
        .store
        .revoke(caller.token_id(), now)
        .await?
        .ok_or_else(ApiError::not_found)?;
    admin.emit_revoked(&record, now);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A rotation of token `id` by `caller`: the shared body of [`rotate`] and [`rotate_self`].
async fn rotate_token(
    admin: &Admin,
    caller: &Principal,
    id: String,
    body: &[u8],
) -> Result<Response, ApiError> {
    let caller = caller.clone();
    let req = RotateTokenRequest::from_json(body)?;
    let max_grace = admin.config.max_rotation_grace.as_secs();
    if req.grace_period_seconds.is_some_and(|g| g > max_grace) {
        return Err(ApiError::invalid(
            "gracePeriodSeconds",
            format!("at most {max_grace} seconds on this server"),
        ));
    }
    let own = admin.caller_may_act(&caller).await?;
    let mut record = admin.target(&caller, &own, &id).await?;
    let now = crate::record::now();
    policy::may_act_on(&caller, &record)?;
    req.check_owner(&record)?;
    if record.is_revoked() {
        return Err(ApiError::token_revoked());
    }
    if record.is_expired_at(now) {
        return Err(ApiError::token_expired(
            "an expired token cannot be rotated; create a new one",
        ));
    }
    let expires_at = match req.expires_at {
        Some(at) => admin.config.resolve_expiry(Some(at), false, now)?,
        None => record.expires_at,
    };
    policy::may_receive_secret(&caller, &record, expires_at)?;
    if let Some(limiter) = &admin.rotations {
        limiter
            .try_count(id.clone())
            .map_err(|retry| ApiError::too_many("rotations of this token", retry))?;
    }
    record.expires_at = expires_at;
    let grace = req
        .grace_period_seconds
        .map(std::time::Duration::from_secs)
        .unwrap_or_default();
    let grace_until = (!grace.is_zero()).then(|| crate::record::after(now, grace));
    let (fresh, secret) = admin
        .config
        .tokens
        .mint(NewToken::new(&*record.subject, &*record.name), now);
    // Applied only while the secret read above is still the token's, at the version read: a
    // rotation racing another change never brings back a secret rotated away or a revoked token.
    let mut rotation = Rotation::new(record.hash, fresh.hash, fresh.start, now)
        .if_version(record.version)
        .if_unexpired()
        .grace_until(grace_until);
    if req.expires_at.is_some() {
        rotation = rotation.expires_at(record.expires_at);
    }
    // Nor if the caller changed since its ceilings were checked.
    if let Some(guard) = admin.caller_guard(&own, &id).await? {
        rotation = rotation.if_caller(guard);
    }
    let record = admin.config.store.rotate(&id, &rotation).await?;
    let view = TokenView::new(&record, now);
    admin.emit(EventKind::Rotated, || view.clone(), now);
    let mut issued = IssuedToken::new(view, &secret);
    issued.previous_token_valid_until = grace_until;
    Ok(json(StatusCode::CREATED, &issued))
}

/// The patch that turns `before` (the record as read) into `after`: the fields that differ, on the
/// condition that the record is still the version read.
fn changes(before: &TokenRecord, after: &TokenRecord, at: DateTime<Utc>) -> TokenPatch {
    let mut patch = TokenPatch::new(at).if_version(before.version);
    if after.name != before.name {
        patch = patch.name(after.name.clone());
    }
    if after.scopes != before.scopes {
        patch = patch.scopes(after.scopes.clone());
    }
    if after.expires_at != before.expires_at {
        patch = patch.expires_at(after.expires_at);
    }
    if after.ip_restriction != before.ip_restriction {
        patch = patch.ip_restriction(after.ip_restriction.iter().copied());
    }
    match (before.is_disabled(), after.is_disabled()) {
        (false, true) => patch = patch.disable(),
        (true, false) => patch = patch.enable(),
        _ => {}
    }
    // A new expiry or an enabling was checked against a token not yet expired: if it expired
    // since, the write must not bring it back.
    if patch.expires_at.is_some() || patch.disabled_at == Some(None) {
        patch = patch.if_unexpired();
    }
    patch
}

/// Delete a personal access token: the record is gone and the token stops working at once.
///
/// The caller must hold every scope the token holds, whoever owns it.
#[utoipa::path(
    delete,
    path = "/{id}",
    tag = TAG,
    params(("id" = String, Path, description = "The token's id")),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 401, response = Unauthorized),
        (status = 403, description = "`personalAccessToken:write` is missing, or the caller lacks a scope the token holds (`insufficient_scope`)", body = ErrorBody),
        (status = 404, response = NotFound),
        (status = 409, description = "The token or the caller's own token changed while the request was processed (`conflict`: read it again and retry)", body = ErrorBody),
        (status = 500, response = StoreFailed),
    ),
    security(("bearer" = ["personalAccessToken:write"]))
)]
pub(crate) async fn delete(
    State(admin): AppState,
    caller: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let own = admin.caller_may_act(&caller).await?;
    let record = admin.load(&caller, &id).await?;
    policy::may_act_on(&caller, &record)?;
    // On the condition that the caller still holds every scope the token holds when it is
    // written: one given a scope the caller lacks meanwhile is not deleted on the strength of
    // the check above. Nor if the caller changed since its check (narrowed, disabled, revoked):
    // the scopes it deletes with are those it had then. A token deleting itself gives nothing.
    let guard = (id != own.id).then_some(&own);
    let removed = admin
        .act_checked(&caller, &id, |covering| {
            let (admin, id) = (&admin, id.as_str());
            async move { admin.delete_checked(id, &covering, guard).await }
        })
        .await?
        .ok_or_else(ApiError::not_found)?;
    let now = crate::record::now();
    admin.emit(EventKind::Deleted, || TokenView::new(&removed, now), now);
    Ok(json(StatusCode::OK, &Deleted::OK))
}

/// This API's OpenAPI 3.1 document, with its paths under the base the router is nested at.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = TAG,
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")),
    security(())
)]
pub(crate) async fn openapi_json(State(admin): AppState, Base(base): Base) -> Response {
    match openapi::document(&base, &admin.config.openapi_rules()).to_json() {
        Ok(doc) => ([(header::CONTENT_TYPE, "application/json")], doc).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "could not serialize the OpenAPI document");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}
