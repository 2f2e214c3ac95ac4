//! The `migrate` fault: the shop's change `cart_lines` (carts move from `cart_items` to
//! `cart_lines`, `crates/holdfast-shop/migrations/0002`–`0006`) run while users shop, one
//! phase at a time with `holdfast migrate up --to <phase>` as an operator runs it, and the web
//! instances rolled from the release before the change (`holdfast up --as-old-release`) to
//! this one after the expand.
//!
//! On Postgres a long reader sits on the old table the whole way: `psql` holding a transaction
//! that has read `cart_items`, as a `pg_dump` does. Nothing before the contract needs a lock it
//! conflicts with; the contract does (it drops the table), is turned away by the guard's
//! `lock_timeout` and retried, and the drill ends the reader once it has seen the contract
//! turned away twice. Every 100 ms the drill asks `pg_stat_activity` how long the longest
//! lock wait has lasted.
//!
//! Each phase short of the contract is rolled back once (`holdfast migrate down` to the phase
//! before), timed, and applied again. The expand's rollback is rehearsed before the reader
//! arrives: undoing it drops triggers on `cart_items`, which needs the same lock as the
//! contract and would wait for the reader just the same.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::system::Control;

/// What the warnings of `holdfast migrate up` say when the guard turned a lock wait away.
const TURNED_AWAY: &str = "timed out waiting for a lock";

/// One phase as the drill ran it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PhaseRun {
    pub phase: &'static str,
    /// When it started and ended (its rollback and re-apply included), seconds after the
    /// fault started.
    pub span_s: [f64; 2],
    /// `holdfast migrate up --to <phase>`, wall time.
    pub up_ms: u64,
    /// `holdfast migrate down` to the phase before, wall time (none for the contract).
    pub rollback_ms: Option<u64>,
    /// Lock waits the guard gave up on and retried, going up.
    pub lock_retries: u32,
}

/// What the `migrate` fault saw.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Observed {
    pub phases: Vec<PhaseRun>,
    /// Web instances drained and restarted as this release after the expand.
    pub rolled: usize,
    /// When the roll started and ended, seconds after the fault started.
    pub roll_span_s: [f64; 2],
    /// How long the long reader held its transaction (none: no reader on this engine).
    pub reader_held_s: Option<f64>,
    /// The longest lock wait any backend had, sampled every 100 ms (none: not sampled).
    pub longest_lock_wait_ms: Option<f64>,
}

/// The phases in order, with the shop schema version each one is (`down --to` takes the
/// version of the phase before).
const PHASES: [(&str, i64); 5] = [
    ("expand", 2),
    ("backfill", 3),
    ("switch-reads", 4),
    ("switch-writes", 5),
    ("contract", 6),
];

/// Runs the change; what happened, for the fault's line in the report.
pub(crate) async fn run(ctl: &Control) -> Result<String, String> {
    let mut seen = Observed::default();
    let sampler = match ctl.db() {
        Some(db) => Some(LockSampler::start(db.psql_command()).await?),
        None => None,
    };
    let result = phases(ctl, &mut seen).await;
    if let Some(sampler) = sampler {
        seen.longest_lock_wait_ms = Some(sampler.stop().await);
    }
    ctl.set_migration(seen.clone());
    result?;
    let rollbacks: Vec<u64> = seen.phases.iter().filter_map(|p| p.rollback_ms).collect();
    Ok(format!(
        "shop change cart_lines: {} phases, {} web instances rolled to this release, slowest \
         rollback {} ms, contract turned away {} times{}",
        seen.phases.len(),
        seen.rolled,
        rollbacks.iter().max().copied().unwrap_or(0),
        seen.phases.last().map_or(0, |p| p.lock_retries),
        match seen.reader_held_s {
            Some(s) => format!(" behind a reader held {s:.1} s"),
            None => String::new(),
        }
    ))
}

async fn phases(ctl: &Control, seen: &mut Observed) -> Result<(), String> {
    let fault_started = Instant::now();
    let since =
        |t: Instant| (t.duration_since(fault_started).as_secs_f64() * 1000.0).round() / 1000.0;
    let mut reader: Option<LongReader> = None;
    for (i, &(phase, _)) in PHASES.iter().enumerate() {
        if phase == "contract" {
            // Every instance must be this release before the old shape goes.
            let started = Instant::now();
            let mut held = reader.take();
            let retries = migrate(ctl, &["up", "--to", phase], |turned_away| {
                if turned_away >= 2 {
                    if let Some(r) = held.take() {
                        seen.reader_held_s = Some(r.release());
                    }
                }
            })
            .await?;
            if let Some(r) = held {
                seen.reader_held_s = Some(r.release());
            }
            seen.phases.push(PhaseRun {
                phase,
                span_s: [since(started), since(Instant::now())],
                up_ms: started.elapsed().as_millis() as u64,
                rollback_ms: None,
                lock_retries: retries,
            });
            break;
        }
        let began = Instant::now();
        let started = Instant::now();
        let retries = migrate(ctl, &["up", "--to", phase], |_| {}).await?;
        let up_ms = started.elapsed().as_millis() as u64;
        let previous = PHASES
            .get(i.wrapping_sub(1))
            .map_or(1, |&(_, v)| v)
            .to_string();
        let started = Instant::now();
        migrate(
            ctl,
            &["down", "--schema", "shop", "--to", &previous],
            |_| {},
        )
        .await?;
        let rollback_ms = started.elapsed().as_millis() as u64;
        if phase == "expand" {
            if let Some(db) = ctl.db() {
                reader = Some(LongReader::start(db.psql_command()).await?);
            }
        }
        migrate(ctl, &["up", "--to", phase], |_| {}).await?;
        seen.phases.push(PhaseRun {
            phase,
            span_s: [since(began), since(Instant::now())],
            up_ms,
            rollback_ms: Some(rollback_ms),
            lock_retries: retries,
        });
        if phase == "expand" {
            let rolling = Instant::now();
            seen.rolled = ctl.roll_to_this_release().await?;
            seen.roll_span_s = [since(rolling), since(Instant::now())];
        }
    }
    Ok(())
}

/// Runs `holdfast migrate ARGS` on the drill's store to its end; how many lock waits its
/// guard turned away (`on_turned_away` hears each, with the count so far).
async fn migrate(
    ctl: &Control,
    args: &[&str],
    mut on_turned_away: impl FnMut(u32),
) -> Result<u32, String> {
    let mut child = Command::new(ctl.program())
        .arg("migrate")
        .args(args)
        .args(ctl.store_flags())
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting holdfast migrate: {e}"))?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let drain = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut stdout, &mut out).await;
        out
    });
    let mut lines = BufReader::new(stderr).lines();
    let (mut turned_away, mut said) = (0u32, String::new());
    while let Ok(Some(line)) = lines.next_line().await {
        if line.contains(TURNED_AWAY) {
            turned_away += 1;
            on_turned_away(turned_away);
        }
        said.push_str(&line);
        said.push('\n');
    }
    let status = child
        .wait()
        .await
        .map_err(|e| format!("holdfast migrate: {e}"))?;
    let out = drain.await.unwrap_or_default();
    if !status.success() {
        return Err(format!(
            "holdfast migrate {} failed ({status}): {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out),
            said
        ));
    }
    Ok(turned_away)
}

/// `psql` holding an open transaction that has read `cart_items` (as `pg_dump` does).
struct LongReader {
    child: Child,
    /// Open: psql waits for more, and the transaction stays open.
    _stdin: ChildStdin,
    since: Instant,
}

impl LongReader {
    async fn start(psql: Command) -> Result<LongReader, String> {
        let (child, stdin, stdout) = psql_session(
            psql,
            b"BEGIN;\nSELECT 'reading', count(*) FROM cart_items;\n",
        )
        .await?;
        let mut lines = BufReader::new(stdout).lines();
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.starts_with("reading") {
                    return true;
                }
            }
            false
        })
        .await;
        if read != Ok(true) {
            return Err("the long reader's psql did not read cart_items".into());
        }
        Ok(LongReader {
            child,
            _stdin: stdin,
            since: Instant::now(),
        })
    }

    /// Ends the reader's session (its transaction goes with it); how long it was held.
    fn release(mut self) -> f64 {
        let _ = self.child.start_kill();
        self.since.elapsed().as_secs_f64()
    }
}

/// `psql` asking every 100 ms how long the longest lock wait has lasted.
struct LockSampler {
    child: Child,
    /// Open while it samples (`\watch` repeats the query until psql is killed).
    _stdin: ChildStdin,
    longest: tokio::task::JoinHandle<f64>,
}

impl LockSampler {
    async fn start(psql: Command) -> Result<LockSampler, String> {
        let (child, stdin, stdout) = psql_session(
            psql,
            b"SELECT 'wait', COALESCE(EXTRACT(EPOCH FROM max(clock_timestamp() - query_start)) * 1000, 0) \
              FROM pg_stat_activity WHERE wait_event_type = 'Lock' \\watch 0.1\n",
        )
        .await?;
        let longest = tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut longest = 0f64;
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(ms) = line
                    .strip_prefix("wait|")
                    .and_then(|v| v.trim().parse::<f64>().ok())
                {
                    longest = longest.max(ms);
                }
            }
            longest
        });
        Ok(LockSampler {
            child,
            _stdin: stdin,
            longest,
        })
    }

    async fn stop(mut self) -> f64 {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        let ms = self.longest.await.unwrap_or(0.0);
        (ms * 10.0).round() / 10.0
    }
}

/// `psql` started with `script` written to it and its stdin kept open (the session lasts until
/// it is killed); its stdout to read.
async fn psql_session(
    mut psql: Command,
    script: &[u8],
) -> Result<(Child, ChildStdin, ChildStdout), String> {
    let mut child = psql
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting psql: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    stdin
        .write_all(script)
        .await
        .map_err(|e| format!("psql: {e}"))?;
    Ok((child, stdin, stdout))
}

/// Where `holdfast up --as-old-release` reads which release its instances start as.
pub(crate) fn release_file(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("run").join("as-old-release")
}
