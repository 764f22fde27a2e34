//! The examples serve what they print: start the built binary, call it with the printed token.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `target/<profile>/examples/<name>`, built by `cargo test` with the integration tests.
fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name)
}

struct Server {
    child: Child,
    addr: String,
    lines: Vec<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh SQLite file path for one example run.
fn temp_db(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tower-pat-examples-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{tag}.db"))
}

/// Starts an example on an ephemeral port over its own SQLite file and reads its output up to the
/// line starting with `last_prefix`.
fn start(name: &str, last_prefix: &str) -> Server {
    start_with_db(name, &temp_db(name), last_prefix)
}

fn start_with_db(name: &str, db: &std::path::Path, last_prefix: &str) -> Server {
    let mut child = Command::new(example_binary(name))
        .env("PAT_ADDR", "127.0.0.1:0")
        .env("PAT_GRPC_ADDR", "127.0.0.1:0")
        .env("PAT_DB", db)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("example {name} not built ({e}): run `cargo test` to build it"));
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "example exited: {lines:?}"
        );
        let line = line.trim_end().to_owned();
        let done = line.starts_with(last_prefix);
        lines.push(line);
        if done {
            break;
        }
    }
    let addr = lines
        .iter()
        .find_map(|l| l.strip_prefix("listening on "))
        .expect("the example prints its address")
        .to_owned();
    Server { child, addr, lines }
}

fn printed(server: &Server, prefix: &str) -> String {
    server
        .lines
        .iter()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line {prefix:?} in {:?}", server.lines))
        .to_owned()
}

/// A minimal HTTP/1.1 GET; returns the status code and the body.
fn get(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    call(addr, "GET", path, token)
}

fn call(addr: &str, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    request(addr, method, path, token, None)
}

/// A POST with a JSON body; returns the status code and the body.
fn post_json(addr: &str, path: &str, token: &str, json: &str) -> (u16, String) {
    request(addr, "POST", path, Some(token), Some(json))
}

/// A minimal HTTP/1.1 request over a fresh connection.
fn request(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    json: Option<&str>,
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let (content_type, body) = json.map_or(("", ""), |j| ("Content-Type: application/json\r\n", j));
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}{content_type}Content-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

#[test]
fn axum_example_serves_the_printed_token() {
    let server = start("axum", "token: ");
    let token = printed(&server, "token: ");
    assert_eq!(get(&server.addr, "/", None).0, 200);
    assert_eq!(get(&server.addr, "/me", None).0, 401);
    let (status, body) = get(&server.addr, "/me", Some(&token));
    assert_eq!(status, 200);
    assert!(body.contains("subject=alice"), "{body}");
    assert_eq!(get(&server.addr, "/notes", Some(&token)).0, 200);
    // The printed token lacks `notes:write`, which the POST route requires.
    let (status, body) = call(&server.addr, "POST", "/notes", Some(&token));
    assert_eq!(status, 403);
    assert!(body.contains("insufficient_scope"), "{body}");
}

#[test]
fn hyper_example_serves_the_printed_token() {
    let server = start("hyper", "token: ");
    let token = printed(&server, "token: ");
    assert_eq!(get(&server.addr, "/", None).0, 401);
    let (status, body) = get(&server.addr, "/", Some(&token));
    assert_eq!(status, 200);
    assert!(body.contains("hello alice"), "{body}");
}

#[test]
fn quickstart_example_serves_the_admin_api_and_its_routes() {
    let server = start("quickstart", "admin token: ");
    let token = printed(&server, "admin token: ");
    assert_eq!(get(&server.addr, "/healthz", None).0, 200);
    assert_eq!(
        get(&server.addr, "/public/ping", None),
        (200, "pong".to_owned())
    );
    assert_eq!(get(&server.addr, "/ping", None).0, 401);
    assert_eq!(
        get(&server.addr, "/ping", Some(&token)),
        (200, "pong".to_owned())
    );
    let (status, body) = get(&server.addr, "/hello", Some(&token));
    assert_eq!(status, 200);
    assert!(body.contains("\"subject\":\"admin\""), "{body}");
    assert_eq!(get(&server.addr, "/personal-access-tokens", None).0, 401);
    let (status, body) = get(&server.addr, "/personal-access-tokens/self", Some(&token));
    assert_eq!(status, 200);
    assert!(
        body.contains("personalAccessToken:*") && !body.contains(&token),
        "{body}"
    );
    let (status, body) = get(&server.addr, "/personal-access-tokens/openapi.json", None);
    assert_eq!(status, 200);
    assert!(body.contains("\"openapi\":\"3.1"), "{body}");
}

#[test]
fn quickstart_restarts_with_its_tokens_intact() {
    let db = temp_db("quickstart-restart");
    let _ = std::fs::remove_file(&db);
    let (admin, laptop, laptop_id) = {
        let server = start_with_db("quickstart", &db, "admin token: ");
        let admin = printed(&server, "admin token: ");
        let (status, body) = post_json(
            &server.addr,
            "/personal-access-tokens",
            &admin,
            r#"{"name": "laptop", "scopes": ["personalAccessToken:read"], "userAwareTokenNeverExpires": true}"#,
        );
        assert_eq!(status, 201, "{body}");
        let created: serde_json::Value = serde_json::from_str(&body).unwrap();
        let laptop = created["token"].as_str().unwrap().to_owned();
        let id = created["id"].as_str().unwrap().to_owned();
        assert_eq!(get(&server.addr, "/ping", Some(&laptop)).0, 200);
        (admin, laptop, id)
        // The server is killed here.
    };

    let server = start_with_db("quickstart", &db, "subject admin has 1 usable token");
    assert!(
        !server.lines.iter().any(|l| l.starts_with("admin token: ")),
        "no second bootstrap token: {:?}",
        server.lines
    );
    for token in [&admin, &laptop] {
        assert_eq!(
            get(&server.addr, "/ping", Some(token)),
            (200, "pong".to_owned())
        );
    }
    let (status, body) = get(
        &server.addr,
        &format!("/personal-access-tokens/{laptop_id}"),
        Some(&admin),
    );
    assert_eq!(status, 200);
    assert!(body.contains("\"name\":\"laptop\""), "{body}");
    drop(server);
    let _ = std::fs::remove_file(&db);
}

#[test]
fn quickstart_issues_a_new_bootstrap_token_when_admin_has_no_usable_one() {
    let db = temp_db("quickstart-lockout");
    let _ = std::fs::remove_file(&db);
    let first = {
        let server = start_with_db("quickstart", &db, "admin token: ");
        let admin = printed(&server, "admin token: ");
        // The admin revokes its only token (or loses it and has it revoked).
        let (status, body) = call(
            &server.addr,
            "DELETE",
            "/personal-access-tokens/self",
            Some(&admin),
        );
        assert_eq!(status, 204, "{body}");
        assert_eq!(get(&server.addr, "/ping", Some(&admin)).0, 401);
        admin
    };
    // A restart is the way back in: a new bootstrap token, said so.
    let server = start_with_db("quickstart", &db, "admin token: ");
    assert!(
        server
            .lines
            .iter()
            .any(|l| l.contains("no usable token left")),
        "{:?}",
        server.lines
    );
    let second = printed(&server, "admin token: ");
    assert_ne!(first, second);
    assert_eq!(get(&server.addr, "/ping", Some(&first)).0, 401);
    assert_eq!(get(&server.addr, "/ping", Some(&second)).0, 200);
    let (status, body) = get(&server.addr, "/personal-access-tokens", Some(&second));
    assert_eq!(status, 200, "{body}");
    drop(server);
    // With a usable token, a restart issues none.
    let server = start_with_db("quickstart", &db, "subject admin has 1 usable token");
    assert!(!server.lines.iter().any(|l| l.starts_with("admin token: ")));
    drop(server);
    let _ = std::fs::remove_file(&db);
}

/// Runs `name` twice over one database (reading its output up to the line starting with
/// `last_prefix[run]`): the second start must work as the first did.
fn twice(name: &str, last_prefix: [&str; 2], check: impl Fn(&Server)) {
    let db = temp_db(&format!("{name}-twice"));
    let _ = std::fs::remove_file(&db);
    for (run, last_prefix) in last_prefix.into_iter().enumerate() {
        let server = start_with_db(name, &db, last_prefix);
        assert!(
            server.lines.iter().any(|l| l.starts_with(last_prefix)),
            "run {} of {name}: {:?}",
            run + 1,
            server.lines
        );
        check(&server);
    }
    let _ = std::fs::remove_file(&db);
}

#[test]
fn every_example_survives_a_second_run_on_the_same_database() {
    twice("axum", ["token: "; 2], |s| {
        assert_eq!(get(&s.addr, "/me", Some(&printed(s, "token: "))).0, 200);
    });
    twice("hyper", ["token: "; 2], |s| {
        assert_eq!(get(&s.addr, "/", Some(&printed(s, "token: "))).0, 200);
    });
    let again = "subject admin has 1 usable token";
    twice("quickstart", ["admin token: ", again], |s| {
        assert_eq!(get(&s.addr, "/healthz", None).0, 200);
    });
    #[cfg(feature = "tonic")]
    twice("tonic", ["token: "; 2], |s| {
        // A gRPC server answers an HTTP/1.1 request, however briefly: it is up.
        assert!(TcpStream::connect(&s.addr).is_ok());
    });
}
