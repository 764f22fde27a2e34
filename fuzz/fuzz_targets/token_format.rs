//! The offline token format check (`TokenFormat::check`, `with_prefix`, `start`, `generate`)
//! against a reference written here from the format's definition (DESIGN.md §4):
//! `<prefix><32 base62 characters><6 base62 characters encoding the CRC32 (IEEE) of everything
//! before them, most significant digit first>`, base62 being `0-9A-Za-z` in that order.
//!
//! The reference shares no code with the crate: its own alphabet mapping, its own bitwise CRC32,
//! and it checks the checksum by encoding the CRC and comparing strings (the crate decodes).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tower_pat::TokenFormat;
use tower_pat::token::FormatError;

const RANDOM_LEN: usize = 32;
const CHECK_LEN: usize = 6;

#[derive(Arbitrary, Debug)]
enum Prefix<'a> {
    Default,
    Custom(&'a str),
}

#[derive(Arbitrary, Debug)]
enum Candidate<'a> {
    /// Any string.
    Raw(&'a str),
    /// A well-formed token built by the reference from these random characters (each byte picks
    /// a base62 digit), then edited.
    Built {
        random: [u8; RANDOM_LEN],
        edit: Edit,
    },
}

#[derive(Arbitrary, Debug)]
enum Edit {
    None,
    /// Replace the byte at this position (modulo the length) with an ASCII byte.
    Replace(u8, u8),
    /// Swap two positions.
    Swap(u8, u8),
    /// Drop the last byte.
    Truncate,
    /// Append a byte.
    Append(u8),
    /// Replace the checksum with these six digits.
    Checksum([u8; CHECK_LEN]),
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Ok,
    Prefix,
    Length,
    Alphabet,
    Checksum,
}

fn base62_value(b: u8) -> Option<u32> {
    match b {
        b'0'..=b'9' => Some(u32::from(b - b'0')),
        b'A'..=b'Z' => Some(u32::from(b - b'A') + 10),
        b'a'..=b'z' => Some(u32::from(b - b'a') + 36),
        _ => None,
    }
}

fn base62_digit(v: u32) -> u8 {
    match v {
        0..=9 => b'0' + v as u8,
        10..=35 => b'A' + (v - 10) as u8,
        36..=61 => b'a' + (v - 36) as u8,
        _ => unreachable!("a base62 digit is below 62"),
    }
}

/// CRC-32/ISO-HDLC (the zlib CRC), bit by bit.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

/// The six checksum characters of `signed`.
fn checksum(signed: &[u8]) -> [u8; CHECK_LEN] {
    let mut value = crc32(signed);
    let mut out = [0u8; CHECK_LEN];
    for slot in out.iter_mut().rev() {
        *slot = base62_digit(value % 62);
        value /= 62;
    }
    assert_eq!(value, 0, "62^6 > 2^32: six digits hold any CRC32");
    out
}

fn reference_prefix_valid(prefix: &str) -> bool {
    (1..=32).contains(&prefix.len())
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn reference_check(prefix: &str, token: &[u8]) -> Verdict {
    let has_prefix = token.starts_with(prefix.as_bytes());
    if token.len() != prefix.len() + RANDOM_LEN + CHECK_LEN {
        return if has_prefix {
            Verdict::Length
        } else {
            Verdict::Prefix
        };
    }
    if !has_prefix {
        return Verdict::Prefix;
    }
    let body = &token[prefix.len()..];
    if body.iter().any(|&b| base62_value(b).is_none()) {
        return Verdict::Alphabet;
    }
    let (signed, check) = token.split_at(token.len() - CHECK_LEN);
    if checksum(signed) == check {
        Verdict::Ok
    } else {
        Verdict::Checksum
    }
}

fn verdict(result: Result<(), FormatError>) -> Verdict {
    match result {
        Ok(()) => Verdict::Ok,
        Err(FormatError::Prefix) => Verdict::Prefix,
        Err(FormatError::Length) => Verdict::Length,
        Err(FormatError::Alphabet) => Verdict::Alphabet,
        Err(FormatError::Checksum) => Verdict::Checksum,
        Err(other) => panic!("check returned {other:?}, which is not about a token"),
    }
}

fn build(prefix: &str, random: &[u8; RANDOM_LEN], edit: &Edit) -> Vec<u8> {
    let mut token = prefix.as_bytes().to_vec();
    token.extend(random.iter().map(|&b| base62_digit(u32::from(b) % 62)));
    let check = checksum(&token);
    token.extend_from_slice(&check);
    assert_eq!(reference_check(prefix, &token), Verdict::Ok);
    let len = token.len();
    match *edit {
        Edit::None => {}
        Edit::Replace(at, byte) => token[usize::from(at) % len] = byte & 0x7f,
        Edit::Swap(a, b) => token.swap(usize::from(a) % len, usize::from(b) % len),
        Edit::Truncate => {
            token.pop();
        }
        Edit::Append(byte) => token.push(byte & 0x7f),
        Edit::Checksum(digits) => {
            for (slot, d) in token[len - CHECK_LEN..].iter_mut().zip(digits) {
                *slot = base62_digit(u32::from(d) % 62);
            }
        }
    }
    token
}

fuzz_target!(|input: (Prefix<'_>, Candidate<'_>)| {
    let (prefix, candidate) = input;
    let format = match prefix {
        Prefix::Default => TokenFormat::new(),
        Prefix::Custom(p) => {
            let made = TokenFormat::with_prefix(p.to_owned());
            assert_eq!(made.is_ok(), reference_prefix_valid(p), "prefix {p:?}");
            match made {
                Ok(format) => format,
                Err(e) => {
                    assert_eq!(e, FormatError::InvalidPrefix);
                    return;
                }
            }
        }
    };
    let prefix = format.prefix().to_owned();
    assert_eq!(format.token_len(), prefix.len() + RANDOM_LEN + CHECK_LEN);

    let bytes = match candidate {
        Candidate::Raw(s) => s.as_bytes().to_vec(),
        Candidate::Built { random, edit } => build(&prefix, &random, &edit),
    };
    // Edits keep ASCII, so this only skips raw input that `&str` already made valid.
    let Ok(token) = std::str::from_utf8(&bytes) else {
        return;
    };
    let expected = reference_check(&prefix, token.as_bytes());
    assert_eq!(verdict(format.check(token)), expected, "token {token:?}");

    // `start` is the prefix and the first four characters, for anything that starts like a token.
    let end = prefix.len() + 4;
    let start = format.start(token);
    let expected_start = (token.starts_with(&prefix) && token.is_char_boundary(end))
        .then(|| token.get(..end))
        .flatten();
    assert_eq!(start.as_deref(), expected_start, "start of {token:?}");

    // Round trip: a generated token passes both checks; one changed random character fails
    // the checksum in both.
    let generated = format.generate();
    let secret = generated.expose_secret();
    assert_eq!(format.check(secret), Ok(()));
    assert_eq!(reference_check(&prefix, secret.as_bytes()), Verdict::Ok);
    let mut changed = secret.as_bytes().to_vec();
    let at = prefix.len() + usize::from(bytes.len() as u8) % RANDOM_LEN;
    changed[at] = if changed[at] == b'0' { b'1' } else { b'0' };
    let changed = std::str::from_utf8(&changed).expect("ASCII");
    assert_eq!(verdict(format.check(changed)), Verdict::Checksum);
    assert_eq!(
        reference_check(&prefix, changed.as_bytes()),
        Verdict::Checksum
    );
    // The secret never shows in Debug.
    assert!(!format!("{generated:?}").contains(&secret[prefix.len()..]));
});
