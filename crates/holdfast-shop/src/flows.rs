//! The shop's jobs: charge an order, then send its receipt, each exactly once in effect.
//!
//! A checkout enqueues the order's `payout` job in its own transaction. The payout charges the
//! order's total at the provider through the effect ledger (`holdfast_jobs::Ledger`: a
//! deterministic idempotency key per order, recorded before the call, reconciled after an
//! unknown outcome), then settles all or nothing, fenced by the job's claim: ledger entry
//! done, order paid, receipt job enqueued, job completed (one statement on PostgreSQL, one
//! transaction on SQLite). The receipt does the same with the
//! mail sink. A worker killed anywhere in between loses its lease; the next attempt reuses the
//! ledger's key, so the provider deduplicates, and a stale attempt's settlement is refused.

use crate::sql::{self, PayoutInfo};
use crate::{EMAIL_QUEUE, PAYMENTS_QUEUE, PAYOUT_KIND, RECEIPT_KIND};
use futures::FutureExt;
use holdfast_core::Sabotage;
use holdfast_jobs::{Done, Handler, JobError, Ledger, QueueConfig, Worker};
use holdfast_provider::{ClientError, ProviderClient};
use holdfast_store::{JobInsert, JobRow, ScopedFutureExt, Statement, Store, Tx, TxError};
use serde::Deserialize;
use std::convert::Infallible;
use std::sync::Arc;

/// A job's arguments: the order, and what the job carries of it (`Effect::job_carrying`), so
/// that its worker reads nothing before it acts. A job from a build that carried nothing reads
/// the order.
#[derive(Deserialize)]
struct OrderArgs {
    order_id: String,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    total_cents: Option<i64>,
}

/// The dependencies of the shop's jobs. Cheap to clone.
#[derive(Clone)]
pub struct Flows {
    store: Store,
    ledger: Ledger,
    provider: ProviderClient,
    sabotage: Option<Sabotage>,
}

impl Flows {
    pub fn new(store: Store, provider: ProviderClient, sabotage: Option<Sabotage>) -> Self {
        Self {
            ledger: Ledger::new(store.clone()),
            store,
            provider,
            sabotage,
        }
    }

    /// The shop's queues, each run `concurrency` jobs at a time per worker process.
    pub fn queues(concurrency: usize) -> Vec<QueueConfig> {
        [PAYMENTS_QUEUE, EMAIL_QUEUE]
            .into_iter()
            .map(|name| QueueConfig {
                name: name.into(),
                concurrency,
            })
            .collect()
    }

    /// `worker` with the shop's job kinds registered.
    pub fn register(&self, worker: Worker) -> Worker {
        worker
            .handle(PAYOUT_KIND, self.handler(Effect::Charge))
            .handle(RECEIPT_KIND, self.handler(Effect::Receipt))
    }

    fn handler(&self, effect: Effect) -> Handler {
        let flows = self.clone();
        Arc::new(move |job| {
            let flows = flows.clone();
            async move { flows.cause(job, effect).await }.boxed()
        })
    }

    /// Causes the job's effect for its order once, then settles: the ledger entry done, the
    /// effect's consequences applied, the job completed — all or nothing, fenced by the job's
    /// claim.
    async fn cause(&self, job: JobRow, effect: Effect) -> Result<Done, JobError> {
        let order = self.order_of(&job).await?;
        let id = order.order_id.as_str();
        let (effect_key, external_key) = effect.keys(id);
        let provider = &self.provider;
        let call = |key| effect.call(provider, &order, key);
        let lookup = |key| effect.lookup(provider, key);
        let (ledger, sabotage) = (&self.ledger, self.sabotage);
        let external_id = crate::sabotage::ledger_once(
            sabotage,
            ledger,
            &job,
            (&effect_key, &external_key),
            call,
            lookup,
        )
        .await?;
        self.ledger
            .settle_with_steps(
                &job,
                &effect_key,
                &external_id,
                |tx| effect.consequences(tx, &order).scope_boxed(),
                |stmt, after| effect.consequence_steps(stmt, &order, after),
            )
            .await
    }

    /// The order a job's `{"order_id": …}` names, as the job carries it or else as the store
    /// has it; a job for no order can never succeed.
    async fn order_of(&self, job: &JobRow) -> Result<PayoutInfo, JobError> {
        let OrderArgs {
            order_id,
            email,
            total_cents,
        } = serde_json::from_str(&job.args)
            .map_err(|e| JobError::fatal(format!("bad args: {e}")))?;
        if let (Some(email), Some(total_cents)) = (email, total_cents) {
            return Ok(PayoutInfo {
                order_id,
                email,
                total_cents,
            });
        }
        self.store
            .read("payout_info", |c| {
                sql::payout_info::<Infallible>(c, &order_id).scope_boxed()
            })
            .await
            .map_err(TxError::into_db)?
            .ok_or_else(|| JobError::fatal(format!("no order {order_id}")))
    }
}

fn client_err(e: ClientError) -> JobError {
    if e.is_rejected() {
        JobError::fatal(format!("provider rejected: {e}"))
    } else {
        JobError::retry(format!("provider: {e}"))
    }
}

/// The shop's two external effects.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Effect {
    /// Charge the order's total.
    Charge,
    /// Send the order's receipt.
    Receipt,
}

impl Effect {
    /// Names its ledger entry (`charge:<order>`) and its provider key (`holdfast-charge-<order>`).
    fn name(self) -> &'static str {
        match self {
            Effect::Charge => "charge",
            Effect::Receipt => "receipt",
        }
    }

    /// [`Effect::job`], carrying the order's address and total.
    pub(crate) fn job_carrying(self, order: &PayoutInfo) -> JobInsert {
        JobInsert {
            args: serde_json::json!({
                "order_id": order.order_id,
                "email": order.email,
                "total_cents": order.total_cents,
            })
            .to_string(),
            ..self.job(&order.order_id)
        }
    }

    /// The order's ledger entry for this effect and the provider's idempotency key for it.
    fn keys(self, order_id: &str) -> (String, String) {
        let name = self.name();
        (
            format!("{name}:{order_id}"),
            format!("holdfast-{name}-{order_id}"),
        )
    }

    /// The job that causes this effect for an order: at most one per order (`payout:<order>`,
    /// `receipt:<order>`), naming its effect, so the claim that hands it out begins it. Its
    /// arguments name the order only; [`Effect::job_carrying`] carries what the job needs.
    pub(crate) fn job(self, order_id: &str) -> JobInsert {
        let (queue, kind, unique) = match self {
            Effect::Charge => (PAYMENTS_QUEUE, PAYOUT_KIND, "payout"),
            Effect::Receipt => (EMAIL_QUEUE, RECEIPT_KIND, "receipt"),
        };
        let (effect_key, external_key) = self.keys(order_id);
        JobInsert::new(
            queue,
            kind,
            serde_json::json!({ "order_id": order_id }).to_string(),
        )
        .unique(format!("{unique}:{order_id}"))
        .effect(effect_key, external_key)
    }

    /// Asks the provider to act under `key`; its id for the effect.
    async fn call(
        self,
        provider: &ProviderClient,
        order: &PayoutInfo,
        key: String,
    ) -> Result<String, JobError> {
        let id = &order.order_id;
        let acted = match self {
            Effect::Charge => provider
                .charge(&key, id, order.total_cents)
                .await
                .map(|c| c.id),
            Effect::Receipt => provider
                .send_email(&key, id, &order.email, "receipt")
                .await
                .map(|e| e.id),
        };
        acted.map_err(client_err)
    }

    /// The provider's id for an effect it already caused under `key`, if any.
    async fn lookup(
        self,
        provider: &ProviderClient,
        key: String,
    ) -> Result<Option<String>, JobError> {
        let found = match self {
            Effect::Charge => provider
                .charges(Some(&key))
                .await
                .map(|cs| cs.into_iter().next().map(|c| c.id)),
            Effect::Receipt => provider
                .emails(Some(&key))
                .await
                .map(|es| es.into_iter().next().map(|e| e.id)),
        };
        found.map_err(client_err)
    }

    /// What follows on our own store, in the settling transaction: a charged order is paid and
    /// gets its receipt job.
    async fn consequences(
        self,
        tx: &mut Tx,
        order: &PayoutInfo,
    ) -> Result<(), TxError<Infallible>> {
        if let Effect::Charge = self {
            sql::order_mark_paid(tx, &order.order_id).await?;
            tx.job_enqueue(&[Effect::Receipt.job_carrying(order)])
                .await?;
        }
        Ok(())
    }

    /// The same consequences as steps of the settling statement (PostgreSQL), once for each
    /// row of the step `after`, and named from it (other jobs' settlements may share the
    /// statement).
    fn consequence_steps(self, stmt: &mut Statement, order: &PayoutInfo, after: &str) {
        if let Effect::Charge = self {
            sql::order_mark_paid_step(stmt, &format!("{after}_paid"), &order.order_id, after);
            stmt.enqueue_jobs(
                &format!("{after}_receipt"),
                &[Effect::Receipt.job_carrying(order)],
                after,
            );
        }
    }
}
