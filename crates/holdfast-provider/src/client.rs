//! A small typed client for the workers and tests, and the error that says whether to retry.

use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;

use crate::api::IDEMPOTENCY_KEY;
use crate::{Charge, Email, Faults, Refund, Stats};

/// Why a provider call did not return a result.
///
/// The question a caller must answer is "may the provider have acted?": see
/// [`ClientError::is_outcome_unknown`], [`ClientError::is_retryable`] and
/// [`ClientError::is_rejected`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("invalid provider URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    /// No connection was made, so nothing was sent: the provider did not act.
    #[error("could not connect to the provider: {0}")]
    Connect(#[source] reqwest::Error),
    /// The request may have been received and acted on, but no full answer came back
    /// (timeout, connection closed or reset after sending, body cut short).
    #[error("no answer from the provider, which may have acted: {0}")]
    OutcomeUnknown(#[source] reqwest::Error),
    /// The provider answered with an error status; `detail` is the problem's `detail`.
    #[error("provider answered {status}: {detail}")]
    Status { status: u16, detail: String },
    /// A success status with a body this client cannot read.
    #[error("unreadable answer from the provider: {0}")]
    Decode(#[source] serde_json::Error),
    /// The HTTP client itself could not be built or the request could not be formed.
    #[error("provider client error: {0}")]
    Client(#[source] reqwest::Error),
}

impl ClientError {
    /// The provider may have acted: only a retry with the same idempotency key (or a lookup
    /// by key) can tell.
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, Self::OutcomeUnknown(_))
    }

    /// Worth retrying with the same idempotency key: an unknown outcome, a failed connect,
    /// a 5xx, or a 409 (the key's first request is still in flight).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::OutcomeUnknown(_) | Self::Connect(_) => true,
            Self::Status { status, .. } => *status == 409 || *status >= 500,
            _ => false,
        }
    }

    /// The provider refused the request (a 4xx other than 409): retrying cannot help.
    pub fn is_rejected(&self) -> bool {
        matches!(self, Self::Status { status, .. } if (400..500).contains(status) && *status != 409)
    }

    /// The HTTP status, when the provider answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    fn from_send(e: reqwest::Error) -> Self {
        if e.is_builder() {
            Self::Client(e)
        } else if e.is_connect() {
            Self::Connect(e)
        } else {
            Self::OutcomeUnknown(e)
        }
    }
}

/// A client for one provider; cheap to clone (connections are pooled).
#[derive(Clone, Debug)]
pub struct ProviderClient {
    http: reqwest::Client,
    base: Url,
}

impl ProviderClient {
    /// `base_url` is like `http://127.0.0.1:7070`; `timeout` bounds each whole call.
    pub fn new(base_url: &str, timeout: Duration) -> Result<Self, ClientError> {
        let invalid = |reason: String| ClientError::InvalidUrl {
            url: base_url.to_owned(),
            reason,
        };
        let base = Url::parse(base_url).map_err(|e| invalid(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(invalid("must be an http(s) URL".to_owned()));
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(ClientError::Client)?;
        Ok(Self { http, base })
    }

    /// Creates the charge for `idempotency_key`, or returns the one it already created.
    pub async fn charge(
        &self,
        idempotency_key: &str,
        order_id: &str,
        amount_cents: i64,
    ) -> Result<Charge, ClientError> {
        let body = json!({ "order_id": order_id, "amount_cents": amount_cents });
        self.call(
            Method::POST,
            "charges",
            None,
            Some(idempotency_key),
            Some(&body),
        )
        .await
    }

    /// Sends the email for `idempotency_key`, or returns the one it already sent.
    pub async fn send_email(
        &self,
        idempotency_key: &str,
        order_id: &str,
        to: &str,
        kind: &str,
    ) -> Result<Email, ClientError> {
        let body = json!({ "order_id": order_id, "to": to, "kind": kind });
        self.call(
            Method::POST,
            "emails",
            None,
            Some(idempotency_key),
            Some(&body),
        )
        .await
    }

    /// Every charge, or the one made under `idempotency_key` (for reconciliation).
    pub async fn charges(&self, idempotency_key: Option<&str>) -> Result<Vec<Charge>, ClientError> {
        self.call::<(), _>(Method::GET, "charges", idempotency_key, None, None)
            .await
    }

    /// Refunds charge `charge_id` under `idempotency_key`, or returns the refund that key
    /// already made.
    pub async fn refund(
        &self,
        idempotency_key: &str,
        charge_id: &str,
    ) -> Result<Refund, ClientError> {
        let body = json!({ "charge_id": charge_id });
        self.call(
            Method::POST,
            "refunds",
            None,
            Some(idempotency_key),
            Some(&body),
        )
        .await
    }

    /// Every refund, or the one made under `idempotency_key`.
    pub async fn refunds(&self, idempotency_key: Option<&str>) -> Result<Vec<Refund>, ClientError> {
        self.call::<(), _>(Method::GET, "refunds", idempotency_key, None, None)
            .await
    }

    /// Every email, or the one sent under `idempotency_key`.
    pub async fn emails(&self, idempotency_key: Option<&str>) -> Result<Vec<Email>, ClientError> {
        self.call::<(), _>(Method::GET, "emails", idempotency_key, None, None)
            .await
    }

    pub async fn faults(&self) -> Result<Faults, ClientError> {
        self.call::<(), _>(Method::GET, "_faults", None, None, None)
            .await
    }

    pub async fn set_faults(&self, f: &Faults) -> Result<(), ClientError> {
        self.call::<Faults, Faults>(Method::PUT, "_faults", None, None, Some(f))
            .await
            .map(|_| ())
    }

    pub async fn stats(&self) -> Result<Stats, ClientError> {
        self.call::<(), _>(Method::GET, "_stats", None, None, None)
            .await
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        filter: Option<&str>,
        idempotency_key: Option<&str>,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let mut url = self.base.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().push(path);
        }
        if let Some(key) = filter {
            url.query_pairs_mut().append_pair("idempotency_key", key);
        }
        let mut req = self.http.request(method, url);
        if let Some(key) = idempotency_key {
            req = req.header(IDEMPOTENCY_KEY, key);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(ClientError::from_send)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(ClientError::OutcomeUnknown)?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(ClientError::Decode);
        }
        Err(ClientError::Status {
            status: status.as_u16(),
            detail: problem_detail(status, &bytes),
        })
    }
}

fn problem_detail(status: StatusCode, body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("detail")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned())
}
