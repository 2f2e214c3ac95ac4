//! `holdfast up`: the whole system on one machine, kept whole by a supervisor.
//!
//! The point of `up` is that any instance may die at any time — the drill SIGKILLs them on
//! purpose — and the system heals without a human: the [`Supervisor`] restarts every instance
//! that exits (with backoff, so a crash loop does not spin), and keeps the balancer's upstream
//! list and `<data-dir>/run/instances.json` (which the drill reads to pick its victims) equal to
//! the instances that are actually listening. Instances are separate processes of this same
//! executable (`holdfast serve` on port 0), so killing one is as real as it gets.
//!
//! Architecture Invariant: an instance never outlives `up`. A SIGTERM or SIGINT drains and stops
//! them all before `up` exits; a SIGKILLed `up` takes them with it through Linux's parent-death
//! signal, which each instance sets up itself (see `serve.rs`, `--parent-pid`). The death signal
//! follows the *thread* that spawned the child, so children are spawned from tokio worker
//! threads (which live as long as the runtime), never from `spawn_blocking` threads.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use holdfast_balancer::{Balancer, BalancerOptions};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::net::TcpListener;
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::{sleep, timeout};
use tracing::{info, warn};

use crate::cli::UpArgs;
use crate::serve::LISTENING;

/// The balancer's options for the shop: the routes it may re-send, those it streams, and `client_rate` requests
/// per second per client address (bursts of twice that; 0: unlimited). Shared by `up` and
/// `balance`, so both balance the same way.
pub(crate) fn shop_balancer_options(client_rate: u32) -> BalancerOptions {
    BalancerOptions {
        keyed_routes: holdfast_shop::KEYED_ROUTES
            .iter()
            .map(|r| (*r).to_owned())
            .collect(),
        repeatable_routes: holdfast_web::REPEATABLE_ROUTES
            .iter()
            .map(|r| (*r).to_owned())
            .collect(),
        streamed_routes: holdfast_shop::STREAMED_ROUTES
            .iter()
            .map(|r| (*r).to_owned())
            .collect(),
        client_rate: (client_rate > 0).then(|| holdfast_balancer::ClientRate {
            per_second: client_rate,
            burst: client_rate.saturating_mul(2),
        }),
        ..BalancerOptions::default()
    }
}

/// `--replica`: a throwaway primary and a streaming standby of it, and `store` pointed at
/// both (the standby named first: the store finds the primary by asking). The servers run
/// as long as the returned handles live.
async fn local_primary_and_standby(
    store: &mut crate::cli::StoreArgs,
) -> anyhow::Result<(Arc<holdfast_drill::Cluster>, Arc<holdfast_drill::Cluster>)> {
    anyhow::ensure!(
        store.backend == holdfast_core::Backend::Postgres,
        "--replica runs PostgreSQL: add --backend postgres"
    );
    anyhow::ensure!(
        store.database_url.is_none(),
        "--replica runs its own primary and standby; to use yours, give --database-url a URL \
         naming both hosts (postgres://user@primary:5432,standby:5432/db) without --replica"
    );
    let dir = Arc::new(
        tempfile::Builder::new()
            .prefix("holdfast-up-postgres-")
            .tempdir()
            .context("a directory for the throwaway PostgreSQL")?,
    );
    let primary = holdfast_drill::Cluster::start(&dir).await?;
    let standby = holdfast_drill::Cluster::start_standby(&primary, &dir).await?;
    store.database_url = Some(format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/holdfast",
        standby.port, primary.port
    ));
    info!(
        primary = primary.port,
        standby = standby.port,
        "a throwaway PostgreSQL primary and its streaming standby (gone when up stops)"
    );
    Ok((primary, standby))
}

/// The `up` command: migrate, start the balancer, supervise the instances until SIGTERM/SIGINT.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let terminated = crate::on_terminate()?;
    let web = crate::serve::web_options(&args.instance, !args.host.is_loopback())?;
    // An instance's drain takes its drain delay plus, at most, one request timeout and slack.
    // A worker's drain is bounded by its own drain timeout (10 s); the larger bound covers both.
    let stop_timeout = (args.instance.drain_delay + web.request_timeout)
        .max(Duration::from_secs(10))
        + Duration::from_secs(10);
    let mut args = args;
    // Kept until `up` returns: dropping them stops the servers.
    let _local_postgres = match args.replica {
        true => Some(local_primary_and_standby(&mut args.store).await?),
        false => None,
    };
    let url = args.store.store_url()?;
    // Migrate once, up front, so the instances find the schema ready instead of queueing on
    // the migration lock, and a bad URL fails here with one message instead of N crash loops.
    // Kept open to count the queue once for the whole fleet on the operator port.
    let shop_schema = if args.as_old_release {
        &holdfast_shop::SCHEMA_BEFORE_CART_LINES
    } else {
        &holdfast_shop::SCHEMA
    };
    // With a continuous backup, Litestream alone checkpoints the WAL: every process on the
    // database is told so (see `StoreOptions::sqlite_autocheckpoint`).
    args.store.backup_checkpoints |=
        args.backup.is_some() && args.store.backend == holdfast_core::Backend::Sqlite;
    let fleet_store = crate::open_store_as(
        &args.store,
        holdfast_store::MigrateMode::Apply(holdfast_store::MigrationGuard::default()),
        shop_schema,
    )
    .await?;

    // The backup starts before any instance, so no acknowledged write predates it.
    let backup = match &args.backup {
        None => None,
        Some(target) => Some(crate::backup::start(target, &args.store)?),
    };
    let backup_health = backup.as_ref().map(holdfast_backup::Continuous::watch);

    let listener = TcpListener::bind((args.host, args.port))
        .await
        .with_context(|| format!("binding the balancer to {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    let balancer = Balancer::new(shop_balancer_options(args.client_rate));
    // The instances and workers push their own figures to Graphite; `up` pushes the
    // balancer's and the fleet's queue depth, which only it exports.
    let restarts = RestartCounts::default();
    let fleet = Fleet {
        store: fleet_store,
        restarts: restarts.clone(),
        backup: backup_health,
    };
    crate::graphite::spawn(&args.graphite, {
        let (balancer, fleet) = (balancer.clone(), fleet.clone());
        move || {
            let (balancer, fleet) = (balancer.clone(), fleet.clone());
            async move { balancer.render_metrics() + &fleet.figures().await }
        }
    });
    balancer.set_fleet_metrics(Arc::new(move || {
        let fleet = fleet.clone();
        Box::pin(async move { fleet.figures().await })
    }));
    let (stop_balancer, balancer_stopped) = oneshot::channel::<()>();
    let balancing = tokio::spawn(balancer.clone().serve(listener, async {
        let _ = balancer_stopped.await;
    }));
    let ops_listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, args.ops_port))
        .await
        .with_context(|| {
            format!(
                "binding the operator endpoints to 127.0.0.1:{}",
                args.ops_port
            )
        })?;
    let ops_addr = ops_listener.local_addr()?;
    // Lives as long as `up`; the process exit ends it.
    tokio::spawn(
        balancer
            .clone()
            .serve_operator(ops_listener, std::future::pending()),
    );
    info!(%addr, %ops_addr, "balancer listening");
    let balancer_file = args.store.data_dir.join("run").join(BALANCER_FILE);
    std::fs::create_dir_all(args.store.data_dir.join("run"))?;
    let about = serde_json::json!({
        "pid": std::process::id(),
        "addr": addr,
        "ops_addr": ops_addr,
        "started_at": holdfast_core::now_ms(),
    });
    write_atomically(&balancer_file, about.to_string().as_bytes())?;

    let parent = std::process::id().to_string();
    let store_flags: Vec<OsString> = vec![
        "--backend".into(),
        args.store.backend.name().into(),
        "--data-dir".into(),
        args.store.data_dir.clone().into(),
        "--parent-pid".into(),
        parent.clone().into(),
    ];
    let mut store_flags = store_flags;
    if args.store.backup_checkpoints {
        store_flags.push("--backup-checkpoints".into());
    }
    for (flag, value) in [
        ("--replica-max-lag", args.store.replica_max_lag),
        ("--replica-wait", args.store.replica_wait),
    ] {
        store_flags.push(flag.into());
        store_flags.push(format!("{}ms", value.as_millis()).into());
    }
    store_flags.push("--db-surplus-connections".into());
    store_flags.push(args.store.db_surplus_connections.to_string().into());
    let mut web_args: Vec<OsString> = vec!["serve".into(), "--addr".into(), "127.0.0.1:0".into()];
    web_args.extend(store_flags.iter().cloned());
    if !web.secure_cookies {
        web_args.push("--insecure-cookies".into());
    }
    web_args.extend(args.instance.to_args());
    web_args.extend(args.sabotage.to_args());
    web_args.extend(args.graphite.to_args());
    let mut groups = vec![Group {
        role: "web",
        args: web_args,
        count: args.instances.into(),
    }];
    // The provider keeps one port across restarts, so the workers' URL stays valid; without
    // workers nobody calls it, so none is started.
    let provider_url = match &args.provider_url {
        Some(url) => url.clone(),
        None if args.workers == 0 => String::new(),
        None => {
            let port = holdfast_drill::port_for_a_child()?;
            let provider_args = vec![
                "provider".into(),
                "--addr".into(),
                format!("127.0.0.1:{port}").into(),
                "--parent-pid".into(),
                parent.clone().into(),
            ];
            groups.push(Group {
                role: "provider",
                args: provider_args,
                count: 1,
            });
            format!("http://127.0.0.1:{port}")
        }
    };
    if args.workers > 0 {
        let mut worker_args: Vec<OsString> = vec![
            "worker".into(),
            "--addr".into(),
            "127.0.0.1:0".into(),
            "--provider-url".into(),
            provider_url.into(),
        ];
        worker_args.extend(store_flags);
        worker_args.push("--no-queue-metrics".into());
        worker_args.extend(args.jobs.to_args());
        worker_args.extend(args.sabotage.to_args());
        worker_args.extend(args.graphite.to_args());
        groups.push(Group {
            role: "worker",
            args: worker_args,
            count: args.workers.into(),
        });
    }
    for group in &groups {
        let mut counts = restarts.lock().unwrap_or_else(PoisonError::into_inner);
        for exit in ["clean", "failed"] {
            counts.entry((group.role, exit)).or_default();
        }
    }
    let supervisor = Supervisor::new(Options {
        program: std::env::current_exe().context("finding our own executable")?,
        groups,
        // In the environment rather than argv, so a password does not show in `ps`.
        env: [("DATABASE_URL".into(), url.into())]
            .into_iter()
            .chain(args.instance.session_env()?)
            .collect(),
        env_files: session_keys_file(&args.instance)
            .into_iter()
            .chain(release_file(&args)?)
            .collect(),
        instances_file: args.store.data_dir.join("run").join("instances.json"),
        balancer,
        start_timeout: Duration::from_secs(30),
        stop_timeout,
        restarts,
    });
    if !args.kill_unresponsive_after.is_zero() {
        tokio::spawn(kill_unresponsive(
            supervisor.handle(),
            args.kill_unresponsive_after,
        ));
    }
    let ready = supervisor.handle().ready();
    let (n, backend) = (args.instances, args.store.backend.name());
    tokio::spawn(async move {
        ready.await;
        say(&format!(
            "Holdfast is up: http://{addr} ({n} instances, {backend})"
        ));
        say(&format!(
            "Operator endpoints: http://{ops_addr}/ops/instances"
        ));
    });
    supervisor
        .run(async {
            let signal = terminated.await;
            info!(signal, "stopping: draining all instances");
        })
        .await?;

    info!("instances stopped; stopping the balancer");
    let _ = stop_balancer.send(());
    balancing.await?.context("balancer")?;
    let _ = std::fs::remove_file(&balancer_file);
    // Stops the replication last, once it has shipped the instances' final writes.
    if let Some(backup) = backup {
        match backup.finish().await {
            Ok(_) => info!("the backup has every write"),
            Err(error) => warn!(%error, "the last backup sync failed"),
        }
    }
    info!("stopped");
    Ok(())
}

/// In the data dir's `run/`: `{"pid","addr","ops_addr","started_at"}` of the balancer while
/// `up` runs, for `holdfast status`.
pub const BALANCER_FILE: &str = "balancer.json";

/// One kind of process and how many of it to keep running.
pub struct Group {
    /// `web` (behind the balancer), `worker` or `provider`, as written to `instances.json`.
    pub role: &'static str,
    pub args: Vec<OsString>,
    pub count: usize,
}

/// What to run, how many, and where to report them.
pub struct Options {
    /// The executable (normally our own). Every process must print
    /// `HOLDFAST_LISTENING <addr>` on stdout once it accepts connections.
    pub program: PathBuf,
    pub groups: Vec<Group>,
    pub env: Vec<(OsString, OsString)>,
    /// Variables re-read from a file each time an instance (re)starts, overriding `env`: how
    /// the session key ring is rotated under a rolling restart (see [`session_keys_file`]).
    pub env_files: Vec<(OsString, PathBuf)>,
    /// Rewritten atomically on every change: `[{"role":"web","pid":…,"addr":"…"}, …]`.
    pub instances_file: PathBuf,
    /// Gets the listening addresses as upstreams and the same JSON for `GET /ops/instances`.
    pub balancer: Balancer,
    /// How long an instance may take to report its address before it is killed and retried.
    pub start_timeout: Duration,
    /// How long a SIGTERMed instance may drain before it is SIGKILLed.
    pub stop_timeout: Duration,
    /// Processes that ended without the supervisor asking, by role and how they exited; the
    /// supervisor counts, the operator port exports.
    pub restarts: RestartCounts,
}

/// Per (role, exit), how many processes ended without the supervisor asking and were
/// replaced. `exit` is `clean` (status 0: a drain someone else started, as `holdfast roll`
/// does) or `failed` (a crash, a kill, a start that failed) — only the second is news.
pub type RestartCounts = Arc<Mutex<BTreeMap<(&'static str, &'static str), u64>>>;

/// `holdfast_supervisor_restarts_total`, as exposition text.
fn render_restarts(restarts: &RestartCounts) -> String {
    let name = "holdfast_supervisor_restarts_total";
    let mut out = format!(
        "# HELP {name} Processes that ended without the supervisor asking and were replaced, by role and exit (clean: drained by someone else; failed: crashed or killed).\n# TYPE {name} counter\n"
    );
    for ((role, exit), n) in restarts
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
    {
        out.push_str(&format!("{name}{{role=\"{role}\",exit=\"{exit}\"}} {n}\n"));
    }
    out
}

/// Keeps [`Options::instances`] instances running until told to stop.
pub struct Supervisor {
    shared: Arc<Shared>,
}

/// Observes a running [`Supervisor`]. Cheap to clone.
#[derive(Clone)]
pub struct Handle {
    live: watch::Receiver<Vec<Instance>>,
    instances: usize,
    balancer: Balancer,
}

/// One listening instance, as written to `instances.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Instance {
    pub role: &'static str,
    pub pid: u32,
    pub addr: SocketAddr,
    /// Where a web instance serves `/metrics`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ops_addr: Option<SocketAddr>,
    /// When it started listening (ms since the Unix epoch).
    pub started_at: i64,
    /// How many processes ran in this slot before this one (crashes, kills, drains).
    pub restarts: u32,
}

struct Shared {
    opts: Options,
    /// Listening processes by (group, slot). Held while publishing, so publications never
    /// reorder.
    slots: Mutex<BTreeMap<(usize, usize), Instance>>,
    live: watch::Sender<Vec<Instance>>,
}

/// How one run of an instance ended.
enum Ended {
    /// It exited on its own (crash, SIGKILL, or a drain someone else asked for).
    Exited(ExitStatus),
    /// We stopped it because the supervisor is stopping.
    Stopped,
}

impl Supervisor {
    pub fn new(opts: Options) -> Self {
        Self {
            shared: Arc::new(Shared {
                opts,
                slots: Mutex::default(),
                live: watch::Sender::new(Vec::new()),
            }),
        }
    }

    pub fn handle(&self) -> Handle {
        Handle {
            live: self.shared.live.subscribe(),
            instances: self.shared.opts.groups.iter().map(|g| g.count).sum(),
            balancer: self.shared.opts.balancer.clone(),
        }
    }

    /// Runs the instances until `shutdown` resolves, then SIGTERMs them all (SIGKILL after
    /// [`Options::stop_timeout`]) and returns once every one has exited.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let dir = self
            .shared
            .opts
            .instances_file
            .parent()
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // Publishes the empty set, replacing whatever a previous, killed `up` left behind.
        self.shared.set_slot((0, 0), None);
        let (stop, stopping) = watch::channel(false);
        let mut slots = JoinSet::new();
        for (group, g) in self.shared.opts.groups.iter().enumerate() {
            for slot in 0..g.count {
                slots.spawn(
                    self.shared
                        .clone()
                        .keep_running((group, slot), stopping.clone()),
                );
            }
        }
        shutdown.await;
        stop.send_replace(true);
        while let Some(joined) = slots.join_next().await {
            if let Err(error) = joined {
                warn!(%error, "an instance's supervising task failed");
            }
        }
        Ok(())
    }
}

/// `holdfast_jobs` for the whole fleet, counted once (workers started by `up` do not export
/// it), in the exposition format.
async fn queue_depth(store: &holdfast_store::Store) -> String {
    let name = "holdfast_jobs";
    let help = holdfast_jobs::METRICS
        .iter()
        .find(|m| m.name == name)
        .map_or("", |m| m.help);
    let mut out = format!("# HELP {name} {help}\n# TYPE {name} gauge\n");
    if let Ok(counts) = store.job_counts().await {
        for c in counts {
            out.push_str(&format!(
                "{name}{{role=\"balancer\",queue=\"{}\",state=\"{}\"}} {}\n",
                c.queue, c.state, c.count
            ));
        }
    }
    out
}

/// What only `up` knows about the fleet: the queue depth (counted once), the restarts, and
/// the continuous backup it runs.
#[derive(Clone)]
struct Fleet {
    store: holdfast_store::Store,
    restarts: RestartCounts,
    backup: Option<tokio::sync::watch::Receiver<holdfast_backup::Health>>,
}

impl Fleet {
    async fn figures(&self) -> String {
        let backup = self
            .backup
            .as_ref()
            .map(|b| b.borrow().render_metrics("balancer"))
            .unwrap_or_default();
        queue_depth(&self.store).await
            + &render_restarts(&self.restarts)
            + &backup
            + &render_replication(&self.store.replication().await)
    }
}

/// `holdfast_replica_lag_seconds` and `_bytes` per standby, and which host is the primary
/// (`holdfast_store_primary`), on PostgreSQL; nothing on SQLite.
fn render_replication(nodes: &[holdfast_store::Node]) -> String {
    if nodes.is_empty() {
        return String::new();
    }
    let mut out = String::new();
    let name = "holdfast_store_primary";
    out += &format!("# HELP {name} 1 for the database host that takes writes now, 0 for the others.\n# TYPE {name} gauge\n");
    for n in nodes {
        let is = u8::from(n.role == "primary");
        out += &format!("{name}{{host=\"{}\"}} {is}\n", n.host);
    }
    for (name, help, value) in [
        (
            "holdfast_replica_lag_seconds",
            "How far a standby is behind the primary: 0 when it has replayed everything, else the age of the last transaction it replayed.",
            (|n: &holdfast_store::Node| n.lag_seconds) as fn(&holdfast_store::Node) -> Option<f64>,
        ),
        (
            "holdfast_replica_lag_bytes",
            "How many bytes of the primary's WAL a standby has not replayed.",
            |n: &holdfast_store::Node| n.lag_bytes.map(|b| b as f64),
        ),
    ] {
        out += &format!("# HELP {name} {help}\n# TYPE {name} gauge\n");
        for n in nodes.iter().filter(|n| n.role == "standby") {
            if let Some(v) = value(n) {
                out += &format!("{name}{{host=\"{}\"}} {v}\n", n.host);
            }
        }
    }
    out
}

/// Kills web instances the balancer has found unresponsive for `after`, forever.
async fn kill_unresponsive(handle: Handle, after: Duration) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        for (addr, unresponsive_for) in handle.balancer.unresponsive() {
            if unresponsive_for < after {
                continue;
            }
            let live = handle.live.borrow().clone();
            if let Some(i) = live.iter().find(|i| i.role == "web" && i.addr == addr) {
                warn!(pid = i.pid, %addr, ?unresponsive_for, "instance unresponsive; killing it");
                let _ = kill(Pid::from_raw(i.pid as i32), Signal::SIGKILL);
            }
        }
    }
}

impl Handle {
    /// Resolves once all instances have reported listening at the same time.
    pub async fn ready(mut self) {
        let _ = self
            .live
            .wait_for(|live| live.len() >= self.instances)
            .await;
    }
}

impl Shared {
    /// One slot's life: run an instance, and whenever it exits, start another after a backoff.
    async fn keep_running(
        self: Arc<Self>,
        slot: (usize, usize),
        mut stopping: watch::Receiver<bool>,
    ) {
        let mut backoff = Backoff::default();
        for restarts in 0u32.. {
            let started = Instant::now();
            let role = self.opts.groups[slot.0].role;
            let ended = self.run_instance(slot, restarts, &mut stopping).await;
            let exit = match &ended {
                Ok(Ended::Stopped) => None,
                Ok(Ended::Exited(status)) if status.success() => Some("clean"),
                _ => Some("failed"),
            };
            if let Some(exit) = exit {
                *self
                    .opts
                    .restarts
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry((role, exit))
                    .or_default() += 1;
            }
            match ended {
                Ok(Ended::Stopped) => return,
                Ok(Ended::Exited(status)) => warn!(role, slot = slot.1, %status, "instance exited"),
                Err(error) => warn!(
                    role,
                    slot = slot.1,
                    error = format!("{error:#}"),
                    "instance failed"
                ),
            }
            let delay = backoff.after(started.elapsed());
            info!(role, slot = slot.1, ?delay, "restarting instance");
            tokio::select! {
                () = sleep(delay) => {}
                () = stopped(&mut stopping) => return,
            }
        }
    }

    /// Starts one instance, publishes it once it listens, and waits for it to end.
    async fn run_instance(
        &self,
        slot: (usize, usize),
        restarts: u32,
        stopping: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<Ended> {
        let opts = &self.opts;
        let group = &opts.groups[slot.0];
        let mut child = Command::new(&opts.program)
            .args(&group.args)
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .envs(opts.env_files.iter().filter_map(|(k, path)| {
                // Unreadable: the ring `up` started with (in `env`) stays.
                let value = std::fs::read_to_string(path).ok()?;
                Some((k, value.trim().to_owned()))
            }))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Its own process group: a terminal's Ctrl-C reaches `up` only, which then drains
            // the instances itself instead of racing them.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", opts.program.display()))?;
        let pid = child.id().context("instance vanished at once")?;
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();

        let limit = opts.start_timeout;
        let listening = async {
            let found = timeout(limit, listening_addr(&mut stdout)).await;
            found.unwrap_or_else(|_| Err(anyhow!("no {LISTENING} line within {limit:?}")))
        };
        let listening = tokio::select! {
            listening = listening => listening,
            () = stopped(stopping) => return self.stop(&mut child).await,
        };
        let (addr, ops_addr) = match listening {
            Ok(found) => found,
            Err(error) => {
                // Kill it if it is still alive; the status says how it ended either way.
                let _ = child.start_kill();
                bail!("{error:#} ({})", child.wait().await?);
            }
        };
        tokio::spawn(forward(stdout));
        self.set_slot(
            slot,
            Some(Instance {
                role: group.role,
                pid,
                addr,
                ops_addr,
                started_at: holdfast_core::now_ms(),
                restarts,
            }),
        );
        info!(role = group.role, slot = slot.1, pid, %addr, "instance listening");

        let ended = tokio::select! {
            status = child.wait() => status.map(Ended::Exited).context("waiting for instance"),
            () = stopped(stopping) => self.stop(&mut child).await,
        };
        self.set_slot(slot, None);
        ended
    }

    /// Drains an instance: SIGTERM, then SIGKILL if it outlives the stop timeout.
    async fn stop(&self, child: &mut Child) -> anyhow::Result<Ended> {
        if let Some(pid) = child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            match timeout(self.opts.stop_timeout, child.wait()).await {
                Ok(status) => info!(pid, status = %status?, "instance stopped"),
                Err(_) => {
                    warn!(pid, timeout = ?self.opts.stop_timeout, "instance did not drain; killing it");
                    child.kill().await?;
                }
            }
        }
        Ok(Ended::Stopped)
    }

    /// Records what listens in `slot` (or that nothing does), then makes the balancer,
    /// `instances.json`, `/ops/instances` and the handles agree. The lock is held throughout,
    /// so publications never overtake each other.
    fn set_slot(&self, slot: (usize, usize), instance: Option<Instance>) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        match instance {
            Some(instance) => slots.insert(slot, instance),
            None => slots.remove(&slot),
        };
        let live: Vec<Instance> = slots.values().cloned().collect();
        let json = serde_json::to_vec(&live).expect("instances serialize");
        let balancer = &self.opts.balancer;
        balancer.set_upstreams(
            live.iter()
                .filter(|i| i.role == "web")
                .map(|i| i.addr)
                .collect(),
        );
        balancer.publish_instances(json.clone().into());
        if let Err(error) = write_atomically(&self.opts.instances_file, &json) {
            warn!(
                error = format!("{error:#}"),
                "cannot write the instances file"
            );
        }
        self.live.send_replace(live);
    }
}
/// Reads the instance's stdout up to its `HOLDFAST_LISTENING <addr> [ops=<addr>]` line, passing
/// other lines on.
async fn listening_addr(
    stdout: &mut Lines<BufReader<ChildStdout>>,
) -> anyhow::Result<(SocketAddr, Option<SocketAddr>)> {
    while let Some(line) = stdout.next_line().await? {
        match line.strip_prefix(LISTENING) {
            Some(rest) => {
                let bad = || format!("bad line {line:?}");
                let mut words = rest.split_whitespace();
                let addr = words.next().unwrap_or("").parse().with_context(bad)?;
                let ops = match words.next().map(|w| w.strip_prefix("ops=")) {
                    None => None,
                    Some(Some(ops)) => Some(ops.parse().with_context(bad)?),
                    Some(None) => bail!(bad()),
                };
                return Ok((addr, ops));
            }
            None => say(&line),
        }
    }
    bail!("instance closed stdout before printing {LISTENING}")
}

/// Passes the rest of an instance's stdout through to ours, line by line so instances'
/// output does not interleave mid-line.
async fn forward(mut stdout: Lines<BufReader<ChildStdout>>) {
    while let Ok(Some(line)) = stdout.next_line().await {
        say(&line);
    }
}

/// One line to our stdout; a closed stdout (`holdfast up | head`) must not stop supervising.
fn say(line: &str) {
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// Resolves once the supervisor is stopping.
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|&stop| stop).await;
}

/// Readers see the old file or the new one, never half of one.
fn write_atomically(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
    std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Restart delays: 100 ms doubling to 5 s, back to 100 ms once an instance stayed up 10 s.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const CAP: Duration = Duration::from_secs(5);
    const STABLE: Duration = Duration::from_secs(10);

    /// The delay before the next start, given how long the last one stayed up.
    fn after(&mut self, uptime: Duration) -> Duration {
        if uptime >= Self::STABLE {
            self.next = Self::FIRST;
        }
        let delay = self.next;
        self.next = (delay * 2).min(Self::CAP);
        delay
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

/// With `--as-old-release`: `run/as-old-release` in the data dir, `true` at first, read as
/// `HOLDFAST_AS_OLD_RELEASE` by every instance that (re)starts — so writing `false` there and
/// draining the instances one by one is a rolling deploy of this release over the old one.
fn release_file(args: &crate::cli::UpArgs) -> anyhow::Result<Option<(OsString, PathBuf)>> {
    if !args.as_old_release {
        return Ok(None);
    }
    let path = args.store.data_dir.join("run").join(AS_OLD_RELEASE_FILE);
    write_atomically(&path, b"true")?;
    Ok(Some((crate::cli::AS_OLD_RELEASE_ENV.into(), path)))
}

/// See [`release_file`].
pub const AS_OLD_RELEASE_FILE: &str = "as-old-release";

/// `HOLDFAST_SESSION_KEYS_FILE` (in `up`'s environment), with `--sessions cookie`: a file
/// holding a key ring (`kid:base64key,…`) that `up` re-reads each time it starts an instance,
/// so keys rotate without restarting `up`: rewrite the file, then SIGTERM the web instances one
/// at a time (each drains and its replacement reads the new ring). Rotate in two rounds — the
/// new key added verify-only, then made current — so that no instance meets a cookie signed by
/// a key it does not have. `holdfast drill`'s `rotate-keys` does exactly that.
fn session_keys_file(instance: &crate::cli::InstanceArgs) -> Vec<(OsString, PathBuf)> {
    match std::env::var_os("HOLDFAST_SESSION_KEYS_FILE") {
        Some(path) if instance.sessions == crate::cli::SessionMode::Cookie => {
            vec![("HOLDFAST_SESSION_KEYS".into(), PathBuf::from(path))]
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn replication_is_which_host_takes_writes_and_each_standbys_lag() {
        let node = |host: &str, role: &str, lag_bytes, lag_seconds| holdfast_store::Node {
            host: host.into(),
            role: role.into(),
            lag_bytes,
            lag_seconds,
        };
        assert_eq!(render_replication(&[]), "", "SQLite: nothing");
        let text = render_replication(&[
            node("a:5432", "primary", None, None),
            node("b:5432", "standby", Some(8192), Some(1.5)),
            node("c:5432", "unreachable: no answer", None, None),
        ]);
        assert!(
            text.contains("holdfast_store_primary{host=\"a:5432\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("holdfast_store_primary{host=\"b:5432\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("holdfast_replica_lag_seconds{host=\"b:5432\"} 1.5\n"),
            "{text}"
        );
        assert!(
            text.contains("holdfast_replica_lag_bytes{host=\"b:5432\"} 8192\n"),
            "{text}"
        );
        assert!(!text.contains("lag_seconds{host=\"c:5432\"}"), "{text}");
    }

    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap_and_resets_after_a_stable_run() {
        let mut b = Backoff::default();
        let crash = Duration::from_millis(10);
        let delays: Vec<u64> = (0..8).map(|_| b.after(crash).as_millis() as u64).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(b.after(Duration::from_secs(10)), Duration::from_millis(100));
        assert_eq!(b.after(crash), Duration::from_millis(200));
    }
}
