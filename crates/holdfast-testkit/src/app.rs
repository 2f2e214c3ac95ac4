//! The shop in-process, on a fresh SQLite store per test, called through its real router
//! (`tower::ServiceExt::oneshot`): every layer a request meets in production, no network.
//! Several "instances" may share one database, each with its own store pool and session tier,
//! as separate processes would.

use axum::body::Body;
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::Router;
use holdfast_shop::{Shop, ShopOptions};
use holdfast_store::{Store, StoreOptions};
use holdfast_web::{AppState, WebOptions};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use tower::ServiceExt;

/// The password every test user gets.
pub const PASSWORD: &str = "correct horse battery";

/// One shop instance.
pub struct TestApp {
    pub router: Router,
    /// The instance's operator endpoints (`/metrics`).
    pub operator: Router,
    pub store: Store,
    pub shop: Shop,
    /// Keeps the database file alive while any instance on it runs.
    pub dir: Arc<tempfile::TempDir>,
}

/// An answer, read whole.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    pub fn replayed(&self) -> bool {
        self.headers.contains_key("idempotent-replayed")
    }
    pub fn is_problem(&self) -> bool {
        self.headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v == holdfast_web::PROBLEM_JSON)
    }
}

/// Web options for plain-HTTP tests: cookies without `Secure`, and rate limits no test
/// reaches (in-process requests all come from one unknown address). The rate-limit tests set
/// their own quotas.
pub fn local() -> WebOptions {
    WebOptions {
        secure_cookies: false,
        rate_limits: holdfast_web::RateLimits::generous(),
        ..WebOptions::default()
    }
}

/// One instance on a fresh database (`web.sessions` picks the session tier).
pub async fn spawn_app(web: WebOptions) -> TestApp {
    spawn_shop(web, ShopOptions::default()).await
}

/// [`spawn_app`] with the shop's own options too.
pub async fn spawn_shop(web: WebOptions, shop: ShopOptions) -> TestApp {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    instance(dir, web, shop).await
}

async fn instance(dir: Arc<tempfile::TempDir>, web: WebOptions, opts: ShopOptions) -> TestApp {
    let url = holdfast_store::testing::sqlite_url(dir.path());
    let store = Store::open(&StoreOptions::new(url).schema(&holdfast_shop::SCHEMA))
        .await
        .expect("open the store");
    let metrics = holdfast_web::install_metrics_recorder().ok();
    // Video reviews' bytes beside the database, shared by siblings as on one machine.
    let opts = ShopOptions {
        uploads: opts.uploads.or_else(|| {
            Some(holdfast_shop::UploadSetup::local(dir.path().join("uploads")).expect("blob dir"))
        }),
        ..opts
    };
    let shop = Shop::new(AppState::new(store.clone(), web, metrics), opts);
    TestApp {
        router: holdfast_shop::app(shop.clone()),
        operator: holdfast_web::operator_app(shop.edge().clone()),
        store,
        shop,
        dir,
    }
}

/// An instance on the database at `url` as a serving process opens it: verifying, not
/// migrating, with `shop.schema` (an older build's, for a rolling deploy). Refused as that
/// process would be refused.
pub async fn instance_on(
    url: &str,
    web: WebOptions,
    shop: ShopOptions,
) -> Result<TestApp, holdfast_store::Error> {
    let store = Store::open(
        &StoreOptions::new(url)
            .schema(shop.schema)
            .migrate(holdfast_store::MigrateMode::Verify),
    )
    .await?;
    let shop = Shop::new(AppState::new(store.clone(), web, None), shop);
    Ok(TestApp {
        router: holdfast_shop::app(shop.clone()),
        operator: holdfast_web::operator_app(shop.edge().clone()),
        store,
        shop,
        dir: Arc::new(tempfile::tempdir().expect("tempdir")),
    })
}

impl TestApp {
    /// Another instance on this one's database.
    pub async fn sibling(&self, web: WebOptions) -> TestApp {
        self.sibling_shop(web, ShopOptions::default()).await
    }

    pub async fn sibling_shop(&self, web: WebOptions, shop: ShopOptions) -> TestApp {
        instance(self.dir.clone(), web, shop).await
    }

    /// Serves this instance on 127.0.0.1, port 0, until the test's runtime ends.
    pub async fn serve(&self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind port 0");
        let addr = listener.local_addr().expect("local addr");
        let app = self
            .router
            .clone()
            .into_make_service_with_connect_info::<SocketAddr>();
        let listener = holdfast_web::public_listener(listener);
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    pub async fn send(&self, req: Request<Body>) -> Reply {
        send(&self.router, req).await
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
        let cookie: Vec<(&str, &str)> = cookie.map(|c| ("cookie", c)).into_iter().collect();
        let headers = [cookie.as_slice(), extra].concat();
        self.send(request(method, path, body, &headers)).await
    }

    /// Signs up and logs in; returns the `Cookie` header value.
    pub async fn user(&self, email: &str) -> String {
        sign_up(&self.router, email).await
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

/// Signs `email` up with [`PASSWORD`] and logs in through `router`; the `Cookie` header value.
pub async fn sign_up(router: &Router, email: &str) -> String {
    let creds = json!({ "email": email, "password": PASSWORD });
    let signup = send(
        router,
        request("POST", "/api/signup", Some(creds.clone()), &[]),
    )
    .await;
    assert_eq!(signup.status, StatusCode::CREATED);
    let r = send(router, request("POST", "/api/login", Some(creds), &[])).await;
    assert_eq!(r.status, StatusCode::OK);
    cookie_of(&r)
}

/// A request as a client sends it: `Host: shop.test`, the headers given, and a JSON body
/// (with its content type) when there is one.
pub fn request(
    method: &str,
    path: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> Request<Body> {
    let json = body.map(|v| v.to_string().into_bytes());
    let content_type = json.as_ref().map(|_| "application/json");
    raw_request(
        method,
        path,
        content_type,
        json.unwrap_or_default(),
        headers,
    )
}

/// A request with exactly these bytes as its body.
pub fn raw_request(
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> Request<Body> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "shop.test");
    if let Some(ct) = content_type {
        b = b.header(header::CONTENT_TYPE, ct);
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Body::from(body)).expect("a valid request")
}

/// Sends `req` through `router` (every layer, no network) and reads the whole answer.
pub async fn send(router: &Router, req: Request<Body>) -> Reply {
    let resp = router.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("a whole body")
        .to_bytes()
        .to_vec();
    Reply {
        status,
        headers,
        body,
    }
}

/// The `name=value` part of a reply's `Set-Cookie`.
pub fn cookie_of(r: &Reply) -> String {
    let set = r
        .headers
        .get(header::SET_COOKIE)
        .expect("set-cookie")
        .to_str()
        .expect("ASCII cookie");
    set.split(';').next().unwrap_or_default().to_owned()
}
