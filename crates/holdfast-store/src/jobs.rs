//! The job queue's and the effect ledger's SQL. The worker runtime that drives it (leases,
//! heartbeats, wake-ups, drain) lives in `holdfast-jobs`; the state machine is drawn there.
//!
//! Every change to a claimed job is fenced by its claim: each claim increments the job's
//! `claim` counter (which never goes back, not at a redrive nor at a drain's release), and a
//! completion, failure or heartbeat names the claim it belongs to. A worker that stalled past
//! its lease and comes back late matches no row and changes nothing. `attempt` is separate: it
//! counts towards `max_attempts`, starts again at a redrive and is given back at a release.

use crate::accounts::ms;
use crate::{Backend, Error, Pooled, Rerun, Result, Store, Tx, TxError};
use scoped_futures::ScopedFutureExt;
use serde::Serialize;
use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::{Any, AnyConnection, FromRow, Row};
use std::convert::Infallible;
use std::time::Duration;

/// The Postgres channel that wakes the workers of a queue (the payload names the queue).
pub const NOTIFY_CHANNEL: &str = "holdfast_jobs";

/// A job to enqueue.
#[derive(Debug, Clone)]
pub struct JobInsert {
    pub queue: String,
    pub kind: String,
    /// JSON arguments.
    pub args: String,
    /// Lower runs first; 0 to 9.
    pub priority: i64,
    /// At most one job with this key exists until it is pruned.
    pub unique_key: Option<String>,
    /// Not before this time (ms since the epoch).
    pub run_at: i64,
    pub max_attempts: i64,
    /// The one external effect the job causes, begun in the effect ledger by the claim that
    /// hands the job out (see [`JobInsert::effect`]).
    pub effect: Option<JobEffect>,
}

/// An effect a job names when it is enqueued: its ledger entry and the dependency's
/// idempotency key for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEffect {
    pub effect_key: String,
    pub external_key: String,
}

impl JobInsert {
    pub fn new(queue: &str, kind: &str, args: String) -> Self {
        Self {
            queue: queue.to_owned(),
            kind: kind.to_owned(),
            args,
            priority: 5,
            unique_key: None,
            run_at: holdfast_core::now_ms(),
            max_attempts: 25,
            effect: None,
        }
    }
    pub fn unique(mut self, key: impl Into<String>) -> Self {
        self.unique_key = Some(key.into());
        self
    }
    /// The job causes the effect `effect_key` with the idempotency key `external_key`: each
    /// claim of it also begins that entry in the effect ledger (as [`Store::ledger_begin`]
    /// does), in the claim's own statement, and hands it over in [`JobRow::effect`].
    pub fn effect(
        mut self,
        effect_key: impl Into<String>,
        external_key: impl Into<String>,
    ) -> Self {
        self.effect = Some(JobEffect {
            effect_key: effect_key.into(),
            external_key: external_key.into(),
        });
        self
    }
}

/// A claimed job. `(id, claim)` is its fence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, FromRow)]
pub struct JobRow {
    pub id: i64,
    pub queue: String,
    pub kind: String,
    pub args: String,
    /// Attempts so far, this one included (counts towards `max_attempts`).
    pub attempt: i64,
    pub max_attempts: i64,
    /// Claims so far, this one included: unique to this attempt, forever.
    pub claim: i64,
    pub created_at: i64,
    pub run_at: i64,
    /// The ledger entry of the job's effect as the claim that handed the job out found or
    /// began it; `None` when the job names no effect ([`JobInsert::effect`]).
    #[sqlx(skip)]
    #[serde(skip)]
    pub effect: Option<BegunEffect>,
}

/// An effect ledger entry as a claim began it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BegunEffect {
    pub entry: LedgerEntry,
    /// This claim created the entry. When false an earlier attempt began it, and may have
    /// called the dependency with an outcome nobody learned.
    pub fresh: bool,
}

impl JobRow {
    pub fn fence(&self) -> JobFence {
        JobFence {
            id: self.id,
            claim: self.claim,
        }
    }
}

/// Names one claim of one job: no other claim of it, before or after, has the same fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct JobFence {
    pub id: i64,
    pub claim: i64,
}

/// A job in the dead-letter state, for inspection.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct DeadJob {
    #[serde(flatten)]
    #[sqlx(flatten)]
    pub job: JobRow,
    pub last_error: Option<String>,
    pub finished_at: Option<i64>,
}

/// How many jobs are in each state of each queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, FromRow)]
pub struct QueueCount {
    pub queue: String,
    pub state: String,
    #[sqlx(rename = "n")]
    pub count: i64,
}

/// One effect that must happen once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, FromRow)]
pub struct LedgerEntry {
    pub effect_key: String,
    /// `pending` (started, outcome maybe unknown) or `done`.
    pub state: String,
    /// The idempotency key the dependency was (or will be) called with.
    pub external_key: String,
    pub external_id: Option<String>,
}

/// Fences as one JSON parameter, `[[id, claim], …]`: the statement's text is the same for
/// any number of fences, so it is prepared once per connection and planned cheaply, and a
/// long list cannot outgrow the parser (Postgres refuses a row-value `IN` list of some
/// thousands with "stack depth limit exceeded", and heartbeats cover every running job).
fn fences_json(fences: &[JobFence]) -> String {
    let mut out = String::with_capacity(2 + fences.len() * 16);
    out.push('[');
    for (i, f) in fences.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!("[{},{}]", f.id, f.claim));
    }
    out.push(']');
    out
}

/// A condition matching the jobs whose current claim is one of the fences in JSON
/// parameter `$n`, found by primary key on both engines. (Postgres plans a bare
/// `(id, claim) IN (subquery)` as a hash join over every running job; the `id = ANY(…)`
/// gives it the index path. SQLite looks row-value `IN` subqueries up by key as it is.)
fn fence_match(backend: Backend, n: usize) -> String {
    match backend {
        Backend::Postgres => format!(
            "id = ANY(ARRAY(SELECT (f->>0)::bigint FROM json_array_elements(${n}::json) AS f)) \
             AND (id, claim) IN (SELECT (f->>0)::bigint, (f->>1)::bigint FROM json_array_elements(${n}::json) AS f)"
        ),
        Backend::Sqlite => format!(
            "(id, claim) IN (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(${n}))"
        ),
    }
}

/// What a fenced update does with a row that another statement holds (Postgres).
#[derive(Debug, Clone, Copy)]
enum HeldRows {
    /// Waits for it, and then updates it if it still matches.
    Wait,
    /// Passes over it.
    Skip,
}

/// The columns a [`JobRow`] is read from.
const JOB_COLUMNS: &str = "id, queue, kind, args, attempt, max_attempts, claim, created_at, run_at";

/// A claim's begin of an effect: the insert of a pending entry (its source follows), which
/// [`LEDGER_BEGIN_CONFLICT`] turns into a count of one more begin when the entry exists (an
/// earlier attempt's key wins), answering the entry as it stands either way.
const LEDGER_BEGIN_INSERT: &str =
    "INSERT INTO effect_ledger (effect_key, state, external_key, created_at, updated_at, begun)";
const LEDGER_BEGIN_CONFLICT: &str =
    "ON CONFLICT (effect_key) DO UPDATE SET begun = COALESCE(effect_ledger.begun, 1) + 1
     RETURNING effect_key, state, external_key, external_id, begun";

/// The entry a claim began, from a row with the ledger's `effect_key, state, external_key,
/// external_id, begun`; `None` when the row has no entry (its job names no effect).
fn begun_effect(r: &sqlx::any::AnyRow) -> Result<Option<BegunEffect>> {
    let state: Option<String> = r.try_get("state")?;
    let Some(state) = state else {
        return Ok(None);
    };
    let begun: i64 = r.try_get("begun")?;
    Ok(Some(BegunEffect {
        entry: LedgerEntry {
            effect_key: r.try_get("effect_key")?,
            state,
            external_key: r.try_get("external_key")?,
            external_id: r.try_get("external_id")?,
        },
        fresh: begun == 1,
    }))
}

/// Parameters a row of the INSERT binds.
const INSERT_PARAMS: usize = 10;
/// Rows per INSERT: 400 rows of 10 parameters stays far below SQLite's parameter limit.
const INSERT_CHUNK: usize = 400;

/// The columns of `jobs` an enqueue writes, in the order [`bind_jobs`] binds them (`state`,
/// always `available`, comes fourth and is not bound).
pub(crate) const INSERT_COLUMNS: &str = "queue, kind, args, state, priority, unique_key, run_at, max_attempts, created_at, effect_key, effect_external_key";

/// The INSERT of `rows` jobs, returning the ids of those inserted (a unique key that already
/// exists is skipped). On Postgres the same statement notifies the queue of each job it
/// inserted (delivered when the transaction commits; Postgres folds repeats of one payload
/// into one), so an enqueue outside a transaction is a single round trip.
fn insert_sql(backend: Backend, rows: usize) -> String {
    let values = (0..rows)
        .map(|i| {
            let p: Vec<String> = (1..=INSERT_PARAMS)
                .map(|k| format!("${}", i * INSERT_PARAMS + k))
                .collect();
            format!(
                "({}, {}, {}, 'available', {})",
                p[0],
                p[1],
                p[2],
                p[3..].join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let insert = format!(
        "INSERT INTO jobs ({INSERT_COLUMNS}) VALUES {values}
         ON CONFLICT (unique_key) DO NOTHING"
    );
    match backend {
        Backend::Sqlite => format!("{insert} RETURNING id"),
        // `pg_notify` returns void; as text it is an empty column nobody reads.
        Backend::Postgres => format!(
            "WITH ins AS ({insert} RETURNING id, queue)
             SELECT ins.id, pg_notify('{NOTIFY_CHANNEL}', ins.queue)::text AS notified FROM ins"
        ),
    }
}

fn bind_jobs<'q>(
    mut q: Query<'q, Any, AnyArguments<'q>>,
    jobs: &'q [JobInsert],
    now: i64,
) -> Query<'q, Any, AnyArguments<'q>> {
    for j in jobs {
        q = q
            .bind(&j.queue)
            .bind(&j.kind)
            .bind(&j.args)
            .bind(j.priority)
            .bind(&j.unique_key)
            .bind(j.run_at)
            .bind(j.max_attempts)
            .bind(now)
            .bind(j.effect.as_ref().map(|e| e.effect_key.as_str()))
            .bind(j.effect.as_ref().map(|e| e.external_key.as_str()));
    }
    q
}

/// Inserts `jobs` on `conn`; returns the ids of the ones inserted (a unique key that already
/// exists is skipped). On Postgres the insert also notifies the queue's workers, delivered
/// when the transaction commits.
async fn insert_jobs(
    conn: &mut AnyConnection,
    backend: Backend,
    jobs: &[JobInsert],
    now: i64,
) -> Result<Vec<i64>> {
    let mut ids = Vec::with_capacity(jobs.len());
    for chunk in jobs.chunks(INSERT_CHUNK) {
        let sql = insert_sql(backend, chunk.len());
        for r in bind_jobs(sqlx::query(&sql), chunk, now)
            .fetch_all(&mut *conn)
            .await?
        {
            ids.push(r.try_get("id")?);
        }
    }
    Ok(ids)
}

/// Commits `tx`, first waking the workers of every queue when `wake` (work became available
/// again). On Postgres a notification is delivered at commit; on SQLite the write itself wakes
/// them.
async fn commit_waking(mut tx: Tx, wake: bool) -> Result<()> {
    if wake && tx.backend() == Backend::Postgres {
        sqlx::query("SELECT pg_notify($1, '*')")
            .bind(NOTIFY_CHANNEL)
            .execute(tx.conn())
            .await?;
    }
    tx.commit().await
}

/// Completes the claim `$2` of job `$1` at `$3`, if it is still the job's current claim.
const COMPLETE_ONE: &str = "UPDATE jobs SET state = 'completed', finished_at = $3, lease_until = NULL WHERE id = $1 AND claim = $2 AND state = 'running'";

/// An effect's ledger entry marked done, whatever state an earlier attempt left it in.
const LEDGER_SETTLE_CONFLICT: &str = "ON CONFLICT (effect_key) DO UPDATE SET state = 'done', external_id = excluded.external_id, updated_at = excluded.updated_at";

/// The generic primitives, composed into the caller's transaction.
impl Tx {
    /// Enqueues `jobs` in this transaction: they exist if and only if it commits. Returns the
    /// ids of those inserted (a unique key that already exists is skipped).
    pub async fn job_enqueue(&mut self, jobs: &[JobInsert]) -> Result<Vec<i64>> {
        let backend = self.backend();
        insert_jobs(self.conn(), backend, jobs, holdfast_core::now_ms()).await
    }

    /// Completes the claim `fence`, or fails with [`Error::JobLost`] when it is no longer the
    /// job's current claim (its lease lapsed and another worker took over).
    pub async fn job_complete(&mut self, fence: JobFence) -> Result<()> {
        let completed = sqlx::query(COMPLETE_ONE)
            .bind(fence.id)
            .bind(fence.claim)
            .bind(holdfast_core::now_ms())
            .execute(self.conn())
            .await?;
        crate::one_row(&completed, Error::JobLost)
    }

    /// [`Tx::job_complete`] and [`Tx::ledger_settle`] together: the claim `fence` completed
    /// and `effect_key` done as `external_id`, or neither with [`Error::JobLost`]. On SQLite
    /// one call of the connection's thread (a script of both statements, the ledger's written
    /// only if the job's was) rather than two, each made while every other process waits
    /// for the write lock.
    pub async fn job_settle_effect(
        &mut self,
        fence: JobFence,
        effect_key: &str,
        external_id: &str,
    ) -> Result<()> {
        if self.backend() == Backend::Postgres {
            self.job_complete(fence).await?;
            return self.ledger_settle(effect_key, external_id).await;
        }
        let settled = sqlx::query(&format!(
            "{COMPLETE_ONE};
             INSERT INTO effect_ledger (effect_key, state, external_key, external_id, created_at, updated_at)
             SELECT $4, 'done', $4, $5, $3, $3 WHERE changes() = 1
             {LEDGER_SETTLE_CONFLICT}"
        ))
        .bind(fence.id)
        .bind(fence.claim)
        .bind(holdfast_core::now_ms())
        .bind(effect_key)
        .bind(external_id)
        .execute(self.conn())
        .await?;
        // The ledger's statement writes a row whenever it runs, so no rows at all means the
        // claim was not current and nothing was written.
        if settled.rows_affected() == 0 {
            return Err(Error::JobLost);
        }
        Ok(())
    }

    /// Records the intent to cause `effect_key` with the dependency's idempotency key
    /// `external_key` before calling it, and returns the entry as it stands (an earlier
    /// attempt's entry wins: its key is the one to reuse) and whether this call created it.
    pub async fn ledger_begin(
        &mut self,
        effect_key: &str,
        external_key: &str,
    ) -> Result<(LedgerEntry, bool)> {
        let created = sqlx::query(
            "INSERT INTO effect_ledger (effect_key, state, external_key, created_at, updated_at) VALUES ($1, 'pending', $2, $3, $3)
             ON CONFLICT (effect_key) DO NOTHING",
        )
        .bind(effect_key)
        .bind(external_key)
        .bind(holdfast_core::now_ms())
        .execute(self.conn())
        .await?
        .rows_affected()
            == 1;
        let r = sqlx::query("SELECT effect_key, state, external_key, external_id FROM effect_ledger WHERE effect_key = $1")
            .bind(effect_key)
            .fetch_one(self.conn())
            .await?;
        Ok((LedgerEntry::from_row(&r)?, created))
    }

    /// The effect happened, and the dependency knows it as `external_id`: its entry is done.
    pub async fn ledger_settle(&mut self, effect_key: &str, external_id: &str) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO effect_ledger (effect_key, state, external_key, external_id, created_at, updated_at) VALUES ($1, 'done', $1, $2, $3, $3)
             {LEDGER_SETTLE_CONFLICT}"
        ))
        .bind(effect_key)
        .bind(external_id)
        .bind(holdfast_core::now_ms())
        .execute(self.conn())
        .await?;
        Ok(())
    }
}

impl Store {
    /// A transaction of the store's own, which never aborts.
    async fn tx<'a, T, F>(&self, op: &'static str, rerun: Rerun, body: F) -> Result<T>
    where
        F: for<'t> FnMut(&'t mut Tx) -> crate::tx::TxBody<'a, 't, T, Infallible> + Send + 'a,
        T: Send + 'a,
    {
        self.transaction(op, rerun, body)
            .await
            .map_err(TxError::into_db)
    }

    /// Enqueues one job; `None` when its unique key already exists.
    pub async fn job_enqueue(&self, job: &JobInsert) -> Result<Option<i64>> {
        Ok(self
            .job_enqueue_many(std::slice::from_ref(job))
            .await?
            .into_iter()
            .next())
    }

    /// Enqueues many jobs in one transaction; returns the ids of those inserted.
    pub async fn job_enqueue_many(&self, jobs: &[JobInsert]) -> Result<Vec<i64>> {
        // Idempotent only when every job is unique; otherwise a re-run could double them.
        let rerun = if jobs.iter().all(|j| j.unique_key.is_some()) {
            Rerun::Always
        } else {
            Rerun::IfUncommitted
        };
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        self.run(rerun, "job_enqueue", || async {
            let now = holdfast_core::now_ms();
            if jobs.len() <= INSERT_CHUNK {
                // One statement (insert and notify): its own transaction.
                let sql = insert_sql(self.backend, jobs.len());
                let rows = self
                    .write_one_rows(bind_jobs(sqlx::query(&sql), jobs, now))
                    .await?;
                return rows.iter().map(|r| Ok(r.try_get("id")?)).collect();
            }
            let mut tx = self.begin_write().await?;
            let ids = tx.job_enqueue(jobs).await?;
            tx.commit().await?;
            Ok(ids)
        })
        .await
    }

    /// Claims up to `limit` available jobs of `queue` due by `now`, most urgent first, for
    /// `lease`; each claim increments the job's attempt and its claim (the fence), and begins
    /// the effect the job names ([`JobInsert::effect`]) in the effect ledger, all in one
    /// commit: one statement on PostgreSQL, one transaction on SQLite.
    pub async fn job_claim(
        &self,
        queue: &str,
        worker_id: &str,
        limit: i64,
        now: i64,
        lease: Duration,
    ) -> Result<Vec<JobRow>> {
        let due = "SELECT id FROM jobs WHERE state = 'available' AND queue = $4 AND run_at <= $3
                   ORDER BY priority, run_at, id LIMIT $5";
        let set = "state = 'running', attempt = attempt + 1, claim = claim + 1, lease_until = $1, worker_id = $2, started_at = $3";
        let returning = format!("{JOB_COLUMNS}, effect_key, effect_external_key");
        let sql = match self.backend {
            // Postgres: skip the rows other claimers hold, and join the picked ones back by
            // primary key. The statement is prepared once per connection, and its generic plan
            // is made while the table is still small: `id = ANY(ARRAY(picked))` was then planned
            // as a scan of the whole table (completed jobs included) that stayed the plan as the
            // table grew (1.7 ms a claim after 10 s of a benchmark), and `id IN (picked)` as a
            // hash join over it. A join from the few picked rows is planned as an index lookup
            // per row at any size. (The picked rows stay locked until the statement ends, so
            // they are still available when it updates them.) The claimed jobs' effects are
            // begun by the same statement, each once (`DISTINCT ON`: one upsert may not touch a
            // row twice), and joined to their jobs.
            Backend::Postgres => format!(
                "WITH picked (job_id) AS MATERIALIZED ({due} FOR UPDATE SKIP LOCKED),
                 claimed AS (UPDATE jobs SET {set} FROM picked WHERE id = picked.job_id RETURNING {returning}),
                 begun AS ({LEDGER_BEGIN_INSERT}
                     SELECT DISTINCT ON (effect_key) effect_key, 'pending', effect_external_key, $3, $3, 1
                     FROM claimed WHERE effect_key IS NOT NULL ORDER BY effect_key
                     {LEDGER_BEGIN_CONFLICT})
                 SELECT claimed.*, begun.state, begun.external_key, begun.external_id, begun.begun
                 FROM claimed LEFT JOIN begun ON begun.effect_key = claimed.effect_key"
            ),
            Backend::Sqlite => {
                format!("UPDATE jobs SET {set} WHERE id IN ({due}) RETURNING {returning}")
            }
        };
        let claim = || {
            sqlx::query(&sql)
                .bind(now.saturating_add(ms(lease)))
                .bind(worker_id)
                .bind(now)
                .bind(queue)
                .bind(limit)
        };
        let mut jobs = match self.backend {
            // A claim that committed but whose answer was lost leaves jobs running under a
            // lease nobody holds; the rescuer frees them. So only retry when nothing can have
            // committed.
            Backend::Postgres => {
                self.run(Rerun::IfUncommitted, "job_claim", || async {
                    let rows = self.write_one_rows(claim()).await?;
                    rows.iter()
                        .map(|r| {
                            let mut job = JobRow::from_row(r)?;
                            job.effect = begun_effect(r)?;
                            Ok(job)
                        })
                        .collect::<Result<Vec<_>>>()
                })
                .await?
            }
            // SQLite: a member of this process's group commit, so that a worker's claims and
            // its settlements share commits (one `fsync`, one turn at the write lock) rather
            // than take turns. The claimed jobs' effects are begun by one statement.
            Backend::Sqlite => {
                let claim = &claim;
                self.transaction("job_claim", Rerun::IfUncommitted, |tx| {
                    async move { sqlite_claim(tx, claim(), now).await }.scope_boxed()
                })
                .await
                .map_err(TxError::into_db)?
            }
        };
        jobs.sort_by_key(|j| j.id);
        Ok(jobs)
    }

    /// `UPDATE jobs SET <set> WHERE state = 'running'` for the jobs whose current claim is one
    /// of `fences`, as one statement; `value`, if any, is its `$1`. Returns how many matched.
    /// With [`HeldRows::Skip`], Postgres passes over the rows another statement holds.
    async fn job_update_fenced(
        &self,
        op: &'static str,
        rerun: Rerun,
        set: &str,
        value: Option<i64>,
        fences: &[JobFence],
        held: HeldRows,
    ) -> Result<u64> {
        if fences.is_empty() {
            return Ok(0);
        }
        let n = 1 + usize::from(value.is_some());
        let matched = fence_match(self.backend, n);
        let sql = match (self.backend, held) {
            (Backend::Postgres, HeldRows::Skip) => format!(
                "WITH free AS MATERIALIZED (SELECT id FROM jobs WHERE state = 'running' AND {matched} FOR UPDATE SKIP LOCKED)
                 UPDATE jobs SET {set} FROM free WHERE jobs.id = free.id"
            ),
            _ => format!("UPDATE jobs SET {set} WHERE state = 'running' AND {matched}"),
        };
        let fences = fences_json(fences);
        self.run(rerun, op, || async {
            let q = sqlx::query(&sql);
            let q = match value {
                Some(v) => q.bind(v),
                None => q,
            };
            self.write_one(q.bind(&fences)).await
        })
        .await
    }

    /// Extends the leases of running attempts; returns how many it extended. On Postgres it
    /// passes over an attempt whose row another statement holds (its settlement or its
    /// completion, as a rule) rather than wait for it: a settling job needs no longer lease,
    /// and should the settlement fail, the next heartbeat extends it, well before the lease
    /// ends. Waiting would hold the rows of all the other running jobs as long.
    pub async fn job_heartbeat(&self, fences: &[JobFence], lease_until: i64) -> Result<u64> {
        let set = "lease_until = $1";
        self.job_update_fenced(
            "job_heartbeat",
            Rerun::Always,
            set,
            Some(lease_until),
            fences,
            HeldRows::Skip,
        )
        .await
    }

    /// Completes attempts in one statement; attempts that are no longer current are refused
    /// (not counted).
    pub async fn job_complete(&self, fences: &[JobFence], now: i64) -> Result<u64> {
        let set = "state = 'completed', finished_at = $1, lease_until = NULL";
        self.job_update_fenced(
            "job_complete",
            Rerun::Always,
            set,
            Some(now),
            fences,
            HeldRows::Wait,
        )
        .await
    }

    /// Records a failed attempt: back to `available` at `retry_at`, or `dead` when `None`.
    /// Returns false when the attempt was no longer current.
    pub async fn job_fail(
        &self,
        job: JobFence,
        error: &str,
        retry_at: Option<i64>,
        now: i64,
    ) -> Result<bool> {
        let error: String = error.chars().take(2000).collect();
        self.run(Rerun::Always, "job_fail", || async {
            let mut tx = self.begin_write().await?;
            // Back in the queue at `retry_at`, or dead (finished) now.
            let (set, at) = match retry_at {
                Some(at) => ("state = 'available', run_at = $3", at),
                None => ("state = 'dead', finished_at = $3", now),
            };
            let sql = format!(
                "UPDATE jobs SET {set}, last_error = $4, lease_until = NULL
                 WHERE id = $1 AND claim = $2 AND state = 'running'"
            );
            let n = sqlx::query(&sql)
                .bind(job.id)
                .bind(job.claim)
                .bind(at)
                .bind(&error)
                .execute(tx.conn())
                .await?
                .rows_affected();
            commit_waking(tx, n == 1 && retry_at.is_some()).await?;
            Ok(n == 1)
        })
        .await
    }

    /// Gives unfinished attempts back (graceful drain): available again at once, and the
    /// attempt does not count against `max_attempts`.
    pub async fn job_release(&self, fences: &[JobFence]) -> Result<u64> {
        let set = "state = 'available', attempt = attempt - 1, lease_until = NULL";
        self.job_update_fenced(
            "job_release",
            Rerun::IfUncommitted,
            set,
            None,
            fences,
            HeldRows::Wait,
        )
        .await
    }

    /// Frees jobs whose worker stopped heartbeating: available again, or dead when their
    /// attempts are spent. Returns (rescued, dead).
    pub async fn job_rescue(&self, now: i64) -> Result<(u64, u64)> {
        self.run(Rerun::Always, "job_rescue", || async {
            let mut tx = self.begin_write().await?;
            let dead = sqlx::query(
                "UPDATE jobs SET state = 'dead', finished_at = $1, lease_until = NULL, last_error = 'lease expired on the last attempt'
                 WHERE state = 'running' AND lease_until < $1 AND attempt >= max_attempts",
            )
            .bind(now)
            .execute(tx.conn())
            .await?
            .rows_affected();
            let rescued = sqlx::query(
                "UPDATE jobs SET state = 'available', lease_until = NULL, last_error = 'lease expired: worker lost'
                 WHERE state = 'running' AND lease_until < $1",
            )
            .bind(now)
            .execute(tx.conn())
            .await?
            .rows_affected();
            commit_waking(tx, rescued > 0).await?;
            Ok((rescued, dead))
        })
        .await
    }

    /// Deletes up to `limit` jobs completed before `before`, so the table does not bloat.
    pub async fn job_prune(&self, before: i64, limit: i64) -> Result<u64> {
        let old = "SELECT id FROM jobs WHERE state = 'completed' AND finished_at < $1 LIMIT $2";
        // By primary key on Postgres, as in `job_claim`: `id IN (…)` scans the whole table.
        let sql = match self.backend {
            Backend::Postgres => format!("DELETE FROM jobs WHERE id = ANY(ARRAY({old}))"),
            Backend::Sqlite => format!("DELETE FROM jobs WHERE id IN ({old})"),
        };
        self.run(Rerun::Always, "job_prune", || async {
            self.write_one(sqlx::query(&sql).bind(before).bind(limit))
                .await
        })
        .await
    }

    pub async fn job_dead(&self, limit: i64) -> Result<Vec<DeadJob>> {
        let sql = format!(
            "SELECT {JOB_COLUMNS}, last_error, finished_at FROM jobs WHERE state = 'dead' ORDER BY id LIMIT $1"
        );
        self.read_rows("job_dead", || sqlx::query(&sql).bind(limit))
            .await
    }

    /// Sends dead jobs back to work with a fresh attempt budget: one by id, or all.
    pub async fn job_redrive(&self, id: Option<i64>, now: i64) -> Result<u64> {
        self.run(Rerun::Always, "job_redrive", || async {
            let mut tx = self.begin_write().await?;
            let n = sqlx::query(
                "UPDATE jobs SET state = 'available', attempt = 0, run_at = $1, finished_at = NULL
                 WHERE state = 'dead' AND ($2 < 0 OR id = $2)",
            )
            .bind(now)
            .bind(id.unwrap_or(-1))
            .execute(tx.conn())
            .await?
            .rows_affected();
            commit_waking(tx, n > 0).await?;
            Ok(n)
        })
        .await
    }

    pub async fn job_counts(&self) -> Result<Vec<QueueCount>> {
        let sql = "SELECT queue, state, COUNT(*) AS n FROM jobs GROUP BY queue, state ORDER BY queue, state";
        self.read_rows("job_counts", || sqlx::query(sql)).await
    }

    /// When the next scheduled job of `queue` becomes due, if any is waiting.
    pub async fn job_next_run_at(&self, queue: &str) -> Result<Option<i64>> {
        let sql = "SELECT MIN(run_at) AS t FROM jobs WHERE state = 'available' AND queue = $1";
        let next: Option<(Option<i64>,)> = self
            .read_row("job_next_run_at", || sqlx::query(sql).bind(queue))
            .await?;
        Ok(next.and_then(|(t,)| t))
    }

    // ---- the effect ledger -------------------------------------------------------------

    pub async fn ledger_get(&self, effect_key: &str) -> Result<Option<LedgerEntry>> {
        let sql = "SELECT effect_key, state, external_key, external_id FROM effect_ledger WHERE effect_key = $1";
        self.read_row("ledger_get", || sqlx::query(sql).bind(effect_key))
            .await
    }

    /// [`Tx::ledger_begin`] as its own transaction. On PostgreSQL it is one statement in
    /// autocommit (one round trip instead of four), unless another attempt created the entry
    /// while it ran: the statement's snapshot cannot see that entry, so the transaction, whose
    /// second statement can, answers instead.
    pub async fn ledger_begin(
        &self,
        effect_key: &str,
        external_key: &str,
    ) -> Result<(LedgerEntry, bool)> {
        if self.backend == Backend::Postgres {
            let sql = "WITH created AS (
                    INSERT INTO effect_ledger (effect_key, state, external_key, created_at, updated_at) VALUES ($1, 'pending', $2, $3, $3)
                    ON CONFLICT (effect_key) DO NOTHING
                    RETURNING effect_key, state, external_key, external_id)
                 SELECT effect_key, state, external_key, external_id, 1 AS created FROM created
                 UNION ALL
                 SELECT effect_key, state, external_key, external_id, 0 FROM effect_ledger
                 WHERE effect_key = $1 AND NOT EXISTS (SELECT 1 FROM created)";
            let now = holdfast_core::now_ms();
            let rows = self
                .run(Rerun::Always, "ledger_begin", || async {
                    Ok(sqlx::query(sql)
                        .bind(effect_key)
                        .bind(external_key)
                        .bind(now)
                        .fetch_all_pooled(self)
                        .await?)
                })
                .await?;
            if let Some(r) = rows.first() {
                let created: i32 = r.try_get("created")?;
                return Ok((LedgerEntry::from_row(r)?, created == 1));
            }
        }
        self.tx("ledger_begin", Rerun::Always, |tx| {
            async move { Ok(tx.ledger_begin(effect_key, external_key).await?) }.scope_boxed()
        })
        .await
    }
}

/// The SQLite claim in `tx`: the claiming `UPDATE … RETURNING`, then one statement that
/// begins the claimed jobs' effects (a key named twice in one claim is begun once, and both
/// jobs get that entry).
async fn sqlite_claim<'q>(
    tx: &mut Tx,
    claim: Query<'q, Any, AnyArguments<'q>>,
    now: i64,
) -> std::result::Result<Vec<JobRow>, TxError<Infallible>> {
    let rows = claim.fetch_all(tx.conn()).await?;
    let mut jobs = Vec::with_capacity(rows.len());
    // Each job's effect key, and each key once with its external key, in claim order.
    let mut job_keys = Vec::with_capacity(rows.len());
    let mut effects: Vec<(String, String)> = Vec::new();
    for r in &rows {
        jobs.push(JobRow::from_row(r)?);
        let key: Option<String> = r.try_get("effect_key")?;
        let external: Option<String> = r.try_get("effect_external_key")?;
        let key = match (key, external) {
            (Some(key), Some(external)) => {
                if !effects.iter().any(|(k, _)| *k == key) {
                    effects.push((key.clone(), external));
                }
                Some(key)
            }
            _ => None,
        };
        job_keys.push(key);
    }
    if effects.is_empty() {
        return Ok(jobs);
    }
    let values = (0..effects.len())
        .map(|i| format!("(${}, 'pending', ${}, $1, $1, 1)", 2 * i + 2, 2 * i + 3))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!("{LEDGER_BEGIN_INSERT} VALUES {values} {LEDGER_BEGIN_CONFLICT}");
    let mut begin = sqlx::query(&sql).bind(now);
    for (key, external) in &effects {
        begin = begin.bind(key).bind(external);
    }
    let mut begun = std::collections::HashMap::new();
    for r in &begin.fetch_all(tx.conn()).await? {
        if let Some(b) = begun_effect(r)? {
            begun.insert(b.entry.effect_key.clone(), b);
        }
    }
    for (job, key) in jobs.iter_mut().zip(&job_keys) {
        if let Some(key) = key {
            let entry = begun.get(key).cloned();
            job.effect = Some(entry.ok_or(Error::Db(sqlx::Error::RowNotFound))?);
        }
    }
    Ok(jobs)
}
