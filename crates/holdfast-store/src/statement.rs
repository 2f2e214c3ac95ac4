//! One PostgreSQL statement composed of steps that different owners write: the application's
//! own `WITH` steps next to the store's generic ones (an idempotency key stored with its
//! answer, jobs enqueued), sent in one round trip and committed by itself. It is the
//! one-round-trip form of a [`crate::Store::transaction`] for work whose every value either is
//! known before it starts or is computed by the database in the statement itself.
//!
//! A lone statement is atomic on PostgreSQL, and every data-modifying step of a `WITH` runs
//! exactly once and to completion whether or not the final `SELECT` reads it, all against one
//! snapshot; a step sees another step's writes only through its `RETURNING` rows. So a step
//! that must happen only if another did names it in its `FROM` (an empty `RETURNING` writes
//! nothing after it). SQLite has no data-modifying `WITH`: there, the same work is a
//! transaction of several statements, which a caller may send as one script: one call of the
//! thread that runs the connection, under the database's one write lock. A keyed request's
//! work is then such a script ([`Keyed::Script`]), gated on [`Statement::key_absent`] and
//! closed by [`Statement::store_key`].

use crate::accounts::{ms, SessionCheck};
use crate::idempotency::StoredResponse;
use crate::jobs::{JobFence, JobInsert, INSERT_COLUMNS, NOTIFY_CHANNEL};
use crate::{Backend, Error, Pooled, Rerun, Result, ScopedFutureExt, Store, TxError};
use holdfast_core::{IdempotencyKey, RequestFingerprint};
use sqlx::Row;
use std::convert::Infallible;

/// A value bound to one placeholder of a [`Statement`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Param {
    Int(i64),
    Text(String),
    MaybeText(Option<String>),
}

impl From<i64> for Param {
    fn from(v: i64) -> Self {
        Param::Int(v)
    }
}

impl From<&str> for Param {
    fn from(v: &str) -> Self {
        Param::Text(v.to_owned())
    }
}

impl From<String> for Param {
    fn from(v: String) -> Self {
        Param::Text(v)
    }
}

impl From<Option<String>> for Param {
    fn from(v: Option<String>) -> Self {
        Param::MaybeText(v)
    }
}

/// A keyed request's work as its builder made it, for [`Store::run_keyed_statement`]: each
/// engine's form of "the work, and its key stored done with the answer, or nothing at all".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keyed {
    /// PostgreSQL: the statement's steps; the key is stored by the step of this name
    /// ([`Statement::claim_key`]).
    Step(String),
    /// SQLite: a script of statements with the statement's values bound, whose first write is
    /// gated on [`Statement::key_absent`] (every later one descending from it) and which ends
    /// with [`Statement::store_key`].
    Script(String),
}

/// The idempotency key a [`Statement`] stores (with [`Statement::claim_key`]) for the user it
/// acts for.
#[derive(Debug, Clone)]
pub struct KeyStep<'a> {
    /// The user, as an SQL expression of the statement: a placeholder bound to a user already
    /// known, or [`Statement::session_user`]'s check of the request's session.
    pub user: String,
    pub key: &'a IdempotencyKey,
    pub fingerprint: &'a RequestFingerprint,
    pub now: i64,
    /// The engine the statement is for: the builder writes steps for PostgreSQL and a script
    /// for SQLite (see [`Keyed`]).
    pub backend: Backend,
}

/// A statement under construction: named steps in order, their bound values, and the steps
/// whose inserted jobs must wake the workers.
#[derive(Debug, Default)]
pub struct Statement {
    steps: Vec<String>,
    params: Vec<Param>,
    enqueued: Vec<String>,
}

impl Statement {
    pub fn new() -> Self {
        Self::default()
    }

    /// Binds `value` and returns its placeholder (`$n`) for the caller's SQL.
    pub fn bind(&mut self, value: impl Into<Param>) -> String {
        self.params.push(value.into());
        format!("${}", self.params.len())
    }

    /// Adds the step `name AS (sql)`; later steps and the final `SELECT` may read it by name.
    pub fn step(&mut self, name: &str, sql: &str) {
        self.steps.push(format!("{name} AS ({sql})"));
    }

    /// Adds the steps that check `session` by the rules of [`Store::session_get`] (alive:
    /// younger than its absolute expiry and used within its idle timeout; its last use
    /// refreshed at most once per `touch_every`) and returns an SQL expression for its user's
    /// id: NULL when the session is unknown, dead or logged out. Steps that read their user
    /// through it find no rows for a dead session (`user_id = NULL` is never true), so a
    /// statement whose every write descends from such a step writes nothing and answers
    /// nothing for one; the caller then reads the session the usual way, which also deletes
    /// a dead one. The request's session and its work are then one round trip, not two.
    pub fn session_user(&mut self, session: &SessionCheck) -> String {
        let (hash, now, idle, touch) = (
            self.bind(session.id.storage_hash()),
            self.bind(session.now),
            self.bind(ms(session.idle_ttl)),
            self.bind(ms(session.touch_every)),
        );
        let alive =
            format!("id_hash = {hash} AND expires_at > {now} AND last_seen_at > {now} - {idle}");
        self.step(
            "holdfast_session",
            &format!("SELECT user_id FROM sessions WHERE {alive}"),
        );
        // A data-modifying step runs whether or not anything reads it.
        self.step(
            "holdfast_session_touched",
            &format!(
                "UPDATE sessions SET last_seen_at = {now}
                 WHERE {alive} AND last_seen_at <= {now} - {touch} AND last_seen_at < {now} RETURNING 1"
            ),
        );
        "(SELECT user_id FROM holdfast_session)".to_owned()
    }

    /// Adds the step `name`, which stores `key` already done with its answer (`status`, and
    /// `body`: an SQL text expression over `from`'s columns) for each row of `from`, unless
    /// the key exists. It returns `response_status, response_body` when it stored the key and
    /// nothing when the key was there already (a concurrent holder is waited for first) or
    /// the answer is NULL, so the work the key guards names `name` in its `FROM`. Stored done in the very statement
    /// that does the work, the key never exists without its effect, nor the effect without it.
    pub fn claim_key(
        &mut self,
        name: &str,
        key: &KeyStep<'_>,
        status: u16,
        body: &str,
        from: &str,
    ) {
        let (idem_key, fingerprint) = (
            self.bind(key.key.as_str()),
            self.bind(key.fingerprint.as_str()),
        );
        let (user, now, status) = (&key.user, self.bind(key.now), self.bind(i64::from(status)));
        self.step(
            name,
            &format!(
                "INSERT INTO idempotency_keys (user_id, idem_key, fingerprint, state, lock_token, locked_until, created_at, response_status, response_body)
                 SELECT {user}, {idem_key}, {fingerprint}, 'done', NULL, {now}, {now}, {status}, convert_to({body}, 'UTF8') FROM {from}
                 WHERE ({body}) IS NOT NULL AND {user} IS NOT NULL
                 ON CONFLICT (user_id, idem_key) DO NOTHING
                 RETURNING response_status, response_body"
            ),
        );
    }

    /// SQLite: a condition that holds while `key` is not stored. A keyed script gates its
    /// first write on it and derives every later write from that one, so that for a key used
    /// before (done, in flight, or for another request) the script writes nothing. The write
    /// transaction excludes every other writer: the key cannot appear between the check and
    /// [`Statement::store_key`].
    pub fn key_absent(&mut self, key: &KeyStep<'_>) -> String {
        let idem_key = self.bind(key.key.as_str());
        format!(
            "NOT EXISTS (SELECT 1 FROM idempotency_keys WHERE user_id = {} AND idem_key = {idem_key})",
            key.user
        )
    }

    /// SQLite: the statements that close a keyed script: they store `key` done with its answer
    /// (`status`, and `body`, an SQL text expression over the columns of `from`) for the row
    /// of `from`, if it has one and the answer is not NULL, and then select
    /// `response_status, response_body` of the key only if that insert stored it (`changes()`
    /// counts the last statement's rows), so the script answers nothing when the work wrote
    /// nothing.
    pub fn store_key(&mut self, key: &KeyStep<'_>, status: u16, body: &str, from: &str) -> String {
        let (idem_key, fingerprint) = (
            self.bind(key.key.as_str()),
            self.bind(key.fingerprint.as_str()),
        );
        let (user, now, status) = (&key.user, self.bind(key.now), self.bind(i64::from(status)));
        format!(
            "INSERT INTO idempotency_keys (user_id, idem_key, fingerprint, state, lock_token, locked_until, created_at, response_status, response_body)
                 SELECT {user}, {idem_key}, {fingerprint}, 'done', NULL, {now}, {now}, {status}, CAST(answer AS BLOB)
                 FROM (SELECT ({body}) AS answer FROM {from}) WHERE answer IS NOT NULL
                 ON CONFLICT (user_id, idem_key) DO NOTHING;
             SELECT response_status, response_body FROM idempotency_keys
                 WHERE changes() = 1 AND user_id = {user} AND idem_key = {idem_key}"
        )
    }

    /// Adds the step `name`, which enqueues `jobs` (as [`crate::Tx::job_enqueue`] does) once
    /// for each row of `after`; the workers are woken when the statement commits.
    pub fn enqueue_jobs(&mut self, name: &str, jobs: &[JobInsert], after: &str) {
        let mut rows = Vec::with_capacity(jobs.len());
        for j in jobs {
            let args = self.bind(j.args.as_str());
            rows.push(self.job_row(j, &args, after));
        }
        self.insert_job_rows(name, &rows);
    }

    /// [`Statement::enqueue_jobs`] for one job whose arguments the statement computes:
    /// `args_sql` is a text expression over the columns of `from`, evaluated (and the job
    /// enqueued) once for each row of `from`. `job.args` is not used.
    pub fn enqueue_job_computed(
        &mut self,
        name: &str,
        job: &JobInsert,
        args_sql: &str,
        from: &str,
    ) {
        let row = self.job_row(job, args_sql, from);
        self.insert_job_rows(name, &[row]);
    }

    /// One statement of its own (not a step) that enqueues `job` once for each row of `from`,
    /// its arguments the text expression `args_sql` over `from`'s columns, with this
    /// statement's values as its placeholders: for SQLite, which has no data-modifying `WITH`,
    /// to run in a script with the work it follows (the workers see the job once the
    /// transaction commits). `from` ends with a `WHERE` clause: SQLite reads an
    /// `INSERT … SELECT` followed by `ON CONFLICT` only so.
    pub fn job_insert_computed(&mut self, job: &JobInsert, args_sql: &str, from: &str) -> String {
        let row = self.job_row(job, args_sql, from);
        format!("INSERT INTO jobs ({INSERT_COLUMNS}) {row} ON CONFLICT (unique_key) DO NOTHING")
    }

    /// The `SELECT` of one job's row for the insert, with `args` as its arguments.
    fn job_row(&mut self, j: &JobInsert, args: &str, from: &str) -> String {
        let now = holdfast_core::now_ms();
        let effect = j.effect.as_ref();
        format!(
            "SELECT {}, {}, {args}, 'available', {}, {}, {}, {}, {}, {}, {} FROM {from}",
            self.bind(j.queue.as_str()),
            self.bind(j.kind.as_str()),
            self.bind(j.priority),
            self.bind(j.unique_key.clone()),
            self.bind(j.run_at),
            self.bind(j.max_attempts),
            self.bind(now),
            self.bind(effect.map(|e| e.effect_key.clone())),
            self.bind(effect.map(|e| e.external_key.clone())),
        )
    }

    fn insert_job_rows(&mut self, name: &str, rows: &[String]) {
        self.step(
            name,
            &format!(
                "INSERT INTO jobs ({INSERT_COLUMNS}) {}
                 ON CONFLICT (unique_key) DO NOTHING RETURNING queue",
                rows.join(" UNION ALL ")
            ),
        );
        self.enqueued.push(name.to_owned());
    }

    /// Adds the step `name`, which completes the job attempt `fence` (as
    /// [`crate::Tx::job_complete`] does) and returns its `id`, or nothing when the claim is no
    /// longer current: the steps that must happen only for the current attempt name `name`
    /// in their `FROM`.
    pub fn complete_job(&mut self, name: &str, fence: JobFence) {
        let (id, claim, now) = (
            self.bind(fence.id),
            self.bind(fence.claim),
            self.bind(holdfast_core::now_ms()),
        );
        self.step(
            name,
            &format!(
                "UPDATE jobs SET state = 'completed', finished_at = {now}, lease_until = NULL
                 WHERE id = {id} AND claim = {claim} AND state = 'running' RETURNING id"
            ),
        );
    }

    /// Adds the step `name`, which marks the effect ledger's entry `effect_key` done as
    /// `external_id` (as [`crate::Tx::ledger_settle`] does) once for each row of `after`.
    pub fn settle_effect(&mut self, name: &str, effect_key: &str, external_id: &str, after: &str) {
        let (key, id, now) = (
            self.bind(effect_key),
            self.bind(external_id),
            self.bind(holdfast_core::now_ms()),
        );
        self.step(
            name,
            &format!(
                "INSERT INTO effect_ledger (effect_key, state, external_key, external_id, created_at, updated_at)
                 SELECT {key}, 'done', {key}, {id}, {now}, {now} FROM {after}
                 ON CONFLICT (effect_key) DO UPDATE SET state = 'done', external_id = excluded.external_id, updated_at = excluded.updated_at
                 RETURNING effect_key"
            ),
        );
    }

    /// The steps with `select` as the final `SELECT`, to run with [`Statement::bound`] in a
    /// transaction of the caller's (where a statement's jobs wake their workers at its commit
    /// only if it selects them: see [`Store::run_statement`]).
    pub fn selecting(&self, select: &str) -> String {
        format!("WITH {} {select}", self.steps.join(", "))
    }

    /// `sql` with this statement's values bound.
    pub fn bound<'q>(
        &'q self,
        sql: &'q str,
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
        let mut q = sqlx::query(sql);
        for p in &self.params {
            q = match p {
                Param::Int(v) => q.bind(*v),
                Param::Text(v) => q.bind(v.as_str()),
                Param::MaybeText(v) => q.bind(v.clone()),
            };
        }
        q
    }

    /// The whole statement: the steps, then `SELECT columns FROM from`. The answer has exactly
    /// one row: `from`'s first row, or NULLs where `from` returned none.
    fn sql(&self, columns: &str, from: &str) -> String {
        // A `SELECT` step runs only if read, so the notifications are counted here, on the
        // left of the join, which always has its one row.
        let notify = self
            .enqueued
            .iter()
            .map(|s| format!("(SELECT count(pg_notify('{NOTIFY_CHANNEL}', queue)::text) FROM {s})"))
            .collect::<Vec<_>>();
        let notified = if notify.is_empty() {
            "0".to_owned()
        } else {
            notify.join(" + ")
        };
        format!(
            "WITH {} SELECT {columns} FROM (SELECT {notified} AS holdfast_notified) n LEFT JOIN (SELECT * FROM {from} LIMIT 1) answer ON true",
            self.steps.join(", ")
        )
    }
}

impl Store {
    /// Runs `stmt` (PostgreSQL only) as one round trip and one commit; returns whether its
    /// step `from` returned a row (one that names it in its `FROM` wrote something). Re-run
    /// after a transient failure, so its steps must find their own earlier work done (a
    /// completed job, a key that exists) and write nothing again.
    pub async fn run_statement(
        &self,
        op: &'static str,
        stmt: &Statement,
        from: &str,
    ) -> Result<bool> {
        let row = self
            .run_composed(
                op,
                stmt,
                "answer.holdfast_row IS NOT NULL",
                &format!("(SELECT 1 AS holdfast_row FROM {from}) AS stepped"),
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Runs `stmt` (PostgreSQL only), selecting `columns` of `from`'s first row: the answer's
    /// one row.
    async fn run_composed(
        &self,
        op: &'static str,
        stmt: &Statement,
        columns: &str,
        from: &str,
    ) -> Result<sqlx::any::AnyRow> {
        if self.backend() != Backend::Postgres {
            return Err(Error::Unsupported(
                "one composed statement needs PostgreSQL",
            ));
        }
        let sql = stmt.sql(columns, from);
        self.run(Rerun::Always, op, || async {
            let row = stmt
                .bound(&sql)
                .fetch_all_pooled(self)
                .await?
                .into_iter()
                .next();
            Ok(row.ok_or(sqlx::Error::RowNotFound)?)
        })
        .await
    }

    /// Runs `stmt` (PostgreSQL only) as one round trip and one commit, with `select` (over its
    /// steps) as its final `SELECT`; that select's rows. Re-run after a transient failure as
    /// `rerun` allows. Its steps may not enqueue jobs (their workers are woken by
    /// [`Store::run_statement`]'s and [`Store::run_keyed_statement`]'s final select).
    pub async fn statement_rows(
        &self,
        op: &'static str,
        rerun: Rerun,
        stmt: &Statement,
        select: &str,
    ) -> Result<Vec<sqlx::any::AnyRow>> {
        if self.backend() != Backend::Postgres || !stmt.enqueued.is_empty() {
            return Err(Error::Unsupported(
                "rows of a composed statement need PostgreSQL and no enqueued jobs",
            ));
        }
        let sql = stmt.selecting(select);
        self.run(rerun, op, || async {
            Ok(stmt.bound(&sql).fetch_all_pooled(self).await?)
        })
        .await
    }

    /// Runs `stmt`, the keyed work `keyed` of this store's engine, as one commit; returns the
    /// answer it stored with the key, or `None` when it stored none (the key existed, or the
    /// work wrote nothing). On PostgreSQL `keyed` is the key step's name and the statement is
    /// one round trip; on SQLite it is the script, run as one call in a member of this
    /// process's group commit. Re-run after a transient failure: a re-run of work that did
    /// commit finds its key and stores nothing.
    pub async fn run_keyed_statement(
        &self,
        op: &'static str,
        stmt: &Statement,
        keyed: &Keyed,
    ) -> Result<Option<StoredResponse>> {
        let row = match (keyed, self.backend()) {
            (Keyed::Step(key_step), Backend::Postgres) => Some(
                self.run_composed(
                    op,
                    stmt,
                    "answer.response_status, answer.response_body",
                    key_step,
                )
                .await?,
            ),
            (Keyed::Script(script), Backend::Sqlite) => self
                .transaction(op, Rerun::Always, |tx| {
                    async move {
                        let rows = stmt.bound(script).fetch_all(tx.conn()).await?;
                        Ok::<_, TxError<Infallible>>(rows.into_iter().next())
                    }
                    .scope_boxed()
                })
                .await
                .map_err(TxError::into_db)?,
            _ => {
                return Err(Error::Unsupported(
                    "keyed work is steps on PostgreSQL and a script on SQLite",
                ))
            }
        };
        let Some(row) = row else {
            return Ok(None);
        };
        let status: Option<i64> = row.try_get(0)?;
        let body: Option<Vec<u8>> = row.try_get(1)?;
        Ok(match (status.and_then(|s| u16::try_from(s).ok()), body) {
            (Some(status), Some(body)) => Some(StoredResponse { status, body }),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_count_up_and_the_answer_row_is_always_there() {
        let mut s = Statement::new();
        assert_eq!(s.bind(7), "$1");
        assert_eq!(s.bind("x"), "$2");
        s.step("a", "SELECT 1 AS one");
        s.enqueue_jobs("j", &[JobInsert::new("q", "k", "{}".into())], "a");
        let sql = s.sql("answer.one", "a");
        assert!(sql.starts_with("WITH a AS (SELECT 1 AS one), j AS (INSERT INTO jobs"));
        assert!(sql.contains("FROM (SELECT (SELECT count(pg_notify('holdfast_jobs', queue)::text) FROM j) AS holdfast_notified) n LEFT JOIN (SELECT * FROM a LIMIT 1) answer ON true"));
        assert_eq!(s.params.len(), 12);
    }
}
