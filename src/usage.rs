//! Write-behind of usage: when and from where each token was last used.

use std::net::IpAddr;

use chrono::{DateTime, Utc};

/// One token's usage since the last flush: the input of
/// [`TokenLookup::record_usage`](crate::store::TokenLookup::record_usage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageUpdate {
    /// The token's record id.
    pub token_id: String,
    /// The latest use.
    pub last_used_at: DateTime<Utc>,
    /// The most recent distinct client addresses, newest first.
    pub ips: Vec<IpAddr>,
}

impl UsageUpdate {
    /// A usage mark for one token.
    pub fn new(token_id: &str, last_used_at: DateTime<Utc>, ips: Vec<IpAddr>) -> Self {
        Self {
            token_id: token_id.to_owned(),
            last_used_at,
            ips,
        }
    }
}
