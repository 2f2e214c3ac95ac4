//! Transactions that callers compose: [`Store::transaction`] hands a closure a [`Tx`], the
//! closure runs its own SQL on [`Tx::conn`] and the store's generic primitives as methods on
//! the same `Tx`, and everything commits together or not at all.
//!
//! The shape is Garage's: the closure's own failure ([`TxError::Abort`]) is kept apart from a
//! backend failure ([`TxError::Db`]); only the latter is ever retried. The closure may run more
//! than once, so it must not have effects outside the transaction.

use crate::group::Group;
use crate::pool::OpenTx;
use crate::{Backend, Error, Pooled, Result, Store};
use scoped_futures::ScopedBoxFuture;
use sqlx::{Any, AnyConnection};
use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;

/// Re-exported so callers can box their closure's future (`async { … }.scope_boxed()`).
pub use scoped_futures::ScopedFutureExt;

/// Whether a transaction's body may run again after a transient failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rerun {
    /// After any transient failure, even one where the commit may have happened: the body is
    /// a read, or its writes are fenced (an idempotency token, a job's claim) so that a second
    /// run after a lost acknowledgement changes nothing.
    Always,
    /// Only after failures that guarantee nothing was committed (a busy SQLite file, a
    /// Postgres serialization failure, no connection at all, or in a transaction any
    /// transient failure before its `COMMIT` was sent): a plain write.
    IfUncommitted,
}

/// How a transaction failed: the caller's body gave up, or the database did.
#[derive(Debug)]
pub enum TxError<E> {
    /// The body returned its own error; the transaction was rolled back.
    Abort(E),
    /// The store failed (and retrying, where allowed, did not help).
    Db(Error),
}

impl<E> TxError<E> {
    /// Maps the caller's error, keeping a database failure as it is.
    pub fn map_abort<F>(self, f: impl FnOnce(E) -> F) -> TxError<F> {
        match self {
            TxError::Abort(e) => TxError::Abort(f(e)),
            TxError::Db(e) => TxError::Db(e),
        }
    }
}

impl TxError<std::convert::Infallible> {
    /// The database error of a body that never aborts.
    pub fn into_db(self) -> Error {
        match self {
            TxError::Db(e) => e,
            TxError::Abort(never) => match never {},
        }
    }
}

impl<E> From<Error> for TxError<E> {
    fn from(e: Error) -> Self {
        TxError::Db(e)
    }
}

impl<E> From<sqlx::Error> for TxError<E> {
    fn from(e: sqlx::Error) -> Self {
        TxError::Db(Error::Db(e))
    }
}

impl<E: fmt::Display> fmt::Display for TxError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TxError::Abort(e) => e.fmt(f),
            TxError::Db(e) => e.fmt(f),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for TxError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TxError::Abort(e) => Some(e),
            TxError::Db(e) => Some(e),
        }
    }
}

/// An open write transaction. On SQLite it also holds the process's write gate, so that one
/// waiter per process (not one per pooled connection) contends for the file's write lock.
pub struct Tx {
    tx: OpenTx,
    backend: Backend,
    // Dropped after `tx` (fields drop in order): the file's lock, then the process's turn —
    // the next transaction of this process locks the same open file, so it must not get its
    // turn while this one still holds the lock.
    _lock: Option<WriteLock>,
    _gate: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Waits for the write lock, in seconds: the process's gate, then the file's `flock`.
pub(crate) const WRITE_LOCK_WAIT: &str = "holdfast_store_write_lock_wait_seconds";
/// Holds of the write lock, in seconds, from taking the `flock` to letting it go.
pub(crate) const WRITE_LOCK_HELD: &str = "holdfast_store_write_lock_held_seconds";

/// The database's write lock, taken: let go when dropped, and how long it was held recorded
/// then, whatever ended the transaction (a commit, a rollback, a caller gone). The processes'
/// holds add up to at most one second a second; near that, every write waits in line.
struct WriteLock {
    taken: std::time::Instant,
    _flock: nix::fcntl::Flock<std::fs::File>,
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        metrics::histogram!(WRITE_LOCK_HELD).record(self.taken.elapsed().as_secs_f64());
    }
}

/// Opens (creating it, owner-only) `<database>.write-lock`, the file whose `flock` orders
/// the processes writing one SQLite database.
pub(crate) fn open_write_lock(db: &str) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(format!("{db}.write-lock"))
}

impl Tx {
    /// The connection, for the caller's own statements.
    pub fn conn(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }

    /// The engine, for the few statements that differ (`FOR UPDATE` has no SQLite spelling:
    /// its write transaction already excludes other writers).
    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub(crate) async fn commit(self) -> Result<()> {
        Ok(self.tx.commit().await?)
    }
}

/// A transaction's body: borrows the `Tx` for one run and returns a boxed future.
pub type TxBody<'a, 't, T, E> = ScopedBoxFuture<'a, 't, std::result::Result<T, TxError<E>>>;

impl Store {
    /// Runs `body` in one write transaction and commits it; retries the whole transaction after
    /// a transient failure as `rerun` allows (full jitter, the policy's deadline, the process's
    /// retry budget). `op` names it in metrics and logs.
    ///
    /// ```no_run
    /// # use std::convert::Infallible;
    /// use holdfast_store::{JobInsert, Rerun, ScopedFutureExt, Store, TxError};
    ///
    /// # async fn demo(store: Store, text: &str) -> Result<(), TxError<Infallible>> {
    /// // A note and the job that mails it: both commit, or neither does.
    /// let id: i64 = store
    ///     .transaction("note_create", Rerun::IfUncommitted, |tx| {
    ///         async {
    ///             let id = sqlx::query_scalar("INSERT INTO notes (text) VALUES ($1) RETURNING id")
    ///                 .bind(text)
    ///                 .fetch_one(tx.conn())
    ///                 .await?;
    ///             let args = format!("{{\"note\":{id}}}");
    ///             tx.job_enqueue(&[JobInsert::new("mail", "notify", args)]).await?;
    ///             Ok(id)
    ///         }
    ///         .scope_boxed()
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn transaction<'a, T, E, F>(
        &self,
        op: &'static str,
        rerun: Rerun,
        mut body: F,
    ) -> std::result::Result<T, TxError<E>>
    where
        F: for<'t> FnMut(&'t mut Tx) -> TxBody<'a, 't, T, E> + Send + 'a,
        T: Send + 'a,
        E: Send + 'a,
    {
        let mut retries = self.retries(rerun, op);
        loop {
            if let Some(group) = &self.group {
                match self.grouped(group, &mut body).await {
                    Ok(Ok(value)) => return Ok(value),
                    // The body's own failure: its savepoint was undone, so it committed
                    // nothing, whatever the shared commit did.
                    Ok(Err(TxError::Db(e))) => retries.after_uncommitted(e).await?,
                    Ok(Err(abort)) => return Err(abort),
                    Err(e) => retries.after(e).await?,
                }
                continue;
            }
            // A failure before `COMMIT` was sent left nothing committed (the server rolls an
            // unfinished transaction back), so even a body that must not run twice may run
            // again; only a failure at `COMMIT` itself leaves the outcome unknown.
            let (err, uncommitted) = match self.begin_write().await {
                Ok(mut tx) => match body(&mut tx).await {
                    Ok(value) => match tx.commit().await {
                        Ok(()) => return Ok(value),
                        Err(e) => (e, false),
                    },
                    Err(TxError::Db(e)) => (e, true),
                    Err(abort) => return Err(abort),
                },
                Err(e) => (e, true),
            };
            retries.after_attempt(err, uncommitted).await?;
        }
    }

    /// One run of `body` as a member of this process's group commit (SQLite; see
    /// `group.rs`): in a savepoint of the shared transaction, then answered once that
    /// transaction commits. The outer error is the group's (joining, the savepoint, the
    /// commit); the inner result is the body's, given only after the commit.
    async fn grouped<'a, T, E, F>(
        &self,
        group: &Arc<Group>,
        body: F,
    ) -> Result<std::result::Result<T, TxError<E>>>
    where
        F: for<'t> FnOnce(&'t mut Tx) -> TxBody<'a, 't, T, E>,
        T: Send + 'a,
        E: Send + 'a,
    {
        let mut batch = group.join(self).await?;
        // A savepoint not taken abandons the batch: this member, whose body has not run, and
        // the others run again.
        batch.begin_member().await?;
        let ran = body(batch.tx()).await;
        // Should even this fail, the transaction is in a state nobody may commit: `?` drops
        // the batch, which tries once more and otherwise rolls it back for every member.
        batch.end_member(ran.is_err()).await?;
        // A body that gave up waits for the commit too: what it saw (a key already used, an
        // empty cart) may be another member's uncommitted write, and no answer may rest on a
        // write that could still be rolled back.
        let committed = batch.enlist();
        batch.pass_on(group);
        committed.wait().await?;
        Ok(ran)
    }

    /// Runs `body` on a pooled connection outside any write transaction (reads), retried
    /// after transient failures.
    pub async fn read<'a, T, E, F>(
        &self,
        op: &'static str,
        mut body: F,
    ) -> std::result::Result<T, TxError<E>>
    where
        F: for<'t> FnMut(&'t mut AnyConnection) -> TxBody<'a, 't, T, E> + Send + 'a,
        T: Send + 'a,
        E: Send + 'a,
    {
        let mut retries = self.retries(Rerun::Always, op);
        loop {
            match self.lend().await {
                Ok(mut conn) => match body(&mut conn).await {
                    Err(TxError::Db(e)) => retries.after(e).await?,
                    // Only a body that finished hands its connection back as it is: one that
                    // gave up may have left it mid-answer or broken.
                    Ok(done) => {
                        conn.give_back();
                        return Ok(done);
                    }
                    aborted => return aborted,
                },
                Err(e) => retries.after(Error::Db(e)).await?,
            }
        }
    }

    /// A write transaction. On SQLite it first passes this process's write gate, then takes
    /// the database's write-lock file (`flock`, exclusive): the file has one write lock, and
    /// SQLite's own wait for it is a busy handler that sleeps 1, 2, 5 … 100 ms between tries,
    /// so processes contending through it queue in sleeps, not in order. A `flock` waiter is
    /// woken by the kernel the moment the holder lets go, and a killed holder's lock goes
    /// with it. (Other programs writing the file still meet SQLite's busy timeout.)
    pub(crate) async fn begin_write(&self) -> Result<Tx> {
        let waiting = std::time::Instant::now();
        let gate = match &self.write_gate {
            Some(g) => Some(
                g.clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| Error::Db(sqlx::Error::PoolClosed))?,
            ),
            None => None,
        };
        let lock = match &self.write_lock {
            Some(file) => {
                // The gate admits one transaction per process, so the process's one open file
                // description (shared by the clone) is locked by one holder at a time.
                let file = file.try_clone().map_err(sqlx::Error::Io)?;
                let locked = tokio::task::spawn_blocking(move || {
                    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
                        .map_err(|(_, errno)| std::io::Error::from(errno))
                })
                .await
                .map_err(|_| Error::Db(sqlx::Error::WorkerCrashed))?
                .map_err(sqlx::Error::Io)?;
                metrics::histogram!(WRITE_LOCK_WAIT).record(waiting.elapsed().as_secs_f64());
                Some(WriteLock {
                    taken: std::time::Instant::now(),
                    _flock: locked,
                })
            }
            None => None,
        };
        // Begun in its own task: the driver counts a transaction as open only once BEGIN is
        // acknowledged, and a caller dropped in between (a request deadline, a cancelled job)
        // would leave a pooled connection holding the database's write lock with nobody to
        // roll it back. A task is not cancelled with its caller; its `OpenTx`, if the caller
        // is gone, is dropped and rolled back.
        let begin = match self.backend {
            // SQLite must take the write lock up front: a deferred transaction that reads and
            // then writes can fail with SQLITE_BUSY at the upgrade, after its reads, with no
            // busy wait.
            Backend::Sqlite => "BEGIN IMMEDIATE",
            Backend::Postgres => "BEGIN",
        };
        let pool = self.pool();
        let tx = tokio::spawn(async move { OpenTx::begin(pool.lend().await?, begin).await })
            .await
            .map_err(|_| Error::Db(sqlx::Error::WorkerCrashed))??;
        Ok(Tx {
            tx,
            backend: self.backend,
            _lock: lock,
            _gate: gate,
        })
    }

    /// One write statement as its own transaction. On Postgres a lone statement is atomic by
    /// itself, so it runs in autocommit: one round trip instead of three (BEGIN, statement,
    /// COMMIT). On SQLite it joins this process's group commit like every other write (a
    /// job worker's completions and heartbeats share the commits of its claims and
    /// settlements instead of taking turns of their own at the write lock). It runs once:
    /// its caller decides what may be retried.
    pub(crate) async fn write_one<'q>(
        &self,
        q: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
    ) -> Result<u64> {
        match self.backend {
            Backend::Postgres => Ok(q.execute_pooled(self).await?.rows_affected()),
            Backend::Sqlite => {
                self.sqlite_write_once(q, |q, conn| {
                    async move { Ok(q.execute(conn).await?.rows_affected()) }.scope_boxed()
                })
                .await
            }
        }
    }

    /// [`Self::write_one`] for a statement that returns rows.
    pub(crate) async fn write_one_rows<'q>(
        &self,
        q: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
    ) -> Result<Vec<sqlx::any::AnyRow>> {
        match self.backend {
            Backend::Postgres => Ok(q.fetch_all_pooled(self).await?),
            Backend::Sqlite => {
                self.sqlite_write_once(q, |q, conn| {
                    async move { Ok(q.fetch_all(conn).await?) }.scope_boxed()
                })
                .await
            }
        }
    }

    /// Runs `q` by `run` once in a write transaction of SQLite: as a member of the group
    /// commit, or (a store without one) in a transaction of its own.
    async fn sqlite_write_once<'q, T: Send + 'q>(
        &self,
        q: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
        run: for<'t> fn(
            sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
            &'t mut AnyConnection,
        ) -> TxBody<'q, 't, T, Infallible>,
    ) -> Result<T> {
        let Some(group) = &self.group else {
            let mut tx = self.begin_write().await?;
            let done = run(q, tx.conn()).await.map_err(TxError::into_db)?;
            tx.commit().await?;
            return Ok(done);
        };
        // Once: should the group be abandoned, before or after the statement ran, the caller
        // hears so (a transient failure that committed nothing) and decides.
        self.grouped(group, |tx: &mut Tx| run(q, tx.conn()))
            .await?
            .map_err(TxError::into_db)
    }
}
