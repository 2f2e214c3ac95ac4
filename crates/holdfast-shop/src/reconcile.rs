//! After a restore, the payment provider knows charges the restored store does not: the
//! orders committed after the backup's last transaction are gone, but their payouts may have
//! charged the customer. [`reconcile`] walks the provider's charges made under the shop's
//! keys (`holdfast-charge-<order>`) and, for each, finds its order: present, it is linked —
//! its payout job replays the same key, so the provider answers with the same charge and
//! nobody is charged again; absent, the charge is an orphan and is refunded, under the key
//! `holdfast-refund-<charge>`, so running it twice (or after a crash) refunds once.
//!
//! A charge exists only after its order committed, so an order missing now was lost with the
//! restore. It comes back only if the store is restored again to a later moment; then its
//! charge was given back, and [`Reconciled::present_but_refunded`] names it for the operator
//! (the order stays as it is: whether to charge again is a person's call).

use std::collections::HashSet;
use std::convert::Infallible;

use holdfast_provider::ProviderClient;
use holdfast_store::{ScopedFutureExt, Store, TxError};
use serde::Serialize;

use crate::sql;

/// Why a reconciliation stopped; what it did so far stands (it is idempotent: run it again).
#[derive(Debug, thiserror::Error)]
#[error("reconciling with the provider: {0}")]
pub struct ReconcileError(String);

/// The provider key prefix of the shop's charges (see `flows.rs`).
const CHARGE_KEY_PREFIX: &str = "holdfast-charge-";

/// What one reconciliation found and did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Reconciled {
    /// The shop's charges the provider holds.
    pub charges: usize,
    /// Orders present in the store whose charge the provider holds.
    pub linked: usize,
    /// Charges whose order the store does not have, refunded by this run.
    pub refunded: Vec<RefundedOrphan>,
    /// Charges whose order the store does not have that were refunded before this run.
    pub already_refunded: usize,
    /// Orders the store has whose charge was refunded (lost by one restore, brought back by
    /// a later one): paid orders whose money was given back.
    pub present_but_refunded: Vec<String>,
}

/// A charge for an order the restore lost, and its refund.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RefundedOrphan {
    pub order_id: String,
    pub charge_id: String,
    pub refund_id: String,
    pub amount_cents: i64,
}

/// Matches the provider's charges to the store's orders and refunds each orphan, once.
pub async fn reconcile(
    store: &Store,
    provider: &ProviderClient,
) -> Result<Reconciled, ReconcileError> {
    let provider_failed =
        |e: holdfast_provider::ClientError| ReconcileError(format!("the provider: {e}"));
    let charges = provider.charges(None).await.map_err(provider_failed)?;
    let refunded: HashSet<String> = provider
        .refunds(None)
        .await
        .map_err(provider_failed)?
        .into_iter()
        .map(|r| r.charge_id)
        .collect();
    let mut out = Reconciled::default();
    for charge in charges
        .into_iter()
        .filter(|c| c.idempotency_key.starts_with(CHARGE_KEY_PREFIX))
    {
        out.charges += 1;
        let order_id = charge.order_id.clone();
        let present = store
            .read("reconcile_order", |c| {
                sql::payout_info::<Infallible>(c, &order_id).scope_boxed()
            })
            .await
            .map_err(|e| ReconcileError(format!("the store: {}", TxError::into_db(e))))?
            .is_some();
        if present && refunded.contains(&charge.id) {
            tracing::warn!(order = %charge.order_id, charge = %charge.id, "an order whose charge was refunded is back");
            out.present_but_refunded.push(charge.order_id);
            continue;
        }
        if present {
            out.linked += 1;
            continue;
        }
        if refunded.contains(&charge.id) {
            out.already_refunded += 1;
            continue;
        }
        // A crash between the refund and this line is safe: the key makes a rerun's refund
        // the same one.
        let key = format!("holdfast-refund-{}", charge.id);
        let refund = provider
            .refund(&key, &charge.id)
            .await
            .map_err(provider_failed)?;
        tracing::warn!(
            order = %charge.order_id,
            charge = %charge.id,
            refund = %refund.id,
            "refunded a charge for an order the restore lost"
        );
        out.refunded.push(RefundedOrphan {
            order_id: charge.order_id,
            charge_id: charge.id,
            refund_id: refund.id,
            amount_cents: refund.amount_cents,
        });
    }
    Ok(out)
}
