//! Virtual users and the history they write.
//!
//! Each virtual user is a closed loop through the public API, like a shopper with a flaky
//! phone: sign up, log in, fill the cart (keyed adds), look at it, check out with an
//! `Idempotency-Key`, poll the order until it is paid. Every few checkouts it also re-sends an
//! old, acknowledged checkout key with its cart full again — a client's late retry, which a
//! correct server answers by replaying the first order and a server without idempotency
//! answers with a second order. After 30 orders the user moves on to a fresh account, so every
//! account's orders fit in one `GET /api/orders` page when the checker reads them back.
//!
//! Retries are full jitter (`rand(0, min(1 s, 50 ms·2ⁿ))`) with the same key, on no answer,
//! 5xx, 409 (the key's first attempt is still in flight) and 429, for at most 15 s. Each
//! operation goes into the history once, as it completed: ok (2xx), fail (any other answer,
//! which is definite) or unknown (gave up with an attempt that may have acted). Each HTTP
//! attempt separately becomes a latency sample.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use reqwest::{header, Method};
use serde_json::{json, Value};

use crate::checker::{
    Charge, Email, FinalAccount, FinalState, Lines, Op, OpKind, OrderSeen, Outcome, Seen,
};
use crate::faults::Rng;
use crate::system::Control;
use crate::Error;

const PASSWORD: &str = "correct horse battery staple";
const SKUS: &[&str] = &[
    "ROPE-10M",
    "CARABINER",
    "HARNESS",
    "CHALK-BAG",
    "HELMET",
    "BELAY-DEV",
];
const ORDERS_PER_ACCOUNT: usize = 30;
const LATE_RETRY_CHANCE: f64 = 0.15;
const OP_DEADLINE: Duration = Duration::from_secs(15);
const RETRY_BASE: Duration = Duration::from_millis(50);
const RETRY_CAP: Duration = Duration::from_secs(1);
const ORDER_POLLS: usize = 3;
/// Final reads run this many accounts at a time.
const READ_CONCURRENCY: usize = 8;

/// Milliseconds since the load started; one clock for users, faults and the report.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock(Instant);

impl Clock {
    pub fn start() -> Self {
        Clock(Instant::now())
    }

    pub fn elapsed(self) -> Duration {
        self.0.elapsed()
    }

    pub fn ms(self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }
}

/// How one HTTP attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    Ok,
    ClientError,
    ServerError,
    NoAnswer,
}

/// One HTTP attempt: when it completed (ms since the load started) and how long it took.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sample {
    pub t_ms: u64,
    pub latency_us: u64,
    pub class: Class,
    /// The answer's status (0: no answer).
    pub status: u16,
    /// A `POST /api/checkout`.
    pub checkout: bool,
    /// The operation it was an attempt of.
    pub op: &'static str,
}

/// Live counters for the progress line.
#[derive(Default)]
pub(crate) struct Live {
    requests: AtomicU64,
    ok: AtomicU64,
    client_errors: AtomicU64,
    server_errors: AtomicU64,
    no_answer: AtomicU64,
    orders: AtomicU64,
    /// Latencies (µs) since the progress line last looked.
    recent: Mutex<Vec<u64>>,
    /// Set when the system is gone for good (a lost node whose restore failed): users stop,
    /// and an operation in flight stops retrying and ends unknown.
    gone: std::sync::atomic::AtomicBool,
}

impl Live {
    /// The system is gone for good: stop shopping.
    pub fn give_up(&self) {
        self.gone.store(true, Ordering::Relaxed);
    }

    fn gone(&self) -> bool {
        self.gone.load(Ordering::Relaxed)
    }

    fn record(&self, s: &Sample) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let counter = match s.class {
            Class::Ok => &self.ok,
            Class::ClientError => &self.client_errors,
            Class::ServerError => &self.server_errors,
            Class::NoAnswer => &self.no_answer,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        lock(&self.recent).push(s.latency_us);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One account a virtual user drove, and its history.
#[derive(Clone, Debug)]
pub(crate) struct AccountRun {
    pub email: String,
    /// Which loopback source address the account's person connects from.
    pub source: u64,
    /// The cookies the account's browser sends, once logged in: its session's
    /// (`name=value`), then its read-your-writes token's once a write handed one out.
    pub cookie: Option<String>,
    pub ops: Vec<Op>,
}

impl AccountRun {
    pub(crate) fn ever_logged_in(&self) -> bool {
        self.ops
            .iter()
            .any(|op| op.kind == OpKind::Login && matches!(op.outcome, Outcome::Ok { .. }))
    }

    fn acked_orders(&self) -> impl Iterator<Item = &str> {
        self.ops
            .iter()
            .filter_map(|op| match (&op.kind, &op.outcome) {
                (
                    OpKind::Checkout { .. },
                    Outcome::Ok {
                        seen: Seen::Order(o),
                    },
                ) => Some(o.order_id.as_str()),
                _ => None,
            })
    }
}

/// What one virtual user did.
pub(crate) struct UserRun {
    pub user: usize,
    pub accounts: Vec<AccountRun>,
    pub samples: Vec<Sample>,
}

/// One answer.
struct Answer {
    status: u16,
    body: Value,
    /// The cookies it set, as a `Cookie` header would carry them (`a=1; b=2`), if any.
    cookie: Option<String>,
}

/// The cookies `jar` (`a=1; b=2`) with those `set` (the same form) in place of the ones of
/// their names, as a browser keeps them: the session's, and the read-your-writes token a write
/// hands out.
fn with_cookies(jar: &str, set: &str) -> String {
    let name = |pair: &str| pair.split('=').next().unwrap_or_default().to_owned();
    let replaced: Vec<String> = set.split("; ").map(name).collect();
    jar.split("; ")
        .filter(|p| !p.is_empty() && !replaced.contains(&name(p)))
        .chain(set.split("; "))
        .collect::<Vec<_>>()
        .join("; ")
}

/// A request to make, possibly several times.
struct Req {
    method: Method,
    path: String,
    body: Option<Value>,
    key: Option<String>,
}

impl Req {
    fn get(path: impl Into<String>) -> Req {
        Req {
            method: Method::GET,
            path: path.into(),
            body: None,
            key: None,
        }
    }

    fn post(path: impl Into<String>, body: Value, key: Option<&str>) -> Req {
        Req {
            method: Method::POST,
            path: path.into(),
            body: Some(body),
            key: key.map(str::to_owned),
        }
    }
}

/// Why an operation did not succeed.
enum Failure {
    Status(u16),
    Unknown,
}

/// The load: shared by every virtual user. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Load {
    base: String,
    http: reqwest::Client,
    /// The system is on this host: each account's person connects from a loopback address of
    /// its own ([`holdfast_core::loopback_source`]), so per-address limits see many people.
    loopback: bool,
    clock: Clock,
    duration: Duration,
    /// Pause before each request with a session (see `DrillOptions::think`).
    think: Duration,
    live: Arc<Live>,
}

impl Load {
    pub fn new(
        base: &str,
        clock: Clock,
        duration: Duration,
        think: Duration,
    ) -> Result<Load, Error> {
        let loopback = reqwest::Url::parse(base)
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
            .is_some_and(|h| h == "127.0.0.1" || h == "localhost");
        Ok(Load {
            base: base.trim_end_matches('/').to_owned(),
            http: client(None)?,
            loopback,
            clock,
            duration,
            think,
            live: Arc::default(),
        })
    }

    /// A client for the person at loopback `source` (when the system is local).
    fn client_of(&self, source: u64) -> reqwest::Client {
        let source = self.loopback.then_some(source);
        client(source).unwrap_or_else(|_| self.http.clone())
    }

    pub fn live(&self) -> Arc<Live> {
        self.live.clone()
    }

    fn over(&self) -> bool {
        self.clock.elapsed() >= self.duration || self.live.gone()
    }

    pub fn shopper(self, user: usize, rng: Rng) -> Shopper {
        Shopper {
            http: self.http.clone(),
            load: self,
            user,
            rng,
            accounts: Vec::new(),
            current: None,
            samples: Vec::new(),
        }
    }

    /// One HTTP request; no retries, nothing recorded.
    async fn send(
        &self,
        http: &reqwest::Client,
        req: &Req,
        cookie: Option<&str>,
    ) -> Result<Answer, String> {
        let mut r = http.request(req.method.clone(), format!("{}{}", self.base, req.path));
        if let Some(body) = &req.body {
            r = r.json(body);
        }
        if let Some(key) = &req.key {
            r = r.header("Idempotency-Key", key);
        }
        if let Some(cookie) = cookie {
            r = r.header(header::COOKIE, cookie);
        }
        let resp = r.send().await.map_err(|e| holdfast_core::error_chain(&e))?;
        let status = resp.status().as_u16();
        let pairs: Vec<&str> = resp
            .headers()
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.split(';').next())
            .filter(|pair| pair.contains('='))
            .collect();
        let cookie = (!pairs.is_empty()).then(|| pairs.join("; "));
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| holdfast_core::error_chain(&e))?;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Answer {
            status,
            body,
            cookie,
        })
    }

    /// A request retried (full jitter) on no answer and 5xx for up to `within`; unrecorded.
    async fn read(&self, req: &Req, cookie: Option<&str>, within: Duration) -> Option<Answer> {
        self.read_as(&self.http, req, cookie, within).await
    }

    /// [`Load::read`] with the given client.
    async fn read_as(
        &self,
        http: &reqwest::Client,
        req: &Req,
        cookie: Option<&str>,
        within: Duration,
    ) -> Option<Answer> {
        let started = Instant::now();
        // Concurrent readers must not retry in lockstep: each draws its own jitter.
        let mut rng = Rng::new(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
        );
        for attempt in 0u32.. {
            match self.send(http, req, cookie).await {
                Ok(a) if a.status < 500 => return Some(a),
                _ => {}
            }
            let delay = jitter(&mut rng, attempt);
            if started.elapsed() + delay > within {
                return None;
            }
            tokio::time::sleep(delay).await;
        }
        None
    }

    /// A fresh session for an account, or `None` if it cannot log in (`Some(None)`: the
    /// account does not exist, so it holds nothing).
    async fn login(&self, account: &AccountRun) -> Option<Option<String>> {
        let creds = json!({ "email": account.email, "password": PASSWORD });
        let http = self.client_of(account.source);
        let a = self
            .read_as(
                &http,
                &Req::post("/api/login", creds, None),
                None,
                OP_DEADLINE,
            )
            .await?;
        match a.status {
            200 => a.cookie.map(Some),
            401 => Some(None),
            _ => None,
        }
    }

    /// After the load: which accounts' last sessions still work, and a working session for
    /// each account that exists (`None`: it does not exist; an error: cannot be read).
    pub async fn sessions(
        &self,
        accounts: &[AccountRun],
    ) -> Vec<(bool, Result<Option<String>, ()>)> {
        stream::iter(accounts)
            .map(|a| async move {
                let valid = match &a.cookie {
                    Some(cookie) => self
                        .read(&Req::get("/api/me"), Some(cookie), OP_DEADLINE)
                        .await
                        .map(|r| r.status == 200),
                    None => Some(false),
                };
                match valid {
                    Some(true) => (true, Ok(a.cookie.clone())),
                    // The checker judges only sessions it saw logged in; a fresh one reads.
                    Some(false) | None => {
                        let session = match self.login(a).await {
                            Some(Some(cookie)) => Ok(Some(cookie)),
                            Some(None) if !a.ever_logged_in() => Ok(None),
                            _ => Err(()),
                        };
                        (valid.unwrap_or(false), session)
                    }
                }
            })
            .buffered(READ_CONCURRENCY)
            .collect()
            .await
    }

    /// Waits until every order of every account is paid and has its receipt, or `within`.
    pub async fn settle(
        &self,
        cookies: &[Result<Option<String>, ()>],
        provider: &str,
        within: Duration,
    ) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let lists: Vec<Option<Vec<OrderSeen>>> = stream::iter(cookies.iter().flatten())
                .map(|cookie| async move {
                    let Some(cookie) = cookie else {
                        return Some(Vec::new());
                    };
                    let a = self
                        .read(&Req::get("/api/orders"), Some(cookie), OP_DEADLINE)
                        .await?;
                    (a.status == 200).then(|| orders_of(&a.body)).flatten()
                })
                .buffer_unordered(READ_CONCURRENCY)
                .collect()
                .await;
            let all_read = lists.iter().all(Option::is_some);
            let orders: Vec<OrderSeen> = lists.into_iter().flatten().flatten().collect();
            if all_read && orders.iter().all(|o| o.status == "paid") {
                let emails: Option<Vec<Email>> = self.provider_list(provider, "emails").await;
                let receipted: std::collections::BTreeSet<&str> = emails
                    .iter()
                    .flatten()
                    .map(|e| e.order_id.as_str())
                    .collect();
                if orders
                    .iter()
                    .all(|o| receipted.contains(o.order_id.as_str()))
                {
                    // A moment more, so a straggling duplicate would have landed too.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    return true;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn provider_list<T: serde::de::DeserializeOwned>(
        &self,
        provider: &str,
        what: &str,
    ) -> Option<Vec<T>> {
        let url = format!("{provider}/{what}");
        for _ in 0..20 {
            if let Ok(r) = self.http.get(&url).send().await {
                if r.status().is_success() {
                    if let Ok(list) = r.json::<Vec<Value>>().await {
                        // A record that does not read as a `T` is left out.
                        let read = list
                            .into_iter()
                            .filter_map(|v| serde_json::from_value(v).ok());
                        return Some(read.collect());
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        None
    }

    /// Reads the final state through the API and the provider.
    pub async fn final_state(
        &self,
        accounts: &[AccountRun],
        sessions: &[(bool, Result<Option<String>, ()>)],
        provider: &str,
    ) -> (FinalState, Vec<String>) {
        let mut notes = Vec::new();
        let finals = stream::iter(accounts.iter().zip(sessions))
            .map(|(a, (valid, session))| self.final_account(a, *valid, session))
            .buffered(READ_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        let charges: Option<Vec<Charge>> = self.provider_list(provider, "charges").await;
        let emails: Option<Vec<Email>> = self.provider_list(provider, "emails").await;
        if charges.is_none() || emails.is_none() {
            notes.push("the provider's charges or emails could not be read".into());
        }
        let (charges, emails) = (charges.unwrap_or_default(), emails.unwrap_or_default());
        // A refund reads as the charge it gave back (the checker decides which count).
        let refunds: Vec<Charge> = self
            .provider_list(provider, "refunds")
            .await
            .unwrap_or_default();
        let fin = FinalState {
            accounts: finals,
            charges,
            emails,
            refunds,
            elsewhere: Default::default(),
            loss: None,
        };
        (fin, notes)
    }

    async fn final_account(
        &self,
        a: &AccountRun,
        session_valid: bool,
        session: &Result<Option<String>, ()>,
    ) -> FinalAccount {
        let mut fin = FinalAccount {
            email: a.email.clone(),
            session_valid,
            orders: None,
            cart: None,
        };
        let cookie = match session {
            Err(()) => return fin,
            Ok(None) => {
                // The account never came to exist: it holds nothing.
                fin.orders = Some(Vec::new());
                fin.cart = Some(Lines::new());
                return fin;
            }
            Ok(Some(cookie)) => cookie.as_str(),
        };
        let list = self
            .read(&Req::get("/api/orders"), Some(cookie), OP_DEADLINE)
            .await
            .filter(|r| r.status == 200)
            .and_then(|r| orders_of(&r.body));
        if let Some(mut orders) = list {
            // The list is one page; fetch acknowledged orders it does not show one by one.
            let acked: Vec<String> = a
                .acked_orders()
                .filter(|id| !orders.iter().any(|o| o.order_id == *id))
                .map(str::to_owned)
                .collect();
            let mut complete = true;
            for id in acked {
                match self
                    .read(
                        &Req::get(format!("/api/orders/{id}")),
                        Some(cookie),
                        OP_DEADLINE,
                    )
                    .await
                {
                    Some(r) if r.status == 200 => orders.extend(order_of(&r.body)),
                    Some(r) if r.status == 404 => {}
                    _ => complete = false,
                }
            }
            fin.orders = complete.then_some(orders);
        }
        fin.cart = self
            .read(&Req::get("/api/cart"), Some(cookie), OP_DEADLINE)
            .await
            .filter(|r| r.status == 200)
            .and_then(|r| cart_of(&r.body));
        fin
    }
}

/// The drill's HTTP client, connecting from loopback `source` when given.
fn client(source: Option<u64>) -> Result<reqwest::Client, Error> {
    let mut b = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(1));
    if let Some(n) = source {
        b = b.local_address(holdfast_core::loopback_source(n));
    }
    b.build()
        .map_err(|e| Error::Start(format!("http client: {e}")))
}

/// `rand(0, min(cap, base·2ⁿ))`.
fn jitter(rng: &mut Rng, attempt: u32) -> Duration {
    let ceiling = RETRY_BASE
        .saturating_mul(1u32 << attempt.min(16))
        .min(RETRY_CAP);
    Duration::from_micros(rng.below(ceiling.as_micros() as u64 + 1))
}

fn lines_of(items: &Value) -> Option<Lines> {
    let mut lines = Lines::new();
    for l in items.as_array()? {
        *lines.entry(l["sku"].as_str()?.to_owned()).or_default() += l["qty"].as_i64()?;
    }
    Some(lines)
}

fn cart_of(body: &Value) -> Option<Lines> {
    lines_of(&body["items"])
}

fn order_of(body: &Value) -> Option<OrderSeen> {
    Some(OrderSeen {
        order_id: body["order_id"].as_str()?.to_owned(),
        total_cents: body["total_cents"].as_i64()?,
        status: body["status"].as_str()?.to_owned(),
        items: lines_of(&body["items"])?,
    })
}

fn orders_of(body: &Value) -> Option<Vec<OrderSeen>> {
    body["orders"].as_array()?.iter().map(order_of).collect()
}

fn seen_nothing(_: &Value) -> Option<Seen> {
    Some(Seen::Nothing)
}

fn seen_cart(body: &Value) -> Option<Seen> {
    cart_of(body).map(Seen::Cart)
}

fn seen_order(body: &Value) -> Option<Seen> {
    order_of(body).map(Seen::Order)
}

/// Where a virtual user is with its current account.
#[derive(Default)]
struct Cursor {
    adds: usize,
    checkouts: usize,
    /// Acknowledged checkout keys, for late retries.
    acked: Vec<String>,
}

/// One virtual user.
pub(crate) struct Shopper {
    load: Load,
    /// The client of the current account's person.
    http: reqwest::Client,
    user: usize,
    rng: Rng,
    accounts: Vec<AccountRun>,
    current: Option<(usize, Cursor)>,
    samples: Vec<Sample>,
}

impl Shopper {
    pub async fn run(mut self) -> UserRun {
        while !self.load.over() {
            match self.account().await {
                Some(i) => self.shop(i).await,
                None => tokio::time::sleep(Duration::from_millis(200)).await,
            }
            let think = self.rng.below(20);
            tokio::time::sleep(Duration::from_millis(think)).await;
        }
        UserRun {
            user: self.user,
            accounts: self.accounts,
            samples: self.samples,
        }
    }

    /// The account to shop with: the current one, or a fresh one signed up and logged in.
    async fn account(&mut self) -> Option<usize> {
        if let Some((i, cursor)) = &self.current {
            if cursor.checkouts < ORDERS_PER_ACCOUNT && self.accounts[*i].cookie.is_some() {
                return Some(*i);
            }
        }
        let i = self.accounts.len();
        let source = self.user as u64 * 10_000 + i as u64;
        self.http = self.load.client_of(source);
        self.accounts.push(AccountRun {
            source,
            email: format!("shopper-{}-{i}@drill.example", self.user),
            cookie: None,
            ops: Vec::new(),
        });
        self.current = Some((i, Cursor::default()));
        let creds = json!({ "email": self.accounts[i].email, "password": PASSWORD });
        let signup = Req::post("/api/signup", creds, None);
        match self
            .op(i, OpKind::Signup, &signup, false, seen_nothing)
            .await
        {
            // 409: an earlier attempt whose answer was lost did create it.
            Ok(_) | Err(Failure::Status(409)) => {}
            Err(_) => return None,
        }
        self.login(i).await.then_some(i)
    }

    async fn login(&mut self, i: usize) -> bool {
        let creds = json!({ "email": self.accounts[i].email, "password": PASSWORD });
        let req = Req::post("/api/login", creds, None);
        match self.op(i, OpKind::Login, &req, false, seen_nothing).await {
            Ok(a) if a.cookie.is_some() => {
                self.accounts[i].cookie = a.cookie;
                true
            }
            _ => {
                self.accounts[i].cookie = None;
                false
            }
        }
    }

    /// The current account's cursor; [`Shopper::shop`] only runs once `account` set one.
    fn cursor(&mut self) -> &mut Cursor {
        &mut self.current.get_or_insert_with(|| (0, Cursor::default())).1
    }

    /// One round: fill the cart, look at it, maybe re-send an old checkout, check out, poll.
    async fn shop(&mut self, i: usize) {
        for _ in 0..self.rng.between(1, 3) {
            let sku = SKUS[self.rng.below(SKUS.len() as u64) as usize];
            let qty = self.rng.between(1, 3) as i64;
            let n = post_inc(&mut self.cursor().adds);
            let key = format!("add-{}-{i}-{n}", self.user);
            let req = Req::post(
                "/api/cart/items",
                json!({ "sku": sku, "qty": qty }),
                Some(&key),
            );
            let kind = OpKind::CartAdd {
                key,
                sku: sku.to_owned(),
                qty,
            };
            // Whatever the outcome, the history has it; the checker judges, the shopper goes on.
            let _ = self.authed(i, kind, &req, seen_nothing).await;
        }
        let _ = self
            .authed(i, OpKind::CartRead, &Req::get("/api/cart"), seen_cart)
            .await;
        let acked = self.cursor().acked.len() as u64;
        if acked > 0 && !self.load.over() && self.rng.chance(LATE_RETRY_CHANCE) {
            let pick = self.rng.below(acked) as usize;
            let key = self.cursor().acked[pick].clone();
            let req = Req::post("/api/checkout", json!({}), Some(&key));
            let kind = OpKind::Checkout { key, late: true };
            let _ = self.authed(i, kind, &req, seen_order).await;
        }
        let n = post_inc(&mut self.cursor().checkouts);
        let key = format!("co-{}-{i}-{n}", self.user);
        let req = Req::post("/api/checkout", json!({}), Some(&key));
        let kind = OpKind::Checkout {
            key: key.clone(),
            late: false,
        };
        let Ok(order) = self.authed(i, kind, &req, seen_order).await else {
            return;
        };
        self.cursor().acked.push(key);
        self.load.live.orders.fetch_add(1, Ordering::Relaxed);
        let Some(id) = order.body["order_id"].as_str().map(str::to_owned) else {
            return;
        };
        for _ in 0..ORDER_POLLS {
            if self.load.over() {
                break;
            }
            let wait = self.rng.between(150, 400);
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let req = Req::get(format!("/api/orders/{id}"));
            let kind = OpKind::OrderRead {
                order_id: id.clone(),
            };
            match self.authed(i, kind, &req, seen_order).await {
                Ok(a) if a.body["status"] == "paid" => break,
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }

    /// An operation with the account's session; a refused session (401) is recorded and
    /// followed by a fresh login, as a real client would.
    async fn authed(
        &mut self,
        i: usize,
        kind: OpKind,
        req: &Req,
        seen: fn(&Value) -> Option<Seen>,
    ) -> Result<Answer, Failure> {
        if !self.load.think.is_zero() && !self.load.over() {
            let ms = self.load.think.as_millis() as u64;
            let pause = self.rng.between(ms / 2, ms + ms / 2);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        let result = self.op(i, kind, req, true, seen).await;
        if let Err(Failure::Status(401)) = result {
            self.login(i).await;
        }
        result
    }

    /// Runs one operation to a definite answer or the deadline, and records it.
    async fn op(
        &mut self,
        i: usize,
        kind: OpKind,
        req: &Req,
        authed: bool,
        seen: fn(&Value) -> Option<Seen>,
    ) -> Result<Answer, Failure> {
        let invoked_ms = self.load.clock.ms();
        let started = Instant::now();
        let mut maybe_acted = false;
        let mut last: String;
        let mut attempt = 0u32;
        let (outcome, result) = loop {
            let cookie = if authed {
                self.accounts[i].cookie.clone()
            } else {
                None
            };
            let answer = self.attempt(kind.name(), req, cookie.as_deref()).await;
            // The browser keeps what an answer sets (a reissued session, the read-your-writes
            // token a write hands out) and shows it with every later request.
            if let (
                true,
                Ok(Answer {
                    cookie: Some(set), ..
                }),
            ) = (authed, &answer)
            {
                if let Some(jar) = &mut self.accounts[i].cookie {
                    *jar = with_cookies(jar, set);
                }
            }
            match answer {
                Ok(a) if (200..300).contains(&a.status) => match seen(&a.body) {
                    Some(seen) => break (Outcome::Ok { seen }, Ok(a)),
                    None => {
                        let problem = format!("unreadable {} body: {}", a.status, a.body);
                        break (
                            Outcome::Fail {
                                status: a.status,
                                problem,
                            },
                            Err(Failure::Status(a.status)),
                        );
                    }
                },
                Ok(a)
                    if a.status >= 500
                        || a.status == 429
                        || (a.status == 409 && req.key.is_some()) =>
                {
                    maybe_acted |= a.status != 429;
                    last = format!("{} {}", a.status, problem_type(&a.body));
                }
                Ok(a) => {
                    let problem = problem_type(&a.body);
                    break (
                        Outcome::Fail {
                            status: a.status,
                            problem,
                        },
                        Err(Failure::Status(a.status)),
                    );
                }
                Err(e) => {
                    maybe_acted = true;
                    last = e;
                }
            }
            let delay = jitter(&mut self.rng, attempt);
            attempt += 1;
            if started.elapsed() + delay > OP_DEADLINE || self.load.live.gone() {
                let reason = format!("gave up after {attempt} attempts: {last}");
                break if maybe_acted {
                    (Outcome::Unknown { reason }, Err(Failure::Unknown))
                } else {
                    let status = 429;
                    let problem = reason;
                    (
                        Outcome::Fail { status, problem },
                        Err(Failure::Status(status)),
                    )
                };
            }
            tokio::time::sleep(delay).await;
        };
        self.accounts[i].ops.push(Op {
            kind,
            invoked_ms,
            completed_ms: self.load.clock.ms(),
            outcome,
        });
        result
    }

    /// One HTTP attempt, timed and counted.
    async fn attempt(
        &mut self,
        op: &'static str,
        req: &Req,
        cookie: Option<&str>,
    ) -> Result<Answer, String> {
        let started = Instant::now();
        let answer = self.load.send(&self.http, req, cookie).await;
        let class = match &answer {
            Ok(a) if a.status < 400 => Class::Ok,
            Ok(a) if a.status < 500 => Class::ClientError,
            Ok(_) => Class::ServerError,
            Err(_) => Class::NoAnswer,
        };
        let sample = Sample {
            t_ms: self.load.clock.ms(),
            latency_us: started.elapsed().as_micros() as u64,
            class,
            status: answer.as_ref().map_or(0, |a| a.status),
            checkout: req.path == "/api/checkout",
            op,
        };
        self.load.live.record(&sample);
        self.samples.push(sample);
        answer
    }
}

fn post_inc(n: &mut usize) -> usize {
    *n += 1;
    *n - 1
}

/// A problem+json body's `type` (or `title`), for the history.
fn problem_type(body: &Value) -> String {
    body["type"]
        .as_str()
        .or_else(|| body["title"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// Prints a progress line on stderr every second (every 5 s when stderr is not a terminal)
/// until aborted.
pub(crate) async fn progress(live: Arc<Live>, ctl: Arc<Control>, clock: Clock, duration: Duration) {
    let tty = crate::stderr_is_terminal();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let mut recent = std::mem::take(&mut *lock(&live.recent));
        let t = clock.elapsed().as_secs();
        if !tty && !t.is_multiple_of(5) {
            continue;
        }
        recent.sort_unstable();
        let p99 = percentile(&recent, 0.99) as f64 / 1000.0;
        let get = |n: &AtomicU64| n.load(Ordering::Relaxed);
        let line = format!(
            "drill t={t}s/{}s req={} ({}/s) 2xx={} 4xx={} 5xx={} no-answer={} p99={p99:.0}ms \
             orders={} faults={}",
            duration.as_secs(),
            get(&live.requests),
            recent.len(),
            get(&live.ok),
            get(&live.client_errors),
            get(&live.server_errors),
            get(&live.no_answer),
            get(&live.orders),
            ctl.faults_injected(),
        );
        if tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
    }
}

/// The `q` quantile of sorted values (nearest rank); 0 for none.
pub(crate) fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Samples per second of the load, for the report's timeline.
pub(crate) fn by_second(samples: &[Sample]) -> BTreeMap<u64, Vec<Sample>> {
    let mut seconds: BTreeMap<u64, Vec<Sample>> = BTreeMap::new();
    for s in samples {
        seconds.entry(s.t_ms / 1000).or_default().push(*s);
    }
    seconds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_jar_replaces_cookies_by_name() {
        assert_eq!(with_cookies("s=1", "r=2"), "s=1; r=2");
        assert_eq!(with_cookies("s=1; r=2", "r=3"), "s=1; r=3");
        assert_eq!(with_cookies("s=1; r=2", "s=4; r=5"), "s=4; r=5");
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&v, 1.0), 100);
        assert_eq!(percentile(&[], 0.5), 0);
        assert_eq!(percentile(&[7], 0.01), 7);
    }

    #[test]
    fn jitter_stays_under_the_capped_exponential() {
        let mut rng = Rng::new(1);
        for attempt in 0..40 {
            let ceiling = RETRY_BASE
                .saturating_mul(1 << attempt.min(16))
                .min(RETRY_CAP);
            assert!(jitter(&mut rng, attempt) <= ceiling);
        }
    }

    #[test]
    fn api_bodies_parse() {
        let order = json!({
            "order_id": "o1", "total_cents": 2500, "status": "paid", "created_at": 1,
            "items": [{"sku": "CARABINER", "name": "c", "qty": 2, "unit_price_cents": 1250}]
        });
        let seen = order_of(&order).unwrap();
        assert_eq!(seen.items, Lines::from([("CARABINER".into(), 2)]));
        assert_eq!(orders_of(&json!({ "orders": [order] })).unwrap().len(), 1);
        assert_eq!(
            cart_of(&json!({ "items": [], "total_cents": 0 })),
            Some(Lines::new())
        );
        assert_eq!(order_of(&json!({ "order_id": "o1" })), None);
    }
}
