//! The worker runtime. One task per queue claims jobs while it has free slots; each job runs
//! in its own task; side tasks complete in batches, heartbeat leases, rescue, prune and wake
//! the claimers when work arrives.

use futures::future::BoxFuture;
use futures::FutureExt;
use holdfast_core::retry::RetryPolicy;
use holdfast_store::{JobFence, JobRow, Store};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinSet;

/// What a handler did with its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    /// Finished; the runtime completes it (batched).
    Complete,
    /// The handler already completed it in its own transaction (`Ledger::settle`), or
    /// found its attempt fenced out: nothing left to do.
    Settled,
}

/// A failed attempt.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct JobError {
    pub message: String,
    /// False: no point trying again (bad arguments, rejected by the dependency): dead now.
    pub retry: bool,
}

impl JobError {
    pub fn retry(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry: true,
        }
    }
    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry: false,
        }
    }
}

/// Runs one kind of job.
pub type Handler = Arc<dyn Fn(JobRow) -> BoxFuture<'static, Result<Done, JobError>> + Send + Sync>;

#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub name: String,
    /// Jobs of this queue run at once in this worker process.
    pub concurrency: usize,
}

/// How a worker learns that work arrived. Its own failures wake it too (a retry may be due
/// soon), and, with [`Wakeup::None`] only, its own completions (a handler may have queued more).
#[derive(Debug, Clone)]
pub enum Wakeup {
    /// Postgres `LISTEN` on the store's notify channel (connection URL). When the store's URL
    /// names several hosts, each (re)connection goes to the one the store writes to now.
    Postgres(String),
    /// inotify on the SQLite database's directory: any commit by any process writes the WAL.
    SqliteFile(PathBuf),
    /// Nothing but the idle timer and the worker's own completions.
    None,
}

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub worker_id: String,
    pub queues: Vec<QueueConfig>,
    pub lease: Duration,
    pub heartbeat_every: Duration,
    pub rescue_every: Duration,
    pub prune_every: Duration,
    /// Completed jobs older than this are pruned.
    pub keep_completed: Duration,
    pub fetch_batch: usize,
    pub complete_batch: usize,
    /// Backoff between attempts of a failing job (full jitter; `max_attempts` is per job).
    pub backoff: RetryPolicy,
    /// On shutdown, how long in-flight jobs may finish before they are released.
    pub drain_timeout: Duration,
    /// With no wake-up, look for due work this often anyway.
    pub idle_poll: Duration,
    pub wakeup: Wakeup,
    /// Export the queue depth (`holdfast_jobs`). A fleet should export it once: leave it on
    /// for a lone worker, turn it off when something else counts for the fleet (`holdfast up`
    /// does, on its operator port).
    pub queue_gauges: bool,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            worker_id: format!("worker-{}", uuid::Uuid::new_v4().simple()),
            queues: vec![QueueConfig {
                name: "default".into(),
                concurrency: 10,
            }],
            lease: Duration::from_secs(10),
            heartbeat_every: Duration::from_secs(2),
            rescue_every: Duration::from_secs(1),
            prune_every: Duration::from_secs(30),
            keep_completed: Duration::from_secs(600),
            fetch_batch: 64,
            complete_batch: 256,
            backoff: RetryPolicy {
                base: Duration::from_millis(500),
                cap: Duration::from_secs(300),
                max_attempts: u32::MAX,
                deadline: Duration::MAX,
            },
            drain_timeout: Duration::from_secs(10),
            idle_poll: Duration::from_secs(5),
            wakeup: Wakeup::None,
            queue_gauges: true,
        }
    }
}

pub struct Worker {
    store: Store,
    opts: WorkerOptions,
    handlers: HashMap<String, Handler>,
}

/// State shared by the worker's tasks.
struct Shared {
    store: Store,
    opts: WorkerOptions,
    handlers: HashMap<String, Handler>,
    /// Attempts running now (or finished and waiting for the completer), for heartbeats and
    /// drain.
    running: Mutex<HashSet<JobFence>>,
    /// Fires when `running` becomes empty.
    idle: Notify,
    /// One per queue (same order as `opts.queues`).
    wake: Vec<Notify>,
    completions: mpsc::UnboundedSender<JobFence>,
}

impl Shared {
    fn wake_all(&self) {
        self.wake.iter().for_each(Notify::notify_one);
    }
    fn wake_queue(&self, name: &str) {
        match self.opts.queues.iter().position(|q| q.name == name) {
            Some(i) => self.wake[i].notify_one(),
            None if name == "*" => self.wake_all(),
            None => {}
        }
    }
    fn running(&self) -> std::sync::MutexGuard<'_, HashSet<JobFence>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }
    fn finished(&self, fences: &[JobFence]) {
        let mut running = self.running();
        for f in fences {
            running.remove(f);
        }
        if running.is_empty() {
            self.idle.notify_waiters();
        }
    }
}

impl Worker {
    pub fn new(store: Store, opts: WorkerOptions) -> Self {
        Self {
            store,
            opts,
            handlers: HashMap::new(),
        }
    }

    pub fn handle(mut self, kind: &str, handler: Handler) -> Self {
        self.handlers.insert(kind.to_owned(), handler);
        self
    }

    /// Works until `shutdown` resolves, then drains: stops claiming, lets running jobs finish
    /// for up to `drain_timeout`, gives back the rest.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), holdfast_store::Error> {
        let (completions, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            wake: self.opts.queues.iter().map(|_| Notify::new()).collect(),
            store: self.store,
            opts: self.opts,
            handlers: self.handlers,
            running: Mutex::new(HashSet::new()),
            idle: Notify::new(),
            completions,
        });
        // Every (queue, kind) this worker may run has its retry and dead series at 0 from the
        // start, so the first failure shows as an increase to whoever scrapes.
        for q in &shared.opts.queues {
            for kind in shared.handlers.keys() {
                for name in ["holdfast_job_retries_total", "holdfast_job_dead_total"] {
                    metrics::counter!(name, "queue" => q.name.clone(), "kind" => kind.clone())
                        .increment(0);
                }
            }
        }
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let mut background = JoinSet::new();
        background.spawn(heartbeats(shared.clone()));
        background.spawn(maintenance(shared.clone()));
        background.spawn(wakeups(shared.clone()));
        background.spawn(completer(shared.clone(), rx));
        let mut claimers = JoinSet::new();
        for (i, q) in shared.opts.queues.iter().enumerate() {
            claimers.spawn(claim_loop(shared.clone(), i, q.clone(), stop.clone()));
        }
        tracing::info!(worker = %shared.opts.worker_id, queues = ?shared.opts.queues, "worker started");
        shutdown.await;

        let _ = stop_tx.send(true);
        while claimers.join_next().await.is_some() {}
        let in_flight = shared.running().len();
        tracing::info!(
            in_flight,
            "draining: claiming stopped, waiting for running jobs"
        );
        let drained = tokio::time::timeout(shared.opts.drain_timeout, async {
            loop {
                let idle = shared.idle.notified();
                if shared.running().is_empty() {
                    return;
                }
                idle.await;
            }
        })
        .await;
        if drained.is_err() {
            let left: Vec<JobFence> = shared.running().iter().copied().collect();
            let released = shared.store.job_release(&left).await?;
            tracing::warn!(released, "drain timed out: gave unfinished jobs back");
        }
        background.shutdown().await;
        tracing::info!("worker stopped");
        Ok(())
    }
}

/// Claims jobs for one queue while there are free slots; sleeps when a claim found fewer
/// jobs than slots, until woken, until the next scheduled job is due, or `idle_poll`.
async fn claim_loop(
    shared: Arc<Shared>,
    index: usize,
    queue: QueueConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(queue.concurrency.max(1)));
    while !*stop.borrow() {
        // Wait for at least one free slot, then take as many as are free (up to a batch).
        let first = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.changed() => return,
        };
        // Jobs settled by one shared statement end together. Yielding once lets the others
        // that already ended free their slots too, so that one claim refills them all.
        tokio::task::yield_now().await;
        let mut permits = vec![first];
        while permits.len() < shared.opts.fetch_batch {
            match slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        let now = holdfast_core::now_ms();
        let claimed = match shared
            .store
            .job_claim(
                &queue.name,
                &shared.opts.worker_id,
                permits.len() as i64,
                now,
                shared.opts.lease,
            )
            .await
        {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::warn!(queue = %queue.name, error = %e, "claim failed; backing off");
                drop(permits);
                tokio::select! { _ = tokio::time::sleep(Duration::from_millis(500)) => {}, _ = stop.changed() => return }
                continue;
            }
        };
        let (wanted, got) = (permits.len(), claimed.len());
        for (job, permit) in claimed.into_iter().zip(permits.drain(..got)) {
            shared.running().insert(job.fence());
            let shared = shared.clone();
            tokio::spawn(async move {
                execute(&shared, job).await;
                drop(permit);
            });
        }
        drop(permits); // the slots no job was found for
        if got == wanted {
            continue;
        }
        // Fewer than asked for: the queue has no more jobs ready now. Claiming again at once
        // would find nothing; sleep until woken or the next scheduled job is due.
        let next_due = shared
            .store
            .job_next_run_at(&queue.name)
            .await
            .ok()
            .flatten();
        let idle = match next_due {
            Some(at) => {
                Duration::from_millis(u64::try_from(at - holdfast_core::now_ms()).unwrap_or(0))
                    .min(shared.opts.idle_poll)
            }
            None => shared.opts.idle_poll,
        };
        if idle.is_zero() {
            // Due now yet not claimed: another worker is on it. Look again shortly.
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        tokio::select! {
            _ = shared.wake[index].notified() => {}
            _ = tokio::time::sleep(idle) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn execute(shared: &Shared, job: JobRow) {
    let fence = job.fence();
    let started = Instant::now();
    let wait_s = (holdfast_core::now_ms() - job.run_at.max(job.created_at)).max(0) as f64 / 1000.0;
    metrics::histogram!("holdfast_job_wait_seconds", "queue" => job.queue.clone()).record(wait_s);
    let (queue, kind, attempt, max_attempts) = (
        job.queue.clone(),
        job.kind.clone(),
        job.attempt,
        job.max_attempts,
    );
    let outcome = match shared.handlers.get(&kind) {
        Some(h) => match std::panic::AssertUnwindSafe(h(job)).catch_unwind().await {
            Ok(r) => r,
            Err(_) => Err(JobError::retry("handler panicked")),
        },
        None => Err(JobError::fatal(format!("no handler for job kind {kind:?}"))),
    };
    let label = match &outcome {
        Ok(_) => "ok",
        Err(e) if e.retry && attempt < max_attempts => "retry",
        Err(_) => "dead",
    };
    metrics::histogram!("holdfast_job_run_seconds", "queue" => queue.clone(), "kind" => kind.clone(), "outcome" => label)
        .record(started.elapsed().as_secs_f64());
    match outcome {
        Ok(done) => {
            match done {
                // Stays in `running` (heartbeated) until the completer has written it.
                Done::Complete => {
                    if shared.completions.send(fence).is_err() {
                        shared.finished(&[fence]);
                    }
                }
                Done::Settled => shared.finished(&[fence]),
            }
            // With no outside signal, a job's end is the only sign that it may have queued
            // more work. With one, that work wakes the claimers itself: waking them here
            // would only add a claim that finds nothing.
            if matches!(shared.opts.wakeup, Wakeup::None) {
                shared.wake_queue(&queue);
            }
        }
        Err(e) => {
            let now = holdfast_core::now_ms();
            let retry_at = (label == "retry").then(|| {
                let delay = shared
                    .opts
                    .backoff
                    .delay(u32::try_from(attempt.saturating_sub(1)).unwrap_or(u32::MAX));
                now + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)
            });
            metrics::counter!(if retry_at.is_some() { "holdfast_job_retries_total" } else { "holdfast_job_dead_total" }, "queue" => queue.clone(), "kind" => kind.clone()).increment(1);
            tracing::debug!(job = fence.id, attempt, %kind, error = %e, retry = retry_at.is_some(), "job failed");
            if let Err(store_err) = shared
                .store
                .job_fail(fence, &e.message, retry_at, now)
                .await
            {
                // The lease will expire and the rescuer will make it available again.
                tracing::warn!(job = fence.id, error = %store_err, "could not record a job failure");
            }
            shared.finished(&[fence]);
            // A retry may have been scheduled sooner than the claimer's next look.
            shared.wake_queue(&queue);
        }
    }
}

/// Writes completions in batches: whatever is queued when a write starts goes with it, so
/// a lone completion is written at once and a burst shares one statement.
async fn completer(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<JobFence>) {
    let mut batch = Vec::with_capacity(shared.opts.complete_batch);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < shared.opts.complete_batch {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        match shared
            .store
            .job_complete(&batch, holdfast_core::now_ms())
            .await
        {
            Ok(n) => {
                metrics::counter!("holdfast_job_completed_total").increment(n);
                if (n as usize) < batch.len() {
                    tracing::debug!(
                        refused = batch.len() - n as usize,
                        "stale attempts were not completed"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, jobs = batch.len(), "completing jobs failed; their leases will lapse and they will run again")
            }
        }
        shared.finished(&batch);
        batch.clear();
    }
}

async fn heartbeats(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.opts.heartbeat_every);
    loop {
        tick.tick().await;
        let fences: Vec<JobFence> = shared.running().iter().copied().collect();
        if fences.is_empty() {
            continue;
        }
        let until = holdfast_core::now_ms()
            + i64::try_from(shared.opts.lease.as_millis()).unwrap_or(i64::MAX);
        match shared.store.job_heartbeat(&fences, until).await {
            Ok(n) if (n as usize) < fences.len() => tracing::debug!(
                passed_over = fences.len() - n as usize,
                "some attempts were not extended: being settled, or no longer ours"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
    }
}

async fn maintenance(shared: Arc<Shared>) {
    let mut rescue = tokio::time::interval(shared.opts.rescue_every);
    let mut prune = tokio::time::interval(shared.opts.prune_every);
    let mut gauges = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = rescue.tick() => match shared.store.job_rescue(holdfast_core::now_ms()).await {
                Ok((rescued, dead)) if rescued + dead > 0 => {
                    tracing::info!(rescued, dead, "rescued jobs from lost workers");
                    metrics::counter!("holdfast_job_rescued_total").increment(rescued);
                    metrics::counter!("holdfast_job_dead_total", "queue" => "*", "kind" => "*").increment(dead);
                    shared.wake_all();
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "rescue failed"),
            },
            _ = prune.tick() => {
                let before = holdfast_core::now_ms() - i64::try_from(shared.opts.keep_completed.as_millis()).unwrap_or(i64::MAX);
                if let Err(e) = shared.store.job_prune(before, 5000).await {
                    tracing::warn!(error = %e, "prune failed");
                }
            }
            _ = gauges.tick(), if shared.opts.queue_gauges => {
                if let Ok(counts) = shared.store.job_counts().await {
                    for c in counts {
                        metrics::gauge!("holdfast_jobs", "queue" => c.queue, "state" => c.state).set(c.count as f64);
                    }
                }
            }
        }
    }
}

/// Turns outside signals of new work into wake-ups of the claim loops.
async fn wakeups(shared: Arc<Shared>) {
    match shared.opts.wakeup.clone() {
        Wakeup::Postgres(url) => loop {
            // Notifications are sent where the writes go: the primary the store found.
            let primary = shared.store.primary_url().unwrap_or_else(|| url.clone());
            if let Err(e) = listen_postgres(&shared, &primary).await {
                tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
            }
            shared.wake_all(); // notifications may have been missed meanwhile
            tokio::time::sleep(Duration::from_millis(500)).await;
        },
        Wakeup::SqliteFile(db) => {
            if let Err(e) = watch_sqlite(&shared, &db).await {
                tracing::warn!(error = %e, "cannot watch the SQLite file; relying on the idle poll");
            }
        }
        Wakeup::None => {}
    }
}

async fn listen_postgres(shared: &Shared, url: &str) -> Result<(), sqlx::Error> {
    let mut listener = sqlx::postgres::PgListener::connect(url).await?;
    listener.listen(holdfast_store::NOTIFY_CHANNEL).await?;
    shared.wake_all();
    loop {
        let n = listener.recv().await?;
        shared.wake_queue(n.payload());
    }
}

async fn watch_sqlite(shared: &Shared, db: &std::path::Path) -> std::io::Result<()> {
    use futures::StreamExt;
    use inotify::{Inotify, WatchMask};
    let dir = db.parent().unwrap_or(std::path::Path::new("."));
    let wal = format!(
        "{}-wal",
        db.file_name().and_then(|f| f.to_str()).unwrap_or_default()
    );
    let inotify = Inotify::init()?;
    inotify
        .watches()
        .add(dir, WatchMask::MODIFY | WatchMask::CREATE)?;
    let mut events = inotify.into_event_stream([0u8; 4096])?;
    while let Some(event) = events.next().await {
        let event = event?;
        if event.name.is_some_and(|n| n.to_str() == Some(wal.as_str())) {
            shared.wake_all();
        }
    }
    Ok(())
}
