//! `holdfast bench jobs`: the job queue's throughput and latency, on SQLite and on Postgres,
//! and — with `--peers` — side by side with other job queues on the same server.
//!
//! Two modes, for every system:
//!
//! - **burn-down**: insert `--jobs` no-op jobs in bulk, then start the workers and time them
//!   until every job's completion is committed: jobs/s.
//! - **steady state**: with the workers idle, a producer inserts one job at a time at a fixed
//!   `--rate` for `--steady`; each job carries its insert time (µs since the epoch, taken
//!   just before the insert) and the handler records `start - insert`: p50/p99 in ms.
//!
//! Holdfast runs in this process on the real runtime (`holdfast_jobs::Worker` over
//! `holdfast_store::Store`, each on a fresh database). The peers are our own small harnesses
//! in `benches/peers/` (graphile-worker on Node, apalis in Rust), installed from the package
//! registries by `benches/peers/install.sh`; each runs as a child process against its own
//! fresh database on the same Postgres server (or its own SQLite file) and prints one JSON
//! line in the shape of [`Figures`]. Long runs live here, never in the test suite.

use crate::cli::BenchJobsArgs;
use anyhow::{bail, ensure, Context};
use futures::FutureExt;
use hdrhistogram::Histogram;
use holdfast_core::Backend;
use holdfast_jobs::{Done, Handler, QueueConfig, Wakeup, Worker, WorkerOptions};
use holdfast_store::{JobInsert, JobRow, Store, StoreOptions};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

const QUEUE: &str = "bench";
const KIND: &str = "noop";
/// The targets from the issue: Holdfast ≥ 1.5× the best peer on Postgres, ≥ 5× apalis on SQLite.
const TARGET_POSTGRES: f64 = 1.5;
const TARGET_SQLITE: f64 = 5.0;

/// One system's figures on one backend: the JSON line every peer harness prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Figures {
    /// `holdfast`, `graphile-worker`, `apalis`.
    pub peer: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub backend: String,
    #[serde(default)]
    pub jobs: usize,
    pub burn_down_jobs_per_s: f64,
    pub latency_ms: Latency,
    /// How the system was tuned (free-form, printed as is).
    #[serde(default)]
    pub settings: serde_json::Value,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    /// The slowest job, to tell a stall from a slow tail.
    #[serde(default)]
    pub max: f64,
}

/// Holdfast over a peer, for one backend and one figure.
#[derive(Debug, Serialize)]
struct Ratio {
    backend: &'static str,
    peer: String,
    /// holdfast jobs/s ÷ peer jobs/s (higher is better for Holdfast).
    throughput: f64,
    /// peer p99 ÷ holdfast p99 (higher is better for Holdfast).
    p99_latency: f64,
}

pub async fn run(args: BenchJobsArgs) -> anyhow::Result<()> {
    ensure!(args.jobs > 0, "--jobs must be at least 1");
    ensure!(args.rate > 0, "--rate must be at least 1");
    let backends = args.db.backends();
    let admin_url = args
        .db
        .database_url
        .clone()
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .filter(|u| u.starts_with("postgres://") || u.starts_with("postgresql://"));
    if backends.contains(&Backend::Postgres) && admin_url.is_none() {
        bail!("postgres needs --database-url or a postgres:// DATABASE_URL");
    }
    let peers = if args.peers {
        Some(Peers::locate(args.peers_dir.as_deref())?)
    } else {
        None
    };

    // Every run measures each system once, in turn, so drift on a shared machine hits all of
    // them alike; the figures reported are the per-system medians over the runs.
    let repeat = args.repeat.max(1);
    let mut runs: Vec<Vec<Figures>> = Vec::new();
    for run in 1..=repeat {
        let mut i = 0;
        for &backend in &backends {
            eprintln!(
                "bench jobs: {} — holdfast ({} no-op jobs; steady state {}/s for {:?}; run {run} of {repeat})",
                backend.name(),
                args.jobs,
                args.rate,
                args.steady
            );
            let h = with_fresh_db(
                backend,
                admin_url.as_deref(),
                "holdfast_bench_jobs",
                |url| holdfast_figures(&args, backend, url),
            )
            .await?;
            eprintln!("  holdfast: {}", summary(&h));
            record(&mut runs, i, h);
            i += 1;
            if let Some(peers) = &peers {
                for peer in peers.for_backend(backend) {
                    eprintln!("bench jobs: {} — {}", backend.name(), peer.name());
                    let f = with_fresh_db(backend, admin_url.as_deref(), peer.db_prefix(), |url| {
                        let cmd = peers.command(peer, &url, &args);
                        async move { run_peer(cmd).await }
                    })
                    .await
                    .with_context(|| format!("peer {} on {}", peer.name(), backend.name()))?;
                    eprintln!("  {}: {}", peer.name(), summary(&f));
                    record(&mut runs, i, f);
                    i += 1;
                }
            }
        }
    }
    let results: Vec<Figures> = runs.iter().map(|r| median(r)).collect();

    let ratios = ratios(&results);
    print_table(&results, &ratios);
    if let Some(path) = &args.json {
        let doc = json!({
            "bench": "jobs",
            "jobs": args.jobs,
            "steady_state": { "rate_per_s": args.rate, "seconds": args.steady.as_secs_f64() },
            "repeat": repeat,
            "results": results,
            "runs": runs,
            "ratios": ratios,
            "targets": { "postgres_vs_best_peer": TARGET_POSTGRES, "sqlite_vs_apalis": TARGET_SQLITE },
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn record(runs: &mut Vec<Vec<Figures>>, i: usize, f: Figures) {
    if runs.len() <= i {
        runs.push(Vec::new());
    }
    runs[i].push(f);
}

/// One system's runs folded into one: the median of each figure (the upper one of an even
/// count), with the first run's settings.
fn median(runs: &[Figures]) -> Figures {
    let pick = |key: fn(&Figures) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(key).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Figures {
        burn_down_jobs_per_s: pick(|f| f.burn_down_jobs_per_s),
        latency_ms: Latency {
            p50: pick(|f| f.latency_ms.p50),
            p99: pick(|f| f.latency_ms.p99),
            max: pick(|f| f.latency_ms.max),
        },
        ..runs[0].clone()
    }
}

fn summary(f: &Figures) -> String {
    format!(
        "{:.0} jobs/s burn-down, latency p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
        f.burn_down_jobs_per_s, f.latency_ms.p50, f.latency_ms.p99, f.latency_ms.max
    )
}

/// Runs `body` on a brand-new database of `backend` (a temp SQLite file, or a fresh Postgres
/// database on the admin URL's server, dropped afterwards either way).
async fn with_fresh_db<F, Fut, T>(
    backend: Backend,
    admin_url: Option<&str>,
    prefix: &str,
    body: F,
) -> anyhow::Result<T>
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir()?;
            let url = format!("sqlite:{}", dir.path().join("jobs.sqlite").display());
            body(url).await
        }
        Backend::Postgres => {
            let admin = admin_url.context("postgres needs --database-url")?;
            let url = holdfast_store::testing::create_database(admin, prefix).await?;
            let out = body(url.clone()).await;
            let name = db_name(&url);
            if let Err(e) = holdfast_store::testing::drop_database(admin, name).await {
                eprintln!("  (could not drop {name}: {e})");
            }
            out
        }
    }
}

fn db_name(url: &str) -> &str {
    url.rsplit('/')
        .next()
        .unwrap_or_default()
        .split('?')
        .next()
        .unwrap_or_default()
}

// ---- Holdfast -----------------------------------------------------------------------------

fn now_us() -> i64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// The insert time a steady-state job carries: `{"t":<µs since the epoch>}`.
fn insert_time(args: &str) -> Option<i64> {
    let v: serde_json::Value = serde_json::from_str(args).ok()?;
    v.get("t")?.as_i64()
}

fn worker_options(args: &BenchJobsArgs, wakeup: Wakeup) -> WorkerOptions {
    WorkerOptions {
        queues: vec![QueueConfig {
            name: QUEUE.into(),
            concurrency: args.concurrency.max(1),
        }],
        fetch_batch: args.fetch_batch.max(1),
        complete_batch: args.complete_batch.max(1),
        wakeup,
        ..WorkerOptions::default()
    }
}

/// `--workers` runtimes on one store, working until `stop` flips; joined by the returned task.
fn start_workers(
    args: &BenchJobsArgs,
    store: &Store,
    wakeup: &Wakeup,
    handler: Handler,
    stop: &watch::Receiver<bool>,
) -> tokio::task::JoinSet<Result<(), holdfast_store::Error>> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..args.workers.max(1) {
        let worker = Worker::new(store.clone(), worker_options(args, wakeup.clone()))
            .handle(KIND, handler.clone());
        let mut stop = stop.clone();
        set.spawn(worker.run(async move {
            let _ = stop.wait_for(|s| *s).await;
        }));
    }
    set
}

/// Tells the workers to drain and waits for every one to return (its completions written).
async fn stop_workers(
    stop: &watch::Sender<bool>,
    workers: &mut tokio::task::JoinSet<Result<(), holdfast_store::Error>>,
) -> anyhow::Result<()> {
    let _ = stop.send(true);
    while let Some(r) = workers.join_next().await {
        r??;
    }
    Ok(())
}

async fn holdfast_figures(
    args: &BenchJobsArgs,
    backend: Backend,
    url: String,
) -> anyhow::Result<Figures> {
    let mut opts = StoreOptions::new(url.clone());
    opts.max_connections = args.pool_size.max(2);
    opts.acquire_timeout = Duration::from_secs(30);
    let store = Store::open(&opts).await.context("opening the store")?;
    let wakeup = match backend {
        Backend::Postgres => Wakeup::Postgres(url.clone()),
        Backend::Sqlite => Wakeup::SqliteFile(url.trim_start_matches("sqlite:").into()),
    };
    let burn = holdfast_burn_down(args, &store, &wakeup).await?;
    let latency = holdfast_steady_state(args, &store, &wakeup).await?;
    store.close().await;
    Ok(Figures {
        peer: "holdfast".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        backend: backend.name().into(),
        jobs: args.jobs,
        burn_down_jobs_per_s: burn,
        latency_ms: latency,
        settings: json!({
            "workers": args.workers,
            "concurrency": args.concurrency,
            "fetch_batch": args.fetch_batch,
            "complete_batch": args.complete_batch,
            "pool_size": args.pool_size,
            "wakeup": match backend { Backend::Postgres => "LISTEN/NOTIFY", Backend::Sqlite => "inotify on the WAL" },
            "durability": match backend { Backend::Postgres => "synchronous_commit as the server has it", Backend::Sqlite => "WAL, synchronous=FULL" },
        }),
    })
}

/// Inserts the jobs, then times the workers until every completion is committed.
async fn holdfast_burn_down(
    args: &BenchJobsArgs,
    store: &Store,
    wakeup: &Wakeup,
) -> anyhow::Result<f64> {
    let n = args.jobs;
    let t = Instant::now();
    let batch: Vec<JobInsert> = (0..1000.min(n))
        .map(|_| JobInsert::new(QUEUE, KIND, "{}".into()))
        .collect();
    let mut left = n;
    while left > 0 {
        let k = left.min(batch.len());
        store.job_enqueue_many(&batch[..k]).await?;
        left -= k;
    }
    eprintln!(
        "  holdfast: inserted {n} jobs in {:.2} s ({:.0}/s)",
        t.elapsed().as_secs_f64(),
        n as f64 / t.elapsed().as_secs_f64()
    );

    let handled = Arc::new(AtomicUsize::new(0));
    let all_handled = Arc::new(Notify::new());
    let handler: Handler = {
        let (handled, all_handled) = (handled.clone(), all_handled.clone());
        Arc::new(move |_job: JobRow| {
            if handled.fetch_add(1, Ordering::Relaxed) + 1 == n {
                all_handled.notify_one();
            }
            futures::future::ready(Ok(Done::Complete)).boxed()
        })
    };
    let (stop_tx, stop) = watch::channel(false);
    let started = Instant::now();
    let mut workers = start_workers(args, store, wakeup, handler, &stop);
    let deadline = Duration::from_secs(600);
    if tokio::time::timeout(deadline, all_handled.notified())
        .await
        .is_err()
    {
        bail!(
            "burn-down: only {} of {n} jobs ran within {deadline:?}",
            handled.load(Ordering::Relaxed)
        );
    }
    // Draining waits for the completer: when the workers return, every completion is written.
    stop_workers(&stop_tx, &mut workers).await?;
    let secs = started.elapsed().as_secs_f64();
    let completed: i64 = store
        .job_counts()
        .await?
        .iter()
        .filter(|c| c.queue == QUEUE && c.state == "completed")
        .map(|c| c.count)
        .sum();
    ensure!(
        completed as usize == n,
        "burn-down: {completed} of {n} jobs completed (ran {})",
        handled.load(Ordering::Relaxed)
    );
    Ok(n as f64 / secs)
}

/// A producer inserts one job at a time at `--rate` while the workers idle between jobs.
async fn holdfast_steady_state(
    args: &BenchJobsArgs,
    store: &Store,
    wakeup: &Wakeup,
) -> anyhow::Result<Latency> {
    let total = steady_jobs(args);
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new(3).expect("histogram")));
    let handled = Arc::new(AtomicUsize::new(0));
    let all_handled = Arc::new(Notify::new());
    let handler: Handler = {
        let (hist, handled, all_handled) = (hist.clone(), handled.clone(), all_handled.clone());
        Arc::new(move |job: JobRow| {
            let started = now_us();
            if let Some(t) = insert_time(&job.args) {
                let _ = hist
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .record((started - t).max(0) as u64);
            }
            if handled.fetch_add(1, Ordering::Relaxed) + 1 == total {
                all_handled.notify_one();
            }
            futures::future::ready(Ok(Done::Complete)).boxed()
        })
    };
    let (stop_tx, stop) = watch::channel(false);
    let mut workers = start_workers(args, store, wakeup, handler, &stop);
    // Let the workers find the queue empty and go idle (and LISTEN) before the first job.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = all_handled.notified();
    tokio::pin!(all);
    let period = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    for _ in 0..total {
        tick.tick().await;
        let job = JobInsert::new(QUEUE, KIND, format!("{{\"t\":{}}}", now_us()));
        store.job_enqueue(&job).await?;
    }
    let produced_in = started.elapsed();
    let deadline = Duration::from_secs(60);
    if tokio::time::timeout(deadline, all).await.is_err() {
        bail!(
            "steady state: only {} of {total} jobs ran within {deadline:?} of the last insert",
            handled.load(Ordering::Relaxed)
        );
    }
    stop_workers(&stop_tx, &mut workers).await?;
    let achieved = total as f64 / produced_in.as_secs_f64();
    if achieved < 0.9 * f64::from(args.rate) {
        eprintln!(
            "  holdfast: the producer only reached {achieved:.0}/s of {}/s",
            args.rate
        );
    }
    let hist = hist
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Ok(Latency {
        p50: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99: hist.value_at_quantile(0.99) as f64 / 1000.0,
        max: hist.max() as f64 / 1000.0,
    })
}

fn steady_jobs(args: &BenchJobsArgs) -> usize {
    ((f64::from(args.rate) * args.steady.as_secs_f64()).round() as usize).max(1)
}

// ---- peers --------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    Graphile,
    ApalisPostgres,
    ApalisSqlite,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Graphile => "graphile-worker",
            Peer::ApalisPostgres => "apalis (postgres)",
            Peer::ApalisSqlite => "apalis (sqlite)",
        }
    }
    fn db_prefix(self) -> &'static str {
        match self {
            Peer::Graphile => "peer_graphile",
            Peer::ApalisPostgres | Peer::ApalisSqlite => "peer_apalis",
        }
    }
}

/// The installed peer harnesses under `benches/peers`.
struct Peers {
    dir: PathBuf,
}

impl Peers {
    /// Finds `benches/peers`, and runs its install script when something is missing.
    fn locate(explicit: Option<&Path>) -> anyhow::Result<Self> {
        let dir = match explicit {
            Some(d) => d.to_owned(),
            None => find_peers_dir().context(
                "cannot find benches/peers (run from the repository, or pass --peers-dir)",
            )?,
        };
        ensure!(
            dir.join("install.sh").is_file(),
            "{} has no install.sh",
            dir.display()
        );
        let peers = Self { dir };
        if !peers.installed() {
            eprintln!(
                "bench jobs: peers not installed; running {}",
                peers.dir.join("install.sh").display()
            );
            let status = Command::new("bash")
                .arg(peers.dir.join("install.sh"))
                .stdout(Stdio::inherit())
                .stderr(Stdio::inherit())
                .status()
                .context("running install.sh")?;
            ensure!(
                status.success() && peers.installed(),
                "installing the peers failed; run `bash {}` and fix what it reports",
                peers.dir.join("install.sh").display()
            );
        }
        Ok(peers)
    }

    fn apalis_bin(&self) -> PathBuf {
        self.dir.join("apalis-bench/target/release/apalis-bench")
    }

    fn installed(&self) -> bool {
        self.dir
            .join("node/node_modules/graphile-worker/package.json")
            .is_file()
            && self.apalis_bin().is_file()
    }

    fn for_backend(&self, backend: Backend) -> Vec<Peer> {
        match backend {
            Backend::Postgres => vec![Peer::Graphile, Peer::ApalisPostgres],
            Backend::Sqlite => vec![Peer::ApalisSqlite],
        }
    }

    fn command(&self, peer: Peer, url: &str, args: &BenchJobsArgs) -> Command {
        let mut cmd = match peer {
            Peer::Graphile => {
                let mut c = Command::new("node");
                c.arg(self.dir.join("graphile/bench.js"));
                c
            }
            Peer::ApalisPostgres | Peer::ApalisSqlite => {
                let mut c = Command::new(self.apalis_bin());
                c.args([
                    "--backend",
                    if peer == Peer::ApalisSqlite {
                        "sqlite"
                    } else {
                        "postgres"
                    },
                ]);
                c
            }
        };
        cmd.args(["--url", url])
            .args(["--jobs", &args.jobs.to_string()])
            .args(["--rate", &args.rate.to_string()])
            .args(["--seconds", &format!("{}", args.steady.as_secs_f64())]);
        let extra = match peer {
            Peer::Graphile => &args.graphile_args,
            Peer::ApalisPostgres | Peer::ApalisSqlite => &args.apalis_args,
        };
        cmd.args(extra.iter().flat_map(|a| a.split_whitespace()));
        cmd
    }
}

fn find_peers_dir() -> Option<PathBuf> {
    let mut starts = vec![];
    if let Ok(d) = std::env::current_dir() {
        starts.push(d);
    }
    if let Some(d) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_owned))
    {
        starts.push(d);
    }
    starts.into_iter().find_map(|start| {
        start
            .ancestors()
            .map(|a| a.join("benches/peers"))
            .find(|p| p.join("install.sh").is_file())
    })
}

/// Runs one peer harness to the end; its last stdout line is its [`Figures`].
async fn run_peer(mut cmd: Command) -> anyhow::Result<Figures> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await?
        .context("starting the peer (is it installed? see benches/peers/install.sh)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "the peer exited with {}; stdout: {stdout}",
        out.status
    );
    parse_figures(&stdout)
}

/// The last line of `stdout` that parses as [`Figures`].
fn parse_figures(stdout: &str) -> anyhow::Result<Figures> {
    stdout
        .lines()
        .rev()
        .map(str::trim)
        .filter(|l| l.starts_with('{'))
        .find_map(|l| serde_json::from_str::<Figures>(l).ok())
        .with_context(|| format!("no figures line in the peer's output: {stdout:?}"))
}

// ---- report -------------------------------------------------------------------------------

fn ratios(results: &[Figures]) -> Vec<Ratio> {
    let mut out = Vec::new();
    for h in results.iter().filter(|f| f.peer == "holdfast") {
        let backend = if h.backend == "postgres" {
            "postgres"
        } else {
            "sqlite"
        };
        for p in results
            .iter()
            .filter(|f| f.peer != "holdfast" && f.backend == h.backend)
        {
            out.push(Ratio {
                backend,
                peer: p.peer.clone(),
                throughput: div(h.burn_down_jobs_per_s, p.burn_down_jobs_per_s),
                p99_latency: div(p.latency_ms.p99, h.latency_ms.p99),
            });
        }
    }
    out
}

fn div(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::INFINITY
    }
}

fn print_table(results: &[Figures], ratios: &[Ratio]) {
    println!(
        "\n{:<9} {:<18} {:>8} {:>12} {:>8} {:>8} {:>9} {:>11}",
        "backend", "system", "version", "burn-down/s", "p50 ms", "p99 ms", "max ms", "holdfast ÷"
    );
    for f in results {
        let ratio = ratios
            .iter()
            .find(|r| r.backend == f.backend && r.peer == f.peer)
            .map(|r| format!("{:.2}×", r.throughput))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<9} {:<18} {:>8} {:>12.0} {:>8.2} {:>8.2} {:>9.2} {:>11}",
            f.backend,
            f.peer,
            f.version,
            f.burn_down_jobs_per_s,
            f.latency_ms.p50,
            f.latency_ms.p99,
            f.latency_ms.max,
            ratio
        );
    }
    println!();
    for f in results {
        println!("settings {}/{}: {}", f.backend, f.peer, f.settings);
    }
    // The targets, checked against what was measured.
    let best = |backend: &str| {
        ratios
            .iter()
            .filter(|r| r.backend == backend)
            .min_by(|a, b| a.throughput.total_cmp(&b.throughput))
    };
    if let Some(r) = best("postgres") {
        println!(
            "target postgres: holdfast ≥ {TARGET_POSTGRES}× the best peer ({}): {:.2}× — {}",
            r.peer,
            r.throughput,
            if r.throughput >= TARGET_POSTGRES {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    if let Some(r) = ratios.iter().find(|r| r.backend == "sqlite") {
        println!(
            "target sqlite: holdfast ≥ {TARGET_SQLITE}× apalis: {:.2}× — {}",
            r.throughput,
            if r.throughput >= TARGET_SQLITE {
                "met"
            } else {
                "NOT met"
            }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_last_figures_line() {
        let out = "noise\n{\"not\":\"figures\"}\n{\"peer\":\"graphile-worker\",\"version\":\"0.17.3\",\"burn_down_jobs_per_s\":1234.5,\"latency_ms\":{\"p50\":1.5,\"p99\":9.0}}\n";
        let f = parse_figures(out).unwrap();
        assert_eq!(f.peer, "graphile-worker");
        assert_eq!(f.version, "0.17.3");
        assert!((f.burn_down_jobs_per_s - 1234.5).abs() < 1e-9);
        assert!((f.latency_ms.p99 - 9.0).abs() < 1e-9);
        assert!(parse_figures("nothing here").is_err());
    }

    #[test]
    fn medians_per_figure() {
        let f = |b: f64, p50: f64, p99: f64| Figures {
            peer: "x".into(),
            version: String::new(),
            backend: "sqlite".into(),
            jobs: 1,
            burn_down_jobs_per_s: b,
            latency_ms: Latency { p50, p99, max: p99 },
            settings: serde_json::Value::Null,
        };
        let m = median(&[f(3.0, 1.0, 9.0), f(1.0, 3.0, 7.0), f(2.0, 2.0, 8.0)]);
        assert_eq!(m.burn_down_jobs_per_s, 2.0);
        assert_eq!((m.latency_ms.p50, m.latency_ms.p99), (2.0, 8.0));
        assert_eq!(median(&[f(5.0, 1.0, 1.0)]).burn_down_jobs_per_s, 5.0);
    }

    #[test]
    fn reads_the_insert_time() {
        assert_eq!(
            insert_time("{\"t\":1700000000000001}"),
            Some(1_700_000_000_000_001)
        );
        assert_eq!(insert_time("{}"), None);
        assert_eq!(insert_time("nope"), None);
    }
}
