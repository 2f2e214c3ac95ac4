//! The in-process cache, on tokio's paused clock: time moves only when every task is waiting,
//! so "all callers arrived before the origin answered" and "the TTL has passed" are exact.

mod support;

use holdfast_cache::{Cache, Ttl};
use std::time::Duration;
use support::{concurrent_gets, Origin};
use tokio::time::{advance, sleep};

const S: Duration = Duration::from_secs(1);

fn ttl(secs: u64) -> Ttl {
    Ttl::from_secs(secs)
}

/// 1,000 concurrent misses on one key; returns how many origin calls they caused.
async fn hot_key_origin_calls(single_flight: bool) -> usize {
    let cache = Cache::<&str, u64>::builder(ttl(60))
        .single_flight(single_flight)
        .build();
    let origin = Origin::default();
    for got in concurrent_gets(&cache, 1000, "hot", &origin, S, Ok(Some(42))).await {
        assert_eq!(got.unwrap(), Some(42));
    }
    origin.calls()
}

#[tokio::test(start_paused = true)]
async fn a_thousand_concurrent_misses_make_one_origin_call() {
    assert_eq!(hot_key_origin_calls(true).await, 1);
}

/// The planted fault proves the assertion above can fail: without single flight the same
/// 1,000 misses make 1,000 origin calls.
#[tokio::test(start_paused = true)]
async fn without_single_flight_the_same_assertion_fails() {
    let calls = hot_key_origin_calls(false).await;
    assert!(calls > 1, "the fault should stampede, got {calls} call(s)");
    assert_eq!(calls, 1000);
}

#[tokio::test(start_paused = true)]
async fn coalesced_callers_share_one_error_and_it_is_not_cached() {
    let cache = Cache::<&str, u64>::builder(ttl(60)).build();
    let origin = Origin::default();
    for got in concurrent_gets(&cache, 100, "k", &origin, S, Err("origin down")).await {
        let err = got.unwrap_err();
        assert!(err.is_origin() && !err.is_unavailable());
        assert_eq!(err.origin_error().unwrap().to_string(), "origin down");
    }
    assert_eq!(origin.calls(), 1);
    let v = cache.get_with("k", origin.answer(S, Ok(Some(1)))).await;
    assert_eq!(v.unwrap(), Some(1));
    assert_eq!(origin.calls(), 2, "the error was not cached");
}

#[tokio::test(start_paused = true)]
async fn a_panicking_origin_is_an_origin_error_and_is_not_cached() {
    let cache = Cache::<&str, u64>::builder(ttl(60)).build();
    async fn explode() -> Result<Option<u64>, &'static str> {
        panic!("boom")
    }
    let err = cache.get_with("k", explode).await.unwrap_err();
    assert!(err.is_origin(), "{err}");
    let v = cache
        .get_with("k", || async { Ok::<_, &str>(Some(2)) })
        .await;
    assert_eq!(v.unwrap(), Some(2));
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_gives_up_strands_nobody_and_the_answer_still_fills() {
    let cache = Cache::<&str, u64>::builder(ttl(60)).build();
    let origin = Origin::default();
    let (first, gate) = origin.gated(Ok(Some(5)));
    let leader = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get_with("k", first).await }
    });
    let open = gate.started().await;
    let follower = tokio::spawn({
        let (cache, origin) = (cache.clone(), origin.answer(S, Ok(Some(6))));
        async move { cache.get_with("k", origin).await }
    });
    leader.abort();
    open.send(()).unwrap();
    assert_eq!(follower.await.unwrap().unwrap(), Some(5));
    let v = cache.get_with("k", origin.answer(S, Ok(Some(7)))).await;
    assert_eq!(v.unwrap(), Some(5), "the abandoned call still filled");
    assert_eq!(origin.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn values_expire_after_their_ttl() {
    let cache = Cache::<&str, u64>::builder(ttl(10)).beta(0.0).build();
    let origin = Origin::default();
    assert_eq!(
        cache
            .get_with("k", origin.answer(S, Ok(Some(1))))
            .await
            .unwrap(),
        Some(1)
    );
    advance(Duration::from_millis(9_900)).await;
    assert_eq!(
        cache
            .get_with("k", origin.answer(S, Ok(Some(2))))
            .await
            .unwrap(),
        Some(1)
    );
    assert_eq!(origin.calls(), 1);
    advance(Duration::from_millis(200)).await;
    assert_eq!(
        cache
            .get_with("k", origin.answer(S, Ok(Some(2))))
            .await
            .unwrap(),
        Some(2)
    );
    assert_eq!(origin.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn not_found_is_cached_for_the_shorter_negative_ttl() {
    let cache = Cache::<&str, u64>::builder(ttl(10))
        .negative_ttl(Ttl::from_secs(2))
        .beta(0.0)
        .build();
    let origin = Origin::default();
    let zero = Duration::ZERO;
    assert_eq!(
        cache
            .get_with("gone", origin.answer(zero, Ok(None)))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        cache
            .get_with("here", origin.answer(zero, Ok(Some(1))))
            .await
            .unwrap(),
        Some(1)
    );
    advance(Duration::from_millis(1_900)).await;
    assert_eq!(
        cache
            .get_with("gone", origin.answer(zero, Ok(Some(9))))
            .await
            .unwrap(),
        None
    );
    assert_eq!(origin.calls(), 2, "the absence was remembered");
    advance(Duration::from_millis(200)).await;
    assert_eq!(
        cache
            .get_with("gone", origin.answer(zero, Ok(Some(9))))
            .await
            .unwrap(),
        Some(9)
    );
    assert_eq!(
        cache
            .get_with("here", origin.answer(zero, Ok(Some(8))))
            .await
            .unwrap(),
        Some(1)
    );
    assert_eq!(origin.calls(), 3, "only the absence expired after 2 s");
}

#[tokio::test(start_paused = true)]
async fn xfetch_refreshes_a_hot_key_once_before_it_expires() {
    // Δ = 2 s (the origin's latency), β = 10: five seconds before expiry each read starts a
    // refresh with probability exp(−5/20) ≈ 0.78, so 100 reads all missing it is ~1e-66.
    let cache = Cache::<&str, u64>::builder(ttl(10)).beta(10.0).build();
    let origin = Origin::default();
    let latency = 2 * S;
    assert_eq!(
        cache
            .get_with("k", origin.answer(latency, Ok(Some(1))))
            .await
            .unwrap(),
        Some(1)
    );
    advance(5 * S).await; // 5 s of freshness left
    for _ in 0..100 {
        // Served at once from the cache (a read that waited would see 2 and move the clock).
        let v = cache
            .get_with("k", origin.answer(latency, Ok(Some(2))))
            .await;
        assert_eq!(v.unwrap(), Some(1));
    }
    sleep(latency + S).await; // the refresh has answered; 2 s of the old TTL are left
    assert_eq!(
        origin.calls(),
        2,
        "exactly one early refresh, however many reads chose one"
    );
    let v = cache
        .get_with("k", origin.answer(latency, Ok(Some(3))))
        .await;
    assert_eq!(
        v.unwrap(),
        Some(2),
        "refreshed before the old value expired"
    );
}

#[tokio::test(start_paused = true)]
async fn xfetch_with_beta_zero_never_refreshes_early() {
    let cache = Cache::<&str, u64>::builder(ttl(10)).beta(0.0).build();
    let origin = Origin::default();
    let latency = 5 * S; // a large Δ makes no difference with β = 0
    cache
        .get_with("k", origin.answer(latency, Ok(Some(1))))
        .await
        .unwrap();
    advance(Duration::from_millis(9_999)).await;
    for _ in 0..1000 {
        let v = cache
            .get_with("k", origin.answer(latency, Ok(Some(2))))
            .await;
        assert_eq!(v.unwrap(), Some(1));
    }
    assert_eq!(origin.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn stale_while_revalidate_serves_stale_during_one_refresh() {
    let cache = Cache::<&str, u64>::builder(ttl(10))
        .beta(0.0)
        .stale_while_revalidate(5 * S)
        .build();
    let origin = Origin::default();
    cache
        .get_with("k", origin.answer(S, Ok(Some(1))))
        .await
        .unwrap();
    advance(11 * S).await; // 1 s stale
    for got in concurrent_gets(&cache, 50, "k", &origin, S, Ok(Some(2))).await {
        assert_eq!(got.unwrap(), Some(1), "stale, at once");
    }
    sleep(2 * S).await; // the refresh has answered
    assert_eq!(origin.calls(), 2, "one background refresh");
    let v = cache.get_with("k", origin.answer(S, Ok(Some(3)))).await;
    assert_eq!(v.unwrap(), Some(2));
    assert_eq!(origin.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn past_the_stale_window_a_read_waits_for_the_origin() {
    let cache = Cache::<&str, u64>::builder(ttl(10))
        .beta(0.0)
        .stale_while_revalidate(5 * S)
        .build();
    let origin = Origin::default();
    cache
        .get_with("k", origin.answer(S, Ok(Some(1))))
        .await
        .unwrap();
    advance(15 * S).await; // exactly at the cap: no longer served
    let v = cache.get_with("k", origin.answer(S, Ok(Some(2)))).await;
    assert_eq!(v.unwrap(), Some(2));
}

#[tokio::test(start_paused = true)]
async fn stale_if_error_serves_stale_within_the_cap_and_errors_beyond_it() {
    let cache = Cache::<&str, u64>::builder(ttl(10))
        .beta(0.0)
        .stale_if_error(5 * S)
        .build();
    let origin = Origin::default();
    let zero = Duration::ZERO;
    cache
        .get_with("k", origin.answer(zero, Ok(Some(1))))
        .await
        .unwrap();
    advance(12 * S).await; // 2 s stale
    let v = cache.get_with("k", origin.answer(zero, Err("down"))).await;
    assert_eq!(v.unwrap(), Some(1), "stale stands in for the failed origin");
    advance(4 * S).await; // 6 s stale: past the cap
    let err = cache
        .get_with("k", origin.answer(zero, Err("down")))
        .await
        .unwrap_err();
    assert!(err.is_origin());
    assert_eq!(origin.calls(), 3, "each failure was a fresh origin call");
    let v = cache.get_with("k", origin.answer(zero, Ok(Some(2)))).await;
    assert_eq!(v.unwrap(), Some(2));
}

#[tokio::test(start_paused = true)]
async fn stale_if_error_is_judged_when_the_origin_fails_not_when_it_was_asked() {
    let cache = Cache::<&str, u64>::builder(ttl(10))
        .beta(0.0)
        .stale_if_error(5 * S)
        .build();
    let origin = Origin::default();
    cache
        .get_with("k", origin.answer(Duration::ZERO, Ok(Some(1))))
        .await
        .unwrap();
    advance(14 * S).await; // 4 s stale when asked; the origin fails 2 s later, at 6 s stale
    let err = cache
        .get_with("k", origin.answer(2 * S, Err("down")))
        .await
        .unwrap_err();
    assert!(err.is_origin());
}

#[tokio::test(start_paused = true)]
async fn a_recompute_that_started_before_invalidation_never_lands() {
    let cache = Cache::<&str, &str>::builder(ttl(60))
        .stale_if_error(60 * S)
        .build();
    let origin = Origin::default();
    let (old, gate) = origin.gated(Ok(Some("old")));
    let late = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get_with("k", old).await }
    });
    let open = gate.started().await;
    cache.invalidate(&"k").await.unwrap();
    let v = cache.get_with("k", origin.answer(S, Ok(Some("new")))).await;
    assert_eq!(
        v.unwrap(),
        Some("new"),
        "after invalidation, a new origin call"
    );
    open.send(()).unwrap();
    assert_eq!(
        late.await.unwrap().unwrap(),
        Some("old"),
        "its own caller still gets it"
    );
    let v = cache
        .get_with("k", origin.answer(S, Err("must not be asked")))
        .await;
    assert_eq!(v.unwrap(), Some("new"), "the late answer did not overwrite");
    assert_eq!(origin.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_invalidated_value_is_not_served_even_as_stale() {
    let cache = Cache::<&str, u64>::builder(ttl(10))
        .stale_while_revalidate(60 * S)
        .stale_if_error(60 * S)
        .build();
    let origin = Origin::default();
    cache
        .get_with("k", origin.answer(S, Ok(Some(1))))
        .await
        .unwrap();
    cache.invalidate(&"k").await.unwrap();
    let err = cache
        .get_with("k", origin.answer(S, Err("down")))
        .await
        .unwrap_err();
    assert!(err.is_origin());
}

#[tokio::test(start_paused = true)]
async fn flushing_loses_nothing_the_next_read_asks_the_origin() {
    let cache = Cache::<&str, u64>::builder(ttl(60)).build();
    let origin = Origin::default();
    cache
        .get_with("a", origin.answer(S, Ok(Some(1))))
        .await
        .unwrap();
    let (late, gate) = origin.gated(Ok(Some(10)));
    let late = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get_with("b", late).await }
    });
    let open = gate.started().await;
    cache.flush().await.unwrap();
    open.send(()).unwrap();
    assert_eq!(late.await.unwrap().unwrap(), Some(10));
    let a = cache.get_with("a", origin.answer(S, Ok(Some(2)))).await;
    let b = cache.get_with("b", origin.answer(S, Ok(Some(20)))).await;
    assert_eq!((a.unwrap(), b.unwrap()), (Some(2), Some(20)));
    assert_eq!(origin.calls(), 4, "both keys went back to the origin");
}

#[test]
#[should_panic(expected = "at least one millisecond")]
fn there_is_no_zero_ttl() {
    let _ = Ttl::new(Duration::ZERO);
}

#[test]
#[should_panic(expected = "must not be longer than the ttl")]
fn the_negative_ttl_is_never_longer_than_the_ttl() {
    let _ = Cache::<&str, u64>::builder(ttl(1)).negative_ttl(ttl(2));
}
