//! What each [`Sabotage`] breaks — the deliberately broken builds that the tests and the drill
//! must catch — implemented here and nowhere else. The handlers and the flows have no
//! sabotage branch: the web-tier kinds are middleware in front of the shop's routes, and the
//! flows reach the effect ledger through [`ledger_once`], which skips it for the worker kind. Off unless the hidden `--unsafe-sabotage` flag
//! names one; never in production.

use crate::http::{CheckoutBody, Shop};
use crate::sql;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use holdfast_http::IDEMPOTENCY_KEY;
use holdfast_jobs::{JobError, Ledger};
use holdfast_store::{JobRow, Rerun, ScopedFutureExt};
use holdfast_web::{AppError, Authed, FromBody};
use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

pub use holdfast_core::Sabotage;

/// The shop's routes with the configured web-tier sabotage in front of them.
pub(crate) fn apply(routes: Router<Shop>, shop: &Shop) -> Router<Shop> {
    match shop.options().sabotage {
        Some(Sabotage::NoIdempotency) => routes.layer(middleware::from_fn(fresh_key_each_time)),
        Some(Sabotage::AckBeforeCommit) => routes.layer(middleware::from_fn_with_state(
            shop.clone(),
            ack_before_commit,
        )),
        // `corrupt-backup` damages files the drill holds, not a build: nothing to do here.
        Some(Sabotage::LedgerBypass | Sabotage::CorruptBackup) | None => routes,
    }
}

/// NoIdempotency: a well-formed `Idempotency-Key` is swapped for a fresh one, so every retry
/// is a new request and runs again.
async fn fresh_key_each_time(mut req: Request, next: Next) -> Response {
    if holdfast_web::idempotency_key(req.headers()).is_ok_and(|k| k.is_some()) {
        let fresh = format!("\"sabotage-{}\"", uuid::Uuid::new_v4());
        if let Ok(v) = HeaderValue::from_str(&fresh) {
            req.headers_mut().insert(IDEMPOTENCY_KEY, v);
        }
    }
    next.run(req).await
}

/// AckBeforeCommit: a checkout is answered 201 with an order made up from the cart, and the
/// real checkout commits half a second later in the background. The answer promises what the
/// store may never hold.
async fn ack_before_commit(State(shop): State<Shop>, req: Request, next: Next) -> Response {
    if req.method() != Method::POST || req.uri().path() != "/api/checkout" {
        return next.run(req).await;
    }
    promise_then_commit(shop, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn promise_then_commit(shop: Shop, req: Request) -> Result<Response, AppError> {
    let (mut parts, body) = req.into_parts();
    let user = Authed::from_request_parts(&mut parts, &shop).await?;
    if holdfast_web::idempotency_key(&parts.headers)?.is_none() {
        return Err(AppError::bad_request(
            "idempotency-key-missing",
            "this request requires an Idempotency-Key header",
        ));
    }
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map_err(|_| AppError::bad_request("unreadable-body", "could not read the request body"))?;
    let (CheckoutBody, _) = CheckoutBody::from_body(&parts.headers, &bytes)?;
    let shape = shop.cart_shape().await?;
    let cart = shop
        .store()
        .read("cart_get", |c| {
            sql::cart_read::<Infallible>(c, &user.user_id, shape.read, "").scope_boxed()
        })
        .await?;
    if cart.items.is_empty() {
        return Err(crate::Error::EmptyCart.into());
    }
    let promised = serde_json::json!({
        "order_id": crate::OrderId::generate().to_string(),
        "total_cents": cart.total_cents,
        "status": "pending",
        "created_at": holdfast_core::now_ms(),
        "items": cart.items,
    });
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = shop
            .store()
            .transaction("checkout", Rerun::IfUncommitted, |tx| {
                sql::checkout(tx, shape, &user.user_id).scope_boxed()
            })
            .await;
    });
    Ok((StatusCode::CREATED, Json(promised)).into_response())
}

/// `Ledger::once` for the job's `(effect_key, external_key)` — unless LedgerBypass is on: then the call
/// is made with a fresh idempotency key on every attempt and nothing is recorded first, so a
/// redelivered job charges again.
pub(crate) async fn ledger_once<CF, LF>(
    sabotage: Option<Sabotage>,
    ledger: &Ledger,
    job: &JobRow,
    (effect_key, external_key): (&str, &str),
    call: impl FnOnce(String) -> CF,
    lookup: impl FnOnce(String) -> LF,
) -> Result<String, JobError>
where
    CF: Future<Output = Result<String, JobError>>,
    LF: Future<Output = Result<Option<String>, JobError>>,
{
    match sabotage {
        Some(Sabotage::LedgerBypass) => {
            call(format!("{external_key}-{}", uuid::Uuid::new_v4().simple())).await
        }
        _ => {
            ledger
                .once(job, effect_key, external_key, call, lookup)
                .await
        }
    }
}
