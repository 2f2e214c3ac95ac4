//! `Idempotency-Key` for unsafe requests (draft-ietf-httpapi-idempotency-key-header-07), as
//! one extractor a handler opts into.
//!
//! [`Idempotent`] parses the request body at the boundary (its [`FromBody`] type), then claims
//! the key — scoped to the session's user — before the handler runs: a finished key replays its
//! stored answer without reaching the handler, a key held by a live request is a 409, a key
//! used for a different payload is a 422. The handler then hands its transaction to
//! [`Claim::run`], which stores the rendered answer in the key's row in the same commit as the
//! effect, and on failure releases the claim so the client's retry runs afresh.
//!
//! On Postgres the claim is not a commit of its own: [`Claim::run`] inserts the key's row as
//! the first statement of the effect's transaction, so the key, the effect and the stored
//! answer are one durable commit. A concurrent request with the same key waits on that row
//! (the unique index) and then replays what committed — or, if the first rolled back, does
//! the work itself; a request that dies mid-way leaves no claim to wait out. A handler whose
//! work fits one SQL statement goes further with [`Claim::in_one_statement`]: the key is
//! stored done, with the answer the database renders, by that very statement — one round
//! trip and one commit — and anything but the happy path falls back to [`Claim::run`]. SQLite, whose
//! single writer would serialize every keyed request behind the whole of another's work,
//! keeps the claim as a short commit of its own, described next.
//!
//! A request that crosses a timeout boundary is covered both ways: if the server committed
//! after the client gave up, the retry replays the answer; if the instance died first, the
//! claim's lock expires and the retry does the work once. The lock is a short lease
//! (`idempotency_lock_ttl`, 1 s by default) that the holder renews while it works, so a dead
//! holder's key frees up within a second, while a holder that is merely slow keeps it; one
//! that stalls past its lease (a paused process) is fenced out by its token at commit.
//!
//! ```no_run
//! use axum::http::StatusCode;
//! use axum::response::Response;
//! use holdfast_store::{ScopedFutureExt, TxError};
//! use holdfast_web::{json_response, AppResult, Authed, Idempotent, JsonBody, Required};
//!
//! #[derive(serde::Deserialize)]
//! struct Input {
//!     text: String,
//! }
//!
//! async fn create(
//!     user: Authed,
//!     Idempotent { body: JsonBody(input), claim, .. }: Idempotent<JsonBody<Input>, Required>,
//! ) -> AppResult<Response> {
//!     claim
//!         .run(
//!             "note_create",
//!             |tx| {
//!                 async {
//!                     sqlx::query("INSERT INTO notes (owner, text) VALUES ($1, $2)")
//!                         .bind(&user.user_id)
//!                         .bind(&input.text)
//!                         .execute(tx.conn())
//!                         .await?;
//!                     Ok::<_, TxError<std::convert::Infallible>>(input.text.clone())
//!                 }
//!                 .scope_boxed()
//!             },
//!             |text| json_response(StatusCode::CREATED, text),
//!         )
//!         .await
//! }
//! ```

use crate::body::{idempotency_key, FromBody, RawBody};
use crate::error::{AppError, AppResult};
use crate::session::Authed;
use crate::AppState;
use axum::extract::{FromRef, FromRequest, FromRequestParts, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use holdfast_core::{IdempotencyKey, RequestFingerprint};
use holdfast_store::{
    ClaimOutcome, IdemClaim, IdemLock, Rerun, ScopedFutureExt, Statement, StoredResponse, Tx,
    TxBody, TxError,
};
use std::marker::PhantomData;

/// The key may be absent (the request then runs without replay protection).
pub struct Optional;
/// The key must be present: a request without one is a 400 (for requests a client must be
/// able to retry blindly, like a payment).
pub struct Required;

/// Whether a route requires the key.
pub trait KeyRule {
    const REQUIRED: bool;
}
impl KeyRule for Optional {
    const REQUIRED: bool = false;
}
impl KeyRule for Required {
    const REQUIRED: bool = true;
}

/// An unsafe request's parsed body and the claim on its `Idempotency-Key` (see the module
/// docs). Its rejection is the answer: a replay, a 409, a 422, or the body's own error.
pub struct Idempotent<B, K = Optional> {
    pub body: B,
    pub claim: Claim,
    pub rule: PhantomData<K>,
}

/// A claimed key (or none, when the request carried none), to be spent by [`Claim::run`].
/// Dropped unspent (the handler failed before running), it gives the key back.
pub struct Claim {
    edge: AppState,
    scope: String,
    held: Option<Held>,
    /// On Postgres the key is claimed inside the effect's own transaction instead (see
    /// [`Claim::run`]): one commit, and nothing to give back if the handler never runs.
    deferred: Option<(IdempotencyKey, RequestFingerprint)>,
}

struct Held {
    key: IdempotencyKey,
    fingerprint: RequestFingerprint,
    token: String,
    /// Keeps the lease alive while the request works; stops when dropped.
    _renewal: Renewal,
}

/// The task renewing a claim's lease; aborted on drop.
struct Renewal(tokio::task::JoinHandle<()>);

impl Drop for Renewal {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Renewal {
    /// Renews the lease every third of its length until the claim is no longer ours.
    fn start(edge: &AppState, scope: &str, key: &IdempotencyKey, token: &str) -> Self {
        let (store, ttl) = (edge.store.clone(), edge.opts.idempotency_lock_ttl);
        let (scope, key, token) = (scope.to_owned(), key.clone(), token.to_owned());
        Self(tokio::spawn(async move {
            let mut tick = tokio::time::interval(ttl / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let lock = IdemLock {
                    scope: &scope,
                    key: &key,
                    token: &token,
                };
                match store.idem_renew(lock, holdfast_core::now_ms(), ttl).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    // The next tick tries again; if the store stays away the lease lapses,
                    // which the token fences.
                    Err(e) => tracing::warn!(error = %e, "could not renew an idempotency lease"),
                }
            }
        }))
    }
}

impl Held {
    fn lock<'a>(&'a self, scope: &'a str) -> IdemLock<'a> {
        IdemLock {
            scope,
            key: &self.key,
            token: &self.token,
        }
    }
}

impl<S, B, K> FromRequest<S> for Idempotent<B, K>
where
    S: Send + Sync,
    AppState: FromRef<S>,
    B: FromBody + Send,
    K: KeyRule,
{
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Response> {
        let edge = AppState::from_ref(state);
        let (mut parts, body) = req.into_parts();
        let user = Authed::from_request_parts(&mut parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let key = idempotency_key(&parts.headers).map_err(IntoResponse::into_response)?;
        if K::REQUIRED && key.is_none() {
            return Err(AppError::bad_request(
                "idempotency-key-missing",
                "this request requires an Idempotency-Key header",
            )
            .into_response());
        }
        let (headers, method, path) = (
            parts.headers.clone(),
            parts.method.clone(),
            parts.uri.path().to_owned(),
        );
        let RawBody(bytes) = RawBody::from_request(Request::from_parts(parts, body), state)
            .await
            .map_err(IntoResponse::into_response)?;
        let (body, canonical) =
            B::from_body(&headers, &bytes).map_err(IntoResponse::into_response)?;
        let mut claim = Claim {
            edge,
            scope: user.user_id,
            held: None,
            deferred: None,
        };
        if let Some(key) = key {
            let fingerprint = RequestFingerprint::of(method.as_str(), &path, &canonical);
            if claim.edge.store.backend() == holdfast_store::Backend::Postgres {
                claim.deferred = Some((key, fingerprint));
                return Ok(Idempotent {
                    body,
                    claim,
                    rule: PhantomData,
                });
            }
            match claim.claim(&key, &fingerprint).await? {
                ClaimOutcome::Claimed { token } => {
                    claim.held = Some(Held {
                        _renewal: Renewal::start(&claim.edge, &claim.scope, &key, &token),
                        key,
                        fingerprint,
                        token,
                    })
                }
                ClaimOutcome::Replay(stored) => return Err(respond(stored, true)),
                ClaimOutcome::InFlight => return Err(in_flight().into_response()),
                ClaimOutcome::Mismatch => return Err(reused().into_response()),
            }
        }
        Ok(Idempotent {
            body,
            claim,
            rule: PhantomData,
        })
    }
}

impl Claim {
    /// The request's key, if it carried one.
    pub fn key(&self) -> Option<&IdempotencyKey> {
        self.held
            .as_ref()
            .map(|h| &h.key)
            .or(self.deferred.as_ref().map(|(k, _)| k))
    }

    async fn claim(
        &self,
        key: &IdempotencyKey,
        fingerprint: &RequestFingerprint,
    ) -> Result<ClaimOutcome, Response> {
        self.edge
            .store
            .idem_claim(IdemClaim {
                scope: &self.scope,
                key,
                fingerprint,
                now: holdfast_core::now_ms(),
                lock_ttl: self.edge.opts.idempotency_lock_ttl,
            })
            .await
            .map_err(|e| AppError::from(e).into_response())
    }

    /// Runs `body` in one store transaction named `op` and answers with `render` of its
    /// value. With a key, the rendered answer is stored in the key's row in the same commit
    /// (so a retry replays it), and a failure gives the key back; without one, the transaction
    /// is a plain write, re-run only when nothing can have committed.
    pub async fn run<'a, T, E, F, R>(
        mut self,
        op: &'static str,
        body: F,
        render: R,
    ) -> AppResult<Response>
    where
        F: for<'t> Fn(&'t mut Tx) -> TxBody<'a, 't, T, E> + Sync + 'a,
        R: Fn(&T) -> StoredResponse + Sync + 'a,
        T: Send + 'a,
        E: Send + 'a,
        AppError: From<E>,
    {
        let store = self.edge.store.clone();
        let (body, render) = (&body, &render);
        if let Some((key, fingerprint)) = self.deferred.take() {
            return self
                .run_claiming(op, (&key, &fingerprint), body, render)
                .await;
        }
        let Some(held) = self.held.take() else {
            let value = store
                .transaction(op, Rerun::IfUncommitted, move |tx| {
                    async move { body(tx).await }.scope_boxed()
                })
                .await?;
            return Ok(respond(render(&value), false));
        };
        let lock = held.lock(&self.scope);
        let outcome = store
            .transaction(op, Rerun::Always, move |tx| {
                async move {
                    let value = body(tx).await?;
                    let answer = render(&value);
                    tx.idem_finish(lock, &answer).await?;
                    Ok(answer)
                }
                .scope_boxed()
            })
            .await;
        match outcome {
            Ok(answer) => Ok(respond(answer, false)),
            Err(TxError::Db(holdfast_store::Error::IdempotencyLockLost)) => {
                // Either an earlier try of our own transaction committed (its ack was lost), or
                // a newer claimant took over. Look again rather than guess.
                match self.claim(&held.key, &held.fingerprint).await {
                    Ok(ClaimOutcome::Replay(stored)) => Ok(respond(stored, true)),
                    Ok(_) => Err(in_flight()),
                    Err(resp) => Ok(resp),
                }
            }
            Err(e) => {
                if let Err(release) = store.idem_release(lock).await {
                    // The lock expires on its own; the retry waits for it, nothing is lost.
                    tracing::warn!(error = %release, "could not release an idempotency key");
                }
                Err(e.into())
            }
        }
    }
}

/// What [`Claim::in_one_statement`] did.
pub enum OneStatement {
    /// The statement did the work and stored the key with this answer.
    Answered(Response),
    /// It did not run, or stored nothing (the key was used before, or the work wrote
    /// nothing): hand the claim to [`Claim::run`], whose transaction tells which.
    NotAnswered(Box<Claim>),
}

impl Claim {
    /// A keyed request in one round trip and one commit (PostgreSQL): `build` adds the
    /// work's steps to a [`Statement`] and the key's step with [`Statement::claim_key`] and
    /// the [`IdemClaim`] it is handed, gating the work on that step, and returns the key
    /// step's name, or `None` when this request cannot be one statement. Without a key, or on
    /// SQLite, nothing runs. The happy path's answer is the one the statement stored; every
    /// other outcome (a replay, a key in use or reused, work that refused) costs the general
    /// path's transaction after it.
    pub async fn in_one_statement<B>(self, op: &'static str, build: B) -> AppResult<OneStatement>
    where
        B: FnOnce(&mut Statement, IdemClaim<'_>) -> Option<String>,
    {
        let Some((key, fingerprint)) = self.deferred.as_ref() else {
            return Ok(OneStatement::NotAnswered(Box::new(self)));
        };
        let mut stmt = Statement::new();
        let claim = IdemClaim {
            scope: &self.scope,
            key,
            fingerprint,
            now: holdfast_core::now_ms(),
            lock_ttl: self.edge.opts.idempotency_lock_ttl,
        };
        let Some(key_step) = build(&mut stmt, claim) else {
            return Ok(OneStatement::NotAnswered(Box::new(self)));
        };
        match self
            .edge
            .store
            .run_keyed_statement(op, &stmt, &key_step)
            .await?
        {
            Some(answer) => Ok(OneStatement::Answered(respond(answer, false))),
            None => Ok(OneStatement::NotAnswered(Box::new(self))),
        }
    }
}

/// How a transaction that claims its own key ended early (see [`Claim::run_claiming`]).
enum Ended<E> {
    Body(E),
    Replay(StoredResponse),
    InFlight,
    Mismatch,
}

impl Claim {
    /// [`Claim::run`] with the claim inside the effect's transaction (Postgres): the key's row
    /// is inserted first, so a concurrent request with the same key waits on it and then
    /// replays the answer committed with the effect (or, if this one rolled back, does the
    /// work itself); a request that dies mid-way leaves no claim behind to wait out. One
    /// durable commit for the key and the effect together.
    async fn run_claiming<'a, T, E, F, R>(
        &self,
        op: &'static str,
        (key, fingerprint): (&IdempotencyKey, &RequestFingerprint),
        body: &F,
        render: &R,
    ) -> AppResult<Response>
    where
        F: for<'t> Fn(&'t mut Tx) -> TxBody<'a, 't, T, E> + Sync + 'a,
        R: Fn(&T) -> StoredResponse + Sync + 'a,
        T: Send + 'a,
        E: Send + 'a,
        AppError: From<E>,
    {
        let (scope, ttl) = (self.scope.as_str(), self.edge.opts.idempotency_lock_ttl);
        let outcome = self
            .edge
            .store
            .transaction(op, Rerun::Always, move |tx| {
                async move {
                    let claimed = tx
                        .idem_claim(IdemClaim {
                            scope,
                            key,
                            fingerprint,
                            now: holdfast_core::now_ms(),
                            lock_ttl: ttl,
                        })
                        .await?;
                    let token = match claimed {
                        ClaimOutcome::Claimed { token } => token,
                        ClaimOutcome::Replay(stored) => {
                            return Err(TxError::Abort(Ended::Replay(stored)))
                        }
                        ClaimOutcome::InFlight => return Err(TxError::Abort(Ended::InFlight)),
                        ClaimOutcome::Mismatch => return Err(TxError::Abort(Ended::Mismatch)),
                    };
                    let value = body(tx).await.map_err(|e| match e {
                        TxError::Abort(e) => TxError::Abort(Ended::Body(e)),
                        TxError::Db(e) => TxError::Db(e),
                    })?;
                    let answer = render(&value);
                    let lock = IdemLock {
                        scope,
                        key,
                        token: &token,
                    };
                    tx.idem_finish(lock, &answer).await?;
                    Ok(answer)
                }
                .scope_boxed()
            })
            .await;
        match outcome {
            Ok(answer) => Ok(respond(answer, false)),
            Err(TxError::Abort(Ended::Replay(stored))) => Ok(respond(stored, true)),
            Err(TxError::Abort(Ended::InFlight)) => Err(in_flight()),
            Err(TxError::Abort(Ended::Mismatch)) => Err(reused()),
            Err(TxError::Abort(Ended::Body(e))) => Err(e.into()),
            Err(TxError::Db(e)) => Err(e.into()),
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let Some(held) = self.held.take() else {
            return;
        };
        held._renewal.0.abort();
        let (store, scope) = (self.edge.store.clone(), std::mem::take(&mut self.scope));
        // The handler failed before running: give the key back so a retry runs afresh.
        tokio::spawn(async move {
            if let Err(e) = store.idem_release(held.lock(&scope)).await {
                tracing::warn!(error = %e, "could not release an unused idempotency key");
            }
        });
    }
}

fn reused() -> AppError {
    AppError::unprocessable(
        "idempotency-key-reused",
        "this Idempotency-Key was already used for a different request",
    )
}

fn in_flight() -> AppError {
    AppError::conflict(
        "idempotency-key-in-flight",
        "a request with this Idempotency-Key is still being processed",
    )
    .retry_after(1)
}

/// An answer as the client gets it: stored bytes as JSON, marked when replayed.
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
