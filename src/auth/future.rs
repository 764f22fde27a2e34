use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response};
use pin_project::pin_project;
use tower::Service;

use super::AuthError;
use super::body::ResponseBody;
use super::limit::Attempt;
use super::verify::{TOKEN_EXPIRATION, Verifier, expiration_value};
use crate::cache::{Outcome, now_ms};
use crate::principal::Principal;
use crate::stats::Counter;

/// A cache miss's store lookup: its outcome, and the failure-limit attempt it counts as until its
/// refusal is counted (`Err` when the failure limit refused it first).
type Lookup = Pin<Box<dyn Future<Output = Result<(Outcome, Option<Attempt>), AuthError>> + Send>>;

/// The response future of [`PatAuth`](crate::PatAuth).
///
/// On a cache hit it is the inner service's future, unboxed. On a cache miss it first awaits the
/// (boxed, single-flight) store lookup while holding the request and the ready inner service.
#[pin_project]
pub struct ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>>,
{
    #[pin]
    state: State<S, ReqB>,
}

#[pin_project(project = StateProj)]
enum State<S, ReqB>
where
    S: Service<Request<ReqB>>,
{
    Called {
        #[pin]
        future: S::Future,
    },
    /// Called, and the response gets `X-Token-Expiration` (only with
    /// `PatAuthLayerBuilder::token_expiration_header`, for a token that expires).
    Expiring {
        #[pin]
        future: S::Future,
        expires_ms: i64,
    },
    // The two cold variants are boxed: the future is then no larger than the inner service's,
    // which is what a cache hit moves around (a request alone is some 250 bytes).
    Lookup {
        lookup: Lookup,
        pending: Option<Box<Pending<S, ReqB>>>,
    },
    Refused {
        response: Option<Box<Response<Bytes>>>,
    },
}

/// What a cache miss holds while it waits for the store: the ready service, the request and the
/// layer's state.
type Pending<S, ReqB> = (S, Request<ReqB>, Arc<Verifier>);

impl<S, ReqB> std::fmt::Debug for ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Called { .. } | State::Expiring { .. } => "called",
            State::Lookup { .. } => "lookup",
            State::Refused { .. } => "refused",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<S, ReqB> ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>>,
{
    pub(crate) fn called(future: S::Future) -> Self {
        Self {
            state: State::Called { future },
        }
    }

    /// Called; the response gets `X-Token-Expiration` when the request's token expires.
    pub(crate) fn called_expiring(future: S::Future, expires_ms: Option<i64>) -> Self {
        Self {
            state: match expires_ms {
                Some(expires_ms) if expires_ms != i64::MAX => {
                    State::Expiring { future, expires_ms }
                }
                _ => State::Called { future },
            },
        }
    }

    pub(crate) fn refused(response: Response<Bytes>) -> Self {
        Self {
            state: State::Refused {
                response: Some(Box::new(response)),
            },
        }
    }

    pub(crate) fn lookup(
        lookup: Lookup,
        service: S,
        request: Request<ReqB>,
        verifier: Arc<Verifier>,
    ) -> Self {
        Self {
            state: State::Lookup {
                lookup,
                pending: Some(Box::new((service, request, verifier))),
            },
        }
    }
}

impl<S, ReqB, ResB> Future for ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Output = Result<Response<ResponseBody<ResB>>, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project().state.project() {
                StateProj::Called { future } => {
                    return future.poll(cx).map_ok(|res| res.map(ResponseBody::inner));
                }
                StateProj::Expiring { future, expires_ms } => {
                    let expires_ms = *expires_ms;
                    return future.poll(cx).map_ok(|mut res| {
                        // Not on a refusal from behind (a route's `RequireScopesLayer`): the
                        // header is for authenticated answers only.
                        let refused = matches!(res.status().as_u16(), 401 | 403);
                        if !refused && let Some(value) = expiration_value(expires_ms) {
                            res.headers_mut().insert(TOKEN_EXPIRATION, value);
                        }
                        res.map(ResponseBody::inner)
                    });
                }
                StateProj::Refused { response } => {
                    let res = response
                        .take()
                        .expect("ResponseFuture polled after completion");
                    return Poll::Ready(Ok((*res).map(ResponseBody::error)));
                }
                StateProj::Lookup { lookup, pending } => {
                    let looked = ready!(lookup.as_mut().poll(cx));
                    let (mut service, mut request, verifier) = *pending
                        .take()
                        .expect("ResponseFuture polled after completion");
                    // Dropped at the end of this arm: after a refusal was counted.
                    let (admitted, _attempt) = match looked {
                        Ok((outcome, attempt)) => {
                            (verifier.admit(outcome, &mut request, now_ms()), attempt)
                        }
                        Err(error) => (Err(error.into()), None),
                    };
                    if admitted.is_ok() {
                        verifier.cache.stats.add(Counter::OkMiss);
                    }
                    let next = match admitted {
                        Ok(()) if verifier.expiration_header => {
                            let expires_ms = request
                                .extensions()
                                .get::<Principal>()
                                .map(|p| p.0.expires_ms);
                            ResponseFuture::called_expiring(service.call(request), expires_ms).state
                        }
                        Ok(()) => State::Called {
                            future: service.call(request),
                        },
                        Err(refusal) => State::Refused {
                            response: Some(Box::new(verifier.refuse(refusal, &request))),
                        },
                    };
                    self.as_mut().project().state.set(next);
                }
            }
        }
    }
}
