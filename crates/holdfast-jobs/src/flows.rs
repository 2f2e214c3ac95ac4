//! The shop's jobs, made exactly-once in effect by the effect ledger.
//!
//! A job is delivered at least once: a worker can die after charging and before recording
//! it, or the provider can act and then time out. So every external effect goes through the
//! same steps, keyed by the effect (`charge:<order>`, `receipt:<order>`):
//!
//! 1. `ledger_begin` records the intent with a *deterministic* idempotency key for the
//!    dependency. A later attempt finds the entry and reuses its key.
//! 2. If the ledger says `done`, only the settlement is (re)applied — no call.
//! 3. If an earlier attempt left it `pending` (outcome unknown), reconcile: ask the
//!    dependency whether it already acted under that key.
//! 4. Otherwise call the dependency with the key; it deduplicates a retry of a call that
//!    acted but whose answer was lost.
//! 5. `effect_settle` marks the entry done, applies our own consequences (order paid, the
//!    receipt job) and completes the job — one transaction, fenced by the attempt.

use crate::{Done, Handler, JobError};
use futures::FutureExt;
use holdfast_provider::{ClientError, ProviderClient};
use holdfast_store::{EffectSettle, JobInsert, JobRow, LedgerEntry, PayoutInfo, Store};
use serde::Deserialize;
use std::sync::Arc;

pub const EMAIL_QUEUE: &str = "email";
pub const RECEIPT_KIND: &str = "receipt_email";

#[derive(Deserialize)]
struct OrderArgs {
    order_id: String,
}

/// The dependencies of the shop's flows.
#[derive(Clone)]
pub struct Flows {
    pub store: Store,
    pub provider: ProviderClient,
    /// Test-only sabotage: skip the ledger and send a fresh idempotency key on every
    /// attempt, so the drill and the tests can prove they detect duplicate effects.
    pub bypass_ledger: bool,
}

impl Flows {
    pub fn payout_handler(&self) -> Handler {
        let flows = self.clone();
        Arc::new(move |job| {
            let flows = flows.clone();
            async move { flows.payout(job).await }.boxed()
        })
    }

    pub fn receipt_handler(&self) -> Handler {
        let flows = self.clone();
        Arc::new(move |job| {
            let flows = flows.clone();
            async move { flows.receipt(job).await }.boxed()
        })
    }

    /// Charges the order's total once, marks it paid and enqueues its receipt.
    async fn payout(&self, job: JobRow) -> Result<Done, JobError> {
        let order = self.order_of(&job).await?;
        let order_id = order.order_id.clone();
        let effect_key = format!("charge:{order_id}");
        let receipt = JobInsert::new(
            EMAIL_QUEUE,
            RECEIPT_KIND,
            serde_json::json!({ "order_id": order_id }).to_string(),
        )
        .unique(format!("receipt:{order_id}"));
        let charge_id = self
            .once(
                &effect_key,
                &format!("holdfast-charge-{order_id}"),
                |key| {
                    let (provider, order_id) = (self.provider.clone(), order_id.clone());
                    async move {
                        provider
                            .charge(&key, &order_id, order.total_cents)
                            .await
                            .map(|c| c.id)
                    }
                },
                |key| {
                    let provider = self.provider.clone();
                    async move {
                        provider
                            .charges(Some(&key))
                            .await
                            .map(|cs| cs.into_iter().next().map(|c| c.id))
                    }
                },
            )
            .await?;
        self.settle(&EffectSettle {
            job: job.fence(),
            effect_key: &effect_key,
            external_id: &charge_id,
            order_paid: Some(&order_id),
            then: Some(receipt),
        })
        .await
    }

    /// Sends the order's receipt once.
    async fn receipt(&self, job: JobRow) -> Result<Done, JobError> {
        let order = self.order_of(&job).await?;
        let order_id = order.order_id.clone();
        let effect_key = format!("receipt:{order_id}");
        let email_id = self
            .once(
                &effect_key,
                &format!("holdfast-receipt-{order_id}"),
                |key| {
                    let (provider, order_id, to) =
                        (self.provider.clone(), order_id.clone(), order.email.clone());
                    async move {
                        provider
                            .send_email(&key, &order_id, &to, "receipt")
                            .await
                            .map(|e| e.id)
                    }
                },
                |key| {
                    let provider = self.provider.clone();
                    async move {
                        provider
                            .emails(Some(&key))
                            .await
                            .map(|es| es.into_iter().next().map(|e| e.id))
                    }
                },
            )
            .await?;
        self.settle(&EffectSettle {
            job: job.fence(),
            effect_key: &effect_key,
            external_id: &email_id,
            order_paid: None,
            then: None,
        })
        .await
    }

    /// Steps 1–4 of the module docs: the dependency's id for the effect, causing it at most
    /// once per ledger entry.
    async fn once<C, CF, L, LF>(
        &self,
        effect_key: &str,
        external_key: &str,
        call: C,
        lookup: L,
    ) -> Result<String, JobError>
    where
        C: FnOnce(String) -> CF,
        CF: std::future::Future<Output = Result<String, ClientError>>,
        L: FnOnce(String) -> LF,
        LF: std::future::Future<Output = Result<Option<String>, ClientError>>,
    {
        if self.bypass_ledger {
            return call(format!("{external_key}-{}", uuid::Uuid::new_v4().simple()))
                .await
                .map_err(client_err);
        }
        let (
            LedgerEntry {
                state,
                external_key: key,
                external_id,
                ..
            },
            fresh,
        ) = self
            .store
            .ledger_begin(effect_key, external_key)
            .await
            .map_err(store_err)?;
        if let (true, Some(id)) = (state == "done", external_id) {
            return Ok(id);
        }
        // Left `pending` by an earlier attempt: the outcome may be unknown, so ask first.
        if !fresh {
            if let Some(id) = lookup(key.clone()).await.map_err(client_err)? {
                metrics::counter!("holdfast_effects_reconciled_total").increment(1);
                return Ok(id);
            }
        }
        call(key).await.map_err(client_err)
    }

    /// The order a job's `{"order_id": …}` names; a job for no order can never succeed.
    async fn order_of(&self, job: &JobRow) -> Result<PayoutInfo, JobError> {
        let OrderArgs { order_id } = serde_json::from_str(&job.args)
            .map_err(|e| JobError::fatal(format!("bad args: {e}")))?;
        self.store
            .order_payout_info(&order_id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| JobError::fatal(format!("no order {order_id}")))
    }

    async fn settle(&self, s: &EffectSettle<'_>) -> Result<Done, JobError> {
        match self.store.effect_settle(s).await {
            Ok(()) => Ok(Done::Settled),
            // A newer attempt owns the job now and will settle the same effect.
            Err(holdfast_store::Error::JobLost) => Ok(Done::Settled),
            Err(e) => Err(store_err(e)),
        }
    }
}

fn store_err(e: holdfast_store::Error) -> JobError {
    JobError::retry(format!("store: {e}"))
}

fn client_err(e: ClientError) -> JobError {
    if e.is_rejected() {
        JobError::fatal(format!("provider rejected: {e}"))
    } else {
        JobError::retry(format!("provider: {e}"))
    }
}
