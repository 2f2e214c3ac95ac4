//! A whole Holdfast system, brought up and torn down from the outside: the drill's system
//! under test, and the one the kill tests spawn (through `holdfast-testkit`), so that both
//! judge the same thing started the same way.
//!
//! Everything lives in one temporary directory: `holdfast up`'s data dir (the SQLite file and
//! `run/instances.json`) and, on Postgres, a throwaway cluster made with `initdb` and run with
//! `pg_ctl` on a free port, listening on 127.0.0.1 only, with its socket in the directory too.
//! The drill must be able to restart and cut the database, so it only ever uses a server it
//! started: never the machine's own on 5432. Postgres refuses to run as root, so when the drill
//! runs as root the cluster runs as the unprivileged `postgres` account (std's `Command::uid`:
//! no `unsafe`, no `su`).
//!
//! The instances and workers reach the cluster through an in-process [`FaultProxy`], which is
//! how the database link is slowed and cut. `up` runs in its own process group so that a
//! Ctrl-C reaches only the drill, which then tears down in order: resume paused processes,
//! stop `up` (which drains its instances), stop the cluster, delete the directory. [`System`]'s
//! `Drop` does the same (with SIGKILL) on any early exit, errors and Ctrl-C included.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use holdfast_faultproxy::FaultProxy;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::{Error, Sabotage, Sessions};

/// `holdfast up` re-reads the session key ring from the file this names each time it starts an
/// instance, so a drill (or an operator) can rotate keys with a rolling restart.
pub const KEYS_FILE_ENV: &str = "HOLDFAST_SESSION_KEYS_FILE";

/// The fault proxy's name for the database link.
pub(crate) const DB_PROXY: &str = "postgres";
/// The fault proxy's link to the standby (`promote-standby`).
pub(crate) const DB_STANDBY_PROXY: &str = "postgres-standby";
const INSTALL_HINT: &str =
    "install the PostgreSQL server binaries with scripts/install-drill-deps.sh";
/// `holdfast up` drains instances within its request timeout plus slack; then we SIGKILL.
const UP_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the system's durable store lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Database {
    /// The SQLite file in the system's data directory.
    Sqlite,
    /// A throwaway PostgreSQL cluster of the system's own, behind a fault proxy, so it may be
    /// restarted, slowed and cut (the drill's faults).
    ThrowawayPostgres,
    /// An existing Postgres database (a test's fresh one); no database faults.
    Postgres(String),
}

/// What to start: `holdfast up` from `program` with these settings.
#[derive(Clone, Debug)]
pub struct SystemSpec {
    /// The `holdfast` executable.
    pub program: PathBuf,
    pub database: Database,
    pub instances: u16,
    pub workers: u16,
    pub sessions: Sessions,
    pub sabotage: Option<Sabotage>,
    /// More `up` flags. A flag given here replaces the default of the same name: the short
    /// timings (see [`SystemSpec::SHORT_TIMEOUTS`]) and `--sessions`.
    pub up_args: Vec<String>,
    /// Where the system's own log goes (default: the temporary directory).
    pub system_log: Option<PathBuf>,
    /// Ready to lose the whole node (`lose-primary`): `up` backs its store up continuously
    /// (a fresh directory per node), listens on fixed ports (a restored node takes over the
    /// address), and the payment provider runs outside it (the outside world survives).
    /// SQLite only.
    pub lose_primary: bool,
    /// A streaming standby beside the drill's cluster (`promote-standby`, `fail-replica`), and `up` given
    /// both hosts in its URL.
    pub standby: bool,
}

impl SystemSpec {
    /// Short locks, leases and timeouts: a killed process's leftovers clear within a drill or
    /// a test instead of after production-sized waits.
    pub const SHORT_TIMEOUTS: &'static [(&'static str, &'static str)] = &[
        ("--request-timeout", "2s"),
        ("--job-lease", "2s"),
        ("--job-retry-base", "200ms"),
        ("--provider-timeout", "1s"),
    ];

    /// `instances` web instances and `workers` workers of `program` on SQLite, store sessions.
    pub fn new(program: impl Into<PathBuf>, instances: u16, workers: u16) -> Self {
        SystemSpec {
            program: program.into(),
            database: Database::Sqlite,
            instances,
            workers,
            sessions: Sessions::Store,
            sabotage: None,
            up_args: Vec::new(),
            system_log: None,
            lose_primary: false,
            standby: false,
        }
    }
}

/// The running system; stopped by [`System::stop`], or by `Drop` if that never happens.
pub struct System {
    /// The balancer's base URL.
    pub url: String,
    /// The balancer's operator endpoints (`/ops/…`).
    pub ops_url: String,
    pub provider_url: String,
    store_url: String,
    ctl: Arc<Control>,
    /// Removes everything the system created on disk once the last holder lets go: this, and
    /// the cluster, which is stopped first.
    _dir: Arc<tempfile::TempDir>,
}

/// What the fault injector and the teardown need; shared with their tasks.
pub(crate) struct Control {
    /// `holdfast up`, while it runs (the `lose-primary` fault kills it and starts another).
    up: Mutex<Option<Child>>,
    /// What `up` was started with, to start it again the same way.
    spec: SystemSpec,
    log_path: PathBuf,
    /// The payment provider the drill runs itself when `up` may be lost with everything it
    /// runs (`lose-primary`): it is the outside world, which outlives the node.
    provider: Mutex<Option<Child>>,
    /// Where the continuous backup goes (`lose-primary`), one generation per node: a restored
    /// node backs up to a fresh directory.
    backup_root: Option<PathBuf>,
    backup_generation: AtomicUsize,
    /// The `lose-primary` fault's observations, once it ran.
    restore: Mutex<Option<crate::restore::Observed>>,
    /// The standby (`promote-standby`), and what its fault saw once it ran.
    standby: Option<Arc<Cluster>>,
    failover: Mutex<Option<crate::failover::Observed>>,
    program: PathBuf,
    data_dir: PathBuf,
    db: Option<Arc<Cluster>>,
    proxy: Option<FaultProxy>,
    provider_url: Mutex<String>,
    http: reqwest::Client,
    paused: Mutex<BTreeSet<u32>>,
    faults: AtomicUsize,
    redis: Option<Arc<RedisServer>>,
    /// `--sessions cookie`: the key file `up` re-reads, and the rings written so far.
    keys: Option<KeyFile>,
    /// The balancer's public URL, once `up` said it.
    public_url: Mutex<String>,
    /// The balancer's operator URL (`/ops/metrics`), once `up` said it.
    ops_url: Mutex<String>,
    /// What the `fail-replica` fault saw, once it ran.
    replica_lost: Mutex<Option<crate::failover::ReplicaLost>>,
    /// What abusers and the memory sampler saw.
    observed: crate::abuse::Observed,
    /// The flags that point `holdfast migrate` at the system's store.
    store_flags: Vec<String>,
    /// What the `migrate` fault saw, once it ran.
    migration: Mutex<Option<crate::migration::Observed>>,
    /// What the `kill-mid-upload` fault saw, once it ran.
    uploads: Mutex<Option<crate::uploads::Observed>>,
}

impl System {
    pub async fn start(spec: &SystemSpec) -> Result<System, Error> {
        let opts = spec;
        let dir = tempfile::Builder::new()
            .prefix("holdfast-drill-")
            .tempdir()
            .map_err(Error::io("creating the drill's temporary directory"))?;
        let dir = Arc::new(dir);
        let data_dir = dir.path().join("data");
        std::fs::create_dir_all(&data_dir).map_err(Error::io("creating the data dir"))?;
        let program = std::fs::canonicalize(&opts.program)
            .map_err(Error::io(format!("finding {}", opts.program.display())))?;
        let (db, proxy, standby) = match &opts.database {
            Database::Sqlite | Database::Postgres(_) if opts.standby => {
                return Err(Error::Setup(
                    "promote-standby and fail-replica run on the drill's own cluster (--backend postgres), which it gives a standby".into(),
                ))
            }
            Database::Sqlite | Database::Postgres(_) => (None, None, None),
            Database::ThrowawayPostgres => {
                let db = Cluster::start(&dir).await?;
                let proxy = FaultProxy::new();
                let upstream = format!("127.0.0.1:{}", db.port);
                proxy
                    .create_proxy(DB_PROXY, "127.0.0.1:0", &upstream)
                    .await?;
                let standby = match opts.standby {
                    false => None,
                    true => {
                        let standby = Cluster::start_standby(&db, &dir).await?;
                        let upstream = format!("127.0.0.1:{}", standby.port);
                        proxy
                            .create_proxy(DB_STANDBY_PROXY, "127.0.0.1:0", &upstream)
                            .await?;
                        Some(standby)
                    }
                };
                (Some(db), Some(proxy), standby)
            }
        };
        let redis = match opts.sessions {
            Sessions::Redis => Some(RedisServer::start(&dir).await?),
            _ => None,
        };
        let keys = match opts.sessions {
            Sessions::Cookie => Some(KeyFile::create(dir.path())?),
            _ => None,
        };
        let store_url = match &opts.database {
            Database::Postgres(url) => url.clone(),
            _ => format!("sqlite:{}", data_dir.join("holdfast.sqlite").display()),
        };
        let mut store_flags = vec!["--data-dir".to_owned(), data_dir.display().to_string()];
        let postgres = match (&opts.database, &db) {
            (Database::Postgres(url), _) => Some(url.clone()),
            (_, Some(db)) => Some(db.url()),
            _ => None,
        };
        if let Some(url) = postgres {
            store_flags.extend([
                "--backend".into(),
                "postgres".into(),
                "--database-url".into(),
                url,
            ]);
        }
        let log_path = match &opts.system_log {
            Some(path) => path.clone(),
            None => dir.path().join("system.log"),
        };
        let mut spec = opts.clone();
        let mut provider = None;
        let backup_root = if opts.lose_primary {
            if matches!(opts.database, Database::Postgres(_)) {
                return Err(Error::Setup(
                    "lose-primary destroys the database's disk: on Postgres it runs on the drill's own cluster, not on a server it was given"
                        .into(),
                ));
            }
            let (child, url) = start_provider(&program).await?;
            provider = Some(child);
            let free = || free_port().map(|p| p.to_string());
            let root = dir.path().join("backup");
            spec.up_args.extend([
                "--port".into(),
                free()?,
                "--ops-port".into(),
                free()?,
                "--provider-url".into(),
                url,
            ]);
            Some(root)
        } else {
            None
        };
        let mut sys = System {
            url: String::new(),
            ops_url: String::new(),
            provider_url: String::new(),
            store_url,
            ctl: Arc::new(Control {
                up: Mutex::new(None),
                spec,
                log_path,
                provider: Mutex::new(provider),
                backup_root,
                backup_generation: AtomicUsize::new(0),
                restore: Mutex::default(),
                standby,
                failover: Mutex::default(),
                program,
                data_dir,
                db,
                proxy,
                provider_url: Mutex::default(),
                http: reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .map_err(|e| Error::Start(format!("http client: {e}")))?,
                paused: Mutex::default(),
                faults: AtomicUsize::new(0),
                redis,
                keys,
                public_url: Mutex::default(),
                ops_url: Mutex::default(),
                replica_lost: Mutex::default(),
                observed: crate::abuse::Observed::default(),
                store_flags,
                migration: Mutex::default(),
                uploads: Mutex::default(),
            }),
            _dir: dir,
        };
        let (url, ops_url, provider_url) = sys.ctl.start_up().await?;
        sys.url = url;
        sys.ops_url = ops_url;
        sys.provider_url = provider_url;
        Ok(sys)
    }
}

/// `holdfast provider` on a free port, as a child of the drill: its process and URL.
async fn start_provider(program: &Path) -> Result<(Child, String), Error> {
    let mut child = Command::new(program)
        .args(["provider", "--addr", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(Error::io("starting holdfast provider"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| Error::Start("no stdout from holdfast provider".into()))?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.strip_prefix("HOLDFAST_LISTENING ") {
                return rest.split_whitespace().next().map(str::to_owned);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .ok_or_else(|| Error::Start("holdfast provider did not say where it listens".into()))?;
    Ok((child, format!("http://{addr}")))
}

impl Control {
    /// Starts `holdfast up` as the spec says (on a `lose-primary` drill, with the continuous
    /// backup to the current generation's directory) and waits until every process it runs
    /// is listed: the public URL, the operator URL and the provider's URL. The system log is
    /// appended to.
    pub(crate) async fn start_up(&self) -> Result<(String, String, String), Error> {
        let (opts, log_path) = (&self.spec, &self.log_path);
        let ctl = self;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(Error::io(format!("creating {}", log_path.display())))?;
        let mut cmd = Command::new(&ctl.program);
        cmd.arg("up");
        for flag in ["--port", "--ops-port"] {
            if !opts.up_args.iter().any(|a| a == flag) {
                cmd.args([flag, "0"]);
            }
        }
        if let Some(root) = &ctl.backup_root {
            let generation = ctl.backup_generation.load(Ordering::SeqCst);
            cmd.arg("--backup")
                .arg(root.join(format!("gen-{generation}")));
        }
        cmd.args(["--instances", &opts.instances.to_string()])
            .args(["--workers", &opts.workers.to_string()])
            .arg("--data-dir")
            .arg(&ctl.data_dir);
        for (flag, value) in SystemSpec::SHORT_TIMEOUTS {
            if !opts.up_args.iter().any(|a| a == flag) {
                cmd.args([flag, value]);
            }
        }
        cmd.args(&opts.up_args);
        if let Some(proxy) = &ctl.proxy {
            let link = proxy.proxy(DB_PROXY).await?;
            let mut hosts = link.listen.to_string();
            if ctl.standby.is_some() {
                // Both hosts, as production names a primary and its standby: the store
                // writes to the one that takes writes.
                hosts += &format!(",{}", proxy.proxy(DB_STANDBY_PROXY).await?.listen);
            }
            let url = format!("postgres://postgres@{hosts}/holdfast");
            cmd.args(["--backend", "postgres", "--database-url", &url]);
        }
        if let Database::Postgres(url) = &opts.database {
            cmd.args(["--backend", "postgres", "--database-url", url]);
        }
        // `corrupt-backup` is done to the backup's files by the drill itself (`restore_node`).
        if let Some(sabotage) = opts.sabotage.filter(|s| *s != Sabotage::CorruptBackup) {
            cmd.args(["--unsafe-sabotage", sabotage.name()]);
        }
        if !opts.up_args.iter().any(|a| a == "--sessions") {
            cmd.args(["--sessions", opts.sessions.name()]);
        }
        cmd.env_remove("REDIS_URL")
            .env_remove("HOLDFAST_SESSION_KEYS")
            .env_remove(KEYS_FILE_ENV);
        if let Some(redis) = &ctl.redis {
            // Our own server, never the machine's; a prefix of the drill's own, too.
            cmd.args(["--redis-prefix", "drill"])
                .env("REDIS_URL", format!("redis://127.0.0.1:{}", redis.port));
        }
        if let Some(keys) = &ctl.keys {
            // The ring goes in the environment (a secret), and the file `up` re-reads on each
            // instance start, so that `rotate-keys` can change it under a rolling restart.
            cmd.env("HOLDFAST_SESSION_KEYS", keys.current())
                .env(KEYS_FILE_ENV, &keys.path);
        }
        // Asked for a system log, the operator gets the system's story (info); otherwise only
        // what went wrong is kept for a failed start.
        let level = if opts.system_log.is_some() {
            "info"
        } else {
            "warn"
        };
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| level.into());
        let mut stdout_log = log
            .try_clone()
            .map_err(Error::io(format!("opening {}", log_path.display())))?;
        cmd.env_remove("DATABASE_URL")
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(Error::io(format!("starting {} up", ctl.program.display())))?;
        let stdout = child.stdout.take();
        *lock(&self.up) = Some(child);
        let Some(stdout) = stdout else {
            return Err(Error::Start("no stdout from holdfast up".into()));
        };
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            let mut url = None;
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = std::io::Write::write_all(&mut stdout_log, format!("{line}\n").as_bytes());
                if let Some(rest) = line.strip_prefix("Holdfast is up: ") {
                    url = rest.split_whitespace().next().map(str::to_owned);
                }
                if let Some(rest) = line.strip_prefix("Operator endpoints: ") {
                    let ops = rest.trim().trim_end_matches("/ops/instances").to_owned();
                    return url.map(|url| (url, ops));
                }
            }
            None
        })
        .await;
        let (url, ops_url) = match ready {
            Ok(Some(found)) => found,
            Ok(None) => return Err(self.start_failed(log_path, "holdfast up exited")),
            Err(_) => return Err(self.start_failed(log_path, "holdfast up was not up within 60 s")),
        };
        // Keep reading, so `up` never blocks on a full pipe, into the system log: `up` passes
        // its processes' stdout on.
        tokio::spawn(async move {
            use std::io::Write;
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = writeln!(stdout_log, "{line}");
            }
        });
        // Given one (`--provider-url`), `up` starts none; without workers, none at all.
        let given = opts
            .up_args
            .iter()
            .position(|a| a == "--provider-url")
            .and_then(|i| opts.up_args.get(i + 1).cloned());
        let provider = given.or_else(|| {
            ctl.instances("provider")
                .first()
                .map(|i| format!("http://{}", i.addr))
        });
        if opts.workers > 0 && provider.is_none() {
            return Err(Error::Start("no provider in instances.json".into()));
        }
        let provider = provider.unwrap_or_default();
        *lock(&ctl.provider_url) = provider.clone();
        *lock(&ctl.public_url) = url.clone();
        *lock(&ctl.ops_url) = ops_url.clone();
        // Every process `up` runs is listed once it listens; wait for all of them.
        let want = usize::from(opts.instances) + usize::from(opts.workers);
        let deadline = Instant::now() + Duration::from_secs(30);
        while ctl.instances("web").len() + ctl.instances("worker").len() < want {
            if Instant::now() >= deadline {
                return Err(self.start_failed(log_path, "not every process was up within 30 s"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok((url, ops_url, provider))
    }

    fn start_failed(&self, log_path: &Path, what: &str) -> Error {
        let log = std::fs::read_to_string(log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Error::Start(format!("{what}; the end of its log:\n{}", tail.join("\n")))
    }
}

impl System {
    pub(crate) fn control(&self) -> Arc<Control> {
        self.ctl.clone()
    }

    /// `up`'s data directory (`holdfast.sqlite`, `run/instances.json`).
    pub fn data_dir(&self) -> &Path {
        &self.ctl.data_dir
    }

    /// The URL of the system's durable store, for checks the API does not expose.
    pub fn store_url(&self) -> &str {
        &self.store_url
    }

    /// The processes of `role` (`web`, `worker`, `provider`) alive now, in `up`'s slot order.
    pub fn instances(&self, role: &str) -> Vec<Instance> {
        self.ctl.instances(role)
    }

    /// Sends `signal` to `pid` if it is one of this system's processes (never a pid the kernel
    /// has since given to someone else); whether it was.
    pub fn signal(&self, pid: u32, signal: Signal) -> bool {
        self.ctl.signal(pid, signal)
    }

    /// Whether `up` itself is still running.
    pub fn is_up(&mut self) -> bool {
        lock(&self.ctl.up)
            .as_mut()
            .is_some_and(|up| matches!(up.try_wait(), Ok(None)))
    }

    /// Stops everything in order: resume paused processes, drain `up`, stop the cluster.
    /// Returns a note if `up` itself had died during the drill (it must not: it is the
    /// supervisor, and nothing the drill does is aimed at it).
    pub async fn stop(&mut self) -> Option<String> {
        self.ctl.resume_all();
        let mut note = None;
        let up = lock(&self.ctl.up).take();
        if let Some(mut up) = up {
            if let Ok(Some(status)) = up.try_wait() {
                note = Some(format!("holdfast up exited during the drill ({status})"));
            }
            if let Some(pid) = up.id() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            }
            if tokio::time::timeout(UP_STOP_TIMEOUT, up.wait())
                .await
                .is_err()
            {
                tracing::warn!("holdfast up did not stop within {UP_STOP_TIMEOUT:?}; killing it");
                let _ = up.kill().await;
            }
        }
        let provider = lock(&self.ctl.provider).take();
        if let Some(mut provider) = provider {
            let _ = provider.kill().await;
        }
        if let Some(db) = &self.ctl.db {
            db.stop().await;
        }
        if let Some(redis) = &self.ctl.redis {
            redis.stop();
        }
        note
    }
}

impl Drop for System {
    /// The early-exit path (error, Ctrl-C): SIGKILL `up` (its instances die with it through
    /// their parent-death signal), stop the cluster at once, then the directory goes.
    fn drop(&mut self) {
        self.ctl.resume_all();
        if let Some(mut up) = lock(&self.ctl.up).take() {
            let _ = up.start_kill();
        }
        if let Some(mut provider) = lock(&self.ctl.provider).take() {
            let _ = provider.start_kill();
        }
        if let Some(db) = &self.ctl.db {
            db.stop_blocking();
        }
        if let Some(redis) = &self.ctl.redis {
            redis.stop();
        }
    }
}

/// One process `up` lists in `instances.json`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Instance {
    pub role: String,
    pub pid: u32,
    pub addr: String,
}

impl Control {
    /// The processes of `role` alive now, in `up`'s slot order.
    pub fn instances(&self, role: &str) -> Vec<Instance> {
        let path = self.data_dir.join("run").join("instances.json");
        let Ok(json) = std::fs::read(&path) else {
            return Vec::new();
        };
        let all: Vec<Instance> = serde_json::from_slice(&json).unwrap_or_default();
        all.into_iter().filter(|i| i.role == role).collect()
    }

    pub fn public_url(&self) -> String {
        lock(&self.public_url).clone()
    }

    /// The balancer's operator URL.
    pub fn ops_url(&self) -> String {
        lock(&self.ops_url).clone()
    }

    pub(crate) fn set_replica_lost(&self, seen: crate::failover::ReplicaLost) {
        *lock(&self.replica_lost) = Some(seen);
    }

    /// What the `fail-replica` fault saw, if it ran.
    pub fn replica_lost(&self) -> Option<crate::failover::ReplicaLost> {
        lock(&self.replica_lost).clone()
    }

    pub fn observed(&self) -> &crate::abuse::Observed {
        &self.observed
    }

    pub fn db(&self) -> Option<&Arc<Cluster>> {
        self.db.as_ref()
    }

    pub fn redis(&self) -> Option<&Arc<RedisServer>> {
        self.redis.as_ref()
    }

    /// `rotate-keys`: a new key, first added verify-only and rolled out to every web instance
    /// (so that every instance can verify what the next phase signs), then made current with
    /// the old one verify-only, rolled out again. No cookie is ever refused on the way.
    pub async fn rotate_keys(&self) -> Result<String, String> {
        let keys = self.keys.as_ref().ok_or("no signing keys in this drill")?;
        let (old, new) = keys.add_key()?;
        keys.write(&format!("{old},{new}"))?;
        let a = self.rolling_drain().await?;
        keys.write(&format!("{new},{old}"))?;
        let b = self.rolling_drain().await?;
        let kid = |k: &str| k.split(':').next().unwrap_or_default().to_owned();
        Ok(format!(
            "web instances: key {} added ({a} drained), then made current over {} ({b} drained)",
            kid(&new),
            kid(&old)
        ))
    }

    /// The `holdfast` executable the system runs.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// The flags that point a `holdfast` command (`migrate`) at the system's store.
    pub fn store_flags(&self) -> &[String] {
        &self.store_flags
    }

    pub fn set_migration(&self, seen: crate::migration::Observed) {
        *lock(&self.migration) = Some(seen);
    }

    /// What the `migrate` fault saw, if it ran.
    pub fn migration(&self) -> Option<crate::migration::Observed> {
        lock(&self.migration).clone()
    }

    pub fn set_uploads(&self, seen: crate::uploads::Observed) {
        *lock(&self.uploads) = Some(seen);
    }

    /// What the `kill-mid-upload` fault saw, if it ran.
    pub fn uploads(&self) -> Option<crate::uploads::Observed> {
        lock(&self.uploads).clone()
    }

    /// `up`'s data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Sends `signal` to `pid` if it is one of this system's processes; whether it was.
    pub fn signal(&self, pid: u32, signal: Signal) -> bool {
        self.is_ours(pid) && kill(Pid::from_raw(pid as i32), signal).is_ok()
    }

    /// `lose-primary`: SIGKILLs `up` and then everything it ran (instances, workers, the
    /// backup's replicator — they die with it anyway) and waits until none is alive, and on
    /// Postgres stops the cluster at once (`-m immediate`: no shutdown checkpoint, as a
    /// crash); how many processes died.
    pub(crate) async fn kill_node(&self) -> Result<usize, String> {
        let mut pids: Vec<u32> = ["web", "worker", "provider"]
            .iter()
            .flat_map(|role| self.instances(role))
            .map(|i| i.pid)
            .collect();
        let state = self.data_dir.join("run").join("backup").join("state.json");
        if let Some(pid) = std::fs::read(&state)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v["replicator_pid"].as_u64())
        {
            pids.push(pid as u32);
        }
        let up = lock(&self.up).take();
        let Some(mut up) = up else {
            return Err("holdfast up is not running".into());
        };
        if let Some(pid) = up.id() {
            pids.push(pid);
        }
        let _ = up.start_kill();
        let _ = up.wait().await;
        for &pid in &pids {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids
            .iter()
            .any(|&pid| Path::new(&format!("/proc/{pid}")).exists() && !zombie(pid))
        {
            if Instant::now() > deadline {
                return Err("the node's processes were still alive 10 s after SIGKILL".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some(db) = &self.db {
            db.stop().await;
        }
        Ok(pids.len())
    }

    /// `lose-primary`: the data directory is gone, as with a lost disk; on Postgres, the
    /// cluster's data directory too.
    pub(crate) fn destroy_data(&self) -> Result<(), String> {
        if let Some(db) = &self.db {
            std::fs::remove_dir_all(&db.data)
                .map_err(|e| format!("destroying {}: {e}", db.data.display()))?;
        }
        std::fs::remove_dir_all(&self.data_dir)
            .map_err(|e| format!("destroying {}: {e}", self.data_dir.display()))
    }

    /// `lose-primary`: `holdfast restore` of the current backup generation into the (empty)
    /// data directory (on Postgres, the cluster's, which then starts again on its port),
    /// reconciled with the provider; its line, or its error line.
    pub(crate) async fn restore_node(&self) -> Result<String, String> {
        let root = self.backup_root.as_ref().ok_or("no backup in this drill")?;
        let generation = self.backup_generation.load(Ordering::SeqCst);
        let backup = root.join(format!("gen-{generation}"));
        if self.spec.sabotage == Some(Sabotage::CorruptBackup) {
            corrupt_files_under(&backup)?;
        }
        let provider_url = lock(&self.provider_url).clone();
        let mut restore = Command::new(&self.program);
        restore
            .arg("restore")
            .arg("--backup")
            .arg(&backup)
            .arg("--to")
            .arg(self.db.as_ref().map_or(&self.data_dir, |db| &db.data))
            .arg("--provider-url")
            .arg(provider_url)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(300), restore.output())
            .await
            .map_err(|_| "holdfast restore did not finish within 300 s".to_owned())?
            .map_err(|e| format!("running holdfast restore: {e}"))?;
        let said = |b: &[u8]| String::from_utf8_lossy(b).trim().to_owned();
        if !out.status.success() {
            return Err(said(&out.stderr));
        }
        if let Some(db) = &self.db {
            db.start_again().await.map_err(|e| e.to_string())?;
        }
        Ok(said(&out.stdout))
    }

    /// `lose-primary`: `holdfast up` on the restored data directory, on the same address,
    /// backing up to the next generation's directory.
    pub(crate) async fn start_next_node(&self) -> Result<(), String> {
        self.backup_generation.fetch_add(1, Ordering::SeqCst);
        self.start_up().await.map(|_| ()).map_err(|e| e.to_string())
    }

    /// The standby (`promote-standby`).
    pub fn standby(&self) -> Option<&Arc<Cluster>> {
        self.standby.as_ref()
    }

    pub(crate) fn set_failover(&self, seen: crate::failover::Observed) {
        *lock(&self.failover) = Some(seen);
    }

    /// What the `promote-standby` fault saw, if it ran.
    pub fn failover(&self) -> Option<crate::failover::Observed> {
        lock(&self.failover).clone()
    }

    pub(crate) fn set_restore(&self, seen: crate::restore::Observed) {
        *lock(&self.restore) = Some(seen);
    }

    /// What the `lose-primary` fault saw, if it ran.
    pub fn restore(&self) -> Option<crate::restore::Observed> {
        lock(&self.restore).clone()
    }

    /// A rolling deploy from the old release (`up --as-old-release`) to this one: the release
    /// file says `false`, then each web instance is drained and replaced in turn.
    pub async fn roll_to_this_release(&self) -> Result<usize, String> {
        let file = crate::migration::release_file(&self.data_dir);
        std::fs::write(&file, "false").map_err(|e| format!("writing {}: {e}", file.display()))?;
        self.rolling_drain().await
    }

    /// SIGTERMs each live web instance in turn, each time waiting until `up` has replaced it;
    /// returns how many were drained.
    async fn rolling_drain(&self) -> Result<usize, String> {
        let pids: Vec<u32> = self
            .instances("web")
            .into_iter()
            .map(|i| i.pid)
            .filter(|&pid| self.is_ours(pid))
            .collect();
        let want = pids.len();
        let mut drained = 0;
        for pid in pids {
            if !self.is_ours(pid) {
                continue; // killed meanwhile: its replacement reads the new ring anyway
            }
            kill(Pid::from_raw(pid as i32), Signal::SIGTERM)
                .map_err(|e| format!("SIGTERM: {e}"))?;
            drained += 1;
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let web = self.instances("web");
                if !web.iter().any(|i| i.pid == pid) && web.len() >= want {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!("web pid {pid} was not replaced within 30 s"));
                }
            }
        }
        Ok(drained)
    }

    pub fn proxy(&self) -> Option<&FaultProxy> {
        self.proxy.as_ref()
    }

    pub fn faults_injected(&self) -> usize {
        self.faults.load(Ordering::Relaxed)
    }

    pub fn count_fault(&self) {
        self.faults.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether `pid` is a live process running our program, so a signal never hits a pid the
    /// kernel has since given to someone else.
    fn is_ours(&self, pid: u32) -> bool {
        let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
            return false;
        };
        // A binary rebuilt while the drill runs shows as "<path> (deleted)".
        let exe = exe.to_string_lossy();
        let exe = exe.trim_end_matches(" (deleted)");
        exe == self.program.to_string_lossy()
    }

    /// Sends `signal` to the `pick`-th live process of `role`; names the victim.
    pub fn signal_one(&self, role: &str, pick: u64, signal: Signal) -> Result<String, String> {
        let pid = self.pick(role, pick)?;
        kill(Pid::from_raw(pid as i32), signal).map_err(|e| format!("{signal}: {e}"))?;
        Ok(format!("{role} pid {pid}"))
    }

    fn pick(&self, role: &str, pick: u64) -> Result<u32, String> {
        let live: Vec<u32> = self
            .instances(role)
            .into_iter()
            .map(|i| i.pid)
            .filter(|&pid| self.is_ours(pid))
            .collect();
        if live.is_empty() {
            return Err(format!("no live {role} process to hit"));
        }
        Ok(live[(pick % live.len() as u64) as usize])
    }

    /// SIGSTOPs a web instance (remembered, so teardown can always SIGCONT it).
    pub fn pause_one(&self, pick: u64) -> Result<(u32, String), String> {
        let pid = self.pick("web", pick)?;
        lock(&self.paused).insert(pid);
        kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).map_err(|e| format!("SIGSTOP: {e}"))?;
        Ok((pid, format!("web pid {pid}")))
    }

    pub fn resume(&self, pid: u32) {
        if lock(&self.paused).remove(&pid) && self.is_ours(pid) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGCONT);
        }
    }

    fn resume_all(&self) {
        let paused: Vec<u32> = lock(&self.paused).iter().copied().collect();
        for pid in paused {
            self.resume(pid);
        }
    }

    /// Re-enables the database link (retrying: the port may take a moment to be free).
    pub async fn reconnect_db(&self) -> Result<(), String> {
        let Some(proxy) = &self.proxy else {
            return Ok(());
        };
        let mut last = String::new();
        for _ in 0..50 {
            match proxy.set_enabled(DB_PROXY, true).await {
                Ok(()) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!("could not restore the database link: {last}"))
    }

    /// `PUT /_faults` on the provider.
    pub async fn provider_faults(&self, faults: &Value) -> Result<(), String> {
        let url = format!("{}/_faults", lock(&self.provider_url));
        let mut last = String::new();
        for _ in 0..10 {
            match self.http.put(&url).json(faults).send().await {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => last = format!("{} answered {}", url, r.status()),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(last)
    }

    /// Undoes every fault, whatever state the injector left: the system should be healthy
    /// when its final state is read. Returns what could not be undone.
    pub async fn clear_faults(&self) -> Vec<String> {
        let mut problems = Vec::new();
        self.resume_all();
        if let Some(proxy) = &self.proxy {
            proxy.reset().await;
            if let Err(e) = self.reconnect_db().await {
                problems.push(e);
            }
        }
        if let Err(e) = self.provider_faults(&serde_json::json!({})).await {
            problems.push(format!("could not clear the provider's faults: {e}"));
        }
        problems
    }
}

/// `--sabotage corrupt-backup`: every 97th byte of every file under `dir` flipped, past the
/// first 100 (a failing disk does not spare the headers either, but this way the files still
/// look like what they are).
fn corrupt_files_under(dir: &Path) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            corrupt_files_under(&path)?;
            continue;
        }
        // The data, not the label on the box: a PostgreSQL backup's marker and proven
        // position stay readable, so the restore meets the damage itself.
        if path
            .file_name()
            .is_some_and(|n| n == "postgres.json" || n == "proven")
        {
            continue;
        }
        let mut bytes =
            std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        for i in (100..bytes.len()).step_by(97) {
            bytes[i] ^= 0xff;
        }
        std::fs::write(&path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Whether `pid` is a zombie (dead, not yet reaped by its parent).
fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(false)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A throwaway PostgreSQL cluster in the drill's directory.
///
/// A `pg_ctl start` or `restart` that is cancelled half-way would go on and start a server
/// after the drill has stopped it, orphaning it on a deleted directory. So every command runs
/// to its end as a blocking task holding the cluster (the runtime waits for those when it shuts
/// down), a server-starting one is marked `busy`, and stopping first waits for it. The
/// cluster holds the temporary directory, so the directory goes only after the server.
pub struct Cluster {
    bin: PathBuf,
    /// Owned by the cluster's user: holds `data/`, the log and the Unix socket.
    root: PathBuf,
    pub data: PathBuf,
    log: PathBuf,
    pub port: u16,
    /// `(uid, gid)` to run as, when the drill runs as root.
    owner: Option<(u32, u32)>,
    state: Mutex<ClusterState>,
    /// Dropped after [`Cluster`]'s `Drop` stopped the server.
    _dir: Arc<tempfile::TempDir>,
}

#[derive(Default)]
struct ClusterState {
    /// Started and not yet stopped (or being stopped).
    running: bool,
    /// A `pg_ctl start`/`restart` is in flight.
    busy: bool,
}

impl Cluster {
    /// The `holdfast` database, directly (not through the fault proxy).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/holdfast", self.port)
    }

    /// `psql` on the `holdfast` database, quiet and unaligned (`-XAt`), for the drill's own
    /// sessions (the `migrate` fault's long reader).
    pub fn psql_command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(self.bin.join("psql"));
        cmd.args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "holdfast",
        ])
        .args(["-p", &self.port.to_string()])
        .env_remove("PGDATABASE")
        .env_remove("PGOPTIONS");
        cmd
    }

    /// A cluster not yet made, in `dir/name` (owned by `postgres` when we are root), on a
    /// free port.
    fn new_in(dir: &Arc<tempfile::TempDir>, name: &str) -> Result<Arc<Cluster>, Error> {
        let tmp = dir.path();
        let bin = pg_bin_dir()?;
        let root = tmp.join(name);
        std::fs::create_dir_all(&root).map_err(Error::io("creating the cluster directory"))?;
        let owner = if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .ok_or_else(|| {
                    Error::Setup(format!(
                        "running as root, the drill runs Postgres as the `postgres` user, which \
                         does not exist; {INSTALL_HINT} (it creates it)"
                    ))
                })?;
            let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
            // The temporary directory must be traversable for the cluster's user.
            std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o711))
                .map_err(Error::io("opening the temporary directory to postgres"))?;
            std::os::unix::fs::chown(&root, Some(uid), Some(gid))
                .map_err(Error::io("giving the cluster directory to postgres"))?;
            Some((uid, gid))
        } else {
            None
        };
        let port = free_port()?;
        Ok(Arc::new(Cluster {
            bin,
            data: root.join("data"),
            log: root.join("postgres.log"),
            root,
            port,
            owner,
            state: Mutex::default(),
            _dir: dir.clone(),
        }))
    }

    /// A streaming standby of `primary` (`pg_basebackup -R`: it follows the primary's WAL,
    /// read-only), in `dir` beside it, started on a port of its own.
    pub async fn start_standby(
        primary: &Arc<Cluster>,
        dir: &Arc<tempfile::TempDir>,
    ) -> Result<Arc<Cluster>, Error> {
        let standby = Cluster::new_in(dir, "pg-standby")?;
        let mut base = standby.command("pg_basebackup");
        base.arg("-D")
            .arg(&standby.data)
            .args([
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
            ])
            .args(["-p", &primary.port.to_string()]);
        standby.run("pg_basebackup", base).await?;
        standby.start_again().await?;
        Ok(standby)
    }

    /// `pg_ctl promote`: the standby stops following and takes writes. Returns how long it
    /// took.
    pub async fn promote(self: &Arc<Self>) -> Result<Duration, Error> {
        let started = Instant::now();
        let promote = self.pg_ctl(&["promote", "-w", "-t", "60"]);
        self.run("pg_ctl promote", promote).await?;
        Ok(started.elapsed())
    }

    /// initdb, start on a free port, create the `holdfast` database. (Also for tests that
    /// need a cluster of their own to back up, lose and restore.)
    pub async fn start(dir: &Arc<tempfile::TempDir>) -> Result<Arc<Cluster>, Error> {
        let cluster = Cluster::new_in(dir, "pg")?;
        let mut initdb = cluster.command("initdb");
        initdb
            .arg("-D")
            .arg(&cluster.data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync");
        cluster.run("initdb", initdb).await?;
        cluster.start_again().await?;
        let mut createdb = cluster.command("createdb");
        createdb
            .args(["-h", "127.0.0.1", "-p", &cluster.port.to_string()])
            .args(["-U", "postgres", "holdfast"]);
        cluster.run("createdb", createdb).await?;
        Ok(cluster)
    }

    /// Starts the server on its data directory and port (at first, and after `lose-primary`
    /// restored the directory).
    pub async fn start_again(self: &Arc<Self>) -> Result<(), Error> {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories={} \
             -c max_connections=200",
            self.port,
            self.root.display()
        );
        self.server("pg_ctl start", &["start", "-w", "-t", "60", "-o", &options])
            .await
    }

    fn command(&self, program: &str) -> std::process::Command {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        cmd.current_dir(&self.root)
            .env_remove("PGDATA")
            .env_remove("PGHOST")
            .env_remove("PGPORT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        cmd
    }

    /// `pg_ctl ACTION -D data -l log ARGS` (a server started without `-l` would hold our
    /// pipe open forever).
    fn pg_ctl(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = self.command("pg_ctl");
        cmd.arg(args[0])
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(&args[1..]);
        cmd
    }

    /// Runs a command that starts no server (initdb, createdb) to its end.
    async fn run(
        self: &Arc<Self>,
        what: &str,
        mut cmd: std::process::Command,
    ) -> Result<(), Error> {
        let me = self.clone();
        let out = tokio::task::spawn_blocking(move || {
            let out = cmd.output();
            drop(me);
            out
        })
        .await
        .map_err(|e| Error::Postgres(format!("{what}: {e}")))?
        .map_err(Error::io(format!("running {what}")))?;
        self.check(what, &out)
    }

    /// Runs a `pg_ctl` that starts a server to its end, whatever happens to the caller.
    async fn server(self: &Arc<Self>, what: &str, args: &[&str]) -> Result<(), Error> {
        {
            let mut state = lock(&self.state);
            if args[0] == "restart" && !state.running {
                return Err(Error::Postgres("the cluster is being stopped".into()));
            }
            state.running = true;
            state.busy = true;
        }
        let me = self.clone();
        let mut cmd = self.pg_ctl(args);
        let out = tokio::task::spawn_blocking(move || {
            let out = cmd.output();
            lock(&me.state).busy = false;
            out
        })
        .await
        .map_err(|e| Error::Postgres(format!("{what}: {e}")))?
        .map_err(Error::io(format!("running {what}")))?;
        self.check(what, &out)
    }

    fn check(&self, what: &str, out: &std::process::Output) -> Result<(), Error> {
        if out.status.success() {
            return Ok(());
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(10).collect();
        Err(Error::Postgres(format!(
            "{what} failed ({}): {}{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )))
    }

    /// `pg_ctl restart -m fast`: sessions are terminated, the server comes back on the same
    /// port. Returns how long it took.
    pub async fn restart(self: &Arc<Self>) -> Result<Duration, Error> {
        let started = Instant::now();
        self.server(
            "pg_ctl restart",
            &["restart", "-m", "fast", "-w", "-t", "60"],
        )
        .await?;
        Ok(started.elapsed())
    }

    /// Stops the server at once (`-m immediate`: it is thrown away), after any start or
    /// restart in flight has finished. Idempotent.
    fn stop_blocking(&self) {
        if !std::mem::take(&mut lock(&self.state).running) {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(90);
        while lock(&self.state).busy && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let stopped = self
            .pg_ctl(&["stop", "-m", "immediate", "-w"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Err(e) = stopped {
            tracing::warn!("stopping the drill's postgres: {e}");
        }
    }

    pub async fn stop(self: &Arc<Self>) {
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.stop_blocking()).await;
    }
}

impl Drop for Cluster {
    /// Also covers a cluster that failed half-way through [`Cluster::start`].
    fn drop(&mut self) {
        self.stop_blocking();
    }
}

/// A port on 127.0.0.1 nothing listens on right now, for a server another process will
/// start on it.
fn free_port() -> Result<u16, Error> {
    port_for_a_child().map_err(Error::io("finding a free port"))
}

/// A port on 127.0.0.1 free right now and outside the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), for a server a child process will bind later. A port
/// the kernel handed out for `bind(…:0)` and released could be handed out again, to another
/// process binding port 0, before the child binds it (an instance of `up` took the
/// provider's port so once); ports outside the range are never handed out that way.
pub fn port_for_a_child() -> std::io::Result<u16> {
    let (ephemeral_low, _) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    let below = ephemeral_low.max(10_001);
    // Start somewhere different in each process, and one further on at each call, so that
    // neither two processes nor two calls before their servers bind get the same port.
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let span = u32::from(below - 10_000);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let start = std::process::id().wrapping_mul(7919).wrapping_add(call) % span;
    for k in 0..span {
        let port = 10_000 + ((start + k) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    // Every port below the range taken: fall back to one the kernel picks.
    std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()
        .map(|a| a.port())
}

/// Where `initdb` and `pg_ctl` live: next to the `initdb` on `PATH`, else the newest
/// `/usr/lib/postgresql/*/bin` (Debian keeps the server binaries off `PATH`).
fn pg_bin_dir() -> Result<PathBuf, Error> {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("initdb"))
            .find(|p| p.is_file())
            .and_then(|p| std::fs::canonicalize(p).ok())
            .and_then(|p| p.parent().map(Path::to_path_buf))
    });
    if let Some(dir) = on_path.filter(|d| has_tools(d)) {
        return Ok(dir);
    }
    let debian = holdfast_core::debian_postgres_bin_dirs();
    debian
        .into_iter()
        .find(|dir| has_tools(dir))
        .ok_or_else(|| {
            Error::Setup(format!(
                "--backend postgres runs its own throwaway cluster and needs initdb and pg_ctl, \
             found neither on PATH nor in /usr/lib/postgresql/*/bin; {INSTALL_HINT}"
            ))
        })
}

/// The drill's own `redis-server`: `redis-server` from PATH, on a free 127.0.0.1 port, with
/// no persistence (`--save "" --appendonly no`), its files in the drill's directory. Never the
/// machine's Redis. A restart is a SIGKILL and a fresh start on the same port: memory lost.
pub(crate) struct RedisServer {
    bin: PathBuf,
    dir: PathBuf,
    pub port: u16,
    child: Mutex<Option<std::process::Child>>,
}

impl RedisServer {
    async fn start(dir: &Arc<tempfile::TempDir>) -> Result<Arc<RedisServer>, Error> {
        let bin = std::env::var_os("PATH")
            .and_then(|path| {
                std::env::split_paths(&path)
                    .map(|d| d.join("redis-server"))
                    .find(|p| p.is_file())
            })
            .ok_or_else(|| {
                Error::Setup(
                    "--sessions redis runs its own redis-server, found none on PATH; install \
                     it with scripts/install-drill-deps.sh"
                        .into(),
                )
            })?;
        let root = dir.path().join("redis");
        std::fs::create_dir_all(&root).map_err(Error::io("creating the redis directory"))?;
        let port = free_port()?;
        let redis = Arc::new(RedisServer {
            bin,
            dir: root,
            port,
            child: Mutex::new(None),
        });
        redis.spawn().await.map_err(Error::Redis)?;
        Ok(redis)
    }

    /// Starts the server and waits until it answers PING.
    async fn spawn(&self) -> Result<(), String> {
        use std::os::unix::process::CommandExt;
        let mut last = String::new();
        for _ in 0..5 {
            let child = std::process::Command::new(&self.bin)
                .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(&self.dir)
                .arg("--logfile")
                .arg(self.dir.join("redis.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .map_err(|e| format!("starting {}: {e}", self.bin.display()))?;
            *lock(&self.child) = Some(child);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                match self.command("PING").await {
                    Ok(_) => return Ok(()),
                    Err(e) => last = e,
                }
                let exited = lock(&self.child)
                    .as_mut()
                    .map(|c| matches!(c.try_wait(), Ok(Some(_))))
                    .unwrap_or(true);
                if exited {
                    break; // e.g. the port not free yet: start it again
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            self.kill();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        Err(format!(
            "redis-server on port {} did not answer: {last}; its log ends:\n{}",
            self.port,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ))
    }

    /// One inline command; the reply's first line, or the error it answered.
    pub async fn command(&self, cmd: &str) -> Result<String, String> {
        use tokio::io::AsyncWriteExt;
        let io = async {
            let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .map_err(|e| e.to_string())?;
            conn.write_all(format!("{cmd}\r\n").as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut reply = String::new();
            BufReader::new(conn)
                .read_line(&mut reply)
                .await
                .map_err(|e| e.to_string())?;
            match reply.trim_end() {
                r if r.starts_with('+') || r.starts_with(':') => Ok(r[1..].to_owned()),
                r => Err(format!("{cmd}: {r:?}")),
            }
        };
        tokio::time::timeout(Duration::from_secs(2), io)
            .await
            .map_err(|_| format!("{cmd}: no answer within 2 s"))?
    }

    /// SIGKILL (everything in memory is gone) and start again on the same port.
    pub async fn restart(&self) -> Result<Duration, String> {
        let started = Instant::now();
        self.kill();
        self.spawn().await?;
        Ok(started.elapsed())
    }

    fn kill(&self) {
        if let Some(mut child) = lock(&self.child).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Idempotent; also on every early exit (through `System`'s and its own `Drop`).
    pub fn stop(&self) {
        self.kill();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `--sessions cookie`: the key ring file `holdfast up` re-reads at each instance start.
pub(crate) struct KeyFile {
    pub path: PathBuf,
    /// `kid:base64key` of every key made so far, oldest first.
    made: Mutex<Vec<String>>,
}

impl KeyFile {
    fn create(dir: &Path) -> Result<KeyFile, Error> {
        let keys = KeyFile {
            path: dir.join("session-keys"),
            made: Mutex::new(vec![new_key(0).map_err(Error::io("reading /dev/urandom"))?]),
        };
        keys.write(&keys.current())
            .map_err(|e| Error::Setup(format!("writing the session key file: {e}")))?;
        Ok(keys)
    }

    fn current(&self) -> String {
        lock(&self.made).last().cloned().unwrap_or_default()
    }

    /// Makes a key; returns the (previously) current one and the new one.
    fn add_key(&self) -> Result<(String, String), String> {
        let mut made = lock(&self.made);
        let old = made.last().cloned().unwrap_or_default();
        let new = new_key(made.len()).map_err(|e| format!("reading /dev/urandom: {e}"))?;
        made.push(new.clone());
        Ok((old, new))
    }

    /// Replaces the file atomically (0600: it holds secrets).
    fn write(&self, ring: &str) -> Result<(), String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| e.to_string())?;
        f.write_all(ring.as_bytes()).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, &self.path).map_err(|e| e.to_string())
    }
}

/// `drill<n>:<32 random bytes, base64>`.
fn new_key(n: usize) -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(format!("drill{n}:{}", base64(&bytes)))
}

/// Standard base64 with padding (the drill links no server crate, and this is all it needs).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_standard_vectors() {
        for (raw, b64) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::base64(raw.as_bytes()), b64);
        }
    }
}
