use std::borrow::Cow;
use std::fmt;

use super::TokenSecret;

/// Number of random base62 characters in a token.
pub(crate) const RANDOM_LEN: usize = 32;
/// Number of base62 characters that encode the CRC32 checksum (62^6 > 2^32).
pub(crate) const CHECKSUM_LEN: usize = 6;
/// Characters of the random part kept in the non-secret [`TokenFormat::start`].
const START_LEN: usize = 4;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The shape of the tokens a deployment issues and accepts: a prefix, 32 random base62 characters
/// and a 6-character base62 CRC32 checksum.
///
/// The prefix (default `pat_`) identifies the issuer to people and to secret scanners; pick one
/// per product, such as `acme_pat_`.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenFormat {
    prefix: Cow<'static, str>,
}

impl fmt::Debug for TokenFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenFormat")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Default for TokenFormat {
    fn default() -> Self {
        Self {
            prefix: Cow::Borrowed("pat_"),
        }
    }
}

/// Why a string is not a well-formed token. Returned by [`TokenFormat::check`] and
/// [`TokenFormat::with_prefix`]; the message never contains the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormatError {
    /// The token does not start with the configured prefix.
    Prefix,
    /// The token has the wrong length.
    Length,
    /// The token contains a character outside base62.
    Alphabet,
    /// The checksum does not match: a typo or an invented token.
    Checksum,
    /// A prefix passed to [`TokenFormat::with_prefix`] is empty, longer than 32 bytes or not made of
    /// ASCII letters, digits, `_` and `-`.
    InvalidPrefix,
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Prefix => "the token does not have the expected prefix",
            Self::Length => "the token has the wrong length",
            Self::Alphabet => "the token contains characters outside base62",
            Self::Checksum => "the token checksum does not match",
            Self::InvalidPrefix => {
                "a token prefix must be 1 to 32 ASCII letters, digits, '_' or '-'"
            }
        })
    }
}

impl std::error::Error for FormatError {}

impl TokenFormat {
    /// The default format, prefix `pat_`.
    pub fn new() -> Self {
        Self::default()
    }

    /// A format with its own prefix: 1 to 32 ASCII letters, digits, `_` or `-`.
    pub fn with_prefix(prefix: impl Into<Cow<'static, str>>) -> Result<Self, FormatError> {
        let prefix = prefix.into();
        let valid = !prefix.is_empty()
            && prefix.len() <= 32
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if valid {
            Ok(Self { prefix })
        } else {
            Err(FormatError::InvalidPrefix)
        }
    }

    /// The prefix every token of this format starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The total length of a token of this format, in bytes.
    pub fn token_len(&self) -> usize {
        self.prefix.len() + RANDOM_LEN + CHECKSUM_LEN
    }

    /// The regular expression a secret scanner registers to find tokens of this format: the
    /// prefix, then 38 base62 characters (32 random, 6 of checksum), between word boundaries. For
    /// the default format it is `\bpat_[0-9A-Za-z]{38}\b`. (A prefix that starts with `-` gets no
    /// leading `\b`, which could not match before it.)
    ///
    /// The pattern finds candidates; the checksum ([`check`](Self::check)) tells a real token
    /// from a string that merely looks like one, offline, so a scanner or the endpoint it reports
    /// to can drop almost every false positive without a lookup.
    pub fn scanner_pattern(&self) -> String {
        let lead = if self.prefix.starts_with('-') {
            ""
        } else {
            r"\b"
        };
        format!(
            r"{lead}{}[0-9A-Za-z]{{{}}}\b",
            self.prefix,
            RANDOM_LEN + CHECKSUM_LEN
        )
    }

    /// Generates a new token from the operating system's CSPRNG.
    ///
    /// # Panics
    ///
    /// Only if the operating system cannot provide random bytes, which leaves no safe way to go on.
    pub fn generate(&self) -> TokenSecret {
        let mut out = String::with_capacity(self.token_len());
        out.push_str(&self.prefix);
        let mut filled = 0;
        let mut buf = [0u8; 64];
        while filled < RANDOM_LEN {
            getrandom::fill(&mut buf).expect("the operating system CSPRNG failed");
            for &b in &buf {
                // Rejection sampling: 248 = 4 * 62 keeps every character equally likely.
                if b < 248 && filled < RANDOM_LEN {
                    out.push(BASE62[(b % 62) as usize] as char);
                    filled += 1;
                }
            }
        }
        let crc = crc32fast::hash(out.as_bytes());
        let mut check = [0u8; CHECKSUM_LEN];
        encode_base62(crc, &mut check);
        for c in check {
            out.push(c as char);
        }
        TokenSecret::new(out)
    }

    /// Checks a candidate token offline: prefix, length, alphabet and checksum. No I/O, no
    /// allocation; a few nanoseconds.
    pub fn check(&self, token: &str) -> Result<(), FormatError> {
        let bytes = token.as_bytes();
        let prefix = self.prefix.as_bytes();
        if bytes.len() != self.token_len() {
            return Err(if bytes.starts_with(prefix) {
                FormatError::Length
            } else {
                FormatError::Prefix
            });
        }
        if !bytes.starts_with(prefix) {
            return Err(FormatError::Prefix);
        }
        // Branch-free over the bytes: a token's characters are random, so a branch per character
        // class would be mispredicted on every other byte.
        let body = &bytes[prefix.len()..];
        if body
            .iter()
            .fold(0u8, |bad, &b| bad | BASE62_VALUE[usize::from(b)])
            & INVALID
            != 0
        {
            return Err(FormatError::Alphabet);
        }
        let (signed, check) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        if decode_base62(check) == u64::from(crc32fast::hash(signed)) {
            Ok(())
        } else {
            Err(FormatError::Checksum)
        }
    }

    /// The non-secret beginning of a token (prefix and first four random characters), shown in
    /// lists so people can tell their tokens apart. Returns `None` for a string that is not long
    /// enough to be a token of this format.
    pub fn start(&self, token: &str) -> Option<String> {
        let end = self.prefix.len() + START_LEN;
        token
            .get(..end)
            .filter(|_| token.starts_with(self.prefix.as_ref()))
            .map(str::to_owned)
    }
}

fn encode_base62(mut value: u32, out: &mut [u8; CHECKSUM_LEN]) {
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(value % 62) as usize];
        value /= 62;
    }
}

/// Marks a byte outside the base62 alphabet in [`BASE62_VALUE`].
const INVALID: u8 = 0x80;

/// The value of each base62 digit, [`INVALID`] for every other byte.
const BASE62_VALUE: [u8; 256] = {
    let mut table = [INVALID; 256];
    let mut i = 0;
    while i < BASE62.len() {
        table[BASE62[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// The value of base62 digits already checked to be in the alphabet.
fn decode_base62(digits: &[u8]) -> u64 {
    digits.iter().fold(0u64, |acc, &c| {
        acc * 62 + u64::from(BASE62_VALUE[usize::from(c)])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_pass_the_check() {
        let format = TokenFormat::new();
        for _ in 0..200 {
            let token = format.generate();
            assert_eq!(token.expose_secret().len(), 42);
            assert_eq!(format.check(token.expose_secret()), Ok(()));
        }
    }

    #[test]
    fn one_changed_character_fails_the_checksum() {
        let format = TokenFormat::new();
        let token = format.generate();
        let mut bytes = token.expose_secret().as_bytes().to_vec();
        bytes[10] = if bytes[10] == b'a' { b'b' } else { b'a' };
        let altered = String::from_utf8(bytes).unwrap();
        assert_eq!(format.check(&altered), Err(FormatError::Checksum));
    }

    #[test]
    fn wrong_prefix_length_and_alphabet() {
        let format = TokenFormat::new();
        let token = format.generate();
        let secret = token.expose_secret();
        assert_eq!(
            format.check(&secret.replace("pat_", "tap_")),
            Err(FormatError::Prefix)
        );
        assert_eq!(format.check(&secret[..41]), Err(FormatError::Length));
        let mut bad = secret.to_owned();
        bad.replace_range(5..6, "-");
        assert_eq!(format.check(&bad), Err(FormatError::Alphabet));
        assert_eq!(format.check(""), Err(FormatError::Prefix));
    }

    #[test]
    fn custom_prefix() {
        let format = TokenFormat::with_prefix("acme_").unwrap();
        let token = format.generate();
        assert!(token.expose_secret().starts_with("acme_"));
        assert_eq!(format.check(token.expose_secret()), Ok(()));
        assert_eq!(
            TokenFormat::new().check(token.expose_secret()),
            Err(FormatError::Prefix)
        );
        assert_eq!(
            TokenFormat::with_prefix("bad prefix"),
            Err(FormatError::InvalidPrefix)
        );
        assert_eq!(
            format.start(token.expose_secret()).unwrap().len(),
            "acme_".len() + 4
        );
    }
}
