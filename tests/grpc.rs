//! A real tonic client against a tonic server behind the layer: gRPC status codes.
#![cfg(feature = "tonic")]

mod common;

use std::net::SocketAddr;

use common::*;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tower_pat::{MemoryStore, PatAuthLayer};

async fn serve(layer: PatAuthLayer) -> SocketAddr {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .layer(layer)
            .add_service(health)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    addr
}

async fn check(addr: SocketAddr, token: Option<&str>) -> Result<i32, tonic::Status> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    if let Some(t) = token {
        let value: MetadataValue<_> = format!("Bearer {t}").parse().unwrap();
        req.metadata_mut().insert("authorization", value);
    }
    client.check(req).await.map(|r| r.into_inner().status)
}

#[tokio::test]
async fn tonic_client_sees_grpc_status_codes() {
    let store = MemoryStore::new();
    let (_, good) = Tokens::new(store.clone())
        .issue(new_token("alice", &["health:read"]))
        .await
        .unwrap();
    let (_, unscoped) = Tokens::new(store.clone())
        .issue(new_token("bob", &["other:read"]))
        .await
        .unwrap();
    let layer = PatAuthLayer::builder(store)
        .require_scopes(["health:read"])
        .build();
    let addr = serve(layer).await;

    let err = check(addr, None).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(err.message(), "an access token is required");

    let err = check(addr, Some("pat_not_a_real_token")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let err = check(addr, Some(unscoped.expose_secret()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // A refusal is never cached, gRPC or not.
    assert_eq!(
        err.metadata()
            .get("cache-control")
            .map(|v| v.to_str().unwrap()),
        Some("no-store")
    );

    let status = check(addr, Some(good.expose_secret())).await.unwrap();
    assert_eq!(status, ServingStatus::Serving as i32);
}
