use std::fmt;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// The SHA-256 digest of a token (or its HMAC-SHA256 under a server pepper): the only form in which
/// a token is stored. It is never logged: a hash confirms a guess, and without a pepper it is
/// all a database lookup needs.
///
/// It is the key of the stores' unique index. Only [`to_hex`](Self::to_hex) gives it in
/// lowercase hex (for the stores and their change feeds), on purpose: `Debug` prints
/// `TokenHash(..)`, and there is no `Display`, so that neither `{:?}` nor `{}` in a log line or
/// an error can print it.
///
/// ```compile_fail
/// fn log_line(hash: tower_pat::TokenHash) -> String {
///     format!("{hash}")
/// }
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// Wraps a 32-byte digest read back from a store.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Reads a digest from a byte slice, `None` unless it is exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(Self)
    }

    /// The digest in lowercase hex (64 characters).
    pub fn to_hex(&self) -> String {
        Self::hex_of(&self.0)
    }

    pub(crate) fn hex_of(bytes: &[u8]) -> String {
        let mut s = String::with_capacity(bytes.len() * 2);
        for &b in bytes {
            s.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
            s.push(char::from_digit(u32::from(b & 0xf), 16).unwrap_or('0'));
        }
        s
    }

    /// Parses 64 hex characters, `None` for anything else.
    pub fn from_hex(hex: &str) -> Option<Self> {
        let bytes = hex.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = char::from(pair[0]).to_digit(16)?;
            let lo = char::from(pair[1]).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(Self(out))
    }

    /// The first eight bytes as an integer: the digest is uniformly distributed, so this is a
    /// perfect hash-map hash for it.
    #[inline]
    pub(crate) fn prefix_u64(&self) -> u64 {
        u64::from_le_bytes([
            self.0[0], self.0[1], self.0[2], self.0[3], self.0[4], self.0[5], self.0[6], self.0[7],
        ])
    }
}

impl std::hash::Hash for TokenHash {
    /// Feeds the first eight bytes: the digest is already uniformly distributed.
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.prefix_u64());
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenHash(..)")
    }
}

/// How a token becomes its [`TokenHash`]: plain SHA-256 (the default) or HMAC-SHA256 keyed with a
/// server-side pepper, so that a leaked database alone cannot be used to confirm guesses.
///
/// Peppers rotate: [`TokenHasher::with_previous_peppers`] keeps old peppers as candidates. A token
/// whose hash under the current pepper is unknown is looked up under each previous pepper in turn
/// (on a cache miss only), so tokens issued before the rotation keep working.
#[derive(Clone, Default)]
pub struct TokenHasher {
    current: Option<Arc<Hmac<Sha256>>>,
    previous: Arc<[Option<Hmac<Sha256>>]>,
}

impl fmt::Debug for TokenHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenHasher")
            .field(
                "algorithm",
                &if self.current.is_some() {
                    "hmac-sha256"
                } else {
                    "sha256"
                },
            )
            .field("previous_peppers", &self.previous.len())
            .finish()
    }
}

impl TokenHasher {
    /// Plain SHA-256.
    pub fn sha256() -> Self {
        Self::default()
    }

    /// HMAC-SHA256 keyed with `pepper` (any length; 32 random bytes recommended).
    pub fn with_pepper(pepper: impl AsRef<[u8]>) -> Self {
        Self {
            current: Some(Arc::new(hmac_key(pepper.as_ref()))),
            previous: Arc::from([]),
        }
    }

    /// Peppers used before the current one, newest first, tried in turn on a cache miss.
    /// An empty pepper stands for plain SHA-256 (the state before a pepper was introduced).
    pub fn with_previous_peppers<I, P>(mut self, peppers: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: AsRef<[u8]>,
    {
        self.previous = peppers
            .into_iter()
            .map(|p| {
                let p = p.as_ref();
                (!p.is_empty()).then(|| hmac_key(p))
            })
            .collect();
        self
    }

    /// The hash under which a token is stored now.
    #[inline]
    pub fn hash(&self, token: &str) -> TokenHash {
        match &self.current {
            None => TokenHash(Sha256::digest(token.as_bytes()).into()),
            Some(key) => mac(key, token),
        }
    }

    /// Hashes under the previous peppers, newest first (empty without rotation). An empty
    /// previous pepper stands for plain SHA-256.
    pub fn previous_hashes(&self, token: &str) -> Vec<TokenHash> {
        self.previous
            .iter()
            .map(|key| match key {
                Some(key) => mac(key, token),
                None => TokenHash(Sha256::digest(token.as_bytes()).into()),
            })
            .collect()
    }
}

fn hmac_key(pepper: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    <Hmac<Sha256> as Mac>::new_from_slice(pepper).expect("HMAC accepts keys of any length")
}

fn mac(key: &Hmac<Sha256>, token: &str) -> TokenHash {
    let mut mac = key.clone();
    mac.update(token.as_bytes());
    TokenHash(mac.finalize().into_bytes().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_the_reference() {
        // echo -n abc | sha256sum
        assert_eq!(
            TokenHasher::sha256().hash("abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn debug_never_prints_the_digest() {
        let hash = TokenHasher::sha256().hash("pat_example");
        let hex = hash.to_hex();
        assert_eq!(format!("{hash:?}"), "TokenHash(..)");
        let record = crate::record::NewToken::new("alice", "ci")
            .build(
                &crate::token::TokenFormat::new(),
                &TokenHasher::sha256(),
                chrono::Utc::now(),
            )
            .0;
        let printed = format!("{record:?}");
        assert!(!printed.contains(&record.hash.to_hex()), "{printed}");
        assert!(!printed.contains(&hex[..16]));
    }

    #[test]
    fn hex_round_trip() {
        let h = TokenHasher::sha256().hash("x");
        assert_eq!(TokenHash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(TokenHash::from_hex("zz"), None);
    }

    #[test]
    fn pepper_changes_the_hash_and_rotation_keeps_the_old() {
        let plain = TokenHasher::sha256().hash("t");
        let old = TokenHasher::with_pepper(b"old").hash("t");
        let new = TokenHasher::with_pepper(b"new").with_previous_peppers([b"old"]);
        assert_ne!(plain, old);
        assert_ne!(new.hash("t"), old);
        assert_eq!(new.previous_hashes("t"), vec![old]);
        let introduced = TokenHasher::with_pepper(b"p").with_previous_peppers([b""]);
        assert_eq!(introduced.previous_hashes("t"), vec![plain]);
    }
}
