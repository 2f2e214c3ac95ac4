//! Backups of the store, on either engine, that are proven by restoring them.
//!
//! Holdfast survives losing any process, but a lost disk takes the database with it. This
//! crate ships the database's changes somewhere else as they commit and brings them back:
//!
//! - [`Continuous`] keeps the engine's replicator running as a supervised child process —
//!   Litestream (the field's SQLite WAL shipper) for the embedded store, `pg_receivewal` on a
//!   replication slot (after a `pg_basebackup`) for PostgreSQL — to a [`Target`], a directory
//!   or an S3-compatible bucket, and proves it every few seconds (a forced sync; the
//!   receiver's flush position reaching the server's), publishing the success time
//!   ([`Health`]) for the operator port and `holdfast backup status`.
//! - [`Backup::now`] forces one sync, [`Backup::points`] lists what can be restored.
//! - [`restore`] writes the database as of a moment into an empty directory and refuses to
//!   report success unless the engine's check passes (SQLite's `PRAGMA integrity_check`;
//!   `pg_verifybackup`, a replay that reaches what the backup proved, and `pg_amcheck`) and
//!   it is a Holdfast store (it has the migration ledger).
//!
//! A restore never writes to a live database: its destination must be new or empty, and a
//! PostgreSQL restore's server listens only on a private Unix socket. Replication does write
//! to the live one, as little as it can: Litestream keeps two small bookkeeping tables of its
//! own in it and is the only one to checkpoint its WAL (every process on the database runs
//! with SQLite's autocheckpoint off: see `holdfast-store`'s
//! `StoreOptions::sqlite_autocheckpoint`); on PostgreSQL the backup holds a replication slot.

mod continuous;
mod litestream;
mod pg_s3;
mod postgres;
mod restore;
mod target;

pub use continuous::{Continuous, Health};
pub use litestream::{Point, Points};
pub use restore::{restore, rfc3339, Restored, Then};
pub use target::Target;

use std::path::{Path, PathBuf};

/// Everything that can go wrong, each with the one line an operator reads.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another continuous backup of the same database is running.
    #[error("a continuous backup of {0} is already running (only one may replicate it)")]
    AlreadyRunning(String),
    /// A flag or argument that names something impossible (a bad target, a time in the
    /// future, a destination that is not empty). Nothing was touched.
    #[error("{0}")]
    Usage(String),
    /// The Litestream binary is not installed.
    #[error(
        "litestream is not installed: run scripts/install-backup-tools.sh (or set LITESTREAM to its path)"
    )]
    NoTool,
    /// A PostgreSQL restore's `--at` is past the last commit the backup holds (the restore
    /// then goes to its newest change instead).
    #[error("--at is later than the newest change the backup holds")]
    PastNewest,
    /// The target holds no backup.
    #[error("no backup at {target}: {why}")]
    NoBackup { target: String, why: String },
    /// Litestream failed; its own last words.
    #[error("{what}: {detail}")]
    Tool { what: String, detail: String },
    /// The restored file failed the engine's integrity check, or is not a Holdfast store.
    #[error("the restore from {target} is not sound: {detail}")]
    Integrity { target: String, detail: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl Error {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

/// The database file inside a data directory, as the store names it.
pub const DATABASE_FILE: &str = "holdfast.sqlite";

/// The database a backup is of.
#[derive(Debug, Clone)]
pub enum Source {
    /// The embedded store's file, replicated by Litestream.
    Sqlite(PathBuf),
    /// A PostgreSQL server (`postgres://…`, the database the store lives in), backed up as a
    /// whole cluster: a base backup (`pg_basebackup`) and its WAL as it is written
    /// (`pg_receivewal`).
    Postgres(String),
}

impl Source {
    /// The SQLite file, for the Litestream paths (which only SQLite sources take).
    pub(crate) fn sqlite_file(&self) -> Result<&Path, Error> {
        match self {
            Source::Sqlite(file) => Ok(file),
            Source::Postgres(_) => Err(Error::Usage(
                "a PostgreSQL backup has no SQLite file".to_owned(),
            )),
        }
    }
}

impl std::fmt::Display for Source {
    /// The file, or the server and database without a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Sqlite(file) => write!(f, "{}", file.display()),
            Source::Postgres(url) => f.write_str(&postgres::redacted(url)),
        }
    }
}

/// One database and the target it is backed up to, with a directory of its own for the
/// replication's configuration, control socket and state (`<data dir>/run/backup`).
#[derive(Debug, Clone)]
pub struct Backup {
    /// The live database.
    pub source: Source,
    pub target: Target,
    /// Where [`Continuous`] keeps its files.
    pub run_dir: PathBuf,
}

impl Backup {
    /// The SQLite store in `data_dir` (`holdfast.sqlite`), backed up to `target`.
    pub fn of_data_dir(data_dir: &Path, target: Target) -> Result<Backup, Error> {
        let data_dir = std::path::absolute(data_dir).map_err(Error::io("the data directory"))?;
        Ok(Backup {
            source: Source::Sqlite(data_dir.join(DATABASE_FILE)),
            target,
            run_dir: data_dir.join("run").join("backup"),
        })
    }

    /// The PostgreSQL server `url` names, backed up to `target`, with its run files (and,
    /// for an S3 target, the spool the mirror ships from) in `data_dir`.
    pub fn of_postgres(url: &str, data_dir: &Path, target: Target) -> Result<Backup, Error> {
        let data_dir = std::path::absolute(data_dir).map_err(Error::io("the data directory"))?;
        Ok(Backup {
            source: Source::Postgres(url.to_owned()),
            target,
            run_dir: data_dir.join("run").join("backup"),
        })
    }

    /// Forces the database's changes out to the target now and waits until they are there:
    /// through the running [`Continuous`] replication if there is one, else by one
    /// replication pass of its own (on PostgreSQL: a new base backup).
    pub async fn now(&self) -> Result<Synced, Error> {
        let started = std::time::Instant::now();
        if let Source::Sqlite(file) = &self.source {
            if !file.exists() {
                return Err(Error::Usage(format!(
                    "{} does not exist: nothing to back up",
                    file.display()
                )));
            }
        }
        if let Some(running) = continuous::supervised(self) {
            if running != self.target.to_string() {
                return Err(Error::Usage(format!(
                    "the continuous backup of {} runs to {running}, not to {}; nothing was done",
                    self.source, self.target
                )));
            }
            if let Source::Postgres(url) = &self.source {
                let synced = postgres::prove(url, &self.pg_dir()?).await?;
                // For a bucket, the running mirror must have shipped it too.
                if let Target::S3 { .. } = self.target {
                    let bucket = pg_s3::Bucket::open(&self.target)?;
                    pg_s3::bucket_reaches(&bucket, synced.txid.unwrap_or(0)).await?;
                }
                return Ok(synced);
            }
            // Through the running replication, which may be (re)starting Litestream.
            let mut tries = 0;
            loop {
                match litestream::sync(self).await {
                    Err(_) if tries < 20 && !self.run_dir.join("litestream.sock").exists() => {
                        tries += 1;
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    }
                    done => return done,
                }
            }
        }
        if let Source::Postgres(url) = &self.source {
            let dir = self.pg_dir()?;
            self.target.reachable().await?;
            postgres::prepare(url, &dir, false).await?;
            let base = postgres::take_base(url, &dir).await?;
            tracing::info!(base = %base.display(), "base backup taken");
            if let Target::S3 { .. } = self.target {
                pg_s3::Mirror::new(pg_s3::Bucket::open(&self.target)?, dir)
                    .ship(0)
                    .await?;
            }
            return Ok(Synced {
                txid: None,
                took: started.elapsed(),
            });
        }
        let config = litestream::Config::write_for(self, &self.run_dir)?;
        litestream::replicate_once(&config, &self.target).await?;
        Ok(Synced {
            txid: None,
            took: started.elapsed(),
        })
    }

    /// What the target holds: the range of moments a restore can return to.
    pub async fn points(&self) -> Result<Points, Error> {
        if let Source::Postgres(_) = &self.source {
            return match &self.target {
                Target::Dir(dir) => postgres::points(dir),
                Target::S3 { .. } => {
                    self.target.reachable().await?;
                    pg_s3::points(&pg_s3::Bucket::open(&self.target)?).await
                }
            };
        }
        let scratch = tempfile::tempdir().map_err(Error::io("a scratch directory"))?;
        let config = litestream::Config::write_for(self, scratch.path())?;
        litestream::points(&config, &self.target).await
    }
}

impl Backup {
    /// Where a PostgreSQL backup's files are written: the target directory, or for a bucket
    /// the spool its mirror ships from.
    pub(crate) fn pg_dir(&self) -> Result<PathBuf, Error> {
        Ok(match &self.target {
            Target::Dir(dir) => dir.clone(),
            Target::S3 { .. } => self.run_dir.join("spool"),
        })
    }
}

/// One forced sync.
#[derive(Debug, Clone)]
pub struct Synced {
    /// The last transaction now at the target (Litestream's TXID), when the running
    /// replication reported it.
    pub txid: Option<u64>,
    pub took: std::time::Duration,
}

use holdfast_core::now_ms;
