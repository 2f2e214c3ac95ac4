//! `Idempotency-Key` for unsafe requests (draft-ietf-httpapi-idempotency-key-header-07), as
//! one extractor a handler opts into.
//!
//! [`Idempotent`] parses the request body at the boundary (its [`FromBody`] type) and reads
//! the key, scoped to the session's user; the handler hands its transaction to
//! [`Claim::run`]. The claim is not a commit of its own: [`Claim::run`] inserts the key's row
//! as the first statement of the effect's transaction, and stores the rendered answer in it
//! before that transaction commits, so the key, the effect and the answer are one durable
//! commit. A finished key replays its stored answer (the work does not run), a key used for a
//! different payload is a 422. A concurrent request with the same key waits for the first
//! one's transaction (on Postgres the unique index's row, on SQLite the single writer) and
//! then replays what committed — or, if the first rolled back, does the work itself; a
//! request that dies mid-way leaves no claim behind to wait out. A handler whose work fits
//! one SQL statement goes further with [`Claim::in_one_statement`]: the key is stored done,
//! with the answer the database renders, by that very statement — on Postgres one round trip
//! and one commit, on SQLite one script in one call of the connection's thread under the write
//! lock — and anything but the happy path falls back to [`Claim::run`].
//!
//! The key is the user's, so the extractor reads the session, unless the handler's user is
//! not needed yet: on PostgreSQL with sessions in the store, a handler that does not take
//! [`Authed`] itself leaves the session to its one statement ([`Claim::in_one_statement`], or
//! any statement given [`Claim::user_in`]), which checks it
//! (`holdfast_store::Statement::session_user`), so the session and the work are one round
//! trip. Anything else reads the session first ([`Claim::user`], [`Claim::run`]): a dead
//! session is a 401 there, as it would have been here.
//!
//! A request that crosses a timeout boundary is covered both ways: if the server committed
//! after the client gave up, the retry replays the answer; if the instance died first, its
//! transaction never committed and the retry does the work once. A claim committed on its
//! own (by [`holdfast_store::Store::idem_claim`], as an older build did) holds the key for
//! its lease (`idempotency_lock_ttl`, 1 s by default): until then the key is a 409, after it
//! the next request takes the key over and the old token is fenced out at commit.
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
use crate::session::{token_from_headers, Authed};
use crate::AppState;
use axum::extract::{FromRef, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use holdfast_core::{IdempotencyKey, RequestFingerprint};
use holdfast_store::{
    Backend, ClaimOutcome, IdemClaim, IdemLock, KeyStep, Keyed, Rerun, ScopedFutureExt,
    SessionCheck, Statement, StoredResponse, Tx, TxBody, TxError,
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

/// An unsafe request's parsed body and its `Idempotency-Key`, to be claimed by the work's own
/// transaction (see the module docs). Its rejection is the body's own error, or a 400 for a
/// missing or malformed key.
pub struct Idempotent<B, K = Optional> {
    pub body: B,
    pub claim: Claim,
    pub rule: PhantomData<K>,
}

/// A request's key (or none, when it carried none), claimed inside the transaction
/// [`Claim::run`] runs: one commit, and nothing to give back if the handler never runs.
pub struct Claim {
    edge: AppState,
    scope: Scope,
    key: Option<(IdempotencyKey, RequestFingerprint)>,
}

/// Whose key it is.
enum Scope {
    /// The user the request's session named.
    User(String),
    /// The session the request presented, not read yet (see the module docs).
    Session(SessionCheck),
}

/// The session a handler's statement may check itself: on PostgreSQL, with sessions in the
/// store, when the handler did not take [`Authed`] before this extractor.
fn session_left_to_the_statement(edge: &AppState, parts: &Parts) -> Option<SessionCheck> {
    if parts.extensions.get::<Authed>().is_some() || edge.store.backend() != Backend::Postgres {
        return None;
    }
    let token = token_from_headers(&parts.headers, edge.opts.secure_cookies)?;
    edge.sessions.statement_check(token)
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
        let scope = match session_left_to_the_statement(&edge, &parts) {
            Some(session) => Scope::Session(session),
            None => Scope::User(
                Authed::from_request_parts(&mut parts, state)
                    .await
                    .map_err(IntoResponse::into_response)?
                    .user_id,
            ),
        };
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
        let key = key.map(|key| {
            let fingerprint = RequestFingerprint::of(method.as_str(), &path, &canonical);
            (key, fingerprint)
        });
        let claim = Claim { edge, scope, key };
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
        self.key.as_ref().map(|(k, _)| k)
    }

    /// The request's user. A session not read yet is read now: a dead one is a 401.
    pub async fn user(&mut self) -> AppResult<Authed> {
        let user_id = match &self.scope {
            Scope::User(id) => id.clone(),
            Scope::Session(session) => {
                self.edge
                    .sessions
                    .load(session.id.expose())
                    .await?
                    .ok_or_else(AppError::unauthorized)?
                    .user_id
            }
        };
        self.scope = Scope::User(user_id.clone());
        Ok(Authed { user_id })
    }

    /// The request's user as an SQL expression of `stmt`: a placeholder bound to the user's id,
    /// or, for a session not read yet, the statement's own check of it, NULL for a dead one
    /// ([`Statement::session_user`]). Every write of the statement must read its user through
    /// this, so that nothing is written for a dead session; the caller then asks
    /// [`Claim::user`], which answers 401.
    pub fn user_in(&self, stmt: &mut Statement) -> String {
        match &self.scope {
            Scope::User(id) => stmt.bind(id.as_str()),
            Scope::Session(session) => stmt.session_user(session),
        }
    }

    /// Runs `body` in one store transaction named `op` and answers with `render` of its
    /// value. With a key, the transaction claims it first and stores the rendered answer in
    /// the key's row before it commits (so a retry replays it); without one, the transaction
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
        let (body, render) = (&body, &render);
        let scope = self.user().await?.user_id;
        if let Some((key, fingerprint)) = self.key.take() {
            return self
                .run_claiming(op, &scope, (&key, &fingerprint), body, render)
                .await;
        }
        let value = self
            .edge
            .store
            .transaction(op, Rerun::IfUncommitted, move |tx| {
                async move { body(tx).await }.scope_boxed()
            })
            .await?;
        Ok(respond(render(&value), false))
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
    /// A keyed request in one round trip and one commit: `build` writes the work and the
    /// key's storing as the [`KeyStep`]'s engine wants it ([`Keyed`]: on PostgreSQL steps of
    /// a [`Statement`], the key's step by [`Statement::claim_key`] and the work gated on it;
    /// on SQLite a script gated on [`Statement::key_absent`] and closed by
    /// [`Statement::store_key`]), or returns `None` when this request cannot be one
    /// statement. The work reads its user as `KeyStep::user`, an SQL expression: the user's
    /// id, or, for a session not read yet (PostgreSQL), the statement's own check of it (NULL
    /// for a dead session, so that nothing is written). Without a key nothing runs. The happy
    /// path's answer is the one the statement stored; every other outcome (a replay, a key in
    /// use or reused, work that refused, a dead session) costs the general path's session
    /// read and transaction after it.
    pub async fn in_one_statement<B>(self, op: &'static str, build: B) -> AppResult<OneStatement>
    where
        B: FnOnce(&mut Statement, KeyStep<'_>) -> Option<Keyed>,
    {
        let Some((key, fingerprint)) = self.key.as_ref() else {
            return Ok(OneStatement::NotAnswered(Box::new(self)));
        };
        let mut stmt = Statement::new();
        let step = KeyStep {
            user: self.user_in(&mut stmt),
            key,
            fingerprint,
            now: holdfast_core::now_ms(),
            backend: self.edge.store.backend(),
        };
        let Some(keyed) = build(&mut stmt, step) else {
            return Ok(OneStatement::NotAnswered(Box::new(self)));
        };
        match self
            .edge
            .store
            .run_keyed_statement(op, &stmt, &keyed)
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
    /// [`Claim::run`] with a key: the key's row is inserted first in the effect's
    /// transaction, so a concurrent request with the same key waits on it and then replays
    /// the answer committed with the effect (or, if this one rolled back, does the work
    /// itself); a request that dies mid-way leaves no claim behind to wait out. One durable
    /// commit for the key and the effect together.
    async fn run_claiming<'a, T, E, F, R>(
        &self,
        op: &'static str,
        scope: &str,
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
        let ttl = self.edge.opts.idempotency_lock_ttl;
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
