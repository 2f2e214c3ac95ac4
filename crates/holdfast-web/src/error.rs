//! One error type for the whole HTTP edge, rendered as RFC 9457 `application/problem+json`.
//!
//! Client mistakes are 4xx and are not logged as errors; a failure of ours is logged with its
//! cause while the client gets a generic body (no SQL, no stack, no secrets).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use holdfast_core::ParseError;
use serde_json::json;

pub const PROBLEM_JSON: &str = "application/problem+json";

#[derive(Debug)]
pub struct AppError {
    status: StatusCode,
    /// Short machine-readable name; the problem `type` is `/problems/<slug>`.
    slug: &'static str,
    detail: String,
    retry_after_s: Option<u32>,
}

impl AppError {
    pub fn new(status: StatusCode, slug: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            slug,
            detail: detail.into(),
            retry_after_s: None,
        }
    }
    pub fn bad_request(slug: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, slug, detail)
    }
    pub fn unprocessable(slug: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, slug, detail)
    }
    pub fn conflict(slug: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, slug, detail)
    }
    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", "log in first")
    }
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", detail)
    }
    /// A failure of ours: log the cause, tell the client only that it happened.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(%cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "something went wrong on our side",
        )
    }
    /// A dependency is down or overloaded: the client should retry shortly.
    pub fn unavailable(cause: impl std::fmt::Display) -> Self {
        tracing::warn!(%cause, "dependency unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "temporarily unavailable, retry shortly",
        )
        .retry_after(1)
    }
    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after_s = Some(seconds);
        self
    }
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let body = json!({
            "type": format!("/problems/{}", self.slug),
            "title": self.status.canonical_reason().unwrap_or("Error"),
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        let mut resp = (self.status, body.to_string()).into_response();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(s) = self.retry_after_s {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

impl From<ParseError> for AppError {
    fn from(e: ParseError) -> Self {
        Self::unprocessable("invalid-field", e.to_string())
    }
}

impl From<holdfast_store::Error> for AppError {
    fn from(e: holdfast_store::Error) -> Self {
        use holdfast_store::Error as E;
        match e {
            E::NotFound => Self::not_found("no such record"),
            E::EmailTaken => Self::conflict("email-taken", e.to_string()),
            E::UnknownSku(_) => Self::unprocessable("unknown-sku", e.to_string()),
            E::QuantityLimit => Self::unprocessable("quantity-limit", e.to_string()),
            E::EmptyCart => Self::unprocessable("empty-cart", e.to_string()),
            E::IdempotencyLockLost => Self::conflict(
                "idempotency-key-in-use",
                "another request holds this Idempotency-Key",
            )
            .retry_after(1),
            e if e.is_unavailable() => Self::unavailable(e),
            e => Self::internal(e),
        }
    }
}

impl From<holdfast_sessions::Error> for AppError {
    fn from(e: holdfast_sessions::Error) -> Self {
        match e {
            holdfast_sessions::Error::Store(e) => e.into(),
            e if e.is_unavailable() => Self::unavailable(e),
            e => Self::internal(e),
        }
    }
}

pub type AppResult<T> = Result<T, AppError>;
