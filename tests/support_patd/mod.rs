//! Running `patd` in tests: a temporary directory with a configuration and an SQLite store, the
//! CLI, `patd serve` as a child process, a raw HTTP/1.1 client that can choose its source
//! address, and an upstream that echoes the headers it received.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const PATD: &str = env!("CARGO_BIN_EXE_patd");

/// A directory with `patd.toml` (and the store `patd.db`), removed on drop.
pub struct Dir {
    pub path: PathBuf,
}

impl Dir {
    pub fn new(config: &str) -> Self {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("patd-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        let config = format!(
            "store = \"sqlite:{}\"\n{config}",
            path.join("patd.db").display()
        );
        std::fs::write(path.join("patd.toml"), config).unwrap();
        Self { path }
    }

    pub fn config(&self) -> PathBuf {
        self.path.join("patd.toml")
    }

    /// Runs `patd --config DIR/patd.toml ARGS…` in the directory.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(PATD)
            .arg("--config")
            .arg(self.config())
            .args(args)
            .current_dir(&self.path)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    }

    /// `patd token create …` with `extra` args: the secret and the id.
    pub fn issue(&self, extra: &[&str]) -> (String, String) {
        let mut args = vec!["token", "create", "--json"];
        args.extend_from_slice(extra);
        let out = self.cli(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            v["token"].as_str().unwrap().to_owned(),
            v["id"].as_str().unwrap().to_owned(),
        )
    }

    /// Starts `patd serve` on a free port.
    pub fn serve(&self) -> Server {
        self.serve_with(&[])
    }

    pub fn serve_with(&self, env: &[(&str, &str)]) -> Server {
        let mut command = Command::new(PATD);
        command.envs(env.iter().copied());
        self.spawn_serve(command)
    }

    /// Starts `patd serve` on a free port under `sh` after `ulimit ULIMIT` (such as `-n 600`).
    pub fn serve_with_ulimit(&self, ulimit: &str) -> Server {
        self.serve_after(&format!("ulimit {ulimit}"))
    }

    /// Starts `patd serve` on a free port under `sh` after `umask UMASK` (such as `022`).
    pub fn serve_with_umask(&self, umask: &str) -> Server {
        self.serve_after(&format!("umask {umask}"))
    }

    /// Starts `patd serve` on a free port under `sh` after the shell command `prelude`.
    fn serve_after(&self, prelude: &str) -> Server {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("{prelude} && exec \"$0\" \"$@\""))
            .arg(PATD);
        self.spawn_serve(command)
    }

    /// Runs `command` (`patd`, or what execs it with the arguments) with `--config … serve
    /// --listen 127.0.0.1:0`, and waits for the address it listens on.
    fn spawn_serve(&self, mut command: Command) -> Server {
        let mut child = command
            .arg("--config")
            .arg(self.config())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .current_dir(&self.path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("patd listening on http://")
            .unwrap_or_else(|| panic!("patd serve did not start: {line:?}"))
            .parse()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = std::sync::Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Server { child, addr, log }
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A running `patd serve`, killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        self.child.wait().unwrap()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The log once `done` holds for it (its lines arrive from the child's stderr through a
    /// reader thread, after the responses they describe), or after 5 s as it is.
    pub async fn log_when(&self, done: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let log = self.log();
            if done(&log) || std::time::Instant::now() >= deadline {
                return log;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response read off the wire.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: BTreeMap<String, Vec<String>>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .and_then(|v| v.first())
            .map(String::as_str)
    }
}

/// One HTTP/1.1 request from `from` (a loopback address such as 127.0.0.2) to `to`.
pub async fn http(
    from: IpAddr,
    to: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> Reply {
    http_with_body(from, to, method, target, headers, b"").await
}

/// [`http`] with a body (and its `Content-Length`, unless empty).
pub async fn http_with_body(
    from: IpAddr,
    to: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let mut stream = socket.connect(to).await.unwrap();
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut req = req.into_bytes();
    req.extend_from_slice(body);
    stream.write_all(&req).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("no answer within 10 s")
        .unwrap();
    parse(&raw)
}

fn parse(raw: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            headers
                .entry(k.trim().to_ascii_lowercase())
                .or_default()
                .push(v.trim().to_owned());
        }
    }
    let chunked = headers
        .get("transfer-encoding")
        .is_some_and(|v| v.iter().any(|v| v.contains("chunked")));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// An upstream that answers 200 with the request's method, path and headers as JSON.
pub async fn upstream() -> SocketAddr {
    use axum::extract::Request;
    let app = axum::Router::new().fallback(|req: Request| async move {
        let headers: BTreeMap<String, String> = req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        axum::Json(serde_json::json!({
            "method": req.method().as_str(),
            "path": req.uri().path(),
            "headers": headers,
        }))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// A free TCP port on 127.0.0.1 (bound and released: another process could take it meanwhile,
/// which the gateway would then report).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `addr` accepts connections (at most 10 s).
pub async fn wait_listening(addr: SocketAddr) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on {addr}");
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}
