//! Helpers for tests that run the real `holdfast` binary as a process and judge it only from
//! the outside: its stdout, HTTP, `instances.json`, signals and `/proc`.

#![allow(dead_code)] // Each test binary uses its own subset.

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};

pub const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

/// A running `holdfast` process. Dropping it SIGKILLs it and every process it adopted, so a
/// failing test leaves nothing behind.
pub struct Proc {
    child: Child,
    stdout: mpsc::Receiver<String>,
    adopted: Vec<u32>,
}

impl Proc {
    /// Starts `holdfast ARGS` with stdout captured, stderr passed through (`RUST_LOG`, default
    /// `warn`) and no `DATABASE_URL` from the environment.
    pub fn spawn(args: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .args(args)
            .env_remove("DATABASE_URL")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting holdfast");
        let (tx, stdout) = mpsc::channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stdout,
            adopted: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Also SIGKILL `pid` (a child of this process) when this guard drops.
    pub fn adopt(&mut self, pid: u32) {
        self.adopted.push(pid);
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid() as i32), signal).expect("signalling holdfast");
    }

    /// The rest of the first stdout line starting with `prefix`.
    pub fn line_after(&self, prefix: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => match line.strip_prefix(prefix) {
                    Some(rest) => return rest.trim().to_owned(),
                    None => continue,
                },
                Err(e) => panic!("no stdout line starting with {prefix:?} within {within:?}: {e}"),
            }
        }
    }

    pub async fn exit_status(&mut self, within: Duration) -> ExitStatus {
        eventually(within, "holdfast to exit", || {
            let status = self.child.try_wait().expect("waiting for holdfast");
            async move { status }
        })
        .await
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for &pid in &self.adopted {
            if runs_holdfast(pid) {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
    }
}

/// Polls `check` every 50 ms until it yields a value; panics after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// The status of `GET url`, or `None` if no response came.
pub async fn status(client: &reqwest::Client, url: &str) -> Option<u16> {
    client
        .get(url)
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Instance {
    pub role: String,
    pub pid: u32,
    pub addr: String,
}

/// `<data_dir>/run/instances.json`, if it exists and parses.
pub fn instances(data_dir: &Path) -> Option<Vec<Instance>> {
    let json = std::fs::read(data_dir.join("run/instances.json")).ok()?;
    serde_json::from_slice(&json).ok()
}

/// Whether `pid` is a live (not zombie) process.
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may contain spaces.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, None | Some('Z' | 'X'))
}

/// Whether `pid` is alive and runs our binary (so killing it cannot hit a reused pid).
pub fn runs_holdfast(pid: u32) -> bool {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"));
    alive(pid) && exe.ok() == std::fs::canonicalize(BIN).ok()
}

// ---- whole systems and shop clients, on either backend --------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Generates one `#[tokio::test]` per backend for an `async fn(Backend)`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite { $( #[tokio::test(flavor = "multi_thread", worker_threads = 4)] async fn $name() { super::$name(super::common::Backend::Sqlite).await } )* }
        mod postgres { $( #[tokio::test(flavor = "multi_thread", worker_threads = 4)] async fn $name() { super::$name(super::common::Backend::Postgres).await } )* }
    };
}

/// A whole system: `holdfast up` (balancer + N instances) in a temporary data dir.
pub struct System {
    pub url: String,
    pub dir: tempfile::TempDir,
    pub up: Proc,
    /// The store the system runs on, for checks the API does not expose.
    pub store_url: String,
}

impl System {
    /// Starts `holdfast up` with `instances` web instances on `backend`; `None` when the
    /// backend is not available outside CI (Postgres without DATABASE_URL).
    pub async fn start(backend: Backend, instances: usize, test: &str) -> Option<System> {
        Self::start_with(backend, instances, test, &[]).await
    }

    /// Like `start`, with more `up` flags; waits for every process `up` runs.
    pub async fn start_with(
        backend: Backend,
        instances: usize,
        test: &str,
        extra: &[&str],
    ) -> Option<System> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (n, data_dir) = (
            instances.to_string(),
            dir.path().to_str().expect("utf-8 path").to_owned(),
        );
        // A lock TTL short enough that a claim left by a killed instance frees within a test.
        let mut args = vec![
            "up",
            "--port",
            "0",
            "--instances",
            &n,
            "--data-dir",
            &data_dir,
            "--idempotency-lock-ttl",
            "3s",
            "--request-timeout",
            "2s",
        ];
        let store_url = match backend {
            Backend::Postgres => holdfast_store::testing::fresh_postgres_url(test).await?,
            Backend::Sqlite => format!("sqlite:{data_dir}/holdfast.sqlite"),
        };
        if backend == Backend::Postgres {
            args.extend(["--backend", "postgres", "--database-url", &store_url]);
        }
        args.extend(extra);
        let up = Proc::spawn(&args);
        let line = up.line_after("Holdfast is up: ", Duration::from_secs(30));
        let url = line.split_whitespace().next().expect("url").to_owned();
        let sys = System {
            url,
            dir,
            up,
            store_url,
        };
        eventually(Duration::from_secs(30), "every instance listed", || async {
            (sys.web_pids().len() == instances).then_some(())
        })
        .await;
        Some(sys)
    }

    pub fn web_pids(&self) -> Vec<u32> {
        instances(self.dir.path())
            .unwrap_or_default()
            .into_iter()
            .filter(|i| i.role == "web")
            .map(|i| i.pid)
            .collect()
    }

    /// The base URL of the payment provider `up` started.
    pub fn provider_url(&self) -> String {
        let provider = instances(self.dir.path())
            .unwrap_or_default()
            .into_iter()
            .find(|i| i.role == "provider")
            .expect("a provider");
        format!("http://{}", provider.addr)
    }

    /// Signals one of this system's processes (never a recycled pid).
    pub fn signal(&self, pid: u32, signal: Signal) {
        if runs_holdfast(pid) {
            let _ = kill(Pid::from_raw(pid as i32), signal);
        }
    }
}

/// One shop user with their own cookie jar.
pub struct Shopper {
    pub http: reqwest::Client,
    pub base: String,
    pub email: String,
    /// Failed attempts that were retried: evidence that faults hit requests in flight.
    pub retried: std::sync::atomic::AtomicUsize,
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
            retried: Default::default(),
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
            self.retried
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(delay).await;
        }
    }
}
