//! `holdfast bench replica`: what a streaming standby buys the reads that may go to it, and
//! what the read-your-writes guarantee costs them.
//!
//! One throwaway primary and a streaming standby of it (`pg_basebackup -R`), the shop's
//! schema, `--users` shoppers with a few orders each. Then, on the same clusters:
//! 1. **Read throughput**: each shopper loops over its order history (`GET /api/orders`) and
//!    the catalog (`GET /api/products`), in turn, for `--duration`, through `holdfast up`
//!    given the primary's URL alone, then given both hosts (the standby in rotation), taking
//!    turns at going first for `--rounds`; the ratio of the medians is the gain.
//! 2. **The read-your-writes check**: through `up` given both hosts, `--check-users`
//!    shoppers (few: this is about one request's latency, not a saturated machine's queues)
//!    loop write-then-read (add to the cart, read the order history, empty the cart), reading
//!    with the token the write handed out and without it in turn (with it, the standby serves
//!    once it has replayed the write — waiting up to `--replica-wait` — else the primary;
//!    without, the standby at once, possibly stale); the difference of the two p50s is the
//!    check's cost per request.
//!
//! Everything runs on this one machine: the primary, the standby, the instances and the load
//! share its cores.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use holdfast_drill::Cluster;
use serde::Serialize;
use serde_json::json;

use crate::checkout::start_system;
use crate::cli::BenchReplicaArgs;

/// Orders each shopper places before the reads.
const ORDERS_EACH: usize = 5;

/// What one read phase measured.
#[derive(Debug, Clone, Serialize)]
struct Reads {
    reads: u64,
    reads_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    /// CPU the primary's server spent per 1000 reads (all its processes), when measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    primary_cpu_ms_per_1000: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Throughput {
    primary_only: Reads,
    with_replica: Reads,
    /// with ÷ primary only (goal ≥ 1.5).
    ratio: f64,
    /// The share of the primary's CPU per read the standby took over.
    primary_cpu_saved: f64,
}

#[derive(Debug, Serialize)]
struct Check {
    /// Order-history reads right after a write, carrying its token.
    with_token: Reads,
    /// The same, the token dropped.
    without_token: Reads,
    /// with − without, p50 (goal ≤ 1 ms).
    extra_p50_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    instances: u16,
    users: usize,
    throughput: Throughput,
    read_your_writes: Check,
}

/// A shopper: a client without a cookie store, and its session cookie.
#[derive(Clone)]
struct Shopper {
    http: reqwest::Client,
    session: String,
}

pub async fn run(args: BenchReplicaArgs) -> anyhow::Result<()> {
    let program = args.phases.program()?;
    let dir = Arc::new(tempfile::tempdir()?);
    let primary = Cluster::start(&dir).await?;
    let standby = Cluster::start_standby(&primary, &dir).await?;
    let alone = primary.url();
    let both = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/holdfast",
        standby.port, primary.port
    );
    let system_args = args.phases.system(&program);
    let data = dir.path().join("data");
    eprintln!(
        "bench replica: {} shoppers placing {ORDERS_EACH} orders each",
        args.phases.users
    );
    let shoppers = {
        let system = start_system(&system_args, &program, &data, Some(&alone), &[])?;
        let shoppers = sign_up(&system.url, args.phases.users).await?;
        for s in &shoppers {
            for _ in 0..ORDERS_EACH {
                s.add(&system.url, "CARABINER").await?;
                s.checkout(&system.url).await?;
            }
        }
        shoppers
    };

    let (mut alone_runs, mut both_runs) = (Vec::new(), Vec::new());
    for round in 0..args.phases.rounds.max(1) {
        for replica in [round % 2 == 1, round % 2 == 0] {
            let url = if replica { &both } else { &alone };
            let system = start_system(&system_args, &program, &data, Some(url), &[])?;
            reads(&system.url, &shoppers, Duration::from_secs(1)).await;
            let cpu_before = server_cpu_ms(&primary);
            let mut phase = reads(&system.url, &shoppers, args.phases.duration).await;
            let cpu = server_cpu_ms(&primary) - cpu_before;
            phase.primary_cpu_ms_per_1000 = Some(cpu / phase.reads.max(1) as f64 * 1000.0);
            eprintln!(
                "bench replica: round {}: {:.0} reads/s (p50 {:.2} ms) {}",
                round + 1,
                phase.reads_per_s,
                phase.p50_ms,
                if replica {
                    "with the standby in rotation"
                } else {
                    "on the primary alone"
                }
            );
            if replica {
                &mut both_runs
            } else {
                &mut alone_runs
            }
            .push(phase);
        }
    }
    let primary_only = crate::median_by(alone_runs, |r| r.reads_per_s);
    let with_replica = crate::median_by(both_runs, |r| r.reads_per_s);
    let ratio = crate::ratio(with_replica.reads_per_s, primary_only.reads_per_s);
    let cpu_per_read = |r: &Reads| r.primary_cpu_ms_per_1000.unwrap_or(0.0);
    let primary_cpu_saved =
        1.0 - crate::ratio(cpu_per_read(&with_replica), cpu_per_read(&primary_only));
    eprintln!(
        "bench replica: the primary spent {:.0} ms of CPU per 1000 reads alone, {:.0} with the standby ({:.0}% less)",
        cpu_per_read(&primary_only),
        cpu_per_read(&with_replica),
        primary_cpu_saved * 100.0
    );
    eprintln!(
        "bench replica: medians {:.0} reads/s on the primary alone, {:.0} with the standby: {ratio:.2}x",
        primary_only.reads_per_s, with_replica.reads_per_s
    );

    let wait = format!("{}ms", args.replica_wait.as_millis());
    let system = start_system(
        &system_args,
        &program,
        &data,
        Some(&both),
        &["--replica-wait", &wait],
    )?;
    let checkers = &shoppers[..args.check_users.clamp(1, shoppers.len())];
    write_then_read(&system.url, checkers, Duration::from_secs(1)).await;
    let (with_token, without_token) = write_then_read(
        &system.url,
        checkers,
        args.phases.duration * args.phases.rounds.max(1) as u32,
    )
    .await;
    let extra_p50_ms = with_token.p50_ms - without_token.p50_ms;
    eprintln!(
        "bench replica: the read-your-writes check costs {extra_p50_ms:.2} ms at p50 ({:.2} vs {:.2} ms)",
        with_token.p50_ms, without_token.p50_ms
    );
    let report = Report {
        instances: args.phases.instances,
        users: args.phases.users,
        throughput: Throughput {
            primary_only,
            with_replica,
            ratio,
            primary_cpu_saved,
        },
        read_your_writes: Check {
            with_token,
            without_token,
            extra_p50_ms,
        },
    };
    let json = serde_json::to_string_pretty(&report)?;
    match &args.phases.json {
        Some(path) => std::fs::write(path, &json).with_context(|| format!("{}", path.display()))?,
        None => println!("{json}"),
    }
    drop(system);
    standby.stop().await;
    primary.stop().await;
    Ok(())
}

/// `n` shoppers signed up and logged in at `base`.
async fn sign_up(base: &str, n: usize) -> anyhow::Result<Vec<Shopper>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let http = reqwest::Client::builder()
            .local_address(holdfast_core::loopback_source(i as u64))
            .timeout(Duration::from_secs(10))
            .build()?;
        let creds = json!({
            "email": format!("replica{i}-{}@example.com", uuid::Uuid::new_v4().simple()),
            "password": "bench password",
        });
        let signup = http
            .post(format!("{base}/api/signup"))
            .json(&creds)
            .send()
            .await?;
        if !signup.status().is_success() {
            bail!("signup: {}", signup.status());
        }
        let login = http
            .post(format!("{base}/api/login"))
            .json(&creds)
            .send()
            .await?;
        if !login.status().is_success() {
            bail!("login: {}", login.status());
        }
        let session = cookie(&login, holdfast_web::cookie_name(false)).context("no session")?;
        out.push(Shopper { http, session });
    }
    Ok(out)
}

/// The `name=value` of the cookie `name` an answer sets.
fn cookie(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok()?.split(';').next())
        .find(|pair| pair.split('=').next() == Some(name))
        .map(str::to_owned)
}

impl Shopper {
    /// Adds one `sku` to the cart; the read-your-writes token it was handed, if any.
    async fn add(&self, base: &str, sku: &str) -> anyhow::Result<Option<String>> {
        let r = self
            .http
            .post(format!("{base}/api/cart/items"))
            .header("cookie", &self.session)
            .json(&json!({ "sku": sku, "qty": 1 }))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("add: {}", r.status());
        }
        Ok(cookie(&r, holdfast_web::read_cookie_name(false)))
    }

    async fn remove(&self, base: &str, sku: &str) -> anyhow::Result<()> {
        let r = self
            .http
            .delete(format!("{base}/api/cart/items/{sku}"))
            .header("cookie", &self.session)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("remove: {}", r.status());
        }
        Ok(())
    }

    async fn checkout(&self, base: &str) -> anyhow::Result<()> {
        let r = self
            .http
            .post(format!("{base}/api/checkout"))
            .header("cookie", &self.session)
            .header("idempotency-key", uuid::Uuid::new_v4().to_string())
            .send()
            .await?;
        if r.status().as_u16() != 201 {
            bail!("checkout: {}", r.status());
        }
        Ok(())
    }

    /// One GET with the session (and `token`); its latency if it answered 200.
    async fn get(&self, url: &str, token: Option<&str>) -> Option<Duration> {
        let cookies = match token {
            Some(t) => format!("{}; {t}", self.session),
            None => self.session.clone(),
        };
        let started = Instant::now();
        let r = self.http.get(url).header("cookie", cookies).send().await;
        match r {
            Ok(r) if r.status().as_u16() == 200 => {
                r.bytes().await.ok()?;
                Some(started.elapsed())
            }
            _ => None,
        }
    }
}

/// Every shopper reads its order history and the catalog in turn until `duration` is up.
async fn reads(base: &str, shoppers: &[Shopper], duration: Duration) -> Reads {
    let deadline = Instant::now() + duration;
    let (history, catalog) = (format!("{base}/api/orders"), format!("{base}/api/products"));
    measure(shoppers, move |s| {
        let (history, catalog) = (history.clone(), catalog.clone());
        async move {
            let mut samples = Vec::new();
            let mut errors = 0;
            while Instant::now() < deadline {
                for url in [&history, &catalog] {
                    match s.get(url, None).await {
                        Some(t) => samples.push(t),
                        None => errors += 1,
                    }
                }
            }
            (samples, errors)
        }
    })
    .await
}

/// Every shopper adds to its cart, reads its order history, and empties the cart, until
/// `duration` is up, reading with the token the add handed out and without it in turn; the
/// reads' figures with the token, and without.
async fn write_then_read(base: &str, shoppers: &[Shopper], duration: Duration) -> (Reads, Reads) {
    let turns = [true, false].map(|token| {
        let deadline = Instant::now() + duration;
        let history = format!("{base}/api/orders");
        let base = base.to_owned();
        move |s: Shopper| {
            let (history, base) = (history.clone(), base.clone());
            async move { write_then_read_loop(s, base, history, token, deadline).await }
        }
    });
    let [with, without] = turns;
    // Both halves at once, each shopper in both: the two see the same machine.
    let (with, without) = tokio::join!(measure(shoppers, with), measure(shoppers, without));
    (with, without)
}

/// One shopper's write-then-read loop until `deadline`: the reads' latencies, and failures.
async fn write_then_read_loop(
    s: Shopper,
    base: String,
    history: String,
    token: bool,
    deadline: Instant,
) -> (Vec<Duration>, u64) {
    {
        {
            let mut samples = Vec::new();
            let mut errors = 0;
            while Instant::now() < deadline {
                // The two turns run at once on one cart: each its own line.
                let sku = if token { "CARABINER" } else { "HELMET" };
                let handed = match s.add(&base, sku).await {
                    Ok(t) => t,
                    Err(_) => {
                        errors += 1;
                        continue;
                    }
                };
                let carried = handed.as_deref().filter(|_| token);
                match s.get(&history, carried).await {
                    Some(t) => samples.push(t),
                    None => errors += 1,
                }
                // Back to an empty cart, so the next add is the same write (a cart's lines
                // are bounded).
                if s.remove(&base, sku).await.is_err() {
                    errors += 1;
                }
            }
            (samples, errors)
        }
    }
}

/// Runs `each` for every shopper at once, a task each, and gathers their latencies and
/// errors.
async fn measure<F, Fut>(shoppers: &[Shopper], each: F) -> Reads
where
    F: Fn(Shopper) -> Fut,
    Fut: std::future::Future<Output = (Vec<Duration>, u64)> + Send + 'static,
{
    let started = Instant::now();
    let tasks: Vec<_> = shoppers
        .iter()
        .cloned()
        .map(|s| tokio::spawn(each(s)))
        .collect();
    let mut runs = Vec::with_capacity(tasks.len());
    for t in tasks {
        runs.extend(t.await.ok());
    }
    let secs = started.elapsed().as_secs_f64();
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    let (mut reads, mut errors) = (0u64, 0u64);
    for (samples, e) in runs {
        errors += e;
        for t in samples {
            reads += 1;
            let _ = hist.record(t.as_micros() as u64);
        }
    }
    Reads {
        reads,
        reads_per_s: reads as f64 / secs,
        p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
        errors,
        primary_cpu_ms_per_1000: None,
    }
}

/// CPU time, in ms, the server of `cluster` has used so far: the postmaster, its live
/// backends, and the ones it has reaped (Linux `/proc`; 0 elsewhere).
fn server_cpu_ms(cluster: &Cluster) -> f64 {
    /// Fields of `/proc/PID/stat` after the command: its parent, and utime, stime, cutime,
    /// cstime, in clock ticks.
    fn stat(pid: &str) -> Option<(u32, u64)> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let fields: Vec<&str> = text.rsplit_once(") ")?.1.split_whitespace().collect();
        let ppid = fields.get(1)?.parse().ok()?;
        let ticks = fields
            .get(11..15)?
            .iter()
            .map(|f| f.parse::<u64>().unwrap_or(0))
            .sum();
        Some((ppid, ticks))
    }
    let Some(postmaster) = std::fs::read_to_string(cluster.data.join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.trim().to_owned()))
    else {
        return 0.0;
    };
    let Ok(pid) = postmaster.parse::<u32>() else {
        return 0.0;
    };
    let own = stat(&postmaster).map_or(0, |(_, t)| t);
    let children: u64 = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| stat(e.file_name().to_str()?))
        .filter(|(ppid, _)| *ppid == pid)
        .map(|(_, t)| t)
        .sum();
    // Linux reports these in USER_HZ, 100 per second on every architecture it runs on.
    (own + children) as f64 * 10.0
}
