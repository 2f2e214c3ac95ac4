//! Durable jobs: at-least-once delivery on the durable store, made exactly-once in effect by
//! the effect ledger (see [`flows`]).
//!
//! The queue's SQL lives in `holdfast-store` (a job enqueued by a checkout commits in the
//! checkout's transaction); this crate is the runtime that works it: a [`Worker`] claims jobs
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
//! Every transition out of `running` names the attempt it belongs to. A worker that was
//! paused past its lease and resumes finds its attempt fenced out: its completion, failure or
//! settlement changes nothing, and the newer attempt's result stands.

pub mod flows;
mod worker;

pub use worker::{Done, Handler, JobError, QueueConfig, Wakeup, Worker, WorkerOptions};
