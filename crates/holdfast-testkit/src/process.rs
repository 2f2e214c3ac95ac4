//! The real `holdfast` binary as a child process, judged only from the outside: its stdout,
//! HTTP, `instances.json`, signals and `/proc`. Test files pass the binary's path (Cargo's
//! `env!("CARGO_BIN_EXE_holdfast")` exists only in the binary's own tests).

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub use holdfast_drill::Instance;

/// A running process. Dropping it SIGKILLs it and every process it adopted, so a failing
/// test leaves nothing behind.
pub struct Proc {
    program: PathBuf,
    child: Child,
    stdout: mpsc::Receiver<String>,
    adopted: Vec<u32>,
}

impl Proc {
    /// Starts `program ARGS` with stdout captured, stderr passed through (`RUST_LOG`, default
    /// `warn`) and no `DATABASE_URL` from the environment.
    pub fn spawn(program: &Path, args: &[&str]) -> Self {
        Self::spawn_with_env(program, args, &[])
    }

    /// [`Proc::spawn`] with `env` set as well.
    pub fn spawn_with_env(program: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .env_remove("DATABASE_URL")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        let (tx, stdout) = mpsc::channel();
        let out = BufReader::new(child.stdout.take().expect("stdout is piped"));
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            program: program.to_owned(),
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
        kill(Pid::from_raw(self.pid() as i32), signal).expect("signalling the process");
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
        eventually(within, "the process to exit", || {
            let status = self.child.try_wait().expect("waiting for the process");
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
            if runs(&self.program, pid) {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
    }
}

/// `PROGRAM up --port 0 --ops-port 0 --instances N --data-dir DIR EXTRA…`, once every web
/// instance listens and `/healthz` answers through the balancer: the guard (which has
/// adopted the web instances), the balancer's base URL, its operator URL, and the web
/// instances.
pub async fn spawn_up(
    program: &Path,
    data_dir: &Path,
    n: usize,
    extra: &[&str],
) -> (Proc, String, String, Vec<Instance>) {
    const WITHIN: Duration = Duration::from_secs(20);
    let n_arg = n.to_string();
    let dir = data_dir.to_str().expect("a UTF-8 data dir");
    let mut args = vec![
        "up",
        "--port",
        "0",
        "--ops-port",
        "0",
        "--instances",
        &n_arg,
        "--data-dir",
        dir,
    ];
    args.extend_from_slice(extra);
    let mut up = Proc::spawn(program, &args);
    let line = up.line_after("Holdfast is up: ", WITHIN);
    let base = line
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    assert!(line.contains(&format!("({n} instances, ")), "{line}");
    let ops = up.line_after("Operator endpoints: ", WITHIN);
    let ops = ops.trim().trim_end_matches("/ops/instances").to_owned();
    let client = client();
    eventually(WITHIN, "/healthz through the balancer", || async {
        (status(&client, &format!("{base}/healthz")).await == Some(200)).then_some(())
    })
    .await;
    let live: Vec<Instance> = instances(data_dir)
        .expect("instances.json")
        .into_iter()
        .filter(|i| i.role == "web")
        .collect();
    assert_eq!(live.len(), n, "{live:?}");
    for i in &live {
        up.adopt(i.pid);
        assert!(alive(i.pid), "{i:?} is not alive");
    }
    (up, base, ops, live)
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
        .expect("an HTTP client")
}

/// `GET url`'s JSON body; panics if there is none.
pub async fn get_json<T: serde::de::DeserializeOwned>(http: &reqwest::Client, url: &str) -> T {
    let resp = http
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    resp.json()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: not the JSON expected: {e}"))
}

/// `GET url`'s body as text; panics if there is none.
pub async fn get_text(http: &reqwest::Client, url: &str) -> String {
    http.get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// The invariants a drill's JSON report says were violated.
pub fn violated(report: &serde_json::Value) -> Vec<&str> {
    report["violated"]
        .as_array()
        .map(|v| v.iter().filter_map(serde_json::Value::as_str).collect())
        .unwrap_or_default()
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

/// Whether `pid` is alive and runs `program` (so killing it cannot hit a reused pid).
pub fn runs(program: &Path, pid: u32) -> bool {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"));
    alive(pid) && exe.ok() == std::fs::canonicalize(program).ok()
}

/// Sends a server at `addr` what hyper cannot parse — a garbage request line, a 70 kB target,
/// a 500 kB header — and asserts each answer is a problem+json with the right status (400,
/// 414, 431) whose body is as long as its `content-length` says.
pub async fn assert_unparsable_requests_get_problems(addr: std::net::SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let long_target = format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(70_000));
    let huge_header = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(500_000)
    );
    for (request, status) in [
        ("GARBAGE\r\n\r\n".to_owned(), 400),
        (long_target, 414),
        (huge_header, 431),
    ] {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        // The server may answer and close before reading everything.
        let _ = stream.write_all(request.as_bytes()).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "wanted {status}: {head}"
        );
        assert!(
            head.contains("content-type: application/problem+json"),
            "{head}"
        );
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let problem: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
        assert_eq!(problem["status"], status, "{body}");
    }
}

/// `PROGRAM status --backend postgres --database-url URL` with no `up` running (a data dir
/// of its own): its text, asserting it ran.
pub fn status_of_postgres(program: &Path, url: &str) -> String {
    let data = tempfile::tempdir().expect("a data dir");
    let out = Command::new(program)
        .args([
            "status",
            "--backend",
            "postgres",
            "--database-url",
            url,
            "--data-dir",
        ])
        .arg(data.path())
        .env_remove("DATABASE_URL")
        .output()
        .expect("running holdfast status");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `PROGRAM status --json --data-dir DATA_DIR`: what `holdfast status` reports, asserting it ran.
pub fn status_json(program: &Path, data_dir: &Path) -> serde_json::Value {
    let out = Command::new(program)
        .args(["status", "--json", "--data-dir"])
        .arg(data_dir)
        .env_remove("DATABASE_URL")
        .output()
        .expect("running holdfast status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

/// Whether `command` (an external tool a test drives: promtool, chromium, podman…) runs here.
/// Under `CI=true` a missing tool is a failure, naming the script that installs it; elsewhere
/// the test says it is skipped and passes.
pub fn have_tool(command: &str, installer: &str) -> bool {
    if Command::new(command)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
    {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but {command} is missing: run {installer}"
    );
    eprintln!("skipped: no {command} ({installer} installs it)");
    false
}

/// Runs `PROGRAM drill ARGS --json … --html …` (files named `name` in `dir`) and returns its
/// output, the JSON report and the HTML page. The drill's table is printed (shown when a check
/// fails); a missing report panics with the drill's whole output.
pub fn run_drill(
    program: &Path,
    dir: &Path,
    name: &str,
    args: &[&str],
) -> (std::process::Output, serde_json::Value, String) {
    let json = dir.join(format!("{name}.json"));
    let html = dir.join(format!("{name}.html"));
    let mut cmd = Command::new(program);
    cmd.arg("drill").args(args);
    if !args.contains(&"--data-dir") {
        // The verdict's record goes with the test's files, not into the working directory.
        cmd.arg("--data-dir").arg(dir.join("data"));
    }
    let out = cmd
        .arg("--json")
        .arg(&json)
        .arg("--html")
        .arg(&html)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .output()
        .expect("running holdfast drill");
    let shown = || {
        format!(
            "holdfast drill {args:?}: {}\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let report = std::fs::read(&json)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| panic!("no JSON report; {}", shown()));
    let html = std::fs::read_to_string(&html).unwrap_or_else(|_| panic!("no HTML; {}", shown()));
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    (out, report, html)
}

/// The flags of a small, short, seeded drill without alerts (8 users, 2 instances, 1 worker,
/// 15 s), then `more`: for the drills of one fault each.
pub fn small_drill_args<'a>(more: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--duration",
        "15s",
        "--users",
        "8",
        "--think-time",
        "50ms",
        "--instances",
        "2",
        "--workers",
        "1",
        "--seed",
        "5",
        "--no-alerts",
    ];
    args.extend_from_slice(more);
    args
}

/// Whether initdb and pg_ctl are on PATH or in Debian's /usr/lib/postgresql/*/bin.
fn postgres_server_binaries() -> bool {
    let has = |dir: &std::path::Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| has(&d)))
        .unwrap_or(false);
    let debian = holdfast_core::debian_postgres_bin_dirs()
        .iter()
        .any(|d| has(d));
    on_path || debian
}

/// Whether a test that needs a throwaway Postgres cluster can run: the server binaries are
/// here, or (outside CI, where they must be) the test says it is skipped.
pub fn postgres_server_binaries_or_skip() -> bool {
    if postgres_server_binaries() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but initdb/pg_ctl are missing: run scripts/install-drill-deps.sh"
    );
    eprintln!("skipped: no initdb/pg_ctl (scripts/install-drill-deps.sh installs them)");
    false
}

/// The DOM of the page at `url` once headless Chromium has run its scripts for five
/// seconds of virtual time (`scripts/install-ops-tools.sh` installs it).
pub async fn rendered_dom(url: &str) -> String {
    let url = url.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        let profile = tempfile::tempdir().expect("a browser profile dir");
        std::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--virtual-time-budget=5000",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .output()
            .expect("running chromium")
    })
    .await
    .expect("the browser's task");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What [`buy_through`] did: the session's cookie (`name=value`), the order's JSON, and every
/// cookie the checkout's answer set (`name=value` each).
pub struct Bought {
    pub session: String,
    pub order: serde_json::Value,
    pub set_by_checkout: Vec<String>,
}

/// The `name=value` of every cookie an answer sets.
pub fn set_cookies(resp: &reqwest::Response) -> Vec<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok()?.split(';').next().map(str::to_owned))
        .collect()
}

/// Through the balancer at `base`: signs `email` up (with [`crate::app::PASSWORD`]), logs in,
/// puts one `sku` in the cart and checks out, asserting each step's status.
pub async fn buy_through(base: &str, email: &str, sku: &str) -> Bought {
    let http = client();
    let creds = serde_json::json!({ "email": email, "password": crate::app::PASSWORD });
    let signup = http
        .post(format!("{base}/api/signup"))
        .json(&creds)
        .send()
        .await
        .expect("signup");
    assert_eq!(signup.status(), 201);
    let login = http
        .post(format!("{base}/api/login"))
        .json(&creds)
        .send()
        .await
        .expect("login");
    assert_eq!(login.status(), 200);
    let session = set_cookies(&login)
        .into_iter()
        .find(|c| c.starts_with(holdfast_web::cookie_name(false)))
        .expect("a session cookie");
    let add = http
        .post(format!("{base}/api/cart/items"))
        .header("cookie", &session)
        .json(&serde_json::json!({ "sku": sku, "qty": 1 }))
        .send()
        .await
        .expect("add");
    assert_eq!(add.status(), 200);
    let checkout = http
        .post(format!("{base}/api/checkout"))
        .header("cookie", &session)
        .header(
            "idempotency-key",
            format!("buy-{}", email.replace(['@', '.'], "-")),
        )
        .send()
        .await
        .expect("checkout");
    assert_eq!(checkout.status(), 201);
    let set_by_checkout = set_cookies(&checkout);
    let order = checkout.json().await.expect("the order's JSON");
    Bought {
        session,
        order,
        set_by_checkout,
    }
}
