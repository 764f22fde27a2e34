use std::task::{Context, Poll};

use http::{Request, Response, StatusCode};
use tower::{Layer, Service};

use super::error::{Anonymous, AuthError, Challenge, json_response};
use super::future::ResponseFuture;
use super::{ResponseBody, is_grpc};
use crate::principal::Principal;
use crate::scope::{InvalidScope, ScopeSet};

/// Requires scopes on some routes only: put it after [`PatAuthLayer`](crate::PatAuthLayer), for
/// example with axum's `route_layer`. A principal lacking a scope gets 403
/// `insufficient_scope`; a request without a principal gets the 401 challenge.
///
/// ```
/// use axum::{Router, routing::post};
/// use tower_pat::RequireScopesLayer;
///
/// let app: Router = Router::new()
///     .route("/deploy", post(|| async { "deployed" }))
///     .route_layer(RequireScopesLayer::new(["deploy:write"]));
/// ```
#[derive(Clone, Debug)]
pub struct RequireScopesLayer {
    scopes: ScopeSet,
    challenge: Challenge,
}

impl RequireScopesLayer {
    /// Requires every one of `scopes`.
    ///
    /// # Panics
    ///
    /// If a scope string is invalid; see [`RequireScopesLayer::try_new`].
    pub fn new<I, S>(scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::try_new(scopes).unwrap_or_else(|e| panic!("invalid scope: {e}"))
    }

    /// Requires every one of `scopes`, or says which is invalid.
    pub fn try_new<I, S>(scopes: I) -> Result<Self, InvalidScope>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Ok(Self {
            scopes: ScopeSet::parse(scopes)?,
            challenge: Challenge::new("api"),
        })
    }

    /// The realm of the `WWW-Authenticate` challenge (default `api`; use the `PatAuthLayer`'s).
    pub fn realm(mut self, realm: &str) -> Self {
        self.challenge = Challenge::new(realm);
        self
    }
}

impl<S> Layer<S> for RequireScopesLayer {
    type Service = RequireScopes<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireScopes {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`RequireScopesLayer`].
#[derive(Clone, Debug)]
pub struct RequireScopes<S> {
    inner: S,
    layer: RequireScopesLayer,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for RequireScopes<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let grpc = is_grpc(&req);
        let error = match req.extensions().get::<Principal>() {
            Some(p) if p.scopes().grants_all(&self.layer.scopes) => {
                return ResponseFuture::called(self.inner.call(req));
            }
            Some(_) => AuthError::InsufficientScope(self.layer.scopes.clone()),
            None => match req.extensions().get::<Anonymous>() {
                Some(anon) => {
                    return ResponseFuture::refused(
                        anon.challenge()
                            .error_response(&AuthError::MissingCredentials, grpc),
                    );
                }
                None => {
                    tracing::error!("RequireScopesLayer without a PatAuthLayer in front of it");
                    return ResponseFuture::refused(json_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "server_error",
                        "authentication is not configured for this route",
                    ));
                }
            },
        };
        ResponseFuture::refused(self.layer.challenge.error_response(&error, grpc))
    }
}
