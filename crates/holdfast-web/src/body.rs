//! Request bodies and headers, parsed at the boundary.
//!
//! JSON bodies must say `application/json`: besides being honest, that content type cannot
//! be sent cross-site by a plain HTML form, which backs up the CSRF check. Syntax errors are
//! 400, well-formed JSON of the wrong shape is 422, too large is 413 — never a 5xx.

use crate::error::{AppError, AppResult};
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
use bytes::Bytes;
use holdfast_core::IdempotencyKey;
use holdfast_http::IDEMPOTENCY_KEY;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// The raw body, with axum's rejections (413 on the size limit) turned into problem+json.
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = AppError;
    async fn from_request(req: Request, state: &S) -> AppResult<Self> {
        Bytes::from_request(req, state)
            .await
            .map(RawBody)
            .map_err(|rej| {
                let status = rej.status();
                if status == StatusCode::PAYLOAD_TOO_LARGE {
                    AppError::new(status, "body-too-large", "request body is too large")
                } else {
                    AppError::bad_request("unreadable-body", "could not read the request body")
                }
            })
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// A JSON body as `T`, with the body's canonical form for idempotency fingerprints.
/// An empty body is read as `{}` when `empty_ok`.
pub fn parse_json<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
    empty_ok: bool,
) -> AppResult<(T, Vec<u8>)> {
    let value: Value = if body.iter().all(u8::is_ascii_whitespace) && empty_ok {
        Value::Object(Default::default())
    } else {
        if !is_json(headers) {
            return Err(AppError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "send Content-Type: application/json",
            ));
        }
        serde_json::from_slice(body)
            .map_err(|e| AppError::bad_request("malformed-json", format!("malformed JSON: {e}")))?
    };
    let canonical = canonical_json(&value);
    let parsed = T::deserialize(value)
        .map_err(|e| AppError::unprocessable("invalid-body", format!("invalid body: {e}")))?;
    Ok((parsed, canonical))
}

/// A request body an [`Idempotent`](crate::Idempotent) handler takes: parsed (and validated
/// into the application's types) at the boundary, before the key is claimed, together with its
/// canonical bytes for the key's fingerprint.
pub trait FromBody: Sized {
    fn from_body(headers: &HeaderMap, body: &[u8]) -> AppResult<(Self, Vec<u8>)>;
}

/// A JSON body; `Content-Type: application/json` is required.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromBody for JsonBody<T> {
    fn from_body(headers: &HeaderMap, body: &[u8]) -> AppResult<(Self, Vec<u8>)> {
        parse_json(headers, body, false).map(|(v, canonical)| (JsonBody(v), canonical))
    }
}

/// A JSON body as an extractor, with the same rules (415, 400, 422, 413 — never a 5xx).
impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = AppError;
    async fn from_request(req: Request, state: &S) -> AppResult<Self> {
        let headers = req.headers().clone();
        let RawBody(body) = RawBody::from_request(req, state).await?;
        Ok(JsonBody::from_body(&headers, &body)?.0)
    }
}

/// No body: whatever was sent is ignored, and not part of the fingerprint.
impl FromBody for () {
    fn from_body(_: &HeaderMap, _: &[u8]) -> AppResult<(Self, Vec<u8>)> {
        Ok(((), Vec::new()))
    }
}

/// JSON with object keys sorted at every depth and no insignificant white space, so that two
/// encodings of the same payload fingerprint the same.
pub fn canonical_json(v: &Value) -> Vec<u8> {
    fn write(v: &Value, out: &mut Vec<u8>) {
        match v {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push(b'{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(Value::String(k.clone()).to_string().as_bytes());
                    out.push(b':');
                    write(&map[k], out);
                }
                out.push(b'}');
            }
            Value::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write(item, out);
                }
                out.push(b']');
            }
            scalar => out.extend_from_slice(scalar.to_string().as_bytes()),
        }
    }
    let mut out = Vec::new();
    write(v, &mut out);
    out
}

/// The request's `Idempotency-Key`, if any. More than one such header is a client error.
pub fn idempotency_key(headers: &HeaderMap) -> AppResult<Option<IdempotencyKey>> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(AppError::bad_request(
            "invalid-idempotency-key",
            "send exactly one Idempotency-Key header",
        ));
    }
    IdempotencyKey::parse(first.as_bytes())
        .map(Some)
        .map_err(|e| AppError::bad_request("invalid-idempotency-key", e.to_string()))
}

/// One path segment, percent-decoded. A segment that does not decode names nothing: 404.
pub struct PathParam(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for PathParam {
    type Rejection = AppError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> AppResult<Self> {
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(s)| PathParam(s))
            .map_err(|_| AppError::not_found("no such resource"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_ignores_key_order_and_spacing() {
        let a: Value = serde_json::from_str(r#"{ "b": [1, {"y":2,"x":1}], "a": "s" }"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":"s","b":[1,{"x":1,"y":2}]}"#).unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(
            canonical_json(&b),
            br#"{"a":"s","b":[1,{"x":1,"y":2}]}"#.to_vec()
        );
    }
}
