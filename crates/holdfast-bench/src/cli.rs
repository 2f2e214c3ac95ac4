//! The bench binary's command line: one subcommand per benchmark.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use holdfast_core::Backend;

#[derive(Debug, Parser)]
#[command(
    name = "holdfast-bench",
    version,
    about = "Side-by-side benchmarks of Holdfast against its peers (long runs that do not belong in the test suite)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: BenchCommand,
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
    /// Uploads: tus MB/s of `holdfast serve` vs @tus/server (file store) and vs the raw disk,
    /// and the instance's peak memory for one large upload.
    Uploads(BenchUploadsArgs),
    /// Restore: checkout throughput with the continuous backup vs without, restore time of a
    /// large store vs copying its backup, and RPO/RTO from lose-primary drills.
    Restore(BenchRestoreArgs),
    /// Replica: order-history and catalog reads/s with a streaming standby in rotation vs the
    /// primary alone, and what the read-your-writes check adds to a read after a write.
    Replica(BenchReplicaArgs),
}

/// What the benches that run `holdfast up` under shoppers, phase against phase, share.
#[derive(Debug, Clone, Args)]
pub struct FleetPhases {
    #[arg(long, default_value_t = 3)]
    pub instances: u16,
    /// Concurrent shoppers.
    #[arg(long, default_value_t = 32)]
    pub users: usize,
    /// Measured time per phase.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Phases per side, taking turns at going first; the medians are compared.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// The `holdfast` executable (default: the one built beside this binary).
    #[arg(long)]
    pub program: Option<PathBuf>,
}

impl FleetPhases {
    /// The `holdfast` executable to run.
    pub fn program(&self) -> anyhow::Result<PathBuf> {
        match &self.program {
            Some(p) => Ok(p.clone()),
            None => crate::sibling("holdfast"),
        }
    }

    /// `bench checkout`'s arguments for one system of these (its engine given apart).
    pub fn system(&self, program: &std::path::Path) -> BenchArgs {
        BenchArgs {
            db: BenchDb {
                backend: None,
                database_url: None,
            },
            instances: self.instances,
            workers: 2,
            users: self.users,
            duration: self.duration,
            json: None,
            program: Some(program.to_owned()),
            baseline: None,
            rounds: 1,
            peers: false,
        }
    }
}

/// `holdfast bench replica`.
#[derive(Debug, Clone, Args)]
pub struct BenchReplicaArgs {
    #[command(flatten)]
    pub phases: FleetPhases,
    /// Shoppers in the read-your-writes check's part.
    #[arg(long, default_value_t = 4)]
    pub check_users: usize,
    /// `up --replica-wait` in the read-your-writes check's part.
    #[arg(long, value_parser = parse_duration, default_value = "50ms")]
    pub replica_wait: Duration,
}

/// `holdfast bench restore`.
#[derive(Debug, Clone, Args)]
pub struct BenchRestoreArgs {
    /// The engine: sqlite (Litestream) or postgres (a throwaway cluster of the bench's own,
    /// backed up by base backup and WAL).
    #[arg(long, value_parser = parse_backend, default_value = "sqlite")]
    pub backend: Backend,
    /// The store to back up and restore, MiB.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// `holdfast drill --faults lose-primary` runs for RPO and RTO under load.
    #[arg(long, default_value_t = 3)]
    pub drills: usize,
    /// The overhead phases.
    #[command(flatten)]
    pub phases: FleetPhases,
}

/// `holdfast bench uploads`.
#[derive(Debug, Clone, Args)]
pub struct BenchUploadsArgs {
    /// The one large upload, MiB.
    #[arg(long, default_value_t = 256)]
    pub big_mib: usize,
    /// Uploads sent at once, each of `--small-mib`.
    #[arg(long, default_value_t = 16)]
    pub concurrent: usize,
    #[arg(long, default_value_t = 16)]
    pub small_mib: usize,
    /// Bytes per PATCH, MiB (the same for both servers).
    #[arg(long, default_value_t = 8)]
    pub chunk_mib: usize,
    /// Rounds; the servers take turns going first.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// One upload of this many MiB to a fresh instance, for its peak memory (0: skip).
    #[arg(long, default_value_t = 1024)]
    pub rss_mib: usize,
    /// Where the servers keep their files (default: the current directory's disk).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The `holdfast` executable (default: the one beside this binary).
    #[arg(long)]
    pub program: Option<PathBuf>,
    /// Also write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
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
    #[command(flatten)]
    pub db: BenchDb,
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
    #[command(flatten)]
    pub db: BenchDb,
    #[arg(long, default_value_t = 3)]
    pub instances: u16,
    /// Job workers beside the instances (`up --workers`). With 0 every job waits, and what is
    /// measured is the requests alone.
    #[arg(long, default_value_t = 2)]
    pub workers: u16,
    /// Concurrent shoppers, each in a closed loop.
    #[arg(long, default_value_t = 32)]
    pub users: usize,
    /// Measured time per phase.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Also write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// The `holdfast` executable to measure (default: the one built beside this binary).
    #[arg(long)]
    pub program: Option<PathBuf>,
    /// Another `holdfast` executable (an earlier build) to measure in the same run, system
    /// for system, so the two figures share the machine's weather.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Measure each build this many times per backend, taking turns at going first; with
    /// `--baseline` the medians are compared.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Also measure, in the same run, a bare checkout (the shop's SQL in a minimal axum
    /// handler, no Holdfast layers) and, on Postgres, pgbench TPC-B on the same server and
    /// the keyed checkout with +200±50 ms per database round trip (the drill's slow-db).
    #[arg(long)]
    pub peers: bool,
}

/// Which engines a benchmark runs on.
#[derive(Debug, Clone, Args)]
pub struct BenchDb {
    /// One backend; both when omitted (Postgres needs --database-url or DATABASE_URL).
    #[arg(long, value_parser = parse_backend)]
    pub backend: Option<Backend>,
    /// A Postgres server to create throwaway benchmark databases on (one per system).
    #[arg(long)]
    pub database_url: Option<String>,
}

impl BenchDb {
    /// The engines asked for, in the order they run.
    pub fn backends(&self) -> Vec<Backend> {
        match self.backend {
            Some(b) => vec![b],
            None => Backend::ALL.to_vec(),
        }
    }
}

/// `sqlite` or `postgres`.
fn parse_backend(s: &str) -> Result<Backend, String> {
    s.parse()
}

/// `500ms`, `20s`, `30m`: one whole number and one unit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    holdfast_core::parse_duration(s)
}
