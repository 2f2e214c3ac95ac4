//! Schema migrations: the store's own and each application's, embedded in the binary.
//!
//! A [`Schema`] is a named, ordered list of [`Migration`]s. The store's schema (accounts,
//! sessions, idempotency keys, jobs, the effect ledger) always comes first; an application
//! passes its own in `StoreOptions::schemas` (the reference shop's lives in `holdfast-shop`).
//!
//! All pending migrations run in one write transaction that first takes a lock: on SQLite
//! `BEGIN IMMEDIATE` (the file's single write lock), on Postgres a transaction-scoped advisory
//! lock. A second migrator starting at the same moment waits, then finds nothing to do.
//!
//! Every run is guarded ([`Guard`]): on Postgres the transaction sets `lock_timeout` (500 ms by
//! default) and `statement_timeout`, so a DDL statement queued behind a long reader (a
//! `pg_dump`, a forgotten transaction) gives up within the lock timeout instead of making
//! every request queue behind *it*; the whole run is then retried with full-jitter backoff
//! until the guard's deadline, and finally fails saying who holds the lock. On SQLite the
//! write lock is waited for at most the connection's busy timeout (5 s), retried the same way.
//!
//! Processes that serve do not migrate unless told to ([`Mode::Verify`]): they check that the
//! database has exactly the migrations they were built with and refuse to start otherwise,
//! naming what is missing or unknown ([`Error::SchemaBehind`], [`Error::SchemaAhead`]).
//!
//! Migrations are append-only: a released file is never edited; a change is a new version.
//! That is checked, not promised: each applied migration is recorded with the SHA-256 of its
//! file, and opening a database whose record differs from this build's file fails with
//! [`Error::MigrationChanged`], naming the file.
//!
//! A change that old and new code must survive side by side is declared as **phases**
//! ([`Phase`]): expand, backfill, switch reads, switch writes, contract — each its own
//! migration, each applied by its own `holdfast migrate up --to <phase>` so an operator can
//! stop between them, each undoable until contract. A schema that declares phases promises that
//! its code runs on either side of every one of them (it asks [`crate::Store::applied_versions`]
//! which have run), so:
//! - an instance starts with phases still pending (a plain pending migration still stops it);
//! - an older build starts beside phases it does not know, short of a contract (they are
//!   recorded with their phase; a contract, or a plain migration it does not know, stops it);
//! - a backfill runs in batches, one short guarded transaction each with a pause between, and
//!   is recorded only when a batch finds nothing left, so a killed backfill resumes;
//! - a contract waits [`SETTLE`] after the phase before it (instances notice a switch within
//!   [`PHASE_REFRESH`]), and plain `migrate up` stops before it: the operator names it once
//!   no older build runs. It has no down step: it is where the change becomes one-way.
//!
//! One file serves both engines. It is written as SQLite reads it, with `BIGINT` for every
//! integer that may exceed 32 bits; for Postgres, `BLOB` becomes `BYTEA` and
//! `INTEGER PRIMARY KEY AUTOINCREMENT` becomes `BIGSERIAL PRIMARY KEY` (see [`render`]). What
//! cannot be said once for both (triggers) has a `NNNN_name.postgres.sql` of its own.

use crate::{Backend, Error, Pooled, Result, Store};
use sha2::{Digest, Sha256};
use sqlx::{Executor, Row};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What opening a store does about migrations.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Apply pending migrations under the guard (tools, `holdfast migrate up`, `holdfast up`).
    Apply(Guard),
    /// Change nothing: refuse a database whose migrations differ from this build's.
    Verify,
    /// Change nothing, check nothing: for looking at the migrations themselves
    /// (`holdfast migrate status`).
    Inspect,
}

/// The bounds a migration runs within (see the module docs).
#[derive(Debug, Clone)]
pub struct Guard {
    /// Longest any one statement may wait for a lock (Postgres `lock_timeout`).
    pub lock_timeout: Duration,
    /// Longest any one statement may run (Postgres `statement_timeout`).
    pub statement_timeout: Duration,
    /// How long to keep retrying a run that timed out on a lock.
    pub deadline: Duration,
    /// Rows one backfill batch (one transaction) copies at most.
    pub batch_rows: i64,
    /// The pause between backfill batches, leaving the database to the requests.
    pub batch_pause: Duration,
}

impl Default for Guard {
    fn default() -> Self {
        Guard {
            lock_timeout: Duration::from_millis(500),
            statement_timeout: Duration::from_secs(60),
            deadline: Duration::from_secs(60),
            batch_rows: 500,
            batch_pause: Duration::from_millis(20),
        }
    }
}

/// How often a schema's code asks which phases have run; a switch takes effect fleet-wide
/// within this.
pub const PHASE_REFRESH: Duration = Duration::from_secs(1);
/// How long a contract (or a down step that drops what a switch pointed at) waits after the
/// switch before it: every instance has noticed the switch by then.
pub const SETTLE: Duration = Duration::from_secs(2);

/// One step of an expand/contract change (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// Add the new shape beside the old, kept in step with it; old code cannot tell.
    Expand,
    /// Copy what exists into the new shape, in batches.
    Backfill,
    /// Code reads the new shape.
    SwitchReads,
    /// Code writes the new shape.
    SwitchWrites,
    /// Drop the old shape: one-way, and no build older than the change may run after it.
    Contract,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Expand,
        Phase::Backfill,
        Phase::SwitchReads,
        Phase::SwitchWrites,
        Phase::Contract,
    ];

    /// The phase's name, as `--to` takes it and the migrations table records it.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Expand => "expand",
            Phase::Backfill => "backfill",
            Phase::SwitchReads => "switch-reads",
            Phase::SwitchWrites => "switch-writes",
            Phase::Contract => "contract",
        }
    }

    /// The phase named `name`, if there is one.
    pub fn parse(name: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How far [`apply`] goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Until {
    /// Every pending migration, contracts included: a database no older build serves
    /// (`holdfast up`, `serve --migrate`, a fresh one).
    Everything,
    /// Stop before the first pending contract (`holdfast migrate up` without `--to`).
    BeforeContract,
    /// Up to and including version `version` of schema `schema`, with all that precedes it.
    Version { schema: &'static str, version: i64 },
}

/// A migration the database recorded that this build does not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub version: i64,
    pub file: String,
    /// Its phase, if it was one: short of a contract, this build can run beside it.
    pub phase: Option<Phase>,
}

impl Recorded {
    /// Whether a build that does not know this migration can still run beside it.
    pub fn spares_older_builds(&self) -> bool {
        self.phase.is_some_and(|p| p != Phase::Contract)
    }
}

/// One schema's migrations as a database has them.
#[derive(Debug, Clone)]
pub struct SchemaState {
    pub schema: &'static str,
    /// Versions recorded as applied that this build knows.
    pub applied: Vec<i64>,
    /// This build's migrations the database has not run, in order.
    pub pending: Vec<&'static Migration>,
    /// Versions the database recorded that this build does not have (a newer build migrated).
    pub unknown: Vec<Recorded>,
    /// Applied migrations whose file differs in this build: `(file, recorded, built)`.
    pub changed: Vec<(&'static str, String, String)>,
}

/// One step of a schema.
#[derive(Debug)]
pub struct Migration {
    /// Position in its schema, from 1.
    pub version: i64,
    /// Where the file lives in the repository, for messages.
    pub file: &'static str,
    pub sql: &'static str,
    /// Databases made before schemas were split by owner recorded one list of versions in
    /// `holdfast_migrations`; this migration's statements were part of that list's `legacy`
    /// version. Such a database adopts it as applied instead of running it again.
    pub legacy: Option<i64>,
    /// The SQL that undoes it (`NNNN_name.down.sql` beside the file), if it can be undone.
    pub down: Option<&'static str>,
    /// Postgres's own text for `sql` and `down` (`NNNN_name.postgres.sql`,
    /// `NNNN_name.postgres.down.sql`), where one file cannot serve both engines.
    pub postgres: Option<(&'static str, Option<&'static str>)>,
    /// Its phase, if it is a step of an expand/contract change.
    pub phase: Option<Phase>,
}

/// A named list of migrations owned by one crate.
#[derive(Debug)]
pub struct Schema {
    /// Unique among the schemas of one database (`store`, `shop`, …).
    pub name: &'static str,
    pub migrations: &'static [Migration],
}

impl Migration {
    /// Migration `version`, whose SQL is `sql`, from the file `file` (its repository path).
    pub const fn new(version: i64, file: &'static str, sql: &'static str) -> Self {
        Migration {
            version,
            file,
            sql,
            legacy: None,
            down: None,
            postgres: None,
            phase: None,
        }
    }

    /// This migration is `phase` of an expand/contract change (see the module docs).
    pub const fn phase(self, phase: Phase) -> Self {
        Migration {
            phase: Some(phase),
            ..self
        }
    }

    /// Postgres runs `up` (and undoes it with `down`) instead of the rendered shared file.
    pub const fn with_postgres(self, up: &'static str, down: Option<&'static str>) -> Self {
        Migration {
            postgres: Some((up, down)),
            ..self
        }
    }

    /// What undoes this migration (`holdfast migrate down`); without it, it cannot be undone.
    pub const fn with_down(self, down: &'static str) -> Self {
        Migration {
            down: Some(down),
            ..self
        }
    }

    /// This migration's statements were the one-list layout's version `legacy` (see
    /// [`Migration::legacy`]).
    pub const fn replacing_legacy(self, legacy: i64) -> Self {
        Migration {
            legacy: Some(legacy),
            ..self
        }
    }

    /// The SQL as it runs on `backend` (one file serves both engines unless Postgres has its
    /// own; see [`render`]).
    pub fn render(&self, backend: Backend) -> String {
        match (backend, self.postgres) {
            (Backend::Postgres, Some((up, _))) => up.to_owned(),
            _ => render(self.sql, backend),
        }
    }

    /// What undoes it on `backend`, if anything does.
    pub fn render_down(&self, backend: Backend) -> Option<String> {
        match (backend, self.postgres) {
            (Backend::Postgres, Some((_, down))) => down.map(str::to_owned),
            _ => self.down.map(|d| render(d, backend)),
        }
    }

    /// SHA-256 of the file (and of Postgres's own, if it has one), hex.
    pub fn checksum(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.sql.as_bytes());
        if let Some((up, _)) = self.postgres {
            h.update(b"\n-- postgres --\n");
            h.update(up.as_bytes());
        }
        hex::encode(h.finalize())
    }
}

/// One of the store's migrations, by its name in `crates/holdfast-store/migrations/`: the
/// file `NAME.sql` and what undoes it, `NAME.down.sql`.
macro_rules! store_file {
    ($version:literal, $name:literal) => {
        Migration::new(
            $version,
            concat!("crates/holdfast-store/migrations/", $name, ".sql"),
            include_str!(concat!("../migrations/", $name, ".sql")),
        )
        .with_down(include_str!(concat!("../migrations/", $name, ".down.sql")))
    };
}

/// The store's own schema (always migrated first).
pub static SCHEMA: Schema = Schema {
    name: "store",
    migrations: &[
        store_file!(1, "0001_accounts").replacing_legacy(1),
        store_file!(2, "0002_jobs").replacing_legacy(2),
        store_file!(3, "0003_sessions").replacing_legacy(3),
        store_file!(4, "0004_job_claims"),
        store_file!(5, "0005_rate_limits"),
        store_file!(6, "0006_uploads"),
        store_file!(7, "0007_secrets"),
        store_file!(8, "0008_job_effects"),
    ],
};

/// Arbitrary constant naming Holdfast's migration lock among the server's advisory locks.
const PG_MIGRATION_LOCK: i64 = 0x486f_6c64_6661_7374; // "Holdfast"

/// The table of applied migrations.
const TABLE: &str = "holdfast_schema_migrations";
/// The one-list table of databases made before schemas were split (kept, never written).
const LEGACY_TABLE: &str = "holdfast_migrations";

/// A migration's SQL for `backend` (one file serves both engines; see the module docs).
pub fn render(sql: &str, backend: Backend) -> String {
    match backend {
        Backend::Sqlite => sql.to_owned(),
        Backend::Postgres => replace_word(
            &sql.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY"),
            "BLOB",
            "BYTEA",
        ),
    }
}

/// Replaces `word` where it stands as a whole word (not inside `session_blobs`).
fn replace_word(text: &str, word: &str, with: &str) -> String {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(word) {
        let before = rest[..i].chars().next_back();
        let after = rest[i + word.len()..].chars().next();
        out.push_str(&rest[..i]);
        if before.is_some_and(ident) || after.is_some_and(ident) {
            out.push_str(word);
        } else {
            out.push_str(with);
        }
        rest = &rest[i + word.len()..];
    }
    out.push_str(rest);
    out
}

/// Applies `schemas`' pending migrations as far as `until`, under `guard`; the files applied.
/// Each step is its own guarded transaction, retried with full-jitter backoff while a lock
/// wait times out, until the guard's deadline: consecutive plain migrations together, each
/// phase alone, a backfill one batch at a time.
pub(crate) async fn apply(
    store: &Store,
    schemas: &[&Schema],
    guard: &Guard,
    until: &Until,
) -> Result<Vec<&'static str>> {
    let started_at = holdfast_core::now_ms();
    let mut applied = Vec::new();
    loop {
        match retried(store, guard, || {
            step(store, schemas, guard, until, started_at)
        })
        .await?
        {
            Step::Done => return Ok(applied),
            Step::Applied(files) => applied.extend(files),
            Step::Copied { file, rows } => {
                tracing::info!(file, rows, "backfill batch committed");
                tokio::time::sleep(guard.batch_pause).await;
            }
            Step::Settle(wait) => {
                tracing::info!(?wait, "letting every instance notice the last switch first");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// What one guarded transaction of [`apply`] did.
enum Step {
    /// Nothing is pending within the target.
    Done,
    Applied(Vec<&'static str>),
    /// A backfill batch copied `rows` and there may be more.
    Copied {
        file: &'static str,
        rows: u64,
    },
    /// A contract must wait this long after the switch before it.
    Settle(Duration),
}

/// Runs `once` again, with full-jitter backoff, while it times out on a lock, until the
/// guard's deadline; then fails saying who holds the migration lock, if anyone does.
async fn retried<T, F, Fut>(store: &Store, guard: &Guard, mut once: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let started = Instant::now();
    let backoff = holdfast_core::retry::RetryPolicy {
        base: guard.lock_timeout,
        cap: Duration::from_secs(5),
        max_attempts: u32::MAX,
        deadline: guard.deadline,
    };
    let mut lock_waits = 0u32;
    loop {
        match once().await {
            Err(Error::Db(e) | Error::Migration { source: e, .. }) if timed_out_on_lock(&e) => {
                lock_waits += 1;
                let waited = started.elapsed();
                if waited >= guard.deadline {
                    return Err(Error::MigrationLocked {
                        waited,
                        tries: lock_waits,
                        holder: lock_holder(store).await,
                    });
                }
                let pause = backoff.delay(lock_waits - 1);
                tracing::warn!(
                    tries = lock_waits,
                    ?pause,
                    "a migration timed out waiting for a lock; retrying"
                );
                tokio::time::sleep(pause.min(guard.deadline.saturating_sub(waited))).await;
            }
            other => return other,
        }
    }
}

/// A lock wait gave up: Postgres `lock_not_available` (the `lock_timeout`) or a statement
/// cancelled by `statement_timeout`; SQLite busy or locked after its busy timeout.
fn timed_out_on_lock(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else {
        return false;
    };
    let code = db.code().unwrap_or_default();
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        return code.parse::<i32>().is_ok_and(|n| matches!(n & 0xff, 5 | 6));
    }
    matches!(code.as_ref(), "55P03" | "57014")
}

/// The Postgres backend holding the migration lock, if one does (for the error message).
async fn lock_holder(store: &Store) -> Option<i32> {
    if store.backend != Backend::Postgres {
        return None;
    }
    sqlx::query(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
         AND ((classid::bigint << 32) | objid::bigint) = $1",
    )
    .bind(PG_MIGRATION_LOCK)
    .fetch_all_pooled(store)
    .await
    .ok()?
    .into_iter()
    .next()
    .and_then(|r| r.try_get::<i32, _>("pid").ok())
}

/// The database's migrations against this build's, changing nothing.
pub(crate) async fn status(store: &Store, schemas: &[&Schema]) -> Result<Vec<SchemaState>> {
    let mut conn = store.lend().await?;
    let mut recorded: HashMap<(String, i64), (String, String, Option<String>)> = HashMap::new();
    if table_exists(&mut conn, store.backend, TABLE).await? {
        // A table an earlier build made has no phases (its builds declared none).
        let phase = if has_phase_column(&mut conn, store.backend).await? {
            "phase"
        } else {
            "NULL AS phase"
        };
        for r in sqlx::query(&format!(
            "SELECT schema_name, version, file, checksum, {phase} FROM {TABLE}"
        ))
        .fetch_all(&mut *conn)
        .await?
        {
            recorded.insert(
                (r.try_get("schema_name")?, r.try_get("version")?),
                (
                    r.try_get("file")?,
                    r.try_get("checksum")?,
                    r.try_get("phase")?,
                ),
            );
        }
    }
    let mut states = Vec::new();
    for schema in schemas {
        let mut state = SchemaState {
            schema: schema.name,
            applied: Vec::new(),
            pending: Vec::new(),
            unknown: Vec::new(),
            changed: Vec::new(),
        };
        for m in schema.migrations {
            match recorded.remove(&(schema.name.to_owned(), m.version)) {
                Some((_, sum, _)) if sum != m.checksum() => {
                    state.applied.push(m.version);
                    state.changed.push((m.file, sum, m.checksum()));
                }
                Some(_) => state.applied.push(m.version),
                None => state.pending.push(m),
            }
        }
        let mut unknown: Vec<Recorded> = recorded
            .iter()
            .filter(|((name, _), _)| name == schema.name)
            .map(|((_, v), (file, _, phase))| Recorded {
                version: *v,
                file: file.clone(),
                phase: phase.as_deref().and_then(Phase::parse),
            })
            .collect();
        unknown.sort_by_key(|r| r.version);
        state.unknown = unknown;
        states.push(state);
    }
    Ok(states)
}

/// Undoes `schema`'s applied migrations above version `to`, newest first, each in its own
/// guarded transaction (retried like [`apply`]); returns the files undone. A contract, or a
/// migration without a down step, in that range stops it before anything changes. Undoing
/// an expand right after a switch waits [`SETTLE`] first, so no instance still uses what it
/// drops.
pub(crate) async fn revert(
    store: &Store,
    schema: &Schema,
    to: i64,
    guard: &Guard,
) -> Result<Vec<&'static str>> {
    let states = status(store, &[schema]).await?;
    refuse_unknown(&states, Tolerate::Nothing)?;
    let mut undo: Vec<&'static Migration> = schema
        .migrations
        .iter()
        .filter(|m| m.version > to && states[0].applied.contains(&m.version))
        .collect();
    undo.sort_by_key(|m| std::cmp::Reverse(m.version));
    if let Some(m) = undo.iter().find(|m| m.phase == Some(Phase::Contract)) {
        return Err(Error::PastContract { file: m.file });
    }
    if let Some(m) = undo.iter().find(|m| m.render_down(store.backend).is_none()) {
        return Err(Error::NoDownStep { file: m.file });
    }
    let mut undone = Vec::new();
    let mut switched: Option<Instant> = None;
    for m in undo {
        if m.phase == Some(Phase::Expand) {
            if let Some(at) = switched {
                tokio::time::sleep(SETTLE.saturating_sub(at.elapsed())).await;
            }
        }
        retried(store, guard, || revert_one(store, schema, m, guard)).await?;
        if matches!(m.phase, Some(Phase::SwitchReads | Phase::SwitchWrites)) {
            switched = Some(Instant::now());
        }
        undone.push(m.file);
    }
    Ok(undone)
}

async fn revert_one(
    store: &Store,
    schema: &Schema,
    m: &'static Migration,
    guard: &Guard,
) -> Result<()> {
    let mut tx = begin_guarded(store, guard).await?;
    let down = m.render_down(store.backend).unwrap_or_default();
    if has_statements(&down) {
        tx.conn()
            .execute(down.as_str())
            .await
            .map_err(|source| Error::Migration {
                file: m.file,
                source,
            })?;
    }
    sqlx::query(&format!(
        "DELETE FROM {TABLE} WHERE schema_name = $1 AND version = $2"
    ))
    .bind(schema.name)
    .bind(m.version)
    .execute(tx.conn())
    .await?;
    tx.commit().await?;
    tracing::info!(
        schema = schema.name,
        version = m.version,
        file = m.file,
        "undid migration"
    );
    Ok(())
}

/// A write transaction with the guard's timeouts and (on Postgres) the migration lock.
async fn begin_guarded(store: &Store, guard: &Guard) -> Result<crate::Tx> {
    let mut tx = begin_timed(store, guard).await?;
    if store.backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(PG_MIGRATION_LOCK)
            .execute(tx.conn())
            .await?;
    }
    Ok(tx)
}

/// A write transaction with the guard's timeouts only.
async fn begin_timed(store: &Store, guard: &Guard) -> Result<crate::Tx> {
    let mut tx = store.begin_write().await?;
    if store.backend == Backend::Postgres {
        let ms = |d: Duration| d.as_millis().max(1);
        tx.conn()
            .execute(
                format!(
                    "SET LOCAL lock_timeout = {}; SET LOCAL statement_timeout = {}",
                    ms(guard.lock_timeout),
                    ms(guard.statement_timeout)
                )
                .as_str(),
            )
            .await?;
    }
    Ok(tx)
}

/// Which migrations of a newer build [`refuse_unknown`] lets pass.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tolerate {
    /// None: changing a database a newer build migrated is that build's business.
    Nothing,
    /// Phases short of a contract: an older build serves beside them.
    PhasesBeforeContract,
}

/// Refuses a database that has migrations this build does not know (a newer build's),
/// except those `tolerate` lets pass.
fn refuse_unknown(states: &[SchemaState], tolerate: Tolerate) -> Result<()> {
    let unknown: Vec<String> = states
        .iter()
        .flat_map(|s| s.unknown.iter())
        .filter(|r| !(tolerate == Tolerate::PhasesBeforeContract && r.spares_older_builds()))
        .map(|r| r.file.clone())
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(Error::SchemaAhead { unknown })
    }
}

/// Refuses a database this build cannot serve (changes nothing): one whose migrations differ
/// from this build's, save phases — pending ones this build's code handles, and a newer
/// build's short of its contract.
pub(crate) async fn verify(store: &Store, schemas: &[&Schema]) -> Result<()> {
    let states = status(store, schemas).await?;
    if let Some((file, recorded, built)) = states.iter().flat_map(|s| s.changed.clone()).next() {
        return Err(Error::MigrationChanged {
            file,
            recorded,
            built,
        });
    }
    refuse_unknown(&states, Tolerate::PhasesBeforeContract)?;
    for r in states.iter().flat_map(|s| s.unknown.iter()) {
        tracing::warn!(
            file = r.file,
            phase = r.phase.map(Phase::name),
            "a newer build's phase is applied; this build runs beside it until its contract"
        );
    }
    let pending: Vec<&str> = states
        .iter()
        .flat_map(|s| {
            s.pending
                .iter()
                .filter(|m| m.phase.is_none())
                .map(|m| m.file)
        })
        .collect();
    if !pending.is_empty() {
        return Err(Error::SchemaBehind {
            pending: pending.into_iter().map(str::to_owned).collect(),
        });
    }
    Ok(())
}

async fn table_exists(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    table: &str,
) -> Result<bool> {
    let exists = match backend {
        Backend::Sqlite => "SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table' AND name = $1",
        Backend::Postgres => "SELECT COUNT(*) AS n FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = $1",
    };
    let n: i64 = sqlx::query(exists)
        .bind(table)
        .fetch_one(&mut *conn)
        .await?
        .try_get("n")?;
    Ok(n > 0)
}

async fn step(
    store: &Store,
    schemas: &[&Schema],
    guard: &Guard,
    until: &Until,
    started_at: i64,
) -> Result<Step> {
    // A database newer than this build is not touched (a newer build's migrations are its own).
    refuse_unknown(&status(store, schemas).await?, Tolerate::Nothing)?;
    let mut tx = begin_guarded(store, guard).await?;
    ensure_table(&mut tx).await?;
    adopt_legacy(&mut tx, schemas).await?;
    let mut applied: HashMap<(String, i64), (String, i64)> = HashMap::new();
    for r in sqlx::query(&format!(
        "SELECT schema_name, version, checksum, applied_at FROM {TABLE}"
    ))
    .fetch_all(tx.conn())
    .await?
    {
        applied.insert(
            (r.try_get("schema_name")?, r.try_get("version")?),
            (r.try_get("checksum")?, r.try_get("applied_at")?),
        );
    }
    // This build's migrations in order, each checked against its record; the pending ones
    // up to the target.
    let mut pending: Vec<(&Schema, &'static Migration)> = Vec::new();
    'schemas: for schema in schemas {
        for m in schema.migrations {
            let built = m.checksum();
            match applied.get(&(schema.name.to_owned(), m.version)) {
                Some((recorded, _)) if *recorded != built => {
                    return Err(Error::MigrationChanged {
                        file: m.file,
                        recorded: recorded.clone(),
                        built,
                    });
                }
                Some(_) => {}
                None if *until == Until::BeforeContract && m.phase == Some(Phase::Contract) => {
                    break 'schemas;
                }
                None => pending.push((schema, m)),
            }
            if let Until::Version { schema: s, version } = until {
                if *s == schema.name && *version == m.version {
                    break 'schemas;
                }
            }
        }
    }
    let Some(&(schema, first)) = pending.first() else {
        tx.commit().await?;
        return Ok(Step::Done);
    };
    match first.phase {
        None => {
            let mut files = Vec::new();
            for (schema, m) in pending.into_iter().take_while(|(_, m)| m.phase.is_none()) {
                run_up(store, guard, &mut tx, schema, m).await?;
                files.push(m.file);
            }
            tx.commit().await?;
            Ok(Step::Applied(files))
        }
        Some(Phase::Backfill) => {
            let rows = sqlx::query(&first.render(store.backend))
                .bind(guard.batch_rows)
                .execute(tx.conn())
                .await
                .map_err(|source| Error::Migration {
                    file: first.file,
                    source,
                })?
                .rows_affected();
            if rows > 0 {
                tx.commit().await?;
                return Ok(Step::Copied {
                    file: first.file,
                    rows,
                });
            }
            record(&mut tx, schema, first, holdfast_core::now_ms()).await?;
            tx.commit().await?;
            tracing::info!(file = first.file, "backfill complete");
            Ok(Step::Applied(vec![first.file]))
        }
        Some(phase) => {
            if phase == Phase::Contract {
                // Instances of a schema that was in use before this run may still act on the
                // switch before the contract: give them time to notice it.
                let mine = applied.iter().filter(|((s, _), _)| s == schema.name);
                let in_use_before = mine.clone().any(|(_, (_, at))| *at < started_at);
                let last = mine.map(|(_, (_, at))| *at).max().unwrap_or(0);
                let since = Duration::from_millis(
                    u64::try_from(holdfast_core::now_ms() - last).unwrap_or(0),
                );
                if in_use_before && since < SETTLE {
                    drop(tx);
                    return Ok(Step::Settle(SETTLE - since));
                }
            }
            run_up(store, guard, &mut tx, schema, first).await?;
            tx.commit().await?;
            Ok(Step::Applied(vec![first.file]))
        }
    }
}

/// Where a migration's file splits into parts that commit one after another (see
/// [`run_up`]).
pub const COMMIT_HERE: &str = "-- holdfast: commit here";

/// Runs `m` (unless it is only a comment: a switch has no DDL) and records it in `tx`.
///
/// On Postgres, the parts of a file before a [`COMMIT_HERE`] line each commit in a guarded
/// transaction of their own first, so that what the last part waits for (a contract's
/// `DROP TABLE`, behind a long reader) holds none of their locks meanwhile. They must be
/// idempotent (`IF EXISTS`): a part may commit and the rest give up, and the next run repeats
/// it. SQLite has one writer and no lock queue: every part runs in `tx`.
async fn run_up(
    store: &Store,
    guard: &Guard,
    tx: &mut crate::Tx,
    schema: &Schema,
    m: &'static Migration,
) -> Result<()> {
    let sql = m.render(tx.backend());
    let mut parts: Vec<&str> = sql.split(COMMIT_HERE).collect();
    let last = parts.pop().unwrap_or_default();
    let failed = |source| Error::Migration {
        file: m.file,
        source,
    };
    for part in parts.into_iter().filter(|p| has_statements(p)) {
        if store.backend == Backend::Postgres {
            let mut own = begin_timed(store, guard).await?;
            own.conn().execute(part).await.map_err(failed)?;
            own.commit().await?;
        } else {
            tx.conn().execute(part).await.map_err(failed)?;
        }
    }
    if has_statements(last) {
        tx.conn().execute(last).await.map_err(failed)?;
    }
    record(tx, schema, m, holdfast_core::now_ms()).await?;
    tracing::info!(
        schema = schema.name,
        version = m.version,
        file = m.file,
        phase = m.phase.map(Phase::name),
        "applied migration"
    );
    Ok(())
}

/// Whether `sql` says anything but `--` comments.
fn has_statements(sql: &str) -> bool {
    sql.lines()
        .map(str::trim)
        .any(|l| !l.is_empty() && !l.starts_with("--"))
}

/// The table of applied migrations, with the `phase` column a table made by an earlier build
/// lacks.
async fn ensure_table(tx: &mut crate::Tx) -> Result<()> {
    tx.conn()
        .execute(
            format!(
                "CREATE TABLE IF NOT EXISTS {TABLE} (
                     schema_name TEXT NOT NULL, version BIGINT NOT NULL, file TEXT NOT NULL,
                     checksum TEXT NOT NULL, applied_at BIGINT NOT NULL, phase TEXT,
                     PRIMARY KEY (schema_name, version))"
            )
            .as_str(),
        )
        .await?;
    let backend = tx.backend();
    if !has_phase_column(tx.conn(), backend).await? {
        tx.conn()
            .execute(format!("ALTER TABLE {TABLE} ADD COLUMN phase TEXT").as_str())
            .await?;
    }
    Ok(())
}

async fn has_phase_column(conn: &mut sqlx::AnyConnection, backend: Backend) -> Result<bool> {
    let q = match backend {
        Backend::Sqlite => "SELECT COUNT(*) AS n FROM pragma_table_info($1) WHERE name = 'phase'",
        Backend::Postgres => "SELECT COUNT(*) AS n FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1 AND column_name = 'phase'",
    };
    let n: i64 = sqlx::query(q)
        .bind(TABLE)
        .fetch_one(&mut *conn)
        .await?
        .try_get("n")?;
    Ok(n > 0)
}

async fn record(tx: &mut crate::Tx, schema: &Schema, m: &Migration, applied_at: i64) -> Result<()> {
    sqlx::query(&format!(
        "INSERT INTO {TABLE} (schema_name, version, file, checksum, applied_at, phase) VALUES ($1, $2, $3, $4, $5, $6)"
    ))
    .bind(schema.name)
    .bind(m.version)
    .bind(m.file)
    .bind(m.checksum())
    .bind(applied_at)
    .bind(m.phase.map(Phase::name))
    .execute(tx.conn())
    .await?;
    Ok(())
}

/// A database from before schemas were split lists its applied versions in the legacy table:
/// every migration that names one of them as its `legacy` version is recorded as applied
/// (with this build's checksum) rather than run again. The legacy table stays, so a schema
/// that joins later is adopted too.
async fn adopt_legacy(tx: &mut crate::Tx, schemas: &[&Schema]) -> Result<()> {
    let backend = tx.backend();
    if !table_exists(tx.conn(), backend, LEGACY_TABLE).await? {
        return Ok(());
    }
    let mut legacy: HashMap<i64, i64> = HashMap::new();
    for r in sqlx::query(&format!("SELECT version, applied_at FROM {LEGACY_TABLE}"))
        .fetch_all(tx.conn())
        .await?
    {
        legacy.insert(r.try_get("version")?, r.try_get("applied_at")?);
    }
    for schema in schemas {
        for m in schema.migrations {
            let Some(applied_at) = m.legacy.and_then(|v| legacy.get(&v)) else {
                continue;
            };
            let known = sqlx::query(&format!(
                "SELECT 1 AS one FROM {TABLE} WHERE schema_name = $1 AND version = $2"
            ))
            .bind(schema.name)
            .bind(m.version)
            .fetch_optional(tx.conn())
            .await?;
            if known.is_none() {
                record(tx, schema, m, *applied_at).await?;
                tracing::info!(
                    schema = schema.name,
                    version = m.version,
                    "adopted a migration applied before schemas were split"
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_gets_its_spelling_of_blobs_and_serial_keys_only() {
        let sql = "CREATE TABLE session_blobs (id INTEGER PRIMARY KEY AUTOINCREMENT, data BLOB NOT NULL, b BLOB, blobby TEXT, x_BLOB TEXT);";
        assert_eq!(render(sql, Backend::Sqlite), sql);
        assert_eq!(
            render(sql, Backend::Postgres),
            "CREATE TABLE session_blobs (id BIGSERIAL PRIMARY KEY, data BYTEA NOT NULL, b BYTEA, blobby TEXT, x_BLOB TEXT);"
        );
    }

    #[test]
    fn versions_count_up_from_one_and_name_their_files() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        for (i, m) in SCHEMA.migrations.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1);
            let on_disk = std::fs::read_to_string(root.join(m.file)).expect(m.file);
            assert_eq!(on_disk, m.sql, "{} is the file it names", m.file);
        }
    }
}
