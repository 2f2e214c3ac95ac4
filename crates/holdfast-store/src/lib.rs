//! The durable store: where every record a user must never lose lives.
//!
//! Callers see one concrete [`Store`]; whether it runs on SQLite (the embedded default: one
//! file in WAL mode, shared by every local process) or PostgreSQL is a matter of the URL.
//! Both run the same SQL through sqlx's `Any` driver; the few places where the engines differ
//! (how a write transaction starts, row locks, the migration lock, DDL types) are spelled out
//! by [`Dialect`]. One conformance suite (`tests/conformance.rs`) runs against both.
//!
//! Each operation is one transaction, retried with full-jitter backoff, a budget and a
//! deadline when the failure is transient. Writes that are not protected by an idempotency
//! token retry only on failures that guarantee nothing was committed.
//!
//! The job queue and the effect ledger live here too (`jobs.rs`): a job enqueued by a
//! checkout must commit in the checkout's transaction, so the queue shares the store.
//!
//! Architecture invariant: this crate knows nothing about HTTP. It stores the bytes of an
//! idempotent response but never looks inside them.

mod jobs;
mod migrate;
mod ops;
pub mod testing;

use holdfast_core::retry::{RetryBudget, RetryPolicy};
use serde::Serialize;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor};
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use jobs::{
    DeadJob, EffectSettle, JobFence, JobInsert, JobRow, LedgerEntry, PayoutInfo, QueueCount,
    NOTIFY_CHANNEL,
};
pub use ops::{
    ClaimOutcome, IdemClaim, IdemCommit, SessionCreate, StoredResponse, PAYMENTS_QUEUE, PAYOUT_KIND,
};

/// What went wrong, in words the caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no such record")]
    NotFound,
    #[error("this email is already registered")]
    EmailTaken,
    #[error("unknown sku {0}")]
    UnknownSku(String),
    #[error("a cart line holds at most 99 of one item")]
    QuantityLimit,
    #[error("the cart is empty")]
    EmptyCart,
    /// The idempotency key was claimed by another attempt after this one's lock expired
    /// (or this attempt's earlier try already committed). The caller should re-read the key.
    #[error("the idempotency key is no longer held by this request")]
    IdempotencyLockLost,
    /// A job attempt is no longer current: its lease expired and a newer attempt took over.
    /// Whatever this attempt did externally was idempotent; the newer one settles it.
    #[error("this job attempt is no longer current")]
    JobLost,
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration {version} failed: {source}")]
    Migration { version: i64, source: sqlx::Error },
    #[error("unsupported database url (want sqlite:… or postgres://…)")]
    UnsupportedUrl,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A transient failure: the same operation may succeed if tried again.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Db(e) => transient(e, false),
            _ => false,
        }
    }

    /// Transient *and* certain that nothing was committed, so even a non-idempotent write may
    /// be re-run: a busy SQLite file, a Postgres serialization failure or deadlock (the
    /// transaction was rolled back), or no connection obtained at all.
    pub fn is_retryable_uncommitted(&self) -> bool {
        match self {
            Error::Db(e) => transient(e, true),
            _ => false,
        }
    }

    /// The store is unreachable or overloaded (as opposed to a caller's mistake).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Db(_) | Error::Migration { .. })
    }
}

fn transient(e: &sqlx::Error, must_be_uncommitted: bool) -> bool {
    match e {
        sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => {
            !must_be_uncommitted
        }
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // SQLite reports (extended) numeric result codes; the low byte is the primary
            // code: 5 SQLITE_BUSY, 6 SQLITE_LOCKED. Ask the driver, not the code's shape: many
            // Postgres SQLSTATEs are all digits too (40001, 08006, 42501).
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                return code.parse::<i32>().is_ok_and(|n| matches!(n & 0xff, 5 | 6));
            }
            // Postgres SQLSTATE: serialization failure, deadlock (rolled back, safe either
            // way); admin shutdown, cannot connect now, connection exceptions (maybe
            // committed if it happened at COMMIT).
            match code.as_ref() {
                "40001" | "40P01" => true,
                "57P01" | "57P02" | "57P03" => !must_be_uncommitted,
                c if c.starts_with("08") => !must_be_uncommitted,
                _ => false,
            }
        }
        _ => false,
    }
}

/// Where the engines differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Sqlite => "sqlite",
            Dialect::Postgres => "postgres",
        }
    }
    /// SQLite must take the write lock up front: a deferred transaction that reads and then
    /// writes can fail with SQLITE_BUSY at the upgrade, after its reads, with no busy wait.
    fn begin_write(self) -> &'static str {
        match self {
            Dialect::Sqlite => "BEGIN IMMEDIATE",
            Dialect::Postgres => "BEGIN",
        }
    }
    /// Row locks for read-then-write; SQLite's write transaction already excludes writers.
    fn for_update(self) -> &'static str {
        match self {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE",
        }
    }
}

#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// `sqlite:PATH` (created if missing) or `postgres://…`.
    pub url: String,
    pub max_connections: u32,
    pub retry: RetryPolicy,
    /// How long an acquired connection may be waited for before the attempt fails.
    pub acquire_timeout: Duration,
}

impl StoreOptions {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            max_connections: 8,
            retry: RetryPolicy::default(),
            acquire_timeout: Duration::from_secs(3),
        }
    }
}

/// The durable store. Cheap to clone: clones share one pool.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
    retry: RetryPolicy,
    budget: RetryBudget,
    /// SQLite only: one write transaction at a time per process (see `begin_write`).
    write_gate: Option<Arc<tokio::sync::Semaphore>>,
}

/// How an operation may be retried.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Safety {
    /// Reads, and writes guarded by an idempotency token: any transient failure may retry.
    Idempotent,
    /// Plain writes: only failures that guarantee nothing committed may retry.
    Write,
}

impl Store {
    /// Connects, then brings the schema up to date under a lock (so instances that start
    /// together do not race each other's migrations).
    pub async fn open(opts: &StoreOptions) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let dialect = if opts.url.starts_with("sqlite:") {
            Dialect::Sqlite
        } else if opts.url.starts_with("postgres://") || opts.url.starts_with("postgresql://") {
            Dialect::Postgres
        } else {
            return Err(Error::UnsupportedUrl);
        };
        let url = match dialect {
            Dialect::Sqlite if !opts.url.contains('?') => format!("{}?mode=rwc", opts.url),
            _ => opts.url.clone(),
        };
        let connect = AnyConnectOptions::from_str(&url)?;
        let pool = AnyPoolOptions::new()
            .max_connections(opts.max_connections)
            .acquire_timeout(opts.acquire_timeout)
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if dialect == Dialect::Sqlite {
                        // WAL: readers never block the writer, and several processes share
                        // the file safely. synchronous=FULL: an acknowledged order survives
                        // a power cut, not only a killed process. busy_timeout: wait for
                        // another process's write lock instead of failing at once.
                        conn.execute(
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                             PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;",
                        )
                        .await?;
                    }
                    Ok(())
                })
            })
            .connect_with(connect)
            .await?;
        let write_gate =
            (dialect == Dialect::Sqlite).then(|| Arc::new(tokio::sync::Semaphore::new(1)));
        let store = Self {
            pool,
            dialect,
            retry: opts.retry.clone(),
            budget: RetryBudget::default(),
            write_gate,
        };
        store
            .run(Safety::Idempotent, "migrate", || migrate::run(&store))
            .await?;
        Ok(store)
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Connections in use and idle, for the pool gauges.
    pub fn pool_stats(&self) -> (u32, usize) {
        (self.pool.size(), self.pool.num_idle())
    }

    /// One round trip, no retries: for readiness checks.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// One attempt, then retries while the failure is transient, the policy allows another
    /// attempt before the deadline, and the process-wide budget has a token.
    async fn run<T, F, Fut>(&self, safety: Safety, op: &'static str, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let started = Instant::now();
        self.budget.record_attempt();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let err = match attempt().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let retryable = match safety {
                Safety::Idempotent => err.is_retryable(),
                Safety::Write => err.is_retryable_uncommitted(),
            };
            if !retryable {
                return Err(err);
            }
            let Some(delay) = self.retry.next_delay(attempts, started) else {
                return Err(err);
            };
            if !self.budget.try_withdraw() {
                metrics::counter!("holdfast_store_retry_budget_exhausted_total", "op" => op)
                    .increment(1);
                return Err(err);
            }
            metrics::counter!("holdfast_store_retries_total", "op" => op).increment(1);
            tracing::debug!(op, attempts, ?delay, error = %err, "retrying store operation");
            tokio::time::sleep(delay).await;
        }
    }
}

/// A registered user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    pub id: String,
    pub email: String,
    pub created_at: i64,
}

/// A user with the hash to check a login against.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub user: User,
    pub password_hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProductRow {
    pub sku: String,
    pub name: String,
    pub price_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CartLine {
    pub sku: String,
    pub name: String,
    pub qty: i64,
    pub unit_price_cents: i64,
    pub line_total_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cart {
    pub items: Vec<CartLine>,
    pub total_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OrderLine {
    pub sku: String,
    pub name: String,
    pub qty: i64,
    pub unit_price_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Order {
    pub order_id: String,
    pub total_cents: i64,
    pub status: String,
    pub created_at: i64,
    pub items: Vec<OrderLine>,
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
        safety: Safety,
        failures: u32,
        err: fn() -> Error,
    ) -> (Result<()>, u32) {
        let calls = AtomicU32::new(0);
        let r = s
            .run(safety, "test", || async {
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
        let (r, calls) = flaky(&s, Safety::Write, 3, timeout).await;
        assert!(r.is_ok() && calls == 4);
        let (r, calls) = flaky(&s, Safety::Idempotent, 100, timeout).await;
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
            flaky(&s, Safety::Write, 1, io).await.1,
            1,
            "a plain write is not re-run after a lost connection"
        );
        assert_eq!(flaky(&s, Safety::Idempotent, 1, io).await.1, 2);
        assert_eq!(
            flaky(&s, Safety::Idempotent, 1, || Error::EmptyCart)
                .await
                .1,
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
            flaky(&s, Safety::Write, 10, || Error::Db(
                sqlx::Error::PoolTimedOut
            ))
            .await
            .1,
            1
        );
        let (mut s, _d) = store(quick()).await;
        s.budget = RetryBudget::new(0.0, 2);
        assert_eq!(
            flaky(&s, Safety::Write, 10, || Error::Db(
                sqlx::Error::PoolTimedOut
            ))
            .await
            .1,
            3,
            "two budgeted retries, then stop"
        );
    }
}
