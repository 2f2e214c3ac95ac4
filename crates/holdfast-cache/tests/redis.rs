//! The shared Redis tier: several `Cache` values, each with its own connection, play the
//! instances of a fleet. Needs `REDIS_URL` (skipped without it, a failure under `CI=true`);
//! every test uses its own key prefix. These run on the real clock: they wait on conditions,
//! or on expiries that must already have passed — never on "long enough, probably".

mod support;

use holdfast_cache::{Builder, Cache, Ttl};
use holdfast_testkit::redis as testing;
use serde::{de::DeserializeOwned, Serialize};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::Origin;
use tokio::sync::{Barrier, Semaphore};

const MS: Duration = Duration::from_millis(1);
const ZERO: Duration = Duration::ZERO;

/// Instances sharing one key prefix on the `REDIS_URL` server.
struct Fleet {
    test: &'static str,
    prefix: String,
}

impl Fleet {
    /// `None` when Redis tests are skipped.
    async fn new(test: &'static str) -> Option<Fleet> {
        testing::redis(test).await?;
        let prefix = testing::unique_prefix(test);
        Some(Fleet { test, prefix })
    }

    /// One more instance, with its own connection.
    async fn instance<V>(
        &self,
        ttl: Ttl,
        configure: impl FnOnce(Builder<String, V>) -> Builder<String, V>,
    ) -> Cache<String, V>
    where
        V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    {
        let conn = testing::redis(self.test)
            .await
            .expect("redis answered before");
        let builder = Cache::builder(ttl)
            .name(self.test)
            .redis(conn, self.prefix.clone())
            .poll_interval(5 * MS);
        configure(builder).build()
    }

    async fn instances<V>(
        &self,
        n: usize,
        ttl: Ttl,
        configure: impl Fn(Builder<String, V>) -> Builder<String, V>,
    ) -> Vec<Cache<String, V>>
    where
        V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    {
        let mut fleet = Vec::with_capacity(n);
        for _ in 0..n {
            fleet.push(self.instance(ttl, &configure).await);
        }
        fleet
    }
}

fn key() -> String {
    "hot".to_string()
}

fn minute() -> Ttl {
    Ttl::from_secs(60)
}

/// Waits (at most 10 s) until `check` holds.
async fn eventually<F: Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(10 * MS).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_times_250_misses_make_at_most_two_origin_calls() {
    let Some(fleet) = Fleet::new("fleet_hot_key").await else {
        return;
    };
    let fleet = fleet.instances::<u64>(4, minute(), |b| b).await;
    let origin = Origin::default();
    let start = Arc::new(Barrier::new(1000));
    let mut callers = Vec::new();
    for cache in &fleet {
        for _ in 0..250 {
            let (cache, start) = (cache.clone(), Arc::clone(&start));
            let origin = origin.answer(100 * MS, Ok(Some(7)));
            callers.push(tokio::spawn(async move {
                start.wait().await;
                cache.get_with(key(), origin).await
            }));
        }
    }
    for caller in callers {
        assert_eq!(caller.await.unwrap().unwrap(), Some(7));
    }
    let calls = origin.calls();
    assert!(
        (1..=2).contains(&calls),
        "{calls} origin calls for 1,000 misses on 4 instances"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_lease_holder_is_replaced_when_its_lease_expires() {
    let Some(fleet) = Fleet::new("crashed_holder").await else {
        return;
    };
    let lease = 400 * MS;
    let fleet = fleet
        .instances::<String>(3, minute(), |b| b.lease_ttl(Ttl::new(lease)))
        .await;
    let origin = Origin::default();
    // Instance 0 takes the lease and never answers (its gate is dropped unopened).
    let (hung, gate) = origin.gated(Ok(Some("never".to_string())));
    tokio::spawn({
        let cache = fleet[0].clone();
        async move { cache.get_with(key(), hung).await }
    });
    drop(gate.started().await);
    let asked = Instant::now();
    let b = fleet[1].get_with(key(), origin.answer(ZERO, Ok(Some("b".into()))));
    assert_eq!(b.await.unwrap().as_deref(), Some("b"));
    let waited = asked.elapsed();
    assert!(
        waited >= lease / 2,
        "took over after {waited:?}, before the lease expired"
    );
    // Instance 1 took the lease over and filled: instance 2 reads it without an origin call.
    let c = fleet[2].get_with(key(), origin.answer(ZERO, Err("must not be asked")));
    assert_eq!(c.await.unwrap().as_deref(), Some("b"));
    assert_eq!(origin.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_lease_expired_cannot_overwrite_its_successor() {
    let Some(fleet) = Fleet::new("expired_holder").await else {
        return;
    };
    let fleet = fleet
        .instances::<String>(3, minute(), |b| b.lease_ttl(Ttl::new(300 * MS)))
        .await;
    let origin = Origin::default();
    let (slow, gate) = origin.gated(Ok(Some("slow".to_string())));
    let slow_caller = tokio::spawn({
        let cache = fleet[0].clone();
        async move { cache.get_with(key(), slow).await }
    });
    let open = gate.started().await;
    let b = fleet[1].get_with(key(), origin.answer(ZERO, Ok(Some("b".into()))));
    assert_eq!(b.await.unwrap().as_deref(), Some("b"));
    open.send(()).unwrap();
    let slow = slow_caller.await.unwrap().unwrap();
    assert_eq!(
        slow.as_deref(),
        Some("slow"),
        "its own caller still gets it"
    );
    let c = fleet[2].get_with(key(), origin.answer(ZERO, Err("must not be asked")));
    assert_eq!(
        c.await.unwrap().as_deref(),
        Some("b"),
        "the late fill was fenced off"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recompute_that_started_before_invalidation_never_lands() {
    let Some(fleet) = Fleet::new("late_fill").await else {
        return;
    };
    let sixty = Duration::from_secs(60);
    let fleet = fleet
        .instances::<String>(3, minute(), |b| b.stale_if_error(sixty))
        .await;
    let origin = Origin::default();
    let (old, gate) = origin.gated(Ok(Some("old".to_string())));
    let late = tokio::spawn({
        let cache = fleet[0].clone();
        async move { cache.get_with(key(), old).await }
    });
    let open = gate.started().await;
    fleet[1].invalidate(&key()).await.unwrap();
    let new = fleet[1].get_with(key(), origin.answer(ZERO, Ok(Some("new".into()))));
    assert_eq!(new.await.unwrap().as_deref(), Some("new"));
    open.send(()).unwrap();
    assert_eq!(late.await.unwrap().unwrap().as_deref(), Some("old"));
    for cache in &fleet {
        let v = cache.get_with(key(), origin.answer(ZERO, Err("must not be asked")));
        assert_eq!(v.await.unwrap().as_deref(), Some("new"));
    }
    assert_eq!(origin.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_absences_and_invalidations_are_fleet_wide() {
    let Some(fleet) = Fleet::new("shared").await else {
        return;
    };
    let fleet = fleet.instances::<u64>(2, minute(), |b| b).await;
    let (a, b) = (&fleet[0], &fleet[1]);
    let origin = Origin::default();
    let v = a.get_with(key(), origin.answer(ZERO, Ok(Some(1)))).await;
    assert_eq!(v.unwrap(), Some(1));
    let v = b.get_with(key(), origin.answer(ZERO, Ok(Some(2)))).await;
    assert_eq!(v.unwrap(), Some(1));
    let gone = "gone".to_string();
    let v = a
        .get_with(gone.clone(), origin.answer(ZERO, Ok(None)))
        .await;
    assert_eq!(v.unwrap(), None);
    let v = b.get_with(gone, origin.answer(ZERO, Ok(Some(9)))).await;
    assert_eq!(v.unwrap(), None, "the absence is shared too");
    assert_eq!(origin.calls(), 2);
    b.invalidate(&key()).await.unwrap();
    let v = a.get_with(key(), origin.answer(ZERO, Ok(Some(3)))).await;
    assert_eq!(v.unwrap(), Some(3));
    assert_eq!(origin.calls(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_within_the_cap_and_an_error_beyond_it() {
    let Some(fleet) = Fleet::new("stale_if_error").await else {
        return;
    };
    // Fresh for 100 ms, then stale-if-error for 2 s; Redis drops the record at 2.1 s.
    let fleet = fleet
        .instances::<u64>(2, Ttl::new(100 * MS), |b| {
            b.beta(0.0).stale_if_error(Duration::from_secs(2))
        })
        .await;
    let (a, b) = (&fleet[0], &fleet[1]);
    let origin = Origin::default();
    a.get_with(key(), origin.answer(ZERO, Ok(Some(1))))
        .await
        .unwrap();
    let filled = Instant::now(); // the record's 2.1 s started before this
    tokio::time::sleep(150 * MS).await; // expired
    let v = b.get_with(key(), origin.answer(ZERO, Err("down"))).await;
    assert_eq!(v.unwrap(), Some(1), "stale stands in for the failed origin");
    tokio::time::sleep((2200 * MS).saturating_sub(filled.elapsed())).await; // past the cap
    let err = b
        .get_with(key(), origin.answer(ZERO, Err("down")))
        .await
        .unwrap_err();
    assert!(err.is_origin());
    let v = a.get_with(key(), origin.answer(ZERO, Ok(Some(2)))).await;
    assert_eq!(v.unwrap(), Some(2), "expired: the origin was asked");
    assert_eq!(origin.calls(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_makes_one_refresh_per_fleet() {
    let Some(fleet) = Fleet::new("stale_while_revalidate").await else {
        return;
    };
    let sixty = Duration::from_secs(60);
    let fleet = fleet
        .instances::<u64>(2, Ttl::new(100 * MS), |b| {
            b.beta(0.0).stale_while_revalidate(sixty)
        })
        .await;
    let origin = Origin::default();
    fleet[0]
        .get_with(key(), origin.answer(ZERO, Ok(Some(1))))
        .await
        .unwrap();
    tokio::time::sleep(150 * MS).await; // stale
    let gate = Arc::new(Semaphore::new(0));
    let mut readers = Vec::new();
    for cache in &fleet {
        for _ in 0..25 {
            let (cache, origin) = (cache.clone(), origin.held(&gate, Ok(Some(2))));
            readers.push(tokio::spawn(
                async move { cache.get_with(key(), origin).await },
            ));
        }
    }
    for reader in readers {
        assert_eq!(reader.await.unwrap().unwrap(), Some(1), "stale, at once");
    }
    eventually("the refresh has started", || async { origin.calls() == 2 }).await;
    gate.add_permits(100);
    eventually("the refresh has landed", || {
        let v = fleet[1].get_with(key(), origin.answer(ZERO, Err("must not be asked")));
        async { v.await.unwrap() == Some(2) }
    })
    .await;
    assert_eq!(
        origin.calls(),
        2,
        "one background refresh for the whole fleet"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfetch_early_refresh_is_one_per_fleet() {
    let Some(fleet) = Fleet::new("xfetch").await else {
        return;
    };
    // Δ = 50 ms and β = 10⁶: a read 60 s before expiry refreshes with p = e^(−60/50,000),
    // i.e. nearly every read wants to. The lease lets exactly one of them call the origin.
    let readers_fleet = fleet.instances::<u64>(4, minute(), |b| b.beta(1e6)).await;
    let observer = fleet.instance::<u64>(minute(), |b| b.beta(0.0)).await;
    let origin = Origin::default();
    observer
        .get_with(key(), origin.answer(50 * MS, Ok(Some(1))))
        .await
        .unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let mut readers = Vec::new();
    for cache in &readers_fleet {
        for _ in 0..50 {
            let (cache, origin) = (cache.clone(), origin.held(&gate, Ok(Some(2))));
            readers.push(tokio::spawn(
                async move { cache.get_with(key(), origin).await },
            ));
        }
    }
    for reader in readers {
        assert_eq!(reader.await.unwrap().unwrap(), Some(1), "fresh, at once");
    }
    eventually("an early refresh has started", || async {
        origin.calls() == 2
    })
    .await;
    gate.add_permits(1000);
    eventually("the early refresh has landed", || {
        let v = observer.get_with(key(), origin.answer(ZERO, Err("must not be asked")));
        async { v.await.unwrap() == Some(2) }
    })
    .await;
    assert_eq!(origin.calls(), 2, "one early refresh for the whole fleet");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushing_the_prefix_loses_nothing() {
    let Some(fleet) = Fleet::new("flush").await else {
        return;
    };
    let fleet = fleet.instances::<u64>(2, minute(), |b| b).await;
    let (a, b) = (&fleet[0], &fleet[1]);
    let origin = Origin::default();
    a.get_with(key(), origin.answer(ZERO, Ok(Some(1))))
        .await
        .unwrap();
    // A fill that started before the flush must not land after it either.
    let other = "other".to_string();
    let (late, gate) = origin.gated(Ok(Some(10)));
    let late = tokio::spawn({
        let (a, other) = (a.clone(), other.clone());
        async move { a.get_with(other, late).await }
    });
    let open = gate.started().await;
    a.flush().await.unwrap();
    open.send(()).unwrap();
    assert_eq!(late.await.unwrap().unwrap(), Some(10));
    let v = b.get_with(key(), origin.answer(ZERO, Ok(Some(2)))).await;
    assert_eq!(v.unwrap(), Some(2), "the origin was asked again");
    let v = b.get_with(other, origin.answer(ZERO, Ok(Some(20)))).await;
    assert_eq!(v.unwrap(), Some(20), "the late fill did not land");
    assert_eq!(origin.calls(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_falls_back_to_the_origin_but_fails_invalidation() {
    // Port 1 refuses at once. The manager connects lazily, so reads meet the failure.
    let client = holdfast_cache::redis::Client::open("redis://127.0.0.1:1").unwrap();
    let config = holdfast_cache::redis::aio::ConnectionManagerConfig::new()
        .set_number_of_retries(0)
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(1)));
    let conn = holdfast_cache::redis::aio::ConnectionManager::new_lazy_with_config(client, config)
        .unwrap();
    let cache = Cache::<String, u64>::builder(minute())
        .redis(conn, "unreachable")
        .build();
    let origin = Origin::default();
    let v = cache
        .get_with(key(), origin.answer(ZERO, Ok(Some(1))))
        .await;
    assert_eq!(v.unwrap(), Some(1));
    assert_eq!(origin.calls(), 1);
    let err = cache.invalidate(&key()).await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
}
