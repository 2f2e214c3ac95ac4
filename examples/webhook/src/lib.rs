//! Send a webhook exactly once per POST: a service that is not a shop, built from the pieces
//! Holdfast offers on their own — the edge's accounts, sessions and [`Idempotent`] extractor,
//! the store's composable transactions, the job runtime and the effect ledger.
//!
//! `POST /api/webhooks {"url", "payload"}` (with an `Idempotency-Key`, required) records the
//! delivery and enqueues its job in one transaction, and answers 202 with its id; a retry of
//! the POST replays that answer. A worker then delivers it: the ledger records the delivery's
//! own idempotency key (`webhook-<id>`) before the call, the receiver gets it as
//! `Idempotency-Key`, and the settlement marks the delivery sent and completes the job in one
//! transaction fenced by the job's claim. A worker killed anywhere in between, a receiver that
//! acts and then times out, two workers racing: the receiver sees one key per POST.
//! `GET /api/webhooks/{id}` says where a delivery stands.
//!
//! What to copy into an application of your own: [`SCHEMA`] (your tables), [`router`] (your
//! routes, handed to `holdfast_web::app`), [`Deliveries::register`] (your job kinds).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::FutureExt;
use holdfast_jobs::{Done, JobError, Ledger, QueueConfig, Worker};
use holdfast_store::{JobInsert, JobRow, Migration, Schema, ScopedFutureExt, Store, Tx, TxError};
use holdfast_web::{
    json_response, AppError, AppResult, AppState, Authed, Idempotent, JsonBody, PathParam, Required,
};
use serde::{Deserialize, Serialize};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

/// The service's one table, migrated after the store's own.
pub static SCHEMA: Schema = Schema {
    name: "webhooks",
    migrations: &[Migration::new(
        1,
        "examples/webhook/migrations/0001_deliveries.sql",
        include_str!("../migrations/0001_deliveries.sql"),
    )],
};

/// The queue deliveries run on, and their job kind.
pub const QUEUE: &str = "webhooks";
pub const KIND: &str = "deliver";

/// What a client asks for.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewWebhook {
    pub url: String,
    pub payload: serde_json::Value,
}

/// A delivery as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Delivery {
    pub id: String,
    pub url: String,
    /// `pending` until the receiver has it, then `sent`.
    pub status: String,
}

/// What a request can get wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("url must be http:// or https://")]
    BadUrl,
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::unprocessable("bad-url", e.to_string())
    }
}

/// The service's routes; `holdfast_web::app(state, router())` adds accounts, sessions and the
/// operator endpoints.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/webhooks", post(create))
        .route("/api/webhooks/{id}", get(status))
}

async fn create(
    user: Authed,
    Idempotent {
        body: JsonBody(new),
        claim,
        ..
    }: Idempotent<JsonBody<NewWebhook>, Required>,
) -> AppResult<axum::response::Response> {
    let accepted = |d: &Delivery| json_response(StatusCode::ACCEPTED, d);
    claim
        .run(
            "webhook_create",
            |tx| record(tx, &user.user_id, &new).scope_boxed(),
            accepted,
        )
        .await
}

/// The delivery and its job, in the caller's transaction: both exist, or neither.
async fn record(tx: &mut Tx, owner: &str, new: &NewWebhook) -> Result<Delivery, TxError<Error>> {
    if !(new.url.starts_with("http://") || new.url.starts_with("https://")) {
        return Err(TxError::Abort(Error::BadUrl));
    }
    let id = uuid::Uuid::new_v4().to_string();
    sqlx::query("INSERT INTO deliveries (id, owner, url, payload, status, created_at) VALUES ($1, $2, $3, $4, 'pending', $5)")
        .bind(&id)
        .bind(owner)
        .bind(&new.url)
        .bind(new.payload.to_string())
        .bind(holdfast_core::now_ms())
        .execute(tx.conn())
        .await?;
    let job = JobInsert::new(QUEUE, KIND, serde_json::json!({ "id": id }).to_string())
        .unique(format!("webhook:{id}"));
    tx.job_enqueue(&[job]).await?;
    Ok(Delivery {
        id,
        url: new.url.clone(),
        status: "pending".into(),
    })
}

async fn status(
    State(edge): State<AppState>,
    user: Authed,
    PathParam(id): PathParam,
) -> AppResult<Json<Delivery>> {
    edge.store()
        .read("webhook_get", |c| {
            async {
                let row: Option<(String, String, String)> = sqlx::query_as(
                    "SELECT id, url, status FROM deliveries WHERE id = $1 AND owner = $2",
                )
                .bind(&id)
                .bind(&user.user_id)
                .fetch_optional(c)
                .await?;
                Ok::<_, TxError<Infallible>>(row)
            }
            .scope_boxed()
        })
        .await?
        .map(|(id, url, status)| Json(Delivery { id, url, status }))
        .ok_or_else(|| AppError::not_found("no such webhook"))
}

/// The delivery jobs: one HTTP POST per delivery, exactly once in effect.
#[derive(Clone)]
pub struct Deliveries {
    store: Store,
    ledger: Ledger,
    http: reqwest::Client,
}

impl Deliveries {
    /// `timeout`: how long a receiver may take before the outcome counts as unknown.
    pub fn new(store: Store, timeout: Duration) -> anyhow::Result<Self> {
        Ok(Self {
            ledger: Ledger::new(store.clone()),
            store,
            http: reqwest::Client::builder().timeout(timeout).build()?,
        })
    }

    pub fn queues(concurrency: usize) -> Vec<QueueConfig> {
        vec![QueueConfig {
            name: QUEUE.into(),
            concurrency,
        }]
    }

    /// `worker` with the delivery job registered.
    pub fn register(&self, worker: Worker) -> Worker {
        let me = self.clone();
        worker.handle(
            KIND,
            Arc::new(move |job| {
                let me = me.clone();
                async move { me.deliver(job).await }.boxed()
            }),
        )
    }

    async fn deliver(&self, job: JobRow) -> Result<Done, JobError> {
        #[derive(Deserialize)]
        struct Args {
            id: String,
        }
        let Args { id } = serde_json::from_str(&job.args)
            .map_err(|e| JobError::fatal(format!("bad args: {e}")))?;
        let (url, payload): (String, String) = self
            .store
            .read("webhook_load", |c| {
                async {
                    let row: Option<(String, String)> =
                        sqlx::query_as("SELECT url, payload FROM deliveries WHERE id = $1")
                            .bind(&id)
                            .fetch_optional(c)
                            .await?;
                    Ok::<_, TxError<Infallible>>(row)
                }
                .scope_boxed()
            })
            .await
            .map_err(TxError::into_db)?
            .ok_or_else(|| JobError::fatal(format!("no delivery {id}")))?;
        let effect_key = format!("webhook:{id}");
        let sent = self
            .ledger
            .once(
                &job,
                &effect_key,
                &format!("webhook-{id}"),
                |key| self.post(url, payload, key),
                // A receiver offers no lookup: an unknown outcome is resolved by sending again
                // with the same key, which the receiver deduplicates.
                |_| async { Ok(None) },
            )
            .await?;
        self.ledger
            .settle(job.fence(), &effect_key, &sent, |tx| {
                async {
                    sqlx::query("UPDATE deliveries SET status = 'sent' WHERE id = $1")
                        .bind(&id)
                        .execute(tx.conn())
                        .await?;
                    Ok(())
                }
                .scope_boxed()
            })
            .await
    }

    /// POSTs the payload with `Idempotency-Key: key`; the key is the effect's id.
    async fn post(&self, url: String, payload: String, key: String) -> Result<String, JobError> {
        let resp = self
            .http
            .post(&url)
            .header("idempotency-key", &key)
            .header("content-type", "application/json")
            .body(payload)
            .send()
            .await
            .map_err(|e| JobError::retry(format!("receiver: {e}")))?;
        match resp.status() {
            s if s.is_success() => Ok(key),
            s if s.is_client_error() && s != StatusCode::TOO_MANY_REQUESTS => {
                Err(JobError::fatal(format!("receiver refused: {s}")))
            }
            s => Err(JobError::retry(format!("receiver answered {s}"))),
        }
    }
}
