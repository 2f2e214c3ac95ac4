//! `holdfast drill`: a game day in one command.
//!
//! Resilience claims are only worth the bad day that tested them. A drill brings a whole
//! Holdfast up in a temporary directory (on Postgres, with a throwaway cluster of its own behind
//! an in-process fault proxy, so it may restart and cut a database nobody else uses), drives
//! virtual shoppers through the public HTTP API, injects a seeded schedule of faults (SIGKILL,
//! SIGSTOP, SIGTERM of instances and workers, database restarts, latency and partitions,
//! provider timeouts), and then judges the run like Jepsen does: every client operation is
//! recorded as invoked and then ok, failed or unknown, and a pure [`checker`] compares that
//! history with the final state read back through the API and the payment provider against
//! the invariants in `docs/INVARIANTS.md`.
//!
//! Architecture Invariant: the drill knows the system only as a client and through the OS.
//! It speaks HTTP to the balancer and the provider, reads `run/instances.json`, sends signals
//! and drives the fault proxy; it never opens the store or links the server's crates, so it can
//! judge any build honestly — including the deliberately broken ones `--sabotage` starts, which
//! the drill must fail (that is how we know the checker can see what it claims to check).
//!
//! ```text
//! run ─► System::start (tempdir, [initdb+pg_ctl, FaultProxy], holdfast up)
//!     ─► users::drive ‖ faults::inject ‖ progress line        (for --duration)
//!     ─► clear faults, settle (payouts drain), users::final_state
//!     ─► System::stop ─► checker::check ─► Report
//! ```

mod abuse;
pub mod alerts;
pub mod checker;
pub mod failover;
pub mod faults;
pub mod migration;
pub mod report;
pub mod restore;
pub mod system;
pub mod uploads;
mod users;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::JoinSet;

pub use faults::{FaultKind, FaultSet};
pub use holdfast_core::{Backend, Sabotage};
pub use report::Report;
pub use system::{
    port_for_a_child, Cluster, Database, Instance, System, SystemSpec, KEYS_FILE_ENV,
};

use crate::faults::Rng;

/// Where the drilled system keeps sessions (`holdfast up --sessions`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sessions {
    /// The durable store's sessions table.
    Store,
    /// Redis (the drill's own `redis-server`, on a free port) with the store as backstop.
    Redis,
    /// Signed cookies; the drill generates the key ring (and rotates it with `rotate-keys`).
    Cookie,
}

impl Sessions {
    pub fn name(self) -> &'static str {
        match self {
            Sessions::Store => "store",
            Sessions::Redis => "redis",
            Sessions::Cookie => "cookie",
        }
    }
}

/// The invariant a sabotaged build must break (a drill that misses it is itself broken).
pub fn expected_violation(sabotage: Sabotage) -> &'static str {
    match sabotage {
        Sabotage::NoIdempotency => "orders_duplicated",
        Sabotage::AckBeforeCommit => "orders_lost",
        Sabotage::LedgerBypass => "charges_duplicated",
        Sabotage::CorruptBackup => "restore_failed",
    }
}

/// Everything one drill needs to know.
#[derive(Clone, Debug)]
pub struct DrillOptions {
    /// The `holdfast` executable to run `up` from (the CLI passes its own).
    pub program: PathBuf,
    pub backend: Backend,
    pub sessions: Sessions,
    /// When set, `restart-redis` is not scattered by the seed but placed every this often
    /// (from this far into the load, while the load runs), and implied by the fault list.
    pub restart_redis_every: Option<Duration>,
    /// A pause (± 50%, seeded) before each of a user's requests after login, so many users are
    /// active sessions rather than a stress test; zero keeps the closed loop tight.
    pub think: Duration,
    /// Users start spread evenly over this long (signup and login hash passwords: 500 users
    /// logging in in the same second would measure argon2, not the drill).
    pub ramp_up: Duration,
    /// How long virtual users shop; faults fall inside it. Setup, settling and the final
    /// reads come on top.
    pub duration: Duration,
    /// Concurrent virtual users, each a closed loop.
    pub users: usize,
    pub instances: u16,
    pub workers: u16,
    pub faults: FaultSet,
    /// Seeds the fault schedule and every user's choices; the report names it.
    pub seed: u64,
    pub sabotage: Option<Sabotage>,
    /// A live progress line on stderr.
    pub progress: bool,
    /// Where the system's own log (stderr of `holdfast up` and its processes) goes; by default
    /// into the temporary directory, which is deleted at the end.
    pub system_log: Option<PathBuf>,
    /// Where to write the history (JSON Lines: one `invoke` and one `ok`/`fail`/`info` event
    /// per operation, in time order), for digging into a violation.
    pub history: Option<PathBuf>,
    /// Run a Prometheus with the shipped alert rules and judge the alerts (see `alerts.rs`);
    /// skipped, and said so in the report, where there is no `prometheus`.
    pub alerts: bool,
}

impl DrillOptions {
    /// Defaults for `program`: 60 s, SQLite, 32 users, 3 instances, 2 workers, all faults.
    pub fn new(program: PathBuf, seed: u64) -> Self {
        DrillOptions {
            program,
            backend: Backend::Sqlite,
            sessions: Sessions::Store,
            restart_redis_every: None,
            think: Duration::ZERO,
            ramp_up: Duration::ZERO,
            duration: Duration::from_secs(60),
            users: 32,
            instances: 3,
            workers: 2,
            faults: FaultSet::all(),
            seed,
            sabotage: None,
            progress: false,
            system_log: None,
            history: None,
            alerts: true,
        }
    }
}

/// Why a drill could not be run (as opposed to a drill that ran and failed its invariants,
/// which is a [`Report`] whose verdict is `fail`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A prerequisite is missing or a setting is unusable; the message says what to do.
    #[error("{0}")]
    Setup(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The throwaway Postgres cluster would not do what it was told.
    #[error("postgres: {0}")]
    Postgres(String),
    /// The drill's own redis-server would not do what it was told.
    #[error("redis: {0}")]
    Redis(String),
    /// `holdfast up` did not come up.
    #[error("the system did not start: {0}")]
    Start(String),
    #[error("fault proxy: {0}")]
    FaultProxy(#[from] holdfast_faultproxy::Error),
    #[error("interrupted; the system was stopped and its directory removed")]
    Interrupted,
}

impl Error {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

/// Runs one drill and returns its report. Ctrl-C stops it early: the system is torn down
/// (processes stopped, the throwaway cluster stopped, the directory removed) and
/// [`Error::Interrupted`] returned.
pub async fn run(opts: DrillOptions) -> Result<Report, Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(Error::io("handling SIGTERM"))?;
    tokio::select! {
        report = drill(opts) => report,
        _ = tokio::signal::ctrl_c() => Err(Error::Interrupted),
        _ = term.recv() => Err(Error::Interrupted),
    }
}

async fn drill(opts: DrillOptions) -> Result<Report, Error> {
    if opts.users == 0 || opts.instances == 0 {
        return Err(Error::Setup(
            "--users and --instances must be at least 1".into(),
        ));
    }
    let mut rng = Rng::new(opts.seed);
    let schedule = faults::schedule(&opts, &mut rng);
    let started_setup = Instant::now();
    let mut sys = System::start(&SystemSpec {
        program: opts.program.clone(),
        database: match opts.backend {
            Backend::Sqlite => Database::Sqlite,
            Backend::Postgres => Database::ThrowawayPostgres,
        },
        instances: opts.instances,
        workers: opts.workers,
        sessions: opts.sessions,
        sabotage: opts.sabotage,
        // The migration drill starts from the release before the change it runs.
        up_args: if opts.faults.0.contains(&FaultKind::Migrate) {
            vec!["--as-old-release".into()]
        } else {
            Vec::new()
        },
        system_log: opts.system_log.clone(),
        lose_primary: opts.faults.0.contains(&FaultKind::LosePrimary)
            || opts.sabotage == Some(Sabotage::CorruptBackup),
        standby: schedule
            .planned
            .iter()
            .any(|p| matches!(p.kind, FaultKind::PromoteStandby | FaultKind::FailReplica)),
    })
    .await?;
    let prometheus = if opts.alerts {
        alerts::Prometheus::start(&sys.ops_url, sys.data_dir())
            .await
            .map_err(Error::Setup)?
    } else {
        None
    };
    let setup = started_setup.elapsed();

    let load_started = std::time::SystemTime::now();
    let clock = users::Clock::start();
    let load = users::Load::new(&sys.url, clock, opts.duration, opts.think)?;
    let live = load.live();
    let mut tasks = JoinSet::new();
    let mut faults = Task(tokio::spawn(faults::inject(
        schedule.planned.clone(),
        sys.control(),
        clock,
    )));
    let sampler = {
        let ctl = sys.control();
        Task(tokio::spawn(async move {
            let pids = || ctl.instances("web").into_iter().map(|i| i.pid).collect();
            ctl.observed().sample_rss(pids).await
        }))
    };
    let payouts = {
        let (ctl, ops_url) = (sys.control(), sys.ops_url.clone());
        Task(tokio::spawn(async move {
            ctl.observed()
                .sample_payouts(&ops_url, || clock.ms() / 1000)
                .await
        }))
    };
    let progress = opts.progress.then(|| {
        let live = live.clone();
        Task(tokio::spawn(users::progress(
            live,
            sys.control(),
            clock,
            opts.duration,
        )))
    });
    // A lost node whose restore failed will not come back: the users stop instead of
    // retrying into nothing until the load's end.
    let _gone = {
        let (ctl, live) = (sys.control(), live.clone());
        Task(tokio::spawn(async move {
            loop {
                if ctl.restore().is_some_and(|r| r.rto_ms == 0) {
                    live.give_up();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }))
    };
    for user in 0..opts.users {
        let start = opts.ramp_up.mul_f64(user as f64 / opts.users as f64);
        let shopper = load.clone().shopper(user, rng.fork(user as u64 + 1));
        tasks.spawn(async move {
            tokio::time::sleep(start).await;
            shopper.run().await
        });
    }
    let mut runs = Vec::with_capacity(opts.users);
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(run) => runs.push(run),
            Err(e) => return Err(Error::Start(format!("a virtual user crashed: {e}"))),
        }
    }
    let injected = match (&mut faults.0).await {
        Ok(injected) => injected,
        Err(e) => return Err(Error::Start(format!("the fault injector crashed: {e}"))),
    };
    let load_s = clock.elapsed().as_secs_f64();
    drop(sampler);
    drop(payouts);
    let observed = sys.control();
    let observed = observed.observed();
    if progress.is_some() {
        drop(progress);
        eprintln!();
    }

    // Everything healthy again, then let the workers catch up before judging.
    let mut notes = schedule.notes.clone();
    notes.extend(sys.control().clear_faults().await);
    runs.sort_by_key(|r| r.user);
    let accounts: Vec<users::AccountRun> = runs.iter().flat_map(|r| r.accounts.clone()).collect();
    let settle_started = Instant::now();
    if opts.progress {
        eprintln!("drill: load over; waiting for payouts and receipts to settle");
    }
    // A node that was lost and not restored has nothing left to settle or read back: every
    // account's final state is unreadable (and `restore_failed` says why).
    let node_gone = sys
        .control()
        .restore()
        .is_some_and(|r| r.rto_ms == 0 || !r.integrity_ok);
    let (mut fin, read_notes) = if node_gone {
        let note = "the node was lost and not restored: nothing was settled or read back";
        (checker::FinalState::default(), vec![note.to_owned()])
    } else {
        let sessions = load.sessions(&accounts).await;
        let cookies: Vec<_> = sessions.iter().map(|(_, s)| s.clone()).collect();
        let settled = load
            .settle(&cookies, &sys.provider_url, Duration::from_secs(90))
            .await;
        if !settled {
            notes.push(
                "payouts had not all settled after 90 s; the final state was read anyway".into(),
            );
        }
        load.final_state(&accounts, &sessions, &sys.provider_url)
            .await
    };
    let settle = settle_started.elapsed();
    let uploads = sys.control().uploads();
    if let Some(seen) = &uploads {
        fin.elsewhere.extend(seen.orders.iter().cloned());
    }
    let restore = sys.control().restore();
    let failover = sys.control().failover();
    fin.loss = restore
        .as_ref()
        .filter(|r| r.rto_ms > 0)
        .map(|r| checker::Loss {
            at_ms: r.lost_at_ms,
            window_ms: restore::LOSS_WINDOW_MS,
        })
        .or(failover.as_ref().map(|f| checker::Loss {
            at_ms: f.flipped_at_ms,
            window_ms: failover::LOSS_WINDOW_MS,
        }));
    notes.extend(read_notes);
    let alerts = match &prometheus {
        Some(prometheus) => match prometheus.firing(load_started).await {
            Ok(firing) => {
                let (fired, expected) = alerts::judge(&firing, &injected);
                alerts::Alerts {
                    status: "checked".into(),
                    time_compression: alerts::TIME_COMPRESSION,
                    fired,
                    expected,
                }
            }
            Err(why) => alerts::Alerts::not_checked(&format!("not checked: {why}")),
        },
        None if opts.alerts => alerts::Alerts::not_checked(
            "not checked: no prometheus on this machine (scripts/install-ops-tools.sh installs it)",
        ),
        None => alerts::Alerts::not_checked("not checked: --no-alerts"),
    };
    if let Some(prometheus) = prometheus {
        prometheus.stop().await;
    }
    notes.extend(sys.stop().await);

    let histories: Vec<checker::AccountHistory> = accounts
        .iter()
        .map(|a| checker::AccountHistory {
            email: a.email.clone(),
            ops: a.ops.clone(),
        })
        .collect();
    if let Some(path) = &opts.history {
        write_history(path, &histories)?;
    }
    let mut verdict = checker::check(&histories, &fin);
    let applied = injected.iter().filter(|f| f.applied).count();
    alerts.judge_into(&mut verdict, applied);
    if let Some(seen) = &uploads {
        verdict.add_upload_violations(uploads::judge(seen));
    }
    if let Some(seen) = restore
        .as_ref()
        .filter(|r| r.rto_ms == 0 || !r.integrity_ok)
    {
        verdict.add_restore_failure(format!(
            "the node lost at {:.1} s was not restored: {}",
            seen.lost_at_ms as f64 / 1000.0,
            seen.restore_said
        ));
    }
    let active_users = runs
        .iter()
        .filter(|r| r.accounts.iter().any(|a| a.ever_logged_in()))
        .count();
    let samples: Vec<users::Sample> = runs
        .iter()
        .flat_map(|r| r.samples.iter().copied())
        .collect();
    Ok(report::build(report::Inputs {
        opts: &opts,
        setup,
        load_s,
        settle,
        samples: &samples,
        injected: &injected,
        skipped: &schedule.skipped,
        verdict,
        notes,
        active_users,
        flood: observed.flood(),
        slow_clients: observed.slow(),
        peak_rss_kb: observed.peak_rss_kb(),
        payouts_waiting: observed.payouts_waiting(),
        alerts,
        migration: sys.control().migration(),
        uploads,
        restore,
        failover: failover.map(|seen| {
            let back = writes_back_ms(&histories, seen.flipped_at_ms);
            (seen, back)
        }),
        replica_lost: sys.control().replica_lost(),
    }))
}

/// The flip → the first order acknowledged that was asked for after it (ms), if any was.
fn writes_back_ms(histories: &[checker::AccountHistory], flipped_at_ms: u64) -> Option<u64> {
    histories
        .iter()
        .flat_map(|h| &h.ops)
        .filter(|op| matches!(op.kind, checker::OpKind::Checkout { .. }))
        .filter(|op| matches!(op.outcome, checker::Outcome::Ok { .. }))
        .filter(|op| op.invoked_ms >= flipped_at_ms)
        .map(|op| op.completed_ms - flipped_at_ms)
        .min()
}

/// A spawned task that is aborted when dropped, so an interrupted drill leaves none behind.
struct Task<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The history as Jepsen writes it: an `invoke` event when an operation started and an `ok`,
/// `fail` or `info` (unknown) event when it completed, all in time order.
fn write_history(
    path: &std::path::Path,
    histories: &[checker::AccountHistory],
) -> Result<(), Error> {
    use checker::Outcome;
    let mut events: Vec<(u64, u8, serde_json::Value)> = Vec::new();
    for h in histories {
        for op in &h.ops {
            let kind = serde_json::to_value(&op.kind).unwrap_or_default();
            let invoke = serde_json::json!({ "type": "invoke", "t_ms": op.invoked_ms, "account": h.email, "f": kind });
            let (type_, value) = match &op.outcome {
                Outcome::Ok { seen } => ("ok", serde_json::to_value(seen).unwrap_or_default()),
                Outcome::Fail { status, problem } => (
                    "fail",
                    serde_json::json!({ "status": status, "problem": problem }),
                ),
                Outcome::Unknown { reason } => ("info", serde_json::json!({ "reason": reason })),
            };
            let done = serde_json::json!({ "type": type_, "t_ms": op.completed_ms, "account": h.email, "f": kind, "value": value });
            events.push((op.invoked_ms, 0, invoke));
            events.push((op.completed_ms, 1, done));
        }
    }
    events.sort_by_key(|(t, order, _)| (*t, *order));
    let mut out = String::new();
    for (_, _, e) in events {
        out.push_str(&e.to_string());
        out.push('\n');
    }
    std::fs::write(path, out).map_err(Error::io(format!("writing {}", path.display())))
}

/// Whether stderr is a terminal (the progress line then rewrites itself in place).
pub(crate) fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}
