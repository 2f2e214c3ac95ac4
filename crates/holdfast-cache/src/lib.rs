//! A read-through cache for derived data (the catalog, product pages): a copy of what an
//! origin — usually the store — can always compute again.
//!
//! Why it exists: a hot key that expires under load turns one origin query into one per
//! request, and the origin falls over exactly when it is busiest (a cache stampede). This
//! crate makes a miss cost **one origin call per instance** (single flight), and with the
//! shared Redis tier **about one per fleet** (a short lease), and refreshes hot keys *before*
//! they expire (XFetch), so most requests never see a miss at all.
//!
//! Rules (promise 6 in `docs/INVARIANTS.md`):
//!
//! - Architecture invariant: a cache is never the only copy. Nothing is ever written *through*
//!   it; flushing it (in-process or the Redis prefix) loses nothing, the next read asks the
//!   origin again.
//! - Architecture invariant: every entry has a TTL. [`Ttl`] is the only way to say how long
//!   something lives, it cannot be zero, and [`Cache::builder`] will not start without one.
//!   Every Redis key this crate writes (value, lease, version) carries a `PX` expiry.
//! - Architecture invariant: no response is older than its cap. A value is *fresh* for its
//!   TTL ("not found" — `Ok(None)` from the origin — for the shorter negative TTL), then
//!   *stale*: served only inside the stale-while-revalidate window (while one background
//!   refresh runs) or the stale-if-error window (when the origin fails). Past both windows it
//!   is gone; the caller gets the origin's answer or its error, never older data.
//! - Architecture invariant: errors are shared, never cached. Callers that coalesced onto a
//!   failed origin call all get its [`Error`]; the next call asks the origin again.
//! - Architecture invariant: a fill that started before an [`Cache::invalidate`] (or
//!   [`Cache::flush`]) never lands. In process each key has a version taken from a
//!   cache-wide counter; in Redis a fill must still hold its lease *and* see the version it
//!   started under, and invalidation revokes the lease and bumps the version.
//!
//! How a read goes. In process only: a fresh entry is served (and, with probability
//! `exp(−remaining / (Δ·β))` per read, one background refresh starts — XFetch, where Δ is how
//! long the last origin call took); a stale one inside the stale-while-revalidate window is
//! served while one refresh runs; otherwise the caller joins the key's one in-flight origin
//! call, or starts it. With Redis, values live only in Redis (no local copy, so invalidation
//! is fleet-wide at once); each instance sends one read per key at a time, and on a miss the
//! one instance that wins `SET <prefix>:lease:<key> <token> NX PX <lease_ttl>` calls the
//! origin while the others poll Redis for its fill. A holder that dies is replaced when its
//! lease expires; a lease is released only by a script that checks its token. If Redis itself
//! fails, reads fall back to the origin (still one call per instance) and nothing is filled.
//!
//! Origin closures run on their own tokio task: a caller that gives up (its future dropped)
//! does not strand the others, and the result still fills the cache. That is why they must
//! be `Send + 'static`. A panicking origin is reported as an origin error.
//!
//! Metrics (counters, label `cache` = [`Builder::name`]): `holdfast_cache_hits_total`,
//! `holdfast_cache_misses_total` (a caller that waited for an origin call it started, or for
//! the fleet's lease holder), `holdfast_cache_coalesced_waiters_total` (a caller that joined
//! another caller's in-flight call on this instance), `holdfast_cache_stale_served_total`
//! (every answer that carried stale data), `holdfast_cache_origin_calls_total`,
//! `holdfast_cache_fills_rejected_total` (a late fill fenced off by invalidation or a lost
//! lease) and `holdfast_cache_redis_errors_total`.

mod inner;
mod tier;

use inner::{Config, Inner};
use serde::{de::DeserializeOwned, Serialize};
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

/// The metric families caches export, each labelled by cache name (see
/// [`holdfast_core::Metric`]).
pub const METRICS: &[holdfast_core::Metric] = &[
    holdfast_core::Metric::counter(inner::HITS, "Reads answered from the cache, by cache."),
    holdfast_core::Metric::counter(inner::MISSES, "Reads that had to go to the origin, by cache."),
    holdfast_core::Metric::counter(inner::COALESCED, "Readers that waited for another reader's origin call instead of making their own, by cache."),
    holdfast_core::Metric::counter(inner::STALE, "Reads answered with a stale value (while revalidating or because the origin failed), by cache."),
    holdfast_core::Metric::counter(inner::ORIGIN_CALLS, "Calls to the origin, by cache."),
    holdfast_core::Metric::counter(inner::FILLS_REJECTED, "Origin results not stored because a newer version was already there, by cache."),
    holdfast_core::Metric::counter(inner::REDIS_ERRORS, "Redis commands of the cache that failed, by cache."),
];

/// The Redis client this crate is built against, re-exported so callers name the same version.
pub use redis;
pub use tier::delete_prefix;

/// How long an entry (or a lease) lives: at least one millisecond, never "forever".
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ttl(Duration);

impl Ttl {
    /// # Panics
    /// When `duration` is shorter than one millisecond (Redis' `PX` granularity): an entry
    /// that expires at once is a configuration mistake, not a cache.
    pub const fn new(duration: Duration) -> Ttl {
        assert!(
            duration.as_millis() >= 1,
            "a cache TTL must be at least one millisecond"
        );
        Ttl(duration)
    }

    pub const fn from_secs(secs: u64) -> Ttl {
        Ttl::new(Duration::from_secs(secs))
    }

    pub const fn get(self) -> Duration {
        self.0
    }
}

/// What went wrong, in words the caller can act on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The origin failed (or panicked) and no stale value inside the stale-if-error window
    /// could stand in. Every caller coalesced onto that origin call gets a clone.
    #[error("origin: {0}")]
    Origin(#[source] Arc<dyn std::error::Error + Send + Sync>),
    /// The shared tier failed. Reads never return this (they fall back to the origin);
    /// [`Cache::invalidate`] and [`Cache::flush`] do, because then Redis may still hold the
    /// old value until its TTL.
    #[error("redis: {0}")]
    Redis(#[source] Arc<redis::RedisError>),
}

impl Error {
    /// The origin's failure (read it with [`Error::origin_error`]).
    pub fn is_origin(&self) -> bool {
        matches!(self, Error::Origin(_))
    }

    /// The shared tier could not be reached; retrying later may succeed.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Redis(_))
    }

    /// The error the origin returned, for downcasting to its concrete type.
    pub fn origin_error(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        match self {
            Error::Origin(e) => Some(&**e),
            Error::Redis(_) => None,
        }
    }

    pub(crate) fn origin(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
        Error::Origin(Arc::from(e.into()))
    }
}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        Error::Redis(Arc::new(e))
    }
}

/// A read-through cache of `V` by `K`. One `Cache` value is one *instance*: clones share
/// its state (entries, in-flight calls), separate `build()`s do not.
pub struct Cache<K, V> {
    inner: Arc<Inner<K, V>>,
}

impl<K, V> Clone for Cache<K, V> {
    fn clone(&self) -> Self {
        Cache {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K, V> fmt::Debug for Cache<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("name", &self.inner.cfg.name)
            .field("redis", &self.inner.tier.is_some())
            .finish_non_exhaustive()
    }
}

impl<K, V> Cache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Starts a cache whose values stay fresh for `ttl`. There is no builder without one.
    pub fn builder(ttl: Ttl) -> Builder<K, V> {
        Builder {
            cfg: Config {
                name: "default",
                ttl: ttl.get(),
                negative_ttl: Duration::max(ttl.get() / 10, Duration::from_millis(1)),
                beta: 1.0,
                swr: Duration::ZERO,
                sie: Duration::ZERO,
                lease_ttl: Duration::from_secs(5),
                poll: Duration::from_millis(20),
                single_flight: true,
            },
            tier: None,
        }
    }

    /// The value for `key`, asking `origin` only when the cache cannot answer.
    ///
    /// `origin` answers `Ok(Some(v))` (cached for the TTL), `Ok(None)` — "there is no such
    /// thing", cached for the negative TTL and returned as `Ok(None)` — or an error, which is
    /// never cached. The closure is called at most once, and not at all when the cache (or a
    /// concurrent caller's origin call) answers.
    pub async fn get_with<F, Fut, E>(&self, key: K, origin: F) -> Result<Option<V>, Error>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.inner.get_with(key, origin).await
    }

    /// Forgets `key` here and, with Redis, fleet-wide; an origin call already running for it
    /// may still answer its own callers but will not fill the cache.
    pub async fn invalidate(&self, key: &K) -> Result<(), Error> {
        self.inner.invalidate(key).await
    }

    /// Drops every entry of this instance and, with Redis, every key under the prefix. Loses
    /// nothing: the next read of each key asks the origin.
    pub async fn flush(&self) -> Result<(), Error> {
        self.inner.flush().await
    }
}

/// Configures a [`Cache`]; from [`Cache::builder`].
#[must_use]
pub struct Builder<K, V> {
    cfg: Config,
    tier: Option<tier::Tier<K, V>>,
}

impl<K, V> Builder<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// The `cache` label on this cache's metrics (default `"default"`).
    pub fn name(mut self, name: &'static str) -> Self {
        self.cfg.name = name;
        self
    }

    /// How long "not found" is remembered (default: a tenth of the TTL).
    ///
    /// # Panics
    /// When longer than the TTL: an absence must not outlive the values it hides.
    pub fn negative_ttl(mut self, ttl: Ttl) -> Self {
        assert!(
            ttl.get() <= self.cfg.ttl,
            "negative_ttl ({:?}) must not be longer than the ttl ({:?})",
            ttl.get(),
            self.cfg.ttl
        );
        self.cfg.negative_ttl = ttl.get();
        self
    }

    /// XFetch's β (default 1): larger refreshes earlier, 0 never refreshes early.
    ///
    /// # Panics
    /// When β is negative or not finite.
    pub fn beta(mut self, beta: f64) -> Self {
        assert!(
            beta.is_finite() && beta >= 0.0,
            "beta must be finite and >= 0"
        );
        self.cfg.beta = beta;
        self
    }

    /// For this long past its TTL a value is served stale while one background refresh
    /// runs (default 0: off).
    pub fn stale_while_revalidate(mut self, window: Duration) -> Self {
        self.cfg.swr = window;
        self
    }

    /// For this long past its TTL a value stands in when the origin fails (default 0: off).
    /// Together with [`Builder::stale_while_revalidate`] this is the hard cap on staleness.
    pub fn stale_if_error(mut self, window: Duration) -> Self {
        self.cfg.sie = window;
        self
    }

    /// Keeps values in Redis under `prefix`, shared by every instance built with the same
    /// prefix, and coordinates origin calls fleet-wide with a lease. `K`'s `Display` names
    /// the key in Redis and must be injective; values are stored as JSON. Instances sharing a
    /// prefix should share the TTLs too.
    pub fn redis(mut self, conn: redis::aio::ConnectionManager, prefix: impl Into<String>) -> Self
    where
        K: fmt::Display,
        V: Serialize + DeserializeOwned,
    {
        self.tier = Some(tier::Tier::new(conn, prefix.into()));
        self
    }

    /// How long a Redis lease lets one instance call the origin before another may (default
    /// 5 s). Longer than the origin's slowest answer, or that answer is not filled; short
    /// enough that a crashed holder is replaced quickly.
    pub fn lease_ttl(mut self, ttl: Ttl) -> Self {
        self.cfg.lease_ttl = ttl.get();
        self
    }

    /// How often an instance waiting for another's lease re-reads Redis (default 20 ms).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.cfg.poll = interval.max(Duration::from_millis(1));
        self
    }

    /// A planted fault for tests: `false` lets every miss call the origin itself.
    #[doc(hidden)]
    pub fn single_flight(mut self, on: bool) -> Self {
        self.cfg.single_flight = on;
        self
    }

    pub fn build(self) -> Cache<K, V> {
        Cache {
            inner: Arc::new(Inner::new(self.cfg, self.tier)),
        }
    }
}
