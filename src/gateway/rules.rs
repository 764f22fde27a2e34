//! Route rules: which scopes a gateway requires for a request, by path prefix and method, and
//! which routes are open without a token. The first matching rule wins; a request no rule
//! matches gets the default rule (by default: a valid token, no scope beyond the layer's own).
//!
//! Paths are compared after [`normalize_path`]: percent-decoded, dot segments resolved and
//! repeated slashes merged, as the gateway itself routes them, so that `/public/../admin` or
//! `/%61dmin` is judged by the `/admin` rule and not by the rule its spelling starts with. A
//! prefix matches whole segments: `/admin` matches `/admin` and `/admin/users`, not
//! `/administrator`.

use std::borrow::Cow;

use http::Method;

use crate::scope::ScopeSet;

/// One rule: requests whose path is under `path_prefix` (and whose method is one of `methods`,
/// when any are given) need `scopes`, or no token at all when `anonymous`.
#[derive(Clone, Debug, Default)]
pub struct RouteRule {
    /// The path prefix the rule applies to (`/` for every path), matched by whole segments.
    pub path_prefix: String,
    /// The methods it applies to; empty for every method.
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

    /// Whether the rule applies to `method` and `path` (compared after [`normalize_path`]).
    pub fn matches(&self, method: &Method, path: &str) -> bool {
        self.matches_normalized(method, &normalize_path(path))
    }

    fn matches_normalized(&self, method: &Method, path: &str) -> bool {
        let prefix = self.path_prefix.trim_end_matches('/');
        let under = match path.strip_prefix(prefix) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        };
        under && (self.methods.is_empty() || self.methods.contains(method))
    }
}

/// Route rules, first match wins, and the rule for requests none matches.
#[derive(Clone, Debug, Default)]
pub struct RouteRules {
    rules: Vec<RouteRule>,
    default: RouteRule,
}

impl RouteRules {
    /// Rules tried in this order; requests none matches need a valid token and no scope.
    pub fn new(rules: Vec<RouteRule>) -> Self {
        Self {
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

    /// The index of the first rule that applies to `method` and `path`, `None` for the default.
    pub fn position(&self, method: &Method, path: &str) -> Option<usize> {
        let path = normalize_path(path);
        self.rules
            .iter()
            .position(|r| r.matches_normalized(method, &path))
    }

    /// The rule that applies to `method` and `path`: the first that matches, or the default.
    pub fn matching(&self, method: &Method, path: &str) -> &RouteRule {
        match self.position(method, path) {
            Some(i) => &self.rules[i],
            None => &self.default,
        }
    }
}

/// The path a gateway routes: the query cut off, percent-escapes decoded (bytes that are not
/// UTF-8 stay escaped), `.` and `..` segments resolved (never above the root), repeated slashes
/// merged, and a leading `/` ensured. A rule matches this form, whatever the client's spelling.
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let clean = path.starts_with('/')
        && !path.contains('%')
        && !path.contains("//")
        && !path
            .split('/')
            .any(|s| s == "." || s == ".." || s.contains('\\'));
    if clean {
        return Cow::Borrowed(path);
    }
    let decoded = percent_decode(path);
    let mut segments: Vec<&str> = Vec::new();
    // A backslash is a separator to some servers: treat it as one.
    for segment in decoded.split(['/', '\\']) {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len() + 1);
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    if out.is_empty() || (trailing && !out.ends_with('/')) {
        out.push('/');
    }
    Cow::Owned(out)
}

/// Decodes `%XX` escapes, repeatedly while any remain (a double-encoded `%252e` is a `.` to a
/// gateway that decodes twice); sequences that do not decode to UTF-8 stay as they were.
fn percent_decode(s: &str) -> String {
    let mut current = s.to_owned();
    // Bounded: each round shortens the string.
    for _ in 0..4 {
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
        match String::from_utf8(out) {
            Ok(next) if next != current => current = next,
            _ => break,
        }
    }
    current
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
}
