//! The effect ledger: exactly once *in effect* for jobs that are delivered at least once.
//!
//! A worker can die after an external call acted and before it recorded that, and a
//! dependency can act and then time out. So every external effect goes through the same
//! steps, keyed by the effect (`charge:<id>`, `webhook:<id>`, …):
//!
//! 1. [`Ledger::once`] records the intent with a *deterministic* idempotency key for the
//!    dependency. A later attempt finds the entry and reuses its key. A job that names its
//!    effect when it is enqueued has this step done by the claim that hands it out.
//! 2. If the ledger says `done`, only the settlement is (re)applied — no call.
//! 3. If an earlier attempt left it `pending` (outcome unknown), reconcile: ask the
//!    dependency whether it already acted under that key.
//! 4. Otherwise call the dependency with the key; it deduplicates a retry of a call that
//!    acted but whose answer was lost.
//! 5. [`Ledger::settle`] marks the entry done, applies the caller's own consequences on the
//!    store and completes the job — one transaction, fenced by the job's claim
//!    ([`Ledger::settle_with_steps`]: one statement on PostgreSQL, for a caller that also
//!    gives its consequences as statement steps, shared with the settlements of other jobs
//!    of its kind that are ready at the same moment: see `settlements.rs`).

use crate::settlements::{Settlements, Shared};
use crate::{Done, JobError};
use holdfast_store::{
    Backend, BegunEffect, JobFence, JobRow, LedgerEntry, Rerun, Statement, Store, Tx, TxBody,
    TxError,
};
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

/// Causes external effects at most once each, through the store's `effect_ledger` table.
/// Cheap to clone; clones share their settlements' statements.
#[derive(Clone)]
pub struct Ledger {
    store: Store,
    settlements: Arc<Settlements>,
}

impl Ledger {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            settlements: Arc::default(),
        }
    }

    /// Steps 1–4 of the module docs for `job`: the dependency's id for `effect_key`, calling
    /// it at most once per ledger entry. `call` and `lookup` get the idempotency key to use;
    /// `lookup` answers the dependency's id for an effect it already caused under that key,
    /// if any. When the job names this effect ([`holdfast_store::JobInsert::effect`]), its
    /// claim already began the entry and step 1 costs nothing; otherwise (a job that names
    /// none, or one enqueued by an older build) it is begun here.
    pub async fn once<C, CF, L, LF>(
        &self,
        job: &JobRow,
        effect_key: &str,
        external_key: &str,
        call: C,
        lookup: L,
    ) -> Result<String, JobError>
    where
        C: FnOnce(String) -> CF,
        CF: Future<Output = Result<String, JobError>>,
        L: FnOnce(String) -> LF,
        LF: Future<Output = Result<Option<String>, JobError>>,
    {
        let (entry, fresh) = match &job.effect {
            Some(BegunEffect { entry, fresh }) if entry.effect_key == effect_key => {
                (entry.clone(), *fresh)
            }
            _ => self.store.ledger_begin(effect_key, external_key).await?,
        };
        let LedgerEntry {
            state,
            external_key: key,
            external_id,
            ..
        } = entry;
        if let (true, Some(id)) = (state == "done", external_id) {
            return Ok(id);
        }
        // Left `pending` by an earlier attempt: the outcome may be unknown, so ask first.
        if !fresh {
            if let Some(id) = lookup(key.clone()).await? {
                metrics::counter!("holdfast_effects_reconciled_total").increment(1);
                return Ok(id);
            }
        }
        call(key).await
    }

    /// Step 5: in one transaction, complete the job's claim `job`, mark `effect_key` done as
    /// `external_id`, and run `then` (the caller's consequences, e.g. "the order is paid" and
    /// a follow-up job). A claim that is no longer current changes nothing and still counts
    /// as settled: the newer attempt settles the same effect.
    pub async fn settle<'a, F>(
        &self,
        job: JobFence,
        effect_key: &'a str,
        external_id: &'a str,
        then: F,
    ) -> Result<Done, JobError>
    where
        F: for<'t> Fn(&'t mut Tx) -> TxBody<'a, 't, (), Infallible> + Sync + 'a,
    {
        let then = &then;
        let settled = self
            .store
            .transaction("effect_settle", Rerun::Always, move |tx| {
                holdfast_store::ScopedFutureExt::scope_boxed(async move {
                    tx.job_settle_effect(job, effect_key, external_id).await?;
                    then(tx).await
                })
            })
            .await;
        match settled.map_err(TxError::into_db) {
            Ok(()) | Err(holdfast_store::Error::JobLost) => Ok(Done::Settled),
            Err(e) => Err(e.into()),
        }
    }

    /// [`Ledger::settle`] for `job` in one round trip on PostgreSQL. The caller also gives its
    /// consequences as `then_as_steps(stmt, after)`, which adds them as steps of a statement.
    /// Each step writes once for each row of the step `after`, which has one row when the
    /// claim is current. The steps' names must be made from `after` (say `{after}_paid`),
    /// because the settlements of other jobs of `job`'s kind that are ready at the same moment
    /// share the statement, each under its own `after`. It should add the same steps for every
    /// job of a kind, so that each kind's statements keep a few texts that stay prepared. A
    /// shared statement that fails is not the end: each of its settlements is then written
    /// alone. SQLite runs `then` in the transaction.
    pub async fn settle_with_steps<'a, F, S>(
        &self,
        job: &JobRow,
        effect_key: &'a str,
        external_id: &'a str,
        then: F,
        then_as_steps: S,
    ) -> Result<Done, JobError>
    where
        F: for<'t> Fn(&'t mut Tx) -> TxBody<'a, 't, (), Infallible> + Sync + 'a,
        S: Fn(&mut Statement, &str),
    {
        let fence = job.fence();
        if self.store.backend() != Backend::Postgres {
            return self.settle(fence, effect_key, external_id, then).await;
        }
        // A settlement's steps are named apart by its member number in a shared statement;
        // the statement (shared or alone) answers for member 0's completion.
        let completed_step = |member: usize| format!("completed_{member}");
        let steps = |stmt: &mut Statement, member: usize| {
            let completed = completed_step(member);
            stmt.complete_job(&completed, fence);
            stmt.settle_effect(
                &format!("settled_{member}"),
                effect_key,
                external_id,
                &completed,
            );
            then_as_steps(stmt, &completed);
        };
        let joined = self
            .settlements
            .join(&self.store, &job.kind, || completed_step(0), steps);
        match joined.await {
            Shared::Committed => Ok(Done::Settled),
            Shared::Failed(e) => Err(JobError::retry(format!("store: {e}"))),
            Shared::SettleAlone => {
                let mut stmt = Statement::new();
                steps(&mut stmt, 0);
                self.store
                    .run_statement("effect_settle", &stmt, &completed_step(0))
                    .await?;
                Ok(Done::Settled)
            }
        }
    }
}

impl From<holdfast_store::Error> for JobError {
    fn from(e: holdfast_store::Error) -> Self {
        JobError::retry(format!("store: {e}"))
    }
}
