//! Settlements on Postgres that are ready while another is being written share the next
//! statement, each fenced by its own claim. One that fails in company is written alone, so
//! it fails nobody else. A heartbeat does not wait for a settlement's rows.

use holdfast_jobs::{Done, JobError, Ledger};
use holdfast_store::ScopedFutureExt;
use holdfast_store::{testing, JobInsert, JobRow, Statement, Store, StoreOptions};
use sqlx::postgres::PgPool;
use sqlx::Row;
use std::time::Duration;

const JOBS: usize = 5;

/// A fresh Postgres store with `JOBS` claimed jobs of one kind, each naming its own effect,
/// and a plain connection pool to look at the same database.
async fn claimed() -> Option<(Store, PgPool, Vec<JobRow>)> {
    claimed_n(JOBS).await
}

async fn claimed_n(n: usize) -> Option<(Store, PgPool, Vec<JobRow>)> {
    let url = testing::fresh_postgres_url("settlements").await?;
    let store = Store::open(&StoreOptions::new(&url)).await.unwrap();
    for i in 0..n {
        let job = JobInsert::new("q", "pay", format!("{{\"n\":{i}}}"))
            .effect(format!("charge:{i}"), format!("key-{i}"));
        store.job_enqueue(&job).await.unwrap();
    }
    let now = holdfast_core::now_ms();
    let jobs = store
        .job_claim("q", "w", n as i64, now, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(jobs.len(), n);
    let pool = PgPool::connect(&url).await.unwrap();
    Some((store, pool, jobs))
}

/// The job's settlement: its effect done as `ch-<id>`, and a follow-up job enqueued as its
/// consequence, named from `after` as the ledger asks.
async fn settle(ledger: &Ledger, job: &JobRow) -> Result<Done, JobError> {
    let key = job.effect.as_ref().unwrap().entry.effect_key.clone();
    let id = format!("ch-{}", job.id);
    let follow_up = JobInsert::new("q", "receipt", "{}".into()).unique(format!("receipt:{key}"));
    ledger
        .settle_with_steps(
            job,
            &key,
            &id,
            |_| async { Ok(()) }.scope_boxed(),
            |stmt: &mut Statement, after: &str| {
                stmt.enqueue_jobs(
                    &format!("{after}_follow_up"),
                    std::slice::from_ref(&follow_up),
                    after,
                )
            },
        )
        .await
}

/// Per job: its state, the transaction that last wrote it, its effect's state, and whether
/// its follow-up exists.
async fn outcome(pool: &PgPool, job: &JobRow) -> (String, String, String, bool) {
    let key = &job.effect.as_ref().unwrap().entry.effect_key;
    let row = sqlx::query(
        "SELECT j.state, j.xmin::text, l.state,
                EXISTS (SELECT 1 FROM jobs f WHERE f.unique_key = 'receipt:' || l.effect_key)
         FROM jobs j, effect_ledger l WHERE j.id = $1 AND l.effect_key = $2",
    )
    .bind(job.id)
    .bind(key)
    .fetch_one(pool)
    .await
    .unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3))
}

/// Holds the first job's row locked, so the first settlement's statement waits in flight.
async fn hold_first(pool: &PgPool, job: &JobRow) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE")
        .bind(job.id)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

/// Waits until a statement of this database waits for a row lock.
async fn statement_waits(pool: &PgPool) {
    for _ in 0..500 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the first settlement never reached the locked row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlements_ready_together_share_one_statement() {
    let Some((store, pool, jobs)) = claimed().await else {
        return;
    };
    let ledger = Ledger::new(store);
    // One of the rest is an attempt whose claim is no longer current.
    let mut stale = jobs[JOBS - 1].clone();
    stale.claim -= 1;

    let lock = hold_first(&pool, &jobs[0]).await;
    let first = tokio::spawn({
        let (ledger, job) = (ledger.clone(), jobs[0].clone());
        async move { settle(&ledger, &job).await }
    });
    statement_waits(&pool).await;
    // The others join the next statement while the first is in flight: one poll each is
    // all it takes to join.
    let mut rest: Vec<_> = jobs[1..JOBS - 1]
        .iter()
        .chain([&stale])
        .map(|job| Box::pin(settle(&ledger, job)))
        .collect();
    for fut in &mut rest {
        assert!(futures::poll!(fut.as_mut()).is_pending());
    }
    lock.rollback().await.unwrap();
    assert_eq!(first.await.unwrap().unwrap(), Done::Settled);
    for fut in rest {
        assert_eq!(fut.await.unwrap(), Done::Settled);
    }

    let first = outcome(&pool, &jobs[0]).await;
    assert_eq!((&*first.0, &*first.2, first.3), ("completed", "done", true));
    let together: Vec<_> =
        futures::future::join_all(jobs[1..JOBS - 1].iter().map(|job| outcome(&pool, job))).await;
    for job in &together {
        assert_eq!((&*job.0, &*job.2, job.3), ("completed", "done", true));
        assert_eq!(
            job.1, together[0].1,
            "the settlements ready together shared one commit"
        );
    }
    assert_ne!(first.1, together[0].1, "the first one went alone, at once");
    // The stale attempt was in the same statement, and wrote nothing.
    let stale = outcome(&pool, &jobs[JOBS - 1]).await;
    assert_eq!(
        (&*stale.0, &*stale.2, stale.3),
        ("running", "pending", false)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_that_fails_in_company_fails_alone() {
    let Some((store, pool, jobs)) = claimed().await else {
        return;
    };
    let ledger = Ledger::new(store);
    let doomed = jobs[2].id;
    // The doomed job's consequence divides by zero.
    let settle_or_fail = |job: &JobRow| {
        let key = job.effect.as_ref().unwrap().entry.effect_key.clone();
        let (ledger, job) = (ledger.clone(), job.clone());
        async move {
            ledger
                .settle_with_steps(
                    &job,
                    &key,
                    "ch",
                    |_| async { Ok(()) }.scope_boxed(),
                    |stmt: &mut Statement, after: &str| {
                        let divisor = stmt.bind(job.id - doomed);
                        stmt.step(
                            &format!("{after}_checked"),
                            &format!(
                                "INSERT INTO effect_ledger (effect_key, state, external_key, created_at, updated_at)
                                 SELECT 'check:' || id, 'done', 'x', 1 / {divisor}, 0 FROM {after} RETURNING 1"
                            ),
                        )
                    },
                )
                .await
        }
    };
    let lock = hold_first(&pool, &jobs[0]).await;
    let first = tokio::spawn(settle_or_fail(&jobs[0]));
    statement_waits(&pool).await;
    let mut rest: Vec<_> = jobs[1..]
        .iter()
        .map(|j| Box::pin(settle_or_fail(j)))
        .collect();
    for fut in &mut rest {
        assert!(futures::poll!(fut.as_mut()).is_pending());
    }
    lock.rollback().await.unwrap();
    // The first job's statement held it alone, and its divisor is not zero.
    assert_eq!(first.await.unwrap().unwrap(), Done::Settled);
    let results = futures::future::join_all(rest).await;
    for (job, result) in jobs[1..].iter().zip(results) {
        let (state, _, effect, _) = outcome(&pool, job).await;
        if job.id == doomed {
            let err = result.expect_err("the doomed settlement fails");
            assert!(err.retry, "a store error is worth a retry: {err}");
            assert_eq!((&*state, &*effect), ("running", "pending"));
        } else {
            assert_eq!(result.unwrap(), Done::Settled);
            assert_eq!((&*state, &*effect), ("completed", "done"), "job {}", job.id);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_statement_leaves_the_next_settlement_to_go_alone() {
    // The first settlement in flight, 64 waiting for the next statement (its most), and one more.
    let Some((store, pool, jobs)) = claimed_n(66).await else {
        return;
    };
    let ledger = Ledger::new(store);
    let lock = hold_first(&pool, &jobs[0]).await;
    let first = tokio::spawn({
        let (ledger, job) = (ledger.clone(), jobs[0].clone());
        async move { settle(&ledger, &job).await }
    });
    statement_waits(&pool).await;
    let mut next: Vec<_> = jobs[1..65]
        .iter()
        .map(|j| Box::pin(settle(&ledger, j)))
        .collect();
    for fut in &mut next {
        assert!(futures::poll!(fut.as_mut()).is_pending());
    }
    // The 66th finds the next statement full, and settles while the first is still held.
    let alone = tokio::time::timeout(Duration::from_secs(10), settle(&ledger, &jobs[65]));
    let alone = alone
        .await
        .expect("the 66th did not wait for the held statement");
    assert_eq!(alone.unwrap(), Done::Settled);
    assert_eq!(outcome(&pool, &jobs[65]).await.0, "completed");
    assert_eq!(outcome(&pool, &jobs[1]).await.0, "running");
    lock.rollback().await.unwrap();
    assert_eq!(first.await.unwrap().unwrap(), Done::Settled);
    for fut in next {
        assert_eq!(fut.await.unwrap(), Done::Settled);
    }
    let shared = outcome(&pool, &jobs[1]).await.1;
    for job in &jobs[1..65] {
        assert_eq!(
            outcome(&pool, job).await.1,
            shared,
            "the 64 shared one commit"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_passes_over_a_settling_job() {
    let Some((store, pool, jobs)) = claimed().await else {
        return;
    };
    // The first job's row is held, as its settlement's statement holds it.
    let lock = hold_first(&pool, &jobs[0]).await;
    let fences: Vec<_> = jobs.iter().map(JobRow::fence).collect();
    let until = holdfast_core::now_ms() + 99_999;
    let beat = tokio::time::timeout(Duration::from_secs(10), store.job_heartbeat(&fences, until));
    let extended = beat.await.expect("the heartbeat waited for a held row");
    assert_eq!(extended.unwrap(), JOBS as u64 - 1);
    lock.rollback().await.unwrap();
    let leases: Vec<i64> = sqlx::query_scalar("SELECT lease_until FROM jobs ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_ne!(leases[0], until, "the held job was passed over");
    assert!(leases[1..].iter().all(|l| *l == until), "{leases:?}");
}
