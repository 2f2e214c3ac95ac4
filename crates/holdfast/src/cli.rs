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
use holdfast_core::{Backend, Sabotage};

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
    /// One screen: the processes `up` runs (pid, uptime, restarts, health), the queue and the
    /// oldest waiting payout.
    Status(JobsList),
    /// A rolling restart (an upgrade, if the executable was replaced) of the web instances
    /// and workers `up` runs, one at a time, aborting if users see a 5xx.
    Roll(RollArgs),
    /// Side-by-side benchmarks against peers: runs `holdfast-bench` from beside this binary
    /// (`cargo build --release -p holdfast-bench`), so production links no peer crate.
    #[command(disable_help_flag = true)]
    Bench {
        /// `checkout`, `jobs`, `sessions`, `cache`, `uploads`, `restore` or `replica`, and their flags (`holdfast bench --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// A game day in one command: start a system, load it, inject faults, check invariants.
    Drill(DrillArgs),
    /// Schema migrations: what the database has, what would run, and running it (guarded).
    #[command(subcommand)]
    Migrate(MigrateCommand),
    /// The balancer alone, in front of web instances run by something else (an orchestrator,
    /// `ops/container/compose.yml`).
    Balance(BalanceArgs),
    /// Exit 0 if URL answers 2xx in time: a health check for an image with no shell or curl.
    Probe(ProbeArgs),
    /// Continuous backup of the store (SQLite: Litestream; PostgreSQL: base backups and WAL):
    /// run it, force it, check it, list what it holds.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Restore the store from a backup into a new or empty directory, as of a moment, and
    /// check it (`PRAGMA integrity_check`; `pg_amcheck`) before saying it worked.
    Restore(RestoreArgs),
    /// Match the payment provider's charges to the store's orders and refund each charge
    /// whose order the store does not have (lost by a restore). Safe to run again.
    Reconcile(ReconcileArgs),
}

/// `holdfast reconcile`.
#[derive(Debug, Clone, Args)]
pub struct ReconcileArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The payment provider the workers charge.
    #[arg(long, env = "HOLDFAST_PROVIDER_URL")]
    pub provider_url: String,
}

/// Where the backup is and which store it is of.
#[derive(Debug, Clone, Args)]
pub struct BackupTarget {
    /// A directory (on another disk) or `s3://bucket[/prefix]` (endpoint and credentials
    /// from the `AWS_*` variables).
    #[arg(long, env = "HOLDFAST_BACKUP", value_name = "DIR|s3://BUCKET[/PREFIX]")]
    pub backup: String,
    /// The store backed up: the SQLite file in `--data-dir`, or the PostgreSQL server of
    /// `--backend postgres --database-url` (the backup's run files, and a bucket's spool, go
    /// in `--data-dir`).
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Clone, Subcommand)]
pub enum BackupCommand {
    /// Replicate the store to the target continuously (every second), until SIGTERM: beside
    /// `holdfast serve` in production; `holdfast up --backup` runs the same.
    Run {
        #[command(flatten)]
        target: BackupTarget,
    },
    /// Ship every committed change to the target now, and wait until it is there.
    Now {
        #[command(flatten)]
        target: BackupTarget,
    },
    /// One line: is the continuous backup running, and when did it last reach the target.
    /// Exit 1 unless it is running to this target and proved within `--stale-after`: the
    /// check to alert on where no `holdfast up` exports the backup's metric.
    Status {
        #[command(flatten)]
        target: BackupTarget,
        #[arg(long, value_parser = parse_duration, default_value = "30s")]
        stale_after: Duration,
    },
    /// The moments the target can restore: its snapshots and its newest change.
    List {
        #[command(flatten)]
        target: BackupTarget,
    },
}

/// `holdfast restore`.
#[derive(Debug, Clone, Args)]
pub struct RestoreArgs {
    /// The backup to restore from (as given to `holdfast up --backup`).
    #[arg(long, env = "HOLDFAST_BACKUP", value_name = "DIR|s3://BUCKET[/PREFIX]")]
    pub backup: String,
    /// A new or empty directory; it becomes a data dir (`holdfast up --data-dir DIR`).
    #[arg(long)]
    pub to: PathBuf,
    /// The moment to return to (RFC 3339, e.g. `2026-11-30T02:15:00Z`); the newest change
    /// the backup holds by default.
    #[arg(long)]
    pub at: Option<String>,
    /// Then reconcile with this payment provider (`holdfast reconcile`): charges for orders
    /// the restore lost are refunded before anyone serves the restored store.
    #[arg(long, env = "HOLDFAST_PROVIDER_URL")]
    pub provider_url: Option<String>,
}

/// Where to push the figures for Graphite (see `graphite.rs`); off unless `--graphite` is given.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Graphite")]
pub struct GraphiteArgs {
    /// Push every figure `/metrics` serves to this carbon's plaintext port, e.g.
    /// `graphite.internal:2003`.
    #[arg(long, value_name = "HOST:PORT")]
    pub graphite: Option<String>,
    /// How often to push.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub graphite_every: Duration,
    /// The first level of every path.
    #[arg(long, default_value = "holdfast")]
    pub graphite_prefix: String,
}

impl GraphiteArgs {
    /// The same flags, for a child process `up` starts.
    pub fn to_args(&self) -> Vec<OsString> {
        let Some(target) = &self.graphite else {
            return Vec::new();
        };
        vec![
            "--graphite".into(),
            target.into(),
            "--graphite-every".into(),
            format!("{}ms", self.graphite_every.as_millis()).into(),
            "--graphite-prefix".into(),
            self.graphite_prefix.clone().into(),
        ]
    }
}

/// Set (`true`), `holdfast serve` runs as the release from before the change `cart_lines`.
pub const AS_OLD_RELEASE_ENV: &str = "HOLDFAST_AS_OLD_RELEASE";

/// `holdfast migrate`.
#[derive(Debug, Subcommand)]
pub enum MigrateCommand {
    /// Per schema: applied, pending and unknown migrations (a table; `--json`).
    Status(JobsList),
    /// The SQL `up` would run on this engine, in order, without running it.
    Plan(StoreOnly),
    /// squawk over every migration as `up` runs it on Postgres (guard first, in one
    /// transaction), plus FILES (a migration being written); fails on a warning without an
    /// excuse (`-- squawk-ignore RULE` above the statement, or the released files' EXCUSES).
    Lint {
        /// More migration files to check, written as the migrations are (SQLite spelling).
        files: Vec<PathBuf>,
    },
    /// UNDO a schema's migrations above `--to`, newest first, in one guarded transaction —
    /// what they created is DROPPED with its data. For rolling back a deploy, with the build
    /// that applied them.
    Down {
        #[command(flatten)]
        store: StoreArgs,
        /// Which schema (`store` or `shop`).
        #[arg(long)]
        schema: String,
        /// Keep migrations up to this version, or this applied phase (`expand`, …); undo those
        /// above it (0: all of the schema's).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        guard: GuardArgs,
    },
    /// Apply the pending migrations, each step guarded (see `--lock-timeout`): without `--to`,
    /// all of them short of a contract (a contract is one-way: name it once no older build
    /// runs).
    Up {
        #[command(flatten)]
        store: StoreArgs,
        /// Stop after this step: a phase of the next pending expand/contract change (`expand`,
        /// `backfill`, `switch-reads`, `switch-writes`, `contract`), or a version of `--schema`.
        #[arg(long)]
        to: Option<String>,
        /// The schema `--to VERSION` counts in (`store` or `shop`).
        #[arg(long)]
        schema: Option<String>,
        #[command(flatten)]
        guard: GuardArgs,
    },
}

/// The bounds `holdfast migrate up` runs within.
#[derive(Debug, Clone, Args)]
pub struct GuardArgs {
    /// Longest any statement waits for a lock (Postgres `lock_timeout`) before the run is
    /// rolled back and retried: nothing queues behind a migration longer than this.
    #[arg(long, value_parser = parse_duration, default_value = "500ms")]
    pub lock_timeout: Duration,
    /// Longest any statement may run (Postgres `statement_timeout`).
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub statement_timeout: Duration,
    /// How long to keep retrying before giving up and saying who holds the lock.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub deadline: Duration,
    /// Rows a backfill copies per transaction.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub batch_rows: i64,
    /// Pause between backfill batches (throttle).
    #[arg(long, value_parser = parse_duration, default_value = "20ms")]
    pub batch_pause: Duration,
}

/// `holdfast balance`.
#[derive(Debug, Clone, Args)]
pub struct BalanceArgs {
    /// Where clients connect.
    #[arg(long, default_value_t = SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)))]
    pub addr: SocketAddr,
    /// The operator endpoints (`/ops/upstreams`, `/ops/metrics`, the `/ops` page): keep this
    /// off the public network.
    #[arg(long, default_value_t = SocketAddr::from((Ipv4Addr::LOCALHOST, 8081)))]
    pub ops_addr: SocketAddr,
    /// A web instance's public `host:port` (repeatable); a name with several addresses (a
    /// service with replicas) stands for all of them.
    #[arg(long = "upstream", value_name = "HOST:PORT", required = true)]
    pub upstreams: Vec<String>,
    /// How often upstream names are resolved again, to follow replicas that come and go.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub resolve_every: Duration,
    /// Requests per second one client address may send (bursts of twice that); 0: no limit.
    #[arg(long, default_value_t = 50)]
    pub client_rate: u32,
    #[command(flatten)]
    pub graphite: GraphiteArgs,
}

/// `holdfast probe`.
#[derive(Debug, Clone, Args)]
pub struct ProbeArgs {
    /// E.g. `http://127.0.0.1:9090/readyz`.
    pub url: String,
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub timeout: Duration,
}

/// `holdfast drill`. Exits 0 only when every invariant in docs/INVARIANTS.md held.
#[derive(Debug, Clone, Args)]
pub struct DrillArgs {
    /// The durable store of the drilled system; `postgres` runs a throwaway cluster of its own
    /// (initdb/pg_ctl; see scripts/install-drill-deps.sh).
    #[arg(long, value_parser = parse_backend, default_value = "sqlite")]
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
    /// Drill a deliberately broken build (no-idempotency, ack-before-commit, ledger-bypass);
    /// the drill must then fail (a self-test).
    #[arg(long, value_parser = parse_sabotage)]
    pub sabotage: Option<Sabotage>,
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
    /// Where the verdict is recorded for `holdfast status` (`run/last-drill.json`); the
    /// drilled system itself always runs in a temporary directory.
    #[arg(long, default_value = "./holdfast-data")]
    pub data_dir: PathBuf,
    /// Do not run Prometheus with the shipped alert rules beside the drill (by default it
    /// does wherever `prometheus` is installed, and judges the alerts each fault raises).
    #[arg(long)]
    pub no_alerts: bool,
    /// Start the users spread evenly over this long (default: all at once).
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub ramp_up: Duration,
}

/// `sqlite` or `postgres`.
fn parse_backend(s: &str) -> Result<Backend, String> {
    s.parse()
}

/// A [`Sabotage`] by name.
fn parse_sabotage(s: &str) -> Result<Sabotage, String> {
    s.parse()
}

/// Where the durable store lives; shared by `up` and `serve`.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Which database engine holds the durable state: sqlite or postgres.
    #[arg(long, value_parser = parse_backend, default_value = "sqlite")]
    pub backend: Backend,
    /// Local state: the SQLite file (`holdfast.sqlite`) and `run/instances.json`.
    #[arg(long, default_value = "./holdfast-data")]
    pub data_dir: PathBuf,
    /// `postgres://…` (required for `--backend postgres`) or `sqlite:PATH` (instead of the file
    /// in `--data-dir`). Without it, `DATABASE_URL` is used if it names the chosen backend.
    #[arg(long)]
    pub database_url: Option<String>,
    /// SQLite: leave WAL checkpoints to the continuous backup (`holdfast backup run`), which
    /// must then run on this database; every process on it needs the flag. `up --backup`
    /// sets it for its processes.
    #[arg(long)]
    pub backup_checkpoints: bool,
    /// PostgreSQL, a URL of several hosts: a standby further behind the primary than this is
    /// not read from (under the read-your-writes token's 60 s).
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub replica_max_lag: Duration,
    /// PostgreSQL, a URL of several hosts: how long a read after the reader's own write
    /// waits for a standby to replay it before the primary serves it instead.
    #[arg(long, value_parser = parse_duration, default_value = "50ms")]
    pub replica_wait: Duration,
    /// Connections each process may open beyond its pool's 8 while its connections are held
    /// long on average (a slow link to the database: the same work needs more connections
    /// at once). Counts against the server's connection limit; 0 turns it off.
    #[arg(long, env = "HOLDFAST_DB_SURPLUS_CONNECTIONS", default_value_t = 4)]
    pub db_surplus_connections: u32,
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
    /// The lease written with a key's claim: how soon a retry takes over a claim committed on
    /// its own, as a build before claims moved into the work's transaction left them
    /// (default 1s).
    #[arg(long, value_parser = parse_duration)]
    pub idempotency_lock_ttl: Option<Duration>,
    /// Server-side deadline for one request, e.g. `10s`.
    #[arg(long, value_parser = parse_duration)]
    pub request_timeout: Option<Duration>,
    /// After SIGTERM, how long to keep serving with /readyz at 503 so balancers notice.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub drain_delay: Duration,
    /// A proxy whose `X-Forwarded-For` names the client, for per-address rate limits
    /// (repeatable; unset: loopback, where `up`'s balancer runs).
    #[arg(long = "trusted-proxy", value_name = "IP")]
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Expose `/bench/*` routes, for `holdfast bench` only.
    #[arg(long, hide = true)]
    pub bench_routes: bool,
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
    /// Where video reviews' bytes go: a directory (default: `uploads` in `--data-dir`, which
    /// every instance of one machine shares) or `s3://bucket[/prefix]` for a fleet that
    /// shares no disk (endpoint, region and credentials from the `AWS_*` environment).
    #[arg(long, value_name = "DIR|s3://BUCKET[/PREFIX]")]
    pub uploads: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SessionMode {
    Store,
    Redis,
    Cookie,
}

/// SABOTAGE, for tests and drills only: `--unsafe-sabotage KIND` breaks the system on purpose
/// (see `holdfast_core::Sabotage`). `up` passes it to its web instances and workers; each
/// applies what concerns it.
#[derive(Debug, Clone, Default, Args)]
pub struct SabotageArgs {
    #[arg(long, value_parser = parse_sabotage, hide = true)]
    pub unsafe_sabotage: Option<Sabotage>,
}

impl SabotageArgs {
    pub fn to_args(&self) -> Vec<OsString> {
        match self.unsafe_sabotage {
            Some(kind) => vec!["--unsafe-sabotage".into(), kind.name().into()],
            None => Vec::new(),
        }
    }
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
        for ip in &self.trusted_proxies {
            args.extend(["--trusted-proxy".into(), ip.to_string().into()]);
        }
        if self.bench_routes {
            args.push("--bench-routes".into());
        }
        if let Some(uploads) = &self.uploads {
            args.extend(["--uploads".into(), uploads.into()]);
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
    /// Port of the operator endpoints (`/ops/instances`, `/ops/upstreams`, `/ops/stats`), on
    /// 127.0.0.1 only, never on the public port (0 picks a free one).
    #[arg(long, default_value_t = 8081)]
    pub ops_port: u16,
    /// Requests per second one client address may send through the balancer (bursts of
    /// twice that); a request over it waits up to a second for its turn, then gets 429.
    /// 0 turns the limit off.
    #[arg(long, default_value_t = 50)]
    pub client_rate: u32,
    /// SIGKILL a web instance whose liveness probe has gone unanswered this long (stopped,
    /// hung); the supervisor starts another. A stopped process keeps its locks — on SQLite,
    /// the database's write lock — so waiting for it can stall everyone. 0s: never.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    pub kill_unresponsive_after: Duration,
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
    #[command(flatten)]
    pub sabotage: SabotageArgs,
    #[command(flatten)]
    pub graphite: GraphiteArgs,
    /// Back the store up continuously to this directory or `s3://bucket[/prefix]` (see
    /// `holdfast backup`).
    #[arg(long, value_name = "DIR|s3://BUCKET[/PREFIX]")]
    pub backup: Option<String>,
    /// Start the web instances as the release from before the change `cart_lines` (and
    /// migrate only as far as it knows). `run/as-old-release` in the data dir says `true`;
    /// write `false` there and drain the instances one by one (`holdfast roll`) to deploy this
    /// release over it, as the `migrate` drill does.
    #[arg(long)]
    pub as_old_release: bool,
    /// With `--backend postgres` and no `--database-url`: run a throwaway PostgreSQL primary
    /// and a streaming standby of it (`pg_basebackup -R`), gone when `up` stops, and give
    /// the instances both hosts, so order history and the catalog are read from the standby
    /// (a local try of what a URL naming several hosts does in production).
    #[arg(long)]
    pub replica: bool,
}

/// How each worker behaves. `worker` takes them; `up` passes them on to its workers.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Worker options")]
pub struct JobArgs {
    /// Jobs of each queue one worker runs at once. More lets a worker's settlements share
    /// more commits and takes more of the machine from the requests. At 32 the two workers
    /// `up` starts keep up with a checkout benchmark at full load on either engine; at 16
    /// their jobs fell behind (docs/PERFORMANCE.md).
    #[arg(long, env = "HOLDFAST_JOB_CONCURRENCY", default_value_t = 32)]
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
}

impl JobArgs {
    pub fn to_args(&self) -> Vec<OsString> {
        vec![
            "--job-concurrency".into(),
            self.job_concurrency.to_string().into(),
            "--job-lease".into(),
            format!("{}ms", self.job_lease.as_millis()).into(),
            "--job-retry-base".into(),
            format!("{}ms", self.job_retry_base.as_millis()).into(),
            "--provider-timeout".into(),
            format!("{}ms", self.provider_timeout.as_millis()).into(),
        ]
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
    #[command(flatten)]
    pub sabotage: SabotageArgs,
    /// Do not export the queue depth (`holdfast_jobs`): something else counts it once for the
    /// fleet (`up` does, on its operator port, and passes this to its workers).
    #[arg(long)]
    pub no_queue_metrics: bool,
    #[command(flatten)]
    pub graphite: GraphiteArgs,
    /// Apply pending migrations on start instead of refusing a database that lacks them.
    #[arg(long)]
    pub migrate: bool,
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
    Stats(JobsList),
    /// List dead jobs.
    Dead(JobsList),
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

/// `holdfast roll`.
#[derive(Debug, Clone, Args)]
pub struct RollArgs {
    /// The data dir of the `holdfast up` to roll.
    #[arg(long, default_value = "./holdfast-data")]
    pub data_dir: PathBuf,
    /// How long one process may take to be replaced (and, for a web instance, for every
    /// instance to be ready again) before the roll aborts.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub step_timeout: Duration,
    /// A pause between steps, to let figures settle.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub pause: Duration,
    /// Refuse to take the next step while the data dir's filesystem has less than this share
    /// free (percent): a replacement that cannot write its database or logs is worse than
    /// the instance it replaces.
    #[arg(long, default_value_t = 5.0)]
    pub min_free_disk: f64,
}

/// An operator listing: a table for people, `--json` for machines.
#[derive(Debug, Clone, Args)]
pub struct JobsList {
    #[command(flatten)]
    pub store: StoreArgs,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free one (see the `HOLDFAST_LISTENING` line).
    #[arg(long, default_value_t = SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)))]
    pub addr: SocketAddr,
    /// Where `/metrics` (and `/healthz`, `/readyz`) are served for operators: keep it off the
    /// public network. Port 0 picks a free one (reported as `ops=` on the listening line).
    #[arg(long, default_value_t = SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))]
    pub ops_addr: SocketAddr,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Omit the cookies' `Secure` flag (plain-HTTP localhost only).
    #[arg(long)]
    pub insecure_cookies: bool,
    #[command(flatten)]
    pub instance: InstanceArgs,
    #[command(flatten)]
    pub sabotage: SabotageArgs,
    #[command(flatten)]
    pub graphite: GraphiteArgs,
    /// Apply pending migrations on start (under the default guard) instead of refusing a
    /// database that lacks them: for a lone instance. A fleet runs `holdfast migrate up` once.
    #[arg(long)]
    pub migrate: bool,
    /// Run as the release from before the change `cart_lines` (shop schema version 1: carts
    /// only in `cart_items`): the old binary of a rolling deploy, which the `migrate` drill
    /// serves beside this one. It refuses a database past the change's contract.
    #[arg(long, env = AS_OLD_RELEASE_ENV)]
    pub as_old_release: bool,
    /// Set by `up`: the supervisor's pid; this instance dies with it (Linux).
    #[arg(long, hide = true)]
    pub parent_pid: Option<i32>,
}

/// `500ms`, `20s`, `30m`, `12h`, `7d`: one whole number and one unit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    holdfast_core::parse_duration(s)
}

#[cfg(test)]
mod tests {
    use super::*;

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
