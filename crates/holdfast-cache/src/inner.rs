//! The per-instance machinery: one slot per key (version, entry, in-flight call), the
//! freshness plan, and the flights that call the origin on their own tasks.

use crate::tier::{Lease, Tier};
use crate::Error;
use futures::future::{BoxFuture, Shared};
use futures::FutureExt;
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::time::Instant;

/// An origin call as the cache passes it around: the closure a caller gave `get_with`, named
/// once here instead of in every signature.
pub(crate) trait Origin<V>: Send + 'static {
    type Error: Into<Box<dyn std::error::Error + Send + Sync>>;
    fn call(self) -> impl Future<Output = Result<Option<V>, Self::Error>> + Send + 'static;
}

impl<V, F, Fut, E> Origin<V> for F
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Error = E;
    fn call(self) -> impl Future<Output = Result<Option<V>, E>> + Send + 'static {
        self()
    }
}

pub(crate) const HITS: &str = "holdfast_cache_hits_total";
pub(crate) const MISSES: &str = "holdfast_cache_misses_total";
pub(crate) const COALESCED: &str = "holdfast_cache_coalesced_waiters_total";
pub(crate) const STALE: &str = "holdfast_cache_stale_served_total";
pub(crate) const ORIGIN_CALLS: &str = "holdfast_cache_origin_calls_total";
pub(crate) const FILLS_REJECTED: &str = "holdfast_cache_fills_rejected_total";
pub(crate) const REDIS_ERRORS: &str = "holdfast_cache_redis_errors_total";

/// Below this many slots the map is never swept.
const MIN_SWEEP: usize = 1024;

pub(crate) struct Config {
    pub name: &'static str,
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub beta: f64,
    pub swr: Duration,
    pub sie: Duration,
    pub lease_ttl: Duration,
    pub poll: Duration,
    pub single_flight: bool,
}

impl Config {
    pub fn ttl_for<V>(&self, value: &Option<V>) -> Duration {
        if value.is_some() {
            self.ttl
        } else {
            self.negative_ttl
        }
    }

    /// The hard cap: past its TTL plus this, an entry is never served.
    pub fn max_stale(&self) -> Duration {
        self.swr.max(self.sie)
    }
}

/// A value (or a remembered absence) and when it stops being fresh.
#[derive(Clone)]
pub(crate) struct Entry<V> {
    pub value: Option<V>,
    pub fresh_until: Instant,
    /// How long the origin call that produced it took: XFetch's Δ.
    pub delta: Duration,
}

impl<V> Entry<V> {
    fn within(&self, now: Instant, window: Duration) -> bool {
        now < self.fresh_until + window
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Fresh from the cache.
    Hit,
    /// Stale, inside one of the windows.
    Stale,
    /// From an origin call made for this read (here, or by the fleet's lease holder).
    Fetched,
}

#[derive(Clone)]
pub(crate) struct Served<V> {
    pub value: Option<V>,
    pub kind: Kind,
}

pub(crate) type Outcome<V> = Result<Served<V>, Error>;

struct Flight<V> {
    id: u64,
    outcome: Shared<BoxFuture<'static, Outcome<V>>>,
}

struct Slot<V> {
    /// Fences fills: taken from the cache-wide counter, replaced on invalidation.
    version: u64,
    /// In-process mode only; with Redis the value lives there.
    entry: Option<Entry<V>>,
    flight: Option<Flight<V>>,
    /// Redis mode: a background (early or stale) refresh is running from this instance.
    refreshing: bool,
}

struct Slots<K, V> {
    map: HashMap<K, Slot<V>>,
    sweep_at: usize,
}

enum Plan {
    Serve { stale: bool, refresh: bool },
    Fetch,
}

enum Step<V> {
    Done(Option<V>, Kind),
    Wait(Shared<BoxFuture<'static, Outcome<V>>>, bool),
}

pub(crate) struct Inner<K, V> {
    pub cfg: Config,
    pub tier: Option<Tier<K, V>>,
    slots: Mutex<Slots<K, V>>,
    seq: AtomicU64,
}

/// XFetch (Vattani et al.): recompute early when `now − Δ·β·ln(u) ≥ expiry`, i.e. when
/// `Δ·β·(−ln u) ≥ remaining`, with `u` uniform in (0, 1].
pub(crate) fn xfetch_due(remaining: Duration, delta: Duration, beta: f64, u: f64) -> bool {
    delta.as_secs_f64() * beta * -u.ln() >= remaining.as_secs_f64()
}

impl<K, V> Inner<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub fn new(cfg: Config, tier: Option<Tier<K, V>>) -> Self {
        Inner {
            cfg,
            tier,
            slots: Mutex::new(Slots {
                map: HashMap::new(),
                sweep_at: MIN_SWEEP,
            }),
            seq: AtomicU64::new(1),
        }
    }

    fn next(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn count(&self, name: &'static str) {
        metrics::counter!(name, "cache" => self.cfg.name).increment(1);
    }

    fn lock(&self) -> MutexGuard<'_, Slots<K, V>> {
        // No code that can leave a slot half-updated runs under the lock.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn plan(&self, entry: &Entry<V>, now: Instant) -> Plan {
        if now < entry.fresh_until {
            let u = 1.0 - rand::random::<f64>();
            let refresh = xfetch_due(entry.fresh_until - now, entry.delta, self.cfg.beta, u);
            Plan::Serve {
                stale: false,
                refresh,
            }
        } else if entry.within(now, self.cfg.swr) {
            Plan::Serve {
                stale: true,
                refresh: true,
            }
        } else {
            Plan::Fetch
        }
    }

    /// The slot for `key`, created (after an occasional sweep of dead slots) when missing.
    fn slot<'a>(&self, slots: &'a mut Slots<K, V>, key: &K, now: Instant) -> &'a mut Slot<V> {
        if !slots.map.contains_key(key) {
            if slots.map.len() >= slots.sweep_at {
                let cap = self.cfg.max_stale();
                slots.map.retain(|_, s| {
                    s.flight.is_some()
                        || s.refreshing
                        || s.entry.as_ref().is_some_and(|e| e.within(now, cap))
                });
                slots.sweep_at = (slots.map.len() * 2).max(MIN_SWEEP);
            }
            let version = self.next();
            slots.map.insert(
                key.clone(),
                Slot {
                    version,
                    entry: None,
                    flight: None,
                    refreshing: false,
                },
            );
        }
        slots.map.get_mut(key).expect("slot inserted above")
    }

    pub async fn get_with<F>(self: &Arc<Self>, key: K, origin: F) -> Result<Option<V>, Error>
    where
        F: Origin<V>,
    {
        let step = {
            let mut slots = self.lock();
            let now = Instant::now();
            let slot = self.slot(&mut slots, &key, now);
            let mut origin = Some(origin);
            let mut done = None;
            let plan = (slot.entry.as_ref())
                .map(|e| (self.plan(e, now), e.within(now, self.cfg.max_stale())));
            match plan {
                Some((Plan::Serve { stale, refresh }, _)) => {
                    let value = slot.entry.as_ref().and_then(|e| e.value.clone());
                    done = Some((value, if stale { Kind::Stale } else { Kind::Hit }));
                    if refresh && slot.flight.is_none() {
                        let origin = origin.take().expect("origin unused so far");
                        slot.flight = Some(self.local_flight(key.clone(), slot.version, origin));
                    }
                }
                // Past the hard cap: never served again, not even if the origin fails.
                Some((Plan::Fetch, false)) => slot.entry = None,
                Some((Plan::Fetch, true)) | None => {}
            }
            match (done, &slot.flight) {
                (Some((value, kind)), _) => Step::Done(value, kind),
                (None, Some(flight)) if self.cfg.single_flight => {
                    Step::Wait(flight.outcome.clone(), false)
                }
                (None, _) => {
                    let origin = origin.take().expect("origin unused so far");
                    let flight = match self.tier {
                        None => self.local_flight(key, slot.version, origin),
                        Some(_) => self.redis_flight(key, slot.version, origin),
                    };
                    let outcome = flight.outcome.clone();
                    slot.flight = Some(flight);
                    Step::Wait(outcome, true)
                }
            }
        };
        match step {
            Step::Done(value, kind) => {
                self.count(if kind == Kind::Stale { STALE } else { HITS });
                Ok(value)
            }
            Step::Wait(outcome, leader) => {
                let outcome = outcome.await;
                let stale = matches!(&outcome, Ok(s) if s.kind == Kind::Stale);
                match (leader, &outcome) {
                    (false, _) => self.count(COALESCED),
                    (true, Ok(s)) if s.kind == Kind::Hit => self.count(HITS),
                    (true, _) if !stale => self.count(MISSES),
                    (true, _) => {}
                }
                if stale {
                    self.count(STALE);
                }
                outcome.map(|s| s.value)
            }
        }
    }

    pub async fn invalidate(&self, key: &K) -> Result<(), Error> {
        if let Some(slot) = self.lock().map.get_mut(key) {
            slot.version = self.next();
            slot.entry = None;
            slot.flight = None;
            slot.refreshing = false;
        }
        if let Some(tier) = &self.tier {
            tier.invalidate(key, &self.cfg).await?;
        }
        Ok(())
    }

    pub async fn flush(&self) -> Result<(), Error> {
        {
            let mut slots = self.lock();
            slots.map.clear();
            slots.sweep_at = MIN_SWEEP;
        }
        if let Some(tier) = &self.tier {
            tier.flush().await?;
        }
        Ok(())
    }

    /// Calls the origin, timing it, with a panic turned into an origin error.
    async fn call_origin<F>(&self, origin: F) -> Result<(Option<V>, Duration), Error>
    where
        F: Origin<V>,
    {
        self.count(ORIGIN_CALLS);
        let started = Instant::now();
        let result = AssertUnwindSafe(async move { origin.call().await })
            .catch_unwind()
            .await;
        match result {
            Ok(Ok(value)) => Ok((value, started.elapsed())),
            Ok(Err(e)) => Err(Error::origin(e)),
            Err(_) => Err(Error::origin("the origin panicked")),
        }
    }

    /// Runs `task(inner, id)` on its own tokio task under a fresh flight id; every caller that
    /// joins awaits the same outcome.
    fn spawn_flight<T>(self: &Arc<Self>, task: impl FnOnce(Arc<Self>, u64) -> T) -> Flight<V>
    where
        T: Future<Output = Outcome<V>> + Send + 'static,
    {
        let id = self.next();
        let handle = tokio::spawn(task(Arc::clone(self), id));
        let outcome = async move {
            handle
                .await
                .unwrap_or_else(|_| Err(Error::origin("the cache's origin task was cancelled")))
        };
        Flight {
            id,
            outcome: outcome.boxed().shared(),
        }
    }

    fn local_flight<F: Origin<V>>(self: &Arc<Self>, key: K, version: u64, origin: F) -> Flight<V> {
        self.spawn_flight(|inner, id| async move {
            let result = inner.call_origin(origin).await;
            inner.finish_local(&key, version, id, result)
        })
    }

    /// Fills the slot if it still has the version the call started under, and decides what
    /// the flight's callers get.
    fn finish_local(
        &self,
        key: &K,
        version: u64,
        id: u64,
        result: Result<(Option<V>, Duration), Error>,
    ) -> Outcome<V> {
        let mut slots = self.lock();
        let now = Instant::now();
        let Some(slot) = slots.map.get_mut(key).filter(|s| s.version == version) else {
            // Invalidated or flushed while the origin ran: answer our callers, fill nothing.
            return result.map(|(value, _)| {
                self.count(FILLS_REJECTED);
                Served {
                    value,
                    kind: Kind::Fetched,
                }
            });
        };
        if slot.flight.as_ref().is_some_and(|f| f.id == id) {
            slot.flight = None;
        }
        match result {
            Ok((value, delta)) => {
                slot.entry = Some(Entry {
                    value: value.clone(),
                    fresh_until: now + self.cfg.ttl_for(&value),
                    delta,
                });
                Ok(Served {
                    value,
                    kind: Kind::Fetched,
                })
            }
            Err(e) => match &slot.entry {
                Some(entry) if entry.within(now, self.cfg.sie) => Ok(Served {
                    value: entry.value.clone(),
                    kind: if now < entry.fresh_until {
                        Kind::Hit
                    } else {
                        Kind::Stale
                    },
                }),
                _ => Err(e),
            },
        }
    }

    fn redis_flight<F: Origin<V>>(self: &Arc<Self>, key: K, version: u64, origin: F) -> Flight<V> {
        self.spawn_flight(|inner, id| async move {
            let outcome = inner.resolve_redis(&key, version, origin).await;
            if let Some(slot) = inner.lock().map.get_mut(&key) {
                if slot.flight.as_ref().is_some_and(|f| f.id == id) {
                    slot.flight = None;
                }
            }
            outcome
        })
    }

    /// One instance's read of `key` through Redis: serve what is there, or take the lease and
    /// call the origin, or wait for the instance that holds it.
    async fn resolve_redis<F>(self: &Arc<Self>, key: &K, version: u64, origin: F) -> Outcome<V>
    where
        F: Origin<V>,
    {
        let tier = self
            .tier
            .as_ref()
            .expect("redis flight without a redis tier");
        // A live holder answers within one lease; past two, stop waiting and ask ourselves.
        let give_up = Instant::now() + self.cfg.lease_ttl * 2;
        let mut prior: Option<Entry<V>> = None;
        let mut waited = false;
        loop {
            let stored = match tier.read(key).await {
                Ok(stored) => stored,
                Err(e) => return self.unfilled(Some(e), origin, prior).await,
            };
            if let Some(stored) = stored {
                match self.plan(&stored.entry, Instant::now()) {
                    Plan::Serve { stale, refresh } => {
                        if refresh {
                            self.redis_refresh(key, version, stored.fill, origin);
                        }
                        let kind = match (stale, waited) {
                            (true, _) => Kind::Stale,
                            (false, true) => Kind::Fetched,
                            (false, false) => Kind::Hit,
                        };
                        return Ok(Served {
                            value: stored.entry.value,
                            kind,
                        });
                    }
                    Plan::Fetch => prior = Some(stored.entry),
                }
            }
            match tier.acquire(key, self.cfg.lease_ttl).await {
                Err(e) => return self.unfilled(Some(e), origin, prior).await,
                Ok(Some(lease)) => {
                    // Filled between our read and our lease? The fill is visible now.
                    if let Some(current) = &lease.current {
                        if Instant::now() < current.entry.fresh_until {
                            let value = current.entry.value.clone();
                            tier.release(key, &lease).await.ok();
                            return Ok(Served {
                                value,
                                kind: Kind::Fetched,
                            });
                        }
                    }
                    return self.fetch_and_fill(tier, key, lease, origin, prior).await;
                }
                Ok(None) => {}
            }
            if Instant::now() >= give_up {
                tracing::warn!(
                    cache = self.cfg.name,
                    "gave up waiting for the lease holder"
                );
                return self.unfilled(None, origin, prior).await;
            }
            waited = true;
            tokio::time::sleep(self.cfg.poll).await;
        }
    }

    async fn fetch_and_fill<F>(
        &self,
        tier: &Tier<K, V>,
        key: &K,
        lease: Lease<V>,
        origin: F,
        prior: Option<Entry<V>>,
    ) -> Outcome<V>
    where
        F: Origin<V>,
    {
        match self.call_origin(origin).await {
            Ok((value, delta)) => {
                match tier
                    .fill(key, &lease, value.as_ref(), delta, &self.cfg)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => self.count(FILLS_REJECTED),
                    Err(e) => self.redis_failed(&e),
                }
                Ok(Served {
                    value,
                    kind: Kind::Fetched,
                })
            }
            Err(e) => {
                if let Err(e) = tier.release(key, &lease).await {
                    self.redis_failed(&e);
                }
                self.stale_if_error(e, prior)
            }
        }
    }

    /// Redis failed or the lease never came: ask the origin, fill nothing.
    async fn unfilled<F>(
        &self,
        failure: Option<redis::RedisError>,
        origin: F,
        prior: Option<Entry<V>>,
    ) -> Outcome<V>
    where
        F: Origin<V>,
    {
        if let Some(e) = failure {
            self.redis_failed(&e);
        }
        match self.call_origin(origin).await {
            Ok((value, _)) => Ok(Served {
                value,
                kind: Kind::Fetched,
            }),
            Err(e) => self.stale_if_error(e, prior),
        }
    }

    fn stale_if_error(&self, e: Error, prior: Option<Entry<V>>) -> Outcome<V> {
        match prior {
            Some(p) if p.within(Instant::now(), self.cfg.sie) => Ok(Served {
                value: p.value,
                kind: Kind::Stale,
            }),
            _ => Err(e),
        }
    }

    fn redis_failed(&self, e: &redis::RedisError) {
        self.count(REDIS_ERRORS);
        tracing::warn!(cache = self.cfg.name, error = %e, "redis tier failed; using the origin");
    }

    /// One background refresh per instance (the lease makes it one per fleet) of the fill
    /// we saw; skipped if someone else has refilled or invalidated the key meanwhile.
    fn redis_refresh<F>(self: &Arc<Self>, key: &K, version: u64, seen_fill: String, origin: F)
    where
        F: Origin<V>,
    {
        {
            let mut slots = self.lock();
            match slots.map.get_mut(key) {
                Some(slot) if slot.version == version && !slot.refreshing => slot.refreshing = true,
                _ => return,
            }
        }
        let inner = Arc::clone(self);
        let key = key.clone();
        tokio::spawn(async move {
            let tier = inner
                .tier
                .as_ref()
                .expect("redis refresh without a redis tier");
            match tier.acquire(&key, inner.cfg.lease_ttl).await {
                Ok(Some(lease)) => {
                    let current = lease.current.as_ref().map(|s| s.fill.as_str());
                    if current == Some(seen_fill.as_str()) {
                        let _ = inner.fetch_and_fill(tier, &key, lease, origin, None).await;
                    } else if let Err(e) = tier.release(&key, &lease).await {
                        inner.redis_failed(&e);
                    }
                }
                Ok(None) => {} // another instance is refreshing it
                Err(e) => inner.redis_failed(&e),
            }
            if let Some(slot) = inner.lock().map.get_mut(&key) {
                if slot.version == version {
                    slot.refreshing = false;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::xfetch_due;
    use rand::{Rng, SeedableRng};
    use std::time::Duration;

    #[test]
    fn xfetch_never_fires_early_with_beta_zero_or_delta_zero() {
        let s = Duration::from_secs;
        for u in [1.0, 0.5, 1e-9, f64::MIN_POSITIVE] {
            assert!(!xfetch_due(Duration::from_millis(1), s(10), 0.0, u));
            assert!(!xfetch_due(
                Duration::from_millis(1),
                Duration::ZERO,
                1.0,
                u
            ));
        }
        // u = 1 (ln u = 0) never fires either, however close to expiry.
        assert!(!xfetch_due(Duration::from_nanos(1), s(10), 1.0, 1.0));
    }

    #[test]
    fn xfetch_fires_with_probability_exp_minus_remaining_over_delta_beta() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let delta = Duration::from_secs(2);
        for (remaining, beta) in [(1.0, 1.0), (2.0, 1.0), (6.0, 1.0), (2.0, 4.0), (0.1, 0.5)] {
            let n = 100_000;
            let fired = (0..n)
                .filter(|_| {
                    let u = 1.0 - rng.gen::<f64>();
                    xfetch_due(Duration::from_secs_f64(remaining), delta, beta, u)
                })
                .count();
            let expected = (-remaining / (delta.as_secs_f64() * beta)).exp();
            let got = fired as f64 / n as f64;
            assert!(
                (got - expected).abs() < 0.01,
                "remaining {remaining}s β {beta}: fired {got}, expected {expected}"
            );
        }
    }
}
