//! The example service over real HTTP on port 0: one webhook per accepted POST reaches the
//! receiver, exactly once in effect, while POSTs are retried, two workers race for the jobs
//! and the receiver acts on a first delivery and then hangs past the worker's timeout.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use holdfast_jobs::{Wakeup, Worker, WorkerOptions};
use holdfast_store::{Store, StoreOptions};
use holdfast_testkit::process::get_json;
use holdfast_web::{AppState, WebOptions};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use webhook_once::{Deliveries, Delivery};

/// Every request the receiver got: (Idempotency-Key, body).
type Received = Arc<Mutex<Vec<(String, Value)>>>;

/// A receiver on port 0. It acts on every request (records it); the first request of every
/// other key then hangs for 2 s, past the worker's timeout, so the worker cannot know it acted.
async fn receiver() -> (String, Received) {
    async fn hook(State(got): State<Received>, headers: HeaderMap, body: String) -> StatusCode {
        let key = headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let first = {
            let mut got = got.lock().unwrap();
            let seen = got.iter().filter(|(k, _)| *k == key).count();
            got.push((
                key.clone(),
                serde_json::from_str(&body).unwrap_or(Value::Null),
            ));
            seen == 0 && got.len() % 2 == 0
        };
        if first {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        StatusCode::NO_CONTENT
    }
    let got = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(got.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}

async fn open(url: &str) -> Store {
    Store::open(&StoreOptions::new(url).schema(&webhook_once::SCHEMA))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_webhook_per_post_exactly_once_in_effect() {
    let dir = tempfile::tempdir().unwrap();
    let db = holdfast_store::testing::sqlite_url(dir.path());
    let store = open(&db).await;

    // The service on port 0.
    let web = WebOptions {
        secure_cookies: false,
        ..WebOptions::default()
    };
    let app = holdfast_web::app(
        AppState::new(store.clone(), web, None),
        webhook_once::router(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    // Two workers, each with its own pool, as two processes would have.
    let mut stops = Vec::new();
    for _ in 0..2 {
        let store = open(&db).await;
        let opts = WorkerOptions {
            queues: Deliveries::queues(4),
            lease: Duration::from_secs(1),
            heartbeat_every: Duration::from_millis(200),
            rescue_every: Duration::from_millis(100),
            idle_poll: Duration::from_millis(200),
            backoff: holdfast_core::retry::RetryPolicy {
                base: Duration::from_millis(50),
                cap: Duration::from_millis(200),
                max_attempts: u32::MAX,
                deadline: Duration::MAX,
            },
            wakeup: Wakeup::SqliteFile(dir.path().join("holdfast.sqlite")),
            ..WorkerOptions::default()
        };
        let deliveries = Deliveries::new(store.clone(), Duration::from_millis(300)).unwrap();
        let worker = deliveries.register(Worker::new(store, opts));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop);
        tokio::spawn(worker.run(async {
            let _ = stopped.await;
        }));
    }

    let (hook, received) = receiver().await;
    let http = reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .unwrap();
    let creds = json!({ "email": "ops@example.com", "password": "correct horse battery" });
    for path in ["/api/signup", "/api/login"] {
        let r = http
            .post(format!("{base}{path}"))
            .json(&creds)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }

    // 12 POSTs, each sent twice with its key (a client retrying after a timeout): one delivery
    // each, the retry replays the first answer.
    let mut accepted = HashMap::new();
    for n in 0..12 {
        let key = format!("post-{n}");
        let body = json!({ "url": hook, "payload": { "n": n } });
        let mut ids = Vec::new();
        for _ in 0..2 {
            let r = http
                .post(format!("{base}/api/webhooks"))
                .header("idempotency-key", &key)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::ACCEPTED);
            ids.push(r.json::<Delivery>().await.unwrap().id);
        }
        assert_eq!(ids[0], ids[1], "a retried POST replays its answer");
        accepted.insert(format!("webhook-{}", ids[0]), n);
    }
    // The same key with another payload is refused and delivers nothing.
    let refused = http
        .post(format!("{base}/api/webhooks"))
        .header("idempotency-key", "post-0")
        .json(&json!({ "url": hook, "payload": { "n": 99 } }))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);

    // Every delivery is eventually sent.
    let deadline = Instant::now() + Duration::from_secs(30);
    for key in accepted.keys() {
        let id = key.trim_start_matches("webhook-");
        loop {
            let d: Delivery = get_json(&http, &format!("{base}/api/webhooks/{id}")).await;
            if d.status == "sent" {
                break;
            }
            assert!(Instant::now() < deadline, "{id} still {}", d.status);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let got = received.lock().unwrap().clone();
    let mut by_key: HashMap<&str, Vec<&Value>> = HashMap::new();
    for (k, body) in &got {
        by_key.entry(k.as_str()).or_default().push(body);
    }
    assert_eq!(
        by_key.len(),
        accepted.len(),
        "one key per accepted POST, no other: {by_key:?}"
    );
    for (key, n) in &accepted {
        let bodies = by_key
            .get(key.as_str())
            .unwrap_or_else(|| panic!("{key} never arrived"));
        assert!(
            bodies.iter().all(|b| **b == json!({ "n": n })),
            "{key}: {bodies:?}"
        );
    }
    assert!(
        got.len() > accepted.len(),
        "the hanging receiver made the workers send again, under the same keys"
    );
    for stop in stops {
        let _ = stop.send(());
    }
}
