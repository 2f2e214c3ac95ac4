//! The worker runtime against real stores (SQLite and Postgres): work arrives without
//! polling, concurrency limits hold, failures retry and then die, SIGTERM-style shutdown
//! drains, and the job of a worker that vanished is rescued and run again.

use futures::FutureExt;
use holdfast_jobs::{Done, Handler, JobError, QueueConfig, Wakeup, Worker, WorkerOptions};
use holdfast_store::{testing, JobInsert, Store, StoreOptions};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

use holdfast_testkit::{both_backends, Backend};

both_backends!(multi_thread;
    work_arrives_without_polling,
    concurrency_limit_holds,
    failures_retry_then_die,
    shutdown_drains_running_jobs,
    a_vanished_workers_job_is_rescued,
    without_a_wakeup_a_jobs_end_wakes_its_claimer
);

/// A fresh store, how its workers wake up, and the tempdir keeping a SQLite file alive.
struct Db {
    url: String,
    wakeup: Wakeup,
    _dir: tempfile::TempDir,
}

async fn db(backend: Backend, test: &str) -> Option<Db> {
    let dir = tempfile::tempdir().unwrap();
    let (url, wakeup) = match backend {
        Backend::Sqlite => {
            let url = testing::sqlite_url(dir.path());
            (url, Wakeup::SqliteFile(dir.path().join("holdfast.sqlite")))
        }
        Backend::Postgres => {
            let url = testing::fresh_postgres_url(test).await?;
            (url.clone(), Wakeup::Postgres(url))
        }
    };
    Some(Db {
        url,
        wakeup,
        _dir: dir,
    })
}

async fn open(url: &str) -> Store {
    Store::open(&StoreOptions::new(url)).await.unwrap()
}

fn options(db: &Db, concurrency: usize) -> WorkerOptions {
    WorkerOptions {
        queues: vec![QueueConfig {
            name: "q".into(),
            concurrency,
        }],
        lease: Duration::from_millis(600),
        heartbeat_every: Duration::from_millis(150),
        rescue_every: Duration::from_millis(100),
        // Long: anything that happens sooner was woken up, not polled for.
        idle_poll: Duration::from_secs(60),
        backoff: holdfast_core::retry::RetryPolicy {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(20),
            max_attempts: u32::MAX,
            deadline: Duration::MAX,
        },
        wakeup: db.wakeup.clone(),
        ..WorkerOptions::default()
    }
}

fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(holdfast_store::JobRow) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Done, JobError>> + Send + 'static,
{
    Arc::new(move |job| f(job).boxed())
}

/// Runs `worker` until the returned sender fires (or is dropped).
fn spawn(
    worker: Worker,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), holdfast_store::Error>>,
) {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    (stop, task)
}

/// One job of `kind` on queue `q`, due now.
async fn enqueue(store: &Store, kind: &str) {
    let job = JobInsert::new("q", kind, "{}".into());
    store.job_enqueue(&job).await.unwrap();
}

async fn state_count(store: &Store, state: &str) -> i64 {
    store
        .job_counts()
        .await
        .unwrap()
        .iter()
        .filter(|c| c.state == state)
        .map(|c| c.count)
        .sum()
}

async fn eventually(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn work_arrives_without_polling(backend: Backend) {
    let Some(db) = db(backend, "work_arrives_without_polling").await else {
        return;
    };
    let store = open(&db.url).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let worker = Worker::new(store.clone(), options(&db, 4)).handle(
        "noop",
        handler(move |job| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(job.id);
                Ok(Done::Complete)
            }
        }),
    );
    let (stop, task) = spawn(worker);
    // Another pool (as another process would) enqueues, one job at a time, after the worker
    // has gone idle; with a 60 s idle poll only a wake-up can pick each up quickly.
    let producer = open(&db.url).await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let sent = Instant::now();
        let id = producer
            .job_enqueue(&JobInsert::new("q", "noop", "{}".into()))
            .await
            .unwrap()
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .expect("woken within 2 s, not by the 60 s poll");
        assert_eq!(got, Some(id));
        assert!(sent.elapsed() < Duration::from_secs(2));
    }
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// With no outside wake-up (`Wakeup::None`), a job's end is the claimer's only sign that
/// its handler may have queued more: a follow-up queued by a job that ends either way
/// (`Complete`, written by the runtime, or `Settled`, by the handler) runs long before the
/// 60 s idle poll.
async fn without_a_wakeup_a_jobs_end_wakes_its_claimer(backend: Backend) {
    let Some(db) = db(backend, "without_a_wakeup_a_jobs_end_wakes_its_claimer").await else {
        return;
    };
    let store = open(&db.url).await;
    for (kind, done) in [("complete", Done::Complete), ("settled", Done::Settled)] {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let follow_up = format!("{kind}-follow-up");
        let first = {
            let (store, tx, follow_up) = (store.clone(), tx.clone(), follow_up.clone());
            handler(move |job| {
                let (store, tx, follow_up) = (store.clone(), tx.clone(), follow_up.clone());
                async move {
                    enqueue(&store, &follow_up).await;
                    if let Done::Settled = done {
                        store
                            .job_complete(&[job.fence()], holdfast_core::now_ms())
                            .await
                            .map_err(|e| JobError::retry(e.to_string()))?;
                    }
                    let _ = tx.send(job.kind);
                    Ok(done)
                }
            })
        };
        let then = handler(move |job| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(job.kind);
                Ok(Done::Complete)
            }
        });
        let opts = WorkerOptions {
            wakeup: Wakeup::None,
            ..options(&db, 4)
        };
        let worker = Worker::new(store.clone(), opts)
            .handle(kind, first)
            .handle(&follow_up, then);
        // Due before the worker starts: its first claim finds it.
        enqueue(&store, kind).await;
        let (stop, task) = spawn(worker);
        let ran = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(ran.expect("the first job runs").as_deref(), Some(kind));
        let ran = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        let ran = ran.unwrap_or_else(|_| panic!("{kind}: the follow-up ran within 5 s"));
        assert_eq!(ran, Some(follow_up));
        let _ = stop.send(());
        task.await.unwrap().unwrap();
    }
}

async fn concurrency_limit_holds(backend: Backend) {
    let Some(db) = db(backend, "concurrency_limit_holds").await else {
        return;
    };
    let store = open(&db.url).await;
    let jobs: Vec<JobInsert> = (0..12)
        .map(|_| JobInsert::new("q", "slow", "{}".into()))
        .collect();
    store.job_enqueue_many(&jobs).await.unwrap();
    let (now, max) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (n, m) = (now.clone(), max.clone());
    let worker = Worker::new(store.clone(), options(&db, 3)).handle(
        "slow",
        handler(move |_| {
            let (n, m) = (n.clone(), m.clone());
            async move {
                let running = n.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(running, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(60)).await;
                n.fetch_sub(1, Ordering::SeqCst);
                Ok(Done::Complete)
            }
        }),
    );
    let (stop, task) = spawn(worker);
    eventually("all 12 completed", async || {
        state_count(&store, "completed").await == 12
    })
    .await;
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    assert_eq!(max.load(Ordering::SeqCst), 3, "ran 3 at a time, never more");
}

async fn failures_retry_then_die(backend: Backend) {
    let Some(db) = db(backend, "failures_retry_then_die").await else {
        return;
    };
    let store = open(&db.url).await;
    store
        .job_enqueue(&JobInsert {
            max_attempts: 3,
            ..JobInsert::new("q", "flaky", "{}".into())
        })
        .await
        .unwrap();
    enqueue(&store, "broken").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let worker = Worker::new(store.clone(), options(&db, 4))
        .handle(
            "flaky",
            handler(move |_| {
                c.fetch_add(1, Ordering::SeqCst);
                async { Err(JobError::retry("still failing")) }
            }),
        )
        .handle(
            "broken",
            handler(|_| async { Err(JobError::fatal("bad arguments")) }),
        );
    let (stop, task) = spawn(worker);
    eventually("both dead", async || state_count(&store, "dead").await == 2).await;
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 3, "three attempts, then dead");
    let dead = store.job_dead(10).await.unwrap();
    let errors: Vec<_> = dead
        .iter()
        .map(|d| (d.job.kind.as_str(), d.job.attempt, d.last_error.as_deref()))
        .collect();
    assert!(
        errors.contains(&("flaky", 3, Some("still failing"))),
        "{errors:?}"
    );
    assert!(
        errors.contains(&("broken", 1, Some("bad arguments"))),
        "{errors:?}"
    );
}

async fn shutdown_drains_running_jobs(backend: Backend) {
    let Some(db) = db(backend, "shutdown_drains").await else {
        return;
    };
    let store = open(&db.url).await;
    enqueue(&store, "short").await;
    enqueue(&store, "endless").await;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let started_tx2 = started_tx.clone();
    let opts = WorkerOptions {
        drain_timeout: Duration::from_millis(800),
        ..options(&db, 4)
    };
    let worker = Worker::new(store.clone(), opts)
        .handle(
            "short",
            handler(move |_| {
                let _ = started_tx.send(());
                async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok(Done::Complete)
                }
            }),
        )
        .handle(
            "endless",
            handler(move |_| {
                let _ = started_tx2.send(());
                std::future::pending()
            }),
        );
    let (stop, task) = spawn(worker);
    started.recv().await;
    started.recv().await;
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    // The short job finished during the drain; the endless one was given back, its attempt
    // not counted, ready for another worker.
    assert_eq!(state_count(&store, "completed").await, 1);
    assert_eq!(state_count(&store, "available").await, 1);
    assert_eq!(
        store
            .job_claim(
                "q",
                "next",
                10,
                holdfast_core::now_ms(),
                Duration::from_secs(5)
            )
            .await
            .unwrap()[0]
            .attempt,
        1
    );
}

async fn a_vanished_workers_job_is_rescued(backend: Backend) {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("debug,sqlx=warn")
        .try_init();
    let Some(db) = db(backend, "a_vanished_worker").await else {
        return;
    };
    let store = open(&db.url).await;
    enqueue(&store, "work").await;
    // Worker A takes the job and hangs; then it "dies" as after SIGKILL: its tasks stop, so
    // it neither heartbeats nor completes, and its connections close.
    let (taken_tx, mut taken) = mpsc::unbounded_channel();
    let store_a = open(&db.url).await;
    let a = Worker::new(store_a.clone(), options(&db, 1)).handle(
        "work",
        handler(move |job| {
            let _ = taken_tx.send(job.attempt);
            std::future::pending()
        }),
    );
    let (_stop_a, task_a) = spawn(a);
    assert_eq!(taken.recv().await, Some(1));
    task_a.abort();
    // Dying closes the process's connections too (releasing any SQLite lock it held).
    let _ = task_a.await;
    store_a.close().await;
    // Worker B rescues it after the lease and runs attempt 2.
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let b = Worker::new(store.clone(), options(&db, 1)).handle(
        "work",
        handler(move |job| {
            let _ = done_tx.send(job.attempt);
            async { Ok(Done::Complete) }
        }),
    );
    let (stop_b, task_b) = spawn(b);
    let attempt = match tokio::time::timeout(Duration::from_secs(5), done.recv()).await {
        Ok(a) => a,
        Err(_) => panic!(
            "not rescued within 5 s; queue: {:?}",
            store.job_counts().await
        ),
    };
    assert_eq!(attempt, Some(2));
    eventually("completed", async || {
        state_count(&store, "completed").await == 1
    })
    .await;
    let _ = stop_b.send(());
    task_b.await.unwrap().unwrap();
}
