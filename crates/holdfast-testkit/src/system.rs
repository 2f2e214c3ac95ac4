//! A whole system to kill: `holdfast up` with its balancer, web instances, workers and
//! provider, started by the very launcher the drill uses (`holdfast_drill::System`), on SQLite
//! or on a fresh database of the test's Postgres server. And [`Shopper`], one user with a
//! cookie jar who retries the way a careful client does.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use holdfast_core::Backend;
use holdfast_drill::{Database, System, SystemSpec};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::app::PASSWORD;

/// Starts `program up` with `instances` web instances on `backend`, with the drill's short
/// timeouts and `up_args` on top (a timeout given there wins; `--workers N` sets the worker
/// count, 2 by default); waits until every process `up` runs is listed. `None` when the backend is not available outside CI
/// (Postgres without `DATABASE_URL`).
pub async fn spawn_system(
    program: &Path,
    backend: Backend,
    instances: u16,
    test: &str,
    up_args: &[&str],
) -> Option<System> {
    let database = match backend {
        Backend::Sqlite => Database::Sqlite,
        Backend::Postgres => {
            Database::Postgres(holdfast_store::testing::fresh_postgres_url(test).await?)
        }
    };
    // `--workers N` among the flags is the spec's worker count (the launcher passes it).
    let mut args: Vec<String> = up_args.iter().map(|a| (*a).to_owned()).collect();
    let mut workers = 2;
    if let Some(i) = args.iter().position(|a| a == "--workers") {
        let n: Vec<String> = args.drain(i..(i + 2).min(args.len())).collect();
        workers = n.get(1).and_then(|n| n.parse().ok()).expect("--workers N");
    }
    let mut spec = SystemSpec::new(program, instances, workers);
    spec.database = database;
    spec.up_args = args;
    match System::start(&spec).await {
        Ok(system) => Some(system),
        Err(e) => panic!("{test}: {e}"),
    }
}

/// The web instances' pids, in `up`'s slot order.
pub fn web_pids(system: &System) -> Vec<u32> {
    system.instances("web").into_iter().map(|i| i.pid).collect()
}

/// One shop user with their own cookie jar.
pub struct Shopper {
    pub http: reqwest::Client,
    pub base: String,
    pub email: String,
    /// Failed attempts that were retried: evidence that faults hit requests in flight.
    pub retried: AtomicUsize,
}

/// An answer: status, JSON body (or null), whether it was a replay.
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
    pub replayed: bool,
}

impl Shopper {
    /// Signs up (or finds the account exists) and logs in, retrying through faults. Each
    /// shopper connects from a loopback address of its own, as users come from addresses of
    /// their own: per-address rate limits see many users.
    pub async fn new(base: &str, email: &str) -> Shopper {
        static SHOPPERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SHOPPERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let http = reqwest::Client::builder()
            .local_address(holdfast_core::loopback_source(n))
            .cookie_store(true)
            .timeout(Duration::from_secs(5))
            .build()
            .expect("an HTTP client");
        let s = Shopper {
            http,
            base: base.to_owned(),
            email: email.to_owned(),
            retried: AtomicUsize::new(0),
        };
        let creds = json!({ "email": email, "password": PASSWORD });
        let signup = s
            .retrying("POST", "/api/signup", Some(creds.clone()), None)
            .await;
        assert!(
            signup.status == StatusCode::CREATED || signup.status == StatusCode::CONFLICT,
            "signup: {}",
            signup.status
        );
        let login = s.retrying("POST", "/api/login", Some(creds), None).await;
        assert_eq!(login.status, StatusCode::OK, "login");
        s
    }

    /// One request, no retries. Transport failures come back as `Err`.
    pub async fn once(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        key: Option<&str>,
    ) -> reqwest::Result<Answer> {
        let mut req = self.http.request(
            method.parse().expect("an HTTP method"),
            format!("{}{path}", self.base),
        );
        if let Some(b) = body {
            req = req.json(b);
        }
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let replayed = resp.headers().contains_key("idempotent-replayed");
        let bytes = resp.bytes().await?;
        Ok(Answer {
            status,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            replayed,
        })
    }

    /// Retries transport failures, 5xx and (with a key) 409 with full-jitter backoff and the
    /// same key, for up to 30 s; returns the first definitive answer.
    pub async fn retrying(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        key: Option<&str>,
    ) -> Answer {
        let policy = holdfast_core::retry::RetryPolicy {
            base: Duration::from_millis(50),
            cap: Duration::from_millis(800),
            max_attempts: u32::MAX,
            deadline: Duration::from_secs(30),
        };
        let started = Instant::now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let transient = match self.once(method, path, body.as_ref(), key).await {
                Ok(a)
                    if !(a.status.is_server_error()
                        || a.status == StatusCode::CONFLICT && key.is_some()) =>
                {
                    return a
                }
                Ok(a) => format!("{} {}", a.status, a.body),
                Err(e) => e.to_string(),
            };
            let delay = policy
                .next_delay(attempts, started)
                .unwrap_or_else(|| panic!("{method} {path} kept failing: {transient}"));
            self.retried.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(delay).await;
        }
    }
}
