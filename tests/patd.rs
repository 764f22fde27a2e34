//! `patd`: the token CLI with good and bad input, the configuration, and `patd serve`'s
//! forward-auth contract, health, metrics, a CLI revocation reaching the server, and a SIGTERM
//! under load that loses no usage mark. Gateways themselves: tests/gateways.rs.
#![cfg(feature = "gateway")]

mod common;
mod support_patd;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use support_patd::{Dir, http, http_with_body, stderr, stdout};

const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

#[test]
fn every_token_command_works_on_the_store() {
    let dir = Dir::new("");
    let (secret, id) = dir.issue(&[
        "--subject",
        "admin",
        "--name",
        "bootstrap",
        "--scope",
        "*",
        "--never-expires",
    ]);
    assert!(secret.starts_with("pat_"));
    let list = dir.cli(&["token", "list"]);
    assert!(list.status.success());
    let table = stdout(&list);
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains(&id) && table.contains("bootstrap") && table.contains("active"));
    assert!(!table.contains(&secret), "a list never shows a secret");
    let json: serde_json::Value = serde_json::from_slice(
        &dir.cli(&["token", "list", "--subject", "admin", "--json"])
            .stdout,
    )
    .unwrap();
    assert_eq!(json.as_array().unwrap().len(), 1);
    assert!(!json.to_string().contains(&secret));
    let none: serde_json::Value = serde_json::from_slice(
        &dir.cli(&["token", "list", "--subject", "bob", "--json"])
            .stdout,
    )
    .unwrap();
    assert_eq!(none.as_array().unwrap().len(), 0);

    let show = dir.cli(&["token", "show", &id, "--json"]);
    let view: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(view["name"], "bootstrap");
    assert!(!stdout(&show).contains(&secret));

    let rotated = dir.cli(&["token", "rotate", &id, "--grace", "1h", "--json"]);
    assert!(rotated.status.success(), "{}", stderr(&rotated));
    let rotated: serde_json::Value = serde_json::from_slice(&rotated.stdout).unwrap();
    let new_secret = rotated["token"].as_str().unwrap();
    assert_ne!(new_secret, secret);
    assert_eq!(rotated["id"], id.as_str());

    let revoked = dir.cli(&["token", "revoke", &id]);
    assert!(revoked.status.success());
    let view: serde_json::Value =
        serde_json::from_slice(&dir.cli(&["token", "show", &id, "--json"]).stdout).unwrap();
    assert_eq!(view["revoked"], true);
    // A revoked token cannot be rotated back to life.
    let again = dir.cli(&["token", "rotate", &id]);
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
    assert!(stderr(&again).contains("revoked"));

    let deleted = dir.cli(&["token", "delete", &id]);
    assert!(deleted.status.success());
    let gone = dir.cli(&["token", "show", &id]);
    assert_eq!(gone.status.code(), Some(2));

    let migrate = dir.cli(&["migrate"]);
    assert!(migrate.status.success(), "{}", stderr(&migrate));
}

#[test]
fn bad_input_is_refused_with_a_message_and_exit_code_2() {
    let dir = Dir::new("");
    let create = |rest: &[&'static str]| {
        [
            &["token", "create", "--subject", "a", "--name", "n"][..],
            rest,
        ]
        .concat()
    };
    for (args, says) in [
        (
            vec!["token", "show", "no-such-id"],
            "no token with id no-such-id",
        ),
        (
            vec!["token", "revoke", "no-such-id"],
            "no token with id no-such-id",
        ),
        (
            vec!["token", "delete", "no-such-id"],
            "no token with id no-such-id",
        ),
        (
            vec!["token", "rotate", "no-such-id"],
            "no token with id no-such-id",
        ),
        (create(&["--expires-in", "5x"]), "`5x` is not a duration"),
        (
            create(&["--never-expires", "--ip", "10.0.0.0/33"]),
            "`10.0.0.0/33` is not a CIDR",
        ),
        (
            create(&["--expires-at", "yesterday"]),
            "not an RFC 3339 time",
        ),
        (
            create(&["--expires-at", "9999-12-31T23:59:59-10:00"]),
            "is after 9999-12-31T23:59:59Z",
        ),
        (
            create(&["--expires-at", "2001-01-01T00:00:00Z"]),
            "in the past",
        ),
        (create(&[]), "--never-expires"),
        (
            create(&["--never-expires", "--scope", "bad scope"]),
            "--scope",
        ),
        (
            vec![
                "token",
                "create",
                "--subject",
                " ",
                "--name",
                "n",
                "--never-expires",
            ],
            "--subject must not be blank",
        ),
        (
            vec!["token", "rotate", "x", "--grace", "forever"],
            "`forever` is not a duration",
        ),
        (
            vec!["--set", "cache.ttl=soon", "token", "list"],
            "--set cache.ttl=soon",
        ),
        (
            vec!["--set", "nonsense", "token", "list"],
            "expected key=value",
        ),
    ] {
        let out = dir.cli(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
    // Two tokens of one name for one subject: a conflict, exit 2, the first one kept.
    dir.issue(&["--subject", "a", "--name", "same", "--never-expires"]);
    let out = dir.cli(&[
        "token",
        "create",
        "--subject",
        "a",
        "--name",
        "same",
        "--never-expires",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("name"), "{}", stderr(&out));
}

#[test]
fn an_unreadable_or_invalid_configuration_is_named_with_its_line() {
    let dir = Dir::new("[cache]\nttl = \"ages\"\n");
    let out = dir.cli(&["token", "list"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("patd.toml") && err.contains("line 3") && err.contains("ttl"),
        "{err}"
    );
    let out = dir.cli(&["config", "check"]);
    assert_eq!(out.status.code(), Some(2));

    let dir = Dir::new("unknown_key = 1\n");
    let err = stderr(&dir.cli(&["config", "check"]));
    assert!(
        err.contains("unknown field `unknown_key`") && err.contains("line 2"),
        "{err}"
    );

    // A pepper below a `[table]` header is an unknown field of that table: named by its line
    // and key, never quoted, by `config check` and by every command.
    let dir = Dir::new("[proxy]\npepper = \"s3cret-0123456789abcdef\"\n");
    for args in [&["config", "check"][..], &["token", "list"], &["migrate"]] {
        let out = dir.cli(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = stderr(&out);
        assert!(!err.contains("s3cret"), "{args:?}: {err}");
        assert!(
            err.contains("line 3") && err.contains("unknown field `pepper`"),
            "{args:?}: {err}"
        );
    }

    let out = std::process::Command::new(support_patd::PATD)
        .args(["--config", "/nonexistent/patd.toml", "token", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("/nonexistent/patd.toml: cannot be read"));
}

#[test]
fn a_bad_store_url_or_pepper_is_refused_without_printing_the_secret() {
    let dir = Dir::new("");
    for args in [
        &["--store", "pg://u:s3cret@h/db", "token", "list"][..],
        &["--set", "store=pg://u:s3cret@h/db", "config", "check"],
        &["--set", "pepper=s3cret", "config", "check"],
    ] {
        let out = dir.cli(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let printed = format!("{}{}", stdout(&out), stderr(&out));
        assert!(!printed.contains("s3cret"), "{args:?}: {printed}");
        assert!(
            printed.contains("store") || printed.contains("pepper"),
            "{printed}"
        );
    }
}

#[test]
fn config_check_prints_the_effective_configuration_without_secrets() {
    let dir = Dir::new("pepper = \"0123456789abcdef-do-not-print\"\n");
    let out = std::process::Command::new(support_patd::PATD)
        .args([
            "--config",
            dir.config().to_str().unwrap(),
            "config",
            "check",
        ])
        .env("PATD_CACHE__TTL", "2m")
        .env("PATD_ADMIN_LISTEN", "127.0.0.1:9999")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("ttl = \"2m\""), "{text}");
    assert!(text.contains("admin_listen = \"127.0.0.1:9999\""), "{text}");
    assert!(text.contains("pepper = \"<redacted>\""), "{text}");
    assert!(!text.contains("do-not-print"));
}

const FORWARDED: &str = r#"
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

#[tokio::test(flavor = "multi_thread")]
async fn forward_auth_answers_with_the_identity_or_the_layers_refusal() {
    let dir = Dir::new(FORWARDED);
    let (token, id) = dir.issue(&[
        "--subject",
        "alice",
        "--name",
        "ci",
        "--scope",
        "read",
        "--never-expires",
    ]);
    let server = dir.serve();
    let bearer = format!("Bearer {token}");
    let auth = |uri: &'static str, extra: Vec<(&'static str, String)>| {
        let bearer = bearer.clone();
        async move {
            let mut headers = vec![
                ("X-Forwarded-Method", "GET".to_owned()),
                ("X-Forwarded-Uri", uri.to_owned()),
            ];
            headers.extend(extra);
            let _ = &bearer;
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            http(CLIENT, server.addr, "GET", "/auth", &h).await
        }
    };
    let ok = auth("/api/x", vec![("Authorization", bearer.clone())]).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.header("x-auth-subject"), Some("alice"));
    assert_eq!(ok.header("x-auth-token-id"), Some(id.as_str()));
    assert_eq!(ok.header("x-auth-token-name"), Some("ci"));
    assert_eq!(ok.header("x-auth-scopes"), Some("read"));

    let missing = auth("/api/x", vec![]).await;
    assert_eq!(missing.status, 401);
    assert_eq!(
        missing.header("www-authenticate"),
        Some("Bearer realm=\"patd\"")
    );
    assert!(missing.body.contains("\"code\":\"unauthorized\""));

    let scope = auth("/admin/users", vec![("Authorization", bearer.clone())]).await;
    assert_eq!(scope.status, 403);
    assert!(
        scope
            .header("www-authenticate")
            .unwrap()
            .contains("insufficient_scope")
    );

    // An anonymous route: no token passes without identity, a bad token is still refused.
    let public = auth("/public/a", vec![]).await;
    assert_eq!(public.status, 200);
    assert_eq!(
        public.header("x-auth-subject"),
        Some(""),
        "present and empty"
    );
    let bad = auth(
        "/public/a",
        vec![("Authorization", "Bearer pat_nope".to_owned())],
    )
    .await;
    assert_eq!(bad.status, 401);

    // The attacker: a path that starts like the public route but is the admin route.
    for sneaky in [
        "/public/../admin/users",
        "/public/%2e%2e/admin",
        "/%70ublic/../admin",
        "//admin/users",
    ] {
        let r = http(
            CLIENT,
            server.addr,
            "GET",
            "/auth",
            &[("X-Forwarded-Method", "GET"), ("X-Forwarded-Uri", sneaky)],
        )
        .await;
        assert_eq!(r.status, 401, "{sneaky} must be judged by the /admin rule");
    }
    // Without the configured original-request headers (or with two), nothing is decided.
    let r = http(
        CLIENT,
        server.addr,
        "GET",
        "/auth",
        &[("X-Original-URI", "/public/a")],
    )
    .await;
    assert_eq!(r.status, 400);
    let r = http(
        CLIENT,
        server.addr,
        "GET",
        "/auth",
        &[
            ("X-Forwarded-Method", "GET"),
            ("X-Forwarded-Uri", "/public/a"),
            ("X-Forwarded-Uri", "/admin"),
        ],
    )
    .await;
    assert_eq!(r.status, 400);
    // A gRPC content type still gets an HTTP answer, never a 200 with grpc-status.
    let r = http(
        CLIENT,
        server.addr,
        "POST",
        "/auth",
        &[
            ("X-Forwarded-Method", "POST"),
            ("X-Forwarded-Uri", "/api.Svc/Call"),
            ("Content-Type", "application/grpc"),
        ],
    )
    .await;
    assert_eq!(r.status, 401);
}

const RULES: &str = r#"
[forward_auth]
original_headers = "original"

[[rule]]
path_prefix = "/admin"
scopes = ["admin"]

[[rule]]
path_prefix = "/public"
anonymous = true

[[rule]]
path_prefix = "/api"
methods = ["POST"]
scopes = ["write"]

[[rule]]
path_prefix = "/reports"
methods = ["GET"]
scopes = ["reports"]
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_path_is_judged_by_every_rule_any_reading_of_it_matches() {
    let dir = Dir::new(RULES);
    let (token, _) = dir.issue(&[
        "--subject",
        "alice",
        "--name",
        "ci",
        "--scope",
        "read",
        "--never-expires",
    ]);
    let server = dir.serve();
    let bearer = format!("Bearer {token}");
    let ask = |method: &'static str, uri: &'static str, with_token: bool| {
        let bearer = bearer.clone();
        let addr = server.addr;
        async move {
            let mut h = vec![("X-Original-Method", method), ("X-Original-URI", uri)];
            if with_token {
                h.push(("Authorization", bearer.as_str()));
            }
            http(CLIENT, addr, "GET", "/auth", &h).await.status
        }
    };
    // `;` parameters: Tomcat, Jetty and Spring strip them, then resolve `..`.
    assert_eq!(ask("GET", "/public/..;/admin/users", false).await, 401);
    assert_eq!(ask("GET", "/public/..;x=1/admin/users", false).await, 401);
    assert_eq!(ask("GET", "/public/..;/admin/users", true).await, 403);
    assert_eq!(ask("GET", "/admin;x/users", true).await, 403);
    // Stripped, this is `/public`; Go's router serves it under `/admin`: it needs both.
    assert_eq!(ask("GET", "/admin/..;x/public", false).await, 401);
    assert_eq!(ask("GET", "/admin/..;x/public", true).await, 403);
    // Case-insensitive upstreams.
    assert_eq!(ask("GET", "/ADMIN/users", true).await, 403);
    assert_eq!(ask("GET", "/Admin", true).await, 403);
    // The plain cases still pass.
    assert_eq!(ask("GET", "/public/a", false).await, 200);
    assert_eq!(ask("GET", "/public/caf%C3%A9", false).await, 200);
    assert_eq!(ask("GET", "/other", true).await, 200);

    // An escape that is not UTF-8 no longer switches decoding off: refused, like a URI that does
    // not parse. So is the overlong `%C0%AE` some servers read as `.`.
    assert_eq!(ask("GET", "/%61dmin/users/%FF", true).await, 400);
    assert_eq!(ask("GET", "/public/%C0%AE%C0%AE/admin", false).await, 400);
    assert_eq!(ask("GET", "/public/%C0%AE%C0%AE/admin", true).await, 400);

    // Methods: any ASCII case, and `HEAD` is served by the `GET` handler.
    assert_eq!(ask("POST", "/api/x", true).await, 403);
    assert_eq!(ask("post", "/api/x", true).await, 403);
    assert_eq!(ask("Post", "/api/x", true).await, 403);
    assert_eq!(ask("GET", "/api/x", true).await, 200);
    assert_eq!(ask("GET", "/reports/q1", true).await, 403);
    assert_eq!(ask("HEAD", "/reports/q1", true).await, 403);
    assert_eq!(ask("head", "/reports/q1", true).await, 403);
    assert_eq!(ask("POST", "/reports/q1", true).await, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn ip_restriction_uses_the_trusted_proxys_header_only() {
    let dir = Dir::new(FORWARDED);
    let (token, _) = dir.issue(&[
        "--subject",
        "a",
        "--name",
        "lan",
        "--never-expires",
        "--ip",
        "10.0.0.0/8",
    ]);
    let server = dir.serve();
    let bearer = format!("Bearer {token}");
    let ask = |from: IpAddr, xff: &'static str| {
        let bearer = bearer.clone();
        let addr = server.addr;
        async move {
            let mut h = vec![
                ("X-Forwarded-Method", "GET"),
                ("X-Forwarded-Uri", "/x"),
                ("Authorization", bearer.as_str()),
            ];
            if !xff.is_empty() {
                h.push(("X-Forwarded-For", xff));
            }
            http(from, addr, "GET", "/auth", &h).await.status
        }
    };
    let trusted: IpAddr = "127.0.0.1".parse().unwrap();
    // Through the trusted proxy (127.0.0.1), the client it names counts.
    assert_eq!(ask(trusted, "10.1.2.3").await, 200);
    assert_eq!(ask(trusted, "192.0.2.1").await, 403);
    // A client that is not the proxy cannot name itself into the network.
    assert_eq!(ask(CLIENT, "10.1.2.3").await, 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_mode_reads_only_x_original_and_maps_other_refusals_to_403() {
    let dir = Dir::new(
        "[forward_auth]\noriginal_headers = \"original\"\nnginx_compat = true\n[[rule]]\npath_prefix = \"/public\"\nanonymous = true\n",
    );
    let server = dir.serve();
    // A client's own X-Forwarded-Uri is not read in nginx mode.
    let r = http(
        CLIENT,
        server.addr,
        "GET",
        "/auth",
        &[
            ("X-Original-Method", "GET"),
            ("X-Original-URI", "/private"),
            ("X-Forwarded-Uri", "/public"),
        ],
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("x-auth-status"), Some("401"));
    // A 400 (no original URI) becomes 403 with the real status beside it.
    let r = http(
        CLIENT,
        server.addr,
        "GET",
        "/auth",
        &[("X-Forwarded-Uri", "/public")],
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.header("x-auth-status"), Some("400"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revocation_from_the_cli_reaches_the_server_within_a_second() {
    let dir = Dir::new("");
    let (token, id) = dir.issue(&["--subject", "a", "--name", "t", "--never-expires"]);
    let server = dir.serve();
    let bearer = format!("Bearer {token}");
    let h = [
        ("X-Forwarded-Method", "GET"),
        ("X-Forwarded-Uri", "/"),
        ("Authorization", bearer.as_str()),
    ];
    assert_eq!(
        http(CLIENT, server.addr, "GET", "/auth", &h).await.status,
        200
    );
    // Cached now: only the change feed can tell the server.
    assert_eq!(
        http(CLIENT, server.addr, "GET", "/auth", &h).await.status,
        200
    );
    let out = dir.cli(&["token", "revoke", &id]);
    assert!(out.status.success());
    let revoked_at = Instant::now();
    loop {
        let r = http(CLIENT, server.addr, "GET", "/auth", &h).await;
        if r.status == 401 {
            assert!(r.body.contains("revoked"), "{}", r.body);
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "still accepted after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `[leak_reports]` names a key file; a report signed by that key revokes the token it names, and
/// one signed by another key changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_signed_leak_report_revokes_the_token_in_patd() {
    use base64ct::{Base64, Encoding};
    use p256::ecdsa::signature::Signer;
    use p256::ecdsa::{Signature, SigningKey};
    use p256::pkcs8::{EncodePublicKey, LineEnding};
    use sha2::{Digest, Sha256};

    let key = SigningKey::from_slice(&Sha256::digest(b"patd leak key")).unwrap();
    let pem = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    let dir = Dir::new("");
    let pem_path = dir.path.join("github-1.pem");
    std::fs::write(&pem_path, pem).unwrap();
    let config = std::fs::read_to_string(dir.config()).unwrap();
    std::fs::write(
        dir.config(),
        format!(
            "{config}[leak_reports]\nkeys = {{ github-1 = '{}' }}\n",
            pem_path.display()
        ),
    )
    .unwrap();
    let (token, _) = dir.issue(&["--subject", "a", "--name", "t", "--never-expires"]);
    let server = dir.serve();
    let bearer = format!("Bearer {token}");
    let auth = [
        ("X-Forwarded-Method", "GET"),
        ("X-Forwarded-Uri", "/"),
        ("Authorization", bearer.as_str()),
    ];
    let report = format!(
        r#"[{{"token":"{token}","type":"patd_token","url":"https://github.com/o/r/blob/1/x","source":"content"}}]"#
    );
    let addr = server.addr;
    let post = |signer: SigningKey| {
        let report = report.clone();
        async move {
            let signature: Signature = signer.sign(report.as_bytes());
            let signature = Base64::encode_string(signature.to_der().as_bytes());
            let headers = [
                ("Content-Type", "application/json"),
                ("GITHUB-PUBLIC-KEY-IDENTIFIER", "github-1"),
                ("GITHUB-PUBLIC-KEY-SIGNATURE", signature.as_str()),
            ];
            let path = "/personal-access-tokens/leak-reports";
            http_with_body(CLIENT, addr, "POST", path, &headers, report.as_bytes()).await
        }
    };
    let other = SigningKey::from_slice(&Sha256::digest(b"someone else")).unwrap();
    assert_eq!(post(other).await.status, 401);
    assert_eq!(
        http(CLIENT, server.addr, "GET", "/auth", &auth)
            .await
            .status,
        200
    );
    let res = post(key).await;
    assert_eq!(res.status, 200, "{}", res.body);
    let labels: serde_json::Value = serde_json::from_str(&res.body).unwrap();
    assert_eq!(labels[0]["label"], "true_positive", "{}", res.body);
    assert!(!res.body.contains(&token));
    assert_eq!(
        http(CLIENT, server.addr, "GET", "/auth", &auth)
            .await
            .status,
        401
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn health_readiness_and_metrics_count_what_happened() {
    let dir = Dir::new("[[rule]]\npath_prefix = \"/admin\"\nscopes = [\"admin\"]\n");
    let (token, _) = dir.issue(&["--subject", "a", "--name", "t", "--never-expires"]);
    let server = dir.serve();
    assert_eq!(
        http(CLIENT, server.addr, "GET", "/healthz", &[])
            .await
            .status,
        200
    );
    assert_eq!(
        http(CLIENT, server.addr, "GET", "/readyz", &[])
            .await
            .status,
        200
    );
    let bearer = format!("Bearer {token}");
    for (uri, auth) in [("/x", true), ("/x", true), ("/x", false), ("/admin", true)] {
        let mut h = vec![("X-Forwarded-Method", "GET"), ("X-Forwarded-Uri", uri)];
        if auth {
            h.push(("Authorization", bearer.as_str()));
        }
        http(CLIENT, server.addr, "GET", "/auth", &h).await;
    }
    let metrics = http(CLIENT, server.addr, "GET", "/metrics", &[]).await;
    assert_eq!(metrics.status, 200);
    let m = metrics.body;
    for line in [
        "patd_forward_auth_decisions_total{outcome=\"ok\"} 2",
        "patd_forward_auth_decisions_total{outcome=\"missing\"} 1",
        "patd_forward_auth_decisions_total{outcome=\"scope_denied\"} 1",
        "patd_cache_misses_total 1",
        "patd_store_lookups_total 1",
        "patd_cached_tokens 1",
        "patd_feed_connected 1",
        "patd_store_lookup_seconds_count 1",
        // Off by default ([reuse] policy): exported, and nothing counted.
        "patd_reused_secrets_total 0",
        "patd_connections_refused_total{listener=\"listen\"} 0",
    ] {
        assert!(m.contains(line), "missing {line} in\n{m}");
    }
    assert!(!m.contains(&token));
    // One log line per refusal, with the reason and the route, never the token.
    let log = server
        .log_when(|l| l.contains("missing_credentials") && l.contains("insufficient_scope"))
        .await;
    assert!(log.contains("missing_credentials"), "{log}");
    assert!(
        log.contains("insufficient_scope") && log.contains("/admin"),
        "{log}"
    );
    assert!(!log.contains(&token));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_exits_0_and_loses_no_usage_mark() {
    let dir = Dir::new("[usage]\ngranularity = \"1ms\"\nflush_interval = \"1h\"\n");
    let tokens: Vec<(String, String)> = (0..20)
        .map(|i| {
            dir.issue(&[
                "--subject",
                "a",
                "--name",
                &format!("t{i}"),
                "--never-expires",
            ])
        })
        .collect();
    let mut server = dir.serve();
    let addr = server.addr;
    // Every token used once, answered before the signal: each answered request's mark must land.
    let mut answered = Vec::new();
    for (token, id) in &tokens {
        let bearer = format!("Bearer {token}");
        let r = http(
            CLIENT,
            addr,
            "GET",
            "/auth",
            &[
                ("X-Forwarded-Method", "GET"),
                ("X-Forwarded-Uri", "/"),
                ("Authorization", &bearer),
            ],
        )
        .await;
        assert_eq!(r.status, 200);
        answered.push(id.clone());
    }
    // Load still running while the signal arrives.
    let load = tokio::spawn({
        let (token, _) = tokens[0].clone();
        async move {
            for _ in 0..200 {
                let bearer = format!("Bearer {token}");
                let socket = tokio::net::TcpStream::connect(addr).await;
                if socket.is_err() {
                    break;
                }
                drop(socket);
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    http(
                        CLIENT,
                        addr,
                        "GET",
                        "/auth",
                        &[
                            ("X-Forwarded-Method", "GET"),
                            ("X-Forwarded-Uri", "/"),
                            ("Authorization", &bearer),
                        ],
                    ),
                )
                .await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let status = tokio::task::spawn_blocking(move || {
        let s = server.terminate();
        (s, server.log())
    })
    .await
    .unwrap();
    let _ = load.await;
    assert!(
        status.0.success(),
        "exit status {:?}; log:\n{}",
        status.0,
        status.1
    );
    // The flush interval is an hour: only the shutdown can have written these.
    for id in answered {
        let view: serde_json::Value =
            serde_json::from_slice(&dir.cli(&["token", "show", &id, "--json"]).stdout).unwrap();
        assert!(
            view["lastUsedAt"].is_string(),
            "no lastUsedAt for {id}: {view}"
        );
    }
}

/// `[retention]`: `patd serve` removes revoked and expired records once older than `max_age`
/// (here 1 s, checked every 200 ms), logs one line per run without a secret, and keeps an active
/// token, which still passes; `patd token purge` runs one pass on demand, and `max_age = 0` turns
/// retention off.
#[tokio::test(flavor = "multi_thread")]
async fn retention_removes_old_revoked_and_expired_tokens() {
    let dir = Dir::new("[retention]\nmax_age = \"1s\"\ninterval = \"200ms\"\n");
    let (active, active_id) = dir.issue(&["--subject", "a", "--name", "active", "--never-expires"]);
    let (revoked, revoked_id) =
        dir.issue(&["--subject", "a", "--name", "revoked", "--never-expires"]);
    assert!(dir.cli(&["token", "revoke", &revoked_id]).status.success());
    let (expiring, expiring_id) =
        dir.issue(&["--subject", "a", "--name", "expiring", "--expires-in", "1s"]);
    let server = dir.serve();
    let gone = |id: &str| {
        let out = dir.cli(&["token", "show", id]);
        !out.status.success() && stderr(&out).contains("no token with id")
    };
    let start = Instant::now();
    while !(gone(&revoked_id) && gone(&expiring_id)) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not purged within 10 s; log:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!gone(&active_id));
    let bearer = format!("Bearer {active}");
    let h = [
        ("X-Forwarded-Method", "GET"),
        ("X-Forwarded-Uri", "/"),
        ("Authorization", bearer.as_str()),
    ];
    assert_eq!(
        http(CLIENT, server.addr, "GET", "/auth", &h).await.status,
        200
    );
    // The counters move right after the rows go.
    let mut m = String::new();
    for _ in 0..50 {
        m = http(CLIENT, server.addr, "GET", "/metrics", &[]).await.body;
        if m.contains("patd_retention_purged_total 2") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(m.contains("patd_retention_purged_total 2"), "{m}");
    assert!(m.contains("patd_retention_errors_total 0"), "{m}");
    assert!(!m.contains("patd_retention_runs_total 0"), "{m}");
    let log = server
        .log_when(|l| l.contains("removed tokens revoked or expired before the cutoff"))
        .await;
    assert!(
        log.contains("removed tokens revoked or expired before the cutoff"),
        "{log}"
    );
    for secret in [&active, &revoked, &expiring] {
        assert!(!log.contains(secret.as_str()), "{log}");
    }
    for id in [&revoked_id, &expiring_id] {
        assert!(!log.contains(id.as_str()), "the log names no token: {log}");
    }

    // On demand, and off, with the server stopped.
    let mut server = server;
    assert!(server.terminate().success());
    let (_, late_id) = dir.issue(&["--subject", "a", "--name", "late", "--never-expires"]);
    assert!(dir.cli(&["token", "revoke", &late_id]).status.success());
    let off = dir.cli(&["token", "purge", "--set", "retention.max_age=0"]);
    assert!(off.status.success(), "{}", stderr(&off));
    assert!(
        stdout(&off).contains("retention is off"),
        "{}",
        stdout(&off)
    );
    assert!(!gone(&late_id));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let out = dir.cli(&["token", "purge"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("purged 1 tokens revoked or expired before "),
        "{}",
        stdout(&out)
    );
    assert!(gone(&late_id));
    assert!(!gone(&active_id));
}

/// `[expiry_notices]` (off by default): `patd serve` logs one `personalAccessToken.expiring`
/// line per token within the lead and one `personalAccessToken.expired` once it has expired,
/// however many runs, never with a secret; a token beyond the lead gets none.
#[tokio::test(flavor = "multi_thread")]
async fn expiry_notices_are_logged_once_per_token() {
    let dir = Dir::new("[expiry_notices]\nenabled = true\nlead = \"7d\"\ninterval = \"100ms\"\n");
    let (soon, soon_id) = dir.issue(&["--subject", "a", "--name", "soon", "--expires-in", "2d"]);
    let (short, short_id) = dir.issue(&["--subject", "a", "--name", "short", "--expires-in", "1s"]);
    let (_, later_id) = dir.issue(&["--subject", "a", "--name", "later", "--expires-in", "30d"]);
    let server = dir.serve();
    let lines = |log: &str, event: &str, id: &str| {
        log.lines()
            .filter(|l| l.contains(event) && l.contains(id))
            .count()
    };
    let start = Instant::now();
    while lines(&server.log(), "personalAccessToken.expired", &short_id) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no expired notice within 10 s; log:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A few more runs: nothing is sent twice.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = server.log();
    assert_eq!(
        lines(&log, "personalAccessToken.expiring", &soon_id),
        1,
        "{log}"
    );
    assert_eq!(
        lines(&log, "personalAccessToken.expiring", &short_id),
        1,
        "{log}"
    );
    assert_eq!(
        lines(&log, "personalAccessToken.expired", &short_id),
        1,
        "{log}"
    );
    assert_eq!(
        lines(&log, "personalAccessToken.expired", &soon_id),
        0,
        "{log}"
    );
    assert!(!log.contains(later_id.as_str()), "{log}");
    for secret in [&soon, &short] {
        assert!(!log.contains(secret.as_str()), "{log}");
    }
    let m = http(CLIENT, server.addr, "GET", "/metrics", &[]).await.body;
    assert!(m.contains("patd_expiry_notices_expiring_total 2"), "{m}");
    assert!(m.contains("patd_expiry_notices_expired_total 1"), "{m}");
    assert!(m.contains("patd_expiry_notices_errors_total 0"), "{m}");
    let mut server = server;
    assert!(server.terminate().success());
}

/// A client that sends its request head a byte at a time, never finishing it, is cut off after
/// `patd`'s header timeout (10 s): `axum::serve` ran hyper without a timer, which silently drops
/// that timeout, so such clients could hold any number of connections open.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_trickling_its_request_head_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = Dir::new("");
    let server = dir.serve();
    let mut conn = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let start = Instant::now();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: ")
        .await
        .unwrap();
    let mut cut_off = None;
    while start.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut buf = [0u8; 512];
        let closed =
            match tokio::time::timeout(Duration::from_millis(10), conn.read(&mut buf)).await {
                // Closed, reset, or an error answer (a 408): the server gave up on the head.
                Ok(_) => true,
                // Nothing to read: still waiting for the head.
                Err(_) => conn.write_all(b"x").await.is_err(),
            };
        if closed {
            cut_off = Some(start.elapsed());
            break;
        }
    }
    let cut_off = cut_off.expect("a client trickling its head for 20 s kept its connection");
    assert!(
        cut_off >= Duration::from_secs(9) && cut_off < Duration::from_secs(14),
        "cut off after {cut_off:?}, not after the 10 s header timeout"
    );
    // Other clients are served meanwhile and after.
    assert_eq!(
        http(CLIENT, server.addr, "GET", "/healthz", &[])
            .await
            .status,
        200
    );
}

/// Without `[proxy] trusted`, every forward-auth client is the gateway itself (one failure limit
/// and lookup budget for all, IP restrictions matched against the gateway's address): `patd`
/// says so when it starts, and not once the gateway is trusted.
#[tokio::test(flavor = "multi_thread")]
async fn serving_without_a_trusted_proxy_is_warned_about() {
    let dir = Dir::new("");
    let server = dir.serve();
    let log = server.log_when(|l| l.contains("patd serving")).await;
    assert!(log.contains("no [proxy] trusted"), "{log}");

    let dir = Dir::new("[proxy]\ntrusted = [\"127.0.0.1/32\"]\n");
    let server = dir.serve();
    // The warning would come before this line.
    let log = server.log_when(|l| l.contains("patd serving")).await;
    assert!(log.contains("patd serving"), "{log}");
    assert!(!log.contains("no [proxy] trusted"), "{log}");
}

/// A connection that sends nothing, or only the start of the HTTP/2 preface (hyper has not told
/// HTTP/1 from HTTP/2 yet, and no header timeout runs), is closed after the header timeout
/// (10 s): otherwise 4 096 of them would hold every connection slot.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_that_never_sends_a_request_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = Dir::new("");
    let server = dir.serve();
    let mut silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut preface = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    preface.write_all(b"P").await.unwrap();
    let start = Instant::now();
    for (what, conn) in [("silent", &mut silent), ("preface", &mut preface)] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(20), conn.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0) | Err(_))),
            "{what}: the connection was not closed: {read:?}"
        );
    }
    let closed = start.elapsed();
    assert!(
        closed >= Duration::from_secs(9) && closed < Duration::from_secs(14),
        "closed after {closed:?}, not after the 10 s header timeout"
    );
}

/// A request whose body never comes (headers complete, a `Content-Length`, then nothing) does not
/// hold its connection for good: with a request in flight and none starting or ending for 20 s,
/// the connection is closed (after a 5 s grace to finish).
#[tokio::test(flavor = "multi_thread")]
async fn a_request_whose_body_never_comes_loses_its_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = Dir::new("");
    let (token, _) = dir.issue(&[
        "--subject",
        "a",
        "--name",
        "t",
        "--scope",
        "personalAccessToken:*",
        "--never-expires",
    ]);
    let server = dir.serve();
    let mut conn = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /personal-access-tokens HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let start = Instant::now();
    let mut buf = vec![0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(40), conn.read(&mut buf))
        .await
        .expect("the connection closed within 40 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(19) && waited < Duration::from_secs(28),
        "closed after {waited:?}, not after the 20 s request timeout and the 5 s grace"
    );
}

/// `/readyz` needs no token, so a flood of it must not become a flood of store queries (which
/// would take the connections token lookups need): 300 at once against a slow store ask it once,
/// and a store that hangs reads as not ready within seconds instead of holding every probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_readiness_probes_asks_the_store_once() {
    use tower::ServiceExt;
    use tower_pat::gateway::config::Config;
    use tower_pat::gateway::serve::Gateway;

    let store = common::CountingStore::new();
    store
        .get_delay_ms
        .store(200, std::sync::atomic::Ordering::SeqCst);
    let gateway = Gateway::new(Config::default(), std::sync::Arc::new(store.clone())).unwrap();
    let app = gateway.router().unwrap();
    let probe = |app: axum::Router| async move {
        let req = http::Request::get("/readyz")
            .body(axum::body::Body::empty())
            .unwrap();
        app.oneshot(req).await.unwrap().status()
    };
    let before = store.calls();
    let probes: Vec<_> = (0..300).map(|_| tokio::spawn(probe(app.clone()))).collect();
    for p in probes {
        assert_eq!(p.await.unwrap(), 200);
    }
    assert_eq!(store.calls() - before, 1, "store queries for 300 probes");

    // Clients that hang up mid-probe cannot cancel it and so start one probe each.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    store
        .get_delay_ms
        .store(300, std::sync::atomic::Ordering::SeqCst);
    let before = store.calls();
    for _ in 0..30 {
        let _ = tokio::time::timeout(Duration::from_millis(5), probe(app.clone())).await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        store.calls() - before,
        1,
        "store queries for 30 probes cut short"
    );
    assert_eq!(probe(app.clone()).await, 200);

    // A store that hangs: not ready, within the probe's timeout, and still one query at a time.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    store
        .get_delay_ms
        .store(60_000, std::sync::atomic::Ordering::SeqCst);
    let before = store.calls();
    let started = Instant::now();
    let probes: Vec<_> = (0..50).map(|_| tokio::spawn(probe(app.clone()))).collect();
    for p in probes {
        assert_eq!(p.await.unwrap(), 503);
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(store.calls() - before, 1);
}

/// A keep-alive connection from `from` that has been served one `/healthz`: `Some` with it
/// still open, `None` if the server closed it instead of answering.
async fn kept_connection(from: IpAddr, to: std::net::SocketAddr) -> Option<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::new(from, 0)).unwrap();
    let mut conn = socket.connect(to).await.ok()?;
    conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .ok()?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
            // Closed or reset before an answer: refused.
            Ok(_) => return None,
            Err(_) => panic!("neither an answer nor a close within 5 s"),
        }
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    Some(conn)
}

/// One client cannot hold a listener's connection slots: with `max_connections = 16` and
/// `max_connections_per_client = 4`, a client may open more than four while the listener is less
/// than half full, but once it is at least half full, a connection of a client holding four or
/// more is closed at once (named in the log once, counted in `/metrics`), while another client
/// and a trusted proxy are served; once the client is below its limit, it may open another.
#[tokio::test(flavor = "multi_thread")]
async fn one_client_cannot_hold_every_connection() {
    // The management API on a listener of its own, whose count of refusals stays apart.
    let dir = Dir::new(
        "max_connections = 16\nmax_connections_per_client = 4\n\
         admin_listen = \"127.0.0.1:0\"\n[proxy]\ntrusted = [\"127.0.0.3/32\"]\n",
    );
    let server = dir.serve();
    let attacker = CLIENT;
    let proxy: IpAddr = "127.0.0.3".parse().unwrap();
    let other: IpAddr = "127.0.0.4".parse().unwrap();
    let open = |from: IpAddr, n: usize| async move {
        let mut held = Vec::new();
        for i in 0..n {
            let conn = kept_connection(from, server.addr).await;
            held.push(conn.unwrap_or_else(|| panic!("{from}: connection {i} was refused")));
        }
        held
    };

    // Less than half full: six of one client are served.
    let mut held = open(attacker, 6).await;
    // With one through the trusted proxy, seven are held: the next makes the listener half full
    // (eight of sixteen), and is refused.
    let mut through_proxy = open(proxy, 1).await;
    for _ in 0..3 {
        assert!(
            kept_connection(attacker, server.addr).await.is_none(),
            "a connection of a client over its limit was served on a listener half full"
        );
    }
    assert_eq!(
        http(other, server.addr, "GET", "/healthz", &[])
            .await
            .status,
        200,
        "another client must be served"
    );
    through_proxy.extend(open(proxy, 4).await);
    let metrics = http(other, server.addr, "GET", "/metrics", &[]).await;
    for line in [
        "patd_connections_refused_total{listener=\"listen\"} 3",
        "patd_connections_refused_total{listener=\"admin_listen\"} 0",
    ] {
        assert!(metrics.body.contains(line), "{line} in\n{}", metrics.body);
    }

    // Below its limit again, the client is served once more, and then refused again.
    held.truncate(3);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(conn) = kept_connection(attacker, server.addr).await {
            held.push(conn);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "closed connections did not free their client's slots"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        kept_connection(attacker, server.addr).await.is_none(),
        "the client's limit holds again once it has its four"
    );
    let log = server.log_when(|log| log.contains("127.0.0.2")).await;
    assert_eq!(
        log.matches("max_connections_per_client").count(),
        1,
        "a client is named once a minute at most: {log}"
    );
    drop((held, through_proxy));
}

/// The open-file limit of a running process: (soft, hard), from `/proc`.
#[cfg(target_os = "linux")]
fn open_files_limit(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut values = line["Max open files".len()..].split_whitespace();
    (
        values.next().unwrap().to_owned(),
        values.next().unwrap().to_owned(),
    )
}

/// Every connection is a file. `patd serve` raises a soft open-file limit to the hard one (a soft
/// 1 024 is common), and where even the hard limit cannot hold `max_connections`, it serves fewer
/// and says so: otherwise a listener would never be half full, the per-client limit would never
/// start, and one client could take every file, the store's included.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread")]
async fn the_open_file_limit_is_raised_or_the_connections_fit_it() {
    // 500 connections and 256 files kept: 756 files, which a hard limit of 600 cannot hold.
    let dir = Dir::new("max_connections = 500\n");
    let hard = open_files_limit(std::process::id()).1;
    if hard == "unlimited" || hard.parse::<u64>().unwrap() < 756 {
        eprintln!("skipped: this process's hard open-file limit is {hard}, below 756");
        return;
    }
    let raised = dir.serve_with_ulimit("-S -n 300");
    assert_eq!(
        open_files_limit(raised.child.id()),
        (hard.clone(), hard.clone())
    );
    let log = raised.log_when(|l| l.contains("patd serving")).await;
    assert!(!log.contains("too few files"), "{log}");

    let capped = dir.serve_with_ulimit("-n 600");
    assert_eq!(
        open_files_limit(capped.child.id()),
        ("600".to_owned(), "600".to_owned())
    );
    let log = capped.log_when(|l| l.contains("too few files")).await;
    assert!(
        log.contains("too few files") && log.contains("each serves at most 344"),
        "{log}"
    );
    assert_eq!(
        http(CLIENT, capped.addr, "GET", "/healthz", &[])
            .await
            .status,
        200
    );
}

/// sqlx logs a store URL's query parameter it does not read with its value (`ignoring
/// unrecognized connect parameter`, at warn): libpq's `sslpassword` or a misspelt `password`
/// would reach the log. patd refuses the URL before connecting, naming the key only, whatever
/// `RUST_LOG` says.
#[test]
fn a_store_url_query_parameter_the_driver_does_not_read_is_refused_unlogged() {
    let dir = Dir::new("");
    for (url, key) in [
        (
            "postgres://postgres@127.0.0.1:1/test?sslpassword=s3cret-key-pass",
            "sslpassword",
        ),
        (
            "postgres://postgres@127.0.0.1:1/test?passwd=s3cret-pw",
            "passwd",
        ),
    ] {
        for args in [&["migrate"][..], &["config", "check"], &["serve"]] {
            let out = std::process::Command::new(support_patd::PATD)
                .arg("--config")
                .arg(dir.config())
                .args(args)
                .env("PATD_STORE", url)
                .env("RUST_LOG", "trace")
                .current_dir(&dir.path)
                .output()
                .unwrap();
            let all = format!("{}{}", stdout(&out), stderr(&out));
            assert!(!all.contains("s3cret"), "{url} {args:?}:\n{all}");
            assert_eq!(out.status.code(), Some(2), "{url} {args:?}:\n{all}");
            assert!(
                all.contains("PATD_STORE") && all.contains(&format!("`{key}`")),
                "{url} {args:?}:\n{all}"
            );
        }
    }
}

/// A secret typed into the value of a query parameter the driver reads reached patd's error:
/// sqlx quotes an `sslmode` it does not know, and PostgreSQL a database or user name it does not
/// have. A `?` typed for `&` (`?sslmode=require?password=…`) is refused before connecting, and
/// what the driver or the database quotes from the URL is redacted.
#[test]
fn a_secret_in_a_store_url_value_never_reaches_the_error() {
    let dir = Dir::new("");
    let run = |url: &str| {
        let out = std::process::Command::new(support_patd::PATD)
            .arg("--config")
            .arg(dir.config())
            .arg("migrate")
            .env("PATD_STORE", url)
            .current_dir(&dir.path)
            .output()
            .unwrap();
        let all = format!("{}{}", stdout(&out), stderr(&out));
        assert!(!all.contains("s3cret"), "{url}:\n{all}");
        (out.status.code(), all)
    };
    let (code, all) = run("postgres://app@127.0.0.1:1/pat?sslmode=require?password=s3cret-pw");
    assert_eq!(code, Some(2), "{all}");
    assert!(all.contains("`sslmode`"), "{all}");
    let (code, all) = run("postgres://app@127.0.0.1:1/pat?sslmode=require%20password=s3cret-pw");
    assert_eq!(code, Some(2), "{all}");
    assert!(all.contains("`sslmode`"), "{all}");
    let Ok(base) = std::env::var("DATABASE_URL") else {
        eprintln!("DATABASE_URL is not set: the database's own quote is not checked");
        return;
    };
    let base = base.split('?').next().unwrap_or(&base);
    let (code, all) = run(&format!("{base}?dbname=s3cret-db"));
    assert_eq!(code, Some(1), "{all}");
    assert!(all.contains("does not exist"), "{all}");
}

/// The SQLite store holds the tokens' hashes, subjects, scopes and IP restrictions: the file patd
/// creates is its owner's only (0600) whatever the umask, and so are the `-wal` and `-shm` files
/// SQLite makes beside it (which take the main file's permissions). They were 0644 under the
/// common umask 022, readable by every local user.
#[test]
fn the_sqlite_store_patd_creates_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |dir: &Dir, file: &str| {
        let meta = std::fs::metadata(dir.path.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        format!("{:o}", meta.permissions().mode() & 0o777)
    };
    // A CLI command creates it.
    let dir = Dir::new("");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("umask 022 && exec \"$0\" \"$@\"")
        .arg(support_patd::PATD)
        .arg("--config")
        .arg(dir.config())
        .args([
            "token",
            "create",
            "--subject",
            "a",
            "--name",
            "n",
            "--never-expires",
        ])
        .current_dir(&dir.path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(mode(&dir, "patd.db"), "600");
    // A server creates it, and keeps the -wal and -shm files while it runs.
    let dir = Dir::new("");
    let mut server = dir.serve_with_umask("022");
    for file in ["patd.db", "patd.db-wal", "patd.db-shm"] {
        assert_eq!(mode(&dir, file), "600", "{file}");
    }
    server.terminate();
    // An existing file keeps its permissions.
    let dir = Dir::new("");
    std::fs::write(dir.path.join("patd.db"), b"").unwrap();
    std::fs::set_permissions(
        dir.path.join("patd.db"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    let out = dir.cli(&["token", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(mode(&dir, "patd.db"), "640");
}

/// Every forward-auth answer (200, 401, 403, 400, nginx's 403 for a 400) carries
/// `Cache-Control: no-store`: a shared cache must never keep an auth decision.
#[tokio::test(flavor = "multi_thread")]
async fn every_forward_auth_answer_is_no_store() {
    use std::net::{IpAddr, Ipv4Addr};
    let client = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    for compat in [false, true] {
        let dir = Dir::new(&format!(
            "[forward_auth]\nnginx_compat = {compat}\n[[rule]]\npath_prefix = \"/admin\"\nscopes = [\"admin\"]\n"
        ));
        let (token, _) = dir.issue(&[
            "--subject",
            "a",
            "--name",
            "n",
            "--scope",
            "read",
            "--never-expires",
            "--ip",
            "127.0.0.2",
        ]);
        let (other, _) = dir.issue(&[
            "--subject",
            "a",
            "--name",
            "m",
            "--never-expires",
            "--ip",
            "10.9.9.9",
        ]);
        let server = dir.serve();
        let bearer = format!("Bearer {token}");
        let other = format!("Bearer {other}");
        let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
            (
                "ok",
                vec![
                    ("x-forwarded-method", "GET"),
                    ("x-forwarded-uri", "/x"),
                    ("authorization", &bearer),
                ],
            ),
            (
                "missing",
                vec![("x-forwarded-method", "GET"), ("x-forwarded-uri", "/x")],
            ),
            (
                "scope",
                vec![
                    ("x-forwarded-method", "GET"),
                    ("x-forwarded-uri", "/admin"),
                    ("authorization", &bearer),
                ],
            ),
            (
                "ip",
                vec![
                    ("x-forwarded-method", "GET"),
                    ("x-forwarded-uri", "/x"),
                    ("authorization", &other),
                ],
            ),
            ("bad", vec![("x-forwarded-method", "GET")]),
            (
                "bad-token",
                vec![
                    ("x-forwarded-method", "GET"),
                    ("x-forwarded-uri", "/x"),
                    ("authorization", "Bearer pat_nope"),
                ],
            ),
        ];
        // nginx_compat answers 403 for a 400 (nginx's auth_request passes only 401 and 403).
        let bad = if compat { 403 } else { 400 };
        let expected = [200, 401, 403, 403, bad, 401];
        for ((what, headers), status) in cases.into_iter().zip(expected) {
            let reply = http(client, server.addr, "GET", "/auth", &headers).await;
            assert_eq!(reply.status, status, "compat {compat}, {what}");
            assert_eq!(
                reply.header("cache-control"),
                Some("no-store"),
                "compat {compat}, {what}: {} {:?}",
                reply.status,
                reply.headers
            );
        }
    }
}
