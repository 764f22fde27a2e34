//! A hyper 1 client and server in one process, talking HTTP/1.1 over `tokio::io::duplex`: no
//! sockets, so the noise of a shared machine's network stack stays out. Rounds alternate between the
//! bare handler and the handler behind `PatAuthLayer` (a cache hit), on one thread; it prints the
//! nanoseconds per request of each and what the layer adds.
//!
//! `cargo bench --bench http_harness`

mod common;

use std::convert::Infallible;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;
use tower::{Layer, Service, ServiceExt};

/// One connection, `requests` requests one after the other: nanoseconds per request.
async fn round<S, B>(svc: S, requests: u32, auth: &HeaderValue) -> f64
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move {
        hyper::server::conn::http1::Builder::new()
            .serve_connection(
                TokioIo::new(server_io),
                hyper::service::service_fn(move |req| svc.clone().oneshot(req)),
            )
            .await
    });
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client_io))
        .await
        .expect("handshake");
    let client = tokio::spawn(conn);
    let start = Instant::now();
    for _ in 0..requests {
        sender.ready().await.expect("connection open");
        let req = Request::get("/ping")
            .header(header::HOST, "localhost")
            .header(header::USER_AGENT, "bench/1.0")
            .header(header::ACCEPT, "*/*")
            .header(header::AUTHORIZATION, auth.clone())
            .body(Empty::<Bytes>::new())
            .expect("a valid request");
        let res = sender.send_request(req).await.expect("a response");
        assert_eq!(res.status(), StatusCode::OK);
        let body = res.into_body().collect().await.expect("a body").to_bytes();
        assert_eq!(&body[..], b"pong");
    }
    let ns = start.elapsed().as_nanos() as f64 / f64::from(requests);
    drop(sender);
    client
        .await
        .expect("client task")
        .expect("client connection");
    server
        .await
        .expect("server task")
        .expect("server connection");
    ns
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let (rounds, requests) = if common::full_run() {
        (50, 5_000)
    } else {
        (2, 100)
    };
    let rt = common::runtime();
    let (store, secrets) = common::ManyTokens::issue(1);
    let layer = common::layer(store);
    rt.block_on(common::fill(&layer, &secrets));
    let auth = common::bearer(secrets[0].expose_secret());
    let bare = common::pong::<Incoming>();
    let pat = layer.layer(common::pong::<Incoming>());

    // Warm-up: allocator, caches, branch predictors.
    rt.block_on(round(bare.clone(), requests / 4, &auth));
    rt.block_on(round(pat.clone(), requests / 4, &auth));

    let (mut none, mut with, mut diff) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..rounds {
        // Alternate which goes first, so that a drift in the machine's load hits both alike.
        let (a, b) = if i % 2 == 0 {
            let a = rt.block_on(round(bare.clone(), requests, &auth));
            (a, rt.block_on(round(pat.clone(), requests, &auth)))
        } else {
            let b = rt.block_on(round(pat.clone(), requests, &auth));
            (rt.block_on(round(bare.clone(), requests, &auth)), b)
        };
        none.push(a);
        with.push(b);
        diff.push(b - a);
    }
    let (lo, hi) = {
        let mut d = diff.clone();
        d.sort_by(f64::total_cmp);
        (d[d.len() / 4], d[d.len() * 3 / 4])
    };
    println!(
        "== in-process HTTP/1.1 over tokio::io::duplex, {rounds} alternating rounds of {requests} requests =="
    );
    println!(
        "  no layer                   {:>8.0} ns/request (median)",
        median(&mut none)
    );
    println!(
        "  tower-pat                  {:>8.0} ns/request (median)",
        median(&mut with)
    );
    println!(
        "  tower-pat adds             {:>8.0} ns/request (median of paired differences; IQR {lo:.0} to {hi:.0}; target ≤ 200)",
        median(&mut diff)
    );
}
