//! The test harness shared by this crate's test files: a router per simulated instance on a
//! fresh SQLite store (or on another instance's store), and helpers to call it like a client.
#![allow(dead_code)] // each test file uses a different part of it

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use holdfast_store::{Store, StoreOptions};
use holdfast_web::{app, AppState, WebOptions};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::sync::Arc;
use tower::ServiceExt;

pub struct TestApp {
    pub router: Router,
    pub store: Store,
    /// Keeps the database file alive while any instance on it runs.
    pub dir: Arc<tempfile::TempDir>,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    pub fn is_problem(&self) -> bool {
        self.headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v == "application/problem+json")
    }
}

/// One instance (`opts.sessions` picks the session tier) on a fresh database.
pub async fn spawn_app(opts: WebOptions) -> TestApp {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    instance(dir, opts).await
}

/// One instance on `dir`'s database, with its own store pool and session tier, as a separate
/// process would have.
pub async fn instance(dir: Arc<tempfile::TempDir>, opts: WebOptions) -> TestApp {
    let url = holdfast_store::testing::sqlite_url(dir.path());
    let store = Store::open(&StoreOptions::new(url)).await.unwrap();
    let metrics = holdfast_web::install_metrics_recorder().ok();
    TestApp {
        router: app(AppState::new(store.clone(), opts, metrics)),
        store,
        dir,
    }
}

impl TestApp {
    /// Another instance on this one's database.
    pub async fn sibling(&self, opts: WebOptions) -> TestApp {
        instance(self.dir.clone(), opts).await
    }
}

pub fn local() -> WebOptions {
    WebOptions {
        secure_cookies: false,
        ..WebOptions::default()
    }
}

impl TestApp {
    pub async fn send(&self, req: Request<Body>) -> Reply {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        Reply {
            status,
            headers,
            body,
        }
    }

    /// A request with optional JSON body, session cookie and extra headers.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        cookie: Option<&str>,
        extra: &[(&str, &str)],
    ) -> Reply {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "shop.test");
        if let Some(c) = cookie {
            b = b.header(header::COOKIE, c);
        }
        for (k, v) in extra {
            b = b.header(*k, *v);
        }
        let body = match body {
            Some(v) => {
                b = b.header(header::CONTENT_TYPE, "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        self.send(b.body(body).unwrap()).await
    }

    /// Signs up and logs in; returns the `Cookie` header value.
    pub async fn user(&self, email: &str) -> String {
        let creds = json!({ "email": email, "password": "correct horse battery" });
        assert_eq!(
            self.call("POST", "/api/signup", Some(creds.clone()), None, &[])
                .await
                .status,
            StatusCode::CREATED
        );
        let r = self
            .call("POST", "/api/login", Some(creds), None, &[])
            .await;
        assert_eq!(r.status, StatusCode::OK);
        cookie_of(&r)
    }

    pub async fn add(&self, cookie: &str, sku: &str, qty: i64) -> Reply {
        self.call(
            "POST",
            "/api/cart/items",
            Some(json!({ "sku": sku, "qty": qty })),
            Some(cookie),
            &[],
        )
        .await
    }

    pub async fn checkout(&self, cookie: &str, key: &str) -> Reply {
        self.call(
            "POST",
            "/api/checkout",
            None,
            Some(cookie),
            &[("idempotency-key", key)],
        )
        .await
    }
}

pub fn cookie_of(r: &Reply) -> String {
    let set = r
        .headers
        .get(header::SET_COOKIE)
        .expect("set-cookie")
        .to_str()
        .unwrap();
    set.split(';').next().unwrap().to_owned()
}
