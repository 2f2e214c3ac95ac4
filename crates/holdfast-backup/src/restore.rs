//! Restoring into an empty directory, and refusing to call it done without the engine's
//! integrity check.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};
use time::OffsetDateTime;

use crate::litestream::{self, Config, Point};
use crate::{postgres, Backup, Error, Source, Target, DATABASE_FILE};

/// A step of the caller's run on the restored store once it has passed its checks, before
/// the restore returns (a PostgreSQL restore's server runs only until then): given the
/// store's URL, it says how it went in one line. Its failure does not undo the restore.
pub type Then =
    Box<dyn FnOnce(String) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send>> + Send>;

/// The table every Holdfast store has from its first migration on.
pub(crate) const MIGRATION_LEDGER: &str = "holdfast_schema_migrations";

/// A restore that passed its checks.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The restored database: the SQLite file, or PostgreSQL's data directory.
    pub database: PathBuf,
    /// Which engine's backup it was.
    pub engine: &'static str,
    /// The newest change the target held at or before the moment asked for.
    pub as_of: Point,
    /// What the integrity check answered (`integrity_check ok`, `pg_amcheck ok`:
    /// anything else is an error).
    pub integrity: String,
    /// How long the integrity check took (part of `took`).
    pub checked_in: Duration,
    /// Migrations the restored store records.
    pub migrations: i64,
    /// What the caller's [`Then`] said.
    pub then: Option<Result<String, String>>,
    pub took: Duration,
}

/// Restores the store backed up at `target` into `to` (a new or empty directory), as of `at`
/// (the newest change by default), then checks it and runs `then` on it. On any failure
/// nothing is left in `to` that the restore wrote. Never touches any other path.
///
/// A directory holding a PostgreSQL backup restores as a PostgreSQL data directory (start it
/// with `pg_ctl -D <to> start`); anything else is the SQLite store's backup.
pub async fn restore(
    target: &Target,
    to: &Path,
    at: Option<OffsetDateTime>,
    then: Option<Then>,
) -> Result<Restored, Error> {
    let started = Instant::now();
    if let Some(at) = at {
        if at > OffsetDateTime::now_utc() {
            return Err(Error::Usage(format!(
                "--at {} is in the future; nothing was touched",
                rfc3339(at)
            )));
        }
    }
    let to = std::path::absolute(to).map_err(Error::io("the restore destination"))?;
    let existed = to.exists();
    if existed {
        let mut entries =
            std::fs::read_dir(&to).map_err(Error::io(format!("reading {}", to.display())))?;
        if entries.next().is_some() {
            return Err(Error::Usage(format!(
                "{} is not empty: a restore writes only into a new or empty directory; nothing was touched",
                to.display()
            )));
        }
    }
    // A PostgreSQL backup: in a directory, or fetched from a bucket into a scratch one.
    let fetched = match target {
        Target::S3 { .. } => {
            target.reachable().await?;
            let bucket = crate::pg_s3::Bucket::open(target)?;
            if bucket.holds_postgres().await? {
                let scratch = tempfile::tempdir().map_err(Error::io("a scratch directory"))?;
                crate::pg_s3::fetch(&bucket, scratch.path(), at).await?;
                Some(scratch)
            } else {
                None
            }
        }
        Target::Dir(_) => None,
    };
    let pg_dir = match (target, &fetched) {
        (_, Some(scratch)) => Some(scratch.path().to_path_buf()),
        (Target::Dir(dir), None) if postgres::is_backup(dir) => Some(dir.clone()),
        _ => None,
    };
    if let Some(dir) = pg_dir {
        {
            let dir = &dir;
            std::fs::create_dir_all(&to)
                .map_err(Error::io(format!("creating {}", to.display())))?;
            return match postgres::restore(dir, &to, at, then).await {
                Ok(done) => Ok(Restored {
                    database: to,
                    engine: "postgres",
                    as_of: done.as_of,
                    integrity: done.integrity,
                    checked_in: done.checked_in,
                    migrations: done.migrations,
                    then: done.then,
                    took: started.elapsed(),
                }),
                Err(e) => {
                    clean_up(&to, existed);
                    Err(e)
                }
            };
        }
    }
    let backup = Backup {
        source: Source::Sqlite(to.join(DATABASE_FILE)),
        target: target.clone(),
        run_dir: to.join("run").join("backup"),
    };
    let points = backup.points().await?;
    let as_of = match at {
        None => points.last.clone(),
        Some(at) if at < points.first => {
            return Err(Error::Usage(format!(
                "--at {} is before the first backup at {target} ({}); nothing was touched",
                rfc3339(at),
                rfc3339(points.first)
            )))
        }
        Some(at) if at >= points.last.at => points.last.clone(),
        Some(at) => Point {
            at,
            txid: String::from("as of --at"),
            bytes: 0,
        },
    };
    std::fs::create_dir_all(&to).map_err(Error::io(format!("creating {}", to.display())))?;
    let result = restore_and_check(&backup, at, as_of, then, started).await;
    if result.is_err() {
        clean_up(&to, existed);
    }
    result
}

async fn restore_and_check(
    backup: &Backup,
    at: Option<OffsetDateTime>,
    as_of: Point,
    then: Option<Then>,
    started: Instant,
) -> Result<Restored, Error> {
    let database = backup.source.sqlite_file()?.to_path_buf();
    // The configuration lives outside the destination, which must end up holding only the
    // store.
    let scratch = tempfile::tempdir().map_err(Error::io("a scratch directory"))?;
    let config = Config::write_for(backup, scratch.path())?;
    litestream::restore(&config, &backup.target, at).await?;
    let checking = Instant::now();
    let (integrity, migrations) = check(&database).await.map_err(|detail| Error::Integrity {
        target: backup.target.to_string(),
        detail,
    })?;
    let checked_in = checking.elapsed();
    let then = match then {
        Some(step) => Some(step(format!("sqlite:{}", database.display())).await),
        None => None,
    };
    Ok(Restored {
        database,
        engine: "sqlite",
        as_of,
        integrity: format!("integrity_check {integrity}"),
        checked_in,
        migrations,
        then,
        took: started.elapsed(),
    })
}

/// SQLite's full `integrity_check` must answer exactly `ok`, and the file must be a Holdfast
/// store (its migration ledger is readable and not empty).
pub(crate) async fn check(database: &Path) -> Result<(String, i64), String> {
    let mut conn = SqliteConnectOptions::new()
        .filename(database)
        .create_if_missing(false)
        .connect()
        .await
        .map_err(|e| format!("SQLite cannot open it: {e}"))?;
    let answers: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_all(&mut conn)
        .await
        .map_err(|e| format!("PRAGMA integrity_check failed: {e}"))?;
    if answers != ["ok"] {
        return Err(format!("PRAGMA integrity_check: {}", answers.join("; ")));
    }
    let migrations: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {MIGRATION_LEDGER}"))
        .fetch_one(&mut conn)
        .await
        .map_err(|_| "not a Holdfast store (it has no migration ledger)".to_owned())?;
    if migrations == 0 {
        return Err("not a Holdfast store (its migration ledger is empty)".to_owned());
    }
    let _ = conn.close().await;
    Ok(("ok".to_owned(), migrations))
}

/// Removes what a failed restore wrote: the directory if we made it, else its contents.
pub(crate) fn clean_up(to: &Path, existed: bool) {
    if !existed {
        let _ = std::fs::remove_dir_all(to);
        return;
    }
    for entry in std::fs::read_dir(to).into_iter().flatten().flatten() {
        let path = entry.path();
        let _ = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
    }
}

/// `at` as RFC 3339, as operators type it back.
pub fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| at.to_string())
}
