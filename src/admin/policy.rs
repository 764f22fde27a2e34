//! The trust rules of the management API, in one place: a token never gets more than the token
//! that created or changed it, and acting on a token needs everything it has.
//!
//! - **Scopes.** A created or patched token's scopes are all held by the caller
//!   ([`scopes_held`]). Acting on a token (PATCH of any field, revoke, rotate, delete) needs every
//!   scope the target holds ([`may_act_on`]): a `*` target needs `*`, `x:*` needs `x:*` or `*`.
//!   The admin scope only widens *whose* tokens a caller reaches, never *what* it may grant.
//! - **Lifetime.** A created, patched or rotated token expires no later than the caller
//!   ([`expiry_within`]); a never-expiring one needs a never-expiring caller. A server default is
//!   cut to the caller's expiry instead ([`default_expiry`]). The caller's expiry is the one its
//!   secret really has: a secret superseded by a rotation and still in its grace period expires at
//!   the end of it.
//! - **Networks.** A created, patched or rotated token's `ipRestriction` is within the caller's
//!   ([`networks_within`]): every network is contained in one of the caller's (IPv4-mapped IPv6
//!   networks compare as the IPv4 networks they are). No restriction means anywhere, so it is
//!   within only an unrestricted caller's; a created token that names none inherits the caller's
//!   ([`child_networks`]).
//! - **Secrets.** A rotation hands the caller the target's new secret, so the target as it will
//!   be must fit all three ceilings ([`may_receive_secret`]).

use chrono::{DateTime, Utc};
use ipnet::IpNet;

use super::error::ApiError;
use crate::principal::Principal;
use crate::record::{TokenRecord, canonical_net};
use crate::scope::ScopeSet;

/// The refusal of a lifetime beyond the caller's.
const OUTLIVES: &str = "expiresAt: a token cannot outlive the token that creates or changes it";

/// A token never exceeds its owner: every scope of `scopes` must be covered by the caller's.
pub(crate) fn scopes_held(caller: &Principal, scopes: &ScopeSet) -> Result<(), ApiError> {
    missing(
        caller,
        scopes,
        "scopes: a token cannot have scopes its creator lacks",
    )
}

/// Acting on `target` (changing, revoking, rotating or deleting it) needs every scope it holds,
/// whoever owns it.
pub(crate) fn may_act_on(caller: &Principal, target: &TokenRecord) -> Result<(), ApiError> {
    missing(
        caller,
        &target.scopes,
        "scopes: acting on a token needs every scope it holds",
    )
}

fn missing(caller: &Principal, scopes: &ScopeSet, rule: &str) -> Result<(), ApiError> {
    let missing: Vec<&str> = caller
        .scopes()
        .missing(scopes)
        .map(|s| s.as_str())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(ApiError::forbidden(
        "insufficient_scope",
        format!("{rule}; the caller lacks: {}", missing.join(" ")),
    ))
}

/// When the caller's secret stops working (`None` for never): its token's expiry, or the end of
/// the rotation grace period when it authenticated with a superseded secret.
pub(crate) fn caller_expiry(caller: &Principal) -> Option<DateTime<Utc>> {
    let at = caller.expires_at();
    let secret_ms = caller.0.expires_ms;
    // The entry keeps milliseconds: compare in them, so that a token's own expiry (which may have
    // a finer precision) is kept as it is unless a grace period really ends sooner.
    if at.map_or(i64::MAX, |t| t.timestamp_millis()) > secret_ms {
        DateTime::from_timestamp_millis(secret_ms)
    } else {
        at
    }
}

/// `expires_at` (`None` for never), asked for explicitly, must be no later than the caller's.
pub(crate) fn expiry_within(
    caller: &Principal,
    expires_at: Option<DateTime<Utc>>,
) -> Result<(), ApiError> {
    match (caller_expiry(caller), expires_at) {
        (None, _) => Ok(()),
        (Some(ceiling), Some(at)) if at <= ceiling => Ok(()),
        (Some(ceiling), _) => Err(ApiError::forbidden(
            "forbidden",
            format!(
                "{OUTLIVES}: the caller's token expires at {}",
                ceiling.to_rfc3339()
            ),
        )),
    }
}

/// A default expiry (chosen by the server's policy, not by the client) cut to the caller's.
pub(crate) fn default_expiry(
    caller: &Principal,
    expires_at: Option<DateTime<Utc>>,
) -> Option<DateTime<Utc>> {
    match (caller_expiry(caller), expires_at) {
        (Some(ceiling), Some(at)) => Some(at.min(ceiling)),
        (ceiling, at) => at.or(ceiling),
    }
}

/// Every network of `nets` (empty: anywhere) must be within one of the caller's.
pub(crate) fn networks_within(caller: &Principal, nets: &[IpNet]) -> Result<(), ApiError> {
    let ceiling = caller.ip_restriction();
    if ceiling.is_empty() {
        return Ok(());
    }
    let refuse = |what: String| {
        Err(ApiError::forbidden(
            "forbidden",
            format!(
                "ipRestriction: a token's networks must be within the caller's networks; {what}"
            ),
        ))
    };
    if nets.is_empty() {
        return refuse("the caller's token is restricted, so anywhere is not".to_owned());
    }
    match nets
        .iter()
        .find(|net| !ceiling.iter().any(|outer| net_within(**net, *outer)))
    {
        Some(net) => refuse(format!("{net} is not")),
        None => Ok(()),
    }
}

/// The networks of a new token: the requested ones if within the caller's, the caller's if none
/// are requested.
pub(crate) fn child_networks(
    caller: &Principal,
    requested: Vec<IpNet>,
) -> Result<Vec<IpNet>, ApiError> {
    if requested.is_empty() {
        return Ok(caller.ip_restriction().to_vec());
    }
    networks_within(caller, &requested)?;
    Ok(requested)
}

/// Giving a token scopes it did not have hands those scopes its lifetime and networks, and so does
/// enabling a disabled token (all its scopes work again): the token as it will be must then fit
/// the caller's ceilings, as if the caller had created it.
pub(crate) fn grants_within(
    caller: &Principal,
    before: &TokenRecord,
    after: &TokenRecord,
) -> Result<(), ApiError> {
    let enabled = before.is_disabled() && !after.is_disabled();
    if !enabled && before.scopes.grants_all(&after.scopes) {
        return Ok(());
    }
    let why = if enabled {
        "the token is enabled again"
    } else {
        "the token is given scopes it did not have"
    };
    let widened = |mut e: ApiError| {
        e.message = format!("{}; {why}, so it must fit the caller's ceilings", e.message).into();
        e
    };
    expiry_within(caller, after.expires_at).map_err(widened)?;
    networks_within(caller, &after.ip_restriction).map_err(widened)
}

/// A rotation hands the caller `target`'s new secret: the target, with the expiry it will have
/// after the rotation, must fit the caller's scopes, lifetime and networks.
pub(crate) fn may_receive_secret(
    caller: &Principal,
    target: &TokenRecord,
    expires_at: Option<DateTime<Utc>>,
) -> Result<(), ApiError> {
    may_act_on(caller, target)?;
    expiry_within(caller, expires_at).map_err(|mut e| {
        e.message = format!(
            "{}; rotate with an expiresAt no later than that to receive its secret",
            e.message
        )
        .into();
        e
    })?;
    networks_within(caller, &target.ip_restriction)
}

/// Whether `inner` lies within `outer`; IPv4-mapped IPv6 networks compare as IPv4 ones, as client
/// addresses do (`::/0` does not hold IPv4 clients: they are matched as IPv4).
fn net_within(inner: IpNet, outer: IpNet) -> bool {
    match (canonical_net(inner), canonical_net(outer)) {
        (IpNet::V4(i), IpNet::V4(o)) => o.contains(&i),
        (IpNet::V6(i), IpNet::V6(o)) => o.contains(&i),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::Duration;

    use super::*;
    use crate::principal::Entry;
    use crate::record::{NewToken, parse_ip_net};
    use crate::token::{TokenFormat, TokenHasher};

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| parse_ip_net(n).unwrap()).collect()
    }

    fn principal(nets: &[IpNet], expires_at: Option<DateTime<Utc>>) -> Principal {
        let mut new = NewToken::new("alice", "p")
            .scope_set(ScopeSet::parse(["a:*"]).unwrap())
            .ip_restriction(nets.to_vec());
        new.expires_at = expires_at;
        let (record, _) = new.build(&TokenFormat::new(), &TokenHasher::sha256(), Utc::now());
        let key = record.hash;
        Principal(Arc::new(Entry::new(
            record,
            crate::cache::Slot::test(1),
            key,
            0,
            60_000,
        )))
    }

    #[test]
    fn containment_compares_mapped_networks_as_ipv4() {
        let within = |i: &str, o: &str| net_within(nets(&[i])[0], nets(&[o])[0]);
        assert!(within("10.1.0.0/16", "10.0.0.0/8"));
        assert!(within("10.0.0.0/8", "10.0.0.0/8"));
        assert!(!within("10.0.0.0/7", "10.0.0.0/8"));
        assert!(!within("11.0.0.1", "10.0.0.0/8"));
        assert!(within("::ffff:10.1.2.3", "10.0.0.0/8"));
        assert!(within("10.1.2.3", "::ffff:10.0.0.0/104"));
        assert!(!within("::ffff:10.0.0.0/103", "10.0.0.0/8"));
        assert!(within("2001:db8::1", "2001:db8::/32"));
        assert!(!within("10.0.0.1", "::/0"));
        assert!(!within("::/0", "0.0.0.0/0"));
        assert_eq!(
            canonical_net(nets(&["::ffff:192.0.2.0/120"])[0]),
            nets(&["192.0.2.0/24"])[0]
        );
    }

    #[test]
    fn networks_and_expiry_ceilings() {
        let hour = crate::record::now() + Duration::hours(1);
        let p = principal(&nets(&["127.0.0.1", "10.0.0.0/8"]), Some(hour));
        assert!(networks_within(&p, &nets(&["10.2.0.0/16", "127.0.0.1"])).is_ok());
        assert!(networks_within(&p, &nets(&["10.2.0.0/16", "192.0.2.1"])).is_err());
        assert!(networks_within(&p, &[]).is_err());
        assert_eq!(child_networks(&p, Vec::new()).unwrap(), p.ip_restriction());
        assert!(expiry_within(&p, Some(hour)).is_ok());
        assert!(expiry_within(&p, Some(hour + Duration::seconds(1))).is_err());
        assert!(expiry_within(&p, None).is_err());
        assert_eq!(default_expiry(&p, None), Some(hour));
        assert_eq!(
            default_expiry(&p, Some(hour + Duration::days(1))),
            Some(hour)
        );

        let free = principal(&[], None);
        assert!(networks_within(&free, &[]).is_ok());
        assert!(expiry_within(&free, None).is_ok());
        assert_eq!(default_expiry(&free, None), None);
        assert!(child_networks(&free, Vec::new()).unwrap().is_empty());
    }

    #[test]
    fn a_superseded_secret_expires_with_its_grace_period() {
        let now = Utc::now();
        let (mut record, _) =
            NewToken::new("alice", "p").build(&TokenFormat::new(), &TokenHasher::sha256(), now);
        let until = now + Duration::minutes(10);
        let old = TokenHasher::sha256().hash("pat_superseded");
        record.previous_hash = Some((old, until));
        let via_old = Principal(Arc::new(Entry::new(
            record.clone(),
            crate::cache::Slot::test(2),
            old,
            0,
            60_000,
        )));
        assert_eq!(
            caller_expiry(&via_old),
            DateTime::from_timestamp_millis(until.timestamp_millis())
        );
        let key = record.hash;
        let via_new = Principal(Arc::new(Entry::new(
            record,
            crate::cache::Slot::test(1),
            key,
            0,
            60_000,
        )));
        assert_eq!(caller_expiry(&via_new), None);
    }
}
