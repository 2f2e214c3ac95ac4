//! `holdfast bench cache`: the hit path of `holdfast-cache`'s in-process tier against moka
//! (`moka::future::Cache`) used directly.
//!
//! One operation is a read of a warm key. For Holdfast that is `Cache::get_with(key, origin)`
//! — the only read there is, so the origin closure is built on every call and never run. For
//! moka it is `get(&key)` (its cheapest read) and, separately, `get_with(key, init)` (its
//! read-through call, the like-for-like API). Both hold the same keys (`u64`), the same values
//! (`Arc<String>` of 64 bytes), the same TTL (1 h, so nothing expires mid-run) and are read by
//! the same tasks on the same runtime (one worker thread per core) with the same key
//! sequence (Zipf or uniform). Phases alternate between the caches so drift hits all of
//! them. By default the Prometheus recorder `holdfast serve` installs is installed here too,
//! so Holdfast's hit counters cost what they cost in production; moka counts nothing.

use crate::cli::BenchCacheArgs;
use anyhow::ensure;
use holdfast_cache::{Cache, Ttl};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::json;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TTL: Duration = Duration::from_secs(3600);
/// Keys each task cycles through (pre-drawn so the RNG is not on the measured path).
const SEQUENCE: usize = 1 << 16;

type Value = Arc<String>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subject {
    Holdfast,
    MokaGet,
    MokaGetWith,
}

impl Subject {
    fn name(self) -> &'static str {
        match self {
            Subject::Holdfast => "holdfast-cache get_with",
            Subject::MokaGet => "moka get",
            Subject::MokaGetWith => "moka get_with",
        }
    }
}

#[derive(Debug, Serialize)]
struct Phase {
    ops: u64,
    secs: f64,
    ops_per_s: f64,
}

#[derive(Debug, Serialize)]
struct System {
    name: &'static str,
    /// Median over phases.
    ops_per_s: f64,
    phases: Vec<Phase>,
}

pub async fn run(args: BenchCacheArgs) -> anyhow::Result<()> {
    ensure!(
        args.keys > 0 && args.tasks > 0 && args.rounds > 0,
        "nothing to run"
    );
    ensure!(
        args.zipf >= 0.0 && args.zipf.is_finite(),
        "--zipf must be >= 0"
    );
    if !args.no_metrics {
        holdfast_web::install_metrics_recorder().map_err(anyhow::Error::msg)?;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let value: Value = Arc::new("x".repeat(64));

    let holdfast: Cache<u64, Value> = Cache::builder(Ttl::new(TTL)).name("bench").build();
    let moka: moka::future::Cache<u64, Value> = moka::future::Cache::builder()
        .max_capacity(args.keys as u64)
        .time_to_live(TTL)
        .build();
    for k in 0..args.keys as u64 {
        let v = Arc::clone(&value);
        holdfast
            .get_with(k, move || async move { Ok::<_, Infallible>(Some(v)) })
            .await?;
        moka.insert(k, Arc::clone(&value)).await;
    }
    moka.run_pending_tasks().await;

    let sequences: Arc<Vec<Vec<u64>>> = Arc::new(
        (0..args.tasks)
            .map(|t| key_sequence(args.keys, args.zipf, t as u64))
            .collect(),
    );
    eprintln!(
        "bench cache: {} keys ({}), {} tasks on {threads} worker threads, {} rounds × {:?}, metrics {}",
        args.keys,
        if args.zipf == 0.0 { "uniform".to_owned() } else { format!("zipf s={}", args.zipf) },
        args.tasks,
        args.rounds,
        args.duration,
        if args.no_metrics { "off" } else { "on" },
    );

    let subjects = [Subject::Holdfast, Subject::MokaGet, Subject::MokaGetWith];
    let mut phases: Vec<Vec<Phase>> = subjects.iter().map(|_| Vec::new()).collect();
    // One short unmeasured warm-up of each, then alternate.
    for &s in &subjects {
        phase(s, &holdfast, &moka, &sequences, Duration::from_millis(300)).await?;
    }
    for round in 0..args.rounds {
        for (i, &s) in subjects.iter().enumerate() {
            let p = phase(s, &holdfast, &moka, &sequences, args.duration).await?;
            eprintln!(
                "  round {}: {:<24} {:>12.0} gets/s",
                round + 1,
                s.name(),
                p.ops_per_s
            );
            phases[i].push(p);
        }
    }
    let systems: Vec<System> = subjects
        .iter()
        .zip(phases)
        .map(|(s, phases)| {
            let mut rates: Vec<f64> = phases.iter().map(|p| p.ops_per_s).collect();
            rates.sort_by(f64::total_cmp);
            System {
                name: s.name(),
                ops_per_s: rates[rates.len() / 2],
                phases,
            }
        })
        .collect();
    let (ours, get, get_with) = (
        systems[0].ops_per_s,
        systems[1].ops_per_s,
        systems[2].ops_per_s,
    );
    let vs_get = ours / get;
    let vs_get_with = ours / get_with;
    println!(
        "holdfast bench cache — hit path, median of {} phases",
        args.rounds
    );
    for s in &systems {
        println!("  {:<24} {:>12.0} gets/s", s.name, s.ops_per_s);
    }
    println!("  ratio holdfast / moka get       {vs_get:.2}×  (target ≥ 0.90)");
    println!("  ratio holdfast / moka get_with  {vs_get_with:.2}×");
    if let Some(path) = &args.json {
        let doc = json!({
            "bench": "cache",
            "keys": args.keys,
            "distribution": if args.zipf == 0.0 { json!("uniform") } else { json!({ "zipf": args.zipf }) },
            "tasks": args.tasks,
            "worker_threads": threads,
            "phase_secs": args.duration.as_secs_f64(),
            "rounds": args.rounds,
            "metrics_recorder": !args.no_metrics,
            "value": "Arc<String> (64 bytes)",
            "systems": systems,
            "ratio_vs_moka_get": vs_get,
            "ratio_vs_moka_get_with": vs_get_with,
            "target": 0.9,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Pre-drawn key indices: Zipf(s) over `keys` by inverse CDF, or uniform for s = 0.
fn key_sequence(keys: usize, s: f64, seed: u64) -> Vec<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed ^ seed);
    if s == 0.0 {
        return (0..SEQUENCE)
            .map(|_| rng.gen_range(0..keys as u64))
            .collect();
    }
    let mut cdf = Vec::with_capacity(keys);
    let mut total = 0.0;
    for rank in 1..=keys {
        total += 1.0 / (rank as f64).powf(s);
        cdf.push(total);
    }
    (0..SEQUENCE)
        .map(|_| {
            let u = rng.gen::<f64>() * total;
            cdf.partition_point(|&c| c < u).min(keys - 1) as u64
        })
        .collect()
}

/// What a read of a key that was not warm would produce; never called in a clean run.
fn cold() -> Value {
    Arc::new(String::new())
}

async fn phase(
    subject: Subject,
    holdfast: &Cache<u64, Value>,
    moka: &moka::future::Cache<u64, Value>,
    sequences: &Arc<Vec<Vec<u64>>>,
    duration: Duration,
) -> anyhow::Result<Phase> {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..sequences.len() {
        let (stop, sequences) = (Arc::clone(&stop), Arc::clone(sequences));
        let (holdfast, moka) = (holdfast.clone(), moka.clone());
        tasks.spawn(async move {
            let seq = &sequences[t];
            let (mut ops, mut misses, mut i) = (0u64, 0u64, 0usize);
            while !stop.load(Ordering::Relaxed) {
                // Check the clock rarely; yield so every task gets the workers.
                for _ in 0..256 {
                    let key = seq[i];
                    i = (i + 1) & (SEQUENCE - 1);
                    let hit = match subject {
                        // The origin / init values are only built if they run (never, when warm).
                        Subject::Holdfast => holdfast
                            .get_with(key, || async { Ok::<_, Infallible>(Some(cold())) })
                            .await
                            .ok()
                            .flatten(),
                        Subject::MokaGet => moka.get(&key).await,
                        Subject::MokaGetWith => Some(moka.get_with(key, async { cold() }).await),
                    };
                    match hit {
                        Some(v) => std::hint::black_box(v),
                        None => {
                            misses += 1;
                            continue;
                        }
                    };
                }
                ops += 256;
                tokio::task::yield_now().await;
            }
            (ops - misses, misses)
        });
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let (mut ops, mut misses) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let (o, m) = r?;
        ops += o;
        misses += m;
    }
    let secs = started.elapsed().as_secs_f64();
    ensure!(
        misses == 0,
        "{}: {misses} reads missed a warm key",
        subject.name()
    );
    Ok(Phase {
        ops,
        secs,
        ops_per_s: ops as f64 / secs,
    })
}
