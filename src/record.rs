//! [`TokenRecord`], what a store keeps about a token, and the rules about it: whether it is active,
//! whether a client address is allowed, how usage marks merge.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use ipnet::IpNet;

use crate::scope::{InvalidScope, ScopeSet};
use crate::token::{TokenFormat, TokenHash, TokenHasher, TokenSecret};

/// How many distinct recent client addresses a record keeps in [`TokenRecord::last_used_ips`].
pub const MAX_LAST_USED_IPS: usize = 5;

/// Everything a store keeps about one token. The secret itself is never part of it: only its
/// [`TokenHash`] and a short non-secret [`start`](TokenRecord::start).
///
/// `Debug` is safe to log: the hashes print as `TokenHash(..)` and nothing else is secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    /// Stable identifier (a random UUID in its 36-character form), used by the management API.
    pub id: String,
    /// The owner: the user or service account the token acts for.
    pub subject: String,
    /// A human-readable name, 1–256 characters, unique per subject.
    pub name: String,
    /// What the token may do.
    pub scopes: ScopeSet,
    /// A free-form type, `personal` by default (`service`, `ci`, …).
    pub token_type: String,
    /// Client networks the token may be used from; empty means anywhere.
    pub ip_restriction: Vec<IpNet>,
    /// When the token was created.
    pub created_at: DateTime<Utc>,
    /// When the record last changed through the management API.
    pub updated_at: DateTime<Utc>,
    /// When the token stops working; `None` means never.
    pub expires_at: Option<DateTime<Utc>>,
    /// When the token was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Since when the token is disabled, if it is: refused like a revoked one, but reversible
    /// ([`TokenPatch::enable`](crate::TokenPatch::enable)).
    pub disabled_at: Option<DateTime<Utc>>,
    /// When the token was last used (the "seenAt" of some APIs); written behind, so it may lag.
    pub last_used_at: Option<DateTime<Utc>>,
    /// The most recent distinct client addresses, newest first, at most [`MAX_LAST_USED_IPS`].
    pub last_used_ips: Vec<IpAddr>,
    /// When the secret was last rotated.
    pub last_rotated_at: Option<DateTime<Utc>>,
    /// The hash of the current secret.
    pub hash: TokenHash,
    /// The non-secret beginning of the token (prefix and four characters).
    pub start: String,
    /// After a rotation with a grace period: the previous secret's hash and when it stops working.
    pub previous_hash: Option<(TokenHash, DateTime<Utc>)>,
    /// How many management writes changed the record: 0 at creation, one more for every
    /// [`update`](crate::TokenStore::update), [`rotate`](crate::TokenStore::rotate) and the
    /// [`revoke`](crate::TokenStore::revoke) that revokes it (usage marks do not count). A write
    /// made from a read of the record can require this version
    /// ([`TokenPatch::if_version`](crate::TokenPatch::if_version)), so that it never applies on
    /// top of a change it did not see.
    pub version: u64,
}

impl TokenRecord {
    /// Whether the token has been revoked.
    pub fn is_revoked(&self) -> bool {
        self.revoked_at.is_some()
    }

    /// Whether this record, as a [`revoke`](crate::TokenStore::revoke) written at `at` returned
    /// it, was revoked by that write: a revocation is set once, so a record revoked earlier (by a
    /// concurrent request) keeps its own time. Every revocation's event is sent only then, once.
    #[cfg(feature = "admin")]
    pub(crate) fn revoked_by_write_at(&self, at: DateTime<Utc>) -> bool {
        self.revoked_at == Some(at)
    }

    /// Whether the token has expired at `now` (an expiry equal to `now` counts as expired).
    pub fn is_expired_at(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|exp| exp <= now)
    }

    /// Whether the token is disabled (reversibly).
    pub fn is_disabled(&self) -> bool {
        self.disabled_at.is_some()
    }

    /// Whether [retention](crate::retention) may remove the record at `cutoff`: revoked before
    /// `cutoff`, or expired before it. Never a record that is not revoked and has no expiry or a
    /// later one, whatever else holds (a disabled token that has not expired is kept).
    /// [`TokenStore::purge`](crate::TokenStore::purge) removes exactly these.
    pub fn is_purgeable(&self, cutoff: DateTime<Utc>) -> bool {
        self.revoked_at.is_some_and(|at| at < cutoff)
            || self.expires_at.is_some_and(|exp| exp < cutoff)
    }

    /// Whether the token is usable at `now`: neither revoked, disabled nor expired.
    pub fn is_active_at(&self, now: DateTime<Utc>) -> bool {
        !self.is_revoked() && !self.is_disabled() && !self.is_expired_at(now)
    }

    /// Whether the record answers to `hash`: its current hash, or its previous hash while the
    /// rotation grace period lasts.
    pub fn matches_hash(&self, hash: &TokenHash, now: DateTime<Utc>) -> bool {
        self.hash == *hash
            || self
                .previous_hash
                .is_some_and(|(h, until)| h == *hash && until > now)
    }

    /// Whether a request from `ip` may use the token. Without a restriction every address may; with
    /// one, an unknown address (`None`) may not.
    pub fn ip_allowed(&self, ip: Option<IpAddr>) -> bool {
        ip_allowed(&self.ip_restriction, ip)
    }

    /// Merges a usage mark: `last_used_at` only moves forward, and the address list keeps the newest
    /// distinct addresses first. Applying the same or an older update again changes nothing that
    /// matters.
    pub fn apply_usage(&mut self, update: &UsageUpdate) {
        merge_usage(&mut self.last_used_at, &mut self.last_used_ips, update);
    }
}

/// One token's usage since the last flush: the input of
/// [`TokenLookup::record_usage`](crate::TokenLookup::record_usage), written by the
/// [`UsageRecorder`](crate::UsageRecorder) and merged into records with
/// [`TokenRecord::apply_usage`]. It lives beside the record it updates, below the store contract and
/// the recorder, which both use it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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

    /// Merges a later or earlier mark of the same token: the later time wins, addresses keep the
    /// newest first.
    pub(crate) fn merge(&mut self, last_used_at: DateTime<Utc>, ips: &[IpAddr]) {
        if last_used_at >= self.last_used_at {
            self.ips = merge_ips(ips, &self.ips);
            self.last_used_at = last_used_at;
        } else {
            self.ips = merge_ips(&self.ips, ips);
        }
    }
}

/// [`TokenRecord::apply_usage`] on the bare usage fields, for stores that keep only those at hand.
pub(crate) fn merge_usage(
    last_used_at: &mut Option<DateTime<Utc>>,
    last_used_ips: &mut Vec<IpAddr>,
    update: &UsageUpdate,
) {
    let newer = last_used_at.is_none_or(|t| update.last_used_at >= t);
    let (first, second) = if newer {
        (update.ips.as_slice(), last_used_ips.as_slice())
    } else {
        (last_used_ips.as_slice(), update.ips.as_slice())
    };
    *last_used_ips = merge_ips(first, second);
    if newer {
        *last_used_at = Some(update.last_used_at);
    }
}

/// `first` then `second`, without repeats, at most [`MAX_LAST_USED_IPS`].
pub(crate) fn merge_ips(first: &[IpAddr], second: &[IpAddr]) -> Vec<IpAddr> {
    let mut out = Vec::with_capacity(MAX_LAST_USED_IPS);
    for ip in first.iter().chain(second) {
        if out.len() == MAX_LAST_USED_IPS {
            break;
        }
        if !out.contains(ip) {
            out.push(*ip);
        }
    }
    out
}

/// The IP rule shared by records and cached principals. IPv4 peers and networks match their
/// IPv4-mapped IPv6 forms both ways (see [`canonical_net`]), also for networks not built by
/// [`parse_ip_net`].
#[inline]
pub(crate) fn ip_allowed(restriction: &[IpNet], ip: Option<IpAddr>) -> bool {
    if restriction.is_empty() {
        return true;
    }
    let Some(ip) = ip else { return false };
    let ip = canonical_ip(ip);
    restriction
        .iter()
        .any(|net| canonical_net(*net).contains(&ip))
}

/// An IPv4-mapped IPv6 address (`::ffff:192.0.2.1`, as dual-stack sockets report IPv4 peers) as the
/// IPv4 address it is.
#[inline]
pub(crate) fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    }
}

/// A network inside the IPv4-mapped range (`::ffff:192.0.2.0/120`) as the IPv4 network it is
/// (`192.0.2.0/24`); any other network unchanged. Peers are compared as IPv4 ([`canonical_ip`]),
/// so a mapped network would otherwise never match one.
#[inline]
pub(crate) fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.network().to_ipv4_mapped()
        && let Ok(v4) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(v4);
    }
    net
}

/// Parses one CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a bare address (a /32 or /128). Host bits
/// are cleared (`10.1.2.3/8` is `10.0.0.0/8`), and an IPv4-mapped IPv6 network is the IPv4 network
/// it stands for (`::ffff:192.0.2.0/120` is `192.0.2.0/24`).
pub fn parse_ip_net(s: &str) -> Result<IpNet, ipnet::AddrParseError> {
    let s = s.trim();
    let net = match s.parse::<IpNet>() {
        Ok(net) => net.trunc(),
        Err(e) => s.parse::<IpAddr>().map(IpNet::from).map_err(|_| e)?,
    };
    Ok(canonical_net(net))
}

/// The longest token name (and CLI subject), in characters.
#[cfg(feature = "admin")]
pub(crate) const MAX_NAME_CHARS: usize = 256;

/// The characters a label may not hold besides the control characters: the invisible format
/// characters of the Basic Multilingual Plane (Unicode category Cf: the soft hyphen, zero-width
/// spaces and joiners, bidirectional marks, embeddings, overrides and isolates, the byte order
/// mark), the line and paragraph separators (Zl, Zp), and the letters and marks that print as
/// nothing (the combining grapheme joiner, the Hangul fillers, the Khmer inherent vowels, the
/// blank Braille pattern). With them `ci` and `ci\u{200B}` would be
/// two names that look alike, and `deploy\u{202E}nimda` would print reversed in a list.
///
/// The plane's ranges only, so that the OpenAPI document states the same rule as a pattern every
/// regular expression dialect reads (`\uXXXX`); the invisible tag characters beyond it
/// (U+E0000–E007F) are not refused.
#[cfg(feature = "admin")]
pub(crate) const INVISIBLE: &[(char, char)] = &[
    ('\u{AD}', '\u{AD}'),
    ('\u{34F}', '\u{34F}'),
    ('\u{600}', '\u{605}'),
    ('\u{61C}', '\u{61C}'),
    ('\u{6DD}', '\u{6DD}'),
    ('\u{70F}', '\u{70F}'),
    ('\u{890}', '\u{891}'),
    ('\u{8E2}', '\u{8E2}'),
    ('\u{115F}', '\u{1160}'),
    ('\u{17B4}', '\u{17B5}'),
    ('\u{180E}', '\u{180E}'),
    ('\u{200B}', '\u{200F}'),
    ('\u{2028}', '\u{202E}'),
    ('\u{2060}', '\u{2064}'),
    ('\u{2066}', '\u{206F}'),
    ('\u{2800}', '\u{2800}'),
    ('\u{3164}', '\u{3164}'),
    ('\u{FEFF}', '\u{FEFF}'),
    ('\u{FFA0}', '\u{FFA0}'),
    ('\u{FFF9}', '\u{FFFB}'),
];

/// A name, type or subject as every entry point takes it (the management API, whose OpenAPI
/// document states the same rule as a pattern, and `patd token create`): at most `max`
/// characters as sent, none of them a control character or [invisible](INVISIBLE), not blank.
/// Returns it trimmed, or what is wrong with it.
#[cfg(feature = "admin")]
pub(crate) fn label(value: &str, max: usize) -> Result<&str, String> {
    if value.chars().count() > max {
        return Err(format!("must be at most {max} characters long"));
    }
    if value.chars().any(char::is_control) {
        return Err("must not contain control characters".to_owned());
    }
    if value
        .chars()
        .any(|c| INVISIBLE.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c)))
    {
        return Err("must not contain invisible formatting characters".to_owned());
    }
    match value.trim() {
        "" => Err("must not be blank".to_owned()),
        trimmed => Ok(trimmed),
    }
}

/// `t` to the microsecond: what every store keeps (PostgreSQL's `timestamptz`, SQLite's integer
/// microseconds), so that a record answered at its creation and read back later show one time.
pub(crate) fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

/// The current time to the microsecond ([`micros`]): the time of every management write.
pub(crate) fn now() -> DateTime<Utc> {
    micros(Utc::now())
}

/// The latest time a lifetime computed here reaches: 9999-12-31T23:59:59Z, the last instant RFC
/// 3339 can write, and so the latest `expiresAt` the management API accepts and answers. Every
/// store keeps it (PostgreSQL refuses times from the year 200 000 on, and sqlx cannot read
/// `infinity`), so a configured lifetime too long to add, such as `Duration::MAX`, is a time
/// this far away rather than a store error on every creation or a maximum that no longer holds.
pub(crate) fn latest() -> DateTime<Utc> {
    DateTime::from_timestamp(253_402_300_799, 0).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Why a time given as text is refused by [`parse_time`].
#[cfg(feature = "admin")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimeError {
    /// Not an RFC 3339 date-time.
    NotRfc3339,
    /// After [`latest`] in UTC (`9999-12-31T23:59:59.5Z`, or a year-9999 time with a negative
    /// offset): a time no store keeps alike, and that no answer could write in RFC 3339.
    TooLate,
}

/// A time given as text (the management API's times, `patd token create --expires-at`): an RFC
/// 3339 date-time, in UTC at most [`latest`], to the microsecond ([`micros`]).
///
/// The time returned is the one the stores keep, so that every check compares the value that
/// will be written: a leap second (`…:59:60.9Z`, which RFC 3339 allows at the end of any minute)
/// orders before the next minute in chrono, but is kept as 0.9 s after it, and would have
/// passed a ceiling it then outlives.
#[cfg(feature = "admin")]
pub(crate) fn parse_time(s: &str) -> Result<DateTime<Utc>, TimeError> {
    let t = micros(
        DateTime::parse_from_rfc3339(s)
            .map_err(|_| TimeError::NotRfc3339)?
            .to_utc(),
    );
    if t > latest() {
        return Err(TimeError::TooLate);
    }
    Ok(t)
}

/// `now` plus `lifetime`, at most [`latest`].
pub(crate) fn after(now: DateTime<Utc>, lifetime: std::time::Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(lifetime)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .map_or_else(latest, |at| at.min(latest()))
}

/// What a new token is: the input of [`Tokens::issue`](crate::Tokens::issue), which makes the
/// secret, stores the record and returns both.
///
/// ```
/// use tower_pat::NewToken;
///
/// let token = NewToken::new("alice", "laptop")
///     .scopes(["repo:read", "repo:write"])?
///     .token_type("ci");
/// assert_eq!(token.scopes.len(), 2);
/// # Ok::<(), tower_pat::scope::InvalidScope>(())
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct NewToken {
    /// The owner.
    pub subject: String,
    /// Its name, unique per subject.
    pub name: String,
    /// Granted scopes (none unless set).
    pub scopes: ScopeSet,
    /// The token type (`personal` unless set).
    pub token_type: String,
    /// When it expires; `None` (the default) for never.
    pub expires_at: Option<DateTime<Utc>>,
    /// Allowed client networks; empty (the default) for anywhere.
    pub ip_restriction: Vec<IpNet>,
}

impl NewToken {
    /// A personal token for `subject` named `name`: no scopes, no expiry and no IP restriction
    /// until set.
    pub fn new(subject: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            subject: subject.into(),
            name: name.into(),
            scopes: ScopeSet::empty(),
            token_type: "personal".to_owned(),
            expires_at: None,
            ip_restriction: Vec::new(),
        }
    }

    /// Sets the scopes from strings (`repo:read`, …); fails on the first invalid one.
    pub fn scopes<I, S>(mut self, scopes: I) -> Result<Self, InvalidScope>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.scopes = ScopeSet::parse(scopes)?;
        Ok(self)
    }

    /// Sets the scopes from a parsed [`ScopeSet`].
    pub fn scope_set(mut self, scopes: ScopeSet) -> Self {
        self.scopes = scopes;
        self
    }

    /// Sets the expiry (default: never).
    pub fn expires_at(mut self, at: DateTime<Utc>) -> Self {
        self.expires_at = Some(micros(at));
        self
    }

    /// Sets the allowed client networks (default: anywhere).
    pub fn ip_restriction(mut self, nets: impl IntoIterator<Item = IpNet>) -> Self {
        self.ip_restriction = nets.into_iter().collect();
        self
    }

    /// Sets the token type (default `personal`).
    pub fn token_type(mut self, token_type: impl Into<String>) -> Self {
        self.token_type = token_type.into();
        self
    }

    /// Generates the secret and builds the record that stores its hash. Reached through
    /// [`Tokens`](crate::Tokens), which owns the format and the hasher.
    pub(crate) fn build(
        self,
        format: &TokenFormat,
        hasher: &TokenHasher,
        now: DateTime<Utc>,
    ) -> (TokenRecord, TokenSecret) {
        let secret = format.generate();
        let now = micros(now);
        let record = TokenRecord {
            id: new_id(),
            subject: self.subject,
            name: self.name,
            scopes: self.scopes,
            token_type: self.token_type,
            ip_restriction: self.ip_restriction,
            created_at: now,
            updated_at: now,
            expires_at: self.expires_at.map(micros),
            revoked_at: None,
            disabled_at: None,
            last_used_at: None,
            last_used_ips: Vec::new(),
            last_rotated_at: None,
            hash: hasher.hash(secret.expose_secret()),
            start: format.start(secret.expose_secret()).unwrap_or_default(),
            previous_hash: None,
            version: 0,
        };
        (record, secret)
    }
}

/// A random (version 4) UUID in its hyphenated form.
pub(crate) fn new_id() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the operating system CSPRNG failed");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex = TokenHash::hex_of(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn record() -> TokenRecord {
        NewToken::new("alice", "ci")
            .build(&TokenFormat::new(), &TokenHasher::sha256(), Utc::now())
            .0
    }

    #[test]
    fn usage_never_moves_back_and_keeps_newest_ips() {
        let mut r = record();
        let t = Utc::now();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        r.apply_usage(&UsageUpdate::new(
            &r.id,
            t,
            vec![ip("10.0.0.2"), ip("10.0.0.1")],
        ));
        r.apply_usage(&UsageUpdate::new(
            &r.id,
            t - Duration::seconds(5),
            vec![ip("10.0.0.9")],
        ));
        assert_eq!(r.last_used_at, Some(t));
        assert_eq!(
            r.last_used_ips,
            vec![ip("10.0.0.2"), ip("10.0.0.1"), ip("10.0.0.9")]
        );
        r.apply_usage(&UsageUpdate::new(
            &r.id,
            t + Duration::seconds(1),
            vec![ip("10.0.0.1")],
        ));
        assert_eq!(r.last_used_ips[0], ip("10.0.0.1"));
        assert_eq!(r.last_used_ips.len(), 3);
    }

    #[test]
    fn ip_rules() {
        let mut r = record();
        assert!(r.ip_allowed(None));
        r.ip_restriction = vec![
            parse_ip_net("10.0.0.0/8").unwrap(),
            parse_ip_net("2001:db8::1").unwrap(),
        ];
        assert!(r.ip_allowed(Some("10.1.2.3".parse().unwrap())));
        assert!(r.ip_allowed(Some("::ffff:10.1.2.3".parse().unwrap())));
        assert!(r.ip_allowed(Some("2001:db8::1".parse().unwrap())));
        assert!(!r.ip_allowed(Some("2001:db8::2".parse().unwrap())));
        assert!(!r.ip_allowed(None));
        assert!(parse_ip_net("10.0.0.300/8").is_err());
        // A mapped network, parsed or built by hand, matches IPv4 peers in both forms.
        for net in [
            parse_ip_net("::ffff:192.0.2.0/120").unwrap(),
            "::ffff:192.0.2.0/120".parse().unwrap(),
        ] {
            r.ip_restriction = vec![net];
            assert!(r.ip_allowed(Some("192.0.2.9".parse().unwrap())));
            assert!(r.ip_allowed(Some("::ffff:192.0.2.9".parse().unwrap())));
            assert!(!r.ip_allowed(Some("192.0.3.9".parse().unwrap())));
        }
        // A network wider than the mapped range stays IPv6 and does not match IPv4 peers.
        r.ip_restriction = vec![parse_ip_net("::/0").unwrap()];
        assert!(!r.ip_allowed(Some("192.0.2.9".parse().unwrap())));
        assert_eq!(
            parse_ip_net("10.1.2.3/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
    }

    #[test]
    fn ids_are_uuids() {
        let id = new_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_ne!(id, new_id());
    }
}
