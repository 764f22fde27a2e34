use std::fmt;

/// A token in clear text, as handed to its owner once.
///
/// `Debug` and `Display` print `[redacted]`, so a secret that reaches a log line or an error
/// message by accident stays secret. Read it deliberately with [`TokenSecret::expose_secret`].
/// The bytes are overwritten when the value is dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenSecret(String);

impl TokenSecret {
    /// Wraps a token string received from a client or read from configuration.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The token in clear text. Show it to its owner once; never log or store it.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenSecret([redacted])")
    }
}

impl fmt::Display for TokenSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Drop for TokenSecret {
    fn drop(&mut self) {
        // Best effort: overwrite the bytes before the allocation is freed. `black_box` keeps the
        // compiler from dropping the writes as dead stores.
        let mut bytes = std::mem::take(&mut self.0).into_bytes();
        bytes.iter_mut().for_each(|b| *b = 0);
        std::hint::black_box(&bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let s = TokenSecret::new("pat_supersecret");
        assert!(!format!("{s:?}").contains("supersecret"));
        assert!(!format!("{s}").contains("supersecret"));
        assert_eq!(s.expose_secret(), "pat_supersecret");
    }
}
