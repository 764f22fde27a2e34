//! A tonic gRPC server behind tower-pat, serving the standard health service (no protoc needed).
//!
//! ```sh
//! cargo run --example tonic --features tonic
//! grpcurl -plaintext -H "authorization: Bearer <token>" 127.0.0.1:50051 grpc.health.v1.Health/Check
//! ```

use tonic::transport::Server;
use tower_pat::{NewToken, SqliteStore, Tokens};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Tokens live in the SQLite file `PAT_DB` (default `./tower-pat.db`).
    let path = std::env::var("PAT_DB").unwrap_or_else(|_| "tower-pat.db".to_owned());
    let tokens = Tokens::new(SqliteStore::open(path).await?);
    let auth = tokens.layer().require_scopes(["health:read"]).build();
    // Each run issues a new token (names are unique per subject; a secret is shown only once)
    // that expires in an hour, so runs over one database neither collide nor leave usable tokens.
    let now = chrono::Utc::now();
    let new = NewToken::new("alice", format!("grpc example {now}"))
        .scopes(["health:read"])?
        .expires_at(now + chrono::TimeDelta::hours(1));
    let (_, secret) = tokens.issue(new).await?;

    // The overall status (service "") starts as SERVING.
    let (_reporter, health) = tonic_health::server::health_reporter();

    let addr = std::env::var("PAT_GRPC_ADDR")
        .or_else(|_| std::env::var("PAT_ADDR"))
        .unwrap_or_else(|_| "127.0.0.1:50051".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    println!("token: {}", secret.expose_secret());
    Server::builder()
        .layer(auth)
        .add_service(health)
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
        .await?;
    Ok(())
}
