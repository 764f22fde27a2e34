//! Scopes: what a token may do, and the rule that decides whether a set of granted scopes covers a
//! required one.
//!
//! A granted scope covers a required scope when it is
//! - the same string (`tokens:read` covers `tokens:read`),
//! - a wildcard over a resource (`tokens:*` covers `tokens:read` and `tokens:write:all`), or
//! - the global wildcard `*`, which covers everything.
//!
//! Scope strings follow RFC 6749 §3.3: 1 to 128 printable ASCII characters without spaces, `"` or
//! `\`.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One scope, such as `tokens:read`, `tokens:*` or `*`. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope(Arc<str>);

/// Why a string is not a valid scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidScope {
    reason: &'static str,
}

impl fmt::Display for InvalidScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason)
    }
}

impl std::error::Error for InvalidScope {}

impl Scope {
    /// Validates and wraps a scope string.
    pub fn new(scope: &str) -> Result<Self, InvalidScope> {
        if scope.is_empty() || scope.len() > 128 {
            return Err(InvalidScope {
                reason: "a scope must be 1 to 128 characters long",
            });
        }
        // RFC 6749 scope-token: %x21 / %x23-5B / %x5D-7E
        if !scope
            .bytes()
            .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
        {
            return Err(InvalidScope {
                reason: "a scope may contain only printable ASCII characters other than space, '\"' and '\\'",
            });
        }
        Ok(Self(Arc::from(scope)))
    }

    /// The scope string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this granted scope covers `required`.
    #[inline]
    pub fn covers(&self, required: &str) -> bool {
        scope_covers(&self.0, required)
    }
}

#[inline]
fn scope_covers(granted: &str, required: &str) -> bool {
    if granted == "*" || granted == required {
        return true;
    }
    // `resource:*` covers everything below `resource:`.
    match granted.strip_suffix('*') {
        Some(stem) if stem.ends_with(':') => {
            required.len() > stem.len() && required.starts_with(stem)
        }
        _ => false,
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Scope {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Scope {
    type Err = InvalidScope;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl Serialize for Scope {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

/// The scopes granted to a token: a small sorted, deduplicated set.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct ScopeSet(Arc<[Scope]>);

impl ScopeSet {
    /// The empty set.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Parses scope strings; fails on the first invalid one.
    pub fn parse<I, S>(scopes: I) -> Result<Self, InvalidScope>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        scopes
            .into_iter()
            .map(|s| Scope::new(s.as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map(Self::from_vec)
    }

    /// Parses a space-separated list, as in OAuth's `scope` parameter.
    pub fn parse_space_separated(scopes: &str) -> Result<Self, InvalidScope> {
        Self::parse(scopes.split_ascii_whitespace())
    }

    fn from_vec(mut scopes: Vec<Scope>) -> Self {
        scopes.sort();
        scopes.dedup();
        Self(scopes.into())
    }

    /// Whether some granted scope covers `required`.
    #[inline]
    pub fn grants(&self, required: &str) -> bool {
        self.0.iter().any(|g| g.covers(required))
    }

    /// Whether every scope of `required` is granted.
    pub fn grants_all(&self, required: &ScopeSet) -> bool {
        required.iter().all(|r| self.grants(r.as_str()))
    }

    /// The scopes of `required` that are not granted, in order.
    pub fn missing<'a>(&'a self, required: &'a ScopeSet) -> impl Iterator<Item = &'a Scope> + 'a {
        required.iter().filter(move |r| !self.grants(r.as_str()))
    }

    /// Iterates over the scopes in sorted order.
    pub fn iter(&self) -> std::slice::Iter<'_, Scope> {
        self.0.iter()
    }

    /// Number of scopes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the set contains exactly this scope string (no wildcard matching).
    pub fn contains(&self, scope: &str) -> bool {
        self.0.iter().any(|s| s.as_str() == scope)
    }

    /// The scopes joined with single spaces, as in `WWW-Authenticate: … scope="a b"`.
    pub fn to_space_separated(&self) -> String {
        let mut out = String::new();
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(' ');
            }
            out.push_str(s.as_str());
        }
        out
    }
}

impl fmt::Debug for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter()).finish()
    }
}

impl FromIterator<Scope> for ScopeSet {
    fn from_iter<T: IntoIterator<Item = Scope>>(iter: T) -> Self {
        Self::from_vec(iter.into_iter().collect())
    }
}

impl<'a> IntoIterator for &'a ScopeSet {
    type Item = &'a Scope;
    type IntoIter = std::slice::Iter<'a, Scope>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl Serialize for ScopeSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter())
    }
}

impl<'de> Deserialize<'de> for ScopeSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<Scope>::deserialize(d).map(Self::from_vec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &[&str]) -> ScopeSet {
        ScopeSet::parse(s).unwrap()
    }

    #[test]
    fn exact_resource_wildcard_and_global() {
        assert!(set(&["tokens:read"]).grants("tokens:read"));
        assert!(!set(&["tokens:read"]).grants("tokens:write"));
        assert!(set(&["tokens:*"]).grants("tokens:write"));
        assert!(set(&["tokens:*"]).grants("tokens:*"));
        assert!(!set(&["tokens:*"]).grants("tokensx:read"));
        assert!(!set(&["tokens:*"]).grants("tokens"));
        assert!(!set(&["tokens:read"]).grants("tokens:*"));
        assert!(set(&["*"]).grants("anything:at:all"));
        assert!(!set(&[]).grants("x"));
    }

    #[test]
    fn validation() {
        assert!(Scope::new("").is_err());
        assert!(Scope::new("a b").is_err());
        assert!(Scope::new("a\"b").is_err());
        assert!(Scope::new("personalAccessToken:read").is_ok());
    }

    #[test]
    fn sorted_and_deduplicated() {
        let s = set(&["b", "a", "b"]);
        assert_eq!(s.to_space_separated(), "a b");
        let granted = set(&["a"]);
        let missing: Vec<_> = granted.missing(&s).map(Scope::as_str).collect();
        assert_eq!(missing, ["b"]);
    }
}
