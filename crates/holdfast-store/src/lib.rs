//! The durable store: where every record a user must never lose lives.
//!
//! Callers see one concrete [`Store`]; whether it runs on SQLite (the embedded default: one
//! file in WAL mode, shared by every local process) or PostgreSQL is a matter of the URL.
//! Both run the same SQL through sqlx's `Any` driver; the few places where the engines differ
//! (how a write transaction starts, row locks, the migration lock, DDL types) are spelled out
//! per [`Backend`]. One conformance suite (`tests/conformance.rs`) runs against both.
//!
//! The store knows generic records only: accounts and sessions, idempotency keys, the job
//! queue and the effect ledger. An application brings its own tables as a [`Schema`] and its
//! own SQL, and composes it with these primitives in one [`Store::transaction`]: the closure
//! gets a [`Tx`], runs the application's statements on [`Tx::conn`] and the generic ones as
//! methods (`tx.job_enqueue`, `tx.idem_finish`, `tx.ledger_settle`), and commits them all or
//! nothing. A transaction is retried with full-jitter backoff, a budget and a deadline when
//! the failure is transient; [`Rerun`] says whether its body may run twice. On PostgreSQL,
//! work whose values are known up front or computed by the database can instead be one
//! [`Statement`] of steps from both sides, one round trip; on SQLite, the transactions one
//! process queues share a commit (group commit).
//!
//! Architecture invariant: this crate knows nothing about HTTP, and nothing about any
//! application's records. It stores the bytes of an idempotent response but never looks
//! inside them, and it never calls back into another crate.

mod accounts;
mod group;
mod idempotency;
mod jobs;
mod limits;
mod migrate;
mod pool;
mod primary;
mod replicas;
mod statement;
pub mod testing;
mod tx;
mod uploads;

pub use accounts::{SessionCheck, SessionCreate};
pub use holdfast_core::Backend;
pub use idempotency::{ClaimOutcome, IdemClaim, IdemLock, StoredResponse};
pub use jobs::{
    BegunEffect, DeadJob, JobEffect, JobFence, JobInsert, JobRow, LedgerEntry, QueueCount,
    NOTIFY_CHANNEL,
};
pub use limits::{Quota, Refused};
pub use migrate::{
    render as render_migration, Guard as MigrationGuard, Migration, Mode as MigrateMode, Phase,
    Recorded, Schema, SchemaState, Until as MigrateUntil, PHASE_REFRESH, SCHEMA as STORE_SCHEMA,
    SETTLE,
};
pub use pool::SLOW_HOLD as POOL_SLOW_HOLD;
pub use primary::Node;
pub use replicas::{Freshness, Lsn, ReplicaOptions, WATCH_EVERY as REPLICA_WATCH_EVERY};
pub use statement::{KeyStep, Keyed, Param as StatementParam, Statement};
pub use tx::{Rerun, ScopedFutureExt, Tx, TxBody, TxError};
pub use uploads::{NewUpload, UploadAck, UploadPart, UploadQuota, UploadRow};

use holdfast_core::retry::{RetryBudget, RetryPolicy};
use serde::Serialize;
use sqlx::any::{AnyArguments, AnyRow};
use sqlx::{Any, Executor};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The metric families the store exports (see [`holdfast_core::Metric`]).
pub const METRICS: &[holdfast_core::Metric] = &[
    holdfast_core::Metric::counter(
        "holdfast_store_retries_total",
        "Store operations retried after a transient failure, by operation.",
    )
    .at_zero(&[&[]]),
    holdfast_core::Metric::counter(
        pool::CONNECTIONS_FAILED,
        "Connections to the database that failed to open, or were found dead when next lent: a restart or a cut link, seen even when no operation had to be retried.",
    )
    .at_zero(&[&[]]),
    holdfast_core::Metric::counter(
        "holdfast_store_retry_budget_exhausted_total",
        "Store operations that failed because the process's retry budget was spent, by operation.",
    )
    .at_zero(&[&[]]),
    holdfast_core::Metric::histogram(
        "holdfast_store_group_commit_size",
        "How many write transactions each SQLite commit of this process carried (group commit).",
    ),
    holdfast_core::Metric::histogram(
        tx::WRITE_LOCK_WAIT,
        "SQLite: how long each write transaction of this process waited for the database's one write lock (its turn in the process, then the lock file).",
    ),
    holdfast_core::Metric::histogram(
        tx::WRITE_LOCK_HELD,
        "SQLite: how long this process held the database's one write lock each time, from taking it to letting go; the sums of every process writing the file add up to at most one second a second.",
    ),
    holdfast_core::Metric::counter(
        "holdfast_store_replica_reads_total",
        "Reads that may go to a standby (catalog, order history), by where they were served: replica or primary.",
    )
    .at_zero(&[&[("served", "replica")], &[("served", "primary")]]),
    holdfast_core::Metric::gauge(
        "holdfast_replica_in_rotation",
        "1 while this instance reads from the database host, 0 while it does not (the primary, or a standby down or past the lag bound).",
    ),
    holdfast_core::Metric::gauge(
        "holdfast_replica_read_lag_seconds",
        "How far behind the primary a standby is as this instance measures it for its reads: it had everything the primary had this long ago.",
    ),
];

/// How long [`Store::write_position`] waits for the primary's answer.
pub const POSITION_WITHIN: Duration = Duration::from_millis(250);

/// A statement with its parameters bound, on the `Any` driver.
type AnyQuery<'q> = sqlx::query::Query<'q, Any, AnyArguments<'q>>;

/// One statement on a connection the store's pool lends for it, given back (without a
/// round trip) once the statement has answered; on PostgreSQL it runs in autocommit.
trait Pooled {
    fn execute_pooled(
        self,
        store: &Store,
    ) -> impl std::future::Future<Output = std::result::Result<sqlx::any::AnyQueryResult, sqlx::Error>>
           + Send;

    fn fetch_all_pooled(
        self,
        store: &Store,
    ) -> impl std::future::Future<Output = std::result::Result<Vec<AnyRow>, sqlx::Error>> + Send;
}

impl Pooled for AnyQuery<'_> {
    async fn execute_pooled(
        self,
        store: &Store,
    ) -> std::result::Result<sqlx::any::AnyQueryResult, sqlx::Error> {
        let mut conn = store.lend().await?;
        let done = self.execute(&mut *conn).await?;
        conn.give_back();
        Ok(done)
    }

    async fn fetch_all_pooled(
        self,
        store: &Store,
    ) -> std::result::Result<Vec<AnyRow>, sqlx::Error> {
        let mut conn = store.lend().await?;
        let rows = self.fetch_all(&mut *conn).await?;
        conn.give_back();
        Ok(rows)
    }
}

/// What a read returns a row as: a struct deriving `sqlx::FromRow`, or a tuple of columns.
trait RowType: for<'r> sqlx::FromRow<'r, AnyRow> + Send + Unpin {}
impl<T: for<'r> sqlx::FromRow<'r, AnyRow> + Send + Unpin> RowType for T {}

/// What went wrong, in words the caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no such record")]
    NotFound,
    /// None of the PostgreSQL hosts the URL names answers as a primary (each reason given).
    #[error("no primary among the store's hosts: {0}")]
    NoPrimary(String),
    #[error("this email is already registered")]
    EmailTaken,
    /// The idempotency key was claimed by another attempt after this one's lock expired
    /// (or this attempt's earlier try already committed). The caller should re-read the key.
    #[error("the idempotency key is no longer held by this request")]
    IdempotencyLockLost,
    /// A job attempt is no longer current: its lease expired and a newer claim took over.
    /// Whatever this attempt did externally was idempotent; the newer one settles it.
    #[error("this job attempt is no longer current")]
    JobLost,
    /// An upload writer's attempt is no longer current: its lease ran out and another writer,
    /// a delete or the reaper took the upload. Nothing it wrote was acknowledged.
    #[error("this upload is no longer held by this writer")]
    UploadLeaseLost,
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration {file} failed: {source}")]
    Migration {
        file: &'static str,
        source: sqlx::Error,
    },
    /// A migration this database already ran has different contents in this build.
    #[error(
        "migration {file} was changed after this database applied it (recorded checksum \
         {recorded}, this build has {built}); released migrations are append-only: restore \
         the file and put the change in a new migration"
    )]
    MigrationChanged {
        file: &'static str,
        recorded: String,
        built: String,
    },
    #[error("unsupported database url (want sqlite:… or postgres://…)")]
    UnsupportedUrl,
    /// A write transaction this one shared a commit with (SQLite's group commit) was
    /// abandoned before the commit: nothing of it was committed, and it may run again.
    #[error("the group commit this transaction was in was abandoned before committing")]
    GroupAbandoned,
    /// The commit shared by a group of write transactions failed.
    #[error("the group commit failed: {0}")]
    GroupCommitFailed(String),
    /// The operation exists on one engine only (a composed statement needs PostgreSQL).
    #[error("not on this database engine: {0}")]
    Unsupported(&'static str),
    /// The database lacks migrations this build needs.
    #[error(
        "the database lacks {} migration(s) this build needs ({}): run `holdfast migrate up` first",
        pending.len(),
        pending.join(", ")
    )]
    SchemaBehind { pending: Vec<String> },
    /// The database has migrations this build does not know: a newer build migrated it.
    #[error(
        "the database has migrations this build does not know ({}): a newer build migrated it; \
         run that build, or roll the schema back with it",
        unknown.join(", ")
    )]
    SchemaAhead { unknown: Vec<String> },
    #[error("no schema named {name:?} (this build has {known:?})")]
    UnknownSchema {
        name: String,
        known: Vec<&'static str>,
    },
    /// `holdfast migrate down` reached a contract.
    #[error("{file} is a contract: it dropped the old shape, so there is no way back to it; nothing was changed (fix forward with a new migration)")]
    PastContract { file: &'static str },
    /// `holdfast migrate down` reached a migration that has no down step.
    #[error("{file} has no down step (no .down.sql beside it): it cannot be undone; nothing was changed")]
    NoDownStep { file: &'static str },
    /// Migrating gave up: a lock stayed taken past the guard's deadline.
    #[error(
        "gave up migrating after {waited:?} ({tries} lock waits timed out): {}",
        match holder {
            Some(pid) => format!("another migration holds the migration lock (Postgres backend pid {pid})"),
            None => "a long transaction holds a lock a migration needs (see pg_stat_activity, or a process holding the SQLite write lock)".to_owned(),
        }
    )]
    MigrationLocked {
        waited: std::time::Duration,
        tries: u32,
        holder: Option<i32>,
    },
    #[error("creating the database file {path}: {source}")]
    CreateFile {
        path: String,
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A transient failure: the same operation may succeed if tried again.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Db(e) => transient(e, false),
            Error::GroupAbandoned => true,
            _ => false,
        }
    }

    /// Transient *and* certain that nothing was committed, so even a non-idempotent write may
    /// be re-run: a busy SQLite file, a Postgres serialization failure or deadlock (the
    /// transaction was rolled back), or no connection obtained at all.
    pub fn is_retryable_uncommitted(&self) -> bool {
        match self {
            Error::Db(e) => transient(e, true),
            Error::GroupAbandoned => true,
            _ => false,
        }
    }

    /// The store is unreachable or overloaded (as opposed to a caller's mistake).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Error::Db(_)
                | Error::Migration { .. }
                | Error::NoPrimary(_)
                | Error::GroupAbandoned
                | Error::GroupCommitFailed(_)
        )
    }

    /// A write refused as read-only, or a new connection that found a standby: the node the
    /// pool connects to is no primary (now).
    fn read_only(&self) -> bool {
        match self {
            Error::Db(sqlx::Error::Protocol(m)) => m == primary::STANDBY_REFUSED,
            Error::Db(sqlx::Error::Database(db)) => db.code().as_deref() == Some("25006"),
            _ => false,
        }
    }

    /// A failure that says the primary may have moved (or gone): a write refused as
    /// read-only, the server shutting down, a broken or refused connection, a connection that
    /// found a standby; with several hosts, also no connection in time.
    fn moves_primary(&self, several_hosts: bool) -> bool {
        let Error::Db(e) = self else { return false };
        match e {
            sqlx::Error::Io(_) | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::PoolTimedOut => several_hosts,
            sqlx::Error::Protocol(m) => m == primary::STANDBY_REFUSED,
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                code == "25006" || code.starts_with("57P0") || code.starts_with("08")
            }
            _ => false,
        }
    }
}

/// SQLite's SQLITE_BUSY or SQLITE_LOCKED (the low byte of its extended result code): another
/// connection holds what this one needs, and trying again later may pass.
fn sqlite_busy(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db)
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() =>
        {
            db.code()
                .unwrap_or_default()
                .parse::<i32>()
                .is_ok_and(|n| matches!(n & 0xff, 5 | 6))
        }
        _ => false,
    }
}

/// The pauses between a new SQLite connection's tries at switching its file to WAL: from
/// 5 ms, doubling, at most 100 ms, jittered, for at most the busy timeout.
const WAL_SWITCH: RetryPolicy = RetryPolicy {
    base: Duration::from_millis(5),
    cap: Duration::from_millis(100),
    max_attempts: u32::MAX,
    deadline: Duration::from_secs(5),
};

fn transient(e: &sqlx::Error, must_be_uncommitted: bool) -> bool {
    match e {
        sqlx::Error::PoolTimedOut => true,
        // The pool was replaced (the primary moved) between taking it and using it: nothing
        // ran; the next attempt takes the new one.
        sqlx::Error::PoolClosed => true,
        // A new connection that found a standby: nothing ran on it.
        sqlx::Error::Protocol(m) if m == primary::STANDBY_REFUSED => true,
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => {
            !must_be_uncommitted
        }
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // SQLite reports (extended) numeric result codes; the low byte is the primary
            // code: 5 SQLITE_BUSY, 6 SQLITE_LOCKED. Ask the driver, not the code's shape: many
            // Postgres SQLSTATEs are all digits too (40001, 08006, 42501).
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                return sqlite_busy(e);
            }
            // Postgres SQLSTATE: serialization failure, deadlock (rolled back, safe either
            // way); a write refused by a read-only (demoted) node (it ran nothing: safe
            // either way, once the primary is found again); admin shutdown, cannot connect
            // now, connection exceptions (maybe committed if it happened at COMMIT).
            match code.as_ref() {
                "40001" | "40P01" | "25006" => true,
                "57P01" | "57P02" | "57P03" => !must_be_uncommitted,
                c if c.starts_with("08") => !must_be_uncommitted,
                _ => false,
            }
        }
        _ => false,
    }
}

#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// `sqlite:PATH` (created if missing) or `postgres://…`.
    pub url: String,
    /// Connections to the primary this process keeps open at most in the normal case.
    pub max_connections: u32,
    /// How many more it may open while connections are held [`POOL_SLOW_HOLD`] or longer on
    /// average (a slow link holds each connection longer; see `pool.rs`); 0 for none.
    pub surplus_connections: u32,
    pub retry: RetryPolicy,
    /// How long an acquired connection may be waited for before the attempt fails.
    pub acquire_timeout: Duration,
    /// The application's tables, migrated after the store's own, in this order.
    pub schemas: Vec<&'static Schema>,
    /// Apply pending migrations on open (the default, under the default guard), or only
    /// verify that the database has exactly this build's (what serving processes do).
    pub migrate: migrate::Mode,
    /// Postgres ends a session that sits this long inside a transaction without sending a
    /// statement (`idle_in_transaction_session_timeout`): a process stopped or partitioned
    /// mid-transaction releases its row locks after this instead of when it dies, and its late
    /// commit fails. Our transactions never wait on anything but the database inside.
    pub idle_in_transaction_timeout: Duration,
    /// SQLite: whether this process checkpoints the WAL into the database file when it grows
    /// (SQLite's default, every 1000 pages). Off when a continuous backup (Litestream) runs:
    /// it checkpoints itself, and a checkpoint by another process racing its snapshot is how
    /// its backups come out corrupt (the `lose-primary` drill restored one that failed
    /// `PRAGMA integrity_check` within 15 s). Off, with no backup running, the WAL grows.
    pub sqlite_autocheckpoint: bool,
    /// PostgreSQL with a URL of several hosts: whether, and within which limits, the
    /// standbys among them serve the reads that tolerate staleness ([`Store::read_replica`]).
    /// `None`: every read goes to the primary.
    pub replicas: Option<ReplicaOptions>,
}

impl StoreOptions {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            max_connections: 8,
            surplus_connections: 4,
            retry: RetryPolicy::default(),
            acquire_timeout: Duration::from_secs(3),
            schemas: Vec::new(),
            migrate: migrate::Mode::Apply(migrate::Guard::default()),
            idle_in_transaction_timeout: Duration::from_secs(2),
            sqlite_autocheckpoint: true,
            replicas: Some(ReplicaOptions::default()),
        }
    }

    /// What opening does about migrations (see [`migrate::Mode`]).
    pub fn migrate(mut self, mode: migrate::Mode) -> Self {
        self.migrate = mode;
        self
    }

    /// Adds an application schema (see [`Schema`]).
    pub fn schema(mut self, schema: &'static Schema) -> Self {
        self.schemas.push(schema);
        self
    }
}

/// The file of a `sqlite:` URL, if it names one (not `:memory:`).
fn sqlite_file(url: &str) -> Option<&str> {
    url.strip_prefix("sqlite:")
        .map(|rest| rest.strip_prefix("//").unwrap_or(rest))
        .map(|rest| rest.split('?').next().unwrap_or(rest))
        .filter(|p| !p.is_empty() && !p.starts_with(':'))
}

/// Creates a missing SQLite database file readable by its owner only (0600). SQLite gives its
/// `-wal` and `-shm` files the database file's mode, so they are private too.
fn create_private(url: &str) -> Result<()> {
    let Some(path) = sqlite_file(url) else {
        return Ok(());
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(Error::CreateFile {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
    Ok(())
}

/// The durable store. Cheap to clone: clones share one pool.
#[derive(Clone)]
pub struct Store {
    /// The pool writes (and reads) use: on PostgreSQL, the primary's among the URL's hosts.
    primary: Arc<primary::Primary>,
    backend: Backend,
    retry: RetryPolicy,
    budget: RetryBudget,
    /// SQLite only: one write transaction at a time per process (see `Store::begin_write`).
    write_gate: Option<Arc<tokio::sync::Semaphore>>,
    /// SQLite only: the queue through which this process's write transactions share commits
    /// (see `group.rs`).
    group: Option<Arc<group::Group>>,
    /// SQLite only: the file every process writing the database takes an exclusive `flock` on
    /// before it begins a write transaction (see `Store::begin_write`).
    write_lock: Option<Arc<std::fs::File>>,
    /// PostgreSQL with several hosts: the standbys reads may go to (see `replicas.rs`).
    replicas: Option<Arc<replicas::Replicas>>,
    /// When a connection last failed: the pool's lending check reads it.
    lost: Arc<pool::LostConnections>,
}

/// What every new connection runs before it is lent.
async fn set_up_connection(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    idle_in_tx_ms: u128,
    autocheckpoint: bool,
) -> std::result::Result<(), sqlx::Error> {
    if backend == Backend::Sqlite {
        // busy_timeout: wait for another process's write lock instead of failing at once.
        // synchronous=FULL: an acknowledged write survives a power cut, not only a killed
        // process.
        conn.execute(
            "PRAGMA busy_timeout = 5000; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
        )
        .await?;
        // WAL: readers never block the writer, and several processes share the file safely.
        // It is the file's own setting, so only the first switch writes anything; but on a
        // new file every connection opened at once switches it, and two that meet can each
        // hold the lock the other needs next. SQLite then answers SQLITE_BUSY at once rather
        // than wait (its busy handler would deadlock): the one refused tries again.
        let started = std::time::Instant::now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            match conn.execute("PRAGMA journal_mode = WAL").await {
                Ok(_) => break,
                Err(e) if sqlite_busy(&e) => match WAL_SWITCH.next_delay(attempts, started) {
                    Some(pause) => tokio::time::sleep(pause).await,
                    None => return Err(e),
                },
                Err(e) => return Err(e),
            }
        }
        if !autocheckpoint {
            conn.execute("PRAGMA wal_autocheckpoint = 0;").await?;
        }
    } else {
        let set = format!("SET idle_in_transaction_session_timeout = {idle_in_tx_ms}");
        conn.execute(set.as_str()).await?;
        // Writes go to a primary only: a connection to a standby (a demoted node, or the
        // wrong host) is refused at once.
        let standby: bool = sqlx::query_scalar(primary::READ_ONLY)
            .fetch_one(&mut *conn)
            .await?;
        if standby {
            return Err(sqlx::Error::Protocol(primary::STANDBY_REFUSED.into()));
        }
    }
    Ok(())
}

impl Store {
    /// Connects, then brings the store's schema and `opts.schemas` up to date under a lock (so
    /// instances that start together do not race each other's migrations).
    pub async fn open(opts: &StoreOptions) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let backend = Backend::of_url(&opts.url).ok_or(Error::UnsupportedUrl)?;
        if backend == Backend::Sqlite {
            create_private(&opts.url)?;
        }
        let url = match backend {
            Backend::Sqlite if !opts.url.contains('?') => format!("{}?mode=rwc", opts.url),
            _ => opts.url.clone(),
        };
        let idle_in_tx_ms = opts.idle_in_transaction_timeout.as_millis().max(1);
        let autocheckpoint = opts.sqlite_autocheckpoint;
        let lost = Arc::new(pool::LostConnections::new());
        let settings = pool::Settings {
            max_connections: opts.max_connections,
            surplus_connections: opts.surplus_connections,
            acquire_timeout: opts.acquire_timeout,
            setup: Arc::new(move |conn| {
                Box::pin(set_up_connection(
                    conn,
                    backend,
                    idle_in_tx_ms,
                    autocheckpoint,
                ))
            }),
            lost: lost.clone(),
        };
        let hosts = match backend {
            Backend::Postgres => primary::hosts(&url),
            Backend::Sqlite => vec![url.clone()],
        };
        let primary =
            primary::Primary::open(hosts.clone(), backend == Backend::Postgres, settings).await?;
        let write_gate =
            (backend == Backend::Sqlite).then(|| Arc::new(tokio::sync::Semaphore::new(1)));
        let write_lock = match sqlite_file(&opts.url) {
            Some(db) if backend == Backend::Sqlite => {
                Some(Arc::new(tx::open_write_lock(db).map_err(|source| {
                    Error::CreateFile {
                        path: format!("{db}.write-lock"),
                        source,
                    }
                })?))
            }
            _ => None,
        };
        let replicas = match (&opts.replicas, hosts.len()) {
            (Some(limits), n) if backend == Backend::Postgres && n > 1 => {
                let replicas = replicas::Replicas::start(&hosts, limits.clone());
                // Know the standbys before the first read, rather than sending it to the
                // primary while the watcher has yet to look.
                replicas.look().await;
                Some(replicas)
            }
            _ => None,
        };
        let store = Self {
            primary: Arc::new(primary),
            replicas,
            backend,
            retry: opts.retry.clone(),
            budget: RetryBudget::default(),
            group: (backend == Backend::Sqlite).then(Arc::default),
            write_gate,
            write_lock,
            lost,
        };
        match &opts.migrate {
            migrate::Mode::Apply(guard) => {
                store
                    .migrate_up(opts, guard, &migrate::Until::Everything)
                    .await?;
            }
            migrate::Mode::Verify => migrate::verify(&store, &store.schemas(opts)).await?,
            migrate::Mode::Inspect => {}
        }
        Ok(store)
    }

    /// The store's schema, then the application's.
    fn schemas(&self, opts: &StoreOptions) -> Vec<&'static Schema> {
        let mut schemas = vec![&migrate::SCHEMA];
        schemas.extend(opts.schemas.iter().copied());
        schemas
    }

    /// Applies the store's and `opts`' schemas' pending migrations as far as `until`, under
    /// `guard`; the files applied.
    pub async fn migrate_up(
        &self,
        opts: &StoreOptions,
        guard: &migrate::Guard,
        until: &migrate::Until,
    ) -> Result<Vec<&'static str>> {
        let schemas = self.schemas(opts);
        self.run(Rerun::Always, "migrate", || {
            migrate::apply(self, &schemas, guard, until)
        })
        .await
    }

    /// The versions of `schema` this database has applied: how a schema's code learns which
    /// phases of a change have run (ask again every [`migrate::PHASE_REFRESH`]).
    pub async fn applied_versions(&self, schema: &str) -> Result<Vec<i64>> {
        let rows =
            sqlx::query("SELECT version FROM holdfast_schema_migrations WHERE schema_name = $1")
                .bind(schema)
                .fetch_all_pooled(self)
                .await?;
        rows.iter()
            .map(|r| Ok(sqlx::Row::try_get::<i64, _>(r, "version")?))
            .collect()
    }

    /// Undoes the named schema's migrations above version `to`, newest first, under `guard`;
    /// the files undone.
    pub async fn migrate_down(
        &self,
        opts: &StoreOptions,
        schema: &str,
        to: i64,
        guard: &migrate::Guard,
    ) -> Result<Vec<&'static str>> {
        let schemas = self.schemas(opts);
        let Some(schema) = schemas.iter().find(|s| s.name == schema) else {
            return Err(Error::UnknownSchema {
                name: schema.to_owned(),
                known: schemas.iter().map(|s| s.name).collect(),
            });
        };
        migrate::revert(self, schema, to, guard).await
    }

    /// Each schema's migrations as this database has them (changes nothing).
    pub async fn migration_status(&self, opts: &StoreOptions) -> Result<Vec<migrate::SchemaState>> {
        migrate::status(self, &self.schemas(opts)).await
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Connections in use and idle, for the pool gauges.
    pub fn pool_stats(&self) -> (u32, usize) {
        self.pool().stats()
    }

    /// On PostgreSQL, each host the URL names: primary or standby, and how far each standby
    /// is behind; on SQLite, nothing.
    pub async fn replication(&self) -> Vec<primary::Node> {
        match self.backend {
            Backend::Sqlite => Vec::new(),
            Backend::Postgres => self.primary.nodes().await,
        }
    }

    /// On PostgreSQL, the URL of the one host writes go to now (the URL may name several);
    /// what a `LISTEN` must connect to, since notifications are sent on the primary.
    pub fn primary_url(&self) -> Option<String> {
        (self.backend == Backend::Postgres).then(|| self.primary.url())
    }

    /// The pool to use now (on PostgreSQL, the primary's; it changes when the primary moves).
    pub(crate) fn pool(&self) -> pool::Pool {
        self.primary.pool()
    }

    /// A connection of the pool writes use now, for one operation: given back
    /// ([`pool::Lent::give_back`]) when it finished, it is lent again without a round trip.
    pub(crate) async fn lend(&self) -> std::result::Result<pool::Lent, sqlx::Error> {
        self.pool().lend().await
    }

    /// One round trip, no retries: for readiness checks.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute_pooled(self).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.primary.close().await;
        if let Some(r) = &self.replicas {
            r.close().await;
        }
    }

    /// Whether some reads may be served by a standby (PostgreSQL, several hosts, replica
    /// reads on): then a writer should hand its readers a [`Store::write_position`].
    pub fn reads_from_replicas(&self) -> bool {
        self.replicas.is_some()
    }

    /// Each host's name, whether reads go to it now, and its lag as this store last saw it
    /// (empty without replica reads).
    pub fn replica_rotation(&self) -> Vec<(String, bool, Option<Duration>)> {
        self.replicas
            .as_ref()
            .map_or_else(Vec::new, |r| r.rotation())
    }

    /// Where the primary's WAL is now (`None` without replica reads): every write committed
    /// before this call is at or before it, so a reader told this position and served under
    /// [`Freshness::AtLeast`] sees those writes. One attempt, bounded by [`POSITION_WITHIN`]
    /// (an answer already earned is not held back for it); if it fails, [`Lsn::BEYOND`], which
    /// sends the reader to the primary.
    pub async fn write_position(&self) -> Option<Lsn> {
        self.replicas.as_ref()?;
        let asked = async {
            let mut conn = self.lend().await?;
            let at = sqlx::query_scalar::<_, String>("SELECT pg_current_wal_lsn()::text")
                .fetch_one(&mut *conn)
                .await?;
            conn.give_back();
            Ok::<_, sqlx::Error>(at)
        };
        match tokio::time::timeout(POSITION_WITHIN, asked).await {
            Ok(Ok(at)) => Some(at.parse().unwrap_or(Lsn::BEYOND)),
            _ => Some(Lsn::BEYOND),
        }
    }

    /// [`Store::read`] for reads that tolerate staleness (a catalog, an order history): a
    /// standby in rotation serves it when it is as fresh as `fresh` demands (waiting within
    /// the bound for a token to be replayed), else the primary does. A standby that fails it
    /// is taken out of rotation and the primary serves it; so `body` may run twice.
    pub async fn read_replica<'a, T, E, F>(
        &self,
        op: &'static str,
        fresh: Freshness,
        mut body: F,
    ) -> std::result::Result<T, TxError<E>>
    where
        F: for<'t> FnMut(&'t mut sqlx::AnyConnection) -> TxBody<'a, 't, T, E> + Send + 'a,
        T: Send + 'a,
        E: Send + 'a,
    {
        if let Some(replicas) = self
            .replicas
            .as_ref()
            .filter(|_| fresh != Freshness::Latest)
        {
            let after = match fresh {
                Freshness::AtLeast(lsn) => Some(lsn),
                Freshness::Any | Freshness::Latest => None,
            };
            if let Some((i, mut conn)) = replicas.connection(after).await {
                match body(&mut conn).await {
                    Err(TxError::Db(e)) => replicas.failed(i, &e.to_string()),
                    done => {
                        replicas::count(replicas::Served::Replica);
                        return done;
                    }
                }
            }
            replicas::count(replicas::Served::Primary);
        }
        self.read(op, body).await
    }

    /// A random secret of 32 bytes every instance sharing this store shares, made at its
    /// first use under `name` and kept in the store (so instances need no key configured to
    /// agree on it). Deleting its row rotates it.
    pub async fn shared_secret(&self, name: &str) -> Result<Vec<u8>> {
        use rand::RngCore;
        let mut fresh = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut fresh);
        let fresh = hex::encode(fresh);
        self.write_one(
            sqlx::query(
                "INSERT INTO holdfast_secrets (name, secret, created_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO NOTHING",
            )
            .bind(name.to_owned())
            .bind(fresh)
            .bind(holdfast_core::now_ms()),
        )
        .await?;
        let (secret,): (String,) = self
            .read_row("shared_secret", || {
                sqlx::query("SELECT secret FROM holdfast_secrets WHERE name = $1").bind(name)
            })
            .await?
            .ok_or_else(|| Error::Db(sqlx::Error::RowNotFound))?;
        hex::decode(secret).map_err(|e| Error::Db(sqlx::Error::Decode(Box::new(e))))
    }

    /// The retry state of one operation: call [`Retries::after`] with each failure.
    fn retries(&self, rerun: Rerun, op: &'static str) -> Retries<'_> {
        self.budget.record_attempt();
        // The op's series exist at 0 from its first attempt, so the first retries after a
        // scrape count as an increase rather than as where the series began.
        metrics::counter!("holdfast_store_retries_total", "op" => op).increment(0);
        metrics::counter!("holdfast_store_retry_budget_exhausted_total", "op" => op).increment(0);
        Retries {
            store: self,
            rerun,
            op,
            started: Instant::now(),
            attempts: 0,
        }
    }

    /// The rows of one read statement (built afresh for each attempt) as `T`s; retried after
    /// transient failures. `T` is a row type or a tuple of columns.
    async fn read_rows<'q, T: RowType>(
        &self,
        op: &'static str,
        query: impl Fn() -> AnyQuery<'q>,
    ) -> Result<Vec<T>> {
        self.run(Rerun::Always, op, || async {
            let rows = query().fetch_all_pooled(self).await?;
            Ok(rows.iter().map(T::from_row).collect::<Result<_, _>>()?)
        })
        .await
    }

    /// The row of one read statement that names at most one (by key), if any.
    async fn read_row<'q, T: RowType>(
        &self,
        op: &'static str,
        query: impl Fn() -> AnyQuery<'q>,
    ) -> Result<Option<T>> {
        Ok(self.read_rows(op, query).await?.into_iter().next())
    }

    /// One attempt of a store-internal operation, then retries while [`Retries::after`]
    /// allows.
    async fn run<T, F, Fut>(&self, rerun: Rerun, op: &'static str, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut retries = self.retries(rerun, op);
        loop {
            match attempt().await {
                Ok(v) => return Ok(v),
                Err(e) => retries.after(e).await?,
            }
        }
    }
}

/// Counts the attempts of one operation and decides whether another may start.
struct Retries<'s> {
    store: &'s Store,
    rerun: Rerun,
    op: &'static str,
    started: Instant,
    attempts: u32,
}

impl Retries<'_> {
    /// After a failed attempt: waits and returns `Ok` when another attempt may start — the
    /// failure is transient (and, for [`Rerun::IfUncommitted`], certainly uncommitted), the
    /// policy allows one more before the deadline, and the process-wide budget has a token;
    /// otherwise gives the failure back.
    async fn after(&mut self, err: Error) -> Result<()> {
        self.after_attempt(err, false).await
    }

    /// As [`Retries::after`], for a failure known to have committed nothing (a transaction
    /// that failed before its `COMMIT` was sent): a transient one may be retried even under
    /// [`Rerun::IfUncommitted`].
    async fn after_uncommitted(&mut self, err: Error) -> Result<()> {
        self.after_attempt(err, true).await
    }

    /// [`Retries::after`] or, when `known_uncommitted`, [`Retries::after_uncommitted`].
    async fn after_attempt(&mut self, err: Error, known_uncommitted: bool) -> Result<()> {
        self.attempts += 1;
        let (store, op) = (self.store, self.op);
        if err.moves_primary(false) {
            store.lost.saw_one();
        }
        // Whether or not this operation may run again, the next must find the primary.
        // In a task of its own: a caller whose deadline passes mid-search must not take the
        // search down with it, or under a failover every search could be cut short and the
        // pool never move.
        if store.backend == Backend::Postgres && err.moves_primary(store.primary.several_hosts()) {
            let primary = store.primary.clone();
            let (seen, read_only) = (primary.generation(), err.read_only());
            let _ = tokio::spawn(async move { primary.search(seen, read_only).await }).await;
        }
        let retryable = !store.primary.is_closed()
            && match self.rerun {
                Rerun::Always => err.is_retryable(),
                Rerun::IfUncommitted if known_uncommitted => err.is_retryable(),
                Rerun::IfUncommitted => err.is_retryable_uncommitted(),
            };
        let Some(delay) = retryable
            .then(|| store.retry.next_delay(self.attempts, self.started))
            .flatten()
        else {
            return Err(err);
        };
        if !store.budget.try_withdraw() {
            metrics::counter!("holdfast_store_retry_budget_exhausted_total", "op" => op)
                .increment(1);
            return Err(err);
        }
        metrics::counter!("holdfast_store_retries_total", "op" => op).increment(1);
        tracing::debug!(op, attempts = self.attempts, ?delay, error = %err, "retrying store operation");
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

/// `Ok` if a write changed exactly one row, else `err` (a fence that no longer matches).
fn one_row(done: &sqlx::any::AnyQueryResult, err: Error) -> Result<()> {
    if done.rows_affected() == 1 {
        Ok(())
    } else {
        Err(err)
    }
}

/// A registered user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct User {
    pub id: String,
    pub email: String,
    pub created_at: i64,
}

/// A user with the hash to check a login against.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Credentials {
    #[sqlx(flatten)]
    pub user: User,
    pub password_hash: String,
}

/// A live session: who it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub user_id: String,
    pub created_at: i64,
    pub expires_at: i64,
    /// Last recorded use (refreshed at most once per `touch_every`).
    pub last_seen_at: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    async fn store(retry: RetryPolicy) -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = StoreOptions::new(testing::sqlite_url(dir.path()));
        opts.retry = retry;
        (Store::open(&opts).await.unwrap(), dir)
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn sqlite_files_are_readable_by_their_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let (store, dir) = store(quick()).await;
        store.ping().await.unwrap();
        let mut seen = 0;
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let entry = entry.unwrap();
            let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{:?}", entry.file_name());
            seen += 1;
        }
        assert!(seen >= 2, "the database and its WAL");
    }

    fn quick() -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_millis(1),
            cap: Duration::from_millis(2),
            max_attempts: 5,
            deadline: Duration::from_secs(5),
        }
    }

    /// Fails with `err()` for the first `failures` attempts, then succeeds; counts attempts.
    async fn flaky(
        s: &Store,
        rerun: Rerun,
        failures: u32,
        err: fn() -> Error,
    ) -> (Result<()>, u32) {
        let calls = AtomicU32::new(0);
        let r = s
            .run(rerun, "test", || async {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                if n < failures {
                    Err(err())
                } else {
                    Ok(())
                }
            })
            .await;
        (r, calls.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn transient_failures_are_retried_until_success_or_the_attempt_limit() {
        let (s, _d) = store(quick()).await;
        let timeout = || Error::Db(sqlx::Error::PoolTimedOut);
        let (r, calls) = flaky(&s, Rerun::IfUncommitted, 3, timeout).await;
        assert!(r.is_ok() && calls == 4);
        let (r, calls) = flaky(&s, Rerun::Always, 100, timeout).await;
        assert!(
            r.unwrap_err().is_retryable() && calls == 5,
            "gave up after max_attempts"
        );
    }

    #[tokio::test]
    async fn maybe_committed_failures_retry_only_idempotent_operations() {
        let (s, _d) = store(quick()).await;
        let io = || {
            Error::Db(sqlx::Error::Io(std::io::Error::from(
                std::io::ErrorKind::ConnectionReset,
            )))
        };
        assert_eq!(
            flaky(&s, Rerun::IfUncommitted, 1, io).await.1,
            1,
            "a plain write is not re-run after a lost connection"
        );
        assert_eq!(flaky(&s, Rerun::Always, 1, io).await.1, 2);
        assert_eq!(
            flaky(&s, Rerun::Always, 1, || Error::NotFound).await.1,
            1,
            "domain errors never retry"
        );
    }

    #[tokio::test]
    async fn the_deadline_and_the_budget_stop_retries() {
        let (s, _d) = store(RetryPolicy {
            deadline: Duration::ZERO,
            ..quick()
        })
        .await;
        assert_eq!(
            flaky(&s, Rerun::IfUncommitted, 10, || Error::Db(
                sqlx::Error::PoolTimedOut
            ))
            .await
            .1,
            1
        );
        let (mut s, _d) = store(quick()).await;
        s.budget = RetryBudget::new(0.0, 2);
        assert_eq!(
            flaky(&s, Rerun::IfUncommitted, 10, || Error::Db(
                sqlx::Error::PoolTimedOut
            ))
            .await
            .1,
            3,
            "two budgeted retries, then stop"
        );
    }
}
