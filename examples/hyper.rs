//! A plain hyper 1 server behind tower-pat, inserting the peer address so IP restrictions work.
//!
//! ```sh
//! cargo run --example hyper
//! curl -H "Authorization: Bearer <token>" http://127.0.0.1:3000/
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tower::{Layer, ServiceExt};
use tower_pat::{NewToken, Principal, SqliteStore, Tokens};

async fn hello(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let who = req
        .extensions()
        .get::<Principal>()
        .map_or("nobody", Principal::subject)
        .to_owned();
    Ok(Response::new(Full::new(Bytes::from(format!(
        "hello {who}\n"
    )))))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Tokens live in the SQLite file `PAT_DB` (default `./tower-pat.db`).
    let path = std::env::var("PAT_DB").unwrap_or_else(|_| "tower-pat.db".to_owned());
    let tokens = Tokens::new(SqliteStore::open(path).await?);
    let auth = tokens.layer().build();
    // A token to try, printed once. Each run issues a new one (names are unique per subject) that
    // expires in an hour, so runs over one database neither collide nor leave usable tokens.
    let now = chrono::Utc::now();
    let new = NewToken::new("alice", format!("hyper example {now}"))
        .expires_at(now + chrono::TimeDelta::hours(1));
    let (_, secret) = tokens.issue(new).await?;

    let addr = std::env::var("PAT_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    println!("token: {}", secret.expose_secret());

    let service = auth.layer(tower::service_fn(hello));
    loop {
        let (stream, peer) = listener.accept().await?;
        // The peer address goes into every request's extensions, where the layer reads it.
        let svc = service
            .clone()
            .map_request(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert::<SocketAddr>(peer);
                req
            });
        tokio::spawn(async move {
            let conn = auto::Builder::new(TokioExecutor::new());
            if let Err(e) = conn
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
                .await
            {
                eprintln!("connection error: {e}");
            }
        });
    }
}
