//! `Idempotency-Key` for unsafe requests (draft-ietf-httpapi-idempotency-key-header-07).
//!
//! Two phases over the store. [`begin`] claims the key (scoped to the user) before any work:
//! a finished key replays its stored answer, a key held by a live request is a 409, a key
//! used for a different payload is a 422. The handler then runs its store operation with an
//! `IdemCommit`, which writes the response into the key's row in the same transaction as the
//! effect. [`finish`] turns the outcome into a response; on failure it releases the claim so
//! the client's retry runs afresh.
//!
//! A request that crosses a timeout boundary is covered both ways: if the server committed
//! after the client gave up, the retry replays the answer; if the instance died first, the
//! claim's lock expires and the retry does the work once.

use crate::error::{AppError, AppResult};
use crate::AppState;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use holdfast_core::{IdempotencyKey, RequestFingerprint};
use holdfast_store::{ClaimOutcome, IdemClaim, IdemCommit, StoredResponse};

/// A key this request owns until it commits or releases it.
pub struct Claim {
    pub user_id: String,
    pub key: IdempotencyKey,
    fingerprint: RequestFingerprint,
    token: String,
}

impl Claim {
    pub fn commit<'a, T>(
        &'a self,
        render: &'a (dyn Fn(&T) -> StoredResponse + Sync),
    ) -> IdemCommit<'a, T> {
        IdemCommit {
            user_id: &self.user_id,
            key: &self.key,
            token: &self.token,
            render,
        }
    }
}

pub enum Begin {
    /// Do the work (with the claim, when the request carried a key).
    Run(Option<Claim>),
    /// Answer with this; the work was done before.
    Replay(Response),
}

pub async fn begin(
    state: &AppState,
    user_id: &str,
    key: Option<IdempotencyKey>,
    method: &str,
    path: &str,
    canonical_body: &[u8],
) -> AppResult<Begin> {
    let Some(key) = key else {
        return Ok(Begin::Run(None));
    };
    let fingerprint = RequestFingerprint::of(method, path, canonical_body);
    match claim_key(state, user_id, &key, &fingerprint).await? {
        ClaimOutcome::Claimed { token } => Ok(Begin::Run(Some(Claim {
            user_id: user_id.to_owned(),
            key,
            fingerprint,
            token,
        }))),
        ClaimOutcome::Replay(stored) => Ok(Begin::Replay(respond(stored, true))),
        ClaimOutcome::InFlight => Err(in_flight()),
        ClaimOutcome::Mismatch => Err(AppError::unprocessable(
            "idempotency-key-reused",
            "this Idempotency-Key was already used for a different request",
        )),
    }
}

async fn claim_key(
    state: &AppState,
    user_id: &str,
    key: &IdempotencyKey,
    fingerprint: &RequestFingerprint,
) -> AppResult<ClaimOutcome> {
    Ok(state
        .store
        .idem_claim(IdemClaim {
            user_id,
            key,
            fingerprint,
            now: holdfast_core::now_ms(),
            lock_ttl: state.opts.idempotency_lock_ttl,
        })
        .await?)
}

fn in_flight() -> AppError {
    AppError::conflict(
        "idempotency-key-in-flight",
        "a request with this Idempotency-Key is still being processed",
    )
    .retry_after(1)
}

/// Turns a store outcome into the answer, keeping the claim's promises.
pub async fn finish<T>(
    state: &AppState,
    claim: Option<Claim>,
    outcome: holdfast_store::Result<(T, Option<StoredResponse>)>,
    render: &(dyn Fn(&T) -> StoredResponse + Sync),
) -> AppResult<Response> {
    match (outcome, claim) {
        (Ok((_, Some(stored))), _) => Ok(respond(stored, false)),
        (Ok((value, None)), _) => Ok(respond(render(&value), false)),
        (Err(holdfast_store::Error::IdempotencyLockLost), Some(c)) => {
            // Either an earlier try of our own transaction committed (its ack was lost), or a
            // newer claimant took over. Look again rather than guess.
            match claim_key(state, &c.user_id, &c.key, &c.fingerprint).await? {
                ClaimOutcome::Replay(stored) => Ok(respond(stored, true)),
                _ => Err(in_flight()),
            }
        }
        (Err(e), claim) => {
            if let Some(c) = claim {
                if let Err(release) = state.store.idem_release(&c.user_id, &c.key, &c.token).await {
                    // The lock expires on its own; the retry waits for it, nothing is lost.
                    tracing::warn!(error = %release, "could not release an idempotency key");
                }
            }
            Err(e.into())
        }
    }
}

pub fn respond(stored: StoredResponse, replayed: bool) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let mut resp = (status, stored.body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if replayed {
        h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    resp
}

/// A value rendered the way it is stored for replay.
pub fn json_response<T: serde::Serialize>(status: StatusCode, value: &T) -> StoredResponse {
    StoredResponse {
        status: status.as_u16(),
        body: serde_json::to_vec(value).unwrap_or_default(),
    }
}
