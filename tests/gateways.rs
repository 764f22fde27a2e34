//! `patd` behind real gateways: nginx (`auth_request`) and Caddy (`forward_auth`), with the
//! configurations the README's "Operators" section gives (kept identical: the test reads them
//! from the README). A gateway that is not installed is skipped with a line saying so.
#![cfg(feature = "gateway")]

mod support_patd;

use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support_patd::{Dir, free_port, http, upstream, wait_listening};

const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

/// The fenced block after `marker` in the README.
fn readme_block(marker: &str) -> String {
    let readme = include_str!("../README.md");
    let start = readme
        .find(marker)
        .unwrap_or_else(|| panic!("README lacks {marker}"));
    let rest = &readme[start..];
    let open = rest.find("```").unwrap();
    let body = &rest[open..];
    let body = &body[body.find('\n').unwrap() + 1..];
    body[..body.find("```").unwrap()].to_owned()
}

const PATD_CONFIG: &str = r#"
[proxy]
trusted = ["127.0.0.1/32"]
header = "x-forwarded-for"

[[rule]]
path_prefix = "/admin"
scopes = ["admin"]

[[rule]]
path_prefix = "/public"
anonymous = true
"#;

struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// What every gateway must do with patd in front of an upstream.
async fn the_contract(dir: &Dir, gateway: SocketAddr) {
    let (token, id) = dir.issue(&[
        "--subject",
        "alice",
        "--name",
        "ci",
        "--scope",
        "read",
        "--never-expires",
    ]);
    let (lan, _) = dir.issue(&[
        "--subject",
        "bob",
        "--name",
        "lan",
        "--never-expires",
        "--ip",
        "10.0.0.0/8",
    ]);
    let (local, _) = dir.issue(&[
        "--subject",
        "carol",
        "--name",
        "local",
        "--never-expires",
        "--ip",
        "127.0.0.2/32",
    ]);
    let bearer = format!("Bearer {token}");

    // A valid token reaches the upstream with the identity headers, whatever the client sent.
    let ok = http(
        CLIENT,
        gateway,
        "GET",
        "/api/items?x=1",
        &[
            ("Authorization", &bearer),
            ("X-Auth-Subject", "root"),
            ("X-Auth-Scopes", "*"),
        ],
    )
    .await;
    assert_eq!(ok.status, 200, "{ok:?}");
    let seen: serde_json::Value = serde_json::from_str(&ok.body).unwrap();
    assert_eq!(seen["path"], "/api/items");
    assert_eq!(seen["headers"]["x-auth-subject"], "alice");
    assert_eq!(seen["headers"]["x-auth-token-id"], id.as_str());
    assert_eq!(seen["headers"]["x-auth-scopes"], "read");

    // No token: 401 with the challenge at the client; the upstream is not reached.
    let none = http(CLIENT, gateway, "GET", "/api/items", &[]).await;
    assert_eq!(none.status, 401);
    assert_eq!(
        none.header("www-authenticate"),
        Some("Bearer realm=\"patd\"")
    );

    // A scope the token lacks: 403.
    let scope = http(
        CLIENT,
        gateway,
        "GET",
        "/admin/users",
        &[("Authorization", &bearer)],
    )
    .await;
    assert_eq!(scope.status, 403);
    // The same through a dot segment or an escape that the gateway resolves to /admin.
    for sneaky in ["/public/../admin/users", "/public/%2e%2e/admin/users"] {
        let r = http(
            CLIENT,
            gateway,
            "GET",
            sneaky,
            &[("Authorization", &bearer)],
        )
        .await;
        assert!(r.status == 403 || r.status == 400, "{sneaky}: {}", r.status);
        let r = http(CLIENT, gateway, "GET", sneaky, &[]).await;
        assert!(
            r.status == 401 || r.status == 400,
            "{sneaky} without a token: {}",
            r.status
        );
    }

    // The anonymous route: no token passes without an identity, and a client's own identity
    // headers never reach the upstream.
    let public = http(
        CLIENT,
        gateway,
        "GET",
        "/public/page",
        &[("X-Auth-Subject", "root"), ("X_Auth_Subject", "root")],
    )
    .await;
    assert_eq!(public.status, 200);
    let seen: serde_json::Value = serde_json::from_str(&public.body).unwrap();
    assert!(
        seen["headers"]
            .get("x-auth-subject")
            .is_none_or(|v| v == ""),
        "a client-sent identity reached the upstream: {seen}"
    );
    // Nor its spelling with underscores, which CGI-style upstreams read as the same header.
    assert!(
        seen["headers"].get("x_auth_subject").is_none(),
        "a client-sent identity with underscores reached the upstream: {seen}"
    );
    // Nor a mixed spelling (`HTTP_X_AUTH_SUBJECT` to CGI too): nginx drops it, patd refuses a
    // forward-auth request that carries one (Caddy passes it on).
    let mixed = http(
        CLIENT,
        gateway,
        "GET",
        "/public/page",
        &[("X-Auth_Subject", "root")],
    )
    .await;
    if mixed.status == 200 {
        let seen: serde_json::Value = serde_json::from_str(&mixed.body).unwrap();
        assert!(
            seen["headers"].get("x-auth_subject").is_none(),
            "a client-sent identity in a mixed spelling reached the upstream: {seen}"
        );
    } else {
        assert_eq!(mixed.status, 400);
    }
    // A client's own original-request headers do not move the request to another rule.
    let r = http(
        CLIENT,
        gateway,
        "GET",
        "/admin/users",
        &[
            ("X-Forwarded-Uri", "/public/x"),
            ("X-Original-URI", "/public/x"),
            ("X-Forwarded-Method", "GET"),
        ],
    )
    .await;
    assert_eq!(r.status, 401);

    // Restricted addresses: the client (127.0.0.2) is outside 10.0.0.0/8, inside 127.0.0.2/32,
    // and cannot name itself into 10.0.0.0/8.
    let lan = format!("Bearer {lan}");
    assert_eq!(
        http(CLIENT, gateway, "GET", "/api", &[("Authorization", &lan)])
            .await
            .status,
        403
    );
    assert_eq!(
        http(
            CLIENT,
            gateway,
            "GET",
            "/api",
            &[("Authorization", &lan), ("X-Forwarded-For", "10.1.2.3")]
        )
        .await
        .status,
        403
    );
    let local = format!("Bearer {local}");
    assert_eq!(
        http(CLIENT, gateway, "GET", "/api", &[("Authorization", &local)])
            .await
            .status,
        200
    );

    // Revoked with the CLI: 401 within a second.
    assert!(dir.cli(&["token", "revoke", &id]).status.success());
    let at = Instant::now();
    loop {
        let r = http(
            CLIENT,
            gateway,
            "GET",
            "/api/items",
            &[("Authorization", &bearer)],
        )
        .await;
        if r.status == 401 {
            break;
        }
        assert_eq!(r.status, 200);
        assert!(
            at.elapsed() < Duration::from_secs(1),
            "still accepted 1 s after the revocation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_auth_request() {
    if !installed("nginx") {
        println!("skipped: nginx is not installed (apt-get install nginx)");
        return;
    }
    let dir = Dir::new(&format!(
        "{PATD_CONFIG}\n[forward_auth]\noriginal_headers = \"original\"\nnginx_compat = true\n"
    ));
    let patd = dir.serve();
    let up = upstream().await;
    let port = free_port();
    let conf = readme_block("<!-- nginx.conf -->")
        .replace("listen 80;", &format!("listen 127.0.0.1:{port};"))
        .replace("127.0.0.1:8080", &patd.addr.to_string())
        .replace("127.0.0.1:9000", &up.to_string());
    let prefix = dir.path.join("nginx");
    std::fs::create_dir_all(prefix.join("logs")).unwrap();
    let main = format!(
        "worker_processes 1;\nerror_log {p}/logs/error.log;\npid {p}/nginx.pid;\nevents {{}}\nhttp {{\naccess_log off;\nclient_body_temp_path {p}/body;\nproxy_temp_path {p}/proxy;\nfastcgi_temp_path {p}/fastcgi;\nuwsgi_temp_path {p}/uwsgi;\nscgi_temp_path {p}/scgi;\n{conf}\n}}\n",
        p = prefix.display()
    );
    std::fs::write(prefix.join("nginx.conf"), main).unwrap();
    let child = Command::new("nginx")
        .args([
            "-p",
            prefix.to_str().unwrap(),
            "-c",
            "nginx.conf",
            "-g",
            // One process: the test's kill at the end stops all of it (a master killed with
            // SIGKILL leaves its worker running).
            "daemon off; master_process off;",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let _nginx = Gateway(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr).await;
    the_contract(&dir, addr).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn caddy_forward_auth() {
    if !installed("caddy") {
        println!("skipped: caddy is not installed (apt-get install caddy)");
        return;
    }
    let dir = Dir::new(PATD_CONFIG);
    let patd = dir.serve();
    let up = upstream().await;
    let port = free_port();
    let site = readme_block("<!-- Caddyfile -->")
        .replace(":80 {", &format!("http://127.0.0.1:{port} {{"))
        .replace("127.0.0.1:8080", &patd.addr.to_string())
        .replace("127.0.0.1:9000", &up.to_string());
    let caddyfile = format!(
        "{{\n\tadmin off\n\tauto_https off\n\tstorage file_system {}\n}}\n{site}",
        dir.path.join("caddy").display()
    );
    let path = dir.path.join("Caddyfile");
    std::fs::write(&path, caddyfile).unwrap();
    let child = Command::new("caddy")
        .args([
            "run",
            "--adapter",
            "caddyfile",
            "--config",
            path.to_str().unwrap(),
        ])
        .env("HOME", &dir.path)
        .env("XDG_DATA_HOME", &dir.path)
        .env("XDG_CONFIG_HOME", &dir.path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _caddy = Gateway(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr).await;
    the_contract(&dir, addr).await;
}
