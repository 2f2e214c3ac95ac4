//! The domain of Holdfast's reference shop, with no I/O in it.
//!
//! Everything that crosses a boundary (an HTTP header, a JSON field, a cookie) is parsed here
//! into a newtype that can only hold a valid value, so the store and the web tier never juggle
//! raw strings. The crate also owns the retry policy (full-jitter backoff, a retry budget and a
//! deadline) because it is a rule about time and failure, not about any particular backend.
//!
//! Architecture invariant: this crate knows nothing about axum, sqlx, tokio or HTTP.

pub mod catalog;
mod ids;
pub mod retry;

pub use catalog::{Product, CATALOG};
pub use ids::{
    Email, IdempotencyKey, OrderId, Password, Quantity, RequestFingerprint, SessionId, Sku, UserId,
};

/// A value from outside failed to parse. The message is safe to show to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ParseError {
    pub field: &'static str,
    pub reason: String,
}

impl ParseError {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// Milliseconds since the Unix epoch: the one time unit the store persists.
pub fn now_ms() -> i64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
