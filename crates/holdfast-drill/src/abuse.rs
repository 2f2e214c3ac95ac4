//! The abuse a drill can add to the honest load (`--faults abuse`: `login-flood`,
//! `slow-clients`, `freeze-instance`), what the abusers saw, and how much memory each web
//! instance ever held.
//!
//! Abusers connect from loopback networks of their own (127.254/16 floods, 127.253/16 slow
//! clients, 127.252/16 the probe), apart from honest users' (see `users.rs`), so the
//! system's per-address defences meet them as they would meet strangers on the internet.
//!
//! - A **login flood** is 64 closed-loop connections from 16 addresses posting wrong
//!   passwords for accounts that are not the honest users' (`victim-N@drill.example`), as
//!   fast as answers come: credential stuffing.
//! - **Slow clients** are 600 connections from 20 addresses, each sending a request head and
//!   2 of the 100 body bytes it declared, then nothing; whenever one is cut off another takes
//!   its place. Meanwhile a probe GETs `/api/products` every 100 ms and times it.
//! - A **frozen instance** is a web instance SIGSTOPped for 8–10 s (the drill's ordinary
//!   `pause-instance` is 1.5–3 s).
//!
//! Peak memory is each web process's `VmHWM` (the kernel's high-water mark of its resident
//! set), read every 250 ms for the whole load.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

const FLOOD_ADDRESSES: u8 = 16;
const FLOOD_CONNECTIONS: usize = 64;
const SLOW_ADDRESSES: usize = 20;
const SLOW_CONNECTIONS: usize = 600;
const PROBE_EVERY: Duration = Duration::from_millis(100);
const RSS_EVERY: Duration = Duration::from_millis(250);

/// What the login flood's attempts got.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Flood {
    pub attempts: u64,
    /// Refused by a rate limit.
    pub rate_limited_429: u64,
    /// Refused as busy (the password-hash queue or the in-flight cap full).
    pub busy_503: u64,
    /// Hashed and denied.
    pub denied_401: u64,
    pub other: u64,
    pub no_answer: u64,
}

/// What the slow clients got, and how normal GETs fared meanwhile.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SlowClients {
    pub connections: u64,
    /// Cut off for not finishing the body in time.
    pub timed_out_408: u64,
    /// Refused at once (connection cap).
    pub refused_503: u64,
    /// Closed without an answer.
    pub closed: u64,
    /// Still waiting when the fault ended.
    pub held_to_the_end: u64,
    pub other: u64,
    pub probe_gets: u64,
    pub probe_failed: u64,
    pub probe_over_1s: u64,
    pub probe_max_ms: f64,
}

impl Flood {
    fn add(&mut self, o: &Flood) {
        self.attempts += o.attempts;
        self.rate_limited_429 += o.rate_limited_429;
        self.busy_503 += o.busy_503;
        self.denied_401 += o.denied_401;
        self.other += o.other;
        self.no_answer += o.no_answer;
    }
}

impl SlowClients {
    fn add(&mut self, o: &SlowClients) {
        self.connections += o.connections;
        self.timed_out_408 += o.timed_out_408;
        self.refused_503 += o.refused_503;
        self.closed += o.closed;
        self.held_to_the_end += o.held_to_the_end;
        self.other += o.other;
        self.probe_gets += o.probe_gets;
        self.probe_failed += o.probe_failed;
        self.probe_over_1s += o.probe_over_1s;
        self.probe_max_ms = self.probe_max_ms.max(o.probe_max_ms);
    }
}

/// Everything abusers and the memory sampler saw, filled in while the load runs.
#[derive(Default)]
pub(crate) struct Observed {
    flood: Mutex<Flood>,
    slow: Mutex<SlowClients>,
    /// pid → the highest `VmHWM` read, in kB.
    peak_rss_kb: Mutex<BTreeMap<u32, u64>>,
    /// Second of the load → payouts waiting (`holdfast_jobs{queue="payments",state="available"}`
    /// on the balancer's `/ops/metrics`).
    payouts_waiting: Mutex<BTreeMap<u64, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Observed {
    pub fn flood(&self) -> Flood {
        lock(&self.flood).clone()
    }
    pub fn slow(&self) -> SlowClients {
        lock(&self.slow).clone()
    }
    pub fn peak_rss_kb(&self) -> BTreeMap<u32, u64> {
        lock(&self.peak_rss_kb).clone()
    }

    pub fn payouts_waiting(&self) -> BTreeMap<u64, u64> {
        lock(&self.payouts_waiting).clone()
    }

    /// Reads the fleet's payout queue from `ops_url`'s `/ops/metrics` once a second (keyed by
    /// `second()`, the load's clock) until dropped.
    pub async fn sample_payouts(&self, ops_url: &str, second: impl Fn() -> u64) {
        let Ok(http) = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()
        else {
            return;
        };
        let url = format!("{ops_url}/ops/metrics");
        loop {
            let page = async { http.get(&url).send().await.ok()?.text().await.ok() };
            if let Some(page) = page.await {
                let waiting = page
                    .lines()
                    .filter(|l| {
                        l.starts_with("holdfast_jobs{")
                            && l.contains("queue=\"payments\"")
                            && l.contains("state=\"available\"")
                    })
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum::<f64>();
                lock(&self.payouts_waiting).insert(second(), waiting as u64);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Reads the web processes' high-water marks every 250 ms until dropped.
    pub async fn sample_rss(&self, web_pids: impl Fn() -> Vec<u32>) {
        loop {
            for pid in web_pids() {
                if let Some(kb) = vm_hwm_kb(pid) {
                    let mut peaks = lock(&self.peak_rss_kb);
                    let peak = peaks.entry(pid).or_default();
                    *peak = (*peak).max(kb);
                }
            }
            tokio::time::sleep(RSS_EVERY).await;
        }
    }
}

/// The process's peak resident set (`VmHWM` in `/proc/<pid>/status`), in kB.
fn vm_hwm_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn source(net: u8, n: usize) -> IpAddr {
    IpAddr::from([127, net, (n / 250) as u8, (n % 250) as u8 + 1])
}

fn client(from: IpAddr) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .local_address(from)
        .timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(1))
        .build()
        .map_err(|e| format!("http client: {e}"))
}

/// Floods `POST /api/login` at `base` for `hold`; says what it did.
pub(crate) async fn login_flood(
    base: &str,
    hold: Duration,
    obs: &Observed,
) -> Result<String, String> {
    let deadline = Instant::now() + hold;
    let url = format!("{base}/api/login");
    let clients = (0..FLOOD_ADDRESSES)
        .map(|i| client(source(254, usize::from(i))))
        .collect::<Result<Vec<_>, _>>()?;
    let mut tasks = JoinSet::new();
    for conn in 0..FLOOD_CONNECTIONS {
        let http = clients[conn % clients.len()].clone();
        let url = url.clone();
        tasks.spawn(async move {
            let mut f = Flood::default();
            let mut n = conn;
            while Instant::now() < deadline {
                n += FLOOD_CONNECTIONS;
                let body = serde_json::json!({
                    "email": format!("victim-{}@drill.example", n % 50),
                    "password": "not the password",
                });
                f.attempts += 1;
                match http.post(&url).json(&body).send().await {
                    Ok(r) => match r.status().as_u16() {
                        429 => f.rate_limited_429 += 1,
                        503 => f.busy_503 += 1,
                        401 => f.denied_401 += 1,
                        _ => f.other += 1,
                    },
                    Err(_) => f.no_answer += 1,
                }
            }
            f
        });
    }
    let mut total = Flood::default();
    while let Some(Ok(f)) = tasks.join_next().await {
        total.add(&f);
    }
    let said = format!(
        "login flood from {FLOOD_ADDRESSES} addresses: {} attempts, {} × 429, {} × 503, {} × 401, {} other, {} unanswered",
        total.attempts, total.rate_limited_429, total.busy_503, total.denied_401, total.other, total.no_answer
    );
    lock(&obs.flood).add(&total);
    Ok(said)
}

/// Holds 600 slow-body connections to `base` for `hold` while probing a normal GET.
pub(crate) async fn slow_clients(
    base: &str,
    hold: Duration,
    obs: &Observed,
) -> Result<String, String> {
    let addr: SocketAddr = base
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .map_err(|e| format!("the balancer's address {base}: {e}"))?;
    let deadline = Instant::now() + hold;
    let mut tasks = JoinSet::new();
    for slot in 0..SLOW_CONNECTIONS {
        tasks.spawn(slow_connection(
            addr,
            source(253, slot % SLOW_ADDRESSES),
            deadline,
        ));
    }
    let probe = probe_gets(format!("{base}/api/products"), deadline);
    let mut total = SlowClients::default();
    let (probed, ()) = tokio::join!(probe, async {
        while let Some(Ok(s)) = tasks.join_next().await {
            total.add(&s);
        }
    });
    let probed = probed?;
    total.probe_gets = probed.gets;
    total.probe_failed = probed.failed;
    total.probe_over_1s = probed.over_1s;
    total.probe_max_ms = probed.max_ms;
    let said = format!(
        "{SLOW_CONNECTIONS} slow clients: {} connections, {} × 408, {} × 503, {} closed, {} held; probe GETs {} (max {:.0} ms, {} over 1 s, {} failed)",
        total.connections, total.timed_out_408, total.refused_503, total.closed, total.held_to_the_end,
        total.probe_gets, total.probe_max_ms, total.probe_over_1s, total.probe_failed
    );
    lock(&obs.slow).add(&total);
    Ok(said)
}

/// One slow client's slot: connect, trickle, wait for the verdict, again until `deadline`.
async fn slow_connection(to: SocketAddr, from: IpAddr, deadline: Instant) -> SlowClients {
    let mut s = SlowClients::default();
    const HEAD: &[u8] = b"POST /api/cart/items HTTP/1.1\r\nhost: drill\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"";
    while Instant::now() < deadline {
        let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
            break;
        };
        if socket.bind(SocketAddr::new(from, 0)).is_err() {
            break;
        }
        let Ok(Ok(mut stream)) =
            tokio::time::timeout(Duration::from_secs(1), socket.connect(to)).await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        s.connections += 1;
        if stream.write_all(HEAD).await.is_err() {
            s.closed += 1;
            continue;
        }
        let mut answer = Vec::new();
        let read = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            stream.read_to_end(&mut answer),
        )
        .await;
        match read {
            Err(_) => s.held_to_the_end += 1,
            Ok(_) if answer.starts_with(b"HTTP/1.1 408") => s.timed_out_408 += 1,
            Ok(_) if answer.starts_with(b"HTTP/1.1 503") => s.refused_503 += 1,
            Ok(_) if answer.is_empty() => s.closed += 1,
            Ok(_) => s.other += 1,
        }
    }
    s
}

struct Probed {
    gets: u64,
    failed: u64,
    over_1s: u64,
    max_ms: f64,
}

/// GETs `url` every 100 ms until `deadline`, timing each.
async fn probe_gets(url: String, deadline: Instant) -> Result<Probed, String> {
    let http = client(source(252, 0))?;
    let mut p = Probed {
        gets: 0,
        failed: 0,
        over_1s: 0,
        max_ms: 0.0,
    };
    while Instant::now() < deadline {
        let started = Instant::now();
        let ok = matches!(http.get(&url).send().await, Ok(r) if r.status().is_success());
        let took = started.elapsed();
        p.gets += 1;
        p.failed += u64::from(!ok);
        p.over_1s += u64::from(took > Duration::from_secs(1));
        p.max_ms = p.max_ms.max(took.as_secs_f64() * 1000.0);
        tokio::time::sleep(PROBE_EVERY.saturating_sub(took)).await;
    }
    Ok(p)
}
