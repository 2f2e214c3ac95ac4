//! The fake payment provider and mail sink that Holdfast's workers call: `holdfast provider`.
//!
//! Invariant 3 — each paid order is charged exactly once and gets exactly one receipt, however
//! often jobs are redelivered or provider calls time out after the provider acted — can only
//! be tested against a dependency that fails the way real ones do. An in-process mock cannot:
//! it shares the worker's fate when the worker is killed, never leaves a request half-done,
//! and answers exactly what the test expected. So this fake is a separate process speaking
//! real HTTP over real sockets, with a real provider's idempotency keys (Stripe's semantics)
//! and faults injected at runtime — above all "act, then time out before answering", the
//! fault that turns a naive retry into a double charge.
//!
//! API (JSON; errors are RFC 9457 problem+json):
//! - `POST /charges` `{order_id, amount_cents > 0}` with a required `Idempotency-Key`
//!   (1–255 visible ASCII): 201 and a new [`Charge`]; the same key and payload again → 200,
//!   the same charge and `Idempotent-Replayed: true`; the same key with another payload →
//!   422; the same key while its first request is still being processed → 409 (retry).
//!   Missing or malformed key → 400; malformed JSON → 400; a body of the wrong shape → 422.
//! - `POST /emails` `{order_id, to, kind}` → 201 and a new [`Email`]; an `Idempotency-Key`
//!   is optional and, when present, behaves as for charges.
//! - `POST /refunds` `{charge_id}` with a required `Idempotency-Key`: 201 and a [`Refund`] of
//!   the charge's whole amount; keys behave as for charges; an unknown charge → 404; a charge
//!   already refunded under another key → 409 (one refund per charge). How a restored
//!   Holdfast gives back charges for orders its restore lost (`holdfast reconcile`).
//! - `GET /charges`, `GET /emails`, `GET /refunds`: everything ever accepted, in creation order;
//!   `?idempotency_key=K` narrows to what that key produced (zero or one record).
//! - `GET /healthz`; `GET`/`PUT /_faults` ([`Faults`]); `GET /_stats` ([`Stats`]).
//!
//! Faults wrap every `POST` that passes validation, in this order: `latency_ms` is slept
//! while the key is held (a concurrent request with the key gets 409); `fail_rate` answers
//! 503 without acting and releases the key; otherwise the request acts (or replays), then
//! `act_then_timeout_rate` keeps it unanswered for `hang_ms` and closes the connection
//! without writing a byte. A 409 or 422 is answered without hanging: there was nothing to do.
//! [`serve`] closes the connection itself; a bare [`app`] under another hyper server (such as
//! `axum::serve`) returns a body that fails at once, and hyper drops the connection unanswered.
//!
//! State lives in memory only: restarting the provider forgets every charge, email and key.
//! That is deliberate — this process is the outside world, not a thing the drill kills.
//! A request holds its key (the per-key lock), never the ledger: the ledger's mutex is taken
//! only for in-memory steps, never across a sleep, so one slow key slows no other.

mod api;
mod client;
mod faults;
mod ledger;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tower::ServiceExt;

pub use client::{ClientError, ProviderClient};
pub use faults::Faults;

use crate::api::{Abandon, ChargeRequest, EmailRequest, RefundRequest};
use crate::faults::Dice;
use crate::ledger::{lock, Ledger};

/// How the provider starts; the faults can be changed later through `PUT /_faults`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderOptions {
    pub faults: Faults,
}

/// A charge the provider accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    /// `ch_` and 32 hex digits.
    pub id: String,
    pub idempotency_key: String,
    pub order_id: String,
    pub amount_cents: i64,
    /// Unix time in milliseconds.
    pub created_at: u64,
}

/// A refund the provider made: a charge's whole amount given back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    /// `re_` and 32 hex digits.
    pub id: String,
    pub idempotency_key: String,
    pub charge_id: String,
    /// The refunded charge's order.
    pub order_id: String,
    pub amount_cents: i64,
    /// Unix time in milliseconds.
    pub created_at: u64,
}

/// An email the sink accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Email {
    /// `em_` and 32 hex digits.
    pub id: String,
    /// `None` when sent without an `Idempotency-Key`.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    pub order_id: String,
    pub to: String,
    pub kind: String,
    /// Unix time in milliseconds.
    pub created_at: u64,
}

/// Counters since start, at `GET /_stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Charges created (replays not counted).
    pub charges_total: u64,
    /// Emails sent (replays not counted).
    pub emails_total: u64,
    /// Refunds made (replays not counted).
    #[serde(default)]
    pub refunds_total: u64,
    /// 503s injected by `fail_rate`.
    pub failed_total: u64,
    /// Requests that acted (or replayed) and were then abandoned unanswered.
    pub act_then_timeout_total: u64,
    /// 200 replays of an earlier charge or email.
    pub replays_total: u64,
}

/// The provider's memory; cheap to clone.
#[derive(Clone)]
pub struct ProviderState(Arc<Shared>);

struct Shared {
    dice: Mutex<Dice>,
    charges: Mutex<Ledger<ChargeRequest, Charge>>,
    emails: Mutex<Ledger<EmailRequest, Email>>,
    refunds: Mutex<Ledger<RefundRequest, Refund>>,
    /// Per charge, the key of the refund asked for first: the only key that may refund it.
    refund_keys: Mutex<std::collections::HashMap<String, String>>,
    stats: Counters,
    /// Set when [`serve`] stops: hanging requests give up at once.
    closing: watch::Sender<bool>,
}

#[derive(Default)]
struct Counters {
    charges: AtomicU64,
    emails: AtomicU64,
    refunds: AtomicU64,
    failed: AtomicU64,
    act_then_timeout: AtomicU64,
    replays: AtomicU64,
}

impl ProviderState {
    /// Faults are not validated here (see [`Faults::validate`]): a rate above 1 always fires,
    /// one below 0 (or NaN) never does.
    pub fn new(opts: ProviderOptions) -> Self {
        Self(Arc::new(Shared {
            dice: Mutex::new(Dice::new(opts.faults)),
            charges: Mutex::new(Ledger::new()),
            emails: Mutex::new(Ledger::new()),
            refunds: Mutex::new(Ledger::new()),
            refund_keys: Mutex::default(),
            stats: Counters::default(),
            closing: watch::Sender::new(false),
        }))
    }

    pub fn faults(&self) -> Faults {
        lock(&self.0.dice).faults().clone()
    }

    /// Replaces the faults and restarts the decision sequence (from `seed` when given).
    pub fn set_faults(&self, faults: Faults) -> Result<(), String> {
        faults.validate()?;
        tracing::info!(?faults, "provider faults set");
        *lock(&self.0.dice) = Dice::new(faults);
        Ok(())
    }

    pub fn stats(&self) -> Stats {
        let c = &self.0.stats;
        let get = |n: &AtomicU64| n.load(Ordering::Relaxed);
        Stats {
            charges_total: get(&c.charges),
            emails_total: get(&c.emails),
            refunds_total: get(&c.refunds),
            failed_total: get(&c.failed),
            act_then_timeout_total: get(&c.act_then_timeout),
            replays_total: get(&c.replays),
        }
    }
}

/// The provider's routes, for [`serve`] or for tests that drive a `Router` directly.
pub fn app(state: ProviderState) -> Router {
    api::router(state)
}

/// Serves the provider on `listener` until `shutdown` completes, then stops accepting, lets
/// requests in flight finish (hanging ones are closed at once) and returns.
pub async fn serve(
    listener: TcpListener,
    opts: ProviderOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    opts.faults
        .validate()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    serve_state(listener, ProviderState::new(opts), shutdown).await
}

/// [`serve`] over a state the caller keeps, to read [`ProviderState::stats`] in process.
pub async fn serve_state(
    listener: TcpListener,
    state: ProviderState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "provider listening");
    }
    let app = app(state.clone());
    let mut shutdown = pin!(shutdown);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(connection(stream, app.clone(), state.0.closing.subscribe()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "provider accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    state.0.closing.send_replace(true);
    while conns.join_next().await.is_some() {}
    Ok(())
}

/// One HTTP/1.1 connection. A response marked [`Abandon`] is never written: the connection
/// is dropped instead, which closes the socket with no answer — what a provider that acted
/// and then fell over looks like from the client's side.
async fn connection(stream: TcpStream, app: Router, mut closing: watch::Receiver<bool>) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "set_nodelay failed");
    }
    let abandon = Arc::new(Notify::new());
    let service = {
        let abandon = abandon.clone();
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let app = app.clone();
            let abandon = abandon.clone();
            async move {
                let resp = app.oneshot(req).await?;
                if resp.extensions().get::<Abandon>().is_some() {
                    abandon.notify_one();
                    std::future::pending::<()>().await;
                }
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        // hyper's own answers to unparsable requests (400, 414, 431) become problems too.
        .serve_connection(
            TokioIo::new(holdfast_http::ParseErrorsAsProblems::new(stream)),
            service,
        );
    let mut conn = pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "provider connection ended with an error");
                }
                return;
            }
            () = abandon.notified() => return,
            _ = closing.wait_for(|closing| *closing), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}
