//! Rate limits on the accounts routes, kept in the store so that every instance counts
//! against the same quotas and an instance's death forgives nothing.
//!
//! Who is asking is [`ClientAddr`]: the peer's address, or, when the peer is a trusted proxy
//! (our balancer on loopback), the address that proxy appended to `X-Forwarded-For`.
//!
//! Login is limited twice: per client address, and per account — unless the browser holds a
//! known-device cookie for that account (it got one at an earlier successful login), in which
//! case it logs in on a quota of its own. So someone guessing a victim's password from many
//! addresses exhausts the account's shared quota and locks out only browsers the account has
//! never used; the owner's own devices keep logging in. Signup is limited hard per address,
//! which is how signup's "this email is taken" answer is kept from becoming an address book.
//! Every refusal is a 429 problem with `Retry-After`, counted in
//! `holdfast_rate_limited_total{limit}` and logged (target `security`, at most once a second,
//! with how many were not logged) without emails or passwords.

use crate::error::AppError;
use crate::AppState;
use axum::extract::{ConnectInfo, FromRef, FromRequestParts};
use axum::http::request::Parts;
use axum::http::StatusCode;
use holdfast_store::Quota;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// The quotas of the accounts routes.
#[derive(Debug, Clone)]
pub struct RateLimits {
    /// Login attempts from one client address.
    pub login_per_address: Quota,
    /// Login attempts at one account from browsers not known to it.
    pub login_per_account: Quota,
    /// Login attempts at one account from one browser known to it.
    pub login_per_device: Quota,
    /// Signups from one client address.
    pub signup_per_address: Quota,
    /// Password changes (current-password guesses) by one signed-in user.
    pub password_change_per_user: Quota,
}

impl Default for RateLimits {
    fn default() -> Self {
        let minute = Duration::from_secs(60);
        Self {
            login_per_address: Quota::new(5, Duration::from_secs(12)),
            login_per_account: Quota::new(10, minute),
            login_per_device: Quota::new(10, minute),
            signup_per_address: Quota::new(10, minute),
            password_change_per_user: Quota::new(5, minute),
        }
    }
}

impl RateLimits {
    /// Quotas no test or benchmark from one address reaches.
    pub fn generous() -> Self {
        let q = Quota::new(1_000_000, Duration::from_millis(1));
        Self {
            login_per_address: q,
            login_per_account: q,
            login_per_device: q,
            signup_per_address: q,
            password_change_per_user: q,
        }
    }
}

/// The address a request comes from (see the module docs). Unknown (no connection info, as
/// when a router is called in-process) is the unspecified address, one shared quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

impl std::fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl ClientAddr {
    /// `peer` itself, or the last `X-Forwarded-For` entry when `peer` is one of `trusted`.
    pub fn resolve(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[IpAddr]) -> Self {
        if !trusted.contains(&peer) {
            return Self(peer);
        }
        let last = forwarded_for
            .and_then(|v| v.rsplit(',').next())
            .and_then(|s| s.trim().parse::<IpAddr>().ok());
        Self(last.unwrap_or(peer))
    }
}

impl<S> FromRequestParts<S> for ClientAddr
where
    S: Send + Sync,
    AppState: FromRef<S>,
{
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Infallible> {
        let Some(ConnectInfo(peer)) = parts.extensions.get::<ConnectInfo<SocketAddr>>() else {
            return Ok(Self(IpAddr::V4(Ipv4Addr::UNSPECIFIED)));
        };
        // One header line: a proxy that appends joins the chain into one.
        let forwarded = parts
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        let st = AppState::from_ref(state);
        Ok(Self::resolve(
            canonical(peer.ip()),
            forwarded,
            &st.options().trusted_proxies,
        ))
    }
}

/// An IPv4 peer seen on a dual-stack socket (`::ffff:a.b.c.d`) as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The loopback addresses: a balancer on the same host.
pub fn loopback() -> Vec<IpAddr> {
    vec![
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ]
}

/// One limited key: its name in metrics and logs, the key, its quota.
pub(crate) struct Limit {
    pub name: &'static str,
    pub key: String,
    pub quota: Quota,
}

/// Refusals this instance has seen, until when they stand. A key refused at `now` with a
/// wait of `w` stays refused until `now + w` whatever any instance does meanwhile (its cell's
/// time only moves forward, and the reaper only deletes cells whose time has passed), so an
/// instance may refuse it again without asking the store: a flood of refused requests costs
/// no store writes. Bounded: past [`Refusals::CAPACITY`] live entries, new ones are not kept.
#[derive(Default)]
pub(crate) struct Refusals(Mutex<HashMap<String, i64>>);

impl Refusals {
    const CAPACITY: usize = 10_000;

    fn until(&self, key: &str, now: i64) -> Option<i64> {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(key).copied().filter(|&until| until > now)
    }

    fn remember(&self, key: &str, until: i64, now: i64) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= Self::CAPACITY {
            map.retain(|_, &mut t| t > now);
            if map.len() >= Self::CAPACITY {
                return;
            }
        }
        map.insert(key.to_owned(), until);
    }
}

/// Refuses the request at once if this instance knows one of `limits` is refused now.
pub(crate) fn refused_already(
    st: &AppState,
    limits: &[&Limit],
    client: ClientAddr,
) -> Result<(), AppError> {
    let now = holdfast_core::now_ms();
    for l in limits {
        if let Some(until) = st.refusals.until(&l.key, now) {
            let wait = Duration::from_millis(u64::try_from(until - now).unwrap_or(0));
            return Err(refused(l.name, client, wait));
        }
    }
    Ok(())
}

/// Takes one unit from each limit (in order; see [`Store::rate_take`]); the first without
/// one refuses the request with a 429.
pub(crate) async fn take(
    st: &AppState,
    limits: &[Limit],
    client: ClientAddr,
) -> Result<(), AppError> {
    refused_already(st, &limits.iter().collect::<Vec<_>>(), client)?;
    let keys: Vec<(&str, Quota)> = limits.iter().map(|l| (l.key.as_str(), l.quota)).collect();
    let now = holdfast_core::now_ms();
    let Some(refusal) = st.store.rate_take(&keys, now).await? else {
        return Ok(());
    };
    let limit = &limits[refusal.index];
    let wait = i64::try_from(refusal.retry_after.as_millis()).unwrap_or(i64::MAX);
    st.refusals
        .remember(&limit.key, now.saturating_add(wait), now);
    Err(refused(limit.name, client, refusal.retry_after))
}

/// The 429, counted and logged.
fn refused(name: &'static str, client: ClientAddr, retry_after: Duration) -> AppError {
    metrics::counter!("holdfast_rate_limited_total", "limit" => name).increment(1);
    security_event_sampled(name, client);
    let secs = retry_after.as_millis().div_ceil(1000).max(1);
    AppError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate-limited",
        format!("too many attempts; retry in {secs} s"),
    )
    .retry_after(u32::try_from(secs).unwrap_or(u32::MAX))
}

/// Logs a refusal, at most once a second per process, with how many went unlogged since.
fn security_event_sampled(limit: &'static str, client: ClientAddr) {
    static LAST: AtomicI64 = AtomicI64::new(0);
    static UNLOGGED: AtomicU64 = AtomicU64::new(0);
    let now = holdfast_core::now_ms();
    let last = LAST.load(Ordering::Relaxed);
    if now - last >= 1000
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        let unlogged = UNLOGGED.swap(0, Ordering::Relaxed);
        tracing::warn!(target: "security", event = "rate-limited", limit, %client, unlogged, "request refused by a rate limit");
    } else {
        UNLOGGED.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trusted_proxy_names_the_client_and_nobody_else_can() {
        let proxy: IpAddr = "127.0.0.1".parse().unwrap();
        let client: IpAddr = "203.0.113.7".parse().unwrap();
        let trusted = loopback();
        // Our balancer appends the peer it saw; whatever the client claimed comes before.
        let via_proxy = ClientAddr::resolve(proxy, Some("10.9.9.9, 203.0.113.7"), &trusted);
        assert_eq!(via_proxy, ClientAddr(client));
        // A client talking to the instance directly cannot choose its address.
        let direct = ClientAddr::resolve(client, Some("10.9.9.9"), &trusted);
        assert_eq!(direct, ClientAddr(client));
        // A garbled header from the proxy falls back to the proxy itself.
        assert_eq!(
            ClientAddr::resolve(proxy, Some("nonsense"), &trusted),
            ClientAddr(proxy)
        );
        assert_eq!(
            ClientAddr::resolve(proxy, None, &trusted),
            ClientAddr(proxy)
        );
        let mapped: IpAddr = "::ffff:203.0.113.7".parse().unwrap();
        assert_eq!(canonical(mapped), client);
    }
}
