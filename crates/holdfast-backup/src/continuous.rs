//! Continuous replication: the engine's replicator (Litestream for SQLite, `pg_receivewal`
//! for PostgreSQL) kept running as a child process, restarted when it dies, and proven every
//! few seconds by a check whose success is published.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::litestream::{self, Config};
use crate::{now_ms, pg_s3, postgres, Backup, Error, Source, Synced, Target};

/// The replication's state file in [`Backup::run_dir`], rewritten after every check.
const STATE_FILE: &str = "state.json";
/// The replicator's pid while it runs, so a successor can stop one its killed supervisor left.
const PID_FILE: &str = "replicator.pid";

/// What the replication last proved, as published and as written to its state file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Health {
    /// The target, as given.
    pub target: String,
    /// The last forced sync that reached the target (ms since the Unix epoch).
    pub last_success_ms: Option<i64>,
    /// The transaction it carried.
    pub txid: Option<u64>,
    /// The last check's failure, cleared by the next success.
    pub last_error: Option<String>,
    /// Times the replicator exited and was started again.
    pub restarts: u64,
    /// The process replicating now (Litestream or `pg_receivewal`) and the one supervising it.
    pub replicator_pid: Option<u32>,
    pub supervisor_pid: u32,
    /// When this state was written (ms since the Unix epoch).
    pub written_ms: i64,
}

impl Health {
    /// The state the running (or last) replication of `backup` wrote, if any.
    pub fn read(backup: &Backup) -> Option<Health> {
        let bytes = std::fs::read(backup.run_dir.join(STATE_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// `holdfast_backup_*` in the exposition format, labelled with `role`.
    pub fn render_metrics(&self, role: &str) -> String {
        let mut out = String::new();
        let name = "holdfast_backup_last_success_timestamp_seconds";
        out += &format!("# HELP {name} When the continuous backup last proved the target holds every committed change, Unix seconds; 0 before the first.\n# TYPE {name} gauge\n");
        let at = self.last_success_ms.map_or(0.0, |ms| ms as f64 / 1000.0);
        out += &format!("{name}{{role=\"{role}\"}} {at}\n");
        let name = "holdfast_backup_restarts_total";
        out += &format!("# HELP {name} Times the replication process exited and was started again.\n# TYPE {name} counter\n");
        out += &format!("{name}{{role=\"{role}\"}} {}\n", self.restarts);
        out
    }
}

/// The target of the replication of `backup` supervised now, if one is: only it may
/// replicate the database. (Its supervisor holds the lock file; a dead one's is free.)
pub(crate) fn supervised(backup: &Backup) -> Option<String> {
    let file = std::fs::File::open(backup.run_dir.join(LOCK_FILE)).ok()?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock) {
        Ok(_free) => None,
        Err(_) => Health::read(backup).map(|h| h.target),
    }
}

/// Held (`flock`, exclusive) by the supervisor of a running replication for its lifetime.
const LOCK_FILE: &str = "lock";

/// A running replication; dropping it stops the replicator.
pub struct Continuous {
    /// One replication per database: released when this is dropped or the process dies.
    _lock: nix::fcntl::Flock<std::fs::File>,
    backup: Backup,
    health: watch::Receiver<Health>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Continuous {
    fn drop(&mut self) {
        // Aborting drops the child, whose `kill_on_drop` ends the replicator.
        self.task.abort();
    }
}

impl Continuous {
    /// Starts replicating `backup.source` to `backup.target`, checking every `check_every`.
    /// Fails at once if the replicator is not installed or its configuration cannot be
    /// written; a target or server that cannot be reached shows as failed checks, not as an
    /// error here.
    pub fn start(backup: Backup, check_every: Duration) -> Result<Continuous, Error> {
        std::fs::create_dir_all(&backup.run_dir)
            .map_err(Error::io(format!("creating {}", backup.run_dir.display())))?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(backup.run_dir.join(LOCK_FILE))
            .map_err(Error::io("opening the backup's lock file"))?;
        let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| Error::AlreadyRunning(backup.source.to_string()))?;
        let engine = Engine::for_backup(&backup)?;
        stop_leftover(&backup.run_dir, &engine.mark());
        let (tx, health) = watch::channel(Health {
            target: backup.target.to_string(),
            supervisor_pid: std::process::id(),
            ..Health::default()
        });
        let task = tokio::spawn(supervise(backup.clone(), engine, check_every, tx));
        Ok(Continuous {
            _lock: lock,
            backup,
            health,
            task,
        })
    }

    /// What the replication last proved.
    pub fn health(&self) -> Health {
        self.health.borrow().clone()
    }

    /// Ships what is left, then stops: the end of a graceful shutdown.
    pub async fn finish(self) -> Result<crate::Synced, Error> {
        match &self.backup.source {
            Source::Sqlite(_) => litestream::sync(&self.backup).await,
            Source::Postgres(_) => self.backup.now().await,
        }
    }

    /// Follows what the replication proves, for a metrics page.
    pub fn watch(&self) -> watch::Receiver<Health> {
        self.health.clone()
    }
}

/// What a replicator of one engine does: its command, when it is ready, and its proof.
enum Engine {
    Litestream(Config),
    Postgres {
        url: String,
        /// The target directory, or the spool a mirror ships to a bucket.
        dir: PathBuf,
        mirror: Option<MirrorState>,
    },
}

/// The mirror of a PostgreSQL backup to a bucket: ships on its own task.
struct MirrorState {
    bucket: pg_s3::Bucket,
    running: Option<(watch::Receiver<u64>, AbortOnDrop)>,
}

/// A task that ends when its handle is dropped (with the supervisor's own task).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Engine {
    fn for_backup(backup: &Backup) -> Result<Engine, Error> {
        Ok(match &backup.source {
            Source::Sqlite(_) => {
                litestream::binary()?;
                Engine::Litestream(Config::write_for(backup, &backup.run_dir)?)
            }
            Source::Postgres(url) => {
                postgres::bin("pg_receivewal")?;
                postgres::bin("pg_basebackup")?;
                let mirror = match backup.target {
                    Target::Dir(_) => None,
                    Target::S3 { .. } => Some(MirrorState {
                        bucket: pg_s3::Bucket::open(&backup.target)?,
                        running: None,
                    }),
                };
                Engine::Postgres {
                    url: url.clone(),
                    dir: backup.pg_dir()?,
                    mirror,
                }
            }
        })
    }

    /// What the replicator's command line holds that names this backup alone.
    fn mark(&self) -> String {
        match self {
            Engine::Litestream(config) => config.path.to_string_lossy().into_owned(),
            Engine::Postgres { dir, .. } => dir.join("wal").to_string_lossy().into_owned(),
        }
    }

    /// Before each start: on PostgreSQL the slot, and a base backup when there is none (for
    /// a bucket: none in the bucket), and the mirror's task.
    async fn prepare(&mut self) -> Result<(), Error> {
        match self {
            Engine::Litestream(config) => {
                let _ = std::fs::remove_file(&config.socket);
                Ok(())
            }
            Engine::Postgres {
                url,
                dir,
                mirror: None,
            } => postgres::prepare(url, dir, true).await,
            Engine::Postgres {
                url,
                dir,
                mirror: Some(mirror),
            } => {
                let needs_base = !mirror.bucket.has_base().await?;
                postgres::prepare(url, dir, needs_base).await?;
                if mirror.running.is_none() {
                    let shipping = pg_s3::Mirror::new(mirror.bucket.clone(), dir.clone());
                    let shipped = shipping.shipped();
                    let task = tokio::spawn(shipping.run(url.clone()));
                    mirror.running = Some((shipped, AbortOnDrop(task)));
                }
                Ok(())
            }
        }
    }

    fn command(&self) -> Result<tokio::process::Command, Error> {
        match self {
            Engine::Litestream(config) => litestream::replicate_command(config),
            Engine::Postgres { url, dir, .. } => postgres::receiver_command(url, dir),
        }
    }

    /// Waits (briefly) until the replicator can be asked for a proof.
    async fn ready(&self, child: &mut tokio::process::Child) {
        let Engine::Litestream(config) = self else {
            return;
        };
        for _ in 0..200 {
            if config.socket.exists() || matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn prove(&self, backup: &Backup) -> Result<Synced, Error> {
        match self {
            Engine::Litestream(_) => litestream::sync(backup).await,
            Engine::Postgres { url, dir, mirror } => {
                let synced = postgres::prove(url, dir).await?;
                if let Some((shipped, _)) = mirror.as_ref().and_then(|m| m.running.as_ref()) {
                    pg_s3::shipped_to(&mut shipped.clone(), synced.txid.unwrap_or(0)).await?;
                }
                Ok(synced)
            }
        }
    }
}

/// Stops a replicator that a killed supervisor of this data dir left running (it would race
/// the new one for the same target).
fn stop_leftover(run_dir: &Path, mark: &str) {
    let Some(pid) = std::fs::read_to_string(run_dir.join(PID_FILE))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let ours = String::from_utf8_lossy(&cmdline).contains(mark);
    if ours {
        warn!(pid, "stopping the replication a previous run left behind");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

async fn supervise(
    backup: Backup,
    mut engine: Engine,
    check_every: Duration,
    health: watch::Sender<Health>,
) {
    let publish = |change: &dyn Fn(&mut Health)| {
        health.send_modify(|h| {
            change(h);
            h.written_ms = now_ms();
        });
        write_state(&backup.run_dir, &health.borrow());
    };
    loop {
        if let Err(e) = engine.prepare().await {
            warn!(error = %e, "the backup cannot start yet");
            publish(&|h| h.last_error = Some(e.to_string()));
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        let child = engine.command().and_then(|mut cmd| {
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(Error::io("starting the replicator"))
        });
        let mut child = match child {
            Ok(child) => child,
            Err(e) => {
                publish(&|h| h.last_error = Some(e.to_string()));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let pid = child.id();
        if let Some(pid) = pid {
            let _ = std::fs::write(backup.run_dir.join(PID_FILE), pid.to_string());
        }
        publish(&|h| h.replicator_pid = pid);
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(pass_on_warnings(stderr));
        }
        info!(target = %backup.target, database = %backup.source, "continuous backup started");
        engine.ready(&mut child).await;
        let mut tick = tokio::time::interval(check_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let exited = loop {
            tokio::select! {
                status = child.wait() => break status,
                _ = tick.tick() => {}
            }
            match engine.prove(&backup).await {
                Ok(synced) => publish(&|h| {
                    h.last_success_ms = Some(now_ms());
                    h.txid = synced.txid;
                    h.last_error = None;
                }),
                Err(e) => publish(&|h| h.last_error = Some(e.to_string())),
            }
        };
        let why = match exited {
            Ok(status) => status.to_string(),
            Err(e) => e.to_string(),
        };
        warn!(%why, "the replicator exited; starting it again");
        publish(&|h| {
            h.restarts += 1;
            h.replicator_pid = None;
            h.last_error = Some(format!("the replicator exited ({why})"));
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Writes the state file atomically (a reader never sees half of it).
fn write_state(run_dir: &Path, health: &Health) {
    let path: PathBuf = run_dir.join(STATE_FILE);
    let tmp = run_dir.join(format!("{STATE_FILE}.tmp"));
    let Ok(json) = serde_json::to_vec(health) else {
        return;
    };
    if std::fs::write(&tmp, json)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .is_err()
    {
        warn!(path = %path.display(), "cannot write the backup state");
    }
}

/// The replicator's warnings and errors go to our log; its routine lines do not.
async fn pass_on_warnings(stderr: tokio::process::ChildStderr) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let litestream = line.contains("level=WARN") || line.contains("level=ERROR");
        let postgres = line.contains("error:") || line.contains("warning:");
        if litestream || postgres {
            warn!(replicator = %line);
        }
    }
}
