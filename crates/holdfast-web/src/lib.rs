//! The HTTP edge of Holdfast: the reference shop as an axum [`Router`].
//!
//! This is the only crate that knows HTTP. It parses every request into the core's newtypes,
//! turns every failure into one [`AppError`] rendered as RFC 9457 problem+json, keeps sessions
//! in the store (the instance holds nothing a SIGKILL could lose), and implements
//! Idempotency-Key (draft-ietf-httpapi-idempotency-key-header-07) over the store's two-phase
//! claim/commit so a retried checkout replays its first answer instead of ordering twice.

use holdfast_store::Store;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Knobs of one web instance. Defaults are production values.
#[derive(Debug, Clone)]
pub struct WebOptions {
    /// A session unused this long is dead.
    pub session_idle_ttl: Duration,
    /// A session older than this is dead, however active.
    pub session_absolute_ttl: Duration,
    /// Set the cookie's `Secure` flag. Off only when explicitly serving plain-HTTP localhost.
    pub secure_cookies: bool,
    /// How long an in-flight idempotent request holds its key before a retry may take over.
    /// Must exceed `request_timeout`.
    pub idempotency_lock_ttl: Duration,
    /// How long finished idempotency keys are kept for replay (at least 24 h).
    pub idempotency_retention: Duration,
    /// Server-side deadline for one request.
    pub request_timeout: Duration,
    /// Largest accepted request body; more is a 413.
    pub max_body_bytes: usize,
    /// Expose `/bench/*` routes (the same handlers without the idempotency layer), for
    /// `holdfast bench` only.
    pub bench_routes: bool,
}

impl Default for WebOptions {
    fn default() -> Self {
        Self {
            session_idle_ttl: Duration::from_secs(30 * 60),
            session_absolute_ttl: Duration::from_secs(12 * 3600),
            secure_cookies: true,
            idempotency_lock_ttl: Duration::from_secs(20),
            idempotency_retention: Duration::from_secs(24 * 3600),
            request_timeout: Duration::from_secs(10),
            max_body_bytes: 64 * 1024,
            bench_routes: false,
        }
    }
}

/// Everything a handler needs. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub(crate) store: Store,
    pub(crate) opts: Arc<WebOptions>,
    pub(crate) draining: Arc<AtomicBool>,
    pub(crate) metrics: Option<PrometheusHandle>,
}

impl AppState {
    pub fn new(store: Store, opts: WebOptions, metrics: Option<PrometheusHandle>) -> Self {
        Self {
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

    pub fn options(&self) -> &WebOptions {
        &self.opts
    }
}

/// Installs the process-wide Prometheus recorder (call once per process).
pub fn install_metrics_recorder() -> Result<PrometheusHandle, String> {
    todo!()
}

/// The whole shop as a router.
pub fn app(state: AppState) -> axum::Router {
    let _ = state;
    todo!()
}

/// Deletes expired sessions and idempotency keys every `every`, forever. Spawn it per instance.
pub async fn reap_forever(state: AppState, every: Duration) {
    let _ = (state, every);
    todo!()
}
