//! A small HTTP/1.1 load balancer for `holdfast up`.
//!
//! `holdfast up` runs N interchangeable, stateless `holdfast serve` instances on one machine, and
//! the drill kills (`SIGKILL`), pauses (`SIGSTOP`) or drains (`SIGTERM`) them at any time. This
//! crate is what clients talk to instead: it spreads requests round-robin over the healthy
//! instances, routes around the ones that are gone, and retries a failed request on another
//! instance — but only when doing the request twice cannot do harm. In production nginx or
//! haproxy takes this place; the rules below are the ones we expect of them too.
//!
//! Health: every [`BalancerOptions::health_interval`] each upstream gets `GET /readyz`; 2xx means
//! healthy, anything else (including a timeout) means unhealthy. A draining instance answers
//! 503 there before it stops accepting, so it stops getting new traffic. Failing to reach an
//! upstream while proxying marks it unhealthy at once; the next check may bring it back.
//!
//! When is a retry safe? Each upstream is tried at most once per request, and the next one only
//! when one of these holds:
//! - the request never left the balancer (connection refused, connect timeout, or the
//!   connection closed before the request was written) — always safe;
//! - the method is idempotent (GET, HEAD, OPTIONS, PUT, DELETE, TRACE);
//! - the request carries an `Idempotency-Key` header *and* its route is one the application
//!   declared to honour the key ([`BalancerOptions::keyed_routes`]), so the instance
//!   deduplicates it. A key on any other route (a signup, a login) is no reason to send twice.
//!
//! Otherwise (a POST that may have reached an instance, including an attempt that timed out or
//! whose instance froze) the client gets a 502 (or 504) and decides itself. A 503 response from an upstream
//! that turns out to be draining (its `/readyz` is no longer 2xx) is retried like a failure; any
//! other upstream response, 5xx included, is passed through as-is.
//!
//! Request bodies are buffered (up to [`BalancerOptions::max_buffered_body`]) so they can be
//! re-sent; response bodies are streamed. The exception is a route the application declares
//! streamed ([`BalancerOptions::streamed_routes`], say a resumable upload's `PATCH`): its body
//! flows through as it arrives, under an idle timeout instead of a total one, to one instance,
//! and is never re-sent (the client resumes, asking the application where it stands). Errors made by the balancer itself are RFC 9457
//! `application/problem+json`. The operator endpoints — `GET /ops/instances` (JSON published
//! by the supervisor), `GET /ops/upstreams` (the health table) and `GET /ops/stats`
//! (`retries_total`: requests re-sent to another instance) — are served on a listener of their
//! own ([`Balancer::serve_operator`]); the public port refuses `/ops/*` and `/metrics`.

mod metrics;
mod proxy;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use holdfast_http::ParseErrorsAsProblems;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::{timeout, MissedTickBehavior};

use crate::proxy::{full, problem, Body};

/// How the balancer checks, times and limits its upstreams.
#[derive(Debug, Clone)]
pub struct BalancerOptions {
    /// How often every upstream gets `GET /readyz`.
    pub health_interval: Duration,
    /// How long a `/readyz` answer may take before the upstream counts as unhealthy.
    pub health_timeout: Duration,
    /// How long a `/healthz` answer may take before the upstream counts as frozen (stopped,
    /// hung, gone): it gets no requests, and the attempts in flight to it are abandoned — and
    /// re-sent elsewhere when that is safe — instead of waiting out `attempt_timeout`.
    pub liveness_timeout: Duration,
    /// How long establishing a connection may take; a connect timeout is safe to retry.
    pub connect_timeout: Duration,
    /// How long one attempt against one upstream may take until the response headers arrive
    /// (covers a paused instance). The response body is streamed without this limit.
    pub attempt_timeout: Duration,
    /// Largest request body buffered for re-sending; larger requests get 413.
    pub max_buffered_body: usize,
    /// On shutdown, how long in-flight requests may take before their connections are dropped.
    pub shutdown_grace: Duration,
    /// How long a client may take to send a request's head; then the connection is closed.
    pub header_read_timeout: Duration,
    /// How long a client may take to send a request's body; then it gets 408 and is closed.
    pub body_read_timeout: Duration,
    /// Client connections open at once; a connection past this is answered 503 and closed.
    pub max_connections: usize,
    /// Client connections open at once from one address (slow clients from one place cannot
    /// take every slot).
    pub max_connections_per_client: usize,
    /// The routes the application declares to honour `Idempotency-Key`, as `"POST /api/x/{id}"`:
    /// a request to one of them that carries a key may be re-sent after it may have reached an
    /// instance. (Idempotent methods may always be; other requests only if never sent.)
    pub keyed_routes: Vec<String>,
    /// Routes the application declares safe to repeat without a key (doing them twice has
    /// no effect anyone minds, like a login: the unused session expires): a request to one
    /// of them may be re-sent after it may have reached an instance.
    pub repeatable_routes: Vec<String>,
    /// Routes whose request bodies are streamed rather than buffered, as `"PATCH /api/x/{id}"`:
    /// no size limit and no total time limit here (the application bounds them); a body that
    /// sends nothing for `body_read_timeout` is cut; one attempt, never re-sent once sent, and
    /// no `attempt_timeout` on the answer (it comes after the whole body). A frozen instance
    /// still ends the attempt.
    pub streamed_routes: Vec<String>,
    /// Consecutive failed attempts (no answer, or 500/502/504) after which an upstream is
    /// ejected: tried only when no other upstream can be, for `ejection_time`, however its
    /// `/readyz` answers. An instance that is ready but failing is an outlier, not a peer.
    pub eject_after_failures: u32,
    pub ejection_time: Duration,
    /// Requests per second one client address may send (`None`: unlimited). A request over
    /// the rate waits (up to a second) for its turn; past that it waits the second anyway and
    /// gets 429 with `Retry-After`. Waiting, not refusing at once, is the point: a closed-loop
    /// flood is slowed to the rate instead of spinning on cheap refusals.
    pub client_rate: Option<ClientRate>,
}

/// A per-address request rate: `per_second` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientRate {
    pub per_second: u32,
    pub burst: u32,
}

/// The operator page (`GET /ops` on the operator listener): live instances, upstream health
/// and the last minutes' traffic, from the JSON endpoints beside it.
const OPS_PAGE: &str = include_str!("ops.html");

/// How long a request over its client's rate may wait for its turn.
const MAX_THROTTLE_WAIT: Duration = Duration::from_secs(1);
/// Client addresses whose rate is tracked at once before idle ones are forgotten.
const RATE_TRACKED: usize = 100_000;

impl Default for BalancerOptions {
    fn default() -> Self {
        Self {
            health_interval: Duration::from_millis(200),
            health_timeout: Duration::from_millis(300),
            liveness_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(1),
            attempt_timeout: Duration::from_secs(15),
            max_buffered_body: 8 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(5),
            body_read_timeout: Duration::from_secs(10),
            max_connections: 4096,
            max_connections_per_client: 256,
            keyed_routes: Vec::new(),
            repeatable_routes: Vec::new(),
            streamed_routes: Vec::new(),
            eject_after_failures: 5,
            ejection_time: Duration::from_secs(10),
            client_rate: Some(ClientRate {
                per_second: 50,
                burst: 100,
            }),
        }
    }
}

/// One upstream as the balancer currently sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpstreamStatus {
    pub addr: SocketAddr,
    /// Its `/readyz` says it takes traffic.
    pub healthy: bool,
    /// Its `/healthz` answers in time (false: stopped, hung or gone).
    pub alive: bool,
    /// Ejected after consecutive failed attempts (see `BalancerOptions::eject_after_failures`).
    pub ejected: bool,
}

/// A cheap-to-clone handle to one load balancer.
#[derive(Clone)]
pub struct Balancer {
    inner: Arc<Inner>,
}

struct Inner {
    opts: BalancerOptions,
    client: Client<HttpConnector, proxy::UpstreamBody>,
    upstreams: RwLock<Arc<[Arc<Upstream>]>>,
    next: AtomicUsize,
    instances: RwLock<Bytes>,
    retries: AtomicU64,
    connections: Mutex<Connections>,
    /// Per client address, the theoretical arrival time of its next request (GCRA).
    rates: Mutex<HashMap<IpAddr, tokio::time::Instant>>,
    throttled: AtomicU64,
    /// Live upstreams whose liveness probe then went unanswered (stopped or hung, not gone).
    freezes: AtomicU64,
    /// Requests cut off with 408 because their body did not arrive in time.
    slow_clients: AtomicU64,
    /// Requests whose body has been arriving for over a second, now.
    stalled_bodies: AtomicU64,
    /// Connections refused at once: over the total or per-address connection cap.
    connections_refused: AtomicU64,
    rate_limited: AtomicU64,
    red: metrics::Red,
    history: metrics::History,
    /// Families the supervisor counts once for the whole fleet (say, queue depth).
    fleet_metrics: RwLock<Option<FleetMetrics>>,
}

/// Renders families counted once for the fleet, for `/ops/metrics`.
pub type FleetMetrics =
    Arc<dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// Open client connections, in all and per client address.
#[derive(Default)]
struct Connections {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

/// One admitted client connection; dropping it frees its slot.
struct ConnectionSlot {
    balancer: Balancer,
    client: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut c = self.balancer.connections();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                c.per_client.remove(&self.client);
            }
        }
    }
}

/// What a connection past the caps gets before it is closed.
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 97\r\n\r\n{\"type\":\"about:blank\",\"title\":\"Service Unavailable\",\"status\":503,\"detail\":\"too many connections\"}";

struct Upstream {
    addr: SocketAddr,
    healthy: AtomicBool,
    alive: AtomicBool,
    /// Woken when the upstream is found frozen, so attempts in flight to it stop waiting.
    frozen: tokio::sync::Notify,
    /// Failed attempts in a row.
    failures: std::sync::atomic::AtomicU32,
    /// Since when its liveness probe has gone unanswered.
    unresponsive_since: Mutex<Option<tokio::time::Instant>>,
    ejected_until: Mutex<Option<tokio::time::Instant>>,
}

impl Upstream {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            healthy: AtomicBool::new(true),
            alive: AtomicBool::new(true),
            frozen: tokio::sync::Notify::new(),
            failures: std::sync::atomic::AtomicU32::new(0),
            unresponsive_since: Mutex::new(None),
            ejected_until: Mutex::new(None),
        }
    }

    fn is_ejected(&self) -> bool {
        let until = *self
            .ejected_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        until.is_some_and(|t| tokio::time::Instant::now() < t)
    }

    /// Records an attempt's outcome; `eject` (after, for how long) ejects an outlier.
    fn record(&self, ok: bool, eject: (u32, Duration)) {
        if ok {
            self.failures.store(0, Ordering::Relaxed);
            return;
        }
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= eject.0.max(1) {
            self.failures.store(0, Ordering::Relaxed);
            *self
                .ejected_until
                .lock()
                .unwrap_or_else(PoisonError::into_inner) =
                Some(tokio::time::Instant::now() + eject.1);
            tracing::warn!(upstream = %self.addr, failures, ejected_for = ?eject.1, "upstream ejected: consecutive failures");
        }
    }

    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    /// Records liveness; true when this turns a live upstream dead.
    fn set_alive(&self, alive: bool) -> bool {
        let changed = self.alive.swap(alive, Ordering::Relaxed) != alive;
        if changed {
            tracing::info!(upstream = %self.addr, alive, "upstream liveness changed");
            *self
                .unresponsive_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = (!alive).then(tokio::time::Instant::now);
        }
        if !alive {
            self.frozen.notify_waiters();
        }
        changed && !alive
    }

    fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn set_healthy(&self, healthy: bool) {
        if self.healthy.swap(healthy, Ordering::Relaxed) != healthy {
            tracing::info!(upstream = %self.addr, healthy, "upstream health changed");
        }
    }
}

impl Balancer {
    pub fn new(opts: BalancerOptions) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(opts.connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            // Shorter than the instances' idle timeout, so we rarely send on a closing connection.
            .pool_idle_timeout(Duration::from_secs(5))
            .build(connector);
        Self {
            inner: Arc::new(Inner {
                opts,
                client,
                upstreams: RwLock::new(Arc::from([])),
                next: AtomicUsize::new(0),
                instances: RwLock::new(Bytes::from_static(b"[]")),
                retries: AtomicU64::new(0),
                connections: Mutex::default(),
                rates: Mutex::default(),
                throttled: AtomicU64::new(0),
                freezes: AtomicU64::new(0),
                slow_clients: AtomicU64::new(0),
                stalled_bodies: AtomicU64::new(0),
                connections_refused: AtomicU64::new(0),
                rate_limited: AtomicU64::new(0),
                red: metrics::Red::default(),
                history: metrics::History::default(),
                fleet_metrics: RwLock::new(None),
            }),
        }
    }

    /// Replaces the set of upstreams. Addresses that stay keep their health; new ones are
    /// eligible until a check says otherwise.
    pub fn set_upstreams(&self, addrs: Vec<SocketAddr>) {
        let mut slot = self
            .inner
            .upstreams
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let mut next: Vec<Arc<Upstream>> = Vec::with_capacity(addrs.len());
        for addr in addrs {
            if next.iter().any(|u| u.addr == addr) {
                continue;
            }
            let kept = slot.iter().find(|u| u.addr == addr).cloned();
            next.push(kept.unwrap_or_else(|| Arc::new(Upstream::new(addr))));
        }
        *slot = next.into();
    }

    pub fn upstreams(&self) -> Vec<UpstreamStatus> {
        self.snapshot()
            .iter()
            .map(|u| UpstreamStatus {
                addr: u.addr,
                healthy: u.is_healthy(),
                alive: u.is_alive(),
                ejected: u.is_ejected(),
            })
            .collect()
    }

    /// Sets the body served verbatim at `GET /ops/instances`.
    pub fn publish_instances(&self, json: Bytes) {
        *self
            .inner
            .instances
            .write()
            .unwrap_or_else(PoisonError::into_inner) = json;
    }

    /// How many times a request was sent to another upstream after a failed attempt.
    pub fn retries_total(&self) -> u64 {
        self.inner.retries.load(Ordering::Relaxed)
    }

    fn connections(&self) -> std::sync::MutexGuard<'_, Connections> {
        self.inner
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a connection slot for `client`, or `None` when a cap is reached.
    fn admit(&self, client: IpAddr) -> Option<ConnectionSlot> {
        let opts = &self.inner.opts;
        let mut c = self.connections();
        let mine = c.per_client.get(&client).copied().unwrap_or(0);
        if c.total >= opts.max_connections || mine >= opts.max_connections_per_client {
            return None;
        }
        c.total += 1;
        *c.per_client.entry(client).or_default() += 1;
        Some(ConnectionSlot {
            balancer: self.clone(),
            client,
        })
    }

    /// The upstreams that have not answered their liveness probe, and for how long: what a
    /// supervisor needs to kill an instance that is stopped or hung rather than wait for it.
    pub fn unresponsive(&self) -> Vec<(SocketAddr, Duration)> {
        let now = tokio::time::Instant::now();
        self.snapshot()
            .iter()
            .filter_map(|u| {
                let since = *u
                    .unresponsive_since
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                since.map(|t| (u.addr, now.saturating_duration_since(t)))
            })
            .collect()
    }

    /// Adds families counted once for the whole fleet to `/ops/metrics`.
    pub fn set_fleet_metrics(&self, render: FleetMetrics) {
        *self
            .inner
            .fleet_metrics
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(render);
    }

    /// Client connections open now.
    pub fn open_connections(&self) -> usize {
        self.connections().total
    }

    /// Serves clients on `listener` and checks upstream health until `shutdown` resolves; then
    /// stops accepting and lets in-flight requests finish for up to
    /// [`BalancerOptions::shutdown_grace`].
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<()> {
        let health = tokio::spawn(self.clone().check_health_forever());
        let history = tokio::spawn(self.clone().record_history_forever());
        let graceful = GracefulShutdown::new();
        let mut connections = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        let mut http = http1::Builder::new();
        // A client that trickles its request head is cut off.
        http.timer(TokioTimer::new())
            .header_read_timeout(self.inner.opts.header_read_timeout);
        loop {
            let (stream, peer) = tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Some(slot) = self.admit(peer.ip()) else {
                tracing::warn!(%peer, "connection refused: too many connections");
                self.inner
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed);
                // Best effort: a full socket buffer just gets the close.
                let _ = stream.try_write(TOO_MANY_CONNECTIONS);
                continue;
            };
            // Only a latency tweak; the connection works without it.
            let _ = stream.set_nodelay(true);
            let balancer = self.clone();
            let service = service_fn(move |req| {
                let balancer = balancer.clone();
                async move {
                    let started = tokio::time::Instant::now();
                    let resp = balancer.handle(req, peer).await;
                    balancer.inner.red.record(resp.status(), started.elapsed());
                    Ok::<_, Infallible>(resp)
                }
            });
            // hyper's own answers to unparsable requests (400, 414, 431) become problems too.
            let io = TokioIo::new(ParseErrorsAsProblems::new(stream));
            let connection = graceful.watch(http.serve_connection(io, service));
            connections.spawn(async move {
                let _slot = slot;
                if let Err(error) = connection.await {
                    tracing::debug!(%error, %peer, "client connection ended with an error");
                }
            });
        }
        drop(listener);
        if timeout(self.inner.opts.shutdown_grace, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace period over; dropping in-flight requests");
        }
        connections.shutdown().await;
        health.abort();
        history.abort();
        Ok(())
    }

    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let path = req.uri().path();
        if path == "/metrics" || path.starts_with("/ops/") {
            return problem(
                StatusCode::NOT_FOUND,
                "operator endpoints are not served on the public port",
            );
        }
        if let Some(rate) = self.inner.opts.client_rate {
            if let Err(retry_after) = self.throttle(peer.ip(), rate).await {
                let mut resp = problem(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many requests from this address",
                );
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, http::HeaderValue::from(retry_after));
                return resp;
            }
        }
        self.proxy(req, peer).await
    }

    /// Waits for `client`'s turn under `rate`; `Err(seconds)` (after waiting the longest a
    /// request may) when its turn is further away than that.
    async fn throttle(&self, client: IpAddr, rate: ClientRate) -> Result<(), u64> {
        let now = tokio::time::Instant::now();
        let every = Duration::from_secs(1) / rate.per_second.max(1);
        let tolerance = every * rate.burst.max(1);
        let wait = {
            let mut rates = self
                .inner
                .rates
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if rates.len() >= RATE_TRACKED {
                rates.retain(|_, tat| *tat > now);
            }
            let tat = rates.get(&client).copied().unwrap_or(now).max(now) + every;
            let wait = tat.saturating_duration_since(now + tolerance);
            if wait <= MAX_THROTTLE_WAIT {
                rates.insert(client, tat);
                Ok(wait)
            } else {
                Err(wait)
            }
        };
        match wait {
            Ok(wait) if wait.is_zero() => Ok(()),
            Ok(wait) => {
                self.inner.throttled.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(wait).await;
                Ok(())
            }
            Err(wait) => {
                self.inner.rate_limited.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(MAX_THROTTLE_WAIT).await;
                Err(wait.saturating_sub(MAX_THROTTLE_WAIT).as_secs().max(1))
            }
        }
    }

    /// Serves the operator endpoints on `listener` until `shutdown` resolves: `GET
    /// /ops/instances` (JSON published by the supervisor), `GET /ops/upstreams` (the health
    /// table) and `GET /ops/stats`. Bind it to a private address; the public port refuses them.
    pub async fn serve_operator(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<()> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut connections = JoinSet::new();
        loop {
            let (stream, _) = tokio::select! {
                () = &mut shutdown => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "operator accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let balancer = self.clone();
            let service = service_fn(move |req: Request<Incoming>| {
                let balancer = balancer.clone();
                async move {
                    if req.method() == Method::GET && req.uri().path() == "/ops/metrics" {
                        let mut resp =
                            Response::new(full(Bytes::from(balancer.fleet_metrics().await)));
                        resp.headers_mut().insert(
                            header::CONTENT_TYPE,
                            http::HeaderValue::from_static("text/plain; version=0.0.4"),
                        );
                        return Ok::<_, Infallible>(resp);
                    }
                    Ok::<_, Infallible>(balancer.operator(&req))
                }
            });
            connections.spawn(async move {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(ParseErrorsAsProblems::new(stream)), service)
                    .await;
            });
        }
        connections.shutdown().await;
        Ok(())
    }

    fn operator(&self, req: &Request<Incoming>) -> Response<Body> {
        if req.method() != Method::GET {
            return problem(
                StatusCode::METHOD_NOT_ALLOWED,
                "operator endpoints are GET only",
            );
        }
        match req.uri().path() {
            "/ops/instances" => {
                let json = self
                    .inner
                    .instances
                    .read()
                    .unwrap_or_else(PoisonError::into_inner);
                json_response(json.clone())
            }
            "/ops" | "/ops/" => {
                let mut resp = Response::new(full(Bytes::from_static(OPS_PAGE.as_bytes())));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/html; charset=utf-8"),
                );
                resp
            }
            "/ops/history" => match serde_json::to_vec(&self.history()) {
                Ok(json) => json_response(json.into()),
                Err(error) => problem(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
            },
            "/ops/upstreams" => match serde_json::to_vec(&self.upstreams()) {
                Ok(json) => json_response(json.into()),
                Err(error) => problem(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
            },
            "/ops/stats" => {
                let stats = serde_json::json!({
                    "retries_total": self.retries_total(),
                    "open_connections": self.open_connections(),
                    "throttled_total": self.inner.throttled.load(Ordering::Relaxed),
                    "rate_limited_total": self.inner.rate_limited.load(Ordering::Relaxed),
                });
                json_response(stats.to_string().into())
            }
            _ => problem(StatusCode::NOT_FOUND, "no such operator endpoint"),
        }
    }

    fn snapshot(&self) -> Arc<[Arc<Upstream>]> {
        self.inner
            .upstreams
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The order in which to try upstreams for one request: the healthy ones round-robin, then
    /// the live but unready or ejected ones (their state may be stale) as a last resort. Frozen
    /// or gone ones are not tried at all.
    fn candidates(&self) -> Vec<Arc<Upstream>> {
        let turn = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let (mut healthy, mut rest): (Vec<_>, Vec<_>) = self
            .snapshot()
            .iter()
            .filter(|u| u.is_alive())
            .cloned()
            .partition(|u| u.is_healthy() && !u.is_ejected());
        for group in [&mut healthy, &mut rest] {
            if !group.is_empty() {
                let by = turn % group.len();
                group.rotate_left(by);
            }
        }
        healthy.append(&mut rest);
        healthy
    }

    async fn check_health_forever(self) {
        let period = self
            .inner
            .opts
            .health_interval
            .max(Duration::from_millis(1));
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let mut checks = JoinSet::new();
            for upstream in self.snapshot().iter() {
                let (balancer, upstream) = (self.clone(), Arc::clone(upstream));
                checks.spawn(async move {
                    tokio::join!(
                        balancer.check_liveness(&upstream),
                        balancer.check_health(&upstream)
                    )
                });
            }
            while checks.join_next().await.is_some() {}
        }
    }

    /// Asks `upstream` for `/healthz` (which touches no dependency, so only a stopped, hung or
    /// dead process misses it) and records whether it answered in time.
    async fn check_liveness(&self, upstream: &Upstream) {
        let uri = format!("http://{}/healthz", upstream.addr);
        let Ok(req) = Request::get(uri).body(proxy::upstream_full(Bytes::new())) else {
            return;
        };
        let probe = async {
            let resp = self.inner.client.request(req).await.ok()?;
            resp.into_body().collect().await.ok()
        };
        let answered = timeout(self.inner.opts.liveness_timeout, probe).await;
        // A process that is gone refuses the connection at once; one that accepts and then
        // says nothing is stopped or hung: that is what `freezes` counts.
        if upstream.set_alive(matches!(answered, Ok(Some(_)))) && answered.is_err() {
            self.inner.freezes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Asks `upstream` for `/readyz`, records and returns whether it is healthy.
    async fn check_health(&self, upstream: &Upstream) -> bool {
        let uri = format!("http://{}/readyz", upstream.addr);
        let Ok(req) = Request::get(uri).body(proxy::upstream_full(Bytes::new())) else {
            return false;
        };
        let probe = async {
            let resp = self.inner.client.request(req).await.ok()?;
            let ready = resp.status().is_success();
            // Read the (small) body so the connection can go back to the pool.
            resp.into_body().collect().await.ok()?;
            Some(ready)
        };
        let healthy = matches!(
            timeout(self.inner.opts.health_timeout, probe).await,
            Ok(Some(true))
        );
        upstream.set_healthy(healthy);
        healthy
    }
}

fn json_response(json: Bytes) -> Response<Body> {
    let mut resp = Response::new(full(json));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}
