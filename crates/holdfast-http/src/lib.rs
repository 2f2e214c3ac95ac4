//! The HTTP vocabulary that Holdfast's three servers share: the web edge, the payment
//! provider and the balancer each answer errors as RFC 9457 `application/problem+json`, and
//! they agree on the name of the `Idempotency-Key` header. One renderer, so an error looks the
//! same whichever process produced it.
//!
//! This crate has no opinion about routing or frameworks; with the `axum` feature a
//! [`Problem`] is also an axum response.

#[cfg(feature = "io")]
mod parse_errors;
#[cfg(feature = "io")]
pub use parse_errors::ParseErrorsAsProblems;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The request header that makes an unsafe request safe to retry
/// (draft-ietf-httpapi-idempotency-key-header-07).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// An error answer: status, a short machine-readable name and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    status: StatusCode,
    /// `None`: the problem type is `about:blank` (the status says it all).
    slug: Option<&'static str>,
    detail: String,
    retry_after_s: Option<u32>,
}

impl Problem {
    /// A problem of type `/problems/<slug>`.
    pub fn new(status: StatusCode, slug: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            slug: Some(slug),
            detail: detail.into(),
            retry_after_s: None,
        }
    }

    /// A problem of type `about:blank`: nothing to add to the status but a detail.
    pub fn of_status(status: StatusCode, detail: impl Into<String>) -> Self {
        Self {
            status,
            slug: None,
            detail: detail.into(),
            retry_after_s: None,
        }
    }

    /// Also send `Retry-After: <seconds>`.
    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after_s = Some(seconds);
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The short name (`None` for `about:blank`).
    pub fn slug(&self) -> Option<&'static str> {
        self.slug
    }

    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// The JSON body: `type`, `title` (the status' reason phrase), `status`, `detail`.
    pub fn body(&self) -> Bytes {
        let kind = match self.slug {
            Some(slug) => format!("/problems/{slug}"),
            None => "about:blank".to_owned(),
        };
        let body = serde_json::json!({
            "type": kind,
            "title": self.status.canonical_reason().unwrap_or("Error"),
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        Bytes::from(body.to_string())
    }

    /// The whole response; convert the body with `Response::map` for a server's body type.
    pub fn to_response(&self) -> Response<Bytes> {
        let mut resp = Response::new(self.body());
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(s) = self.retry_after_s {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.detail)
    }
}

#[cfg(feature = "axum")]
impl axum_core::response::IntoResponse for Problem {
    fn into_response(self) -> axum_core::response::Response {
        self.to_response().map(axum_core::body::Body::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(p: &Problem) -> serde_json::Value {
        serde_json::from_slice(&p.body()).expect("problem bodies are JSON")
    }

    #[test]
    fn a_problem_renders_rfc_9457_fields_and_headers() {
        let p = Problem::new(StatusCode::CONFLICT, "in-flight", "still running").retry_after(1);
        let resp = p.to_response();
        assert_eq!(resp.status(), StatusCode::CONFLICT);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        assert_eq!(
            json(&p),
            serde_json::json!({"type": "/problems/in-flight", "title": "Conflict", "status": 409, "detail": "still running"})
        );
    }

    #[test]
    fn a_status_only_problem_is_about_blank_without_retry_after() {
        let p = Problem::of_status(StatusCode::BAD_GATEWAY, "no upstream answered");
        assert_eq!(json(&p)["type"], "about:blank");
        assert_eq!(json(&p)["title"], "Bad Gateway");
        assert!(!p.to_response().headers().contains_key(header::RETRY_AFTER));
    }

    #[test]
    fn details_are_escaped_as_json() {
        let p = Problem::new(StatusCode::BAD_REQUEST, "x", "quote \" and \n newline");
        assert_eq!(json(&p)["detail"], "quote \" and \n newline");
    }
}
