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
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Checkout requests/s through the balancer, with and without the idempotency layer.
    Checkout(BenchArgs),
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
        args
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
