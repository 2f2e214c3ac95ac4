//! Durable jobs: at-least-once delivery on the durable store, made exactly-once in effect by
//! the effect ledger (see [`ledger`]).
//!
//! The queue's SQL lives in `holdfast-store` (a job is enqueued inside the transaction that
//! makes it necessary, with `Tx::job_enqueue`); this crate is the runtime that works it: a [`Worker`] claims jobs
//! in batches under a lease, heartbeats the leases of what it runs, completes in batches,
//! retries failures with full-jitter backoff, rescues jobs whose worker died, prunes finished
//! ones, and drains on shutdown.
//!
//! ```text
//!                 claim (attempt += 1, lease)           handler ok
//!   available ─────────────────────────────► running ───────────────► completed ──► pruned
//!     ▲   ▲                                   │  │
//!     │   └──── failure, attempts left ───────┘  │ failure, attempts spent
//!     │         (run_at = now + full jitter)     ▼
//!     │         lease expired: rescued          dead ──── redrive ────┐
//!     └──────────────────────────────────────────────────────────────┘
//! ```
//!
//! Every transition out of `running` names the claim it belongs to (its fence, unique forever:
//! a redrive or a release never hands out a claim number twice). A worker that was
//! paused past its lease and resumes finds its attempt fenced out: its completion, failure or
//! settlement changes nothing, and the newer attempt's result stands.

pub mod ledger;
mod settlements;
mod worker;

/// The metric families job workers export (see [`holdfast_core::Metric`]).
pub const METRICS: &[holdfast_core::Metric] = &[
    holdfast_core::Metric::gauge(
        "holdfast_jobs",
        "Jobs by queue and state (available = waiting, running, dead); a fleet exports it once.",
    ),
    holdfast_core::Metric::histogram(
        "holdfast_job_wait_seconds",
        "From a job becoming due to a worker starting it, by queue.",
    ),
    holdfast_core::Metric::histogram(
        "holdfast_job_run_seconds",
        "How long a job attempt ran, by queue, kind and outcome.",
    ),
    holdfast_core::Metric::counter("holdfast_job_completed_total", "Jobs completed.")
        .at_zero(&[&[]]),
    holdfast_core::Metric::counter(
        "holdfast_job_retries_total",
        "Job attempts that failed and were scheduled again, by queue and kind.",
    )
    .at_zero(&[&[]]),
    holdfast_core::Metric::counter(
        "holdfast_job_dead_total",
        "Jobs that used up their attempts, by queue and kind.",
    )
    .at_zero(&[&[]]),
    holdfast_core::Metric::counter(
        "holdfast_job_rescued_total",
        "Jobs whose worker's lease lapsed and that were handed to another.",
    )
    .at_zero(&[&[]]),
    holdfast_core::Metric::counter(
        "holdfast_effects_reconciled_total",
        "External effects of unknown outcome found done by asking the other side.",
    )
    .at_zero(&[&[]]),
];

pub use ledger::Ledger;
pub use worker::{Done, Handler, JobError, QueueConfig, Wakeup, Worker, WorkerOptions};
