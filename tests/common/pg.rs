//! Throwaway PostgreSQL databases for the store tests.

use std::hash::{BuildHasher, RandomState};
use std::io::Write;
use std::str::FromStr;
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};

use tower_pat::store::sqlx::postgres::{PgConnectOptions, PgConnection};
use tower_pat::store::sqlx::{ConnectOptions, Executor};

static SKIP: Once = Once::new();

/// `DATABASE_URL`, or `None` after printing (once per test binary) what is skipped.
pub fn database_url(what: &str) -> Option<String> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            SKIP.call_once(|| {
                // Straight to stderr: the test harness would capture `eprintln!`.
                let _ = writeln!(
                    std::io::stderr(),
                    "skipping PostgreSQL tests ({what}): DATABASE_URL is not set"
                );
            });
            None
        }
    }
}

/// A fresh database, dropped (even if the test panics) when this is dropped.
pub struct TestDb {
    admin: PgConnectOptions,
    pub name: String,
    /// Options that connect to the fresh database.
    pub options: PgConnectOptions,
}

impl TestDb {
    /// Creates `tp_<random>` next to `DATABASE_URL`'s database; `None` without `DATABASE_URL`.
    pub async fn create(what: &str) -> Option<Self> {
        static N: AtomicU64 = AtomicU64::new(0);
        let url = database_url(what)?;
        let admin = PgConnectOptions::from_str(&url).expect("DATABASE_URL is not a valid URL");
        let seed = RandomState::new().hash_one((
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now(),
        ));
        let name = format!("tp_{seed:016x}");
        let mut conn: PgConnection = admin
            .connect()
            .await
            .expect("cannot connect to DATABASE_URL");
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("CREATE DATABASE failed");
        let options = admin.clone().database(&name);
        Some(Self {
            admin,
            name,
            options,
        })
    }

    /// Options that connect to `DATABASE_URL`'s own database, on the same server as the fresh
    /// one: another database, which hears none of its notifications.
    pub fn next_door(&self) -> PgConnectOptions {
        self.admin.clone()
    }

    /// The fresh database's options with the host and port replaced (to go through a proxy).
    pub fn via(&self, port: u16) -> PgConnectOptions {
        self.options.clone().host("127.0.0.1").port(port)
    }

    /// The server's host and port.
    pub fn server_addr(&self) -> String {
        let host = self.admin.get_host();
        let host = if host.starts_with('/') {
            "127.0.0.1"
        } else {
            host
        };
        format!("{host}:{}", self.admin.get_port())
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let name = self.name.clone();
        // Drop may run inside a runtime: do the async work on a thread of its own.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if let Ok(mut conn) = admin.connect().await {
                    let _ = conn
                        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                        .await;
                }
            });
        });
        let _ = done.join();
    }
}
