//! Scope parsing and matching (`Scope::new`, `ScopeSet::parse`, `grants`, `grants_all`,
//! `missing`).
//!
//! Properties: never panics; validation is RFC 6749 §3.3 (1 to 128 of `%x21 / %x23-5B /
//! %x5D-7E`); a set grants each of its own scopes; `*` grants everything; `res:*` grants
//! `res:<anything non-empty>`, and nothing else grants more than itself; `grants_all` and
//! `missing` agree with `grants`; covering is transitive (a set that grants all of another set's
//! scopes grants everything that set grants, which is what "a token never gets more than its
//! creator" rests on); display/parse and JSON round-trip.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tower_pat::{Scope, ScopeSet};

#[derive(Arbitrary, Debug)]
enum Text<'a> {
    Raw(&'a str),
    /// Up to 8 characters over a small alphabet, so that wildcards and shared stems are common.
    Small(Vec<u8>),
}

impl Text<'_> {
    fn render(&self) -> String {
        const ALPHABET: &[u8] = b"ab:*x:";
        match self {
            Text::Raw(s) => (*s).to_owned(),
            Text::Small(bytes) => bytes
                .iter()
                .take(8)
                .map(|&b| char::from(ALPHABET[usize::from(b) % ALPHABET.len()]))
                .collect(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    a: Vec<Text<'a>>,
    b: Vec<Text<'a>>,
    required: Vec<Text<'a>>,
    spaced: &'a str,
}

fn reference_valid(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
}

/// The matching rule, written from its definition.
fn reference_covers(granted: &str, required: &str) -> bool {
    if granted == "*" || granted == required {
        return true;
    }
    if granted.len() >= 2 && granted.ends_with(":*") {
        let stem = &granted[..granted.len() - 1]; // `res:`
        return required.len() > stem.len() && required.starts_with(stem);
    }
    false
}

fn texts(list: &[Text<'_>]) -> Vec<String> {
    list.iter().take(12).map(Text::render).collect()
}

/// The valid scopes of `list`, as a set.
fn valid_set(list: &[String]) -> ScopeSet {
    list.iter().filter_map(|s| Scope::new(s).ok()).collect()
}

fuzz_target!(|input: Input<'_>| {
    let a_texts = texts(&input.a);
    let b_texts = texts(&input.b);
    let required_texts = texts(&input.required);

    for s in a_texts.iter().chain(&b_texts).chain(&required_texts) {
        match Scope::new(s) {
            Ok(scope) => {
                assert!(reference_valid(s), "{s:?} accepted");
                assert_eq!(scope.as_str(), s);
                assert_eq!(scope.to_string(), *s);
                assert_eq!(s.parse::<Scope>().as_ref(), Ok(&scope));
                let json = serde_json::to_string(&scope).unwrap();
                assert_eq!(serde_json::from_str::<Scope>(&json).unwrap(), scope);
                assert!(scope.covers(s), "a scope covers itself");
            }
            Err(_) => {
                assert!(!reference_valid(s), "{s:?} refused");
                let json = serde_json::to_string(s).unwrap();
                assert!(serde_json::from_str::<Scope>(&json).is_err());
            }
        }
    }

    // parse succeeds exactly when every scope is valid.
    let parsed = ScopeSet::parse(&a_texts);
    assert_eq!(parsed.is_ok(), a_texts.iter().all(|s| reference_valid(s)));
    let a = valid_set(&a_texts);
    let b = valid_set(&b_texts);
    let required = valid_set(&required_texts);
    if let Ok(parsed) = parsed {
        assert_eq!(parsed, a);
    }

    // Sorted, deduplicated, made of the given scopes only.
    let listed: Vec<&str> = a.iter().map(Scope::as_str).collect();
    assert!(listed.windows(2).all(|w| w[0] < w[1]), "{listed:?}");
    for s in &listed {
        assert!(a_texts.iter().any(|t| t == s));
        assert!(a.contains(s));
        assert!(a.grants(s), "a set grants each of its own scopes");
    }

    // Matching agrees with the rule, on any string (valid or not) as the required scope.
    for r in a_texts
        .iter()
        .chain(&b_texts)
        .chain(&required_texts)
        .map(String::as_str)
        .chain([input.spaced, "*", "", "a:", "a:*"])
    {
        let expected = a.iter().any(|g| reference_covers(g.as_str(), r));
        assert_eq!(a.grants(r), expected, "{a:?} grants {r:?}");
        if a.contains("*") {
            assert!(a.grants(r), "`*` grants {r:?}");
        }
        // Transitivity: if `a` grants all of `b`, whatever `b` grants `a` grants too.
        if a.grants_all(&b) && b.grants(r) {
            assert!(a.grants(r), "{a:?} covers {b:?}, which grants {r:?}");
        }
        // A larger set grants at least as much.
        let union: ScopeSet = a.iter().chain(b.iter()).cloned().collect();
        if a.grants(r) || b.grants(r) {
            assert!(union.grants(r));
        }
    }
    if a.contains("*") {
        assert!(a.grants_all(&b) && a.grants_all(&required));
    }

    // `grants_all` and `missing` agree with `grants`, in `required`'s order.
    let missing: Vec<&Scope> = a.missing(&required).collect();
    let expected: Vec<&Scope> = required.iter().filter(|r| !a.grants(r.as_str())).collect();
    assert_eq!(missing, expected);
    assert_eq!(a.grants_all(&required), missing.is_empty());
    assert!(a.grants_all(&ScopeSet::empty()));
    assert!(a.grants_all(&a));

    // Round trips: space-separated and JSON.
    let spaced = a.to_space_separated();
    assert_eq!(ScopeSet::parse_space_separated(&spaced).as_ref(), Ok(&a));
    let json = serde_json::to_string(&a).unwrap();
    assert_eq!(serde_json::from_str::<ScopeSet>(&json).unwrap(), a);
    assert_eq!(
        ScopeSet::parse_space_separated(input.spaced),
        ScopeSet::parse(input.spaced.split_ascii_whitespace())
    );
});
