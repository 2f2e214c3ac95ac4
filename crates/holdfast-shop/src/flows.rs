//! The shop's jobs: charge an order, then send its receipt, each exactly once in effect.
//!
//! A checkout enqueues the order's `payout` job in its own transaction. The payout charges the
//! order's total at the provider through the effect ledger (`holdfast_jobs::Ledger`: a
//! deterministic idempotency key per order, recorded before the call, reconciled after an
//! unknown outcome), then settles in one transaction fenced by the job's claim: ledger entry
//! done, order paid, receipt job enqueued, job completed. The receipt does the same with the
//! mail sink. A worker killed anywhere in between loses its lease; the next attempt reuses the
//! ledger's key, so the provider deduplicates, and a stale attempt's settlement is refused.

use crate::sql::{self, PayoutInfo};
use crate::{EMAIL_QUEUE, PAYMENTS_QUEUE, PAYOUT_KIND, RECEIPT_KIND};
use futures::FutureExt;
use holdfast_core::Sabotage;
use holdfast_jobs::{Done, Handler, JobError, Ledger, QueueConfig, Worker};
use holdfast_provider::{ClientError, ProviderClient};
use holdfast_store::{JobInsert, JobRow, ScopedFutureExt, Store, TxError};
use serde::Deserialize;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

#[derive(Deserialize)]
struct OrderArgs {
    order_id: String,
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
            .handle(
                PAYOUT_KIND,
                self.handler(|f, job| async move { f.payout(job).await }),
            )
            .handle(
                RECEIPT_KIND,
                self.handler(|f, job| async move { f.receipt(job).await }),
            )
    }

    fn handler<F, Fut>(&self, run: F) -> Handler
    where
        F: Fn(Flows, JobRow) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Done, JobError>> + Send + 'static,
    {
        let flows = self.clone();
        Arc::new(move |job| run(flows.clone(), job).boxed())
    }

    /// Charges the order's total once, marks it paid and enqueues its receipt.
    async fn payout(&self, job: JobRow) -> Result<Done, JobError> {
        let order = self.order_of(&job).await?;
        let order_id = order.order_id.as_str();
        let effect_key = format!("charge:{order_id}");
        let charge_id = self
            .once(
                &effect_key,
                &format!("holdfast-charge-{order_id}"),
                |key| async move {
                    self.provider
                        .charge(&key, order_id, order.total_cents)
                        .await
                        .map(|c| c.id)
                        .map_err(client_err)
                },
                |key| async move {
                    self.provider
                        .charges(Some(&key))
                        .await
                        .map(|cs| cs.into_iter().next().map(|c| c.id))
                        .map_err(client_err)
                },
            )
            .await?;
        let receipt = JobInsert::new(
            EMAIL_QUEUE,
            RECEIPT_KIND,
            serde_json::json!({ "order_id": order_id }).to_string(),
        )
        .unique(format!("receipt:{order_id}"));
        self.ledger
            .settle(job.fence(), &effect_key, &charge_id, |tx| {
                async {
                    sql::order_mark_paid(tx, order_id).await?;
                    tx.job_enqueue(std::slice::from_ref(&receipt)).await?;
                    Ok::<_, TxError<Infallible>>(())
                }
                .scope_boxed()
            })
            .await
    }

    /// Sends the order's receipt once.
    async fn receipt(&self, job: JobRow) -> Result<Done, JobError> {
        let order = self.order_of(&job).await?;
        let order_id = order.order_id.as_str();
        let effect_key = format!("receipt:{order_id}");
        let email_id = self
            .once(
                &effect_key,
                &format!("holdfast-receipt-{order_id}"),
                |key| async move {
                    self.provider
                        .send_email(&key, order_id, &order.email, "receipt")
                        .await
                        .map(|e| e.id)
                        .map_err(client_err)
                },
                |key| async move {
                    self.provider
                        .emails(Some(&key))
                        .await
                        .map(|es| es.into_iter().next().map(|e| e.id))
                        .map_err(client_err)
                },
            )
            .await?;
        self.ledger
            .settle(job.fence(), &effect_key, &email_id, |_| {
                async { Ok(()) }.scope_boxed()
            })
            .await
    }

    /// The ledger's steps 1–4 (unless the ledger-bypass sabotage is on).
    async fn once<C, CF, L, LF>(
        &self,
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
        if self.sabotage == Some(Sabotage::LedgerBypass) {
            return crate::sabotage::call_without_ledger(external_key, call).await;
        }
        self.ledger
            .once(effect_key, external_key, call, lookup)
            .await
    }

    /// The order a job's `{"order_id": …}` names; a job for no order can never succeed.
    async fn order_of(&self, job: &JobRow) -> Result<PayoutInfo, JobError> {
        let OrderArgs { order_id } = serde_json::from_str(&job.args)
            .map_err(|e| JobError::fatal(format!("bad args: {e}")))?;
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
