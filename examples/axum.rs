//! An axum app behind tower-pat: a public route, protected routes, and one route with its own scope.
//!
//! ```sh
//! cargo run --example axum
//! curl -H "Authorization: Bearer <token>" http://127.0.0.1:3000/me
//! ```

use std::net::SocketAddr;

use axum::Router;
use axum::routing::{get, post};
use tower_pat::{NewToken, Principal, RequireScopesLayer, SqliteStore, Tokens};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Tokens live in the SQLite file `PAT_DB` (default `./tower-pat.db`).
    let path = std::env::var("PAT_DB").unwrap_or_else(|_| "tower-pat.db".to_owned());
    let tokens = Tokens::new(SqliteStore::open(path).await?);
    let auth = tokens.layer().realm("example").build();

    // Issue a token at start so a person can try it: the secret is printed once, only its hash is
    // stored. Each run issues a new one (names are unique per subject) that expires in an hour, so
    // runs over the same database neither collide nor leave usable demo tokens behind.
    let now = chrono::Utc::now();
    let new = NewToken::new("alice", format!("axum example {now}"))
        .scopes(["notes:read"])?
        .expires_at(now + chrono::TimeDelta::hours(1));
    let (_, secret) = tokens.issue(new).await?;

    let protected = Router::new()
        .route("/me", get(me))
        .route("/notes", get(|| async { "[]" }))
        .merge(
            Router::new()
                .route("/notes", post(|| async { "created" }))
                .route_layer(RequireScopesLayer::new(["notes:write"]).realm("example")),
        )
        .layer(auth);
    let app = Router::new()
        .route("/", get(|| async { "public" }))
        .merge(protected);

    let addr = std::env::var("PAT_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    println!("token: {}", secret.expose_secret());
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}

async fn me(principal: Principal) -> String {
    format!(
        "subject={} token={} scopes={}\n",
        principal.subject(),
        principal.token_id(),
        principal.scopes().to_space_separated()
    )
}
