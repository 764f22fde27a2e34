//! Shared test helpers: a counting store, token issuing, requests through the layer.
#![allow(dead_code, unused_imports, unreachable_pub, missing_docs)]

#[cfg(feature = "postgres")]
pub mod pg;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Weak;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};
/// Every test issues tokens through the crate's one handle.
pub use tower_pat::Tokens;
use tower_pat::store::{ChangeListener, ListQuery, Page, Rotation, TokenPatch};
use tower_pat::{
    MemoryStore, NewToken, PatAuthLayer, Principal, ScopeSet, StoreError, TokenHash, TokenLookup,
    TokenRecord, TokenSecret, TokenStore, UsageUpdate,
};

/// A `MemoryStore` that counts lookups and can be slowed down or made to fail. As a
/// [`TokenStore`] it also counts every call (`calls`, lookups included) and revocations.
#[derive(Clone, Default)]
pub struct CountingStore {
    pub inner: MemoryStore,
    pub lookups: Arc<AtomicUsize>,
    /// Every store call: lookups and management reads and writes.
    pub calls: Arc<AtomicUsize>,
    pub revokes: Arc<AtomicUsize>,
    /// Lookups in the history of superseded secrets (`find_superseded`).
    pub superseded_lookups: Arc<AtomicUsize>,
    /// How long each `find_superseded` takes.
    pub superseded_delay_ms: Arc<AtomicU64>,
    /// `find_superseded` calls in progress (not yet answered, nor given up by the caller).
    pub superseded_in_progress: Arc<AtomicUsize>,
    /// The most `find_superseded` calls in progress at once.
    pub superseded_most: Arc<AtomicUsize>,
    pub delay_ms: Arc<AtomicU64>,
    /// How long each `get` takes.
    pub get_delay_ms: Arc<AtomicU64>,
    pub failing: Arc<std::sync::atomic::AtomicBool>,
    /// Like a store without a change feed: caches are not told about changes.
    pub no_feed: bool,
    pub usage_batches: Arc<std::sync::Mutex<Vec<Vec<UsageUpdate>>>>,
}

impl CountingStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn lookups(&self) -> usize {
        self.lookups.load(Ordering::SeqCst)
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn superseded_lookups(&self) -> usize {
        self.superseded_lookups.load(Ordering::SeqCst)
    }

    pub fn revokes(&self) -> usize {
        self.revokes.load(Ordering::SeqCst)
    }

    pub fn superseded_in_progress(&self) -> usize {
        self.superseded_in_progress.load(Ordering::SeqCst)
    }

    pub fn superseded_most(&self) -> usize {
        self.superseded_most.load(Ordering::SeqCst)
    }

    fn count(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
}

/// One call in progress, counted down on drop.
struct InProgress(Arc<AtomicUsize>);

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl TokenLookup for CountingStore {
    async fn find_by_hash(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        self.count();
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::backend("store is down"));
        }
        self.inner.find_by_hash(hash).await
    }

    async fn record_usage(&self, updates: &[UsageUpdate]) -> Result<(), StoreError> {
        self.usage_batches.lock().unwrap().push(updates.to_vec());
        self.inner.record_usage(updates).await
    }

    fn subscribe(&self, listener: Weak<dyn ChangeListener>) -> bool {
        !self.no_feed && self.inner.subscribe(listener)
    }

    async fn find_superseded(
        &self,
        hash: &TokenHash,
    ) -> Result<Option<tower_pat::store::SupersededSecret>, StoreError> {
        self.superseded_lookups.fetch_add(1, Ordering::SeqCst);
        self.count();
        let now = self.superseded_in_progress.fetch_add(1, Ordering::SeqCst) + 1;
        self.superseded_most.fetch_max(now, Ordering::SeqCst);
        // Counted down when the call returns or its caller drops it.
        let _in_progress = InProgress(Arc::clone(&self.superseded_in_progress));
        let delay = self.superseded_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        self.inner.find_superseded(hash).await
    }
}

#[async_trait]
impl TokenStore for CountingStore {
    async fn insert(&self, record: &TokenRecord) -> Result<(), StoreError> {
        self.count();
        self.inner.insert(record).await
    }

    async fn get(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.count();
        let delay = self.get_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        self.inner.get(id).await
    }

    async fn list(&self, query: &ListQuery) -> Result<Page, StoreError> {
        self.count();
        self.inner.list(query).await
    }

    async fn update(&self, id: &str, patch: &TokenPatch) -> Result<TokenRecord, StoreError> {
        self.count();
        self.inner.update(id, patch).await
    }

    async fn rotate(&self, id: &str, rotation: &Rotation) -> Result<TokenRecord, StoreError> {
        self.count();
        self.inner.rotate(id, rotation).await
    }

    async fn revoke(
        &self,
        id: &str,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<TokenRecord>, StoreError> {
        self.count();
        self.revokes.fetch_add(1, Ordering::SeqCst);
        self.inner.revoke(id, at).await
    }

    async fn delete(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.count();
        self.inner.delete(id).await
    }

    async fn count_by_subject(&self, subject: &str) -> Result<u64, StoreError> {
        self.count();
        self.inner.count_by_subject(subject).await
    }
}

pub fn scopes(s: &[&str]) -> ScopeSet {
    ScopeSet::parse(s).unwrap()
}

pub fn new_token(subject: &str, scope_list: &[&str]) -> NewToken {
    NewToken::new(subject, format!("token-{}", rand_suffix())).scope_set(scopes(scope_list))
}

pub fn rand_suffix() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A trivial inner service that answers 200 with the principal's subject and scopes, or
/// "anonymous".
pub fn echo_service() -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send {
    tower::service_fn(|req: Request<Full<Bytes>>| async move {
        let body = match req.extensions().get::<Principal>() {
            Some(p) => format!(
                "{}|{}|{}",
                p.subject(),
                p.scopes().to_space_separated(),
                p.token_id()
            ),
            None => "anonymous".to_owned(),
        };
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
    })
}

/// A request with optional bearer token and peer address.
pub fn request(token: Option<&str>, peer: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::builder().uri("/resource");
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    let mut req = b.body(Full::new(Bytes::new())).unwrap();
    if let Some(p) = peer {
        req.extensions_mut()
            .insert(p.parse::<SocketAddr>().unwrap());
    }
    req
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap()
    }

    pub fn www_authenticate(&self) -> &str {
        self.headers
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
}

/// Sends one request through `layer` in front of [`echo_service`].
pub async fn send(layer: &PatAuthLayer, req: Request<Full<Bytes>>) -> Reply {
    call(&layer.layer(echo_service()), req).await
}

/// Sends `req` through any service and reads the whole answer.
pub async fn call<S, B>(svc: &S, req: Request<Full<Bytes>>) -> Reply
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let res = svc.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

/// Sends a request with `secret` as bearer token and no peer address.
pub async fn send_token(layer: &PatAuthLayer, secret: &TokenSecret) -> Reply {
    send(layer, request(Some(secret.expose_secret()), None)).await
}

/// Sends `n` concurrent requests with `token` through `layer` and returns their statuses.
pub async fn concurrent_statuses(layer: &PatAuthLayer, token: &str, n: usize) -> Vec<StatusCode> {
    let svc = layer.layer(echo_service());
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let svc = svc.clone();
            let token = token.to_owned();
            tokio::spawn(async move {
                svc.oneshot(request(Some(&token), None))
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// A fresh directory under the system's temporary one.
pub fn tempdir() -> std::path::PathBuf {
    use std::sync::atomic::AtomicU32;
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tower-pat-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
