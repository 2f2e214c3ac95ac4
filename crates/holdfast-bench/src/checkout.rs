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
use serde::Serialize;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Serialize)]
struct Phase {
    checkouts: u64,
    checkouts_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
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
struct System {
    child: Child,
    url: String,
}

impl Drop for System {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

fn start_system(
    args: &BenchArgs,
    program: &Path,
    dir: &Path,
    database_url: Option<&str>,
) -> anyhow::Result<System> {
    let mut cmd = Command::new(program);
    cmd.args([
        "up",
        "--port",
        "0",
        "--bench-routes",
        "--instances",
        &args.instances.to_string(),
    ])
    .arg("--data-dir")
    .arg(dir)
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
    let system = start_system(args, program, dir.path(), db_url.as_deref())?;
    let users = signup_users(&system.url, args.users).await?;
    // A short warm-up on the measured path fills pools and caches.
    drive(&system.url, &users, "/api/checkout", Duration::from_secs(1)).await;
    let with = drive(&system.url, &users, "/api/checkout", args.duration).await;
    let without = drive(&system.url, &users, "/bench/checkout", args.duration).await;
    drop(system);
    if let (Some(admin), Some(url)) = (&admin_url, &db_url) {
        let name = url
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .split('?')
            .next()
            .unwrap_or_default();
        holdfast_store::testing::drop_database(admin, name).await?;
    }
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
    })
}

async fn signup_users(base: &str, n: usize) -> anyhow::Result<Vec<reqwest::Client>> {
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

/// Every user loops add-then-checkout until `duration` is up; returns the checkout figures.
async fn drive(
    base: &str,
    users: &[reqwest::Client],
    checkout_path: &str,
    duration: Duration,
) -> Phase {
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let tasks: Vec<_> = users
        .iter()
        .cloned()
        .map(|c| {
            let (add, checkout) = (
                Arc::new(format!("{base}/api/cart/items")),
                format!("{base}{checkout_path}"),
            );
            tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new(3).expect("histogram");
                let (mut ok, mut errors) = (0u64, 0u64);
                while Instant::now() < deadline {
                    let added = c
                        .post(add.as_str())
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
        })
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
