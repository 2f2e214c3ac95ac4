//! The counters a dashboard reads, through a process-wide recorder (this binary is its own
//! process; each test filters on its own `cache` label).

mod support;

use holdfast_cache::{Cache, Ttl};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use support::{concurrent_gets, Origin};

type Counters = Arc<Mutex<HashMap<String, Arc<AtomicU64>>>>;

/// Counters only, keyed `name{cache}`.
struct CountingRecorder(Counters);

impl Recorder for CountingRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let cache = key
            .labels()
            .find(|l| l.key() == "cache")
            .map_or("", |l| l.value());
        let name = format!("{}{{{cache}}}", key.name());
        let mut counters = self.0.lock().unwrap();
        Counter::from_arc(Arc::clone(counters.entry(name).or_default()))
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn counters() -> &'static Counters {
    static COUNTERS: OnceLock<Counters> = OnceLock::new();
    COUNTERS.get_or_init(|| {
        let counters = Counters::default();
        metrics::set_global_recorder(CountingRecorder(Arc::clone(&counters)))
            .expect("the only recorder in this binary");
        counters
    })
}

fn count(cache: &str, what: &str) -> u64 {
    let name = format!("holdfast_cache_{what}_total{{{cache}}}");
    let counters = counters().lock().unwrap();
    counters.get(&name).map_or(0, |c| c.load(Ordering::SeqCst))
}

#[tokio::test(start_paused = true)]
async fn every_read_is_counted_once_by_how_it_was_answered() {
    counters();
    let name = "metrics_test";
    let cache = Cache::<&str, u64>::builder(Ttl::from_secs(10))
        .name(name)
        .beta(0.0)
        .stale_if_error(Duration::from_secs(5))
        .build();
    let origin = Origin::default();
    let s = Duration::from_secs(1);
    for got in concurrent_gets(&cache, 10, "k", &origin, s, Ok(Some(1))).await {
        got.unwrap();
    }
    cache
        .get_with("k", origin.answer(s, Ok(Some(2))))
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(12)).await;
    let stale = cache.get_with("k", origin.answer(s, Err("down"))).await;
    assert_eq!(stale.unwrap(), Some(1));

    let got = [
        "hits",
        "misses",
        "coalesced_waiters",
        "origin_calls",
        "stale_served",
    ]
    .map(|what| (what, count(name, what)));
    let want = [
        ("hits", 1),
        ("misses", 1),
        ("coalesced_waiters", 9),
        ("origin_calls", 2),
        ("stale_served", 1),
    ];
    assert_eq!(got, want);
}
