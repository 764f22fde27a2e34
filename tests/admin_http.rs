//! The management API over a real socket: an axum server on 127.0.0.1:0 with the peer address
//! from `ConnectInfo`, called with hyper-util's client.

mod support_admin;

use std::net::SocketAddr;

use axum::Router;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use support_admin::{BASE, app};

struct Server {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Server {
    async fn start(app: Router) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
        });
        Self {
            base: format!("http://{addr}"),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<&str>,
    ) -> (StatusCode, http::HeaderMap, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {token}"));
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
            .unwrap();
        let res = self.client.request(req).await.unwrap();
        let (parts, body) = res.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

#[tokio::test]
async fn create_use_restrict_rotate_and_revoke_over_http() {
    let t = app().await;
    let server = Server::start(t.app.clone()).await;

    // Created over the wire, restricted to loopback: the real peer address lets it in.
    let (status, headers, body) = server
        .send(
            Method::POST,
            BASE,
            &t.alice,
            Some(r#"{"name": "wire", "ipRestriction": "127.0.0.0/8", "userAwareTokenNeverExpires": true}"#),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let location = headers["location"].to_str().unwrap().to_owned();
    let secret = body["token"].as_str().unwrap().to_owned();
    let (status, _, _) = server.send(Method::GET, "/hello", &secret, None).await;
    assert_eq!(status, StatusCode::OK);

    // Moved to a network the client is not in: 403 on the very next request.
    let (status, _, body) = server
        .send(
            Method::PATCH,
            &location,
            &t.alice,
            Some(r#"{"ipRestriction": ["10.0.0.0/8"]}"#),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, _) = server.send(Method::GET, "/hello", &secret, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    server
        .send(
            Method::PATCH,
            &location,
            &t.alice,
            Some(r#"{"ipRestriction": null}"#),
        )
        .await;

    // Rotated: the old secret is refused at once, the new one works.
    let (status, _, body) = server
        .send(Method::POST, &format!("{location}/rotate"), &t.alice, None)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let new = body["accessToken"].as_str().unwrap().to_owned();
    assert_eq!(
        server.send(Method::GET, "/hello", &secret, None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        server.send(Method::GET, "/hello", &new, None).await.0,
        StatusCode::OK
    );

    // Revoked: refused at once, listed as revoked.
    let (status, _, _) = server
        .send(
            Method::PATCH,
            &location,
            &t.alice,
            Some(r#"{"revoked": true}"#),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, headers, body) = server.send(Method::GET, "/hello", &new, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );
    assert_eq!(body["code"], "invalid_token");
    let (_, headers, body) = server.send(Method::GET, BASE, &t.alice, None).await;
    assert_eq!(headers["x-total-count"], "2");
    let wire = body
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "wire")
        .unwrap();
    assert_eq!(wire["revoked"], true);
}
