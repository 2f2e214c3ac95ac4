//! PostgreSQL: a base backup (`pg_basebackup`, with the WAL it needs) and every WAL record
//! after it as the server writes it (`pg_receivewal --synchronous` on a replication slot of
//! ours, so the server keeps what the receiver has not yet flushed). A restore copies the
//! newest fitting base backup, replays the WAL to the end or to `--at`, and checks the result
//! with `pg_amcheck` on a server nobody else can reach (a Unix socket in a private directory,
//! no TCP) before anyone may serve it.
//!
//! The target directory's layout:
//!
//! ```text
//! postgres.json      which cluster (system identifier) and database this is a backup of
//! base/<UTC time>/   base backups, each complete when it appears (taken aside, renamed)
//! wal/               WAL segments; the one being received ends in `.partial`
//! ```

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};
use time::OffsetDateTime;

use crate::litestream::{Point, Points};
use crate::{Error, Synced};

/// The replication slot the receiver streams from: the server keeps WAL until it is ours.
pub(crate) const SLOT: &str = "holdfast_backup";
/// Marks a target as a PostgreSQL backup, and of which cluster.
pub(crate) const MARKER: &str = "postgres.json";
/// How long a proof waits for the receiver to flush what the server has flushed.
const PROOF_DEADLINE: Duration = Duration::from_secs(10);
/// How long a base backup, or a restore's recovery, may take.
const LONG_DEADLINE: Duration = Duration::from_secs(3600);

#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    /// `pg_control_system().system_identifier`: a backup of one cluster only.
    system_identifier: String,
    /// The database the store lives in (the one a restore checks for the migration ledger).
    database: String,
}

/// Whether `dir` holds a PostgreSQL backup.
pub(crate) fn is_backup(dir: &Path) -> bool {
    dir.join(MARKER).is_file()
}

/// `url` without its password.
pub(crate) fn redacted(url: &str) -> String {
    match url.parse::<PgConnectOptions>() {
        Ok(o) => format!(
            "postgres://{}@{}:{}/{}",
            o.get_username(),
            o.get_host(),
            o.get_port(),
            o.get_database().unwrap_or("")
        ),
        Err(_) => "postgres://…".to_owned(),
    }
}

/// A PostgreSQL program: from the newest `/usr/lib/postgresql/*/bin` (Debian keeps the
/// server's tools there), else from `PATH`.
pub(crate) fn bin(name: &str) -> Result<PathBuf, Error> {
    let debian = holdfast_core::debian_postgres_bin_dirs();
    if let Some(path) = debian
        .into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
    {
        return Ok(path);
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .ok_or_else(|| {
            Error::Usage(format!(
                "{name} is not installed: PostgreSQL backups need the server's tools (scripts/install-drill-deps.sh installs them)"
            ))
        })
}

/// The line of a server's log that says why it stopped: its last FATAL or PANIC that is not
/// the refusal of one of our connection attempts (a refusal logged while the server shut
/// down would otherwise hide the reason, such as a recovery target it could not reach).
fn why_it_stopped(log: &str) -> String {
    let refusal = |l: &str| {
        [
            "not accepting connections",
            "is starting up",
            "is shutting down",
            "in recovery mode",
        ]
        .iter()
        .any(|r| l.contains(r))
    };
    let fatal: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("FATAL") || l.contains("PANIC"))
        .collect();
    fatal
        .iter()
        .rev()
        .find(|l| !refusal(l))
        .or(fatal.last())
        .map_or_else(String::new, |l| (*l).to_owned())
}

pub(crate) async fn connect(url: &str) -> Result<PgConnection, Error> {
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e| Error::Usage(format!("{}: not a PostgreSQL URL ({e})", redacted(url))))?;
    options
        .log_statements(tracing::log::LevelFilter::Off)
        .connect()
        .await
        .map_err(|e| Error::Tool {
            what: format!("connecting to {}", redacted(url)),
            detail: e.to_string(),
        })
}

fn sql(what: &str) -> impl FnOnce(sqlx::Error) -> Error + '_ {
    move |e| Error::Tool {
        what: what.to_owned(),
        detail: e.to_string(),
    }
}

/// `X/Y` as a number.
pub(crate) fn lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// Makes `dir` a backup of the cluster `url` names (or checks it is one already), and makes
/// sure the slot exists; with `base`, takes a base backup when there is none yet.
pub(crate) async fn prepare(url: &str, dir: &Path, base: bool) -> Result<(), Error> {
    let mut conn = connect(url).await?;
    let (system, database): (String, String) = sqlx::query_as(
        "SELECT system_identifier::text, current_database()::text FROM pg_control_system()",
    )
    .fetch_one(&mut conn)
    .await
    .map_err(sql("reading the cluster's identity"))?;
    for sub in ["base", "wal"] {
        std::fs::create_dir_all(dir.join(sub))
            .map_err(Error::io(format!("creating {}", dir.join(sub).display())))?;
    }
    match read_marker(dir) {
        Ok(marker) if marker.system_identifier != system => {
            return Err(Error::Usage(format!(
                "{} holds a backup of another PostgreSQL cluster (system {}, this one is {system}): give each cluster a directory of its own",
                dir.display(),
                marker.system_identifier
            )))
        }
        Ok(_) => {}
        Err(_) => {
            let marker = serde_json::to_vec_pretty(&Marker {
                system_identifier: system,
                database,
            })
            .map_err(|e| Error::Usage(e.to_string()))?;
            std::fs::write(dir.join(MARKER), marker)
                .map_err(Error::io(format!("writing {}", dir.join(MARKER).display())))?;
        }
    }
    // Reserved at once: the server keeps WAL from now on until the receiver has it.
    sqlx::query(
        "SELECT pg_create_physical_replication_slot($1, true) \
         WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
    )
    .bind(SLOT)
    .execute(&mut conn)
    .await
    .map_err(sql("creating the backup's replication slot"))?;
    let _ = conn.close().await;
    if base && bases(dir)?.is_empty() {
        take_base(url, dir).await?;
    }
    Ok(())
}

fn read_marker(dir: &Path) -> Result<Marker, Error> {
    let bytes = std::fs::read(dir.join(MARKER)).map_err(|e| Error::NoBackup {
        target: dir.display().to_string(),
        why: format!("no {MARKER} ({e})"),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| Error::NoBackup {
        target: dir.display().to_string(),
        why: format!("{MARKER} is not ours ({e})"),
    })
}

/// The base backups in `dir`, oldest first, with the moment each was complete.
fn bases(dir: &Path) -> Result<Vec<(OffsetDateTime, PathBuf)>, Error> {
    let base = dir.join("base");
    let mut found: Vec<(OffsetDateTime, PathBuf)> = std::fs::read_dir(&base)
        .map_err(Error::io(format!("reading {}", base.display())))?
        .flatten()
        .filter_map(|e| {
            let at = parse_stamp(e.file_name().to_str()?)?;
            Some((at, e.path()))
        })
        .collect();
    found.sort();
    Ok(found)
}

const STAMP: &[time::format_description::BorrowedFormatItem<'static>] =
    time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");

pub(crate) fn parse_stamp(name: &str) -> Option<OffsetDateTime> {
    time::PrimitiveDateTime::parse(name, STAMP)
        .ok()
        .map(time::PrimitiveDateTime::assume_utc)
}

/// Takes a base backup into `dir/base/<time it was complete>`: written aside, renamed when
/// `pg_basebackup` has finished (and synced it), so a base backup that is there is whole.
pub(crate) async fn take_base(url: &str, dir: &Path) -> Result<PathBuf, Error> {
    let aside = dir
        .join("base")
        .join(format!(".taking-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&aside);
    let mut args: Vec<OsString> = vec!["-d".into(), url.into(), "-D".into(), aside.clone().into()];
    args.extend(
        [
            "-X",
            "stream",
            "-c",
            "fast",
            "-l",
            "holdfast",
            "--no-password",
        ]
        .into_iter()
        .map(OsString::from),
    );
    let done = run(
        "pg_basebackup",
        "taking a base backup",
        &args,
        LONG_DEADLINE,
    )
    .await;
    if let Err(e) = done {
        let _ = std::fs::remove_dir_all(&aside);
        return Err(e);
    }
    let now = OffsetDateTime::now_utc();
    let mut name = now.format(STAMP).map_err(|e| Error::Usage(e.to_string()))?;
    // Two in one second: the second waits for a name of its own.
    while dir.join("base").join(&name).exists() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        name = OffsetDateTime::now_utc()
            .format(STAMP)
            .map_err(|e| Error::Usage(e.to_string()))?;
    }
    let path = dir.join("base").join(name);
    std::fs::rename(&aside, &path).map_err(Error::io(format!("naming {}", path.display())))?;
    Ok(path)
}

/// The long-running receiver for `url` into `dir/wal`, not yet started: it flushes every
/// record as it arrives and tells the server so at once (`--synchronous`), and exits on any
/// failure for its supervisor to start it again (`--no-loop`). Dies with its supervisor.
pub(crate) fn receiver_command(url: &str, dir: &Path) -> Result<tokio::process::Command, Error> {
    let receiver = bin("pg_receivewal")?;
    let mut cmd = crate::litestream::dies_with_parent(receiver);
    cmd.arg("-D")
        .arg(dir.join("wal"))
        .args([
            "--slot",
            SLOT,
            "--synchronous",
            "--no-loop",
            "--no-password",
        ])
        .arg("-d")
        .arg(url);
    Ok(cmd)
}

/// Proves the target holds every change the server has flushed now: waits until the
/// receiver on our slot reports it has flushed at least the server's flush position.
pub(crate) async fn prove(url: &str, dir: &Path) -> Result<Synced, Error> {
    let started = Instant::now();
    let mut conn = connect(url).await?;
    let wanted: String = sqlx::query_scalar("SELECT pg_current_wal_flush_lsn()::text")
        .fetch_one(&mut conn)
        .await
        .map_err(sql("reading the server's WAL position"))?;
    let wanted_at = lsn(&wanted).unwrap_or(u64::MAX);
    loop {
        let flushed = receiver_flushed(&mut conn).await?;
        match flushed {
            Some(at) if at >= wanted_at => {
                let _ = conn.close().await;
                write_proven(dir, at);
                return Ok(Synced {
                    txid: Some(at),
                    took: started.elapsed(),
                });
            }
            _ if started.elapsed() > PROOF_DEADLINE => {
                return Err(Error::Tool {
                    what: "proving the backup".into(),
                    detail: match flushed {
                        None => "no WAL receiver is streaming from the backup's slot".into(),
                        Some(at) => format!(
                            "the target has WAL to {}, the server flushed to {wanted}",
                            lsn_text(at)
                        ),
                    },
                })
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// How far the receiver on our slot has flushed, as the server knows it; `None` when none
/// streams.
pub(crate) async fn receiver_flushed(conn: &mut PgConnection) -> Result<Option<u64>, Error> {
    let flushed: Option<String> = sqlx::query_scalar(
        "SELECT r.flush_lsn::text FROM pg_stat_replication r \
         JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = $1",
    )
    .bind(SLOT)
    .fetch_optional(&mut *conn)
    .await
    .map_err(sql("reading the receiver's position"))?
    .flatten();
    Ok(flushed.as_deref().and_then(lsn))
}

/// Whether two markers name the same cluster.
pub(crate) fn same_cluster(a: &[u8], b: &[u8]) -> bool {
    let id = |m: &[u8]| {
        serde_json::from_slice::<Marker>(m)
            .ok()
            .map(|m| m.system_identifier)
    };
    id(a).is_some() && id(a) == id(b)
}

/// The base backup a restore as of `at` starts from: the newest complete at or before it.
pub(crate) fn choose<T: Clone>(
    bases: &[(OffsetDateTime, T)],
    at: Option<OffsetDateTime>,
    shown: &str,
) -> Result<(OffsetDateTime, T), Error> {
    let first = bases.first().map(|b| b.0).ok_or_else(|| Error::NoBackup {
        target: shown.to_owned(),
        why: "it holds no base backup".into(),
    })?;
    match at {
        None => bases.last().cloned(),
        Some(at) => bases.iter().rev().find(|b| b.0 <= at).cloned(),
    }
    .ok_or_else(|| {
        Error::Usage(format!(
            "--at {} is before the first backup at {shown} ({}); nothing was touched",
            at.map(crate::rfc3339).unwrap_or_default(),
            crate::rfc3339(first)
        ))
    })
}

/// One WAL page: a proof may end inside a record that spans pages.
const WAL_PAGE: u64 = 8192;
/// The newest position a proof found in the target, for a restore to check it reached.
pub(crate) const PROVEN: &str = "proven";

fn read_proven(dir: &Path) -> Option<u64> {
    lsn(std::fs::read_to_string(dir.join(PROVEN)).ok()?.trim())
}

/// Records that the target holds WAL to `at` (written aside and renamed: never half).
fn write_proven(dir: &Path, at: u64) {
    let aside = dir.join(format!("{PROVEN}.tmp"));
    if std::fs::write(&aside, lsn_text(at))
        .and_then(|()| std::fs::rename(&aside, dir.join(PROVEN)))
        .is_err()
    {
        tracing::warn!(dir = %dir.display(), "cannot record the backup's proven position");
    }
}

pub(crate) fn lsn_text(at: u64) -> String {
    format!("{:X}/{:X}", at >> 32, at & 0xffff_ffff)
}

/// Copies the WAL segments a restore of `base` needs from the target's `wal` into `pg_wal`:
/// every segment from the one the base backup began in on (a `.partial` one, still being
/// received when the backup was lost, under its full name), and the timeline histories.
fn copy_wal(wal: &Path, base: &Path, pg_wal: &Path) -> Result<usize, Error> {
    let start = start_segment(base)?;
    let mut copied = 0;
    for entry in std::fs::read_dir(wal).map_err(Error::io(format!("reading {}", wal.display())))? {
        let entry = entry.map_err(Error::io("reading the backup's WAL"))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let full = name.strip_suffix(".partial").unwrap_or(&name);
        // A completed segment wins over a partial one of the same name.
        if !wanted_segment(full, &start) || (name != full && wal.join(full).exists()) {
            continue;
        }
        std::fs::copy(entry.path(), pg_wal.join(full))
            .map_err(Error::io(format!("copying {name}")))?;
        copied += 1;
    }
    Ok(copied)
}

/// The WAL segment a base backup began in (its `backup_label`).
pub(crate) fn start_segment(base: &Path) -> Result<String, Error> {
    let label = std::fs::read_to_string(base.join("backup_label")).map_err(Error::io(format!(
        "reading {}/backup_label",
        base.display()
    )))?;
    label
        .lines()
        .find_map(|l| l.strip_prefix("START WAL LOCATION: "))
        .and_then(|l| l.split("(file ").nth(1))
        .map(|f| f.trim_end_matches(')').to_owned())
        .filter(|f| f.len() == 24)
        .ok_or_else(|| Error::Integrity {
            target: base.display().to_string(),
            detail: "its backup_label names no start segment".into(),
        })
}

/// Whether a restore from a base backup that began in segment `start` needs the WAL file
/// `name`: the timelines' histories, and every segment from `start` on.
pub(crate) fn wanted_segment(name: &str, start: &str) -> bool {
    name.ends_with(".history")
        || (name.len() == 24 && name[8..] >= start[8..] && name[..8] >= start[..8])
}

/// What `dir` holds: its base backups, and WAL up to the newest segment received.
pub(crate) fn points(dir: &Path) -> Result<Points, Error> {
    read_marker(dir)?;
    let no_backup = |why: &str| Error::NoBackup {
        target: dir.display().to_string(),
        why: why.to_owned(),
    };
    let bases = bases(dir)?;
    let mut snapshots = Vec::new();
    let mut bytes = 0;
    let mut files = 0;
    for (at, path) in &bases {
        let size = tree_size(path);
        bytes += size;
        files += 1;
        snapshots.push(Point {
            at: *at,
            txid: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            bytes: size,
        });
    }
    let first = snapshots
        .first()
        .map(|s| s.at)
        .ok_or_else(|| no_backup("it holds no base backup"))?;
    let mut last = snapshots
        .last()
        .cloned()
        .ok_or_else(|| no_backup("no base backup"))?;
    for entry in std::fs::read_dir(dir.join("wal"))
        .map_err(Error::io("reading the backup's WAL"))?
        .flatten()
    {
        let Ok(meta) = entry.metadata() else { continue };
        files += 1;
        bytes += meta.len();
        let at = meta.modified().map(OffsetDateTime::from).unwrap_or(first);
        if at > last.at {
            last = Point {
                at,
                txid: entry.file_name().to_string_lossy().into_owned(),
                bytes: meta.len(),
            };
        }
    }
    Ok(Points {
        snapshots,
        first,
        last,
        files,
        bytes,
    })
}

fn tree_size(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_size(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

/// What a PostgreSQL restore found, before its server is stopped.
pub(crate) struct Recovered {
    pub as_of: Point,
    pub integrity: String,
    pub checked_in: Duration,
    pub migrations: i64,
    /// What the caller's own step said, run while the restored server was up.
    pub then: Option<Result<String, String>>,
}

/// Restores the backup in `dir` into `to` (new or empty, created), as of `at`, checks it, runs
/// `then` against it, and stops its server. The caller cleans `to` up on failure.
pub(crate) async fn restore(
    dir: &Path,
    to: &Path,
    at: Option<OffsetDateTime>,
    then: Option<crate::Then>,
) -> Result<Recovered, Error> {
    let marker = read_marker(dir)?;
    let (base_at, base) = choose(&bases(dir)?, at, &dir.display().to_string())?;
    // The base backup is what its manifest says (checksums of every file, and its WAL).
    run(
        "pg_verifybackup",
        &format!("verifying the base backup {}", base.display()),
        &[base.clone().into()],
        LONG_DEADLINE,
    )
    .await
    .map_err(|e| Error::Integrity {
        target: dir.display().to_string(),
        detail: e.to_string(),
    })?;
    // With `--at` past the last commit the backup holds, recovery ends before its target
    // (an error since PostgreSQL 14): the newest change is then the state as of `--at`.
    let mut target_time = at;
    let (server, original_auto) = loop {
        let original_auto = lay_out(dir, &base, to, target_time)?;
        match Private::start(to).await {
            Err(Error::PastNewest) if target_time.is_some() => {
                crate::restore::clean_up(to, true);
                target_time = None;
            }
            Err(e) => return Err(e),
            Ok(server) => break (server, original_auto),
        }
    };
    let auto_conf = to.join("postgresql.auto.conf");
    let proven = if target_time.is_none() {
        read_proven(dir)
    } else {
        None
    };
    let checked = match (proven, server.replayed) {
        // Recovery stops quietly at the first damaged record: it must have reached what the
        // backup proved it held (less one WAL page, where a proof may end mid-record).
        (Some(proven), Some(replayed)) if replayed + WAL_PAGE < proven => Err(format!(
            "recovery ended at {} but the backup had proven WAL to {}: its WAL is damaged or missing",
            lsn_text(replayed),
            lsn_text(proven)
        )),
        _ => check(&server, &marker.database, then).await,
    };
    server.stop().await;
    let _ = std::fs::remove_file(to.join("recovery.signal"));
    std::fs::write(&auto_conf, original_auto)
        .map_err(Error::io("restoring postgresql.auto.conf"))?;
    server.own(to)?;
    let (integrity, checked_in, migrations, then) = checked.map_err(|detail| Error::Integrity {
        target: dir.display().to_string(),
        detail,
    })?;
    Ok(Recovered {
        as_of: Point {
            at: at.unwrap_or_else(|| points(dir).map(|p| p.last.at).unwrap_or(base_at)),
            txid: server.replayed.map(lsn_text).unwrap_or_default(),
            bytes: 0,
        },
        integrity,
        checked_in,
        migrations,
        then,
    })
}

/// Copies the base backup into `to` and the WAL since into its `pg_wal`, and sets recovery up
/// (to `at`, or to the end); the original `postgresql.auto.conf`, to put back afterwards.
fn lay_out(
    dir: &Path,
    base: &Path,
    to: &Path,
    at: Option<OffsetDateTime>,
) -> Result<String, Error> {
    copy_tree(base, to)?;
    let _ = std::fs::remove_file(to.join("backup_manifest"));
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700))
        .map_err(Error::io("closing the restored directory"))?;
    let auto_conf = to.join("postgresql.auto.conf");
    let original_auto = std::fs::read_to_string(&auto_conf).unwrap_or_default();
    write_missing_configuration(to)?;
    let quote = |s: &str| format!("'{}'", s.replace('\'', "''"));
    // The WAL since the base backup began goes into pg_wal, where recovery reads it: the
    // server (run as `postgres` when we are root) need not be able to read the target.
    let copied = copy_wal(&dir.join("wal"), base, &to.join("pg_wal"))?;
    let mut recovery = format!(
        "{original_auto}\n# holdfast restore: removed once the restore is done (the WAL is in pg_wal)\nrestore_command = 'false'\nrecovery_target_action = 'promote'\n"
    );
    if let Some(at) = at {
        recovery += &format!("recovery_target_time = {}\n", quote(&pg_time(at)?));
    }
    std::fs::write(&auto_conf, recovery).map_err(Error::io("writing the recovery settings"))?;
    std::fs::write(to.join("recovery.signal"), "").map_err(Error::io("writing recovery.signal"))?;
    tracing::info!(segments = copied, "recovering");
    Ok(original_auto)
}

/// `at` as `recovery_target_time` takes it: UTC, with `+00` (it refuses RFC 3339's `Z`).
fn pg_time(at: OffsetDateTime) -> Result<String, Error> {
    const PG: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:6]+00"
    );
    at.to_offset(time::UtcOffset::UTC)
        .format(PG)
        .map_err(|e| Error::Usage(format!("--at {}: {e}", crate::rfc3339(at))))
}

/// `pg_amcheck` over every database, then the migration ledger, then the caller's step.
async fn check(
    server: &Private,
    database: &str,
    then: Option<crate::Then>,
) -> Result<(String, Duration, i64, Option<Result<String, String>>), String> {
    let checking = Instant::now();
    let socket = server.socket_dir();
    let port = server.port.to_string();
    let args: Vec<OsString> = vec![
        "--all".into(),
        "--install-missing".into(),
        "--no-password".into(),
        "-h".into(),
        socket.clone().into(),
        "-p".into(),
        port.clone().into(),
        "-U".into(),
        "postgres".into(),
    ];
    run("pg_amcheck", "pg_amcheck", &args, LONG_DEADLINE)
        .await
        .map_err(|e| e.to_string())?;
    let checked_in = checking.elapsed();
    let url = format!(
        "postgres://postgres@localhost/{database}?host={}&port={port}",
        socket.display()
    );
    let mut conn = connect(&url).await.map_err(|e| e.to_string())?;
    let migrations: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {}",
        crate::restore::MIGRATION_LEDGER
    ))
    .fetch_one(&mut conn)
    .await
    .map_err(|_| format!("not a Holdfast store (database {database} has no migration ledger)"))?;
    if migrations == 0 {
        return Err("not a Holdfast store (its migration ledger is empty)".to_owned());
    }
    let _ = conn.close().await;
    let then = match then {
        Some(step) => Some(step(url).await),
        None => None,
    };
    Ok(("pg_amcheck ok".to_owned(), checked_in, migrations, then))
}

/// A server configuration a base backup may lack (Debian keeps its files in /etc): empty
/// settings, and connections over the Unix socket only (no TCP line), for the operator to
/// replace with their own before serving.
fn write_missing_configuration(to: &Path) -> Result<(), Error> {
    for (file, text) in [
        ("postgresql.conf", "# written by holdfast restore: the backup had none\n"),
        (
            "pg_hba.conf",
            "# written by holdfast restore: the backup had none; replace it before serving\nlocal all all trust\n",
        ),
        ("pg_ident.conf", ""),
    ] {
        let path = to.join(file);
        if !path.exists() {
            std::fs::write(&path, text).map_err(Error::io(format!("writing {}", path.display())))?;
        }
    }
    Ok(())
}

/// Copies the tree at `from` into `to` (created).
fn copy_tree(from: &Path, to: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(to).map_err(Error::io(format!("creating {}", to.display())))?;
    for entry in
        std::fs::read_dir(from).map_err(Error::io(format!("reading {}", from.display())))?
    {
        let entry = entry.map_err(Error::io("reading the base backup"))?;
        let dest = to.join(entry.file_name());
        if entry
            .file_type()
            .map_err(Error::io("reading the base backup"))?
            .is_dir()
        {
            copy_tree(&entry.path(), &dest)?;
        } else {
            std::fs::copy(entry.path(), &dest)
                .map_err(Error::io(format!("copying {}", entry.path().display())))?;
        }
    }
    Ok(())
}

/// The restored server while it recovers and is checked: reachable only through a Unix
/// socket in a private directory, never over TCP; run as `postgres` when we are root
/// (the server refuses root).
struct Private {
    data: PathBuf,
    scratch: tempfile::TempDir,
    port: u16,
    owner: Option<(u32, u32)>,
    /// The end of the last WAL record recovery replayed.
    replayed: Option<u64>,
}

impl Private {
    async fn start(data: &Path) -> Result<Private, Error> {
        let owner = if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .ok_or_else(|| {
                    Error::Usage(
                        "restoring PostgreSQL as root needs the `postgres` user to run the server as"
                            .into(),
                    )
                })?;
            Some((user.uid.as_raw(), user.gid.as_raw()))
        } else {
            None
        };
        let scratch = tempfile::tempdir().map_err(Error::io("a scratch directory"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(Error::io("finding a free port"))?;
        let mut server = Private {
            data: data.to_path_buf(),
            scratch,
            port,
            owner,
            replayed: None,
        };
        server.own(data)?;
        server.own(server.scratch.path())?;
        let options = format!(
            "-p {port} -c listen_addresses='' -c unix_socket_directories={} -c hot_standby=off -c archive_mode=off",
            server.scratch.path().display()
        );
        let started = server
            .pg_ctl(&[
                "start",
                "-w",
                "-t",
                &LONG_DEADLINE.as_secs().to_string(),
                "-o",
                &options,
            ])
            .await;
        // With hot_standby off, `pg_ctl -w` returns once recovery is consistent; the server
        // takes connections once it has replayed everything and been promoted.
        let url = format!(
            "postgres://postgres@localhost/postgres?host={}&port={port}",
            server.socket_dir().display()
        );
        let deadline = Instant::now() + LONG_DEADLINE;
        let conn = match started {
            Err(e) => Err(e),
            Ok(()) => loop {
                match connect(&url).await {
                    Ok(conn) => break Ok(conn),
                    Err(e)
                        if !data.join("postmaster.pid").exists() || Instant::now() > deadline =>
                    {
                        break Err(e)
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            },
        };
        let mut conn = match conn {
            Ok(conn) => conn,
            Err(e) => {
                let log = std::fs::read_to_string(server.log()).unwrap_or_default();
                let reason = why_it_stopped(&log);
                server.stop().await;
                if reason.contains("before configured recovery target") {
                    return Err(Error::PastNewest);
                }
                return Err(Error::Tool {
                    what: "recovering the restored server".into(),
                    detail: if reason.is_empty() {
                        e.to_string()
                    } else {
                        reason
                    },
                });
            }
        };
        let (recovering, end): (bool, Option<String>) =
            sqlx::query_as("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text")
                .fetch_one(&mut conn)
                .await
                .map_err(sql("asking the restored server where it stands"))?;
        let _ = conn.close().await;
        if recovering {
            server.stop().await;
            return Err(Error::Tool {
                what: "recovering the restored server".into(),
                detail: "it is still in recovery".into(),
            });
        }
        server.replayed = end.as_deref().and_then(lsn);
        Ok(server)
    }

    fn socket_dir(&self) -> PathBuf {
        self.scratch.path().to_path_buf()
    }

    fn log(&self) -> PathBuf {
        self.scratch.path().join("postgres.log")
    }

    /// Gives `path` (recursively) to the server's user, when we run as root.
    fn own(&self, path: &Path) -> Result<(), Error> {
        let Some((uid, gid)) = self.owner else {
            return Ok(());
        };
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(Error::io(format!("giving {} to postgres", path.display())))?;
        if path.is_dir() {
            for entry in std::fs::read_dir(path).map_err(Error::io("reading the restore"))? {
                self.own(&entry.map_err(Error::io("reading the restore"))?.path())?;
            }
        }
        Ok(())
    }

    async fn pg_ctl(&self, args: &[&str]) -> Result<(), Error> {
        let mut cmd = tokio::process::Command::new(bin("pg_ctl")?);
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        cmd.arg(args[0])
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.log())
            .args(&args[1..])
            .current_dir(self.scratch.path())
            .env_remove("PGDATA")
            .env_remove("PGHOST")
            .env_remove("PGPORT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        let out = cmd.output().await.map_err(Error::io("running pg_ctl"))?;
        if out.status.success() {
            return Ok(());
        }
        Err(Error::Tool {
            what: format!("pg_ctl {}", args[0]),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }

    /// Stops the server (fast: a clean shutdown); whatever happens, it is not left running.
    async fn stop(&self) {
        if self
            .pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"])
            .await
            .is_err()
        {
            let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w"]).await;
        }
    }
}

/// Runs a PostgreSQL tool to its end within `deadline`; a failure is its last line.
async fn run(
    tool: &str,
    what: &str,
    args: &[OsString],
    deadline: Duration,
) -> Result<String, Error> {
    let mut cmd = tokio::process::Command::new(bin(tool)?);
    cmd.args(args)
        .env_remove("PGDATA")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(Error::io(format!("starting {tool}")))?;
    let out = tokio::time::timeout(deadline, child.wait_with_output())
        .await
        .map_err(|_| Error::Tool {
            what: what.to_owned(),
            detail: format!("no answer within {} s", deadline.as_secs()),
        })?
        .map_err(Error::io(format!("running {tool}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .chain(stdout.lines())
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    Err(Error::Tool {
        what: what.to_owned(),
        detail: match lines.len() {
            0 => format!("{tool} failed ({})", out.status),
            n => lines[n.saturating_sub(3)..].join(" / "),
        },
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_reason_a_server_stopped_is_not_a_refused_connection() {
        let log = "LOG:  starting\n\
            FATAL:  recovery ended before configured recovery target was reached\n\
            FATAL:  the database system is not accepting connections\n\
            LOG:  database system is shut down\n";
        assert!(why_it_stopped(log).contains("before configured recovery target"));
        let only_refusals = "FATAL:  the database system is starting up\n";
        assert!(why_it_stopped(only_refusals).contains("starting up"));
        assert_eq!(why_it_stopped("LOG:  fine\n"), "");
    }

    use super::*;

    #[test]
    fn positions_and_names_read_back() {
        assert_eq!(lsn("0/3000148"), Some(0x3000148));
        assert_eq!(lsn("1/0"), Some(1 << 32));
        assert_eq!(lsn("garbage"), None);
        let at = parse_stamp("20261130T041900Z").expect("a stamp");
        assert_eq!(crate::rfc3339(at), "2026-11-30T04:19:00Z");
        assert_eq!(parse_stamp(".taking-12"), None);
        let at = time::OffsetDateTime::parse(
            "2026-11-30T07:58:40.5+02:00",
            &time::format_description::well_known::Rfc3339,
        )
        .expect("a time");
        assert_eq!(
            pg_time(at).expect("formats"),
            "2026-11-30 05:58:40.500000+00"
        );
        assert_eq!(
            redacted("postgres://app:secret@db.example:5433/shop"),
            "postgres://app@db.example:5433/shop"
        );
    }
}
