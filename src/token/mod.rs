//! The secret itself: generation, the offline format check and the [`TokenHash`] that is stored.
//!
//! A token reads `<prefix><32 random base62 characters><6 base62 characters of CRC32>`, for example
//! `pat_3sNq0rVZbH9kq2Lw8xYtPzA1cDeFgHiJ0k4TzQ`. The random part carries 190 bits from the operating
//! system's CSPRNG; the checksum (CRC32 over prefix and random part) lets the layer reject a mistyped
//! or invented token without touching the cache or the store, and lets secret scanners recognise a
//! real token with few false positives.

mod format;
mod hash;
mod secret;

pub use format::{FormatError, TokenFormat};
pub use hash::{TokenHash, TokenHasher};
pub use secret::TokenSecret;
