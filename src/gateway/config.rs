//! `patd`'s configuration: `patd.toml`, every key overridable by a `PATD_*` environment variable
//! and by `--set key=value`.
//!
//! Every value is checked while the file is read, so that a bad one is refused with the file, its
//! line and its key (or the variable or flag that set it); an unknown key is refused the same way.
//! With no file at all, the defaults run the embedded default: SQLite in `./patd.db`, listening on
//! `127.0.0.1:8080`.
//!
//! ```toml
//! store = "sqlite:./patd.db"          # or "postgres://user:password@host/db"
//! listen = "127.0.0.1:8080"           # forward-auth, health, metrics (and the management API)
//! admin_listen = "127.0.0.1:8081"     # optional: the management API on its own address
//! ext_authz_listen = "127.0.0.1:9191" # optional: Envoy ext_authz (gRPC), feature `ext-authz`
//! realm = "patd"
//! log_format = "text"                 # or "json"
//! max_connections = 4096             # per listener
//! max_connections_per_client = 256    # once a listener is half full; an IPv6 /64 is one client
//!                                     # (a /56 may hold twice as many, a /48 four times)
//!
//! [forward_auth]
//! original_headers = "forwarded"      # X-Forwarded-Method/-Uri (Traefik, Caddy); "original" for nginx
//! nginx_compat = false
//!
//! [proxy]
//! trusted = ["10.0.0.0/8"]            # peers whose forwarded header is believed; none by default
//! header = "x-forwarded-for"          # or "forwarded", "x-real-ip"
//!
//! [retention]
//! max_age = "30d"                     # revoked and expired records removed after this; 0 keeps all
//! interval = "1h"
//!
//! [expiry_notices]                    # off by default: patd has no webhook; each notice is a log line
//! enabled = false
//! lead = "7d"                         # personalAccessToken.expiring this long before the expiry
//! interval = "15m"
//! [reuse]                             # a rotated-out secret presented after its grace period:
//! policy = "revoke_family"            # "off" (default), "report" (logged), or also revoke the token
//!
//! [[rule]]
//! path_prefix = "/admin"
//! methods = ["POST"]
//! scopes = ["admin:write"]
//!
//! [[rule]]
//! path_prefix = "/public"
//! anonymous = true
//!
//! [default_rule]
//! scopes = []
//!
//! [leak_reports]                      # GitHub secret scanning reports at
//!                                     # /personal-access-tokens/leak-reports; off without keys
//! keys = { "90a421169f0a406205f1563a953312f0be898d3c7b6c06b681aa86a874555f4a" = "/etc/patd/github-1.pem" }
//! max_entries = 1000                  # a longer report is a 400
//! max_body_bytes = 1048576            # a larger body is a 413
//! body_timeout = "10s"                # a slower body is a 408
//! ```
//!
//! Environment variables: `PATD_` and the key in capitals, with `__` between a table and its key:
//! `PATD_STORE`, `PATD_ADMIN_LISTEN`, `PATD_CACHE__TTL`, `PATD_PROXY__TRUSTED='["10.0.0.0/8"]'`.
//! A value is read as TOML when it parses as one (`true`, `64`, `["a"]`), else as a string.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ForwardedHeader;
use crate::scope::ScopeSet;

/// A configuration that could not be read: the message names the file and line, or the variable
/// or flag, and the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// The whole configuration. See the [module docs](self) for the file format.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct Config {
    /// The store: `sqlite:PATH` or a `postgres://` URL.
    pub store: StoreUrl,
    /// Where the forward-auth endpoint, `/healthz`, `/readyz` and `/metrics` listen (and the
    /// management API, without `admin_listen`).
    pub listen: SocketAddr,
    /// Where the management API listens instead, if set.
    pub admin_listen: Option<SocketAddr>,
    /// Where Envoy's ext_authz service (`envoy.service.auth.v3.Authorization/Check`, gRPC over
    /// HTTP/2 without TLS) listens, if set: the same layer and route rules as `/auth`. Needs a
    /// `patd` built with the `ext-authz` feature; without it, setting this stops `patd serve`.
    pub ext_authz_listen: Option<SocketAddr>,
    /// The realm of `WWW-Authenticate` challenges.
    pub realm: String,
    /// The token prefix (default `pat_`).
    pub token_prefix: Option<String>,
    /// A pepper: token hashes are HMAC-SHA-256 under it. A secret: never printed.
    pub pepper: Option<Secret>,
    /// Peppers used before, still accepted for lookups. Secrets.
    pub previous_peppers: Vec<Secret>,
    /// `text` or `json` log lines.
    pub log_format: LogFormat,
    /// How long a shutdown waits for requests in flight.
    pub shutdown_timeout: Dur,
    /// How many connections each listener serves at once (default
    /// [`MAX_CONNECTIONS`](crate::gateway::serve::MAX_CONNECTIONS), 4 096); more wait in the
    /// kernel's backlog. Each is an open file: `patd serve` raises its soft open-file limit to the
    /// hard one, and where even that cannot hold every listener's connections (256 files kept
    /// for the store and the rest), each listener serves fewer, with a warning.
    pub max_connections: std::num::NonZeroU32,
    /// How many connections one client may hold on a listener while at least half of its
    /// `max_connections` are taken (default 256, at most a quarter of `max_connections`; 0 for
    /// no limit): one more is then closed at once, so that one client cannot take every slot. A client is an IPv4 address or an IPv6
    /// /64 (what one host is usually given); an IPv6 /56 may hold twice the limit, and a /48
    /// four times, at most half the slots (a site is given one of those, and a tunnel broker
    /// hands out a /48 free). The trusted proxies (`[proxy] trusted`) are not
    /// limited: every request through them comes from them. Behind a load balancer that replaces
    /// the client's address, every client is that address: set 0 there.
    pub max_connections_per_client: usize,
    /// Whether `/metrics` is served.
    pub metrics: bool,
    /// The forward-auth contract.
    pub forward_auth: ForwardAuthConfig,
    /// Trusted proxies.
    pub proxy: ProxyConfig,
    /// Where tokens are read from, besides `Authorization: Bearer`.
    pub sources: SourcesConfig,
    /// The token cache.
    pub cache: CacheSection,
    /// lastUsedAt tracking.
    pub usage: UsageSection,
    /// Removal of old revoked and expired records.
    pub retention: RetentionSection,
    /// Expiry notices (off by default).
    pub expiry_notices: ExpiryNoticesSection,
    /// The failure limit, off unless `max_failures` is set.
    pub failure_limit: FailureLimitSection,
    /// Rotation reuse detection, off by default.
    pub reuse: ReuseSection,
    /// The management API's expiry policy.
    pub expiry: ExpirySection,
    /// The names of the identity headers.
    pub identity_headers: IdentitySection,
    /// Route rules, first match wins (`[[rule]]`).
    pub rule: Vec<RuleConfig>,
    /// The rule for requests no rule matches.
    pub default_rule: DefaultRuleConfig,
    /// Leaked-token reports from GitHub secret scanning.
    pub leak_reports: LeakReportsSection,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            store: StoreUrl::Sqlite(PathBuf::from("./patd.db")),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: None,
            ext_authz_listen: None,
            realm: "patd".to_owned(),
            token_prefix: None,
            pepper: None,
            previous_peppers: Vec::new(),
            log_format: LogFormat::Text,
            shutdown_timeout: Dur(Duration::from_secs(10)),
            max_connections: u32::try_from(super::serve::MAX_CONNECTIONS)
                .ok()
                .and_then(std::num::NonZeroU32::new)
                .unwrap_or(std::num::NonZeroU32::MIN),
            max_connections_per_client: 256,
            metrics: true,
            forward_auth: ForwardAuthConfig::default(),
            proxy: ProxyConfig::default(),
            sources: SourcesConfig::default(),
            cache: CacheSection::default(),
            usage: UsageSection::default(),
            retention: RetentionSection::default(),
            expiry_notices: ExpiryNoticesSection::default(),
            failure_limit: FailureLimitSection::default(),
            reuse: ReuseSection::default(),
            expiry: ExpirySection::default(),
            identity_headers: IdentitySection::default(),
            rule: Vec::new(),
            default_rule: DefaultRuleConfig::default(),
            leak_reports: LeakReportsSection::default(),
        }
    }
}

/// `[forward_auth]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct ForwardAuthConfig {
    /// `forwarded` (X-Forwarded-Method/-Uri: Traefik, Caddy) or `original` (X-Original-Method/-URI:
    /// nginx).
    pub original_headers: OriginalHeaders,
    /// Refusals other than 401/403 become 403 with `X-Auth-Status` (for nginx's `auth_request`).
    pub nginx_compat: bool,
}

/// Which headers carry the original request (see
/// [`OriginalRequestHeaders`](super::forward_auth::OriginalRequestHeaders)).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum OriginalHeaders {
    /// `X-Forwarded-Method` and `X-Forwarded-Uri`.
    #[default]
    Forwarded,
    /// `X-Original-Method` and `X-Original-URI`.
    Original,
}

/// `[proxy]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct ProxyConfig {
    /// Networks of the proxies whose forwarded header is believed.
    pub trusted: Vec<Cidr>,
    /// The header they put the client address in.
    pub header: ForwardedHeaderName,
}

/// A forwarded header's name in the configuration.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ForwardedHeaderName {
    /// `X-Forwarded-For`.
    #[default]
    XForwardedFor,
    /// `Forwarded` (RFC 7239).
    Forwarded,
    /// `X-Real-IP`.
    XRealIp,
}

impl From<ForwardedHeaderName> for ForwardedHeader {
    fn from(h: ForwardedHeaderName) -> Self {
        match h {
            ForwardedHeaderName::XForwardedFor => Self::XForwardedFor,
            ForwardedHeaderName::Forwarded => Self::Forwarded,
            ForwardedHeaderName::XRealIp => Self::XRealIp,
        }
    }
}

/// `[sources]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct SourcesConfig {
    /// `Authorization: Token …`.
    pub token_scheme: bool,
    /// A bare token as the whole `Authorization` value.
    pub raw_authorization: bool,
    /// Headers that carry a bare token (`x-api-key`).
    pub headers: Vec<HeaderNameValue>,
    /// The `access_token` query parameter.
    pub query: bool,
}

/// `[cache]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct CacheSection {
    /// How long an entry serves before it is refreshed.
    pub ttl: Dur,
    /// How long past the TTL an entry serves while the store fails (feed connected).
    pub stale_if_error: Dur,
    /// How long an unknown, revoked or expired token is remembered.
    pub negative_ttl: Dur,
    /// Store lookups at once.
    pub max_concurrent_lookups: usize,
    /// How long a store query of a lookup may take before it counts as a store failure (503):
    /// [`CacheConfig::lookup_timeout`](crate::CacheConfig::lookup_timeout).
    pub lookup_timeout: Dur,
}

impl Default for CacheSection {
    fn default() -> Self {
        let c = crate::CacheConfig::default();
        Self {
            ttl: Dur(c.ttl),
            stale_if_error: Dur(c.stale_if_error),
            negative_ttl: Dur(c.negative_ttl),
            max_concurrent_lookups: c.max_concurrent_lookups,
            lookup_timeout: Dur(c.lookup_timeout),
        }
    }
}

/// `[usage]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct UsageSection {
    /// Whether lastUsedAt is recorded.
    pub enabled: bool,
    /// At most one mark per token per this long.
    pub granularity: Dur,
    /// How often marks are written.
    pub flush_interval: Dur,
}

impl Default for UsageSection {
    fn default() -> Self {
        let u = crate::UsageConfig::default();
        Self {
            enabled: true,
            granularity: Dur(u.granularity),
            flush_interval: Dur(u.flush_interval),
        }
    }
}

/// `[retention]`: revoked and expired records are removed once they have been so for longer
/// than `max_age` (see [`crate::retention`]).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct RetentionSection {
    /// How long a revoked or expired record is kept; `0` keeps every record forever. Default
    /// 30 days.
    pub max_age: Dur,
    /// How often the removal runs (the first run starts with `patd serve`). Default 1 hour.
    pub interval: Dur,
    /// Records removed per statement. Default 500.
    pub batch_size: usize,
}

impl Default for RetentionSection {
    fn default() -> Self {
        let r = crate::RetentionConfig::default();
        Self {
            max_age: Dur(r.max_age),
            interval: Dur(r.interval),
            batch_size: r.batch_size,
        }
    }
}

impl From<&RetentionSection> for crate::RetentionConfig {
    fn from(s: &RetentionSection) -> Self {
        Self::default()
            .max_age(s.max_age.0)
            .interval(s.interval.0)
            .batch_size(s.batch_size)
    }
}

/// `[expiry_notices]`: `personalAccessToken.expiring` once per token `lead` before its expiry
/// and `personalAccessToken.expired` once it has expired (see [`crate::notices`]).
///
/// Off by default: `patd` has no webhook, so a notice is one log line (target
/// `tower_pat::notices`, with the token's id, subject, name and expiry; never a secret). The
/// notices are claimed in the store, once for every process that shares it: enable them here
/// only if no other server on the same store (a library server with a webhook) sends them.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct ExpiryNoticesSection {
    /// Whether `patd serve` runs the notice task. Default `false`.
    pub enabled: bool,
    /// How long before its expiry a token gets its `expiring` notice; `0` sends none. Default 7
    /// days.
    pub lead: Dur,
    /// How often the task runs (the first run starts with `patd serve`). Default 15 minutes.
    pub interval: Dur,
    /// Tokens claimed per statement. Default 100.
    pub batch_size: usize,
}

impl Default for ExpiryNoticesSection {
    fn default() -> Self {
        let n = crate::ExpiryNoticeConfig::default();
        Self {
            enabled: false,
            lead: Dur(n.lead),
            interval: Dur(n.interval),
            batch_size: n.batch_size,
        }
    }
}

impl From<&ExpiryNoticesSection> for crate::ExpiryNoticeConfig {
    fn from(s: &ExpiryNoticesSection) -> Self {
        Self::default()
            .enabled(s.enabled)
            .lead(s.lead.0)
            .interval(s.interval.0)
            .batch_size(s.batch_size)
    }
}

/// `[failure_limit]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct FailureLimitSection {
    /// Failed tokens per client network within `window` before 429; unset: no limit.
    pub max_failures: Option<u32>,
    /// The window.
    pub window: Dur,
}

impl Default for FailureLimitSection {
    fn default() -> Self {
        Self {
            max_failures: None,
            window: Dur(Duration::from_secs(60)),
        }
    }
}

/// `[reuse]`: what `patd` does when a secret that a rotation replaced is presented after its
/// grace period (see [`crate::reuse`]). The request is refused as any unknown token either way.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct ReuseSection {
    /// `off` (default: the history is never read), `report` (a warning naming the token and the
    /// client address) or `revoke_family` (the warning, and the token is revoked on every node;
    /// anyone holding a rotated-out secret can then revoke its token, see
    /// [`ReusePolicy::RevokeFamily`](crate::ReusePolicy::RevokeFamily)).
    pub policy: ReuseMode,
}

/// The `policy` of [`ReuseSection`].
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ReuseMode {
    /// No detection.
    #[default]
    Off,
    /// Log each reuse (target `tower_pat::auth`, warn).
    Report,
    /// Log it and revoke the token the secret was rotated into.
    RevokeFamily,
}

/// `[expiry]`: the management API's policy.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct ExpirySection {
    /// A token created without `expiresAt` gets this lifetime; unset: `expiresAt` or
    /// `userAwareTokenNeverExpires` is required.
    pub default_lifetime: Option<Dur>,
    /// The longest lifetime a token may be given.
    pub max_lifetime: Option<Dur>,
}

/// `[leak_reports]`: the endpoint `POST /personal-access-tokens/leak-reports` that takes GitHub
/// secret scanning reports and revokes the tokens they name (see
/// [`LeakReports`](crate::admin::LeakReports)). Off unless `keys` names a key.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct LeakReportsSection {
    /// The public keys reports may be signed with: each key identifier (the
    /// `GITHUB-PUBLIC-KEY-IDENTIFIER` value) and the PEM file of its key, as GitHub publishes them
    /// at `https://api.github.com/meta/public_keys/secret_scanning`. Read when the configuration
    /// is loaded; nothing is fetched at run time.
    pub keys: BTreeMap<String, PathBuf>,
    /// The most entries one report may have (default 1000).
    pub max_entries: Option<usize>,
    /// The largest report body, in bytes (default 1 MiB).
    pub max_body_bytes: Option<usize>,
    /// How long a report's body may take to arrive (default 10 s; a slower one is a 408).
    pub body_timeout: Option<Dur>,
}

impl LeakReportsSection {
    /// The endpoint's configuration, `None` without keys.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the key when its file cannot be read or is not an ECDSA P-256
    /// public key in PEM.
    pub fn build(&self) -> Result<Option<crate::admin::LeakReports>, ConfigError> {
        if self.keys.is_empty() {
            return Ok(None);
        }
        let mut reports = crate::admin::LeakReports::new();
        for (id, path) in &self.keys {
            let pem = std::fs::read_to_string(path).map_err(|e| {
                ConfigError(format!(
                    "leak_reports.keys.{id}: {} cannot be read: {e}",
                    path.display()
                ))
            })?;
            reports = reports.public_key(id.as_str(), &pem).map_err(|e| {
                ConfigError(format!("leak_reports.keys.{id}: {}: {e}", path.display()))
            })?;
        }
        if let Some(max) = self.max_entries {
            reports = reports.max_entries(max);
        }
        if let Some(max) = self.max_body_bytes {
            reports = reports.max_body_bytes(max);
        }
        if let Some(timeout) = self.body_timeout {
            reports = reports.body_timeout(timeout.0);
        }
        Ok(Some(reports))
    }
}

/// `[identity_headers]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct IdentitySection {
    /// Default `x-auth-subject`.
    pub subject: HeaderNameValue,
    /// Default `x-auth-token-id`.
    pub token_id: HeaderNameValue,
    /// Default `x-auth-token-name`.
    pub token_name: HeaderNameValue,
    /// Default `x-auth-scopes`.
    pub scopes: HeaderNameValue,
}

impl Default for IdentitySection {
    fn default() -> Self {
        let d = super::IdentityHeaders::default();
        Self {
            subject: HeaderNameValue(d.subject),
            token_id: HeaderNameValue(d.token_id),
            token_name: HeaderNameValue(d.token_name),
            scopes: HeaderNameValue(d.scopes),
        }
    }
}

impl From<&IdentitySection> for super::IdentityHeaders {
    fn from(s: &IdentitySection) -> Self {
        Self {
            subject: s.subject.0.clone(),
            token_id: s.token_id.0.clone(),
            token_name: s.token_name.0.clone(),
            scopes: s.scopes.0.clone(),
        }
    }
}

/// `[[rule]]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RuleConfig {
    /// The path prefix (whole segments).
    pub path_prefix: PathPrefix,
    /// Methods; empty or absent for all.
    #[serde(default)]
    pub methods: Vec<MethodValue>,
    /// Scopes a token needs.
    #[serde(default)]
    pub scopes: Scopes,
    /// Requests without a token pass.
    #[serde(default)]
    pub anonymous: bool,
}

/// `[default_rule]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct DefaultRuleConfig {
    /// Scopes a token needs.
    pub scopes: Scopes,
    /// Requests without a token pass.
    pub anonymous: bool,
}

impl Config {
    /// A warning for each rule an earlier one takes some requests from, but not all (a rule that
    /// never matches is refused by [`load`](Self::load)): each names both rules by number,
    /// counted from 1, and prefix, and the methods. A CORS preflight rule first (`/` for
    /// `OPTIONS`, anonymous) is such a shadow of every later rule, and may well be meant.
    pub fn shadow_warnings(&self) -> Vec<String> {
        self.route_rules()
            .shadows()
            .into_iter()
            .map(|s| {
                let methods = if s.methods.is_empty() {
                    "every method it applies to".to_owned()
                } else {
                    let methods: Vec<&str> = s.methods.iter().map(http::Method::as_str).collect();
                    methods.join(", ")
                };
                let case = if s.case_only {
                    " when the upstream ignores case"
                } else {
                    ""
                };
                format!(
                    "{} comes first and takes the requests of {} for {methods}{case} (first \
                     match wins; rules counted from 1): put the narrower rule first if that is \
                     not meant",
                    self.rule_name(s.earlier),
                    self.rule_name(s.later),
                )
            })
            .collect()
    }

    /// The rule at `index` as messages name it: `[[rule]] N (prefix)`, counted from 1.
    fn rule_name(&self, index: usize) -> String {
        format!("[[rule]] {} ({})", index + 1, self.rule[index].path_prefix)
    }

    /// The route rules.
    pub fn route_rules(&self) -> super::rules::RouteRules {
        use super::rules::{RouteRule, RouteRules};
        RouteRules::new(
            self.rule
                .iter()
                .map(|r| RouteRule {
                    path_prefix: r.path_prefix.0.clone(),
                    methods: r.methods.iter().map(|m| m.0.clone()).collect(),
                    scopes: r.scopes.0.clone(),
                    anonymous: r.anonymous,
                })
                .collect(),
        )
        .default_rule(RouteRule {
            scopes: self.default_rule.scopes.0.clone(),
            anonymous: self.default_rule.anonymous,
            ..RouteRule::new("/")
        })
    }

    /// Reads the configuration: `path` (`None`: `./patd.toml` if it exists, else the defaults),
    /// then the `PATD_*` variables of `env`, then the `--set` overrides of `sets`
    /// (`key.path=value`), each later one winning.
    ///
    /// An error never shows a secret: the values of the keys that hold secrets (`pepper`,
    /// `previous_peppers`, the password and query of `store`) are replaced by `<redacted>`
    /// wherever the message would quote them, a `--set` of such a key included; an error in the
    /// file names its line, column and key but never quotes the line, which may hold a secret
    /// in a place no key says (a pepper below a `[table]` header, a misspelt `peper`).
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        sets: &[String],
    ) -> Result<Self, ConfigError> {
        let mut secrets = Vec::new();
        Self::load_collecting(path, env, sets, &mut secrets)
            .map_err(|ConfigError(message)| ConfigError(scrub(message, &secrets)))
    }

    /// [`load`](Self::load), noting in `secrets` every secret value met on the way.
    fn load_collecting(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        sets: &[String],
        secrets: &mut Vec<String>,
    ) -> Result<Self, ConfigError> {
        let (text, file) = match path {
            Some(path) => (
                std::fs::read_to_string(path)
                    .map_err(|e| ConfigError(format!("{}: cannot be read: {e}", path.display())))?,
                path.display().to_string(),
            ),
            None => match std::fs::read_to_string("patd.toml") {
                Ok(text) => (text, "patd.toml".to_owned()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    (String::new(), "(no file)".to_owned())
                }
                Err(e) => return Err(ConfigError(format!("patd.toml: cannot be read: {e}"))),
            },
        };
        // No error about the file quotes a line of it (see `file_error`).
        let mut table = text
            .parse::<toml::Table>()
            .map_err(|e| file_error(&file, &text, &e, "not valid TOML"))?;
        for key in SECRET_KEYS {
            if let Some(value) = table.get(*key) {
                note_secrets(key, value, secrets);
            }
        }
        // The file alone first, so that its errors name its lines.
        let mut config =
            toml::from_str::<Config>(&text).map_err(|e| file_error(&file, &text, &e, "error"))?;
        let mut overrides: Vec<(String, String, String)> = env
            .into_iter()
            .filter_map(|(name, value)| {
                let key = name.strip_prefix("PATD_")?;
                if key == "CONFIG" || key.is_empty() {
                    return None;
                }
                Some((
                    name.clone(),
                    key.to_ascii_lowercase().replace("__", "."),
                    value,
                ))
            })
            .collect();
        // Stable order: variables by name.
        overrides.sort();
        for set in sets {
            // Without `=`, the argument could be a misplaced secret: not quoted.
            let (key, value) = set.split_once('=').ok_or_else(|| {
                ConfigError("--set: expected key=value (key.path=value), found no `=`".to_owned())
            })?;
            let key = key.trim();
            let source = if !is_key_path(key) {
                // Not a key: a misplaced secret (`--set postgres://u:pw@h/db`, `--set
                // PATD_PEPPER=…`) must not be quoted, here or in the error about it.
                secrets.extend(secret_pieces(set));
                "--set <redacted>".to_owned()
            } else if SECRET_KEYS.contains(&key) || might_be_secret(key) {
                if !SECRET_KEYS.contains(&key) {
                    secrets.push(value.to_owned());
                }
                format!("--set {key}=<redacted>")
            } else {
                format!("--set {set}")
            };
            overrides.push((source, key.to_owned(), value.to_owned()));
        }
        for (_, key, value) in &overrides {
            if SECRET_KEYS.contains(&key.as_str()) {
                secrets.push(value.clone());
                note_secrets(key, &parse_value(value), secrets);
            }
        }
        for (source, key, value) in overrides {
            insert(&mut table, &key, parse_value(&value))
                .map_err(|why| ConfigError(format!("{source}: {why}")))?;
            config = Config::deserialize(toml::Value::Table(table.clone()))
                .map_err(|e| ConfigError(format!("{source}: key `{key}`: {}", e.message())))?;
        }
        // The key files are checked now: a bad one stops `patd` (and `patd config check`).
        config.leak_reports.build()?;
        // A rule that can never match is a mistake of order, whose requests would all get the
        // earlier rules' (first match wins): refused, naming them. A partial shadow is a warning
        // (`shadow_warnings`), logged when `patd` starts.
        if let Some((later, earlier)) = config.route_rules().never_matching() {
            let earlier: Vec<String> = earlier.iter().map(|&i| config.rule_name(i)).collect();
            let (comes, takes) = if earlier.len() == 1 {
                ("comes", "takes")
            } else {
                ("come", "take")
            };
            return Err(ConfigError(format!(
                "{} never matches: {} {comes} first and {takes} every request it applies to \
                 (first match wins; rules counted from 1): put the narrower rule first, or name \
                 the methods each is for",
                config.rule_name(later),
                earlier.join(" and "),
            )));
        }
        Ok(config)
    }

    /// The configuration as TOML, secrets redacted: what `patd config check` prints.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}

/// The keys whose values are secret, or may hold one (a `store` URL's password).
const SECRET_KEYS: &[&str] = &["pepper", "previous_peppers", "store"];

/// Whether `key` is shaped like a configuration key path (`cache.ttl`, `pepper`,
/// `leak_reports.keys.gh-1`): ASCII letters, digits, `_`, `-` and `.`. Anything else given to
/// `--set` (a URL, a secret without its key) is not quoted anywhere.
pub(super) fn is_key_path(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Whether a key that is not one of the secret ones looks like a misspelling of one, or an
/// environment variable's name for one (`peper`, `stor`, `db_password`, `PATD_PEPPER`): its
/// value is not quoted either. Leak report keys are public keys' file names: quoted.
pub(super) fn might_be_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    !key.starts_with("leak_reports.keys.")
        && ["pep", "stor", "secret", "pass", "key"]
            .iter()
            .any(|part| key.contains(part))
}

/// Notes the secrets of `key`'s `value`: a pepper whole, each previous pepper, a store URL's
/// password and query.
fn note_secrets(key: &str, value: &toml::Value, secrets: &mut Vec<String>) {
    match value {
        toml::Value::String(s) if key == "store" => secrets.extend(url_secrets(s)),
        toml::Value::String(s) => secrets.push(s.clone()),
        toml::Value::Array(items) => {
            for item in items {
                note_secrets(key, item, secrets);
            }
        }
        other => secrets.push(other.to_string()),
    }
}

/// A URL cut where its secrets are: the user info (up to the `@`) and the query.
///
/// A password may hold `/`, `?`, `#` or `@` unencoded, which makes the cut ambiguous: such a URL
/// is [`Ambiguous`](UrlParts::Ambiguous) and shown as its scheme alone. Cutting too little would
/// print part of a password; cutting too much only hides the host.
enum UrlParts<'a> {
    /// One `@` at most, and no `/`, `?` or `#` before it.
    Plain {
        scheme: &'a str,
        user: Option<&'a str>,
        password: Option<&'a str>,
        host_path: &'a str,
        query: Option<&'a str>,
    },
    /// Anything else: everything after the scheme may be secret.
    Ambiguous { scheme: &'a str, rest: &'a str },
}

impl<'a> UrlParts<'a> {
    fn of(url: &'a str) -> Self {
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
        let (userinfo, after) = match rest.split_once('@') {
            Some((userinfo, after)) => (Some(userinfo), after),
            None => (None, rest),
        };
        if after.contains('@') || userinfo.is_some_and(|u| u.contains(['/', '?', '#'])) {
            return Self::Ambiguous { scheme, rest };
        }
        let (user, password) = match userinfo.map(|u| u.split_once(':')) {
            Some(Some((user, password))) => (Some(user), Some(password)),
            Some(None) => (userinfo, None),
            None => (None, None),
        };
        let (host_path, query) = match after.split_once('?') {
            Some((host_path, query)) => (host_path, Some(query)),
            None => (after, None),
        };
        Self::Plain {
            scheme,
            user,
            password,
            host_path,
            query,
        }
    }

    /// The parts that may be secret, and for an ambiguous URL also their pieces between
    /// delimiters (an error may quote a piece of a URL it could not parse).
    fn secrets(&self) -> Vec<String> {
        match self {
            Self::Plain {
                password, query, ..
            } => password
                .iter()
                .chain(query)
                .map(|s| (*s).to_owned())
                .collect(),
            Self::Ambiguous { rest, .. } => secret_pieces(rest).collect(),
        }
    }
}

impl fmt::Display for UrlParts<'_> {
    /// The URL with its password and query replaced by `<redacted>`; an ambiguous one as
    /// `scheme://<redacted>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Plain {
                scheme,
                user,
                password,
                host_path,
                query,
            } => {
                if !scheme.is_empty() {
                    write!(f, "{scheme}://")?;
                }
                if let Some(user) = user {
                    f.write_str(user)?;
                    if password.is_some() {
                        f.write_str(":<redacted>")?;
                    }
                    f.write_str("@")?;
                }
                f.write_str(host_path)?;
                if query.is_some() {
                    f.write_str("?<redacted>")?;
                }
                Ok(())
            }
            Self::Ambiguous { scheme: "", .. } => f.write_str("<redacted>"),
            Self::Ambiguous { scheme, .. } => write!(f, "{scheme}://<redacted>"),
        }
    }
}

/// A string that may be secret whole, and its pieces between the delimiters of URLs and
/// `key=value` pairs: what a message that quotes part of it must not show.
fn secret_pieces(s: &str) -> impl Iterator<Item = String> + '_ {
    std::iter::once(s)
        .chain(s.split(['/', '?', '#', '@', ':', '&', '=']))
        .map(str::to_owned)
}

/// The parts of a URL that may be secret (see [`UrlParts`]).
fn url_secrets(url: &str) -> Vec<String> {
    UrlParts::of(url).secrets()
}

/// `url` with the password of its user info and its query replaced by `<redacted>`.
pub(super) fn redacted_url(url: &str) -> String {
    UrlParts::of(url).to_string()
}

/// An error in `file` (whose text is `text`): `what` (`not valid TOML`), where (line and
/// column), the message and the key it is about, never a line of the file.
///
/// toml's own `Display` quotes the line, and a line may hold a secret the scrubber cannot know:
/// a pepper written below a `[table]` header (which makes it `table.pepper`, an unknown field),
/// under a misspelt key (`peper`, `previous_pepper`), or in a file that is not TOML at all.
fn file_error(file: &str, text: &str, e: &toml::de::Error, what: &str) -> ConfigError {
    let at = e.span().map(|span| {
        let before = text.get(..span.start).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        format!(" at line {line}, column {column}")
    });
    // Without its input, toml's `Display` is the message and the key path (``in `cache.ttl` ``).
    let mut bare = e.clone();
    bare.set_input(None);
    let shown = bare.to_string();
    let shown: Vec<&str> = shown.lines().filter(|l| !l.is_empty()).collect();
    ConfigError(format!(
        "{file}: {what}{}: {}",
        at.unwrap_or_default(),
        shown.join(", ")
    ))
}

/// `message` with every secret of `secrets` replaced by `<redacted>` (those shorter than 4 bytes
/// only where the store URL's own redaction already hides them).
fn scrub(mut message: String, secrets: &[String]) -> String {
    for secret in secrets {
        if secret.len() >= 4 {
            message = message.replace(secret.as_str(), "<redacted>");
        }
    }
    message
}

/// A value from a variable or flag: TOML if it parses as a value, else the string itself.
fn parse_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

/// Sets `key` (`a.b.c`) in `table`, creating tables on the way.
fn insert(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<(), String> {
    let mut parts = key.split('.').peekable();
    let mut current = table;
    while let Some(part) = parts.next() {
        if part.is_empty() {
            return Err(format!("`{key}` is not a key"));
        }
        if parts.peek().is_none() {
            current.insert(part.to_owned(), value);
            return Ok(());
        }
        let next = current
            .entry(part.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = match next {
            toml::Value::Table(t) => t,
            _ => return Err(format!("`{part}` in `{key}` is not a table")),
        };
    }
    Err(format!("`{key}` is not a key"))
}

/// Implements string (de)serialization through `FromStr` and `Display`.
macro_rules! string_value {
    ($ty:ty, $what:literal) => {
        string_value!($ty, $what, |s: &str| s.to_owned());
    };
    // `$shown`: the value as an error may quote it.
    ($ty:ty, $what:literal, $shown:expr) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(|e: String| {
                    serde::de::Error::custom(format!("{}: `{}` {e}", $what, ($shown)(&s)))
                })
            }
        }
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    };
}

/// Where tokens are stored.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreUrl {
    /// `sqlite:PATH`.
    Sqlite(PathBuf),
    /// A `postgres://` or `postgresql://` URL (it may hold a password: printed redacted). Its
    /// query may hold only the parameters the driver reads (`sslmode`, `sslrootcert`, `sslcert`,
    /// `sslkey`, `host`, `port`, `dbname`, `user`, `password`, `application_name`, `options`, …):
    /// the driver would log any other with its value.
    Postgres(String),
}

impl FromStr for StoreUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s
            .strip_prefix("sqlite://")
            .or_else(|| s.strip_prefix("sqlite:"))
        {
            if path.is_empty() {
                return Err("names no file (sqlite:PATH)".to_owned());
            }
            return Ok(Self::Sqlite(PathBuf::from(path)));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            check_postgres_query(s)?;
            return Ok(Self::Postgres(s.to_owned()));
        }
        Err("is not a store: expected sqlite:PATH or postgres://…".to_owned())
    }
}

/// The query parameters sqlx 0.8's PostgreSQL driver reads (`PgConnectOptions`' URL parser,
/// sqlx-postgres `src/options/parse.rs`), besides `options[NAME]`.
const POSTGRES_QUERY_KEYS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// The values of `sslmode` the driver takes (in any letter case).
const SSL_MODES: &[&str] = &[
    "disable",
    "allow",
    "prefer",
    "require",
    "verify-ca",
    "verify-full",
];

/// Refuses a query parameter of a PostgreSQL URL that the driver does not read: sqlx ignores
/// one, but logs it with its value at warn level (`ignoring unrecognized connect parameter`),
/// and the value may be a secret (libpq's `sslpassword`, a misspelt `password`). The error names
/// the key, never the value; a parameter without `=` (perhaps a secret pasted whole) is not
/// named either.
fn check_postgres_query(url: &str) -> Result<(), String> {
    // A URL sqlx cannot parse is refused by it, without logging any part of it.
    let Some(query) = url::Url::parse(url)
        .ok()
        .and_then(|u| u.query().map(str::to_owned))
    else {
        return Ok(());
    };
    // Parsed as sqlx's `Url::query_pairs` does: empty pieces skipped, keys percent-decoded.
    for piece in query.split('&').filter(|p| !p.is_empty()) {
        let Some((key, value)) = form_urlencoded::parse(piece.as_bytes()).next() else {
            continue;
        };
        if POSTGRES_QUERY_KEYS.contains(&&*key) || key.starts_with("options[") {
            // A `?` in a value: most likely a second `?` typed for `&`, which makes the rest
            // (a password, say) part of this value, which the driver quotes when it refuses it.
            if piece.contains('?') {
                return Err(format!(
                    "has a `?` in the value of its query parameter `{key}` (a second `?` where \
                     `&` was meant?)"
                ));
            }
            // The one value the driver quotes when it refuses it, escaped (`{:?}`): refused
            // here first, unquoted (a separator mistyped before a password makes it part of it).
            if matches!(&*key, "sslmode" | "ssl-mode")
                && !SSL_MODES.contains(&&*value.to_ascii_lowercase())
            {
                return Err(format!(
                    "has a query parameter `{key}` that is not one of {}",
                    SSL_MODES.join(", ")
                ));
            }
            continue;
        }
        let named = if piece.contains('=') {
            format!("`{key}`")
        } else {
            "without `=`".to_owned()
        };
        return Err(format!(
            "has a query parameter {named} that the PostgreSQL driver does not read (it reads \
             {}, and options[NAME]); it would log the value",
            POSTGRES_QUERY_KEYS.join(", ")
        ));
    }
    Ok(())
}

impl StoreUrl {
    /// `message`, an error of the store's driver, with the URL's password and every value of its
    /// query replaced by `<redacted>`: whole, in pieces, and percent-decoded. The driver and the
    /// database quote what they could not use (an `sslmode` value, a database or user name), and
    /// a mistyped URL puts a secret in such a value: `?sslmode=require?password=…`.
    pub fn scrub(&self, message: String) -> String {
        let Self::Postgres(url) = self else {
            return message;
        };
        let mut secrets: Vec<String> = match UrlParts::of(url) {
            UrlParts::Plain {
                password, query, ..
            } => password
                .into_iter()
                .chain(
                    query
                        .into_iter()
                        .flat_map(|q| q.split('&'))
                        .map(|piece| piece.split_once('=').map_or(piece, |(_, v)| v)),
                )
                .flat_map(secret_pieces)
                .collect(),
            UrlParts::Ambiguous { rest, .. } => secret_pieces(rest).collect(),
        };
        let decoded: Vec<String> = secrets
            .iter()
            .map(|s| {
                String::from_utf8_lossy(&crate::auth::percent_decode(s.as_bytes())).into_owned()
            })
            .collect();
        secrets.extend(decoded);
        // As a `{:?}` quotes them (escaped quotes and backslashes), without the outer quotes.
        let escaped: Vec<String> = secrets
            .iter()
            .filter_map(|s| {
                let debug = format!("{s:?}");
                let inner = &debug[1..debug.len() - 1];
                (inner != s).then(|| inner.to_owned())
            })
            .collect();
        secrets.extend(escaped);
        // The longest first, so that a piece does not break up a longer secret it is part of.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        scrub(message, &secrets)
    }
}

impl fmt::Display for StoreUrl {
    /// The URL with any password replaced by `<redacted>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
            Self::Postgres(url) => UrlParts::of(url).fmt(f),
        }
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

// An error quotes the URL without its password and query.
string_value!(StoreUrl, "store", redacted_url);

/// A secret (a pepper): printed as `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() < 16 {
            return Err(serde::de::Error::custom(
                "a pepper must be at least 16 bytes long",
            ));
        }
        Ok(Self(s))
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// A duration: `90d`, `12h`, `30m`, `15s`, `250ms`, or combined (`1h30m`); an integer is seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_duration(s).map(Dur)
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        match ms {
            0 => f.write_str("0s"),
            ms if ms % 86_400_000 == 0 => write!(f, "{}d", ms / 86_400_000),
            ms if ms % 3_600_000 == 0 => write!(f, "{}h", ms / 3_600_000),
            ms if ms % 60_000 == 0 => write!(f, "{}m", ms / 60_000),
            ms if ms % 1_000 == 0 => write!(f, "{}s", ms / 1_000),
            ms => write!(f, "{ms}ms"),
        }
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Ok(Dur(Duration::from_secs(s))),
            Raw::Text(s) => s
                .parse()
                .map_err(|e: String| serde::de::Error::custom(format!("duration: `{s}` {e}"))),
        }
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Parses `90d`, `12h`, `30m`, `15s`, `250ms` and combinations (`1h30m`); a bare number is
/// seconds. At most 100 years.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    const UNITS: [(&str, u64); 6] = [
        ("ms", 1),
        ("s", 1_000),
        ("m", 60_000),
        ("h", 3_600_000),
        ("d", 86_400_000),
        ("w", 7 * 86_400_000),
    ];
    let s = s.trim();
    if s.is_empty() {
        return Err("is empty: expected a duration such as 90d, 12h, 30m, 15s or 250ms".to_owned());
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs)).and_then(check_duration);
    }
    let bad = || "is not a duration: expected 90d, 12h, 30m, 15s, 250ms or 1h30m".to_owned();
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        let (_, ms) = UNITS.iter().find(|(u, _)| *u == unit).ok_or_else(bad)?;
        total = n
            .checked_mul(*ms)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
        rest = &rest[unit_len..];
    }
    check_duration(Duration::from_millis(total))
}

fn check_duration(d: Duration) -> Result<Duration, String> {
    if d > Duration::from_secs(100 * 365 * 86_400) {
        return Err("is longer than 100 years".to_owned());
    }
    Ok(d)
}

/// The log line format.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// A network (`10.0.0.0/8`) or an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr(pub ipnet::IpNet);

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        crate::record::parse_ip_net(s.trim())
            .map(Cidr)
            .map_err(|_| "is not a CIDR network or an IP address".to_owned())
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

string_value!(Cidr, "network");

/// An HTTP header name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderNameValue(pub http::HeaderName);

impl FromStr for HeaderNameValue {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        http::HeaderName::from_bytes(s.trim().as_bytes())
            .map(HeaderNameValue)
            .map_err(|_| "is not an HTTP header name".to_owned())
    }
}

impl fmt::Display for HeaderNameValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

string_value!(HeaderNameValue, "header");

/// An HTTP method (upper case).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MethodValue(pub http::Method);

impl FromStr for MethodValue {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err("is not an HTTP method in capitals (GET, POST, …)".to_owned());
        }
        http::Method::from_bytes(s.as_bytes())
            .map(MethodValue)
            .map_err(|_| "is not an HTTP method".to_owned())
    }
}

impl fmt::Display for MethodValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

string_value!(MethodValue, "method");

/// A rule's path prefix: starts with `/`, no query, no dot segments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathPrefix(pub String);

impl FromStr for PathPrefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if !s.starts_with('/') {
            return Err("must start with /".to_owned());
        }
        if super::rules::normalize_path(s) != s {
            return Err(format!(
                "is not in normal form: write `{}`",
                super::rules::normalize_path(s)
            ));
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for PathPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

string_value!(PathPrefix, "path_prefix");

/// A list of scopes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scopes(pub ScopeSet);

impl<'de> Deserialize<'de> for Scopes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let list = Vec::<String>::deserialize(d)?;
        ScopeSet::parse(&list)
            .map(Scopes)
            .map_err(|e| serde::de::Error::custom(format!("scopes: {e}")))
    }
}

impl Serialize for Scopes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|s| s.as_str()))
    }
}

/// What the environment holds for `patd`: the `PATD_*` variables (sorted, for stable errors).
pub fn patd_env() -> Vec<(String, String)> {
    let vars: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("PATD_"))
        .collect();
    vars.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)], sets: &[&str]) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!(
            "patd-config-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("patd.toml");
        std::fs::write(&path, text).unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let r = Config::load(Some(&path), env, &sets);
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    #[test]
    fn leak_report_keys_are_read_and_checked_when_loaded() {
        const PEM: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEXOpw6qjcqsauqveNqG5RBCU6yV7A
+DHWhS3iZmoc6Frn0Ni0n1HRPgI5/LWEm9lOJGcmfUpU7HP1GzeKhtjpQA==
-----END PUBLIC KEY-----
";
        let dir = std::env::temp_dir().join(format!("patd-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (good, bad) = (dir.join("good.pem"), dir.join("bad.pem"));
        std::fs::write(&good, PEM).unwrap();
        std::fs::write(&bad, PEM.replace("MFkw", "MFkx")).unwrap();
        let section = |id: &str, path: &Path| {
            format!(
                "[leak_reports]\nmax_entries = 7\nbody_timeout = \"250ms\"\nkeys = {{ \"{id}\" = '{}' }}\n",
                path.display()
            )
        };
        assert!(
            load("", &[], &[])
                .unwrap()
                .leak_reports
                .build()
                .unwrap()
                .is_none()
        );
        let c = load(&section("gh-1", &good), &[], &[]).unwrap();
        let reports = c.leak_reports.build().unwrap().unwrap();
        assert_eq!(reports.key_ids().collect::<Vec<_>>(), ["gh-1"]);
        assert!(
            format!("{reports:?}").contains("body_timeout: 250ms"),
            "{reports:?}"
        );
        let err = load(&section("gh-2", &bad), &[], &[]).unwrap_err().0;
        assert!(err.starts_with("leak_reports.keys.gh-2: "), "{err}");
        assert!(err.contains("P-256"), "{err}");
        let err = load(&section("gh-3", &dir.join("missing.pem")), &[], &[])
            .unwrap_err()
            .0;
        assert!(
            err.contains("gh-3") && err.contains("cannot be read"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn defaults_run_the_embedded_store() {
        let c = load("", &[], &[]).unwrap();
        assert_eq!(c.store, StoreUrl::Sqlite("./patd.db".into()));
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn a_file_that_is_not_toml_is_named_with_its_line_but_not_quoted() {
        for (text, secret) in [
            (
                "listen = \"127.0.0.1:80\"\nstore = postgres://u:s3cret-pw@h/db\n",
                "s3cret-pw",
            ),
            (
                "pepper = \"unclosed-pepper-value\n",
                "unclosed-pepper-value",
            ),
        ] {
            let e = load(text, &[], &[]).unwrap_err().0;
            assert!(e.contains("not valid TOML at line"), "{e}");
            assert!(!e.contains(secret), "{e}");
        }
    }

    #[test]
    fn bad_values_name_the_line_and_key() {
        let e = load(
            "listen = \"127.0.0.1:80\"\n[cache]\nttl = \"5 parsecs\"\n",
            &[],
            &[],
        )
        .unwrap_err()
        .0;
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("ttl"), "{e}");
        let e = load("[proxy]\ntrusted = [\"10.0.0.0/33\"]\n", &[], &[])
            .unwrap_err()
            .0;
        assert!(e.contains("line 2") && e.contains("10.0.0.0/33"), "{e}");
        let e = load("realm = \"r\"\nmax_connections = 0\n", &[], &[])
            .unwrap_err()
            .0;
        assert!(e.contains("line 2") && e.contains("nonzero"), "{e}");
        let c = load(
            "max_connections = 16\nmax_connections_per_client = 0\n",
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(
            (c.max_connections.get(), c.max_connections_per_client),
            (16, 0)
        );
        assert_eq!(
            Config::default().max_connections.get() as usize,
            crate::gateway::serve::MAX_CONNECTIONS
        );
        let e = load("lisen = \"x\"\n", &[], &[]).unwrap_err().0;
        assert!(
            e.contains("unknown field `lisen`") && e.contains("line 1"),
            "{e}"
        );
    }

    #[test]
    fn environment_and_flags_override_the_file() {
        let c = load(
            "listen = \"127.0.0.1:1\"\n[cache]\nttl = \"1m\"\n",
            &[("PATD_LISTEN", "127.0.0.1:2"), ("PATD_CACHE__TTL", "2m")],
            &["listen=127.0.0.1:3"],
        )
        .unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:3");
        assert_eq!(c.cache.ttl, Dur(Duration::from_secs(120)));
        assert_eq!(c.cache.lookup_timeout, Dur(Duration::from_secs(5)));
        let c = load("[cache]\nlookup_timeout = \"2s\"\n", &[], &[]).unwrap();
        assert_eq!(c.cache.lookup_timeout, Dur(Duration::from_secs(2)));
        let e = load("", &[("PATD_CACHE__TTL", "soon")], &[]).unwrap_err().0;
        assert!(e.starts_with("PATD_CACHE__TTL") && e.contains("ttl"), "{e}");
        let e = load("", &[("PATD_NOPE", "1")], &[]).unwrap_err().0;
        assert!(e.contains("PATD_NOPE") && e.contains("nope"), "{e}");
    }

    #[test]
    fn secrets_are_redacted() {
        let c = load(
            "store = \"postgres://app:hunter2hunter2@db/tokens?password=x\"\npepper = \"0123456789abcdef-secret\"\n",
            &[],
            &[],
        )
        .unwrap();
        let printed = c.to_redacted_toml();
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains("secret"), "{printed}");
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(
            printed.contains("postgres://app:<redacted>@db/tokens?<redacted>"),
            "{printed}"
        );
    }

    #[test]
    fn a_password_with_delimiters_is_never_printed() {
        // Unencoded `/`, `?`, `#`, `@` in a password (base64 has `/`): no piece of it is printed,
        // neither by the redacted configuration, nor `Display`, nor `Debug`, nor an error.
        for (url, pieces) in [
            ("postgres://app:Zm9v/YmFy@db/pat", &["Zm9v", "YmFy"][..]),
            ("postgres://app:ab?cdef@db/pat", &["ab?", "cdef"][..]),
            ("postgres://app:ab#cdef@db/pat", &["ab#", "cdef"][..]),
            ("postgres://app:pw@xyz@db/pat", &["pw@", "xyz"][..]),
            ("postgres://db/pat?password=se@cret", &["se@", "cret"][..]),
            (
                "postgres://u:p@db/pat?password=abcd@efgh",
                &["abcd", "efgh"][..],
            ),
        ] {
            let c = load(&format!("store = \"{url}\"\n"), &[], &[]).unwrap();
            let shown = [
                c.to_redacted_toml(),
                c.store.to_string(),
                format!("{c:?}"),
                redacted_url(url),
            ];
            for shown in &shown {
                for piece in pieces {
                    assert!(!shown.contains(piece), "{url}: {shown}");
                }
            }
            // Pieces shorter than 4 bytes (a user `u`, a host `db`) are not scrubbed from messages.
            for secret in url_secrets(url).iter().filter(|s| s.len() >= 4) {
                assert!(
                    !redacted_url(url).contains(secret.as_str()),
                    "{url}: {secret}"
                );
            }
            let err = scrub(
                format!("cannot open {url}: bad port Zm9v"),
                &url_secrets(url),
            );
            for piece in pieces
                .iter()
                .filter(|p| p.len() >= 4 && !p.contains(['?', '#', '@']))
            {
                assert!(!err.contains(piece), "{url}: {err}");
            }
        }
        // A plain URL keeps its user and host; its password and query are hidden.
        assert_eq!(
            redacted_url("postgres://app:hunter2@db:5432/pat?sslmode=require"),
            "postgres://app:<redacted>@db:5432/pat?<redacted>"
        );
        assert_eq!(
            redacted_url("postgres://app@db/pat"),
            "postgres://app@db/pat"
        );
        assert_eq!(
            redacted_url("postgres://app:Zm9v/YmFy@db/pat"),
            "postgres://<redacted>"
        );
    }

    #[test]
    fn errors_never_quote_a_secret() {
        for (text, sets) in [
            // A store URL that is no store, from the file and from a flag.
            ("store = \"pg://u:s3cret-pw@h/db\"\n", &[][..]),
            ("", &["store=\"pg://u:s3cret-pw@h/db\""][..]),
            ("", &["store=pg://u:s3cret-pw@h/db?password=s3cret-q"][..]),
            // Peppers of the wrong type or length.
            ("", &["pepper=s3cret-pw"][..]),
            ("", &["pepper=123456789012345"][..]),
            ("", &["previous_peppers=[\"s3cret-pw\", 12345678]"][..]),
            ("pepper = 123456789012345\n", &[][..]),
            // No `=`: the whole argument could be the secret.
            ("", &["s3cret-pw"][..]),
        ] {
            let err = load(text, &[], sets).unwrap_err().0;
            for secret in ["s3cret", "123456789012345", "12345678"] {
                assert!(!err.contains(secret), "{text:?} {sets:?}: {err}");
            }
        }
        let err = load("", &[], &["store=pg://u:s3cret-pw@h/db"])
            .unwrap_err()
            .0;
        assert!(err.contains("--set store"), "{err}");
        assert!(err.contains("pg://u:<redacted>@h/db"), "{err}");
    }

    #[test]
    fn a_secret_in_the_wrong_place_in_the_file_is_never_quoted() {
        // toml's own error text quotes the line; these secrets are where the scrubber, which
        // knows the values of the top-level secret keys only, cannot find them.
        for (text, line, key) in [
            // Below a `[table]` header a key belongs to that table: `proxy.pepper`.
            (
                "[proxy]\ntrusted = [\"10.0.0.0/8\"]\npepper = \"s3cret-0123456789abcdef\"\n",
                3,
                "pepper",
            ),
            (
                "[cache]\nttl = \"30s\"\nstore = \"postgres://app:s3cret-pw@db/pat\"\n",
                3,
                "store",
            ),
            // Misspelt top-level keys.
            ("peper = \"s3cret-0123456789abcdef\"\n", 1, "peper"),
            (
                "realm = \"r\"\nprevious_pepper = [\"s3cret-0123456789abcdef\"]\n",
                2,
                "previous_pepper",
            ),
            // A secret key of the wrong shape.
            (
                "store = { url = \"postgres://app:s3cret-pw@db/pat\" }\n",
                1,
                "store",
            ),
            (
                "pepper = { value = \"s3cret-0123456789abcdef\" }\n",
                1,
                "pepper",
            ),
        ] {
            let err = load(text, &[], &[]).unwrap_err().0;
            assert!(!err.contains("s3cret"), "{text:?}: {err}");
            // Still says where and what.
            assert!(
                err.contains(&format!("line {line},")) && err.contains(key),
                "{text:?}: {err}"
            );
        }
        let err = load("[cache]\nttl = \"soon\"\n", &[], &[]).unwrap_err().0;
        assert!(
            err.contains("line 2") && err.contains("`soon`") && err.contains("cache.ttl"),
            "{err}"
        );
    }

    #[test]
    fn a_store_error_is_scrubbed_of_the_urls_password_and_query_values() {
        let url: StoreUrl = "postgres://app:pa%24s-word@db/pat?application_name=s3cret%2Dvalue\
                             &dbname=sec+ret-db&user=ab%22c%5Cd"
            .parse()
            .unwrap();
        // Raw, percent-decoded, and escaped as a `{:?}` quotes it.
        let message =
            r#"pa$s-word pa%24s-word s3cret-value s3cret%2Dvalue sec ret-db "ab\"c\\d" db app pat"#;
        let scrubbed = url.scrub(message.to_owned());
        assert_eq!(
            scrubbed,
            r#"<redacted> <redacted> <redacted> <redacted> <redacted> "<redacted>" db app pat"#
        );
        // A `?` in a value (a second `?` typed for `&`) is refused before anything connects, and
        // so is an `sslmode` the driver would refuse by quoting it (another separator mistyped).
        for url in [
            "postgres://app@db/pat?sslmode=require?password=s3cret",
            "postgres://app@db/pat?sslmode=require%20password=s3cret",
            "postgres://app@db/pat?ssl-mode=require;password=s3cret",
        ] {
            let err = url.parse::<StoreUrl>().unwrap_err();
            assert!(err.contains("ssl") && !err.contains("s3cret"), "{err}");
        }
        assert!(
            "postgres://app@db/pat?sslmode=Verify-Full"
                .parse::<StoreUrl>()
                .is_ok()
        );
    }

    #[test]
    fn a_postgres_query_parameter_the_driver_does_not_read_is_refused_by_key() {
        // sqlx would log such a parameter with its value (`ignoring unrecognized connect
        // parameter`); it is refused, from the file, a variable or a flag, naming only the key.
        for (url, key) in [
            (
                "postgres://app@db/pat?sslpassword=s3cret-key-pass",
                "`sslpassword`",
            ),
            (
                "postgres://app@db/pat?sslmode=require&passwd=s3cret-pw",
                "`passwd`",
            ),
            (
                "postgresql://app@db/pat?connect_timeout=5",
                "`connect_timeout`",
            ),
            // Percent-decoded as the driver reads it.
            ("postgres://app@db/pat?pass%77d=s3cret-pw", "`passwd`"),
            // Without `=` the parameter may be a secret pasted whole: not named.
            ("postgres://app@db/pat?s3cret-pw", "without `=`"),
        ] {
            for (text, env, sets) in [
                (format!("store = \"{url}\"\n"), None, None),
                (String::new(), Some(("PATD_STORE", url)), None),
                (String::new(), None, Some(format!("store={url}"))),
            ] {
                let env: Vec<_> = env.into_iter().collect();
                let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
                let err = load(&text, &env, &sets).unwrap_err().0;
                assert!(!err.contains("s3cret"), "{url}: {err}");
                assert!(
                    err.contains(&format!("query parameter {key}")),
                    "{url}: {err}"
                );
            }
        }
        // Every parameter the driver reads is taken.
        let url = "postgres://app:pw@db/pat?sslmode=verify-full&sslrootcert=/ca.pem&ssl-cert=/c.pem\
                   &sslkey=/k.pem&host=db2&hostaddr=10.0.0.2&port=5433&dbname=pat&user=app\
                   &password=pw&application_name=patd&options=-c%20x%3Dy\
                   &options[search_path]=pat&statement-cache-capacity=10&&";
        let c = load(&format!("store = \"{url}\"\n"), &[], &[]).unwrap();
        assert_eq!(c.store, StoreUrl::Postgres(url.to_owned()));
    }

    #[test]
    fn a_misplaced_secret_in_a_set_is_never_quoted() {
        for set in [
            "postgres://app:pw-s3cret@db/pat?sslmode=require",
            "PATD_PEPPER=s3cret-0123456789abcdef",
            "peper=s3cret-0123456789abcdef",
            "db_password=s3cret-0123456789",
        ] {
            let err = load("", &[], &[set]).unwrap_err().0;
            assert!(!err.contains("s3cret"), "{set}: {err}");
        }
        // A plain key keeps its value in the message: it says what was wrong. So does a leak
        // report key, a public key's file.
        let err = load("", &[], &["cache.ttl=soon"]).unwrap_err().0;
        assert!(err.contains("--set cache.ttl=soon"), "{err}");
        let err = load("", &[], &["leak_reports.keys.gh-1=/no/such/key.pem"])
            .unwrap_err()
            .0;
        assert!(err.contains("/no/such/key.pem"), "{err}");
    }

    #[test]
    fn expiry_notices_are_off_by_default_and_configurable() {
        let c = load("", &[], &[]).unwrap();
        assert!(!c.expiry_notices.enabled);
        let n = crate::ExpiryNoticeConfig::from(&c.expiry_notices);
        assert_eq!(n, crate::ExpiryNoticeConfig::default().enabled(false));
        let c = load(
            "[expiry_notices]\nenabled = true\nlead = \"3d\"\ninterval = \"1m\"\n",
            &[],
            &[],
        )
        .unwrap();
        let n = crate::ExpiryNoticeConfig::from(&c.expiry_notices);
        assert!(n.enabled);
        assert_eq!(n.lead, Duration::from_secs(3 * 86_400));
        assert_eq!(n.interval, Duration::from_secs(60));
        let c = load("", &[("PATD_EXPIRY_NOTICES__ENABLED", "true")], &[]).unwrap();
        assert!(c.expiry_notices.enabled);
        assert!(load("[expiry_notices]\nlead = \"soon\"\n", &[], &[]).is_err());
        assert!(c.to_redacted_toml().contains("[expiry_notices]"));
    }

    #[test]
    fn reuse_detection_is_off_by_default_and_named_in_snake_case() {
        assert_eq!(load("", &[], &[]).unwrap().reuse.policy, ReuseMode::Off);
        let c = load("[reuse]\npolicy = \"revoke_family\"\n", &[], &[]).unwrap();
        assert_eq!(c.reuse.policy, ReuseMode::RevokeFamily);
        let c = load("", &[("PATD_REUSE__POLICY", "report")], &[]).unwrap();
        assert_eq!(c.reuse.policy, ReuseMode::Report);
        assert!(load("[reuse]\npolicy = \"sometimes\"\n", &[], &[]).is_err());
    }

    #[test]
    fn retention_defaults_to_30_days_and_zero_keeps_everything() {
        let c = load("", &[], &[]).unwrap();
        assert_eq!(c.retention.max_age.0, Duration::from_secs(30 * 86_400));
        assert_eq!(c.retention.interval.0, Duration::from_secs(3600));
        assert_eq!(c.retention.batch_size, 500);
        let r = crate::RetentionConfig::from(&c.retention);
        assert_eq!(r, crate::RetentionConfig::default());
        let c = load("[retention]\nmax_age = 0\n", &[], &[]).unwrap();
        assert!(!crate::RetentionConfig::from(&c.retention).is_enabled());
        let c = load("", &[("PATD_RETENTION__MAX_AGE", "7d")], &[]).unwrap();
        assert_eq!(c.retention.max_age.0, Duration::from_secs(7 * 86_400));
        let err = load("[retention]\nmax_age = \"soon\"\n", &[], &[]).unwrap_err();
        assert!(err.0.contains("max_age"), "{err}");
        assert!(c.to_redacted_toml().contains("[retention]"));
    }

    #[test]
    fn durations() {
        for (s, ms) in [
            ("90d", 90 * 86_400_000),
            ("1h30m", 5_400_000),
            ("250ms", 250),
            ("15", 15_000),
        ] {
            assert_eq!(parse_duration(s).unwrap(), Duration::from_millis(ms), "{s}");
        }
        for s in ["", "d", "5x", "1.5h", "-1s", "99999999999999999999d"] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
    }

    /// First match wins: a rule after one whose prefix covers it, for the same methods, never
    /// matches (`/api/admin` would need only `read`): refused, naming both rules. A rule earlier
    /// ones take only some requests from loads, with a warning naming both and the methods.
    #[test]
    fn a_rule_that_never_matches_is_refused_a_partial_shadow_warned() {
        let e = load(
            "[[rule]]\npath_prefix = \"/api\"\nscopes = [\"read\"]\n\
             [[rule]]\npath_prefix = \"/api/admin\"\nscopes = [\"admin\"]\n",
            &[],
            &[],
        )
        .unwrap_err()
        .0;
        assert!(e.contains("[[rule]] 2 (/api/admin) never matches"), "{e}");
        assert!(e.contains("[[rule]] 1 (/api)"), "{e}");
        // Two earlier rules together take every method of the third.
        let e = load(
            "[[rule]]\npath_prefix = \"/api\"\nmethods = [\"GET\"]\n\
             [[rule]]\npath_prefix = \"/\"\nmethods = [\"POST\"]\n\
             [[rule]]\npath_prefix = \"/api/a\"\nmethods = [\"GET\", \"POST\"]\n",
            &[],
            &[],
        )
        .unwrap_err()
        .0;
        assert!(e.contains("[[rule]] 3 (/api/a) never matches"), "{e}");
        assert!(e.contains("[[rule]] 1 (/api) and [[rule]] 2 (/)"), "{e}");
        // A CORS preflight rule first: `/admin` loses its `OPTIONS` only. Loads, with a warning.
        let config = load(
            "[[rule]]\npath_prefix = \"/\"\nmethods = [\"OPTIONS\"]\nanonymous = true\n\
             [[rule]]\npath_prefix = \"/admin\"\nscopes = [\"admin\"]\n",
            &[],
            &[],
        )
        .unwrap();
        let warnings = config.shadow_warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        let w = &warnings[0];
        assert!(w.contains("[[rule]] 1 (/)"), "{w}");
        assert!(w.contains("[[rule]] 2 (/admin) for OPTIONS"), "{w}");
        // In another case only: the later rule still matches its own case.
        let config = load(
            "[[rule]]\npath_prefix = \"/api\"\nscopes = [\"read\"]\n\
             [[rule]]\npath_prefix = \"/API/admin\"\nscopes = [\"admin\"]\n",
            &[],
            &[],
        )
        .unwrap();
        assert!(config.shadow_warnings()[0].contains("ignores case"));
        // The narrower rule first, and a rule for every other method of the same prefix: no
        // warning.
        let config = load(
            "[[rule]]\npath_prefix = \"/api/admin\"\nscopes = [\"admin\"]\n\
             [[rule]]\npath_prefix = \"/api\"\nmethods = [\"GET\"]\nanonymous = true\n\
             [[rule]]\npath_prefix = \"/api\"\nscopes = [\"write\"]\n",
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(config.shadow_warnings(), Vec::<String>::new());
    }

    #[test]
    fn rule_prefixes_must_be_normal() {
        let e = load("[[rule]]\npath_prefix = \"/a/../b\"\n", &[], &[])
            .unwrap_err()
            .0;
        assert!(e.contains("/b"), "{e}");
        let e = load(
            "[[rule]]\npath_prefix = \"/a\"\nmethods = [\"get\"]\n",
            &[],
            &[],
        )
        .unwrap_err()
        .0;
        assert!(e.contains("capitals"), "{e}");
    }
}
