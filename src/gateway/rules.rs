//! Route rules: which scopes a gateway requires for a request, by path prefix and method, and
//! which routes are open without a token. The first matching rule wins; a request no rule
//! matches gets the default rule (by default: a valid token, no scope beyond the layer's own).
//! A rule that can never match, earlier rules taking all its requests
//! ([`RouteRules::never_matching`]), is refused when `patd` loads its configuration; a rule an
//! earlier one takes some requests from ([`RouteRules::shadows`]) is logged as a warning.
//!
//! # How a path is matched: every plausible reading, fail closed
//!
//! The upstream behind a gateway may read a path differently from the gateway and from this
//! module, and a request must never get a laxer rule than the route the upstream serves. So a
//! request is judged by every rule that **some plausible reading** of its path matches
//! ([`RouteRules::requirement`]):
//!
//! - the path as written (no escape decoded), dot segments resolved;
//! - the path percent-decoded once, twice, … until no escape is left (`%252e` is a `.` to an
//!   upstream that decodes twice, and `%252f` a `/`: `/%61dmin/x%252f..%252f..%252fother` is
//!   under `/admin` to an upstream that decodes once, though not as written nor fully decoded),
//!   each with dot segments resolved and repeated slashes merged, with `/` alone and with `\`
//!   as a separator too ([`normalize_path`] is the last of them): `/public/../admin` and
//!   `/%61dmin` are `/admin`;
//! - each decoded round also cut at its first `#` or `?`: an upstream that decodes once more
//!   re-parses the result and ends the path there (`/admin%23/../x` and `/admin%253F/x` are
//!   `/admin` to such a chain);
//! - the same with `;` path parameters removed from each segment, before decoding (as Tomcat,
//!   Jetty and Spring strip them) and after: `/public/..;/admin` is `/admin` to them, and
//!   `/admin;x/users` is `/admin/users`;
//! - each of these also with its dot segments left as they are, for upstreams that do not resolve
//!   them: `/admin/../public` is under `/admin` to them;
//! - each of these compared with the rule prefixes case-insensitively too (Unicode upper case,
//!   then lower case, so that `ſ` is `s` and `ı` and `İ` are `i`, as to Java's `equalsIgnoreCase` and Go's
//!   `strings.EqualFold`), for case-insensitive upstreams: `/ADMIN/users` and `/%C5%BFettings`
//!   are under `/admin` and `/settings`.
//!
//! In each reading the first matching rule (or the default) counts; the request passes without a
//! token only if **every** counted rule is anonymous, and a token needs the scopes of **all** of
//! them. Stripping `;…` alone would not be safe: `/admin/..;x/public` is `/public` once
//! stripped, but Go's router serves it under `/admin`; judged by both rules, it needs both.
//!
//! A path whose escapes do not decode to UTF-8 (`%FF`, the overlong `%C0%AE` some servers take for
//! a `.`) or decode to a NUL byte is refused (400): no reading of it can be trusted; so is one
//! longer than [`MAX_PATH_LEN`], and one with a raw `#` (a request target carries no fragment;
//! what follows the `#` is path to some upstreams, Go's `http.FileServer` among them).
//!
//! A prefix matches whole segments: `/admin` matches `/admin` and `/admin/users`, not
//! `/administrator`. Methods count the same way: the rule the method matches exactly, and the one
//! it matches without regard to ASCII case (`post` as `POST`) with a rule that names `GET` also
//! applying to `HEAD` (servers answer `HEAD` with the `GET` handler); the request must satisfy
//! both. So a `HEAD` needs what the rule for its path and no method needs as well (the default
//! rule, say), even where a `GET` rule is anonymous, unless a rule names `HEAD` itself. A request
//! some upstreams run as another method too (a method override) is judged by the rules of each
//! method: [`RouteRules::requirement_any`].

use std::borrow::Cow;
use std::fmt::Write as _;

use http::Method;

use crate::AuthError;
use crate::scope::ScopeSet;

/// One rule: requests whose path is under `path_prefix` (and whose method is one of `methods`,
/// when any are given) need `scopes`, or no token at all when `anonymous`.
#[derive(Clone, Debug, Default)]
pub struct RouteRule {
    /// The path prefix the rule applies to (`/` for every path), matched by whole segments.
    pub path_prefix: String,
    /// The methods it applies to; empty for every method. [`RouteRules::requirement`] counts
    /// both the rule a request's method matches exactly and the one it matches without regard
    /// to ASCII case (`GET` covering `HEAD`); [`matches`](Self::matches) is the latter.
    pub methods: Vec<Method>,
    /// The scopes a token needs, on top of the layer's own.
    pub scopes: ScopeSet,
    /// Requests without a token pass (without an identity). A token that is presented is still
    /// verified: an invalid, revoked or expired one is refused, a valid one passes with its
    /// identity, and `scopes` still apply to it.
    pub anonymous: bool,
}

impl RouteRule {
    /// A rule for every request under `path_prefix`, needing a valid token and no scope.
    pub fn new(path_prefix: impl Into<String>) -> Self {
        Self {
            path_prefix: path_prefix.into(),
            ..Self::default()
        }
    }

    /// Whether the rule applies to `method` and `path` as [`normalize_path`] reads it (exact
    /// case). The gate judges a request by every reading of its path:
    /// [`RouteRules::requirement`].
    pub fn matches(&self, method: &Method, path: &str) -> bool {
        under(self.prefix(), &normalize_path(path)) && self.applies(method, true)
    }

    /// The prefix without its trailing `/`s, as [`under`] compares it.
    fn prefix(&self) -> &str {
        self.path_prefix.trim_end_matches('/')
    }

    /// Whether the rule applies to `method`: any when `methods` is empty, else one of them,
    /// exactly, or when `loose` in any ASCII case, `GET` covering `HEAD`.
    fn applies(&self, method: &Method, loose: bool) -> bool {
        if self.methods.is_empty() {
            return true;
        }
        if !loose {
            return self.methods.contains(method);
        }
        let method = method.as_str();
        self.methods.iter().any(|m| {
            m.as_str().eq_ignore_ascii_case(method)
                || (*m == Method::GET && method.eq_ignore_ascii_case("HEAD"))
        })
    }
}

/// What a request must satisfy: the rules that the readings of its path match, combined
/// ([`RouteRules::requirement`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    /// A request without a token passes: every rule counted is anonymous.
    pub anonymous: bool,
    /// The scopes a token needs on top of the layer's: those of every rule counted.
    pub scopes: ScopeSet,
    /// The rules counted, by index in [`RouteRules::iter`], `None` for the default rule; in
    /// order, without repetition.
    pub rules: Vec<Option<usize>>,
}

/// A rule an earlier one takes requests from ([`RouteRules::shadows`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shadowed {
    /// The earlier rule, by index in [`RouteRules::iter`].
    pub earlier: usize,
    /// The rule it shadows, by index.
    pub later: usize,
    /// The methods of the later rule that the earlier one takes; empty: every method it applies
    /// to (unless [`case_only`](Self::case_only), the later rule never matches).
    pub methods: Vec<Method>,
    /// The earlier rule's prefix covers the later one's only case-insensitively (`/api`, then
    /// `/API/admin`): the later rule still matches requests in its own case, but an upstream that
    /// ignores case serves `/api/admin/x` from it with the earlier rule's scopes.
    pub case_only: bool,
}

/// Route rules, first match wins, and the rule for requests none matches.
#[derive(Clone, Debug, Default)]
pub struct RouteRules {
    rules: Vec<RouteRule>,
    /// Each rule's prefix (without its trailing `/`s) case-folded ([`fold`]), once.
    folded: Vec<String>,
    default: RouteRule,
}

impl RouteRules {
    /// Rules tried in this order; requests none matches need a valid token and no scope.
    pub fn new(rules: Vec<RouteRule>) -> Self {
        Self {
            folded: rules.iter().map(|r| fold(r.prefix())).collect(),
            rules,
            default: RouteRule::new("/"),
        }
    }

    /// The rule for requests no rule matches (its `path_prefix` and `methods` are ignored).
    pub fn default_rule(mut self, rule: RouteRule) -> Self {
        self.default = rule;
        self
    }

    /// The rules, in order (the default rule not included).
    pub fn iter(&self) -> std::slice::Iter<'_, RouteRule> {
        self.rules.iter()
    }

    /// The default rule.
    pub fn default_route(&self) -> &RouteRule {
        &self.default
    }

    /// The rule at `index` as [`Requirement::rules`] names it (`None`: the default rule).
    pub fn rule(&self, index: Option<usize>) -> &RouteRule {
        index
            .and_then(|i| self.rules.get(i))
            .unwrap_or(&self.default)
    }

    /// The index of the first rule that applies to `method` and `path` as [`normalize_path`]
    /// reads it (exact case), `None` for the default. This is one reading only: the gate
    /// judges by [`requirement`](Self::requirement).
    pub fn position(&self, method: &Method, path: &str) -> Option<usize> {
        let path = normalize_path(path);
        self.rules
            .iter()
            .position(|r| under(r.prefix(), &path) && r.applies(method, true))
    }

    /// The rule [`position`](Self::position) names: the first that matches, or the default.
    pub fn matching(&self, method: &Method, path: &str) -> &RouteRule {
        self.rule(self.position(method, path))
    }

    /// Every rule an earlier one shadows, by pair, in order of the later rule then the earlier:
    /// the earlier rule's prefix covers the later one's by whole segments, exactly or only
    /// case-insensitively ([`Shadowed::case_only`]: the readings fold case, see the
    /// [module docs](self)), and it applies to some of the methods the later one applies to
    /// (first match wins: `/api` then `/api/admin` leaves `/api/admin/x` to `/api`'s scopes).
    /// One partial shadow is no mistake and is not listed: a later rule with the same prefix and
    /// no methods, for the methods the earlier rule does not name (`/api` for `GET`, then `/api`
    /// for the rest). Methods are compared exactly (a `HEAD` rule after a `GET` one still counts:
    /// see [`requirement`](Self::requirement)).
    pub fn shadows(&self) -> Vec<Shadowed> {
        let mut found = Vec::new();
        for (later, rule) in self.rules.iter().enumerate() {
            for (earlier, before) in self.rules[..later].iter().enumerate() {
                let case_only = if under(before.prefix(), rule.prefix()) {
                    false
                } else if under(&self.folded[earlier], &self.folded[later]) {
                    true
                } else {
                    continue;
                };
                let methods = match (before.methods.is_empty(), rule.methods.is_empty()) {
                    (true, _) => Vec::new(),
                    (false, true) if before.prefix() == rule.prefix() => continue,
                    (false, true) => before.methods.clone(),
                    (false, false) => {
                        let shared: Vec<Method> = rule
                            .methods
                            .iter()
                            .filter(|m| before.methods.contains(m))
                            .cloned()
                            .collect();
                        if shared.is_empty() {
                            continue;
                        }
                        if shared.len() == rule.methods.len() {
                            Vec::new()
                        } else {
                            shared
                        }
                    }
                };
                found.push(Shadowed {
                    earlier,
                    later,
                    methods,
                    case_only,
                });
            }
        }
        found
    }

    /// The first rule that can never match, with the earlier rules that together take every
    /// request it applies to (their prefixes cover its prefix exactly, and between them they
    /// apply to every method it applies to): most likely a mistake of order, which `patd` refuses
    /// to load. A partial shadow ([`shadows`](Self::shadows)) leaves the later rule some requests.
    pub fn never_matching(&self) -> Option<(usize, Vec<usize>)> {
        let shadows = self.shadows();
        for (later, rule) in self.rules.iter().enumerate() {
            let mut earlier = Vec::new();
            let mut taken: Vec<&Method> = Vec::new();
            for s in shadows.iter().filter(|s| s.later == later && !s.case_only) {
                if s.methods.is_empty() {
                    return Some((later, vec![s.earlier]));
                }
                if s.methods.iter().any(|m| !taken.contains(&m)) {
                    earlier.push(s.earlier);
                    taken.extend(&s.methods);
                }
            }
            if !rule.methods.is_empty() && rule.methods.iter().all(|m| taken.contains(&m)) {
                return Some((later, earlier));
            }
        }
        None
    }

    /// What a request for `method` and `path` must satisfy: for every plausible reading of the
    /// path (see the [module docs](self)), exactly and case-insensitively, the first rule that
    /// matches or the default; anonymous only if all of them are, and the scopes of all of them.
    ///
    /// Fails with [`AuthError::InvalidRequest`] (400) for a path whose escapes do not decode to
    /// UTF-8 or decode to a NUL byte, or with a raw `#`.
    pub fn requirement(&self, method: &Method, path: &str) -> Result<Requirement, AuthError> {
        self.requirement_any(std::slice::from_ref(method), path)
    }

    /// What a request for `path` must satisfy when its method may be read as any of `methods`
    /// (the method sent and those a method-override names, which many frameworks run instead):
    /// the rules each of them counts, combined as [`requirement`](Self::requirement) combines a
    /// method's readings (anonymous only if all are, the scopes of all of them).
    pub fn requirement_any(
        &self,
        methods: &[Method],
        path: &str,
    ) -> Result<Requirement, AuthError> {
        // What follows a raw `#` is part of the path to some upstreams, and cut off by others.
        if path.contains('#') {
            return Err(AuthError::InvalidRequest(
                "the request target has a `#`: a request carries no fragment",
            ));
        }
        // The common path (no escape, parameter, backslash, dot segment or empty segment) has
        // one reading, itself: no copy made.
        let plain = path.split('?').next().unwrap_or("");
        let readings: Vec<Cow<'_, str>> = if is_plain(plain) {
            vec![Cow::Borrowed(plain)]
        } else {
            readings(path)?.into_iter().map(Cow::Owned).collect()
        };
        let judged = self.judged(methods);
        let mut rules: Vec<Option<usize>> = Vec::with_capacity(2);
        let mut covering: Vec<usize> = Vec::with_capacity(self.rules.len());
        for reading in &readings {
            let lower = if reading.bytes().any(|b| b.is_ascii_uppercase()) || !reading.is_ascii() {
                Cow::Owned(fold(reading))
            } else {
                Cow::Borrowed(reading.as_ref())
            };
            for (reading, fold) in [(reading.as_ref(), false), (lower.as_ref(), true)] {
                // The rules whose prefix covers this reading, once; then the first of them for
                // each way of reading the method.
                covering.clear();
                covering.extend((0..self.rules.len()).filter(|&i| {
                    let prefix = if fold {
                        self.folded[i].as_str()
                    } else {
                        self.rules[i].prefix()
                    };
                    under(prefix, reading)
                }));
                for &(method, loose) in &judged {
                    let index = covering
                        .iter()
                        .copied()
                        .find(|&i| self.rules[i].applies(method, loose));
                    if !rules.contains(&index) {
                        rules.push(index);
                    }
                }
            }
        }
        let counted = || rules.iter().map(|&i| self.rule(i));
        let anonymous = counted().all(|r| r.anonymous);
        let scopes = match rules.as_slice() {
            [one] => self.rule(*one).scopes.clone(),
            _ => counted().flat_map(|r| r.scopes.iter().cloned()).collect(),
        };
        Ok(Requirement {
            anonymous,
            scopes,
            rules,
        })
    }
}

impl RouteRules {
    /// The ways to read `methods` against the rules, without one that cannot count another rule:
    /// each method as sent and in any case (`get` is `GET` to some upstreams, another method to
    /// others; `HEAD` is `GET` to most: both rules count). In any case, one spelling of a method
    /// stands for all of its spellings; as sent, one spelling that no rule names stands for all
    /// such (they match only the rules for every method). So the work a request asks for grows
    /// with the rules' methods, not with how many spellings of a method it sends.
    fn judged<'a>(&self, methods: &'a [Method]) -> Vec<(&'a Method, bool)> {
        let named = |m: &Method| self.rules.iter().any(|r| r.methods.contains(m));
        // (method, loose, named by a rule)
        let mut judged: Vec<(&Method, bool, bool)> = Vec::with_capacity(2 * methods.len().min(4));
        for method in methods {
            let is_named = named(method);
            if !judged
                .iter()
                .any(|&(m, loose, n)| !loose && (m == method || (!n && !is_named)))
            {
                judged.push((method, false, is_named));
            }
            if !judged
                .iter()
                .any(|&(m, loose, _)| loose && m.as_str().eq_ignore_ascii_case(method.as_str()))
            {
                judged.push((method, true, is_named));
            }
        }
        judged.into_iter().map(|(m, loose, _)| (m, loose)).collect()
    }
}

/// Whether `path`, already read, is under `prefix` (without its trailing `/`s) by whole segments.
fn under(prefix: &str, path: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// `s` case-folded, as a case-insensitive upstream compares it: upper case, then lower case.
/// Lower case alone misses the characters whose upper case is ASCII, which Java's
/// `equalsIgnoreCase`, Go's `strings.EqualFold` and Python's `casefold` match with ASCII letters:
/// `ſ` (U+017F) is `s` to them, `ı` (U+0131) `i`. `İ` (U+0130) is `i` too, as Java's simple
/// case mapping lower-cases it, where Rust's full mapping gives `i` and U+0307; and `i` followed
/// by U+0307 is `i` too, as Python's `casefold` reads `İ`: each spelling of one matches the
/// others.
fn fold(s: &str) -> String {
    let upper = s.to_uppercase();
    let lower = if upper.contains('İ') {
        upper.replace('İ', "i").to_lowercase()
    } else {
        upper.to_lowercase()
    };
    if lower.contains('\u{307}') {
        lower.replace("i\u{307}", "i")
    } else {
        lower
    }
}

/// Whether every reading of `path` (its query cut off) is `path` itself: it starts with `/` and has
/// no `%`, `;`, `\\`, empty segment (`//`) nor dot segment.
fn is_plain(path: &str) -> bool {
    path.starts_with('/')
        && path.len() <= MAX_PATH_LEN
        && !path.contains(['%', ';', '\\'])
        && !path.contains("//")
        && !path.split('/').any(|s| s == "." || s == "..")
}

/// Every plausible reading of `path` (its query cut off), without repetition: as written and after
/// each round of decoding, with `;` parameters removed before decoding or not; each of these as it
/// is, and with dot segments resolved (with `/` and with `/` and `\\` as separators, `;`
/// parameters removed after decoding or not); each round after the first also cut at its first
/// `#` or `?`. The module docs say why.
fn readings(path: &str) -> Result<Vec<String>, AuthError> {
    let path = path.split('?').next().unwrap_or("");
    // Each reading is a copy: a bound on the work a request can ask for.
    if path.len() > MAX_PATH_LEN {
        return Err(AuthError::InvalidRequest(
            "the request path is longer than 8 KiB",
        ));
    }
    let unparameterized: String = path
        .split('/')
        .map(|segment| segment.split(';').next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("/");
    let mut out: Vec<String> = Vec::with_capacity(8);
    for source in [path, unparameterized.as_str()] {
        // Every round of decoding, the path as written first: an upstream may decode once, or
        // twice, or not at all.
        let (rounds, clean) = decode_rounds(source);
        if !clean {
            return Err(AuthError::InvalidRequest(
                "the request path has %-escapes that are not UTF-8",
            ));
        }
        for (i, round) in rounds.iter().enumerate() {
            if round.contains('\0') {
                return Err(AuthError::InvalidRequest(
                    "the request path has an escaped NUL byte",
                ));
            }
            // An upstream that decodes once more re-parses the result (the chains these rounds
            // model), ending the path at a decoded `#` or `?`: `/admin%23/../x` is `/admin` to it.
            let cut = round
                .find(['#', '?'])
                .filter(|_| i > 0)
                .map(|at| &round[..at]);
            for round in std::iter::once(round.as_str()).chain(cut) {
                push_readings(round, &mut out);
            }
        }
    }
    Ok(out)
}

/// Adds the readings of `round`, one round of decoding of a path, to `out` (without repetition):
/// as it is, and with dot segments resolved in every way [`readings`] lists.
fn push_readings(round: &str, out: &mut Vec<String>) {
    // Dot segments left as they are, too: an upstream that does not resolve them routes
    // `/admin/../public` under `/admin`.
    let literal = if round.starts_with('/') {
        round.to_owned()
    } else {
        format!("/{round}")
    };
    let resolved = [&['/'][..], &['/', '\\'][..]]
        .into_iter()
        .flat_map(|separators| {
            [false, true].map(|strip_params| resolve(round, separators, strip_params))
        });
    for reading in std::iter::once(literal).chain(resolved) {
        if !out.contains(&reading) {
            out.push(reading);
        }
    }
}

/// The longest request path [`RouteRules::requirement`] reads (8 KiB); a longer one is refused.
pub const MAX_PATH_LEN: usize = 8 * 1024;

/// `path` split at `separators`, each segment cut at its first `;` when `strip_params`, `.` and
/// `..` segments resolved (never above the root), empty segments dropped, with a leading `/` and
/// a trailing one when the path ends in one (or in a dot segment).
fn resolve(path: &str, separators: &[char], strip_params: bool) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing = false;
    for segment in path.split(separators) {
        let segment = if strip_params {
            segment.split(';').next().unwrap_or("")
        } else {
            segment
        };
        trailing = matches!(segment, "" | "." | "..");
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len() + 1);
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    out
}

/// The path a gateway routes: the query cut off (a raw `#` is kept, as part of the path: some
/// upstreams read it so, and [`RouteRules::requirement`] refuses it), percent-escapes decoded (bytes that are not
/// UTF-8 stay escaped, each on its own), `.` and `..` segments resolved (never above the root),
/// `\` taken as a separator, repeated slashes merged, and a leading `/` ensured. This is one
/// reading of a path; the gate judges a request by all of them ([`RouteRules::requirement`]).
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    let path = path.split('?').next().unwrap_or("");
    let clean = path.starts_with('/')
        && !path.contains('%')
        && !path.contains("//")
        && !path
            .split('/')
            .any(|s| s == "." || s == ".." || s.contains('\\'));
    if clean {
        return Cow::Borrowed(path);
    }
    let decoded = decode_rounds(path).0.pop().unwrap_or_default();
    Cow::Owned(resolve(&decoded, &['/', '\\'], false))
}

/// `s`, then the result of each round of decoding its `%XX` escapes, while any remain and a round
/// changes something (at most four rounds). Bytes that do not form UTF-8 are escaped again, each
/// on its own, and the flag is `false` then.
pub(super) fn decode_rounds(s: &str) -> (Vec<String>, bool) {
    let mut rounds = vec![s.to_owned()];
    let mut clean = true;
    // Bounded: each round shortens the string or ends the loop.
    for _ in 0..4 {
        let current = rounds.last().map_or("", String::as_str);
        if !current.contains('%') {
            break;
        }
        let bytes = current.as_bytes();
        let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%'
                && let (Some(h), Some(l)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                )
            {
                out.push(h << 4 | l);
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        let next = match String::from_utf8(out) {
            Ok(next) => next,
            Err(e) => {
                clean = false;
                let mut next = String::with_capacity(e.as_bytes().len() * 3);
                for chunk in e.as_bytes().utf8_chunks() {
                    next.push_str(chunk.valid());
                    for b in chunk.invalid() {
                        let _ = write!(next, "%{b:02X}");
                    }
                }
                next
            }
        };
        if next == current {
            break;
        }
        rounds.push(next);
    }
    (rounds, clean)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_like_a_gateway() {
        for (raw, want) in [
            ("/admin", "/admin"),
            ("/admin/users?x=1", "/admin/users"),
            ("/public/../admin/x", "/admin/x"),
            ("/%61dmin/x", "/admin/x"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/public/%252e%252e/admin", "/admin"),
            ("//admin", "/admin"),
            ("/./admin/", "/admin/"),
            ("/../../admin", "/admin"),
            ("/public\\..\\admin", "/admin"),
            ("", "/"),
            ("admin", "/admin"),
        ] {
            assert_eq!(normalize_path(raw), want, "{raw}");
        }
    }

    #[test]
    fn prefixes_match_whole_segments() {
        let rule = RouteRule::new("/admin");
        assert!(rule.matches(&Method::GET, "/admin"));
        assert!(rule.matches(&Method::GET, "/admin/users"));
        assert!(rule.matches(&Method::GET, "/public/../admin"));
        assert!(!rule.matches(&Method::GET, "/administrator"));
        assert!(RouteRule::new("/").matches(&Method::GET, "/anything"));
        assert!(RouteRule::new("/admin/").matches(&Method::GET, "/admin/x"));
    }

    #[test]
    fn first_match_wins_then_the_default() {
        let rules = RouteRules::new(vec![
            RouteRule {
                methods: vec![Method::POST],
                ..RouteRule::new("/admin")
            },
            RouteRule {
                anonymous: true,
                ..RouteRule::new("/public")
            },
        ])
        .default_rule(RouteRule {
            scopes: ScopeSet::parse(["read"]).unwrap(),
            ..RouteRule::new("/")
        });
        assert_eq!(rules.position(&Method::POST, "/admin/x"), Some(0));
        assert_eq!(rules.position(&Method::GET, "/admin/x"), None);
        assert!(rules.matching(&Method::GET, "/public/a").anonymous);
        assert!(!rules.matching(&Method::GET, "/public/../admin").anonymous);
        assert!(rules.matching(&Method::GET, "/x").scopes.contains("read"));
    }

    #[test]
    fn a_rule_an_earlier_one_covers_is_shadowed() {
        let rule = |prefix: &str, methods: Vec<Method>| RouteRule {
            methods,
            ..RouteRule::new(prefix)
        };
        let shadows = |rules: Vec<RouteRule>| RouteRules::new(rules).shadows();
        let never = |rules: Vec<RouteRule>| RouteRules::new(rules).never_matching();
        // Never matches.
        for (rules, earlier) in [
            (vec![rule("/api", vec![]), rule("/api/admin", vec![])], 0),
            (
                vec![
                    rule("/api/", vec![]),
                    rule("/api/admin/", vec![Method::POST]),
                ],
                0,
            ),
            (vec![rule("/", vec![]), rule("/x", vec![])], 0),
            (
                vec![
                    rule("/x", vec![]),
                    rule("/api", vec![]),
                    rule("/api", vec![]),
                ],
                1,
            ),
            (
                vec![
                    rule("/api", vec![Method::GET, Method::POST]),
                    rule("/api/a", vec![Method::POST]),
                ],
                0,
            ),
        ] {
            let s = shadows(rules.clone());
            assert_eq!((s[0].earlier, &s[0].methods), (earlier, &vec![]));
            assert_eq!(never(rules).unwrap().1, [earlier]);
        }
        // Never matches: two earlier rules take a method each.
        let rules = vec![
            rule("/api", vec![Method::GET]),
            rule("/", vec![Method::POST]),
            rule("/api/a", vec![Method::GET, Method::POST]),
        ];
        assert_eq!(never(rules), Some((2, vec![0, 1])));
        // For some methods: reported, but the later rule still matches.
        let rules = vec![rule("/api", vec![Method::GET]), rule("/api/admin", vec![])];
        let s = shadows(rules.clone());
        assert_eq!((s[0].earlier, s[0].later), (0, 1));
        assert_eq!(s[0].methods, [Method::GET]);
        assert_eq!(never(rules), None);
        let rules = vec![
            rule("/api", vec![Method::GET]),
            rule("/api/a", vec![Method::GET, Method::POST]),
        ];
        assert_eq!(shadows(rules.clone())[0].methods, [Method::GET]);
        assert_eq!(never(rules), None);
        // A CORS preflight rule first shadows every later rule for `OPTIONS` only.
        let rules = vec![rule("/", vec![Method::OPTIONS]), rule("/admin", vec![])];
        assert_eq!(shadows(rules.clone())[0].methods, [Method::OPTIONS]);
        assert_eq!(never(rules), None);
        // In another case: the readings fold case, so `/api` takes `/API/admin`'s requests in
        // lower case; `/API/admin` still matches its own.
        let rules = vec![rule("/api", vec![]), rule("/API/admin", vec![])];
        let s = shadows(rules.clone());
        assert_eq!(s.len(), 1);
        assert!(s[0].case_only);
        assert_eq!(never(rules), None);
        // Not shadowed: the narrower rule first, other segments, other methods, the same prefix
        // for every other method, `HEAD` after `GET`.
        for rules in [
            vec![rule("/api/admin", vec![]), rule("/api", vec![])],
            vec![rule("/api", vec![]), rule("/apix", vec![])],
            vec![
                rule("/api", vec![Method::POST]),
                rule("/api", vec![Method::GET]),
            ],
            vec![rule("/api", vec![Method::GET]), rule("/api/", vec![])],
            vec![
                rule("/api", vec![Method::GET]),
                rule("/api", vec![Method::HEAD]),
            ],
        ] {
            assert_eq!(shadows(rules.clone()), [], "{rules:?}");
        }
    }

    fn attacked_rules() -> RouteRules {
        RouteRules::new(vec![
            RouteRule {
                scopes: ScopeSet::parse(["admin"]).unwrap(),
                ..RouteRule::new("/admin")
            },
            RouteRule {
                anonymous: true,
                ..RouteRule::new("/public")
            },
            RouteRule {
                methods: vec![Method::POST],
                scopes: ScopeSet::parse(["write"]).unwrap(),
                ..RouteRule::new("/api")
            },
            RouteRule {
                methods: vec![Method::GET],
                scopes: ScopeSet::parse(["read"]).unwrap(),
                ..RouteRule::new("/api")
            },
        ])
        .default_rule(RouteRule {
            scopes: ScopeSet::parse(["default"]).unwrap(),
            ..RouteRule::new("/")
        })
    }

    fn requirement(method: &str, path: &str) -> Requirement {
        attacked_rules()
            .requirement(&Method::from_bytes(method.as_bytes()).unwrap(), path)
            .unwrap()
    }

    fn scopes(r: &Requirement) -> Vec<&str> {
        r.scopes.iter().map(|s| s.as_str()).collect()
    }

    #[test]
    fn path_parameters_and_case_cannot_dodge_a_rule() {
        for path in [
            "/public/..;/admin/users",
            "/public/..;x=1/admin/users",
            "/public/..%3b/admin/users",
            "/admin;x/users",
            "/admin;jsessionid=1",
            "/ADMIN/users",
            "/Admin",
            "/public/../ADMIN/users",
            "/%41dmin/users",
            // Decoded once (as most upstreams do), these are under `/admin`; as written, or
            // decoded until no escape is left, they are not.
            "/%61dmin/x%252f..%252f..%252fother",
            "/public/%2e%2e/%61dmin/x%252f..%252f..%252fpublic",
        ] {
            let r = requirement("GET", path);
            assert!(!r.anonymous, "{path} must not pass without a token");
            assert!(scopes(&r).contains(&"admin"), "{path}: {r:?}");
        }
        // An upstream that decodes once more and re-parses ends the path at a decoded `#` or `?`.
        for path in ["/admin%23", "/admin%23/../x", "/admin%3F", "/admin%253F/x"] {
            let r = requirement("GET", path);
            assert!(scopes(&r).contains(&"admin"), "{path}: {r:?}");
        }
        // An upstream that leaves dot segments alone serves this under `/admin`.
        let r = requirement("GET", "/admin/../public/x");
        assert!(!r.anonymous);
        assert!(scopes(&r).contains(&"admin"), "{r:?}");
        // Too long to read every way: refused.
        let long = format!("/public/{}", "a".repeat(MAX_PATH_LEN));
        assert!(attacked_rules().requirement(&Method::GET, &long).is_err());
        // Stripping `;…` alone would judge this by `/public`; Go's router serves it under
        // `/admin`: both rules count.
        let r = requirement("GET", "/admin/..;x/public");
        assert!(!r.anonymous);
        assert_eq!(scopes(&r), ["admin"]);
        assert_eq!(r.rules, [Some(0), Some(1)]);
        // A request every reading puts under `/public` stays anonymous.
        for path in ["/public", "/public/a/b?x=1", "/public/%61", "/PUBLIC/a"] {
            let r = requirement("GET", path);
            if path == "/PUBLIC/a" {
                // Exactly, it is the default rule's; case-insensitively `/public`'s.
                assert!(!r.anonymous);
                assert_eq!(scopes(&r), ["default"]);
            } else {
                assert!(r.anonymous, "{path}: {r:?}");
                assert!(r.scopes.is_empty());
            }
        }
        // A path as written differs from its decoded form: both rules count.
        let r = requirement("GET", "/%70ublic/x");
        assert!(!r.anonymous);
        assert_eq!(scopes(&r), ["default"]);
    }

    /// `ſ` (U+017F) upper-cases to `S`, `ı` (U+0131) to `I`: Java's `equalsIgnoreCase`, Go's
    /// `strings.EqualFold` (`ſ`), Python's `casefold` (`ſ`) and .NET's `OrdinalIgnoreCase` match
    /// them with `s` and `i`; lower case alone leaves both as they are.
    #[test]
    fn case_folding_covers_characters_whose_upper_case_is_ascii() {
        let rules = RouteRules::new(vec![RouteRule {
            scopes: ScopeSet::parse(["admin"]).unwrap(),
            ..RouteRule::new("/settings")
        }]);
        for path in [
            "/%C5%BFettings/x",
            "/sett%C4%B1ngs/x",
            "/ſettings",
            "/SETTıNGS/x",
        ] {
            let r = rules.requirement(&Method::GET, path).unwrap();
            assert!(r.scopes.contains("admin"), "{path}: {:?}", r.rules);
        }
        // A prefix written with them is folded the same way.
        let rules = RouteRules::new(vec![RouteRule {
            scopes: ScopeSet::parse(["admin"]).unwrap(),
            ..RouteRule::new("/ſettings")
        }]);
        let r = rules.requirement(&Method::GET, "/settings/x").unwrap();
        assert!(r.scopes.contains("admin"), "{:?}", r.rules);
        // `İ` (U+0130) lower-cases to `i` to Java's `equalsIgnoreCase` (simple case mapping),
        // to `i` and U+0307 in Rust.
        let rules = RouteRules::new(vec![RouteRule {
            scopes: ScopeSet::parse(["admin"]).unwrap(),
            ..RouteRule::new("/internal")
        }]);
        for path in ["/%C4%B0nternal/x", "/İNTERNAL"] {
            let r = rules.requirement(&Method::GET, path).unwrap();
            assert!(r.scopes.contains("admin"), "{path}: {:?}", r.rules);
        }
        // And `i` followed by U+0307, as Python's `casefold` reads `İ`, whichever side has it.
        let rules = RouteRules::new(vec![RouteRule {
            scopes: ScopeSet::parse(["admin"]).unwrap(),
            ..RouteRule::new("/İstanbul")
        }]);
        for path in ["/i%CC%87stanbul/x", "/istanbul", "/%C4%B0stanbul"] {
            let r = rules.requirement(&Method::GET, path).unwrap();
            assert!(r.scopes.contains("admin"), "{path}: {:?}", r.rules);
        }
    }

    #[test]
    fn escapes_that_are_not_utf8_are_refused_not_left_undecoded() {
        let rules = attacked_rules();
        for path in [
            "/%61dmin/users/%FF",
            "/public/%C0%AE%C0%AE/admin",
            "/public/%c0%ae%c0%ae/admin",
            "/public/%25C0%25AE/admin",
            "/public%00/../admin",
            // A request target has no fragment: what follows a `#` is path to some upstreams.
            "/public#/../admin",
            "/public?x#/../admin",
        ] {
            let refused = rules.requirement(&Method::GET, path);
            assert!(
                matches!(refused, Err(AuthError::InvalidRequest(_))),
                "{path}: {refused:?}"
            );
        }
        // normalize_path still decodes what it can: the invalid byte alone stays escaped.
        assert_eq!(normalize_path("/%61dmin/users/%FF"), "/admin/users/%FF");
        assert!(RouteRule::new("/admin").matches(&Method::GET, "/%61dmin/users/%FF"));
        assert_eq!(normalize_path("/caf%C3%A9"), "/café");
        assert!(rules.requirement(&Method::GET, "/caf%C3%A9").is_ok());
    }

    /// The work of judging a request grows with the rules' methods, not with the spellings of a
    /// method it sends: one spelling stands for every other that no rule names, and one for each
    /// case-insensitive method in any case; the rules counted are the same.
    #[test]
    fn spellings_of_a_method_are_judged_once() {
        let rules = RouteRules::new(vec![
            RouteRule {
                methods: vec![Method::from_bytes(b"delete").unwrap()],
                anonymous: true,
                ..RouteRule::new("/x")
            },
            RouteRule {
                methods: vec![Method::DELETE],
                scopes: ScopeSet::parse(["admin"]).unwrap(),
                ..RouteRule::new("/x")
            },
            RouteRule {
                scopes: ScopeSet::parse(["write"]).unwrap(),
                ..RouteRule::new("/x")
            },
        ]);
        let spellings: Vec<Method> = (0..64u32)
            .map(|bits| {
                let name: String = "delete"
                    .chars()
                    .enumerate()
                    .map(|(i, c)| {
                        if bits >> i & 1 == 1 {
                            c.to_ascii_uppercase()
                        } else {
                            c
                        }
                    })
                    .collect();
                Method::from_bytes(name.as_bytes()).unwrap()
            })
            .collect();
        // As sent: `delete`, `DELETE` and one for the other 62; in any case: one.
        assert_eq!(rules.judged(&spellings).len(), 4);
        let r = rules.requirement_any(&spellings, "/x/%2561").unwrap();
        assert_eq!(r.rules, [Some(0), Some(2), Some(1)]);
        assert!(!r.anonymous);
        assert_eq!(scopes(&r), ["admin", "write"]);
        for one in &spellings {
            let r = rules.requirement(one, "/x").unwrap();
            assert!(
                r.rules
                    .iter()
                    .all(|i| [Some(0), Some(1), Some(2)].contains(i))
            );
        }
    }

    #[test]
    fn methods_ignore_case_and_get_covers_head() {
        // A method as sent matches no rule of `/api` unless it is exactly `POST` or `GET`: the
        // default rule counts too, so a lower-case method never gets less than the default.
        for (method, want) in [
            ("POST", &["write"][..]),
            ("post", &["default", "write"]),
            ("pOsT", &["default", "write"]),
            ("GET", &["read"]),
            ("get", &["default", "read"]),
            ("HEAD", &["default", "read"]),
            ("head", &["default", "read"]),
            ("PUT", &["default"]),
        ] {
            let r = requirement(method, "/api/x");
            assert_eq!(scopes(&r), want, "{method}");
        }
        // The loose match never makes a rule set laxer: `get` is judged by the anonymous `GET`
        // rule and by the rule for any method, which an upstream matching methods exactly uses.
        let rules = RouteRules::new(vec![
            RouteRule {
                methods: vec![Method::GET],
                anonymous: true,
                ..RouteRule::new("/x")
            },
            RouteRule {
                scopes: ScopeSet::parse(["admin"]).unwrap(),
                ..RouteRule::new("/x")
            },
        ]);
        let r = rules
            .requirement(&Method::from_bytes(b"get").unwrap(), "/x")
            .unwrap();
        assert!(!r.anonymous);
        assert_eq!(scopes(&r), ["admin"]);
        let r = rules.requirement(&Method::GET, "/x").unwrap();
        assert!(r.anonymous);
        let rule = RouteRule {
            methods: vec![Method::POST],
            ..RouteRule::new("/")
        };
        assert!(rule.matches(&Method::from_bytes(b"post").unwrap(), "/x"));
        assert!(!rule.matches(&Method::HEAD, "/x"));
    }
}
