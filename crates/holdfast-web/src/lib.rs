//! The HTTP edge of a Holdfast service, without the service: sessions, idempotency keys,
//! problem+json errors, health, readiness and metrics, as pieces an axum application composes.
//!
//! [`app`] wraps an application's routes in everything an instance needs: accounts
//! (`/api/signup`, `/api/login`, `/api/logout`, `/api/password`, `/api/me`), `/healthz`,
//! `/readyz` (503 while draining), the CSRF guard, a body limit, an in-flight cap, a request
//! deadline and panic containment; [`operator_app`] serves `/metrics` on a listener of its own. A handler opts into the rest by taking an extractor:
//! [`Authed`] is the session's user (its id is the authorization filter; a handler whose work
//! is one statement on Postgres may leave the session's check to that statement instead, see
//! [`Claim::user_in`]), and [`Idempotent`] reads the request's `Idempotency-Key`
//! (draft-ietf-httpapi-idempotency-key-header-07) and runs the handler's transaction, which
//! claims the key, so that its answer is stored with its effect, and a retry replays it
//! instead of acting twice.
//! Every failure is one [`AppError`], rendered as RFC 9457 problem+json.
//!
//! The application's own state reaches handlers through axum's `FromRef`: any state from
//! which an [`AppState`] can be had works.
//!
//! Architecture invariant: an instance holds nothing a user needs. Sessions live in one of
//! `holdfast-sessions`' tiers, idempotency keys in the store; a SIGKILL loses only requests in
//! flight.

mod accounts;
mod body;
mod error;
mod fresh;
mod idempotency;
mod limits;
mod passwords;
mod session;

pub use body::{
    canonical_json, idempotency_key, parse_json, FromBody, JsonBody, PathParam, RawBody,
};
pub use error::{AppError, AppResult, PROBLEM_JSON};
pub use fresh::{read_cookie_name, ReadAfter, READ_TOKEN_TTL};
pub use holdfast_sessions::{KeyRing, SessionTier, Sessions};
pub use holdfast_store::Quota;
pub use idempotency::{
    json_response, respond, Claim, Idempotent, OneStatement, Optional, Required,
};
pub use limits::{loopback, ClientAddr, RateLimits};
pub use metrics_exporter_prometheus::PrometheusHandle;
pub use passwords::PasswordPool;
pub use session::{cookie_name, Authed};

use axum::extract::{FromRef, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use holdfast_store::Store;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Knobs of one web instance. Defaults are production values.
#[derive(Debug, Clone)]
pub struct WebOptions {
    /// A session unused this long is dead.
    pub session_idle_ttl: Duration,
    /// A session older than this is dead, however active.
    pub session_absolute_ttl: Duration,
    /// Where sessions live (built by the binary: a Redis connection, a key ring). The store
    /// tier and the Redis tier's backstop are the instance's store.
    pub sessions: SessionTier,
    /// Set the cookie's `Secure` flag. Off only when explicitly serving plain-HTTP localhost.
    pub secure_cookies: bool,
    /// The lease written with a key's claim. A request claims its key inside the transaction
    /// that does the work, so this matters only for a claim committed on its own (a build
    /// before that, met during a rolling upgrade): a retry takes such a key over after it.
    pub idempotency_lock_ttl: Duration,
    /// How long finished idempotency keys are kept for replay (at least 24 h).
    pub idempotency_retention: Duration,
    /// Server-side deadline for one request.
    pub request_timeout: Duration,
    /// Largest accepted request body; more is a 413. The accounts routes take at most
    /// [`ACCOUNT_BODY_LIMIT`].
    pub max_body_bytes: usize,
    /// Password hashes (argon2id, 19 MiB each) running at once; the rest wait.
    pub hash_concurrency: usize,
    /// Password hashes waiting; past this a sign-in gets 503 with `Retry-After`.
    pub hash_queue: usize,
    /// Requests in flight at once; past this a request gets 503 with `Retry-After` at once.
    pub max_in_flight: usize,
    /// The accounts routes' quotas, shared by every instance through the store.
    pub rate_limits: RateLimits,
    /// Peers whose `X-Forwarded-For` names the client (see [`ClientAddr`]).
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// How long a browser that logged in stays a known device of the account.
    pub known_device_ttl: Duration,
    /// An opaque name this instance puts on every answer (`X-Served-By`), so a page or a
    /// support ticket can say which instance answered without revealing its address.
    pub instance_name: Option<String>,
}

/// The edge's routes that are safe to repeat without an `Idempotency-Key`, for a balancer
/// that re-sends a request whose instance froze or died mid-way: a second login only leaves
/// an unused session to expire, a second logout finds nothing to end.
pub const REPEATABLE_ROUTES: &[&str] = &["POST /api/login", "POST /api/logout"];

/// The body limit of the accounts routes: an email and two passwords fit many times over.
pub const ACCOUNT_BODY_LIMIT: usize = 4 * 1024;

impl Default for WebOptions {
    fn default() -> Self {
        Self {
            session_idle_ttl: Duration::from_secs(30 * 60),
            session_absolute_ttl: Duration::from_secs(12 * 3600),
            sessions: SessionTier::Store,
            secure_cookies: true,
            idempotency_lock_ttl: Duration::from_secs(1),
            idempotency_retention: Duration::from_secs(24 * 3600),
            request_timeout: Duration::from_secs(10),
            max_body_bytes: 64 * 1024,
            hash_concurrency: std::thread::available_parallelism().map_or(1, usize::from),
            hash_queue: 32,
            max_in_flight: 512,
            rate_limits: RateLimits::default(),
            trusted_proxies: limits::loopback(),
            known_device_ttl: Duration::from_secs(365 * 24 * 3600),
            instance_name: None,
        }
    }
}

/// What the edge's handlers and extractors need: the store, the session tier, the options.
/// Cheap to clone. An application keeps one in its own state and implements `FromRef`.
#[derive(Clone)]
pub struct AppState {
    pub(crate) store: Store,
    pub(crate) sessions: Sessions,
    pub(crate) opts: Arc<WebOptions>,
    pub(crate) draining: Arc<AtomicBool>,
    pub(crate) metrics: Option<PrometheusHandle>,
    pub(crate) passwords: PasswordPool,
    pub(crate) refusals: Arc<limits::Refusals>,
    /// The key read-your-writes tokens are signed with, once read from the store.
    pub(crate) read_key: Arc<tokio::sync::OnceCell<Vec<u8>>>,
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    /// Builds the session tier too; for Redis that spawns its backstop writer, so call this
    /// inside a tokio runtime.
    pub fn new(store: Store, opts: WebOptions, metrics: Option<PrometheusHandle>) -> Self {
        let config =
            holdfast_sessions::Config::new(opts.session_idle_ttl, opts.session_absolute_ttl);
        Self {
            sessions: Sessions::new(opts.sessions.clone(), store.clone(), config),
            passwords: PasswordPool::new(opts.hash_concurrency, opts.hash_queue),
            in_flight: Arc::new(tokio::sync::Semaphore::new(opts.max_in_flight)),
            refusals: Arc::default(),
            read_key: Arc::default(),
            store,
            opts: Arc::new(opts),
            draining: Arc::new(AtomicBool::new(false)),
            metrics,
        }
    }

    /// Readiness turns false; requests keep being served until the server is shut down.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    pub fn options(&self) -> &WebOptions {
        &self.opts
    }
}

/// Histogram buckets in seconds; 0.25 s is the request latency objective.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The metric families the edge exports (see [`holdfast_core::Metric`]).
pub const METRICS: &[holdfast_core::Metric] = &[
    holdfast_core::Metric::counter(
        "holdfast_http_requests_total",
        "HTTP requests answered, by method, route and status.",
    ),
    holdfast_core::Metric::histogram(
        "holdfast_http_request_duration_seconds",
        "Time from a request's arrival to its answer, by method, route and status.",
    ),
    holdfast_core::Metric::counter(
        "holdfast_http_shed_total",
        "Requests refused at once (503) because the instance was at its in-flight cap.",
    )
    .at_zero(&[&[]]),
    holdfast_core::Metric::counter(
        "holdfast_password_hash_refused_total",
        "Sign-ins refused (503) because the password-hash queue was full.",
    )
    .at_zero(&[&[]]),
    holdfast_core::Metric::counter(
        "holdfast_rate_limited_total",
        "Requests refused (429) by a rate limit, by limit.",
    )
    .at_zero(&[
        &[("limit", "login-address")],
        &[("limit", "login-account")],
        &[("limit", "login-device")],
        &[("limit", "signup-address")],
        &[("limit", "password-change")],
    ]),
    holdfast_core::Metric::counter(
        "holdfast_read_tokens_refused_total",
        "Read-your-writes tokens that did not verify (forged, expired, garbled): their reads went to the primary.",
    )
    .at_zero(&[&[]]),
    holdfast_core::Metric::gauge(
        "holdfast_db_pool_connections",
        "Store connections, by state (idle, in_use).",
    ),
];

/// The async runtime's own figures — what a GC pause would be elsewhere: a task that blocks a
/// worker thread shows as busy time with the global queue growing behind it.
pub const RUNTIME_METRICS: &[holdfast_core::Metric] = &[
    holdfast_core::Metric::gauge(
        "holdfast_runtime_workers",
        "Worker threads of the process's async runtime.",
    ),
    holdfast_core::Metric::gauge(
        "holdfast_runtime_alive_tasks",
        "Tasks alive in the async runtime (one per connection and request, and background loops).",
    ),
    holdfast_core::Metric::gauge(
        "holdfast_runtime_global_queue_depth",
        "Tasks waiting in the runtime's global queue for a worker thread: a backlog means workers are busy or blocked.",
    ),
    holdfast_core::Metric::counter(
        "holdfast_runtime_busy_seconds_total",
        "Time the runtime's worker threads spent running tasks, summed over workers.",
    ),
];

/// Sets the [`RUNTIME_METRICS`] from the current tokio runtime (nothing outside one). Called
/// before each render, so the figures are as fresh as the scrape.
pub fn record_runtime_metrics() {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let m = runtime.metrics();
    let busy: Duration = (0..m.num_workers())
        .map(|w| m.worker_total_busy_duration(w))
        .sum();
    metrics::gauge!("holdfast_runtime_workers").set(m.num_workers() as f64);
    metrics::gauge!("holdfast_runtime_alive_tasks").set(m.num_alive_tasks() as f64);
    metrics::gauge!("holdfast_runtime_global_queue_depth").set(m.global_queue_depth() as f64);
    metrics::counter!("holdfast_runtime_busy_seconds_total").absolute(busy.as_secs());
}

/// Everything this instance exports, rendered now (`None` when metrics are off): the pool's
/// and the runtime's gauges are read first. `/metrics` serves it; a Graphite push sends it.
pub fn render_instance_metrics(st: &AppState) -> Option<String> {
    let handle = st.metrics.as_ref()?;
    let (size, idle) = st.store.pool_stats();
    metrics::gauge!("holdfast_db_pool_connections", "state" => "idle").set(idle as f64);
    metrics::gauge!("holdfast_db_pool_connections", "state" => "in_use")
        .set(f64::from(size).max(idle as f64) - idle as f64);
    record_runtime_metrics();
    Some(handle.render())
}

/// Installs the process-wide Prometheus recorder, once; later calls return the same handle.
pub fn install_metrics_recorder() -> Result<PrometheusHandle, String> {
    install_labelled_metrics_recorder(&[], &[])
}

/// [`install_metrics_recorder`] with `labels` (say `role` and `instance`) on every series, and
/// every family of `catalogs` described (`# HELP`) and its counters registered at 0.
pub fn install_labelled_metrics_recorder(
    labels: &[(&str, String)],
    catalogs: &[&[holdfast_core::Metric]],
) -> Result<PrometheusHandle, String> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    let handle = HANDLE
        .get_or_init(|| {
            let mut builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .map_err(|e| e.to_string())?;
            for (k, v) in labels {
                builder = builder.add_global_label(*k, v.clone());
            }
            builder.install_recorder().map_err(|e| e.to_string())
        })
        .clone()?;
    describe_metrics(catalogs);
    Ok(handle)
}

/// Describes every family of `catalogs` and registers its zero series.
pub fn describe_metrics(catalogs: &[&[holdfast_core::Metric]]) {
    use holdfast_core::MetricKind;
    for m in catalogs.iter().flat_map(|c| c.iter()) {
        match m.kind {
            MetricKind::Counter => {
                metrics::describe_counter!(m.name, m.help);
                for labels in m.zero {
                    let labels: Vec<metrics::Label> = labels
                        .iter()
                        .map(|(k, v)| metrics::Label::new(*k, *v))
                        .collect();
                    metrics::counter!(m.name, labels).increment(0);
                }
            }
            MetricKind::Gauge => metrics::describe_gauge!(m.name, m.help),
            MetricKind::Histogram => metrics::describe_histogram!(m.name, m.help),
        }
    }
}

/// An instance's public router: the application's `routes`, the accounts API, `/healthz` and
/// `/readyz` (for balancers; they answer without a session), behind the edge's layers. The
/// CSRF guard and the body limit cover every route given here. `/metrics` is not here but in
/// [`operator_app`].
pub fn app<S>(state: S, routes: Router<S>) -> Router
where
    S: Clone + Send + Sync + 'static,
    AppState: FromRef<S>,
{
    app_with_streams(state, routes, Router::new())
}

/// [`app`] with `streams` too: routes whose bodies or answers flow for as long as they take
/// (resumable uploads, downloads). They get sessions, the CSRF guard, load shedding, metrics
/// and panic containment, but neither the request deadline nor the body limit: each must
/// bound its own time (an idle timeout) and memory (a fixed buffer).
pub fn app_with_streams<S>(state: S, routes: Router<S>, streams: Router<S>) -> Router
where
    S: Clone + Send + Sync + 'static,
    AppState: FromRef<S>,
{
    let edge = AppState::from_ref(&state);
    let guarded = |r: Router<S>| {
        r.route_layer(middleware::from_fn_with_state(
            edge.clone(),
            session::csrf_guard,
        ))
        .route_layer(middleware::from_fn_with_state(
            edge.clone(),
            session::reissue_cookie,
        ))
    };
    let api = guarded(
        accounts::routes::<S>(edge.opts.max_body_bytes.min(ACCOUNT_BODY_LIMIT)).merge(routes),
    )
    .layer(axum::extract::DefaultBodyLimit::max(
        edge.opts.max_body_bytes,
    ));
    let bounded = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(api)
        .layer(middleware::from_fn_with_state(edge.clone(), deadline));
    let streams = if streams.has_routes() {
        guarded(streams).layer(axum::extract::DefaultBodyLimit::disable())
    } else {
        streams
    };
    bounded
        .merge(streams)
        .route_layer(middleware::from_fn(track))
        .fallback(|| async { AppError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            AppError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "method not allowed on this route",
            )
        })
        .layer(middleware::from_fn_with_state(
            edge.clone(),
            fresh::hand_out_token,
        ))
        .layer(middleware::from_fn_with_state(edge.clone(), shed_load))
        .layer(middleware::from_fn_with_state(edge, served_by))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            AppError::internal("a handler panicked").into_response()
        }))
        .with_state(state)
}

/// An instance's operator endpoints — `/metrics`, `/healthz`, `/readyz` — for a listener of
/// their own that is not the public one (metrics tell an attacker too much).
pub fn operator_app(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .fallback(|| async { AppError::not_found("no such route") })
        .with_state(state)
}

/// Names the answering instance on every answer (see [`WebOptions::instance_name`]).
async fn served_by(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    if let Some(name) = &st.opts.instance_name {
        if let Ok(v) = HeaderValue::from_str(name) {
            resp.headers_mut().insert("x-served-by", v);
        }
    }
    resp
}

/// Counts and times every routed request by route template, method and status.
async fn track(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(String::new, |m| m.as_str().to_owned());
    let method = req.method().to_string();
    let resp = next.run(req).await;
    let labels = [
        ("method", method),
        ("route", route),
        ("status", resp.status().as_u16().to_string()),
    ];
    metrics::counter!("holdfast_http_requests_total", &labels).increment(1);
    metrics::histogram!("holdfast_http_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    resp
}

/// The in-flight cap: past it a request is refused at once instead of queueing (memory and
/// latency stay bounded; the balancer or client retries elsewhere or later).
async fn shed_load(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let Ok(_permit) = Arc::clone(&st.in_flight).try_acquire_owned() else {
        metrics::counter!("holdfast_http_shed_total").increment(1);
        return AppError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "this instance is at capacity; retry shortly",
        )
        .retry_after(1)
        .into_response();
    };
    next.run(req).await
}

/// The server-side deadline. Dropping the handler rolls its transaction back, and with it the
/// claim on its idempotency key.
async fn deadline(State(st): State<AppState>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(st.opts.request_timeout, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => AppError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "deadline-exceeded",
            "the request took too long; retry it",
        )
        .retry_after(1)
        .into_response(),
    }
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when not draining and the store answers within a second.
async fn readyz(State(st): State<AppState>) -> Response {
    if st.draining.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "draining" })),
        )
            .into_response();
    }
    match tokio::time::timeout(Duration::from_secs(1), st.store.ping()).await {
        Ok(Ok(())) => Json(json!({ "status": "ready" })).into_response(),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "store-unreachable" })),
        )
            .into_response(),
    }
}

async fn render_metrics(State(st): State<AppState>) -> Response {
    let Some(text) = render_instance_metrics(&st) else {
        return AppError::not_found("metrics are not enabled").into_response();
    };
    let mut resp = text.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The accepted connections of [`public_listener`].
pub struct PublicListener(tokio::net::TcpListener);

/// What [`public_listener`] gives `axum::serve`: a [`PublicListener`], tapped so that
/// `ConnectInfo<SocketAddr>` (the rate limits' peer address) works as for a bare TCP listener.
pub type Public = axum::serve::TapIo<
    PublicListener,
    fn(&mut holdfast_http::ParseErrorsAsProblems<tokio::net::TcpStream>),
>;

/// A listener for the public port: hyper's own answers to unparsable requests (400, 414,
/// 431) come out as problem+json, and Nagle is off. Serve it with
/// `into_make_service_with_connect_info::<SocketAddr>()`.
pub fn public_listener(listener: tokio::net::TcpListener) -> Public {
    use axum::serve::ListenerExt;
    PublicListener(listener).tap_io(|_| {})
}

impl axum::serve::Listener for PublicListener {
    type Io = holdfast_http::ParseErrorsAsProblems<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((stream, addr)) => {
                    // Only a latency tweak; the connection works without it.
                    let _ = stream.set_nodelay(true);
                    return (holdfast_http::ParseErrorsAsProblems::new(stream), addr);
                }
                Err(error) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// Deletes expired sessions, idempotency keys, rate-limit cells and known devices every
/// `every`, forever. Spawn it per instance; several instances reaping at once is harmless.
pub async fn reap_forever(state: AppState, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let (o, now) = (&state.opts, holdfast_core::now_ms());
        let reaped = async {
            let sessions = state.store.session_reap(now, o.session_idle_ttl).await?;
            let keys = state.store.idem_reap(now, o.idempotency_retention).await?;
            let limits = state.store.rate_reap(now).await?;
            let devices = state
                .store
                .device_reap(now.saturating_sub(millis(o.known_device_ttl)))
                .await?;
            Ok::<_, holdfast_store::Error>((sessions, keys, limits, devices))
        };
        match reaped.await {
            Ok((sessions, keys, limits, devices)) if sessions + keys + limits + devices > 0 => {
                tracing::info!(sessions, keys, limits, devices, "reaped")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reaper failed; will try again"),
        }
    }
}
