//! Property-based fuzzing of the parsers at the edge: whatever bytes a client sends as a
//! cookie, an `Idempotency-Key` or a JSON body, the answer is a 2xx or a 4xx problem — never a
//! panic, never a 5xx. Bounded (a fixed number of cases per property) so it runs in CI.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode};
use axum::Router;
use holdfast_testkit::app::{local, send};
use holdfast_testkit::db::TempStore;
use proptest::prelude::*;
use serde_json::Value;

/// Cases per property: enough to shake the parsers, few enough for CI.
const CASES: u32 = 256;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A bare application (accounts only) on a fresh store.
async fn bare() -> (Router, TempStore) {
    let db = TempStore::open(&[]).await;
    (holdfast_web::app(db.edge(local()), Router::new()), db)
}

/// Any byte string that is a legal header value (visible ASCII, spaces, tabs, obs-text).
fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![Just(b'\t'), 0x20u8..=0x7e, 0x80u8..=0xff],
        0..300,
    )
}

fn assert_client_or_success(status: StatusCode, what: &str) {
    assert!(
        status.is_success() || status.is_client_error(),
        "{what}: {status}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn any_cookie_is_no_session_or_a_session_never_a_failure(cookie in header_bytes()) {
        let rt = runtime();
        rt.block_on(async {
            let (router, _db) = bare().await;
            let mut req = Request::get("/api/me").body(Body::empty()).unwrap();
            req.headers_mut().insert("cookie", HeaderValue::from_bytes(&cookie).unwrap());
            let reply = send(&router, req).await;
            assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{cookie:?}");
            assert!(reply.is_problem());
        });
    }

    #[test]
    fn any_idempotency_key_parses_or_is_a_400(value in header_bytes()) {
        let mut headers = HeaderMap::new();
        headers.insert("idempotency-key", HeaderValue::from_bytes(&value).unwrap());
        match holdfast_web::idempotency_key(&headers) {
            Ok(Some(key)) => prop_assert!(!key.as_str().is_empty() && key.as_str().len() <= 255),
            Ok(None) => prop_assert!(false, "a present header is never absent"),
            Err(e) => prop_assert_eq!(e.status(), StatusCode::BAD_REQUEST),
        }
    }

    #[test]
    fn any_json_body_parses_or_is_a_client_error(
        body in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..512),
            "\\PC{0,200}".prop_map(String::into_bytes),
            // JSON-shaped: the paths past the tokenizer.
            any::<(Option<String>, Option<i64>, bool)>().prop_map(|(s, n, b)| {
                serde_json::json!({ "email": s, "password": n, "x": b }).to_string().into_bytes()
            }),
        ],
        content_type in prop_oneof![
            Just("application/json"),
            Just("application/problem+json"),
            Just("text/plain"),
            Just(""),
        ],
    ) {
        let mut headers = HeaderMap::new();
        if !content_type.is_empty() {
            headers.insert("content-type", HeaderValue::from_static(content_type));
        }
        match holdfast_web::parse_json::<Value>(&headers, &body, false) {
            Ok((value, canonical)) => {
                // The fingerprinted form is stable: canonical of canonical is itself.
                let again: Value = serde_json::from_slice(&canonical).unwrap();
                prop_assert_eq!(holdfast_web::canonical_json(&again), canonical);
                prop_assert_eq!(again, value);
            }
            Err(e) => prop_assert!(e.status().is_client_error(), "{}", e.status()),
        }
    }

    #[test]
    fn any_signup_body_is_answered_without_a_failure(
        body in proptest::collection::vec(any::<u8>(), 0..256),
        key in proptest::option::of(header_bytes()),
    ) {
        let rt = runtime();
        rt.block_on(async {
            let (router, _db) = bare().await;
            let mut req = Request::post("/api/signup")
                .header("content-type", "application/json")
                .body(Body::from(body.clone()))
                .unwrap();
            if let Some(key) = &key {
                req.headers_mut()
                    .insert("idempotency-key", HeaderValue::from_bytes(key).unwrap());
            }
            let reply = send(&router, req).await;
            assert_client_or_success(reply.status, &format!("{body:?}"));
            if !reply.status.is_success() {
                assert!(reply.is_problem());
            }
        });
    }
}
