//! The README's main command: `cargo run --example quickstart`.
//!
//! An axum server on `PAT_ADDR` (default 127.0.0.1:3000) with
//! - the management API under `/personal-access-tokens` (its OpenAPI document at
//!   `/personal-access-tokens/openapi.json`),
//! - `GET /hello`, protected, answering the principal as JSON,
//! - `GET /ping`, protected, and `GET /public/ping`, public: the same handler, to compare,
//! - `GET /healthz`, public.
//!
//! Tokens live in the SQLite file `PAT_DB` (default `./tower-pat.db`), so they survive a restart.
//! On first start it creates a bootstrap token for subject `admin` with `personalAccessToken:*`
//! and prints it on a line `admin token: <token>` (only then: the file keeps just its hash). A
//! later start prints a new one whenever `admin` has no usable token left that can manage tokens
//! (all revoked, disabled, expired or deleted), so an admin who lost theirs recovers by revoking
//! it, or by waiting for it to expire, and restarting.
//! Usage (`lastUsedAt`, last client addresses) is written behind and flushed on Ctrl-C or SIGTERM.
//! Then, for example:
//!
//! ```text
//! curl -H "Authorization: Bearer $TOKEN" localhost:3000/hello
//! curl -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
//!      -d '{"name": "laptop", "expiresAt": "2030-01-01T00:00:00Z"}' \
//!      localhost:3000/personal-access-tokens
//! ```

use std::net::SocketAddr;

use axum::{Json, Router, routing::get};
use tower_pat::admin::{self, AdminConfig};
use tower_pat::store::{ListQuery, TokenState};
use tower_pat::{NewToken, Principal, SqliteStore, Tokens, UsageConfig};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The token store, in the one handle that issues tokens: the embedded SQLite default, one file. Swap in `PostgresStore::connect(url)`
/// for many nodes over one database, and nothing else changes.
async fn open_store() -> Result<Tokens, Error> {
    let path = std::env::var("PAT_DB").unwrap_or_else(|_| "tower-pat.db".to_owned());
    Ok(Tokens::new(SqliteStore::open(path).await?))
}

/// Creates a bootstrap token, and prints it once, unless subject `admin` still has a usable token
/// that can manage tokens (active, with `personalAccessToken:write`).
async fn bootstrap(tokens: &Tokens) -> Result<(), Error> {
    let now = chrono::Utc::now();
    let active = tokens
        .list(
            &ListQuery::for_subject("admin")
                .state(TokenState::Active, now)
                .limit(1000),
        )
        .await?;
    let usable = active
        .items
        .iter()
        .filter(|t| t.scopes.grants(admin::WRITE_SCOPE))
        .count();
    if usable > 0 {
        println!(
            "subject admin has {usable} usable token(s); an earlier start printed one \
             (lost it? revoke or delete it, and restart for a new one)"
        );
        return Ok(());
    }
    // Names are unique per subject: a revoked or expired "bootstrap" keeps its name.
    let first = tokens.store().count_by_subject("admin").await? == 0;
    let name = if first {
        "bootstrap".to_owned()
    } else {
        format!("bootstrap {}", now.format("%Y-%m-%d %H:%M:%S%.6f"))
    };
    let new = NewToken::new("admin", name).scopes(["personalAccessToken:*"])?;
    let (_, secret) = tokens.issue(new).await?;
    if !first {
        println!("subject admin had no usable token left: a new bootstrap token follows");
    }
    println!("admin token: {}", secret.expose_secret());
    Ok(())
}

async fn hello(principal: Principal) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "tokenId": principal.token_id(),
        "subject": principal.subject(),
        "tokenName": principal.token_name(),
        "type": principal.token_type(),
        "scopes": principal.scopes(),
        "expiresAt": principal.expires_at(),
    }))
}

async fn ping() -> &'static str {
    "pong"
}

async fn healthz() -> &'static str {
    "ok"
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let tokens = open_store().await?;
    let layer = tokens.layer().track_usage(UsageConfig::default()).build();

    let protected = Router::new()
        .route("/hello", get(hello))
        .route("/ping", get(ping))
        .layer(layer.clone());
    let app = Router::new()
        .nest(
            "/personal-access-tokens",
            admin::router(AdminConfig::new(&tokens, &layer)?),
        )
        .merge(protected)
        .route("/public/ping", get(ping))
        .route("/healthz", get(healthz));

    let addr = std::env::var("PAT_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    bootstrap(&tokens).await?;
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown_signal())
    .await?;
    // Write the usage marks still pending before exiting.
    if let Some(usage) = layer.usage() {
        usage.shutdown().await;
    }
    Ok(())
}

/// Ctrl-C, or SIGTERM on Unix.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let terminated = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = terminated => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
