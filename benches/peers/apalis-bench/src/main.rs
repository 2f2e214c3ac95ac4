//! Holdfast's harness for measuring apalis (crates.io) side by side with `holdfast bench jobs`.
//!
//! Same two modes as Holdfast's own bench, on apalis' Postgres or SQLite storage:
//!
//! - burn-down: insert `--jobs` no-op jobs in bulk, start the workers, time them until the
//!   last completion is written (apalis writes completions from the worker's event batch;
//!   the workers are stopped once every job ran, which flushes what is left, and the
//!   `Done` rows are counted to check);
//! - steady state: with the workers idle, insert one job at a time at `--rate` for
//!   `--seconds`; each job carries its insert time (µs since the epoch, taken just before the
//!   insert) and the handler records `start - insert`.
//!
//! Prints one JSON line on stdout:
//! `{"peer":"apalis","version":..,"backend":..,"burn_down_jobs_per_s":..,"latency_ms":{"p50":..,"p99":..},"settings":{..}}`.

use apalis::prelude::*;
use apalis_postgres::PostgresStorage;
use apalis_sqlite::SqliteStorage;
use futures::channel::mpsc::{unbounded, UnboundedSender};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqliteOperation, SqlitePoolOptions, SqliteSynchronous,
};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

/// The crates this harness is pinned to (Cargo.toml uses `=` requirements).
const APALIS_VERSION: &str = "1.0.0";
const QUEUE: &str = "bench";

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    /// Insert time in µs since the epoch; 0 for burn-down jobs.
    t: i64,
}

#[derive(Debug, Clone)]
struct Opts {
    backend: String,
    url: String,
    jobs: usize,
    rate: u32,
    seconds: f64,
    /// Worker instances in this process, sharing one pool.
    workers: usize,
    /// Tasks one worker runs at once (tower concurrency limit).
    concurrency: usize,
    /// Tasks one fetch takes (`Config::batch_size`).
    batch_size: usize,
    /// `Config::lock_tasks`: an extra `Running` update per task before it runs.
    lock_tasks: bool,
    pool_size: u32,
    /// Fallback poll while idle, besides the insert notifications (ms; 0: none).
    poll_ms: u64,
    /// `Config::heartbeat_interval` (ms). Besides liveness, a heartbeat is what rouses a
    /// worker that missed a wake-up, so it bounds the stalls described in the README.
    heartbeat_ms: u64,
    /// SQLite only: `off`, `normal` or `full` (Holdfast runs FULL).
    sqlite_synchronous: String,
}

impl Opts {
    fn parse() -> Result<Self, Error> {
        let mut o = Opts {
            backend: "postgres".into(),
            url: String::new(),
            jobs: 20_000,
            rate: 200,
            seconds: 5.0,
            workers: 0,
            concurrency: 0,
            batch_size: 0,
            lock_tasks: false,
            pool_size: 0,
            poll_ms: 50,
            heartbeat_ms: 1000,
            sqlite_synchronous: "full".into(),
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--backend" => o.backend = val()?,
                "--url" => o.url = val()?,
                "--jobs" => o.jobs = val()?.parse()?,
                "--rate" => o.rate = val()?.parse()?,
                "--seconds" => o.seconds = val()?.parse()?,
                "--workers" => o.workers = val()?.parse()?,
                "--concurrency" => o.concurrency = val()?.parse()?,
                "--batch-size" => o.batch_size = val()?.parse()?,
                "--lock-tasks" => o.lock_tasks = val()?.parse()?,
                "--pool-size" => o.pool_size = val()?.parse()?,
                "--poll-ms" => o.poll_ms = val()?.parse()?,
                "--heartbeat-ms" => o.heartbeat_ms = val()?.parse()?,
                "--sqlite-synchronous" => o.sqlite_synchronous = val()?,
                other => return Err(format!("unknown flag {other}").into()),
            }
        }
        if o.url.is_empty() {
            return Err("--url is required".into());
        }
        // Tuned defaults per backend (the sweeps are in benches/peers/README.md). On SQLite
        // more than one worker fails: apalis' deferred transactions upgrade to writes and
        // collide with SQLITE_BUSY ("database is locked") that no busy timeout resolves.
        let sqlite = o.backend == "sqlite";
        let pick = |v: usize, pg: usize, sq: usize| {
            if v > 0 {
                v
            } else if sqlite {
                sq
            } else {
                pg
            }
        };
        o.workers = pick(o.workers, 4, 1);
        o.concurrency = pick(o.concurrency, 2048, 256);
        o.batch_size = pick(o.batch_size, 1000, 100);
        if o.pool_size == 0 {
            o.pool_size = if sqlite { 4 } else { 10 };
        }
        Ok(o)
    }
}

// ---- what the handler sees ----------------------------------------------------------------

struct Tally {
    handled: AtomicUsize,
    target: AtomicUsize,
    all: Notify,
    latencies_us: Mutex<Vec<u64>>,
}

fn tally() -> &'static Tally {
    static T: OnceLock<Tally> = OnceLock::new();
    T.get_or_init(|| Tally {
        handled: AtomicUsize::new(0),
        target: AtomicUsize::new(usize::MAX),
        all: Notify::new(),
        latencies_us: Mutex::new(Vec::new()),
    })
}

fn reset_tally(target: usize) {
    let t = tally();
    t.handled.store(0, Ordering::SeqCst);
    t.target.store(target, Ordering::SeqCst);
    t.latencies_us.lock().unwrap().clear();
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

async fn noop(job: Job) -> Result<(), BoxDynError> {
    let started = now_us();
    let t = tally();
    if job.t > 0 {
        t.latencies_us
            .lock()
            .unwrap()
            .push((started - job.t).max(0) as u64);
    }
    if t.handled.fetch_add(1, Ordering::SeqCst) + 1 == t.target.load(Ordering::SeqCst) {
        t.all.notify_one();
    }
    Ok(())
}

fn quantile_ms(sorted_us: &[u64], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let i = ((q * sorted_us.len() as f64).ceil() as usize).clamp(1, sorted_us.len()) - 1;
    sorted_us[i] as f64 / 1000.0
}

async fn wait_all(what: &str, deadline: Duration) -> Result<(), Error> {
    let t = tally();
    let all = t.all.notified();
    if t.handled.load(Ordering::SeqCst) >= t.target.load(Ordering::SeqCst) {
        return Ok(());
    }
    tokio::time::timeout(deadline, all).await.map_err(|_| {
        format!(
            "{what}: only {} of {} jobs ran within {deadline:?}",
            t.handled.load(Ordering::SeqCst),
            t.target.load(Ordering::SeqCst)
        )
    })?;
    Ok(())
}

async fn join(mut set: JoinSet<Result<(), WorkerError>>) -> Result<(), Error> {
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

/// Adds a fallback poll every `ms` (0: notifications only).
fn with_poll(strategy: Strategy, ms: u64) -> Strategy {
    if ms == 0 {
        strategy
    } else {
        strategy.interval(Duration::from_millis(ms))
    }
}

// ---- the two storages ---------------------------------------------------------------------

/// Starts `o.workers` workers on backends made by `make(k)`, each stopping when `stop` flips.
macro_rules! spawn_workers {
    ($o:expr, $phase:expr, $stop:expr, $make:expr) => {{
        let mut set = JoinSet::new();
        for k in 0..$o.workers {
            let backend = $make(k);
            let worker = WorkerBuilder::new(format!("apalis-bench-{}-{k}", $phase))
                .backend(backend)
                .concurrency($o.concurrency)
                .build(noop);
            let stop = $stop.clone();
            set.spawn(worker.run_with_ctx(move |ctx| {
                let mut stop = stop.clone();
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                    ctx.stop()
                }
            }));
        }
        set
    }};
}

async fn postgres(o: &Opts) -> Result<(f64, (f64, f64, f64), serde_json::Value), Error> {
    let pool = PgPoolOptions::new()
        .max_connections(o.pool_size)
        .connect(&o.url)
        .await?;
    PostgresStorage::setup(&pool).await?;
    let config = apalis_postgres::Config::default()
        .queue(QUEUE)
        .batch_size(o.batch_size)
        .heartbeat_interval(Duration::from_millis(o.heartbeat_ms))
        .lock_tasks(o.lock_tasks);
    let mut storage = PostgresStorage::<Job>::new(&pool).with_config(config);
    let backend = |storage: &PostgresStorage<Job>| {
        // LISTEN for inserts (apalis' trigger NOTIFYs on insert), plus a short fallback poll.
        let listen = apalis_postgres::Pubsub::new(pool.clone(), QUEUE.to_owned());
        storage
            .clone()
            .poll_with_strategy(with_poll(Strategy::new().stream(listen), o.poll_ms))
    };

    // Burn-down.
    let t = Instant::now();
    let mut left = o.jobs;
    while left > 0 {
        let k = left.min(1000);
        storage.push_bulk(vec![Job { t: 0 }; k]).await?;
        left -= k;
    }
    eprintln!(
        "  apalis: inserted {} jobs in {:.2} s",
        o.jobs,
        t.elapsed().as_secs_f64()
    );
    reset_tally(o.jobs);
    let (stop_tx, stop) = watch::channel(false);
    let started = Instant::now();
    let set = spawn_workers!(o, "burn", stop, |_k| backend(&storage));
    wait_all("burn-down", Duration::from_secs(600)).await?;
    stop_tx.send(true)?;
    join(set).await?;
    let burn = o.jobs as f64 / started.elapsed().as_secs_f64();
    let done: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM apalis.jobs WHERE job_type = $1 AND status = 'Done'",
    )
    .bind(QUEUE)
    .fetch_one(&pool)
    .await?;
    if done as usize != o.jobs {
        return Err(format!("burn-down: {done} of {} jobs are Done", o.jobs).into());
    }

    // Steady state.
    let lat = steady(
        o,
        |job| {
            let mut s = storage.clone();
            async move {
                s.push(job)
                    .await
                    .map_err(|e| -> Error { format!("{e:?}").into() })
            }
        },
        |stop| spawn_workers!(o, "steady", stop, |_k| backend(&storage)),
    )
    .await?;
    pool.close().await;
    Ok((
        burn,
        lat,
        json!({ "wakeup": "LISTEN (apalis insert trigger) + poll", "persist_results": true }),
    ))
}

async fn sqlite(o: &Opts) -> Result<(f64, (f64, f64, f64), serde_json::Value), Error> {
    // Insert notifications, in process: an update hook on every pooled connection fans out
    // to one channel per worker (what apalis-sqlite's own hook listener does for one).
    let subscribers: Arc<Mutex<Vec<UnboundedSender<()>>>> = Arc::default();
    let synchronous = match o.sqlite_synchronous.as_str() {
        "off" => SqliteSynchronous::Off,
        "normal" => SqliteSynchronous::Normal,
        _ => SqliteSynchronous::Full,
    };
    let connect = SqliteConnectOptions::from_str(&o.url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(synchronous)
        .busy_timeout(Duration::from_secs(5));
    let subs = subscribers.clone();
    let pool = SqlitePoolOptions::new()
        .max_connections(o.pool_size)
        .after_connect(move |conn, _| {
            let subs = subs.clone();
            Box::pin(async move {
                let mut handle = conn.lock_handle().await?;
                handle.set_update_hook(move |ev| {
                    if ev.operation == SqliteOperation::Insert && ev.table == "Jobs" {
                        subs.lock()
                            .unwrap()
                            .retain(|tx| tx.unbounded_send(()).is_ok());
                    }
                });
                Ok(())
            })
        })
        .connect_with(connect)
        .await?;
    // `SqliteStorage::setup` would also set `synchronous = OFF`, but only on whichever pooled
    // connection runs it; run the migrations alone and keep one durability for all.
    SqliteStorage::migrations().run(&pool).await?;
    let config = apalis_sqlite::Config::default()
        .queue(QUEUE)
        .batch_size(o.batch_size)
        .heartbeat_interval(Duration::from_millis(o.heartbeat_ms))
        .lock_tasks(o.lock_tasks);
    let mut storage = SqliteStorage::<Job>::new(&pool).with_config(config);
    let backend = |storage: &SqliteStorage<Job>| {
        let (tx, rx) = unbounded::<()>();
        subscribers.lock().unwrap().push(tx);
        storage
            .clone()
            .poll_with_strategy(with_poll(Strategy::new().stream(rx), o.poll_ms))
    };

    let t = Instant::now();
    let mut left = o.jobs;
    while left > 0 {
        let k = left.min(1000);
        storage.push_bulk(vec![Job { t: 0 }; k]).await?;
        left -= k;
    }
    eprintln!(
        "  apalis: inserted {} jobs in {:.2} s",
        o.jobs,
        t.elapsed().as_secs_f64()
    );
    reset_tally(o.jobs);
    let (stop_tx, stop) = watch::channel(false);
    let started = Instant::now();
    let set = spawn_workers!(o, "burn", stop, |_k| backend(&storage));
    wait_all("burn-down", Duration::from_secs(600)).await?;
    stop_tx.send(true)?;
    join(set).await?;
    let burn = o.jobs as f64 / started.elapsed().as_secs_f64();
    let done: i64 =
        sqlx::query_scalar("SELECT count(*) FROM Jobs WHERE job_type = ?1 AND status = 'Done'")
            .bind(QUEUE)
            .fetch_one(&pool)
            .await?;
    if done as usize != o.jobs {
        return Err(format!("burn-down: {done} of {} jobs are Done", o.jobs).into());
    }

    let lat = steady(
        o,
        |job| {
            let mut s = storage.clone();
            async move {
                s.push(job)
                    .await
                    .map_err(|e| -> Error { format!("{e:?}").into() })
            }
        },
        |stop| spawn_workers!(o, "steady", stop, |_k| backend(&storage)),
    )
    .await?;
    let sync_now: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(&pool)
        .await?;
    pool.close().await;
    Ok((
        burn,
        lat,
        json!({
            "wakeup": "SQLite update hook (in process) + poll",
            "persist_results": true,
            "durability": format!("WAL, synchronous={} (PRAGMA reads {sync_now})", o.sqlite_synchronous),
        }),
    ))
}

/// Workers idle; one insert at a time at `o.rate`; returns (p50, p99, max) insert→start in ms.
async fn steady<P, PF, S>(o: &Opts, push: P, start: S) -> Result<(f64, f64, f64), Error>
where
    P: Fn(Job) -> PF,
    PF: std::future::Future<Output = Result<(), Error>>,
    S: FnOnce(watch::Receiver<bool>) -> JoinSet<Result<(), WorkerError>>,
{
    let total = ((f64::from(o.rate) * o.seconds).round() as usize).max(1);
    reset_tally(total);
    let (stop_tx, stop) = watch::channel(false);
    let set = start(stop);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(o.rate)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let t = Instant::now();
    for _ in 0..total {
        tick.tick().await;
        push(Job { t: now_us() }).await?;
    }
    let achieved = total as f64 / t.elapsed().as_secs_f64();
    if achieved < 0.9 * f64::from(o.rate) {
        eprintln!(
            "  apalis: the producer only reached {achieved:.0}/s of {}/s",
            o.rate
        );
    }
    wait_all("steady state", Duration::from_secs(60)).await?;
    stop_tx.send(true)?;
    join(set).await?;
    let mut l = tally().latencies_us.lock().unwrap().clone();
    l.sort_unstable();
    Ok((
        quantile_ms(&l, 0.5),
        quantile_ms(&l, 0.99),
        quantile_ms(&l, 1.0),
    ))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let o = Opts::parse()?;
    let (burn, (p50, p99, max), extra) = match o.backend.as_str() {
        "postgres" => postgres(&o).await?,
        "sqlite" => sqlite(&o).await?,
        other => return Err(format!("--backend must be postgres or sqlite, not {other}").into()),
    };
    let mut settings = json!({
        "workers": o.workers,
        "concurrency": o.concurrency,
        "batch_size": o.batch_size,
        "lock_tasks": o.lock_tasks,
        "pool_size": o.pool_size,
        "poll_ms": o.poll_ms,
        "heartbeat_ms": o.heartbeat_ms,
    });
    if let (Some(s), Some(e)) = (settings.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    println!(
        "{}",
        json!({
            "peer": "apalis",
            "version": APALIS_VERSION,
            "backend": o.backend,
            "jobs": o.jobs,
            "burn_down_jobs_per_s": burn,
            "latency_ms": { "p50": p50, "p99": p99, "max": max },
            "settings": settings,
        })
    );
    Ok(())
}
