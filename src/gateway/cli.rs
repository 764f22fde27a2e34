//! The `patd` command line: `serve`, `token …`, `migrate`, `config check`.
//!
//! Exit codes: 0 on success; 2 for bad input (an unknown id, a bad duration or network, an
//! unreadable or invalid configuration), with a message saying what was wrong; 1 when something
//! outside failed (the store cannot be reached, a port is taken).
//!
//! The token commands work on the configured store directly, so an operator can bootstrap and
//! recover without the HTTP API. A running `patd serve` on the same store sees their changes
//! through the store's change feed (PostgreSQL's NOTIFY, SQLite's change log) within a second.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};

use super::config::{Config, LogFormat, parse_duration};
use super::serve;
use crate::admin::TokenView;
use crate::store::{ListQuery, StoreError};
use crate::{NewToken, ScopeSet, TokenRecord, Tokens};

/// patd: personal access token authentication for gateways (forward-auth for nginx, Caddy and
/// Traefik, Envoy ext_authz), with a management API and a token CLI.
///
/// Its `Debug` hides what may be secret: the store URL's password and query, every `--set` value.
#[derive(Parser)]
#[command(name = "patd", version, about)]
pub struct Cli {
    /// The configuration file (default: ./patd.toml if it exists).
    #[arg(long, global = true, env = "PATD_CONFIG")]
    config: Option<PathBuf>,
    /// The store: sqlite:PATH or postgres://… (the `store` key).
    #[arg(long, global = true)]
    store: Option<String>,
    /// Sets any configuration key: --set cache.ttl=5m (repeatable; wins over the file and PATD_*).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    sets: Vec<String>,
    #[command(subcommand)]
    command: Command,
}

impl std::fmt::Debug for Cli {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A `--set` may carry a pepper or a store URL: only its key is shown.
        let sets: Vec<String> = self
            .sets
            .iter()
            .map(|s| match s.split_once('=') {
                Some((key, _)) if super::config::is_key_path(key.trim()) => {
                    format!("{}=<redacted>", key.trim())
                }
                _ => "<redacted>".to_owned(),
            })
            .collect();
        f.debug_struct("Cli")
            .field("config", &self.config)
            .field(
                "store",
                &self.store.as_deref().map(super::config::redacted_url),
            )
            .field("sets", &sets)
            .field("command", &self.command)
            .finish()
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serves forward-auth, the management API, /healthz, /readyz and /metrics.
    Serve(ServeArgs),
    /// Issues, lists, shows, revokes, rotates and deletes tokens in the configured store.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Creates or upgrades the store's tables, then exits.
    Migrate,
    /// The configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The address of forward-auth, health and metrics (the `listen` key).
    #[arg(long)]
    listen: Option<String>,
    /// The management API's own address (the `admin_listen` key).
    #[arg(long)]
    admin_listen: Option<String>,
    /// Log lines as `text` or `json` (the `log_format` key).
    #[arg(long)]
    log_format: Option<String>,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Prints the effective configuration, secrets redacted; exits 2 if it is invalid.
    Check,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Issues a token and prints its secret, once.
    Create(CreateArgs),
    /// Lists tokens: id, name, subject, scopes, expiry, last use, state.
    List {
        /// Only this subject's tokens.
        #[arg(long)]
        subject: Option<String>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Shows one token (never its secret).
    Show {
        /// The token's id.
        id: String,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Revokes a token, for good.
    Revoke {
        /// The token's id.
        id: String,
    },
    /// Replaces a token's secret and prints the new one, once.
    Rotate {
        /// The token's id.
        id: String,
        /// How long the old secret keeps working (e.g. 1h); none by default.
        #[arg(long, value_parser = duration_arg)]
        grace: Option<Duration>,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Deletes a token's record.
    Delete {
        /// The token's id.
        id: String,
    },
    /// Removes, now, the records revoked or expired for longer than `retention.max_age` (what
    /// `patd serve` does every `retention.interval`); `--set retention.max_age=7d` to choose.
    Purge,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("expiry").required(true).args(["expires_in", "expires_at", "never_expires"])))]
struct CreateArgs {
    /// Who the token acts for.
    #[arg(long)]
    subject: String,
    /// The token's name, unique per subject.
    #[arg(long)]
    name: String,
    /// A scope (repeatable); `*` grants every scope.
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// Expires this long from now (90d, 12h, …).
    #[arg(long, value_parser = duration_arg)]
    expires_in: Option<Duration>,
    /// Expires at this RFC 3339 time.
    #[arg(long, value_parser = time_arg)]
    expires_at: Option<DateTime<Utc>>,
    /// Never expires.
    #[arg(long)]
    never_expires: bool,
    /// Usable only from this network (repeatable; CIDR or address).
    #[arg(long = "ip", value_parser = cidr_arg)]
    ips: Vec<ipnet::IpNet>,
    /// JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| format!("`{s}` {e}"))
}

fn time_arg(s: &str) -> Result<DateTime<Utc>, String> {
    crate::record::parse_time(s).map_err(|e| match e {
        crate::record::TimeError::NotRfc3339 => {
            format!("`{s}` is not an RFC 3339 time (2026-12-31T00:00:00Z)")
        }
        crate::record::TimeError::TooLate => {
            format!("`{s}` is after 9999-12-31T23:59:59Z, the latest time a token may expire")
        }
    })
}

fn cidr_arg(s: &str) -> Result<ipnet::IpNet, String> {
    crate::record::parse_ip_net(s).map_err(|_| format!("`{s}` is not a CIDR network or an address"))
}

/// A failure and its exit code.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn input(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: message.into(),
        }
    }

    fn runtime(message: impl Into<String>) -> Self {
        Self {
            code: 1,
            message: message.into(),
        }
    }

    fn store(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => Self::input("no token with this id"),
            StoreError::Revoked => Self::input("the token is revoked"),
            StoreError::Conflict { field } => Self::input(format!(
                "conflict: another token has this {field} (a subject's token names are unique)"
            )),
            StoreError::Stale => {
                Self::runtime("the token changed meanwhile: run the command again")
            }
            e => Self::runtime(format!("store error: {e}")),
        }
    }
}

/// Runs `patd` with the process's arguments and environment.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    run(cli)
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    if let Some(warning) = secret_on_command_line(&cli) {
        eprintln!("patd: warning: {warning}");
    }
    let config = match load_config(&cli) {
        Ok(c) => c,
        Err(message) => return fail(Failure::input(message)),
    };
    if let Command::Config(ConfigCommand::Check) = &cli.command {
        for warning in config.shadow_warnings() {
            eprintln!("patd: warning: route rules: {warning}");
        }
        print!("{}", config.to_redacted_toml());
        return ExitCode::SUCCESS;
    }
    init_logging(config.log_format, matches!(cli.command, Command::Serve(_)));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(Failure::runtime(format!("cannot start the runtime: {e}"))),
    };
    match runtime.block_on(execute(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => fail(f),
    }
}

/// A warning when the command line carries a secret (a pepper, a store URL's password or
/// query): every local user can read a process's arguments, for as long as it runs.
fn secret_on_command_line(cli: &Cli) -> Option<String> {
    let store_secret = |url: &str| super::config::redacted_url(url) != url;
    let given = cli.store.as_deref().is_some_and(store_secret)
        || cli.sets.iter().any(|set| {
            let (key, value) = set.split_once('=').unwrap_or((set, ""));
            match key.trim() {
                "pepper" | "previous_peppers" => true,
                "store" => store_secret(value.trim().trim_matches(['"', '\''])),
                // Not a key (perhaps a secret given without its key), or a misspelt secret key.
                key => !super::config::is_key_path(key) || super::config::might_be_secret(key),
            }
        });
    given.then(|| {
        "a secret on the command line (--store with a password, --set pepper) is readable by \
         every local user while patd runs; use PATD_STORE, PATD_PEPPER or the configuration \
         file"
            .to_owned()
    })
}

fn fail(f: Failure) -> ExitCode {
    eprintln!("patd: {}", f.message);
    ExitCode::from(f.code)
}

fn load_config(cli: &Cli) -> Result<Config, String> {
    let mut sets = Vec::new();
    if let Some(store) = &cli.store {
        sets.push(format!("store={}", toml_string(store)));
    }
    if let Command::Serve(args) = &cli.command {
        for (key, value) in [
            ("listen", &args.listen),
            ("admin_listen", &args.admin_listen),
            ("log_format", &args.log_format),
        ] {
            if let Some(v) = value {
                sets.push(format!("{key}={}", toml_string(v)));
            }
        }
    }
    sets.extend(cli.sets.iter().cloned());
    Config::load(cli.config.as_deref(), super::config::patd_env(), &sets).map_err(|e| e.0)
}

/// `value` as a TOML string literal, so that a flag's value is never read as another type.
fn toml_string(value: &str) -> String {
    toml::Value::String(value.to_owned()).to_string()
}

fn init_logging(format: LogFormat, serving: bool) {
    use tracing_subscriber::EnvFilter;
    // One info line per refused request (the gate's) and per management change.
    let default = if serving { "info" } else { "warn" };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(default))
        // sqlx's URL parser logs a query parameter it does not read with its value, which may be
        // a secret; `StoreUrl` refuses those, and this keeps any it missed out of the log,
        // whatever `RUST_LOG` says (the more specific directive wins).
        .add_directive(
            "sqlx_postgres::options::parse=off"
                .parse()
                .expect("a valid directive"),
        );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        _ => builder.try_init(),
    };
}

async fn execute(command: Command, config: Config) -> Result<(), Failure> {
    if let Command::Serve(_) = command {
        return serve::serve(config, |listen, admin| {
            // On stdout, for scripts and tests that started it on port 0.
            println!("patd listening on http://{listen}");
            if let Some(admin) = admin {
                println!("patd management API on http://{admin}");
            }
            let _ = std::io::stdout().flush();
        })
        .await
        .map_err(Failure::runtime);
    }
    let store = serve::open_store(&config).await.map_err(Failure::runtime)?;
    let tokens = serve::tokens(&config, store).map_err(Failure::input)?;
    let mut out = std::io::stdout().lock();
    let result = match command {
        Command::Migrate => {
            let _ = writeln!(out, "the store {} is migrated", config.store);
            Ok(())
        }
        Command::Token(TokenCommand::Purge) => purge(&config, &tokens, &mut out).await,
        Command::Token(cmd) => token(cmd, &tokens, &mut out).await,
        Command::Serve(_) | Command::Config(_) => Ok(()),
    };
    let _ = out.flush();
    result
}

/// `patd token purge`: one retention pass with the configuration's `[retention]`.
async fn purge(config: &Config, tokens: &Tokens, out: &mut impl Write) -> Result<(), Failure> {
    let retention = tokens.retention((&config.retention).into()).build();
    match retention.run_once().await.map_err(Failure::store)? {
        Some(report) => {
            let _ = writeln!(
                out,
                "purged {} tokens revoked or expired before {}",
                report.count,
                report
                    .cutoff
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            );
        }
        None => {
            let _ = writeln!(
                out,
                "retention is off (retention.max_age = 0): nothing purged"
            );
        }
    }
    Ok(())
}

async fn token(cmd: TokenCommand, tokens: &Tokens, out: &mut impl Write) -> Result<(), Failure> {
    let now = crate::record::now();
    match cmd {
        TokenCommand::Create(args) => {
            let subject = text_arg("--subject", &args.subject)?;
            let name = text_arg("--name", &args.name)?;
            let scopes = ScopeSet::parse(&args.scopes)
                .map_err(|e| Failure::input(format!("--scope: {e}")))?;
            let mut new = NewToken::new(subject, name)
                .scope_set(scopes)
                .ip_restriction(args.ips);
            let expires_at = match (args.expires_in, args.expires_at) {
                (Some(d), _) => match crate::record::after(now, d) {
                    at if at == crate::record::latest() => {
                        return Err(Failure::input(format!(
                            "--expires-in is too long: it reaches past {}",
                            crate::record::latest()
                                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                        )));
                    }
                    at => Some(at),
                },
                (None, Some(at)) if at <= now => {
                    return Err(Failure::input("--expires-at is in the past"));
                }
                (None, at) => at,
            };
            if let Some(at) = expires_at {
                new = new.expires_at(at);
            }
            let (record, secret) = tokens.issue(new).await.map_err(Failure::store)?;
            print_secret(out, &record, secret.expose_secret(), args.json, now);
            Ok(())
        }
        TokenCommand::List { subject, json } => {
            let mut query = match subject {
                Some(s) => ListQuery::for_subject(s),
                None => ListQuery::default(),
            };
            let mut views = Vec::new();
            loop {
                query = query.limit(500);
                let page = tokens.list(&query).await.map_err(Failure::store)?;
                let n = page.items.len() as u64;
                views.extend(page.items.iter().map(|r| TokenView::new(r, now)));
                if n == 0 || views.len() as u64 >= page.total {
                    break;
                }
                query = query.offset(views.len() as u64);
            }
            if json {
                let _ = writeln!(out, "{}", to_json(&views));
            } else {
                print_table(out, &views);
            }
            Ok(())
        }
        TokenCommand::Show { id, json } => {
            let record = tokens
                .get(&id)
                .await
                .map_err(Failure::store)?
                .ok_or_else(|| Failure::input(format!("no token with id {id}")))?;
            let view = TokenView::new(&record, now);
            if json {
                let _ = writeln!(out, "{}", to_json(&view));
            } else {
                print_view(out, &view);
            }
            Ok(())
        }
        TokenCommand::Revoke { id } => {
            let record = tokens
                .revoke(&id)
                .await
                .map_err(Failure::store)?
                .ok_or_else(|| Failure::input(format!("no token with id {id}")))?;
            let _ = writeln!(out, "revoked {} ({})", record.id, record.name);
            Ok(())
        }
        TokenCommand::Rotate { id, grace, json } => {
            let record = tokens
                .get(&id)
                .await
                .map_err(Failure::store)?
                .ok_or_else(|| Failure::input(format!("no token with id {id}")))?;
            if record.is_expired_at(now) {
                return Err(Failure::input(
                    "the token has expired: issue a new one instead of rotating it",
                ));
            }
            let (record, secret) = tokens
                .rotate(&id, grace.unwrap_or_default())
                .await
                .map_err(|e| match e {
                    StoreError::NotFound => Failure::input(format!("no token with id {id}")),
                    e => Failure::store(e),
                })?;
            print_secret(out, &record, secret.expose_secret(), json, now);
            Ok(())
        }
        TokenCommand::Delete { id } => {
            let record = tokens
                .delete(&id)
                .await
                .map_err(Failure::store)?
                .ok_or_else(|| Failure::input(format!("no token with id {id}")))?;
            let _ = writeln!(out, "deleted {} ({})", record.id, record.name);
            Ok(())
        }
        // Handled by `purge`, which needs the configuration.
        TokenCommand::Purge => Ok(()),
    }
}

/// A subject or name, under the management API's rule ([`crate::record::label`]).
fn text_arg(flag: &str, value: &str) -> Result<String, Failure> {
    crate::record::label(value, crate::record::MAX_NAME_CHARS)
        .map(str::to_owned)
        .map_err(|problem| Failure::input(format!("{flag} {problem}")))
}

fn to_json(value: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| "null".to_owned())
}

fn print_secret(
    out: &mut impl Write,
    record: &TokenRecord,
    secret: &str,
    json: bool,
    now: DateTime<Utc>,
) {
    if json {
        #[derive(serde::Serialize)]
        struct Issued<'a> {
            #[serde(flatten)]
            view: TokenView,
            token: &'a str,
        }
        let issued = Issued {
            view: TokenView::new(record, now),
            token: secret,
        };
        let _ = writeln!(out, "{}", to_json(&issued));
    } else {
        let _ = writeln!(out, "{secret}");
        let view = TokenView::new(record, now);
        let _ = writeln!(
            out,
            "# id {}, subject {}, expires {}: the secret above is shown this once",
            view.id,
            view.subject,
            view.expires_at
                .map_or_else(|| "never".to_owned(), |t| t.to_rfc3339())
        );
    }
}

fn state(view: &TokenView) -> &'static str {
    if view.revoked {
        "revoked"
    } else if view.disabled {
        "disabled"
    } else if view.active {
        "active"
    } else {
        "expired"
    }
}

fn print_table(out: &mut impl Write, views: &[TokenView]) {
    let rows: Vec<[String; 7]> = views
        .iter()
        .map(|v| {
            [
                v.id.clone(),
                v.name.clone(),
                v.subject.clone(),
                v.scopes.to_space_separated(),
                v.expires_at.map_or_else(
                    || "never".to_owned(),
                    |t| t.format("%Y-%m-%d %H:%M").to_string(),
                ),
                v.last_used_at.map_or_else(
                    || "never".to_owned(),
                    |t| t.format("%Y-%m-%d %H:%M").to_string(),
                ),
                state(v).to_owned(),
            ]
        })
        .collect();
    let header = [
        "ID",
        "NAME",
        "SUBJECT",
        "SCOPES",
        "EXPIRES",
        "LAST USED",
        "STATE",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let _ = writeln!(out, "{}", line(header.to_vec()));
    for row in &rows {
        let _ = writeln!(out, "{}", line(row.iter().map(String::as_str).collect()));
    }
}

fn print_view(out: &mut impl Write, v: &TokenView) {
    let time = |t: Option<DateTime<Utc>>| t.map_or_else(|| "never".to_owned(), |t| t.to_rfc3339());
    let ips: Vec<String> = v.ip_restriction.iter().map(ToString::to_string).collect();
    for (k, val) in [
        ("id", v.id.clone()),
        ("name", v.name.clone()),
        ("subject", v.subject.clone()),
        ("start", v.start.clone()),
        ("scopes", v.scopes.to_space_separated()),
        ("ip restriction", ips.join(" ")),
        ("created", v.created_at.to_rfc3339()),
        ("expires", time(v.expires_at)),
        ("last used", time(v.last_used_at)),
        ("last rotated", time(v.last_rotated_at)),
        ("state", state(v).to_owned()),
    ] {
        let _ = writeln!(out, "{k:<15}{val}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("patd").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn debug_hides_the_store_password_and_every_set_value() {
        let cli = parse(&[
            "--store",
            "postgres://app:hunter2-pw@db/pat",
            "--set",
            "pepper=0123456789abcdef-s3cret",
            "--set",
            "store=postgres://u:Zm9v/YmFy@db/pat",
            "config",
            "check",
        ]);
        let shown = format!("{cli:?}");
        for secret in ["hunter2", "s3cret", "Zm9v", "YmFy"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("pepper=<redacted>"), "{shown}");
        // A secret given without its key, or under an environment variable's name.
        for misplaced in [
            "postgres://app:pw-s3cret@db/pat?sslmode=require",
            "PATD_PEPPER=s3cret-0123456789",
        ] {
            let shown = format!("{:?}", parse(&["--set", misplaced, "config", "check"]));
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(secret_on_command_line(&parse(&["--set", misplaced, "migrate"])).is_some());
        }
        assert!(
            shown.contains("postgres://app:<redacted>@db/pat"),
            "{shown}"
        );
    }

    #[test]
    fn a_secret_on_the_command_line_is_warned_about() {
        for args in [
            &["--store", "postgres://app:pw@db/pat", "migrate"][..],
            &["--set", "pepper=0123456789abcdef", "migrate"][..],
            &[
                "--set",
                "previous_peppers=[\"0123456789abcdef\"]",
                "migrate",
            ][..],
            &["--set", "store=\"postgres://db/pat?password=x\"", "migrate"][..],
        ] {
            assert!(secret_on_command_line(&parse(args)).is_some(), "{args:?}");
        }
        for args in [
            &["--store", "postgres://app@db/pat", "migrate"][..],
            &["--store", "sqlite:./patd.db", "migrate"][..],
            &["--set", "cache.ttl=5m", "migrate"][..],
        ] {
            assert!(secret_on_command_line(&parse(args)).is_none(), "{args:?}");
        }
    }
}
