//! `holdfast bench restore`: what the continuous backup costs and how fast it brings a lost
//! store back, against the floor of copying the same bytes.
//!
//! Three parts, one after another so each has the machine to itself, on the engine of
//! `--backend` (SQLite; or PostgreSQL, on throwaway clusters of the bench's own):
//! 1. **Overhead**: keyed checkouts/s through `holdfast up` without and with `--backup`
//!    (Litestream shipping every commit within a second; or `pg_receivewal` flushing every
//!    WAL record as it comes), same shoppers' loop as `bench checkout`, `--rounds` of each
//!    taking turns at going first; the ratio of the medians is the cost.
//! 2. **Restore time**: a store of `--size-mib` (the shop's schema plus a filler table of
//!    random bytes, which compress no better than real rows do; on PostgreSQL stored
//!    uncompressed), backed up once; then `cp -r` of the backup's files (the physical floor:
//!    the same bytes read and written), `holdfast restore` of it (decode or verify, write,
//!    replay, `PRAGMA integrity_check` or `pg_amcheck`), and `holdfast up` on the restored
//!    store until its first 2xx (on PostgreSQL after `pg_ctl start` of it). Restore ÷ copy is
//!    the ratio; restore + start is the RTO of this size on this machine.
//! 3. **RPO and RTO under load**: `--drills` runs of `holdfast drill --faults lose-primary`,
//!    each reporting the oldest acknowledged write the restore lost (RPO) and loss → first
//!    2xx from the restored node (RTO).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use holdfast_core::Backend;
use holdfast_drill::Cluster;
use serde::Serialize;

use crate::checkout::{drive, signup_users, start_system, through, Phase};
use crate::cli::{BenchArgs, BenchRestoreArgs};

#[derive(Debug, Serialize)]
struct Overhead {
    without_backup: Phase,
    with_backup: Phase,
    /// with ÷ without (goal ≥ 0.9).
    ratio: f64,
}

#[derive(Debug, Serialize)]
struct RestoreTime {
    database_mib: f64,
    backup_mib: f64,
    /// `cp -r` of the backup's files.
    copy_s: f64,
    /// `holdfast restore`, integrity check included.
    restore_s: f64,
    /// restore ÷ copy.
    restore_vs_copy: f64,
    /// `holdfast up` on the restored store until `GET /api/products` answers 200.
    start_s: f64,
    /// restore + start (goal ≤ 30 s for 1 GiB).
    rto_s: f64,
}

impl RestoreTime {
    /// The figures of one restore of a `database_mib` store backed up to `backup`.
    fn of(database_mib: f64, backup: &str, copy_s: f64, restore_s: f64, start_s: f64) -> Self {
        RestoreTime {
            database_mib,
            backup_mib: mib_of(Path::new(backup)),
            copy_s,
            restore_s,
            restore_vs_copy: crate::ratio(restore_s, copy_s),
            start_s,
            rto_s: restore_s + start_s,
        }
    }
}

#[derive(Debug, Serialize)]
struct Drill {
    rto_s: f64,
    rpo_ms: u64,
    orders_lost: usize,
    verdict: String,
}

#[derive(Debug, Serialize)]
struct Report {
    backend: &'static str,
    overhead: Overhead,
    restore: RestoreTime,
    drills: Vec<Drill>,
}

pub async fn run(args: BenchRestoreArgs) -> anyhow::Result<()> {
    let program = args.phases.program()?;
    let checkout_args = args.phases.system(&program);
    let backend = args.backend;
    eprintln!(
        "bench restore ({}): checkout throughput without and with the continuous backup",
        backend.name()
    );
    // Taking turns at going first, so neither side always meets a warmer machine.
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for round in 0..args.phases.rounds.max(1) {
        for backup in [round % 2 == 1, round % 2 == 0] {
            let phase = keyed_phase(&checkout_args, &program, backend, backup).await?;
            eprintln!(
                "bench restore: round {}: {:.0} keyed checkouts/s {} the backup",
                round + 1,
                phase.checkouts_per_s,
                if backup { "with" } else { "without" }
            );
            if backup { &mut with } else { &mut without }.push(phase);
        }
    }
    let without_backup = median(without);
    let with_backup = median(with);
    let ratio = crate::ratio(with_backup.checkouts_per_s, without_backup.checkouts_per_s);
    eprintln!(
        "bench restore: medians {:.0} keyed checkouts/s without the backup, {:.0} with: {ratio:.2}x",
        without_backup.checkouts_per_s, with_backup.checkouts_per_s
    );
    let overhead = Overhead {
        without_backup,
        with_backup,
        ratio,
    };
    eprintln!(
        "bench restore: a {} MiB store backed up, copied, restored and served",
        args.size_mib
    );
    let restore = match backend {
        Backend::Sqlite => restore_time(&program, args.size_mib).await?,
        Backend::Postgres => postgres_restore_time(&program, args.size_mib).await?,
    };
    let mut drills = Vec::new();
    for n in 0..args.drills {
        eprintln!(
            "bench restore: lose-primary drill {}/{}",
            n + 1,
            args.drills
        );
        drills.push(drill(&program, backend, n as u64 + 1)?);
    }
    let report = Report {
        backend: backend.name(),
        overhead,
        restore,
        drills,
    };
    print_report(&report);
    if let Some(path) = &args.phases.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The phase with the median throughput.
fn median(phases: Vec<Phase>) -> Phase {
    crate::median_by(phases, |p| p.checkouts_per_s)
}

/// Keyed checkouts/s on a fresh system (on PostgreSQL, on a fresh throwaway cluster), with or
/// without the continuous backup.
async fn keyed_phase(
    args: &BenchArgs,
    program: &Path,
    backend: Backend,
    backup: bool,
) -> anyhow::Result<Phase> {
    let dir = Arc::new(tempfile::tempdir()?);
    let target = dir.path().join("backup");
    let target = target.to_str().context("a UTF-8 path")?;
    let data = dir.path().join("data");
    let extra: &[&str] = if backup { &["--backup", target] } else { &[] };
    let cluster = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => Some(Cluster::start(&dir).await?),
    };
    let url = cluster.as_ref().map(|c| c.url());
    let system = start_system(args, program, &data, url.as_deref(), extra)?;
    let users = signup_users(&system.url, args.users).await?;
    let keyed = through(&system.url, &users, "/api/checkout");
    drive(&keyed, Duration::from_secs(1)).await;
    Ok(drive(&keyed, args.duration).await)
}

/// Runs `program args`, failing with its stderr; how long it took.
fn timed(program: &Path, args: &[&str]) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let out = Command::new(program)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .with_context(|| format!("running {}", program.display()))?;
    if !out.status.success() {
        bail!(
            "{} {args:?}: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(started.elapsed())
}

/// The physical floor of a restore: `cp -r` of the backup's files, then `sync`; seconds.
fn copy_floor(backup: &str, copy: &str) -> anyhow::Result<f64> {
    let started = Instant::now();
    let status = Command::new("cp").args(["-r", backup, copy]).status()?;
    anyhow::ensure!(status.success(), "cp -r failed");
    Command::new("sync").status()?;
    Ok(started.elapsed().as_secs_f64())
}

fn mib_of(path: &Path) -> f64 {
    fn bytes(path: &Path) -> u64 {
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => std::fs::read_dir(path)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| bytes(&e.path()))
                .sum(),
            Ok(m) => m.len(),
            Err(_) => 0,
        }
    }
    bytes(path) as f64 / (1 << 20) as f64
}

async fn restore_time(program: &Path, size_mib: u64) -> anyhow::Result<RestoreTime> {
    let dir = tempfile::tempdir()?;
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let (data, backup, copy, restored) =
        (path("data"), path("backup"), path("copy"), path("restored"));
    timed(program, &["migrate", "up", "--data-dir", &data])?;
    fill(&Path::new(&data).join("holdfast.sqlite"), size_mib).await?;
    timed(
        program,
        &["backup", "now", "--backup", &backup, "--data-dir", &data],
    )?;
    let copy_s = copy_floor(&backup, &copy)?;
    let restore_s = timed(
        program,
        &["restore", "--backup", &backup, "--to", &restored],
    )?
    .as_secs_f64();
    let start_s = first_2xx(program, Instant::now(), &["--data-dir", &restored]).await?;
    Ok(RestoreTime::of(
        mib_of(&Path::new(&data).join("holdfast.sqlite")),
        &backup,
        copy_s,
        restore_s,
        start_s,
    ))
}

/// The same on PostgreSQL: a throwaway cluster filled to `size_mib`, a base backup of it
/// (`backup now`), `cp -r` of that backup, `holdfast restore` into a fresh data directory, and
/// the cluster started on it with `holdfast up` in front until the first 2xx.
async fn postgres_restore_time(program: &Path, size_mib: u64) -> anyhow::Result<RestoreTime> {
    let dir = Arc::new(tempfile::tempdir()?);
    let cluster = Cluster::start(&dir).await?;
    let url = cluster.url();
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let (data, backup, copy) = (path("data"), path("backup"), path("copy"));
    let store = ["--backend", "postgres", "--database-url", url.as_str()];
    let data_flags = [&store[..], &["--data-dir", &data]].concat();
    timed(program, &[&["migrate", "up"][..], &data_flags].concat())?;
    fill_postgres(&url, size_mib).await?;
    let database_mib = {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&url).await?;
        let bytes: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
            .fetch_one(&mut conn)
            .await?;
        bytes as f64 / (1 << 20) as f64
    };
    timed(
        program,
        &[&["backup", "now", "--backup", &backup][..], &data_flags].concat(),
    )?;
    let copy_s = copy_floor(&backup, &copy)?;
    // The cluster and its disk are lost; the restore goes where its data directory was.
    cluster.stop().await;
    std::fs::remove_dir_all(&cluster.data)?;
    let restored = cluster.data.to_string_lossy().into_owned();
    let restore_s = timed(
        program,
        &["restore", "--backup", &backup, "--to", &restored],
    )?
    .as_secs_f64();
    let started = Instant::now();
    cluster.start_again().await?;
    let start_s = first_2xx(
        program,
        started,
        &[&["--data-dir", &path("data2")][..], &store].concat(),
    )
    .await?;
    Ok(RestoreTime::of(
        database_mib,
        &backup,
        copy_s,
        restore_s,
        start_s,
    ))
}

/// `holdfast up` with `store_flags` (one instance, no worker) until its first 2xx: seconds
/// since `started`.
async fn first_2xx(program: &Path, started: Instant, store_flags: &[&str]) -> anyhow::Result<f64> {
    let mut up = Command::new(program)
        .args([
            "up",
            "--port",
            "0",
            "--ops-port",
            "0",
            "--instances",
            "1",
            "--workers",
            "0",
        ])
        .args(store_flags)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = up.stdout.take().context("no stdout")?;
    let url = std::io::BufRead::lines(std::io::BufReader::new(stdout))
        .map_while(Result::ok)
        .find_map(|l| {
            l.strip_prefix("Holdfast is up: ")
                .map(|r| r.split_whitespace().next().unwrap_or_default().to_owned())
        })
        .context("the restored node did not come up")?;
    let http = reqwest::Client::new();
    loop {
        if http
            .get(format!("{url}/api/products"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "no 2xx within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let start_s = started.elapsed().as_secs_f64();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(up.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = up.wait();
    Ok(start_s)
}

/// Grows the PostgreSQL store to about `size_mib` with a filler table of random bytes, stored
/// uncompressed, in 64 MiB transactions.
async fn fill_postgres(url: &str, size_mib: u64) -> anyhow::Result<()> {
    use sqlx::{Connection, Executor};
    let mut conn = sqlx::PgConnection::connect(url).await?;
    conn.execute("CREATE TABLE bench_filler (id bigserial PRIMARY KEY, bytes bytea NOT NULL); ALTER TABLE bench_filler ALTER COLUMN bytes SET STORAGE EXTERNAL")
        .await?;
    // 64 KiB rows of random bytes, 1024 per transaction.
    for _ in 0..size_mib.div_ceil(64) {
        conn.execute("INSERT INTO bench_filler (bytes) SELECT (SELECT string_agg(decode(md5(random()::text || i || g), 'hex'), ''::bytea) FROM generate_series(1, 4096) AS i) FROM generate_series(1, 1024) AS g")
            .await?;
    }
    conn.execute("CHECKPOINT").await?;
    conn.close().await?;
    Ok(())
}

/// Grows the store to about `size_mib` with a filler table of random bytes, in 64 MiB
/// transactions.
async fn fill(database: &Path, size_mib: u64) -> anyhow::Result<()> {
    use sqlx::{ConnectOptions, Connection, Executor};
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(database)
        .connect()
        .await?;
    conn.execute("CREATE TABLE bench_filler (id INTEGER PRIMARY KEY, bytes BLOB NOT NULL)")
        .await?;
    // 64 KiB rows, 1024 per transaction.
    for _ in 0..size_mib.div_ceil(64) {
        let mut tx = conn.begin().await?;
        tx.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1024) INSERT INTO bench_filler (bytes) SELECT randomblob(65536) FROM n")
            .await?;
        tx.commit().await?;
    }
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").await?;
    conn.close().await?;
    Ok(())
}

/// One `holdfast drill --faults lose-primary`; its figures.
fn drill(program: &Path, backend: Backend, seed: u64) -> anyhow::Result<Drill> {
    let dir = tempfile::tempdir()?;
    let json = dir.path().join("drill.json");
    let out = Command::new(program)
        .args([
            "drill",
            "--faults",
            "lose-primary",
            "--duration",
            "20s",
            "--no-alerts",
            "--backend",
            backend.name(),
        ])
        .args(["--seed", &seed.to_string()])
        .arg("--json")
        .arg(&json)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "warn")
        .output()?;
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).with_context(|| {
            format!("no drill report: {}", String::from_utf8_lossy(&out.stderr))
        })?)?;
    let r = &report["restore"];
    Ok(Drill {
        rto_s: r["rto_s"].as_f64().unwrap_or(0.0),
        rpo_ms: r["rpo_ms"].as_u64().unwrap_or(0),
        orders_lost: r["orders_lost"].as_array().map_or(0, Vec::len),
        verdict: report["verdict"].as_str().unwrap_or("?").to_owned(),
    })
}

fn print_report(r: &Report) {
    let o = &r.overhead;
    println!(
        "overhead   keyed checkouts/s without backup {:.0} (p99 {:.0} ms), with {:.0} (p99 {:.0} ms): {:.2}x",
        o.without_backup.checkouts_per_s,
        o.without_backup.p99_ms,
        o.with_backup.checkouts_per_s,
        o.with_backup.p99_ms,
        o.ratio
    );
    let t = &r.restore;
    println!(
        "restore    {:.0} MiB store, {:.0} MiB backup: cp -r {:.1} s, holdfast restore {:.1} s ({:.2}x the copy), up to first 2xx {:.1} s: RTO {:.1} s",
        t.database_mib, t.backup_mib, t.copy_s, t.restore_s, t.restore_vs_copy, t.start_s, t.rto_s
    );
    for (i, d) in r.drills.iter().enumerate() {
        println!(
            "drill {}    lose-primary under load: RTO {:.1} s, RPO {} ms, {} acknowledged orders lost, {}",
            i + 1,
            d.rto_s,
            d.rpo_ms,
            d.orders_lost,
            d.verdict
        );
    }
}
