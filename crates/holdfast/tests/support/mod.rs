//! Test support: a whole Holdfast system (`holdfast up`, the real binary) on a free port in a
//! temporary directory, on SQLite or on a fresh Postgres database, plus a small shop client
//! that retries the way a well-behaved client does (same key, full jitter).
#![allow(dead_code)]

use reqwest::StatusCode;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub struct System {
    pub url: String,
    pub dir: tempfile::TempDir,
    child: Child,
}

/// Generates one `#[tokio::test]` per backend for an `async fn(Backend)`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite { $( #[tokio::test(flavor = "multi_thread", worker_threads = 4)] async fn $name() { super::$name(super::support::Backend::Sqlite).await } )* }
        mod postgres { $( #[tokio::test(flavor = "multi_thread", worker_threads = 4)] async fn $name() { super::$name(super::support::Backend::Postgres).await } )* }
    };
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl System {
    /// Starts `holdfast up` with `instances` web instances; `None` when the backend is not
    /// available outside CI (Postgres without DATABASE_URL).
    pub async fn start(backend: Backend, instances: usize, test: &str) -> Option<System> {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_holdfast"));
        cmd.args([
            "up",
            "--port",
            &port.to_string(),
            "--instances",
            &instances.to_string(),
        ])
        .arg("--data-dir")
        .arg(dir.path())
        // Short enough that a claim left by a killed instance frees within a test.
        .args(["--idempotency-lock-ttl", "3s", "--request-timeout", "2s"])
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("HOLDFAST_TEST_LOGS").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
        if backend == Backend::Postgres {
            let url = holdfast_store::testing::fresh_postgres_url(test).await?;
            cmd.args(["--backend", "postgres", "--database-url", &url]);
        }
        let child = cmd.spawn().expect("spawn holdfast up");
        let sys = System {
            url: format!("http://127.0.0.1:{port}"),
            dir,
            child,
        };
        sys.wait_until(Duration::from_secs(30), |s| async move {
            s.ready_instances().await >= instances
        })
        .await;
        Some(sys)
    }

    pub fn instances_file(&self) -> PathBuf {
        self.dir.path().join("run").join("instances.json")
    }

    /// `[{role, pid, addr}]` as written by the supervisor.
    pub fn instances(&self) -> Vec<Value> {
        std::fs::read(self.instances_file())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn web_pids(&self) -> Vec<i32> {
        self.instances()
            .iter()
            .filter(|i| i["role"] == "web")
            .filter_map(|i| i["pid"].as_i64())
            .map(|p| p as i32)
            .collect()
    }

    async fn ready_instances(&self) -> usize {
        let client = reqwest::Client::new();
        let healthy = client
            .get(format!("{}/healthz", self.url))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if healthy {
            self.web_pids().len()
        } else {
            0
        }
    }

    /// Polls `cond` every 50 ms until it holds; panics after `limit`.
    pub async fn wait_until<'a, F, Fut>(&'a self, limit: Duration, cond: F)
    where
        F: Fn(&'a System) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let start = Instant::now();
        while !cond(self).await {
            assert!(
                start.elapsed() < limit,
                "condition not met within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn kill9(&self, pid: i32) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

impl Drop for System {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One shop user with their own cookie jar.
pub struct Shopper {
    pub http: reqwest::Client,
    pub base: String,
    pub email: String,
}

pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
    pub replayed: bool,
}

impl Shopper {
    pub async fn new(base: &str, email: &str) -> Shopper {
        let http = reqwest::Client::builder()
            .cookie_store(true)
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        let s = Shopper {
            http,
            base: base.to_owned(),
            email: email.to_owned(),
        };
        let creds = json!({ "email": email, "password": "correct horse battery" });
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
            method.parse().expect("method"),
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

    /// Retries transport failures, 5xx and 409 with full-jitter backoff and the same key,
    /// for up to 30 s; returns the first definitive answer.
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
            tokio::time::sleep(delay).await;
        }
    }
}
