//! Idempotency keys. A request *claims* its key ([`Tx::idem_claim`]), which tells it to do the
//! work, to replay a stored answer, that the key is busy, or that the key was used for a
//! different request, and ends the work with [`Tx::idem_finish`]: the answer is stored in the
//! key's row in the same commit as the effect, so an effect exists if and only if its answer
//! was kept for replay. The claim is normally the first statement of the work's own
//! transaction, so a concurrent request with the same key waits for that transaction and a
//! request that dies leaves nothing behind. A claim may also be committed on its own
//! ([`Store::idem_claim`]); then its lock is a lease, and the claim's token fences a claimant
//! whose lease expired: its finish matches no row, and its transaction rolls back.
//!
//! Keys are scoped (per user, per API client: the caller decides), and the store never looks
//! inside a stored answer.

use crate::accounts::ms;
use crate::{Error, Pooled, Rerun, Result, Store, Tx, TxError};
use holdfast_core::{IdempotencyKey, RequestFingerprint};
use scoped_futures::ScopedFutureExt;
use sqlx::Row;
use std::convert::Infallible;
use std::time::Duration;

/// A response kept for replay: status and body bytes, opaque to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Phase one of an idempotent request: claim the key before doing the work.
#[derive(Debug, Clone, Copy)]
pub struct IdemClaim<'a> {
    /// Whose key it is: the same key from two scopes names two requests.
    pub scope: &'a str,
    pub key: &'a IdempotencyKey,
    pub fingerprint: &'a RequestFingerprint,
    pub now: i64,
    /// How long the claim excludes others. A claimant that dies (SIGKILL) frees the key after
    /// this; one that merely stalls past it is fenced out by its token at commit.
    pub lock_ttl: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// This request owns the key; do the work and finish with this token.
    Claimed { token: String },
    /// The work was done before: answer with this.
    Replay(StoredResponse),
    /// Another request with this key is being processed right now.
    InFlight,
    /// The key was used for a different request.
    Mismatch,
}

/// A claimed key, as phase two names it.
#[derive(Debug, Clone, Copy)]
pub struct IdemLock<'a> {
    pub scope: &'a str,
    pub key: &'a IdempotencyKey,
    pub token: &'a str,
}

/// A fencing token: it only has to differ between claims of one key.
fn new_token() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl Tx {
    /// Claims `c.key` inside this transaction (see the module docs): the work that follows in
    /// the same transaction commits with the claim, and a concurrent request with the key
    /// waits for that commit. (Committed on its own, the claim makes a concurrent request get
    /// `InFlight` until its lease lapses.)
    pub async fn idem_claim(&mut self, c: IdemClaim<'_>) -> Result<ClaimOutcome> {
        let token = new_token();
        let locked_until = c.now.saturating_add(ms(c.lock_ttl));
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys (user_id, idem_key, fingerprint, state, lock_token, locked_until, created_at)
             VALUES ($1, $2, $3, 'in_flight', $4, $5, $6) ON CONFLICT (user_id, idem_key) DO NOTHING",
        )
        .bind(c.scope)
        .bind(c.key.as_str())
        .bind(c.fingerprint.as_str())
        .bind(&token)
        .bind(locked_until)
        .bind(c.now)
        .execute(self.conn())
        .await?
        .rows_affected();
        if inserted == 1 {
            return Ok(ClaimOutcome::Claimed { token });
        }
        let for_update = match self.backend() {
            crate::Backend::Sqlite => "",
            crate::Backend::Postgres => " FOR UPDATE",
        };
        let row = sqlx::query(&format!(
            "SELECT fingerprint, state, locked_until, response_status, response_body FROM idempotency_keys
             WHERE user_id = $1 AND idem_key = $2{for_update}"
        ))
        .bind(c.scope)
        .bind(c.key.as_str())
        .fetch_optional(self.conn())
        .await?;
        // Released between our insert and our read: whoever released it is done with it.
        let Some(r) = row else {
            return Ok(ClaimOutcome::InFlight);
        };
        let fingerprint: String = r.try_get("fingerprint")?;
        let state: String = r.try_get("state")?;
        let until: i64 = r.try_get("locked_until")?;
        if fingerprint != c.fingerprint.as_str() {
            return Ok(ClaimOutcome::Mismatch);
        }
        if state == "done" {
            let status: Option<i64> = r.try_get("response_status")?;
            let body: Option<Vec<u8>> = r.try_get("response_body")?;
            return Ok(ClaimOutcome::Replay(StoredResponse {
                status: status.and_then(|s| u16::try_from(s).ok()).unwrap_or(200),
                body: body.unwrap_or_default(),
            }));
        }
        if until > c.now {
            return Ok(ClaimOutcome::InFlight);
        }
        // The previous claimant's lock expired (it died or stalled): take over with a new
        // token, which fences the old one out.
        sqlx::query("UPDATE idempotency_keys SET lock_token = $3, locked_until = $4 WHERE user_id = $1 AND idem_key = $2")
            .bind(c.scope)
            .bind(c.key.as_str())
            .bind(&token)
            .bind(locked_until)
            .execute(self.conn())
            .await?;
        Ok(ClaimOutcome::Claimed { token })
    }

    /// Marks the claimed key done with its answer, inside the effect's transaction. When the
    /// claim is gone (fenced by a newer claimant, or an earlier try of this very transaction
    /// committed) it fails with [`Error::IdempotencyLockLost`], and the caller must not report
    /// success from this attempt: it should claim again to learn what happened.
    pub async fn idem_finish(&mut self, lock: IdemLock<'_>, answer: &StoredResponse) -> Result<()> {
        let updated = sqlx::query(
            "UPDATE idempotency_keys SET state = 'done', response_status = $4, response_body = $5, lock_token = NULL
             WHERE user_id = $1 AND idem_key = $2 AND lock_token = $3 AND state = 'in_flight'",
        )
        .bind(lock.scope)
        .bind(lock.key.as_str())
        .bind(lock.token)
        .bind(i64::from(answer.status))
        .bind(&answer.body)
        .execute(self.conn())
        .await?;
        crate::one_row(&updated, Error::IdempotencyLockLost)
    }
}

impl Store {
    /// Phase one as its own transaction (see [`Tx::idem_claim`]).
    pub async fn idem_claim(&self, c: IdemClaim<'_>) -> Result<ClaimOutcome> {
        self.transaction("idem_claim", Rerun::Always, |tx| {
            async move { Ok(tx.idem_claim(c).await?) }.scope_boxed()
        })
        .await
        .map_err(TxError::<Infallible>::into_db)
    }

    /// Gives a claimed key back without an answer (the request failed on a client error or
    /// the store was unavailable), so a retry with the same key runs afresh.
    pub async fn idem_release(&self, lock: IdemLock<'_>) -> Result<()> {
        self.run(Rerun::Always, "idem_release", || async {
            sqlx::query("DELETE FROM idempotency_keys WHERE user_id = $1 AND idem_key = $2 AND lock_token = $3 AND state = 'in_flight'")
                .bind(lock.scope)
                .bind(lock.key.as_str())
                .bind(lock.token)
                .execute_pooled(self)
                .await?;
            Ok(())
        })
        .await
    }

    /// Deletes keys created before `now - retention` whose answer is stored or whose claim
    /// lapsed; returns how many.
    pub async fn idem_reap(&self, now: i64, retention: Duration) -> Result<u64> {
        self.run(Rerun::Always, "idem_reap", || async {
            Ok(sqlx::query("DELETE FROM idempotency_keys WHERE created_at <= $1 AND (state = 'done' OR locked_until <= $2)")
                .bind(now.saturating_sub(ms(retention)))
                .bind(now)
                .execute_pooled(self)
                .await?
                .rows_affected())
        })
        .await
    }
}
