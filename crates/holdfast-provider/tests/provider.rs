//! The provider over real sockets on 127.0.0.1:0: idempotency, concurrency, faults, emails.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use holdfast_provider::{serve, Charge, Email, Faults, ProviderClient, ProviderOptions, Stats};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Every await in these tests is bounded by this.
const BOUND: Duration = Duration::from_secs(10);

struct TestProvider {
    base: String,
    addr: std::net::SocketAddr,
    client: ProviderClient,
    http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

async fn spawn() -> TestProvider {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, ProviderOptions::default(), async {
        let _ = stopped.await;
    }));
    let base = format!("http://{addr}");
    TestProvider {
        client: ProviderClient::new(&base, BOUND).unwrap(),
        http: reqwest::Client::builder().timeout(BOUND).build().unwrap(),
        base,
        addr,
        stop: Some(stop),
        server: Some(server),
    }
}

impl TestProvider {
    async fn post(
        &self,
        path: &str,
        key: Option<&str>,
        body: Value,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(&body);
        if let Some(key) = key {
            req = req.header("Idempotency-Key", key);
        }
        let resp = req.send().await.unwrap();
        let (status, headers) = (resp.status(), resp.headers().clone());
        (status, headers, resp.json().await.unwrap())
    }

    async fn charge_status(&self, key: &str, order_id: &str, amount_cents: i64) -> StatusCode {
        let body = json!({ "order_id": order_id, "amount_cents": amount_cents });
        self.post("/charges", Some(key), body).await.0
    }

    async fn faults(&self, f: Faults) {
        self.client.set_faults(&f).await.unwrap();
    }

    async fn stats(&self) -> Stats {
        self.client.stats().await.unwrap()
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(BOUND, server)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        }
    }
}

#[tokio::test]
async fn a_charge_is_created_once_and_replayed_by_key() {
    let p = spawn().await;
    let body = json!({ "order_id": "o-1", "amount_cents": 1250 });

    let (status, headers, first) = p.post("/charges", Some("k-1"), body.clone()).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(headers.get("idempotent-replayed").is_none());
    let first: Charge = serde_json::from_value(first).unwrap();
    assert!(first.id.starts_with("ch_"));
    assert_eq!(
        (
            first.idempotency_key.as_str(),
            first.order_id.as_str(),
            first.amount_cents
        ),
        ("k-1", "o-1", 1250)
    );

    let (status, headers, again) = p.post("/charges", Some("k-1"), body.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(serde_json::from_value::<Charge>(again).unwrap(), first);

    let other = json!({ "order_id": "o-1", "amount_cents": 999 });
    let (status, headers, problem) = p.post("/charges", Some("k-1"), other).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(problem["status"], 422);

    // Input the provider refuses, each with its status.
    for (key, body, want) in [
        (None, body.clone(), 400),
        (Some(""), body.clone(), 400),
        (Some(&*"k".repeat(256)), body.clone(), 400),
        (
            Some("k-2"),
            json!({ "order_id": "o-2", "amount_cents": 0 }),
            422,
        ),
        (Some("k-2"), json!({ "order_id": "o-2" }), 422),
        (
            Some("k-2"),
            json!({ "order_id": "", "amount_cents": 5 }),
            422,
        ),
        (
            Some("k-2"),
            json!({ "order_id": "o-2", "amount_cents": 5, "x": 1 }),
            422,
        ),
    ] {
        let (status, headers, _) = p.post("/charges", key, body.clone()).await;
        assert_eq!(status.as_u16(), want, "key {key:?} body {body}");
        assert_eq!(headers["content-type"], "application/problem+json");
    }
    let malformed = p
        .http
        .post(format!("{}/charges", p.base))
        .header("Idempotency-Key", "k-3")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);

    let second = p.client.charge("k-4", "o-4", 400).await.unwrap();
    assert_eq!(
        p.client.charges(None).await.unwrap(),
        vec![first.clone(), second.clone()]
    );
    assert_eq!(p.client.charges(Some("k-4")).await.unwrap(), vec![second]);
    assert_eq!(p.client.charges(Some("nope")).await.unwrap(), vec![]);
    // The client classifies refusals as final.
    let err = p.client.charge("k-1", "o-other", 1).await.unwrap_err();
    assert!(
        err.is_rejected() && !err.is_retryable() && !err.is_outcome_unknown(),
        "{err}"
    );

    let stats = p.stats().await;
    assert_eq!((stats.charges_total, stats.replays_total), (2, 1));
    let health = p
        .http
        .get(format!("{}/healthz", p.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    p.stop().await;
}

#[tokio::test]
async fn concurrent_requests_with_one_key_make_exactly_one_charge() {
    let p = spawn().await;
    // Latency keeps the first request in flight while the others arrive.
    p.faults(Faults {
        latency_ms: 50,
        ..Faults::default()
    })
    .await;
    let requests = (0..200).map(|_| {
        let (http, url) = (p.http.clone(), format!("{}/charges", p.base));
        tokio::spawn(async move {
            let resp = http
                .post(url)
                .header("Idempotency-Key", "same")
                .json(&json!({ "order_id": "o-1", "amount_cents": 700 }))
                .send()
                .await
                .unwrap();
            let status = resp.status();
            (status, resp.json::<Value>().await.unwrap())
        })
    });
    let answers = futures::future::join_all(requests).await;

    let charges = p.client.charges(None).await.unwrap();
    assert_eq!(charges.len(), 1, "{charges:?}");
    let mut created = 0;
    for answer in answers {
        let (status, body) = answer.unwrap();
        match status {
            StatusCode::CREATED | StatusCode::OK => {
                created += usize::from(status == StatusCode::CREATED);
                assert_eq!(serde_json::from_value::<Charge>(body).unwrap(), charges[0]);
            }
            StatusCode::CONFLICT => assert_eq!(body["status"], 409),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(created, 1);
    p.stop().await;
}

#[tokio::test]
async fn injected_failure_answers_503_and_does_nothing() {
    let p = spawn().await;
    p.faults(Faults {
        fail_rate: 1.0,
        ..Faults::default()
    })
    .await;
    assert_eq!(
        p.charge_status("k", "o", 100).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let err = p.client.charge("k", "o", 100).await.unwrap_err();
    assert!(
        err.is_retryable() && !err.is_outcome_unknown() && !err.is_rejected(),
        "{err}"
    );
    assert!(p.client.charges(None).await.unwrap().is_empty());
    assert_eq!(p.stats().await.failed_total, 2);

    // The failed attempt released its key: a retry acts.
    p.faults(Faults::default()).await;
    assert_eq!(p.charge_status("k", "o", 100).await, StatusCode::CREATED);
    p.stop().await;
}

#[tokio::test]
async fn act_then_timeout_acts_and_a_retry_replays_instead_of_charging_twice() {
    let p = spawn().await;
    let hang = |hang_ms| Faults {
        act_then_timeout_rate: 1.0,
        hang_ms,
        ..Faults::default()
    };

    // Hang shorter than the client's timeout: the connection closes with no answer at all.
    p.faults(hang(50)).await;
    let mut raw = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let body = r#"{"order_id":"o-raw","amount_cents":1}"#;
    let request = format!(
        "POST /charges HTTP/1.1\r\nhost: x\r\nidempotency-key: raw\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    raw.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(BOUND, raw.read_to_end(&mut answer))
        .await
        .unwrap();
    assert!(
        read.is_err() || answer.is_empty(),
        "got an answer: {:?}",
        String::from_utf8_lossy(&answer)
    );

    let err = p.client.charge("k-closed", "o-1", 500).await.unwrap_err();
    assert!(
        err.is_outcome_unknown() && err.is_retryable() && !err.is_rejected(),
        "{err}"
    );

    // Hang longer than the client's timeout: the client gives up first.
    p.faults(hang(60_000)).await;
    let impatient = ProviderClient::new(&p.base, Duration::from_millis(200)).unwrap();
    let err = impatient.charge("k-timeout", "o-2", 600).await.unwrap_err();
    assert!(err.is_outcome_unknown(), "{err}");

    // Yet the provider acted, each time.
    let charges = p.client.charges(None).await.unwrap();
    let keys: Vec<_> = charges.iter().map(|c| c.idempotency_key.as_str()).collect();
    assert_eq!(keys, ["raw", "k-closed", "k-timeout"]);

    // A retry with the same key gets the same charge back, not a second one.
    p.faults(Faults::default()).await;
    for (key, order, amount) in [("k-closed", "o-1", 500), ("k-timeout", "o-2", 600)] {
        let retried = p.client.charge(key, order, amount).await.unwrap();
        assert_eq!(p.client.charges(Some(key)).await.unwrap(), vec![retried]);
    }
    assert_eq!(p.client.charges(None).await.unwrap().len(), 3);
    assert_eq!(p.stats().await.act_then_timeout_total, 3);
    p.stop().await;
}

#[tokio::test]
async fn shutdown_does_not_wait_for_a_hanging_request() {
    let p = spawn().await;
    p.faults(Faults {
        act_then_timeout_rate: 1.0,
        hang_ms: 600_000,
        ..Faults::default()
    })
    .await;
    let client = p.client.clone();
    let hanging = tokio::spawn(async move { client.charge("k", "o", 1).await });
    while p.stats().await.act_then_timeout_total == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    p.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let err = hanging.await.unwrap().unwrap_err();
    assert!(err.is_outcome_unknown(), "{err}");
}

#[tokio::test]
async fn latency_delays_the_answer() {
    let p = spawn().await;
    p.faults(Faults {
        latency_ms: 200,
        ..Faults::default()
    })
    .await;
    let started = Instant::now();
    p.client.charge("k", "o", 1).await.unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // Reads are never delayed.
    let started = Instant::now();
    p.client.charges(None).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(150),
        "{:?}",
        started.elapsed()
    );
    p.stop().await;
}

#[tokio::test]
async fn a_seed_makes_the_fault_pattern_reproducible() {
    let p = spawn().await;
    let seeded = |seed| Faults {
        fail_rate: 0.5,
        seed: Some(seed),
        ..Faults::default()
    };
    let mut patterns = Vec::new();
    for (round, seed) in [(0, 42), (1, 42), (2, 43)] {
        p.faults(seeded(seed)).await;
        let mut pattern = Vec::new();
        for i in 0..32 {
            pattern.push(
                p.charge_status(&format!("k-{round}-{i}"), "o", 1)
                    .await
                    .as_u16(),
            );
        }
        patterns.push(pattern);
    }
    assert_eq!(patterns[0], patterns[1]);
    assert_ne!(patterns[0], patterns[2]);
    assert!(
        patterns[0].contains(&503) && patterns[0].contains(&201),
        "{:?}",
        patterns[0]
    );
    let fails = patterns.iter().flatten().filter(|s| **s == 503).count();
    assert_eq!(p.stats().await.failed_total, fails as u64);
    assert_eq!(p.client.charges(None).await.unwrap().len(), 96 - fails);
    p.stop().await;
}

#[tokio::test]
async fn fault_settings_are_validated_and_read_back() {
    let p = spawn().await;
    assert_eq!(p.client.faults().await.unwrap(), Faults::default());
    let put = |body: Value| p.http.put(format!("{}/_faults", p.base)).json(&body).send();
    assert_eq!(
        put(json!({ "fail_rate": 1.5 })).await.unwrap().status(),
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        put(json!({ "fail_rat": 0.5 })).await.unwrap().status(),
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        put(json!({ "latency_ms": 5 })).await.unwrap().status(),
        StatusCode::OK
    );
    let want = Faults {
        latency_ms: 5,
        ..Faults::default()
    };
    assert_eq!(p.client.faults().await.unwrap(), want);
    let huge = p
        .http
        .post(format!("{}/charges", p.base))
        .header("Idempotency-Key", "huge-1")
        .body(vec![b' '; 10 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(huge.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(huge.headers()["content-type"], "application/problem+json");
    let missing = p.http.get(format!("{}/nope", p.base)).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        missing.headers()["content-type"],
        "application/problem+json"
    );
    p.stop().await;
}

#[tokio::test]
async fn emails_are_idempotent_with_a_key_and_new_without() {
    let p = spawn().await;
    let body = json!({ "order_id": "o-1", "to": "a@example.com", "kind": "receipt" });

    let first = p
        .client
        .send_email("receipt:o-1", "o-1", "a@example.com", "receipt")
        .await
        .unwrap();
    assert!(first.id.starts_with("em_"));
    let (status, headers, again) = p.post("/emails", Some("receipt:o-1"), body.clone()).await;
    assert_eq!(
        (status, &headers["idempotent-replayed"]),
        (StatusCode::OK, &"true".parse().unwrap())
    );
    assert_eq!(serde_json::from_value::<Email>(again).unwrap(), first);
    let other = json!({ "order_id": "o-1", "to": "b@example.com", "kind": "receipt" });
    assert_eq!(
        p.post("/emails", Some("receipt:o-1"), other).await.0,
        StatusCode::UNPROCESSABLE_ENTITY
    );

    let mut ids = HashSet::new();
    for _ in 0..3 {
        let (status, _, email) = p.post("/emails", None, body.clone()).await;
        assert_eq!(status, StatusCode::CREATED);
        let email: Email = serde_json::from_value(email).unwrap();
        assert_eq!(email.idempotency_key, None);
        ids.insert(email.id);
    }
    assert_eq!(ids.len(), 3);
    assert_eq!(
        p.post(
            "/emails",
            None,
            json!({ "order_id": "o", "to": "nobody", "kind": "k" })
        )
        .await
        .0,
        StatusCode::UNPROCESSABLE_ENTITY
    );

    let emails = p.client.emails(None).await.unwrap();
    assert_eq!(emails.len(), 4);
    assert_eq!(emails[0], first);
    assert_eq!(
        p.client.emails(Some("receipt:o-1")).await.unwrap(),
        vec![first]
    );
    assert_eq!(p.stats().await.emails_total, 4);
    p.stop().await;
}

#[tokio::test]
async fn client_errors_say_whether_the_provider_may_have_acted() {
    // Nothing listens here: nothing was sent, so the outcome is known (nothing happened).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let client = ProviderClient::new(&format!("http://{addr}"), BOUND).unwrap();
    let err = client.charge("k", "o", 1).await.unwrap_err();
    assert!(
        !err.is_outcome_unknown() && err.is_retryable() && !err.is_rejected(),
        "{err}"
    );
    assert!(ProviderClient::new("not a url", BOUND).is_err());
}

#[tokio::test]
async fn unparsable_requests_get_problems_not_empty_bodies() {
    let p = spawn().await;
    holdfast_testkit::process::assert_unparsable_requests_get_problems(p.addr).await;
}

#[tokio::test]
async fn a_charge_is_refunded_once_and_the_refund_replays_by_key() {
    let p = spawn().await;
    let charge = p.client.charge("k-refund", "order-r", 1250).await.unwrap();
    let (status, _, refund) = p
        .post("/refunds", Some("r-1"), json!({ "charge_id": charge.id }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{refund}");
    assert_eq!(refund["amount_cents"], 1250);
    assert_eq!(refund["order_id"], "order-r");
    // The same key again replays the same refund.
    let replayed = p.client.refund("r-1", &charge.id).await.unwrap();
    assert_eq!(replayed.id, refund["id"].as_str().unwrap());
    // Another key for the same charge is refused: one refund per charge.
    let (status, _, problem) = p
        .post("/refunds", Some("r-2"), json!({ "charge_id": charge.id }))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    // An unknown charge, a missing key, a body of the wrong shape.
    let (status, _, _) = p
        .post(
            "/refunds",
            Some("r-3"),
            json!({ "charge_id": "ch_nothing" }),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = p
        .post("/refunds", None, json!({ "charge_id": charge.id }))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) = p
        .post("/refunds", Some("r-4"), json!({ "charge": charge.id }))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let refunds = p.client.refunds(None).await.unwrap();
    assert_eq!(refunds.len(), 1, "{refunds:?}");
    assert_eq!(p.client.stats().await.unwrap().refunds_total, 1);
}
