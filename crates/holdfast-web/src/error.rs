//! One error type for the whole HTTP edge, rendered as RFC 9457 `application/problem+json`.
//!
//! Client mistakes are 4xx and are not logged as errors; a failure of ours is logged with its
//! cause while the client gets a generic body (no SQL, no stack, no secrets).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use holdfast_core::ParseError;
use holdfast_http::Problem;

pub use holdfast_http::PROBLEM_JSON;

/// A failed request, as the client will see it (a [`Problem`]).
#[derive(Debug)]
pub struct AppError(Problem);

impl AppError {
    pub fn new(status: StatusCode, slug: &'static str, detail: impl Into<String>) -> Self {
        Self(Problem::new(status, slug, detail))
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
    pub fn retry_after(self, seconds: u32) -> Self {
        Self(self.0.retry_after(seconds))
    }
    pub fn status(&self) -> StatusCode {
        self.0.status()
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        self.0.into_response()
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

/// A transaction's failure: the body's own error as the body's type says, the store's as
/// the store's.
impl<E> From<holdfast_store::TxError<E>> for AppError
where
    AppError: From<E>,
{
    fn from(e: holdfast_store::TxError<E>) -> Self {
        match e {
            holdfast_store::TxError::Abort(e) => e.into(),
            holdfast_store::TxError::Db(e) => e.into(),
        }
    }
}

impl From<std::convert::Infallible> for AppError {
    fn from(never: std::convert::Infallible) -> Self {
        match never {}
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
