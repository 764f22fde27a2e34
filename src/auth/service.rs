//! [`PatAuth`]: the service [`PatAuthLayer`] wraps around an inner service.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::{Layer, Service};

use super::ResponseBody;
use super::future::ResponseFuture;
use super::layer::PatAuthLayer;
use super::verify::{Admission, Verifier};
use crate::principal::Principal;

impl<S> Layer<S> for PatAuthLayer {
    type Service = PatAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PatAuth {
            inner,
            verifier: Arc::clone(&self.verifier),
        }
    }
}

/// The service [`PatAuthLayer`] wraps around an inner service.
#[derive(Clone, Debug)]
pub struct PatAuth<S> {
    inner: S,
    verifier: Arc<Verifier>,
}

impl<S> PatAuth<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the middleware and returns the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for PatAuth<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqB>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        match self.verifier.admit_request(&mut req) {
            // `self.inner` is the service `poll_ready` prepared: call it directly.
            Admission::Admitted if self.verifier.expiration_header => {
                let expires_ms = req.extensions().get::<Principal>().map(|p| p.0.expires_ms);
                ResponseFuture::called_expiring(self.inner.call(req), expires_ms)
            }
            Admission::Admitted => ResponseFuture::called(self.inner.call(req)),
            Admission::Refused(res) => ResponseFuture::refused(res),
            Admission::Uncached(keys) => {
                // The ready service goes with the future; a clone stays for the next request.
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                // The client's address, for its lookup budget and a reuse report (a miss only).
                let client = self.verifier.client_addr(&req);
                let verifier = Arc::clone(&self.verifier);
                let lookup = Box::pin(async move {
                    let attempt = verifier.lookup_attempt(client.limit_key()).await?;
                    let outcome = Arc::clone(&verifier.cache)
                        .load(keys.slot, keys.hash, keys.previous, client)
                        .await;
                    Ok((outcome, attempt))
                });
                ResponseFuture::lookup(lookup, ready, req, Arc::clone(&self.verifier))
            }
        }
    }
}
