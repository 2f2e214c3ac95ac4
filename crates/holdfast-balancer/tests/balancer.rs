//! The balancer against real upstreams on 127.0.0.1: axum apps for well-behaved instances, raw
//! TCP servers for ones that drop or hang mid-request.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body as AxumBody;
use axum::extract::{Request as AxumRequest, State};
use axum::response::{IntoResponse, Response as AxumResponse};
use bytes::Bytes;
use holdfast_balancer::{Balancer, BalancerOptions, ClientRate, UpstreamStatus};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------------------------
// The balancer under test and a client for it.

struct TestBalancer {
    addr: SocketAddr,
    /// The operator listener.
    ops: SocketAddr,
    balancer: Balancer,
    client: Client<HttpConnector, Full<Bytes>>,
    stop: Option<oneshot::Sender<()>>,
    served: JoinHandle<std::io::Result<()>>,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("utf-8 body")
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("json body")
    }

    fn assert_problem(&self, status: StatusCode) {
        assert_eq!(self.status, status, "body: {}", self.text());
        assert_eq!(self.headers["content-type"], "application/problem+json");
        let problem = self.json();
        assert_eq!(problem["type"], "about:blank");
        assert_eq!(problem["status"], status.as_u16());
        assert_eq!(problem["title"], status.canonical_reason().expect("reason"));
        assert!(problem["detail"].is_string());
    }
}

/// Options for tests that are not about health checking: frequent checks that never time out
/// on a busy machine, so the healthy set stays put.
fn steady() -> BalancerOptions {
    BalancerOptions {
        health_interval: Duration::from_millis(100),
        health_timeout: Duration::from_secs(10),
        client_rate: None,
        ..BalancerOptions::default()
    }
}

async fn start(opts: BalancerOptions, upstreams: Vec<SocketAddr>) -> TestBalancer {
    let balancer = Balancer::new(opts);
    balancer.set_upstreams(upstreams);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(balancer.clone().serve(listener, async {
        let _ = stopped.await;
    }));
    let ops_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let ops = ops_listener.local_addr().expect("local addr");
    tokio::spawn(
        balancer
            .clone()
            .serve_operator(ops_listener, std::future::pending()),
    );
    TestBalancer {
        addr,
        ops,
        balancer,
        client: Client::builder(TokioExecutor::new()).build_http(),
        stop: Some(stop),
        served,
    }
}

impl TestBalancer {
    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req
            .body(Full::new(Bytes::copy_from_slice(body)))
            .expect("request");
        let resp = self.client.request(req).await.expect("balancer answers");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, path: &str) -> Reply {
        self.send(Method::GET, path, &[], b"").await
    }

    /// A GET to the operator listener.
    async fn ops_get(&self, path: &str) -> Reply {
        let req = Request::get(format!("http://{}{path}", self.ops))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = self.client.request(req).await.expect("operator answers");
        let (status, headers) = (resp.status(), resp.headers().clone());
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    }

    fn status_of(&self, addr: SocketAddr) -> bool {
        let all = self.balancer.upstreams();
        all.iter()
            .find(|u| u.addr == addr)
            .map(|u| u.healthy)
            .expect("upstream is known")
    }

    /// Polls (bounded) until the balancer sees `addr` with the given health.
    async fn wait_health(&self, addr: SocketAddr, healthy: bool) {
        for _ in 0..500 {
            if self.status_of(addr) == healthy {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "{addr} never became healthy={healthy}: {:?}",
            self.balancer.upstreams()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A well-behaved instance (axum).

#[derive(Clone, Default)]
struct App {
    name: &'static str,
    /// Requests other than `/readyz`.
    hits: Arc<AtomicUsize>,
    readyz_hits: Arc<AtomicUsize>,
    /// `/readyz` answers 503.
    draining: Arc<AtomicBool>,
    /// Every other route answers 503 too (a draining instance refusing work).
    refusing: Arc<AtomicBool>,
    /// Every other route answers 500 while `/readyz` says ready (a broken instance).
    failing: Arc<AtomicBool>,
    slow: Option<(mpsc::UnboundedSender<()>, Arc<Notify>)>,
}

impl App {
    fn named(name: &'static str) -> Self {
        Self {
            name,
            ..Self::default()
        }
    }

    async fn spawn(self) -> (SocketAddr, Self) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let router = axum::Router::new()
            .fallback(answer)
            .with_state(self.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });
        (addr, self)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn answer(State(app): State<App>, req: AxumRequest) -> AxumResponse {
    if req.uri().path() == "/healthz" {
        return "alive".into_response();
    }
    if req.uri().path() == "/readyz" {
        app.readyz_hits.fetch_add(1, Ordering::SeqCst);
        return if app.draining.load(Ordering::SeqCst) {
            (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
        } else {
            "ready".into_response()
        };
    }
    app.hits.fetch_add(1, Ordering::SeqCst);
    if app.refusing.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response();
    }
    if app.failing.load(Ordering::SeqCst) {
        return (StatusCode::INTERNAL_SERVER_ERROR, "broken").into_response();
    }
    match req.uri().path() {
        "/cookies" => AxumResponse::builder()
            .header("set-cookie", "sid=abc; Path=/; HttpOnly")
            .header("set-cookie", "theme=dark; Path=/")
            .body(AxumBody::from("two cookies"))
            .expect("response"),
        "/headers" => {
            let seen: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .iter()
                .map(|(name, value)| {
                    (
                        name.to_string(),
                        String::from_utf8_lossy(value.as_bytes()).into(),
                    )
                })
                .collect();
            axum::Json(seen).into_response()
        }
        "/busy" => (StatusCode::SERVICE_UNAVAILABLE, "busy: app says so").into_response(),
        "/slow" => {
            if let Some((arrived, release)) = &app.slow {
                let _ = arrived.send(());
                release.notified().await;
            }
            "finally".into_response()
        }
        _ => match req.into_body().collect().await {
            Ok(body) => format!("{} got {} bytes", app.name, body.to_bytes().len()).into_response(),
            Err(_) => (StatusCode::BAD_REQUEST, "the body was cut").into_response(),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// A misbehaving instance (raw TCP): `/readyz` is fine, other requests are read in full and then
// dropped without an answer (while the shared budget lasts) or never answered at all.

#[derive(Clone, Copy)]
enum Misbehaviour {
    /// Drop the connection while `drops_left > 0`, otherwise answer 200.
    Drop,
    /// Keep the connection open and never answer (a paused instance).
    Hang,
}

struct Raw {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

async fn spawn_raw(behaviour: Misbehaviour, drops_left: Arc<AtomicUsize>) -> Raw {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (hits, drops_left) = (counter.clone(), drops_left.clone());
            tokio::spawn(serve_raw(stream, behaviour, hits, drops_left));
        }
    });
    Raw { addr, hits }
}

async fn serve_raw(
    mut stream: TcpStream,
    behaviour: Misbehaviour,
    hits: Arc<AtomicUsize>,
    drops_left: Arc<AtomicUsize>,
) {
    let Some(path) = read_request(&mut stream).await else {
        return;
    };
    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";
    if path == "/readyz" {
        let _ = stream.write_all(ok).await;
        return;
    }
    if path == "/healthz" {
        // A paused process answers nothing at all.
        match behaviour {
            Misbehaviour::Hang => std::future::pending::<()>().await,
            Misbehaviour::Drop => {
                let _ = stream.write_all(ok).await;
            }
        }
        return;
    }
    hits.fetch_add(1, Ordering::SeqCst);
    match behaviour {
        Misbehaviour::Hang => std::future::pending::<()>().await,
        Misbehaviour::Drop => {
            let dropped = drops_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if !dropped {
                let _ = stream.write_all(ok).await;
            }
        }
    }
}

/// Reads one request (head and `content-length` body) and returns its path.
async fn read_request(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let body_len: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = buf.len() - head_end;
    while body < body_len {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body += n;
    }
    head.split_whitespace().nth(1).map(str::to_owned)
}

async fn dead_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("local addr")
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn round_robin_spreads_gets_over_all_upstreams() {
    let mut apps = Vec::new();
    for name in ["a", "b", "c"] {
        apps.push(App::named(name).spawn().await);
    }
    let lb = start(steady(), apps.iter().map(|(addr, _)| *addr).collect()).await;

    for _ in 0..30 {
        assert_eq!(lb.get("/").await.status, StatusCode::OK);
    }

    let hits: Vec<usize> = apps.iter().map(|(_, app)| app.hits()).collect();
    assert_eq!(hits, [10, 10, 10]);
    assert_eq!(lb.balancer.retries_total(), 0);
}

#[tokio::test]
async fn dead_upstream_is_routed_around_and_shown_unhealthy() {
    let (a, app_a) = App::named("a").spawn().await;
    let (b, app_b) = App::named("b").spawn().await;
    let dead = dead_addr().await;
    let lb = start(steady(), vec![a, dead, b]).await;

    for _ in 0..50 {
        assert_eq!(lb.get("/").await.status, StatusCode::OK);
    }

    assert_eq!(app_a.hits() + app_b.hits(), 50);
    lb.wait_health(dead, false).await;
    assert!(lb.status_of(a) && lb.status_of(b));
}

#[tokio::test]
async fn request_that_may_have_reached_an_upstream_is_retried_only_when_safe() {
    let drops_left = Arc::new(AtomicUsize::new(0));
    let x = spawn_raw(Misbehaviour::Drop, drops_left.clone()).await;
    let y = spawn_raw(Misbehaviour::Drop, drops_left.clone()).await;
    let opts = BalancerOptions {
        keyed_routes: vec!["POST /orders".to_owned()],
        ..steady()
    };
    let lb = start(opts, vec![x.addr, y.addr]).await;
    let hits = || (x.hits.load(Ordering::SeqCst), y.hits.load(Ordering::SeqCst));

    // POST without a key: the first upstream got it and dropped it; doing it again could
    // create a second order.
    drops_left.store(1, Ordering::SeqCst);
    let reply = lb.send(Method::POST, "/orders", &[], b"{}").await;
    reply.assert_problem(StatusCode::BAD_GATEWAY);
    assert_eq!(hits().0 + hits().1, 1, "reached exactly one upstream");

    // The same POST with an Idempotency-Key, on a route declared to honour it, goes to the
    // other upstream.
    let before = hits();
    drops_left.store(1, Ordering::SeqCst);
    let keyed = [("idempotency-key", "order-42")];
    let reply = lb.send(Method::POST, "/orders", &keyed, b"{}").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!((hits().0 - before.0, hits().1 - before.1), (1, 1));

    // A key on a route that does not declare it (a signup) is not trusted.
    let before = hits();
    drops_left.store(1, Ordering::SeqCst);
    let reply = lb.send(Method::POST, "/signup", &keyed, b"{}").await;
    reply.assert_problem(StatusCode::BAD_GATEWAY);
    assert_eq!(
        (hits().0 - before.0) + (hits().1 - before.1),
        1,
        "sent once"
    );

    // A GET is idempotent: retried too.
    let before = hits();
    drops_left.store(1, Ordering::SeqCst);
    assert_eq!(lb.get("/orders/42").await.status, StatusCode::OK);
    assert_eq!((hits().0 - before.0, hits().1 - before.1), (1, 1));

    assert_eq!(lb.balancer.retries_total(), 2);
}

#[tokio::test]
async fn draining_upstream_gets_no_new_traffic_after_the_next_health_check() {
    let (a, app_a) = App::named("a").spawn().await;
    let (b, app_b) = App::named("b").spawn().await;
    let opts = BalancerOptions {
        health_interval: Duration::from_millis(20),
        health_timeout: Duration::from_secs(10),
        ..BalancerOptions::default()
    };
    let lb = start(opts, vec![a, b]).await;
    lb.wait_health(a, true).await;

    app_a.draining.store(true, Ordering::SeqCst);
    lb.wait_health(a, false).await;
    let before = app_a.hits();
    for _ in 0..20 {
        assert_eq!(lb.get("/").await.status, StatusCode::OK);
    }

    assert_eq!(app_a.hits(), before);
    assert_eq!(app_b.hits(), 20);
    assert_eq!(
        lb.balancer.upstreams(),
        [
            UpstreamStatus {
                addr: a,
                healthy: false,
                alive: true,
                ejected: false,
            },
            UpstreamStatus {
                addr: b,
                healthy: true,
                alive: true,
                ejected: false,
            },
        ]
    );
}

#[tokio::test]
async fn a_503_from_a_draining_upstream_is_retried_elsewhere() {
    let (a, app_a) = App::named("a").spawn().await;
    let (b, app_b) = App::named("b").spawn().await;
    let opts = BalancerOptions {
        health_interval: Duration::from_secs(3600),
        health_timeout: Duration::from_secs(10),
        ..BalancerOptions::default()
    };
    let lb = start(opts, vec![a, b]).await;
    // Let the one health check of this test pass while everything is fine.
    for _ in 0..500 {
        if app_a.readyz_hits.load(Ordering::SeqCst) > 0
            && app_b.readyz_hits.load(Ordering::SeqCst) > 0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // `a` starts draining; the balancer only learns it from a 503.
    app_a.draining.store(true, Ordering::SeqCst);
    app_a.refusing.store(true, Ordering::SeqCst);
    for _ in 0..2 {
        let reply = lb.get("/").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), "b got 0 bytes");
    }

    assert_eq!(app_a.hits(), 1, "one 503, then a is known to drain");
    assert_eq!(app_b.hits(), 2);
    assert_eq!(lb.balancer.retries_total(), 1);
    assert!(!lb.status_of(a));
}

#[tokio::test]
async fn a_503_from_a_ready_upstream_is_the_applications_answer_and_passed_through() {
    let (a, app_a) = App::named("a").spawn().await;
    let (b, app_b) = App::named("b").spawn().await;
    let lb = start(steady(), vec![a, b]).await;

    let reply = lb.get("/busy").await;

    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.text(), "busy: app says so");
    assert_eq!(app_a.hits() + app_b.hits(), 1);
}

#[tokio::test]
async fn oversized_body_is_413_and_cookies_and_instances_pass_intact() {
    let (a, app_a) = App::named("a").spawn().await;
    let opts = BalancerOptions {
        max_buffered_body: 1024,
        ..steady()
    };
    let lb = start(opts, vec![a]).await;

    let reply = lb.send(Method::POST, "/uploads", &[], &[7; 2048]).await;
    reply.assert_problem(StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(app_a.hits(), 0);
    let reply = lb.send(Method::POST, "/uploads", &[], &[7; 1024]).await;
    assert_eq!(reply.text(), "a got 1024 bytes");

    let reply = lb.get("/cookies").await;
    let cookies: Vec<_> = reply.headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["sid=abc; Path=/; HttpOnly", "theme=dark; Path=/"]);

    // Operator endpoints are on their own listener; the public port refuses them.
    for path in ["/ops/instances", "/ops/upstreams", "/ops/stats", "/metrics"] {
        lb.get(path).await.assert_problem(StatusCode::NOT_FOUND);
    }
    let reply = lb.ops_get("/ops/instances").await;
    assert_eq!((reply.status, reply.text()), (StatusCode::OK, "[]"));
    let published = r#"[{"id":1,"addr":"127.0.0.1:4001","pid":42}]"#;
    lb.balancer
        .publish_instances(Bytes::from_static(published.as_bytes()));
    let reply = lb.ops_get("/ops/instances").await;
    assert_eq!(reply.headers["content-type"], "application/json");
    assert_eq!(reply.text(), published);

    let reply = lb.ops_get("/ops/upstreams").await;
    assert_eq!(
        reply.json(),
        serde_json::json!([{ "addr": a.to_string(), "healthy": true, "alive": true, "ejected": false }])
    );
}

#[tokio::test]
async fn end_to_end_headers_are_forwarded_and_hop_by_hop_ones_are_not() {
    let (a, _app) = App::named("a").spawn().await;
    let lb = start(steady(), vec![a]).await;

    let sent = [
        ("host", "shop.example"),
        ("cookie", "sid=abc"),
        ("origin", "https://shop.example"),
        ("sec-fetch-site", "same-origin"),
        ("idempotency-key", "k-1"),
        ("x-forwarded-for", "203.0.113.7"),
        ("connection", "x-hop"),
        ("x-hop", "1"),
        ("proxy-authorization", "Basic eDp5"),
        ("te", "trailers"),
    ];
    let seen = lb.send(Method::GET, "/headers", &sent, b"").await.json();

    for (name, value) in &sent[..5] {
        assert_eq!(seen[name], *value, "{name}");
    }
    assert_eq!(seen["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    for name in ["x-hop", "proxy-authorization", "te"] {
        assert!(seen.get(name).is_none(), "{name} leaked: {seen}");
    }
}

#[tokio::test]
async fn paused_upstream_times_out_and_a_get_is_retried_on_another() {
    let hung = spawn_raw(Misbehaviour::Hang, Arc::default()).await;
    let (b, app_b) = App::named("b").spawn().await;
    let opts = BalancerOptions {
        attempt_timeout: Duration::from_millis(300),
        ..steady()
    };
    let lb = start(opts, vec![hung.addr, b]).await;

    // Round-robin makes at least one of the two start at the paused upstream.
    for _ in 0..2 {
        assert_eq!(lb.get("/").await.text(), "b got 0 bytes");
    }

    assert_eq!(hung.hits.load(Ordering::SeqCst), 1);
    assert_eq!(app_b.hits(), 2);
    assert_eq!(lb.balancer.retries_total(), 1);
}

#[tokio::test]
async fn post_to_a_paused_upstream_times_out_without_retry() {
    let p = spawn_raw(Misbehaviour::Hang, Arc::default()).await;
    let q = spawn_raw(Misbehaviour::Hang, Arc::default()).await;
    let opts = BalancerOptions {
        attempt_timeout: Duration::from_millis(200),
        ..steady()
    };
    let lb = start(opts, vec![p.addr, q.addr]).await;

    let reply = lb.send(Method::POST, "/orders", &[], b"{}").await;

    reply.assert_problem(StatusCode::GATEWAY_TIMEOUT);
    let hits = p.hits.load(Ordering::SeqCst) + q.hits.load(Ordering::SeqCst);
    assert_eq!(hits, 1);
}

#[tokio::test]
async fn no_upstream_is_503() {
    let lb = start(steady(), vec![]).await;
    lb.get("/")
        .await
        .assert_problem(StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn all_upstreams_gone_is_a_fast_503_without_trying_any() {
    let dead = [dead_addr().await, dead_addr().await];
    let lb = start(steady(), dead.to_vec()).await;
    for _ in 0..500 {
        if lb.balancer.upstreams().iter().all(|u| !u.alive) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let reply = lb.send(Method::POST, "/orders", &[], b"{}").await;

    reply.assert_problem(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.headers["retry-after"], "1");
    assert_eq!(lb.balancer.retries_total(), 0);
}

#[tokio::test]
async fn a_frozen_upstream_costs_under_a_second_and_then_gets_nothing() {
    let frozen = spawn_raw(Misbehaviour::Hang, Arc::default()).await;
    let (b, app_b) = App::named("b").spawn().await;
    // The default 15 s attempt timeout: only liveness can cut the wait short.
    let lb = start(BalancerOptions::default(), vec![frozen.addr, b]).await;
    let second = Duration::from_secs(1);

    for _ in 0..4 {
        let started = std::time::Instant::now();
        assert_eq!(lb.get("/").await.text(), "b got 0 bytes");
        assert!(started.elapsed() < second, "took {:?}", started.elapsed());
    }
    assert!(frozen.hits.load(Ordering::SeqCst) <= 1);
    assert_eq!(app_b.hits(), 4);

    // A POST without a key that reached the frozen one is not re-sent: a 504, not a hang.
    let only_frozen = start(BalancerOptions::default(), vec![frozen.addr]).await;
    let started = std::time::Instant::now();
    let reply = only_frozen.send(Method::POST, "/orders", &[], b"{}").await;
    assert!(started.elapsed() < second, "took {:?}", started.elapsed());
    assert!(
        [StatusCode::GATEWAY_TIMEOUT, StatusCode::SERVICE_UNAVAILABLE].contains(&reply.status),
        "{}",
        reply.status
    );
}

#[tokio::test]
async fn shutdown_lets_the_in_flight_request_finish() {
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let app = App {
        slow: Some((arrived_tx, release.clone())),
        ..App::named("a")
    };
    let (a, _app) = app.spawn().await;
    let mut lb = start(steady(), vec![a]).await;
    let addr = lb.addr;
    let client = lb.client.clone();
    let in_flight = tokio::spawn(async move {
        let req = Request::get(format!("http://{addr}/slow"))
            .body(Full::default())
            .expect("request");
        let resp = client.request(req).await.expect("answered");
        resp.into_body().collect().await.expect("body").to_bytes()
    });
    arrived.recv().await.expect("request reached the upstream");

    lb.stop
        .take()
        .expect("not stopped yet")
        .send(())
        .expect("balancer running");
    release.notify_one();

    assert_eq!(in_flight.await.expect("task"), "finally");
    lb.served.await.expect("task").expect("serve returns Ok");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}

/// Opens a connection to `to` from the loopback address `from` (all of 127.0.0.0/8 is local).
async fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((from, 0)))
        .expect("bind a loopback source address");
    socket.connect(to).await.expect("connect")
}

/// Reads until the peer closes (bounded by the caller's timeout).
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut all = Vec::new();
    let _ = stream.read_to_end(&mut all).await;
    String::from_utf8_lossy(&all).into_owned()
}

#[tokio::test]
async fn slow_clients_are_cut_off_and_cannot_take_every_connection() {
    let (a, app) = App::named("a").spawn().await;
    let opts = BalancerOptions {
        header_read_timeout: Duration::from_millis(300),
        body_read_timeout: Duration::from_millis(300),
        max_connections_per_client: 4,
        ..steady()
    };
    let lb = start(opts, vec![a]).await;
    let bound = Duration::from_secs(5);

    // A body shorter than its Content-Length: 408 problem+json, then the connection closes.
    let mut short = connect_from([127, 0, 0, 1], lb.addr).await;
    short
        .write_all(b"POST /orders HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{}")
        .await
        .unwrap();
    let answer = tokio::time::timeout(bound, read_to_close(&mut short))
        .await
        .expect("the balancer gives up on the body");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert_eq!(
        app.hits(),
        0,
        "an incomplete request never reaches an instance"
    );

    // A head that never ends: the connection is closed.
    let mut trickle = connect_from([127, 0, 0, 1], lb.addr).await;
    trickle.write_all(b"GET / HTTP/1.1\r\nhost:").await.unwrap();
    tokio::time::timeout(bound, read_to_close(&mut trickle))
        .await
        .expect("the balancer closes a trickling head");

    // Four idle connections from one address fill its share; a fifth is refused at once…
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(connect_from([127, 0, 0, 7], lb.addr).await);
    }
    let mut fifth = connect_from([127, 0, 0, 7], lb.addr).await;
    let refused = tokio::time::timeout(bound, read_to_close(&mut fifth))
        .await
        .expect("refused at once");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("too many connections"), "{refused}");
    // …while everyone else is served as usual.
    let mut other = connect_from([127, 0, 0, 8], lb.addr).await;
    other
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let served = tokio::time::timeout(bound, read_to_close(&mut other))
        .await
        .expect("served");
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    assert!(served.ends_with("a got 0 bytes"), "{served}");
    drop(idle);
}

/// A streamed route (a resumable upload's PATCH) is not buffered: a body past the buffer limit
/// passes; one that stalls is cut after the body timeout (400: the client's failure, not the
/// instance's), and is not sent anywhere else.
#[tokio::test]
async fn streamed_routes_flow_past_the_buffer_limit_and_a_stall_cuts_them_once() {
    let (a, app_a) = App::named("a").spawn().await;
    let (b, app_b) = App::named("b").spawn().await;
    let opts = BalancerOptions {
        max_buffered_body: 1024,
        body_read_timeout: Duration::from_millis(300),
        streamed_routes: vec!["PATCH /uploads/{id}".to_owned()],
        ..steady()
    };
    let lb = start(opts, vec![a, b]).await;
    let big = vec![7; 64 * 1024];
    let reply = lb.send(Method::PATCH, "/uploads/1", &[], &big).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(
        reply.text().ends_with("got 65536 bytes"),
        "{}",
        reply.text()
    );
    // Any other route still buffers, and refuses what does not fit.
    let reply = lb.send(Method::PATCH, "/uploads", &[], &big).await;
    reply.assert_problem(StatusCode::PAYLOAD_TOO_LARGE);
    let before = app_a.hits() + app_b.hits();

    // 10 bytes of 100, then nothing: the body is cut on its way, and the request is not
    // re-sent to the other instance.
    let mut stalled = connect_from([127, 0, 0, 1], lb.addr).await;
    stalled
        .write_all(b"PATCH /uploads/2 HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), read_to_close(&mut stalled))
        .await
        .expect("the balancer gives up on the stalled body");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(
        app_a.hits() + app_b.hits(),
        before + 1,
        "sent once, to one instance"
    );
    // The client's failure is not held against the instance.
    assert!(
        lb.status_of(a) && lb.status_of(b),
        "{:?}",
        lb.balancer.upstreams()
    );
}

#[tokio::test]
async fn unparsable_requests_get_problems_not_empty_bodies() {
    let (a, app) = App::named("a").spawn().await;
    let lb = start(steady(), vec![a]).await;
    holdfast_testkit::process::assert_unparsable_requests_get_problems(lb.addr).await;
    assert_eq!(app.hits(), 0, "nothing unparsable reaches an instance");
}

#[tokio::test]
async fn a_ready_upstream_that_keeps_failing_is_ejected_and_comes_back() {
    let (a, broken) = App::named("a").spawn().await;
    let (b, _) = App::named("b").spawn().await;
    broken.failing.store(true, Ordering::SeqCst);
    let opts = BalancerOptions {
        eject_after_failures: 3,
        ejection_time: Duration::from_millis(500),
        ..steady()
    };
    let lb = start(opts, vec![a, b]).await;
    // Round robin sends every other request to the broken one until it has failed 3 times.
    let mut failed = 0;
    for _ in 0..6 {
        if lb.get("/").await.status == StatusCode::INTERNAL_SERVER_ERROR {
            failed += 1;
        }
    }
    assert_eq!(failed, 3);
    let ejected = |lb: &TestBalancer| {
        lb.balancer
            .upstreams()
            .iter()
            .any(|u| u.addr == a && u.ejected)
    };
    assert!(ejected(&lb), "{:?}", lb.balancer.upstreams());
    // Its /readyz still says ready, yet nothing goes to it while it is ejected.
    for _ in 0..10 {
        assert_eq!(lb.get("/").await.status, StatusCode::OK);
    }
    assert_eq!(broken.hits(), 3);
    // Mended, it gets traffic again once the ejection lapses.
    broken.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!ejected(&lb));
    for _ in 0..4 {
        assert_eq!(lb.get("/").await.status, StatusCode::OK);
    }
    assert!(broken.hits() > 3, "served again");
}

#[tokio::test]
async fn a_client_over_its_rate_waits_its_turn_and_past_a_second_gets_429() {
    let (a, app) = App::named("a").spawn().await;
    let opts = BalancerOptions {
        client_rate: Some(ClientRate {
            per_second: 10,
            burst: 5,
        }),
        ..steady()
    };
    let lb = start(opts, vec![a]).await;
    // Thirty at once from one address: five pass at once, the next ten wait their turn (up
    // to a second), the rest wait the second and are refused.
    let started = std::time::Instant::now();
    let replies = futures::future::join_all((0..30).map(|_| lb.get("/"))).await;
    let ok = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    let refused: Vec<&Reply> = replies
        .iter()
        .filter(|r| r.status == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert_eq!(ok + refused.len(), 30);
    assert!((15..=17).contains(&ok), "{ok} passed");
    for r in &refused {
        assert_eq!(
            r.headers[http::header::CONTENT_TYPE],
            "application/problem+json"
        );
        assert!(r.headers.contains_key(http::header::RETRY_AFTER));
    }
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "refusals are slow"
    );
    assert_eq!(
        app.hits(),
        ok,
        "a refused request never reaches an instance"
    );
    let stats: serde_json::Value =
        serde_json::from_slice(&lb.ops_get("/ops/stats").await.body).unwrap();
    assert_eq!(stats["rate_limited_total"], refused.len());
}
