//! `holdfast bench checkout`: checkout throughput through the balancer, on SQLite and on
//! Postgres, and what the idempotency layer costs.
//!
//! It starts a real system (`holdfast up --bench-routes`, the `holdfast` built beside this
//! binary, or `--program`) per backend,
//! signs up `--users` shoppers, and has each run a closed loop for `--duration`: add an item,
//! check out. Two phases per backend, same system, same users: `/api/checkout` with a fresh
//! `Idempotency-Key` each time, and `/bench/checkout`, the same handler without the layer.
//! The ratio of the two is the layer's overhead. With `--baseline PATH`, an earlier build is
//! measured the same way in the same run, backend by backend, so the two builds can be
//! compared without the machine's weather in between. Long runs live here, never in the test
//! suite.

use crate::cli::BenchArgs;
use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use holdfast_core::Backend;
use holdfast_store::{Store, StoreOptions};
use serde::Serialize;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Serialize)]
pub(crate) struct Phase {
    pub checkouts: u64,
    pub checkouts_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
}

#[derive(Debug, Serialize)]
struct BackendResult {
    backend: &'static str,
    /// Which executable: `program` or `baseline`.
    build: &'static str,
    round: usize,
    program: PathBuf,
    instances: u16,
    users: usize,
    with_idempotency: Phase,
    without_idempotency: Phase,
    /// with / without: 1.0 means the layer is free.
    throughput_ratio: f64,
    /// Whether the workers kept up with each phase's checkouts.
    jobs_with_key: JobsKeptUp,
    jobs_without_key: JobsKeptUp,
    /// With `--peers`: the same work by the peers, in the same run.
    #[serde(skip_serializing_if = "Option::is_none")]
    peers: Option<Peers>,
}

/// The background work a phase left: each checkout enqueues a payout job, and each payout a
/// receipt job, so workers that keep up complete 2 jobs per checkout. Fewer means checkouts
/// were measured while part of their work waited: a backlog that grows is not a throughput.
#[derive(Debug, Serialize)]
struct JobsKeptUp {
    completed_per_checkout: f64,
    /// Available or running when the phase ended.
    waiting_at_end: i64,
}

impl JobsKeptUp {
    async fn during(
        store: &Store,
        phase: impl std::future::Future<Output = Phase>,
    ) -> anyhow::Result<(Phase, Self)> {
        let (done_before, _) = job_tally(store).await?;
        let phase = phase.await;
        let (done_after, waiting_at_end) = job_tally(store).await?;
        let completed_per_checkout = match phase.checkouts {
            0 => 0.0,
            n => (done_after - done_before) as f64 / n as f64,
        };
        Ok((
            phase,
            Self {
                completed_per_checkout,
                waiting_at_end,
            },
        ))
    }
}

/// The jobs of `store`: how many are completed, and how many wait or run.
async fn job_tally(store: &Store) -> anyhow::Result<(i64, i64)> {
    let counts = store.job_counts().await?;
    let of = |states: &[&str]| {
        counts
            .iter()
            .filter(|c| states.contains(&c.state.as_str()))
            .map(|c| c.count)
            .sum::<i64>()
    };
    Ok((of(&["completed"]), of(&["available", "running"])))
}

/// What `--peers` measures beside the system (see the module docs).
#[derive(Debug, Serialize)]
struct Peers {
    /// The shop's checkout SQL in a minimal axum handler (`bare.rs`), same shoppers' loop.
    bare: Phase,
    /// `pgbench` TPC-B (`-c USERS -j 2`) on the same server (Postgres only).
    pgbench_tps: Option<f64>,
    /// The keyed checkout with +200±50 ms on every database round trip, as the drill's
    /// `slow-db` fault adds (Postgres only).
    slow_db: Option<Phase>,
    /// Keyed checkouts/s against pgbench's transactions/s, and against the bare checkout's.
    keyed_vs_pgbench: Option<f64>,
    keyed_vs_bare: f64,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let backends = args.db.backends();
    let program = match &args.program {
        Some(p) => p.clone(),
        None => crate::sibling("holdfast")?,
    };
    let mut builds = vec![("program", program)];
    if let Some(b) = &args.baseline {
        builds.push(("baseline", b.clone()));
    }
    let mut results = Vec::new();
    for backend in backends {
        // Round by round, the builds take turns going first (A B, B A, …), so that neither
        // always meets a fresher disk or a warmer server.
        for round in 0..args.rounds.max(1) {
            let mut order: Vec<&(&str, PathBuf)> = builds.iter().collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for (build, program) in order {
                eprintln!(
                    "bench checkout: {} {} round {} ({} instances, {} users, {:?} per phase)",
                    backend.name(),
                    program.display(),
                    round + 1,
                    args.instances,
                    args.users,
                    args.duration
                );
                let mut r = bench_backend(&args, backend, build, program).await?;
                r.round = round + 1;
                results.push(r);
            }
        }
    }
    println!(
        "\n{:<10} {:<9} {:>5} {:>16} {:>16} {:>9} {:>17} {:>17}",
        "backend",
        "build",
        "round",
        "with key (co/s)",
        "without (co/s)",
        "ratio",
        "p50/p99 with (ms)",
        "p50/p99 w/o (ms)"
    );
    for r in &results {
        let (a, b) = (&r.with_idempotency, &r.without_idempotency);
        println!(
            "{:<10} {:<9} {:>5} {:>16.0} {:>16.0} {:>9.3} {:>8.1}/{:<8.1} {:>8.1}/{:<8.1}",
            r.backend,
            r.build,
            r.round,
            a.checkouts_per_s,
            b.checkouts_per_s,
            r.throughput_ratio,
            a.p50_ms,
            a.p99_ms,
            b.p50_ms,
            b.p99_ms
        );
    }
    println!("\njobs completed per checkout during each phase (2 = the workers kept up), and waiting at its end:");
    for r in &results {
        let (a, b) = (&r.jobs_with_key, &r.jobs_without_key);
        println!(
            "{:<10} {:<9} {:>5}   with key {:.2}, {} waiting   without {:.2}, {} waiting",
            r.backend,
            r.build,
            r.round,
            a.completed_per_checkout,
            a.waiting_at_end,
            b.completed_per_checkout,
            b.waiting_at_end
        );
    }
    for r in results.iter().filter(|r| r.peers.is_some()) {
        let Some(p) = &r.peers else { continue };
        let k = &r.with_idempotency;
        println!(
            "\npeers, {} ({}, round {}), same run:",
            r.backend, r.build, r.round
        );
        if let Some(tps) = p.pgbench_tps {
            println!("  pgbench TPC-B (-c {} -j 2)      {tps:>8.0} tps", r.users);
        }
        println!(
            "  bare checkout (shop SQL, axum)  {:>8.0} co/s   p50/p99 {:.1}/{:.1} ms",
            p.bare.checkouts_per_s, p.bare.p50_ms, p.bare.p99_ms
        );
        println!(
            "  holdfast, with key              {:>8.0} co/s   p50/p99 {:.1}/{:.1} ms",
            k.checkouts_per_s, k.p50_ms, k.p99_ms
        );
        let vs_pgbench = p
            .keyed_vs_pgbench
            .map_or(String::new(), |x| format!("{x:.3} of pgbench's tps, "));
        println!(
            "  ratios                          with key = {vs_pgbench}{:.3} of bare",
            p.keyed_vs_bare
        );
        if let Some(slow) = &p.slow_db {
            println!(
                "  with key, slow db (+200±50 ms)  {:>8.1} co/s   p50/p99 {:.0}/{:.0} ms   errors {}",
                slow.checkouts_per_s, slow.p50_ms, slow.p99_ms, slow.errors
            );
        }
    }
    if args.baseline.is_some() {
        println!("\nmedian checkouts/s with key, program / baseline:");
        for backend in results
            .iter()
            .map(|r| r.backend)
            .collect::<std::collections::BTreeSet<_>>()
        {
            let median = |build: &str| {
                let mut v: Vec<f64> = results
                    .iter()
                    .filter(|r| r.backend == backend && r.build == build)
                    .map(|r| r.with_idempotency.checkouts_per_s)
                    .collect();
                v.sort_by(f64::total_cmp);
                v.get(v.len() / 2).copied().unwrap_or(0.0)
            };
            let (p, b) = (median("program"), median("baseline"));
            println!(
                "{backend:<10} {p:.0} / {b:.0} = {:.3}",
                p / b.max(f64::MIN_POSITIVE)
            );
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(
            path,
            serde_json::to_vec_pretty(&json!({ "bench": "checkout", "results": results }))?,
        )
        .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// A `holdfast up` child, stopped (drained) on drop.
pub(crate) struct System {
    child: Child,
    pub url: String,
}

impl Drop for System {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

/// The balancer paces each client address (50 requests/s by default, `up --client-rate`); a
/// bench's shopper is a load generator, not a person, so the pace is lifted: what is measured
/// is the system behind it.
const UNPACED: &[&str] = &["--client-rate", "1000000"];

/// `holdfast up --bench-routes` with `args.instances` instances in `dir` (and `extra` flags),
/// unpaced, once it says it is up.
pub(crate) fn start_system(
    args: &BenchArgs,
    program: &Path,
    dir: &Path,
    database_url: Option<&str>,
    extra: &[&str],
) -> anyhow::Result<System> {
    let mut cmd = Command::new(program);
    cmd.args([
        "up",
        "--port",
        "0",
        "--bench-routes",
        "--instances",
        &args.instances.to_string(),
        "--workers",
        &args.workers.to_string(),
    ])
    .arg("--data-dir")
    .arg(dir)
    .args(UNPACED)
    .args(extra)
    .env("RUST_LOG", "warn")
    .stdout(Stdio::piped());
    if let Some(url) = database_url {
        cmd.args(["--backend", "postgres", "--database-url", url]);
    }
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let url = loop {
        match lines.next() {
            Some(line) => {
                if let Some(rest) = line?.strip_prefix("Holdfast is up: ") {
                    break rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                }
            }
            None => bail!("holdfast up exited before it was ready"),
        }
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Ok(System { child, url })
}

async fn bench_backend(
    args: &BenchArgs,
    backend: Backend,
    build: &'static str,
    program: &Path,
) -> anyhow::Result<BackendResult> {
    let dir = tempfile::tempdir()?;
    let admin_url = match backend {
        Backend::Postgres => Some(
            args.db
                .database_url
                .clone()
                .or_else(|| std::env::var("DATABASE_URL").ok())
                .context("postgres needs --database-url or DATABASE_URL")?,
        ),
        Backend::Sqlite => None,
    };
    let db_url = match &admin_url {
        Some(admin) => {
            Some(holdfast_store::testing::create_database(admin, "holdfast_bench").await?)
        }
        None => None,
    };
    let system = start_system(args, program, dir.path(), db_url.as_deref(), &[])?;
    let users = signup_users(&system.url, args.users).await?;
    // The system's own store, read between phases for the jobs they left.
    let store_url = db_url
        .clone()
        .unwrap_or_else(|| holdfast_store::testing::sqlite_url(dir.path()));
    let mut opts = StoreOptions::new(store_url);
    opts.max_connections = 1;
    let store = Store::open(&opts).await?;
    // A short warm-up on the measured path fills pools and caches.
    let keyed = through(&system.url, &users, "/api/checkout");
    drive(&keyed, Duration::from_secs(1)).await;
    let (with, jobs_with_key) = JobsKeptUp::during(&store, drive(&keyed, args.duration)).await?;
    let unkeyed = through(&system.url, &users, "/bench/checkout");
    let (without, jobs_without_key) =
        JobsKeptUp::during(&store, drive(&unkeyed, args.duration)).await?;
    store.close().await;
    drop(system);
    if let (Some(admin), Some(url)) = (&admin_url, &db_url) {
        drop_database(admin, url).await?;
    }
    let peers = match args.peers {
        true => Some(peers(args, program, admin_url.as_deref(), &with).await?),
        false => None,
    };
    let throughput_ratio = if without.checkouts_per_s > 0.0 {
        with.checkouts_per_s / without.checkouts_per_s
    } else {
        0.0
    };
    Ok(BackendResult {
        backend: backend.name(),
        build,
        round: 0,
        program: program.to_owned(),
        instances: args.instances,
        users: args.users,
        with_idempotency: with,
        without_idempotency: without,
        throughput_ratio,
        jobs_with_key,
        jobs_without_key,
        peers,
    })
}

/// Drops the database `url` names, through the server at `admin`.
async fn drop_database(admin: &str, url: &str) -> anyhow::Result<()> {
    let name = url
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .split('?')
        .next()
        .unwrap_or_default();
    Ok(holdfast_store::testing::drop_database(admin, name).await?)
}

/// `--peers`, after the system's own phases: the bare checkout on a database of its own on the
/// same engine, then on Postgres pgbench on the same server and the keyed checkout behind a
/// `slow-db` proxy. One at a time, so each has the machine to itself.
async fn peers(
    args: &BenchArgs,
    program: &Path,
    admin_url: Option<&str>,
    keyed: &Phase,
) -> anyhow::Result<Peers> {
    let dir = tempfile::tempdir()?;
    let store_url = match admin_url {
        Some(admin) => holdfast_store::testing::create_database(admin, "holdfast_bare").await?,
        None => holdfast_store::testing::sqlite_url(dir.path()),
    };
    let bare = crate::bare::Bare::start(&store_url, args.users).await?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let shoppers: Vec<Shopper> = bare
        .users
        .iter()
        .map(|id| Shopper {
            client: client.clone(),
            add: format!("{}/cart/{id}", bare.url),
            checkout: format!("{}/checkout/{id}", bare.url),
        })
        .collect();
    drive(&shoppers, Duration::from_secs(1)).await;
    let bare_phase = drive(&shoppers, args.duration).await;
    bare.stop().await;
    let (mut pgbench_tps, mut slow_db) = (None, None);
    if let Some(admin) = admin_url {
        drop_database(admin, &store_url).await?;
        pgbench_tps = Some(pgbench(admin, args.users, args.duration).await?);
        slow_db = Some(slow_db_phase(args, program, admin).await?);
    }
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    Ok(Peers {
        keyed_vs_bare: ratio(keyed.checkouts_per_s, bare_phase.checkouts_per_s),
        keyed_vs_pgbench: pgbench_tps.map(|tps| ratio(keyed.checkouts_per_s, tps)),
        bare: bare_phase,
        pgbench_tps,
        slow_db,
    })
}

/// `pgbench` TPC-B at scale 1 on a fresh database of the server at `admin`, `clients`
/// connections on two threads, for `duration`: its transactions per second.
async fn pgbench(admin: &str, clients: usize, duration: Duration) -> anyhow::Result<f64> {
    let program = pgbench_program().context(
        "--peers needs pgbench (PostgreSQL's server or contrib package; scripts/install-drill-deps.sh installs the server binaries)",
    )?;
    let url = holdfast_store::testing::create_database(admin, "holdfast_pgbench").await?;
    let run = |args: Vec<String>| {
        let program = program.clone();
        tokio::task::spawn_blocking(move || Command::new(program).args(args).output())
    };
    let init = run(vec![
        "-i".into(),
        "-s".into(),
        "1".into(),
        "-q".into(),
        url.clone(),
    ])
    .await??;
    anyhow::ensure!(
        init.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let secs = duration.as_secs().max(1).to_string();
    let out = run(vec![
        "-c".into(),
        clients.to_string(),
        "-j".into(),
        "2".into(),
        "-T".into(),
        secs,
        "-n".into(),
        url.clone(),
    ])
    .await??;
    drop_database(admin, &url).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .with_context(|| format!("no tps in pgbench's output: {text}"))
}

/// pgbench on PATH, or in Debian's /usr/lib/postgresql/*/bin.
fn pgbench_program() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("pgbench"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .flatten()
            .map(|e| e.path().join("bin").join("pgbench"))
            .filter(|p| p.is_file())
            .collect();
        found.sort();
        found.pop()
    })
}

/// How long the slow-database phase runs before it measures (each request takes seconds).
const SLOW_WARM_UP: Duration = Duration::from_secs(3);

/// The keyed checkout of a fresh system whose every database round trip crosses a fault
/// proxy adding 200 ± 50 ms, as the drill's `slow-db` does.
async fn slow_db_phase(args: &BenchArgs, program: &Path, admin: &str) -> anyhow::Result<Phase> {
    use holdfast_faultproxy::{FaultProxy, Toxic, ToxicSpec};
    let url = holdfast_store::testing::create_database(admin, "holdfast_bench_slow").await?;
    let (head, name) = url.rsplit_once('/').context("a database URL")?;
    let upstream = head.rsplit('@').next().unwrap_or(head).to_owned();
    let proxy = FaultProxy::new();
    proxy.create_proxy("db", "127.0.0.1:0", &upstream).await?;
    let listen = proxy.proxy("db").await?.listen;
    let user = head
        .strip_prefix("postgres://")
        .and_then(|rest| rest.split_once('@'))
        .map_or("postgres", |(user, _)| user);
    let via_proxy = format!("postgres://{user}@{listen}/{name}");
    let dir = tempfile::tempdir()?;
    let system = start_system(args, program, dir.path(), Some(&via_proxy), &[])?;
    let users = signup_users(&system.url, args.users).await?;
    proxy
        .add_toxic(
            "db",
            ToxicSpec::new(Toxic::Latency {
                latency: 200,
                jitter: 50,
            }),
        )
        .await?;
    // The same warm-up as the other phases, under the latency: every pooled connection has
    // prepared the checkout's statements and is in use, as in a system that has been running.
    let shoppers = through(&system.url, &users, "/api/checkout");
    drive(&shoppers, SLOW_WARM_UP).await;
    let phase = drive(&shoppers, args.duration).await;
    drop(system);
    drop(proxy);
    drop_database(admin, &url).await?;
    Ok(phase)
}

pub(crate) async fn signup_users(base: &str, n: usize) -> anyhow::Result<Vec<reqwest::Client>> {
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let c = reqwest::Client::builder()
            .local_address(holdfast_core::loopback_source(i as u64))
            .cookie_store(true)
            .timeout(Duration::from_secs(10))
            .build()?;
        let creds = json!({ "email": format!("bench{i}-{}@example.com", uuid::Uuid::new_v4().simple()), "password": "bench password" });
        for path in ["/api/signup", "/api/login"] {
            let r = c.post(format!("{base}{path}")).json(&creds).send().await?;
            if !r.status().is_success() {
                bail!("{path}: {}", r.status());
            }
        }
        clients.push(c);
    }
    Ok(clients)
}

/// One shopper of a closed loop: its client and where it adds to its cart and checks out.
#[derive(Clone)]
pub(crate) struct Shopper {
    client: reqwest::Client,
    add: String,
    checkout: String,
}

/// The system's shoppers: `users` through the balancer at `base`, checking out at
/// `checkout_path`.
pub(crate) fn through(base: &str, users: &[reqwest::Client], checkout_path: &str) -> Vec<Shopper> {
    users
        .iter()
        .map(|c| Shopper {
            client: c.clone(),
            add: format!("{base}/api/cart/items"),
            checkout: format!("{base}{checkout_path}"),
        })
        .collect()
}

/// Every shopper loops add-then-checkout until `duration` is up; returns the checkout
/// figures.
pub(crate) async fn drive(shoppers: &[Shopper], duration: Duration) -> Phase {
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let tasks: Vec<_> = shoppers
        .iter()
        .cloned()
        .map(
            |Shopper {
                 client: c,
                 add,
                 checkout,
             }| {
                tokio::spawn(async move {
                    let mut hist = Histogram::<u64>::new(3).expect("histogram");
                    let (mut ok, mut errors) = (0u64, 0u64);
                    while Instant::now() < deadline {
                        let added = c
                            .post(&add)
                            .json(&json!({ "sku": "CARABINER", "qty": 1 }))
                            .send()
                            .await;
                        if !added.is_ok_and(|r| r.status().is_success()) {
                            errors += 1;
                            continue;
                        }
                        let t = Instant::now();
                        let r = c
                            .post(&checkout)
                            .header("Idempotency-Key", uuid::Uuid::new_v4().to_string())
                            .send()
                            .await;
                        if r.is_ok_and(|r| r.status().as_u16() == 201) {
                            ok += 1;
                            let _ = hist.record(t.elapsed().as_micros() as u64);
                        } else {
                            errors += 1;
                        }
                    }
                    (hist, ok, errors)
                })
            },
        )
        .collect();
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    let (mut ok, mut errors) = (0, 0);
    for t in tasks {
        if let Ok((h, o, e)) = t.await {
            let _ = hist.add(&h);
            ok += o;
            errors += e;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    Phase {
        checkouts: ok,
        checkouts_per_s: ok as f64 / secs,
        p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
        errors,
    }
}
