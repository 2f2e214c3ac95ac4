//! The command line, in one place.
//!
//! Every flag the binary accepts is declared here, so `holdfast --help` and this file tell the
//! same story. Parsing only: the commands themselves live in `serve.rs` and `up.rs`. A bare
//! `holdfast` (what `cargo run --release` runs) is `holdfast up`, so `up`'s flags are also
//! accepted without the subcommand.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "holdfast", version, about = "A shop that survives a bad day.")]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Flags for the default command, `up`.
    #[command(flatten)]
    pub up: UpArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The whole system on one machine: a balancer in front of N supervised instances.
    Up(UpArgs),
    /// One stateless web instance (the production entry point).
    Serve(ServeArgs),
    /// One job worker: charges paid orders and sends receipts, exactly once in effect.
    Worker(WorkerArgs),
    /// The fake payment provider and mail sink (a separate process, with injectable faults).
    Provider(ProviderArgs),
    /// Inspect and redrive the job queue.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Side-by-side benchmarks (long runs that do not belong in the test suite).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// A game day in one command: start a system, load it, inject faults, check invariants.
    Drill(DrillArgs),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Checkout requests/s through the balancer, with and without the idempotency layer.
    Checkout(BenchArgs),
    /// Job queue: burn-down jobs/s and insert-to-start latency, optionally against peers.
    Jobs(BenchJobsArgs),
    /// Sessions: load+save/s of the Redis tier (with its backstop) vs tower-sessions' Redis store.
    Sessions(BenchSessionsArgs),
    /// Cache: hit-path gets/s of holdfast-cache (in-process tier) vs moka used directly.
    Cache(BenchCacheArgs),
}

/// `holdfast bench cache`.
#[derive(Debug, Clone, Args)]
pub struct BenchCacheArgs {
    /// Distinct warm keys the readers cycle through.
    #[arg(long, default_value_t = 10_000)]
    pub keys: usize,
    /// Concurrent reader tasks (on the runtime's worker threads, the same for both caches).
    #[arg(long, default_value_t = 8)]
    pub tasks: usize,
    /// Zipf exponent of the key popularity; 0 is uniform.
    #[arg(long, default_value_t = 1.0)]
    pub zipf: f64,
    /// Measured time per phase; phases alternate between the caches.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    pub duration: Duration,
    /// Phases per cache.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Run without the Prometheus recorder `serve` installs (hit counters become no-ops).
    #[arg(long)]
    pub no_metrics: bool,
    /// Also write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `holdfast bench sessions`.
#[derive(Debug, Clone, Args)]
pub struct BenchSessionsArgs {
    /// The Redis both systems use (each under its own keys; nothing else is touched).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Distinct sessions the load cycles through.
    #[arg(long, default_value_t = 2000)]
    pub sessions: usize,
    /// Concurrent clients (closed loop), the same for both systems.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Measured time per phase; phases alternate between the systems.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub duration: Duration,
    /// Phases per system.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Also write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `holdfast bench jobs`. The worker settings default to the tuned figures the bench reports.
#[derive(Debug, Clone, Args)]
pub struct BenchJobsArgs {
    /// One backend; both when omitted (Postgres needs --database-url or DATABASE_URL).
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,
    /// A Postgres server to create throwaway benchmark databases on (one per system).
    #[arg(long)]
    pub database_url: Option<String>,
    /// No-op jobs to insert and then work off (burn-down).
    #[arg(long, default_value_t = 20_000)]
    pub jobs: usize,
    /// Also run the peers (graphile-worker, apalis) on the same server; see benches/peers.
    #[arg(long)]
    pub peers: bool,
    /// Also write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Worker runtimes started in this process, sharing one store pool.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Jobs one worker runs at once.
    #[arg(long, default_value_t = 4096)]
    pub concurrency: usize,
    /// Most jobs one claim takes.
    #[arg(long, default_value_t = 2048)]
    pub fetch_batch: usize,
    /// Most completions one statement writes.
    #[arg(long, default_value_t = 4096)]
    pub complete_batch: usize,
    /// Store connections (shared by all workers and the producer).
    #[arg(long, default_value_t = 8)]
    pub pool_size: u32,
    /// Steady state: jobs enqueued per second, one at a time.
    #[arg(long, default_value_t = 200)]
    pub rate: u32,
    /// Steady state: how long the producer runs.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub steady: Duration,
    /// Where the peers' install script and harnesses live (default: found from the
    /// current directory or the executable, `benches/peers`).
    #[arg(long)]
    pub peers_dir: Option<PathBuf>,
    /// Measure every system this many times, in turn, and report the medians.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Extra flags for the graphile-worker harness, e.g. "--processes 2 --concurrency 32".
    #[arg(long, allow_hyphen_values = true)]
    pub graphile_args: Vec<String>,
    /// Extra flags for the apalis harness, e.g. "--workers 4 --batch-size 200".
    #[arg(long, allow_hyphen_values = true)]
    pub apalis_args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// One backend; both when omitted (Postgres needs --database-url or DATABASE_URL).
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,
    /// A Postgres server to create a throwaway benchmark database on.
    #[arg(long)]
    pub database_url: Option<String>,
    #[arg(long, default_value_t = 3)]
    pub instances: u16,
    /// Concurrent shoppers, each in a closed loop.
    #[arg(long, default_value_t = 32)]
    pub users: usize,
    /// Measured time per phase.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Also write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `holdfast drill`. Exits 0 only when every invariant of DESIGN.md §2 held.
#[derive(Debug, Clone, Args)]
pub struct DrillArgs {
    /// The durable store of the drilled system; `postgres` runs a throwaway cluster of its own
    /// (initdb/pg_ctl; see scripts/install-drill-deps.sh).
    #[arg(long, value_enum, default_value_t = Backend::Sqlite)]
    pub backend: Backend,
    /// How long virtual users shop (setup, settling and final reads come on top).
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub duration: Duration,
    /// Concurrent virtual users.
    #[arg(long, default_value_t = 32)]
    pub users: usize,
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    pub instances: u16,
    #[arg(long, default_value_t = 2)]
    pub workers: u16,
    /// `all`, `none`, or a comma-separated list of: kill-instance, pause-instance,
    /// drain-instance, kill-worker, restart-db, slow-db, cut-db, provider-timeouts,
    /// restart-redis and flush-cache (`--sessions redis`), rotate-keys (`--sessions cookie`).
    #[arg(long, default_value = "all")]
    pub faults: holdfast_drill::FaultSet,
    /// Seeds the fault schedule and the users' choices (default: from the clock; reported).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the report as one self-contained HTML page here.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Write the drilled system's own log here (default: discarded with the temporary dir).
    #[arg(long)]
    pub system_log: Option<PathBuf>,
    /// Write the history (JSON Lines, Jepsen style: invoke, then ok/fail/info) here.
    #[arg(long)]
    pub history: Option<PathBuf>,
    /// Drill a deliberately broken build; the drill must then fail (a self-test).
    #[arg(long, value_enum)]
    pub sabotage: Option<DrillSabotage>,
    /// Where the drilled system keeps sessions; `redis` runs a redis-server of its own on a
    /// free port (see scripts/install-drill-deps.sh), `cookie` a key ring of its own.
    #[arg(long, value_enum, default_value_t = SessionMode::Store)]
    pub sessions: SessionMode,
    /// Restart the drill's Redis every this often (e.g. `15s`) instead of at seeded times;
    /// implies the `restart-redis` fault. Needs `--sessions redis`.
    #[arg(long, value_parser = parse_duration)]
    pub restart_redis_every: Option<Duration>,
    /// Each user pauses about this long (± 50%) before each request with its session, so that
    /// `--users` are active users rather than a stress test (e.g. `1s`; default: none).
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub think_time: Duration,
    /// Start the users spread evenly over this long (default: all at once).
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub ramp_up: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DrillSabotage {
    /// The web tier ignores Idempotency-Key (expect orders_duplicated).
    NoIdempotency,
    /// Checkout answers before its order commits (expect orders_lost).
    AckBeforeCommit,
    /// Workers skip the effect ledger (expect charges_duplicated).
    LedgerBypass,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    fn of_url(url: &str) -> Option<Backend> {
        if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// Where the durable store lives; shared by `up` and `serve`.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Which database engine holds the durable state.
    #[arg(long, value_enum, default_value_t = Backend::Sqlite)]
    pub backend: Backend,
    /// Local state: the SQLite file (`holdfast.sqlite`) and `run/instances.json`.
    #[arg(long, default_value = "./holdfast-data")]
    pub data_dir: PathBuf,
    /// `postgres://…` (required for `--backend postgres`) or `sqlite:PATH` (instead of the file
    /// in `--data-dir`). Without it, `DATABASE_URL` is used if it names the chosen backend.
    #[arg(long)]
    pub database_url: Option<String>,
}

impl StoreArgs {
    /// The store URL these flags name. Creates the data dir. A `--database-url` of the other
    /// engine is an error; a `DATABASE_URL` of the other engine is ignored, so the environment
    /// CI sets up for Postgres does not move a default SQLite run onto Postgres.
    pub fn store_url(&self) -> anyhow::Result<String> {
        std::fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("creating data dir {}", self.data_dir.display()))?;
        if let Some(url) = &self.database_url {
            let engine = Backend::of_url(url)
                .context("--database-url must start with sqlite: or postgres://")?;
            ensure!(
                engine == self.backend,
                "--database-url is a {} URL but --backend is {}",
                engine.name(),
                self.backend.name(),
            );
            return Ok(url.clone());
        }
        let from_env = std::env::var("DATABASE_URL")
            .ok()
            .filter(|url| Backend::of_url(url) == Some(self.backend));
        match (from_env, self.backend) {
            (Some(url), _) => Ok(url),
            (None, Backend::Sqlite) => Ok(format!(
                "sqlite:{}",
                self.data_dir.join("holdfast.sqlite").display()
            )),
            (None, Backend::Postgres) => {
                bail!("--backend postgres needs --database-url or a postgres:// DATABASE_URL")
            }
        }
    }
}

/// How each web instance behaves. `serve` takes them; `up` passes them on to its instances.
/// Unset durations keep `WebOptions::default()`, so the defaults live in one place.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Instance options (unset: the web crate's defaults)")]
pub struct InstanceArgs {
    /// A session unused this long is dead, e.g. `30m`.
    #[arg(long, value_parser = parse_duration)]
    pub session_idle_ttl: Option<Duration>,
    /// A session older than this is dead, however active, e.g. `12h`.
    #[arg(long, value_parser = parse_duration)]
    pub session_absolute_ttl: Option<Duration>,
    /// How long an in-flight idempotent request holds its key; must exceed the request timeout.
    #[arg(long, value_parser = parse_duration)]
    pub idempotency_lock_ttl: Option<Duration>,
    /// Server-side deadline for one request, e.g. `10s`.
    #[arg(long, value_parser = parse_duration)]
    pub request_timeout: Option<Duration>,
    /// After SIGTERM, how long to keep serving with /readyz at 503 so balancers notice.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub drain_delay: Duration,
    /// Expose `/bench/*` routes, for `holdfast bench` only.
    #[arg(long, hide = true)]
    pub bench_routes: bool,
    /// SABOTAGE, for tests and drills only: break the web tier on purpose.
    #[arg(long, value_enum, hide = true)]
    pub unsafe_sabotage: Option<SabotageKind>,
    /// Where sessions live: the durable store, Redis with the store as backstop, or signed
    /// cookies (no server state; see holdfast-sessions for what that cannot revoke).
    #[arg(long, value_enum, default_value_t = SessionMode::Store)]
    pub sessions: SessionMode,
    /// Redis for `--sessions redis`, e.g. `redis://127.0.0.1:6379/0`.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Prefix of the session keys in Redis (one per deployment sharing a Redis).
    #[arg(long, default_value = "holdfast")]
    pub redis_prefix: String,
    /// Signing keys for `--sessions cookie`: `kid:base64key,…` (32+ bytes each); the first
    /// signs, the others only verify (rotation). Unset, `up` generates one per run and shares
    /// it with its instances, so restarting `up` logs cookie sessions out.
    #[arg(long, env = "HOLDFAST_SESSION_KEYS", hide_env_values = true)]
    pub session_keys: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SessionMode {
    Store,
    Redis,
    Cookie,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SabotageKind {
    /// Ignore Idempotency-Key: retries run again.
    NoIdempotency,
    /// Answer checkouts before committing them.
    AckBeforeCommit,
}

impl InstanceArgs {
    /// The same settings as `serve` flags.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args = Vec::new();
        let durations = [
            ("--session-idle-ttl", self.session_idle_ttl),
            ("--session-absolute-ttl", self.session_absolute_ttl),
            ("--idempotency-lock-ttl", self.idempotency_lock_ttl),
            ("--request-timeout", self.request_timeout),
            ("--drain-delay", Some(self.drain_delay)),
        ];
        for (flag, value) in durations {
            if let Some(d) = value {
                args.extend([flag.into(), format!("{}ms", d.as_millis()).into()]);
            }
        }
        if self.bench_routes {
            args.push("--bench-routes".into());
        }
        if let Some(kind) = self.unsafe_sabotage {
            let name = kind
                .to_possible_value()
                .map(|v| v.get_name().to_owned())
                .unwrap_or_default();
            args.extend(["--unsafe-sabotage".into(), name.into()]);
        }
        let sessions = self
            .sessions
            .to_possible_value()
            .map(|v| v.get_name().to_owned());
        args.extend(["--sessions".into(), sessions.unwrap_or_default().into()]);
        args.extend(["--redis-prefix".into(), self.redis_prefix.clone().into()]);
        args
    }

    /// What `up` hands its instances in the environment, not argv (secrets do not belong in
    /// `ps`): the Redis URL, and the session keys — generated here for `--sessions cookie`
    /// when none are given, so that every instance shares one ring.
    pub fn session_env(&self) -> anyhow::Result<Vec<(OsString, OsString)>> {
        Ok(match self.sessions {
            SessionMode::Store => Vec::new(),
            SessionMode::Redis => {
                let url = self
                    .redis_url
                    .clone()
                    .context("--sessions redis needs --redis-url or REDIS_URL")?;
                vec![("REDIS_URL".into(), url.into())]
            }
            SessionMode::Cookie => {
                let keys = match &self.session_keys {
                    Some(spec) => {
                        holdfast_sessions::KeyRing::parse(spec)?;
                        spec.clone()
                    }
                    None => {
                        let kid = format!("k{}", holdfast_core::now_ms() / 1000);
                        holdfast_sessions::KeyRing::generate_spec(&kid)
                    }
                };
                vec![("HOLDFAST_SESSION_KEYS".into(), keys.into())]
            }
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Interface the balancer listens on; a loopback address also means plain-HTTP cookies.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub host: IpAddr,
    /// Port the balancer listens on (0 picks a free one).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// How many web instances to run behind the balancer.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    pub instances: u16,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// How many job workers to run.
    #[arg(long, default_value_t = 2)]
    pub workers: u16,
    /// Use this payment provider instead of starting `holdfast provider`.
    #[arg(long)]
    pub provider_url: Option<String>,
    #[command(flatten)]
    pub jobs: JobArgs,
}

/// How each worker behaves. `worker` takes them; `up` passes them on to its workers.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Worker options")]
pub struct JobArgs {
    /// Jobs of each queue one worker runs at once.
    #[arg(long, default_value_t = 16)]
    pub job_concurrency: usize,
    /// A job whose worker stops heartbeating is rescued after this long.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub job_lease: Duration,
    /// First retry delay of a failed job (full jitter, doubling per attempt, capped at 5 min).
    #[arg(long, value_parser = parse_duration, default_value = "500ms")]
    pub job_retry_base: Duration,
    /// How long a call to the payment provider may take before its outcome counts as unknown.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    pub provider_timeout: Duration,
    /// SABOTAGE, for tests and drills only: skip the effect ledger (duplicate charges follow).
    #[arg(long, hide = true)]
    pub unsafe_bypass_ledger: bool,
}

impl JobArgs {
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--job-concurrency".into(),
            self.job_concurrency.to_string().into(),
            "--job-lease".into(),
            format!("{}ms", self.job_lease.as_millis()).into(),
            "--job-retry-base".into(),
            format!("{}ms", self.job_retry_base.as_millis()).into(),
            "--provider-timeout".into(),
            format!("{}ms", self.provider_timeout.as_millis()).into(),
        ];
        if self.unsafe_bypass_ledger {
            args.push("--unsafe-bypass-ledger".into());
        }
        args
    }
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Where the worker serves /healthz and /metrics; port 0 picks a free one.
    #[arg(long, default_value_t = SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))]
    pub addr: SocketAddr,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Base URL of the payment provider.
    #[arg(long, env = "HOLDFAST_PROVIDER_URL")]
    pub provider_url: String,
    #[command(flatten)]
    pub jobs: JobArgs,
    /// Set by `up`: exit if that process dies.
    #[arg(long, hide = true)]
    pub parent_pid: Option<i32>,
}

#[derive(Debug, Clone, Args)]
pub struct ProviderArgs {
    #[arg(long, default_value_t = SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))]
    pub addr: SocketAddr,
    /// Latency added before acting on a charge or an email.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Share of calls answered 503 without acting.
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Share of calls that act, then hang and close without answering.
    #[arg(long, default_value_t = 0.0)]
    pub act_then_timeout_rate: f64,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, hide = true)]
    pub parent_pid: Option<i32>,
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Jobs per queue and state.
    Stats(StoreOnly),
    /// List dead jobs.
    Dead(StoreOnly),
    /// Send dead jobs back to work: one by id, or all.
    Redrive {
        #[command(flatten)]
        store: StoreArgs,
        /// A dead job's id; omit for all dead jobs.
        id: Option<i64>,
    },
}

#[derive(Debug, Clone, Args)]
pub struct StoreOnly {
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free one (see the `HOLDFAST_LISTENING` line).
    #[arg(long, default_value_t = SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)))]
    pub addr: SocketAddr,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Omit the cookies' `Secure` flag (plain-HTTP localhost only).
    #[arg(long)]
    pub insecure_cookies: bool,
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Set by `up`: the supervisor's pid; this instance dies with it (Linux).
    #[arg(long, hide = true)]
    pub parent_pid: Option<i32>,
}

/// `500ms`, `20s`, `30m`, `12h`, `7d`: one whole number and one unit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit, e.g. 30s"))?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: unit must be one of ms, s, m, h, d")),
    };
    n.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?}: too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let check = |s: &str, want: Option<Duration>| assert_eq!(parse_duration(s).ok(), want);
        check("500ms", Some(Duration::from_millis(500)));
        check("20s", Some(Duration::from_secs(20)));
        check("30m", Some(Duration::from_secs(1800)));
        check("12h", Some(Duration::from_secs(43_200)));
        check("1d", Some(Duration::from_secs(86_400)));
        check("0s", Some(Duration::ZERO));
        check("10", None);
        check("s", None);
        check("1.5s", None);
        check("-1s", None);
        check("5 s", None);
    }

    #[test]
    fn bare_holdfast_is_up() {
        let cli = Cli::try_parse_from(["holdfast"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.up.port, 8080);
        assert_eq!(cli.up.instances, 3);
        let cli = Cli::try_parse_from(["holdfast", "--instances", "2"]).unwrap();
        assert_eq!(cli.up.instances, 2);
        assert!(Cli::try_parse_from(["holdfast", "--instances", "0"]).is_err());
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
