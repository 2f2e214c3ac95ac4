//! The HTTP API: routes, the shared effect path with its faults, problem+json errors.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use holdfast_http::Problem;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::faults::Faults;
use crate::ledger::{lock, Claim, Hold, Ledger};
use crate::{Charge, Email, ProviderState, Refund};

pub(crate) use holdfast_http::IDEMPOTENCY_KEY;
pub(crate) const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";
const MAX_KEY_LEN: usize = 255;
const MAX_FIELD_LEN: usize = 255;

pub(crate) fn router(state: ProviderState) -> Router {
    Router::new()
        .route(
            "/charges",
            get(|State(st): State<ProviderState>, q| async move { list(&st.0.charges, q).await })
                .post(create_charge),
        )
        .route(
            "/emails",
            get(|State(st): State<ProviderState>, q| async move { list(&st.0.emails, q).await })
                .post(send_email),
        )
        .route(
            "/refunds",
            get(|State(st): State<ProviderState>, q| async move { list(&st.0.refunds, q).await })
                .post(create_refund),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/_faults", get(get_faults).put(put_faults))
        .route("/_stats", get(get_stats))
        .fallback(|| async { problem(StatusCode::NOT_FOUND, "not-found", "no such route") })
        .method_not_allowed_fallback(|| async {
            problem(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "method not allowed on this route",
            )
        })
        .with_state(state)
}

/// A request body of `POST /charges`; also the key's fingerprint.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChargeRequest {
    order_id: String,
    amount_cents: i64,
}

/// A request body of `POST /refunds`; also the key's fingerprint.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RefundRequest {
    charge_id: String,
}

/// A request body of `POST /emails`; also the key's fingerprint.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EmailRequest {
    order_id: String,
    to: String,
    kind: String,
}

#[derive(Deserialize)]
struct KeyFilter {
    idempotency_key: Option<String>,
}

/// The request's `Idempotency-Key`, which this route requires (400 without one).
fn required_key(headers: &HeaderMap) -> Result<String, Problem> {
    idempotency_key(headers)?.ok_or_else(|| {
        bad_request(
            "idempotency-key-missing",
            "an Idempotency-Key header is required",
        )
    })
}

async fn create_charge(
    State(state): State<ProviderState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let key = required_key(&headers)?;
    let req: ChargeRequest = parse_body(body)?;
    check_field("order_id", &req.order_id)?;
    if req.amount_cents <= 0 {
        return Err(unprocessable(
            "invalid-field",
            "amount_cents must be a positive integer",
        ));
    }
    let shared = &state.0;
    shared
        .perform(
            &shared.charges,
            Some(key),
            req,
            &shared.stats.charges,
            |key, req| Charge {
                id: new_id("ch"),
                idempotency_key: key.unwrap_or_default().to_owned(),
                order_id: req.order_id.clone(),
                amount_cents: req.amount_cents,
                created_at: now_ms(),
            },
        )
        .await
}

/// `POST /refunds`: gives a charge's whole amount back, once. The charge must exist (404);
/// a charge already refunded under another key is a 409 — a refund is one per charge.
async fn create_refund(
    State(state): State<ProviderState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let key = required_key(&headers)?;
    let req: RefundRequest = parse_body(body)?;
    check_field("charge_id", &req.charge_id)?;
    let shared = &state.0;
    let charge = lock(&shared.charges)
        .list(None)
        .into_iter()
        .find(|c| c.id == req.charge_id)
        .ok_or_else(|| {
            problem(
                StatusCode::NOT_FOUND,
                "no-such-charge",
                format!("no charge {}", req.charge_id),
            )
        })?;
    // The first key to ask for a charge's refund is its only key, decided under one lock so
    // that two keys racing cannot both refund it.
    let another_key = {
        let mut keys = lock(&shared.refund_keys);
        let first = keys.entry(charge.id.clone()).or_insert_with(|| key.clone());
        *first != key
    };
    if another_key {
        return Err(problem(
            StatusCode::CONFLICT,
            "charge-already-refunded",
            format!("charge {} was already refunded", charge.id),
        ));
    }
    shared
        .perform(
            &shared.refunds,
            Some(key),
            req,
            &shared.stats.refunds,
            |key, _| Refund {
                id: new_id("re"),
                idempotency_key: key.unwrap_or_default().to_owned(),
                charge_id: charge.id.clone(),
                order_id: charge.order_id.clone(),
                amount_cents: charge.amount_cents,
                created_at: now_ms(),
            },
        )
        .await
}

async fn send_email(
    State(state): State<ProviderState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let key = idempotency_key(&headers)?;
    let req: EmailRequest = parse_body(body)?;
    check_field("order_id", &req.order_id)?;
    check_field("to", &req.to)?;
    check_field("kind", &req.kind)?;
    if !req.to.contains('@') {
        return Err(unprocessable(
            "invalid-field",
            "to must be an email address",
        ));
    }
    let shared = &state.0;
    shared
        .perform(
            &shared.emails,
            key,
            req,
            &shared.stats.emails,
            |key, req| Email {
                id: new_id("em"),
                idempotency_key: key.map(str::to_owned),
                order_id: req.order_id.clone(),
                to: req.to.clone(),
                kind: req.kind.clone(),
                created_at: now_ms(),
            },
        )
        .await
}

/// `GET /charges` or `/emails`: every record, or the one made under `?idempotency_key=`.
async fn list<Req: PartialEq + Clone, Rec: Clone + Serialize>(
    ledger: &Mutex<Ledger<Req, Rec>>,
    filter: Result<Query<KeyFilter>, QueryRejection>,
) -> Result<Json<Vec<Rec>>, Problem> {
    let Query(filter) = filter.map_err(|e| bad_request("invalid-query", e.body_text()))?;
    Ok(Json(lock(ledger).list(filter.idempotency_key.as_deref())))
}

async fn get_faults(State(state): State<ProviderState>) -> Json<Faults> {
    Json(state.faults())
}

async fn put_faults(
    State(state): State<ProviderState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Faults>, Problem> {
    let faults: Faults = parse_body(body)?;
    state
        .set_faults(faults.clone())
        .map_err(|e| unprocessable("invalid-field", e))?;
    Ok(Json(faults))
}

async fn get_stats(State(state): State<ProviderState>) -> Json<crate::Stats> {
    Json(state.stats())
}

impl crate::Shared {
    /// The one path every effect takes: draw the faults, claim the key, wait, maybe fail,
    /// act, maybe hang and abandon the connection, answer.
    async fn perform<Req, Rec>(
        &self,
        ledger: &Mutex<Ledger<Req, Rec>>,
        key: Option<String>,
        req: Req,
        created: &AtomicU64,
        create: impl FnOnce(Option<&str>, &Req) -> Rec,
    ) -> Result<Response, Problem>
    where
        Req: PartialEq + Clone,
        Rec: Clone + Serialize,
    {
        let decision = lock(&self.dice).roll();
        let (claim, hold) = match key {
            None => (Claim::Fresh, None),
            Some(key) => match lock(ledger).claim(&key, &req) {
                Claim::Fresh => (Claim::Fresh, Some(Hold::new(ledger, key))),
                other => (other, None),
            },
        };
        if !decision.latency.is_zero() {
            tokio::time::sleep(decision.latency).await;
        }
        if decision.fail {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            return Err(problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "injected-failure",
                "injected failure: nothing was done, retry",
            ));
        }
        let (status, record) = match claim {
            Claim::Busy => {
                return Err(problem(
                    StatusCode::CONFLICT,
                    "idempotency-key-in-flight",
                    "a request with this Idempotency-Key is still being processed; retry later",
                ))
            }
            Claim::Mismatch => {
                return Err(unprocessable(
                    "idempotency-key-reused",
                    "this Idempotency-Key was used with a different payload",
                ))
            }
            Claim::Replay(record) => {
                self.stats.replays.fetch_add(1, Ordering::Relaxed);
                (StatusCode::OK, record)
            }
            Claim::Fresh => {
                let key = hold.and_then(Hold::disarm);
                let record = create(key.as_deref(), &req);
                lock(ledger).commit(key, req, record.clone());
                created.fetch_add(1, Ordering::Relaxed);
                (StatusCode::CREATED, record)
            }
        };
        if let Some(hang) = decision.hang {
            self.stats.act_then_timeout.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                ?hang,
                "acted; hanging, then closing the connection unanswered"
            );
            let mut closing = self.closing.subscribe();
            tokio::select! {
                () = tokio::time::sleep(hang) => {}
                _ = closing.wait_for(|closing| *closing) => {}
            }
            return Ok(abandon());
        }
        let mut resp = (status, Json(record)).into_response();
        if status == StatusCode::OK {
            resp.headers_mut()
                .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        }
        Ok(resp)
    }
}

/// Marks a response that must never reach the client: [`crate::serve`] closes the connection
/// instead of writing it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Abandon;

/// A response that is not one: `serve` drops the connection when it sees [`Abandon`]. Served
/// by anything else, its body fails before the first byte, so hyper aborts the connection.
fn abandon() -> Response {
    let body = futures::stream::once(async {
        Err::<Bytes, _>(std::io::Error::other("provider abandoned the request"))
    });
    let mut resp = Response::new(Body::from_stream(body));
    resp.extensions_mut().insert(Abandon);
    resp
}

/// `Ok(None)` when absent; 400 when present but not a usable key.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let bad = |detail| Err(bad_request("idempotency-key-invalid", detail));
    if values.next().is_some() {
        return bad("send exactly one Idempotency-Key header");
    }
    let Ok(key) = value.to_str() else {
        return bad("the Idempotency-Key must be visible ASCII");
    };
    if key.is_empty() {
        return bad("the Idempotency-Key must not be empty");
    }
    if key.len() > MAX_KEY_LEN {
        return bad("the Idempotency-Key must be at most 255 characters");
    }
    Ok(Some(key.to_owned()))
}

/// Malformed JSON is 400; well-formed JSON of the wrong shape is 422.
/// The JSON body, or the problem with it: too large (413, past axum's 2 MiB default), unreadable
/// (400), malformed (400) or of the wrong shape (422).
fn parse_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, Problem> {
    let body = body.map_err(|rejection| {
        let status = rejection.status();
        let slug = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "body-too-large"
        } else {
            "unreadable-body"
        };
        problem(status, slug, rejection.body_text())
    })?;
    serde_json::from_slice(&body).map_err(|e| {
        if e.is_data() {
            unprocessable("invalid-body", e.to_string())
        } else {
            bad_request("malformed-json", e.to_string())
        }
    })
}

fn check_field(name: &str, value: &str) -> Result<(), Problem> {
    if value.trim().is_empty() || value.len() > MAX_FIELD_LEN {
        return Err(unprocessable(
            "invalid-field",
            format!("{name} must be 1 to {MAX_FIELD_LEN} characters"),
        ));
    }
    Ok(())
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// An RFC 9457 problem; the `type` is `/problems/<slug>`, as in `holdfast-web`.
/// Errors are problems; a 409 and a 503 also say when to come back.
fn problem(status: StatusCode, slug: &'static str, detail: impl Into<String>) -> Problem {
    let p = Problem::new(status, slug, detail);
    if matches!(
        status,
        StatusCode::CONFLICT | StatusCode::SERVICE_UNAVAILABLE
    ) {
        p.retry_after(1)
    } else {
        p
    }
}

fn bad_request(slug: &'static str, detail: impl Into<String>) -> Problem {
    problem(StatusCode::BAD_REQUEST, slug, detail)
}

fn unprocessable(slug: &'static str, detail: impl Into<String>) -> Problem {
    problem(StatusCode::UNPROCESSABLE_ENTITY, slug, detail)
}
