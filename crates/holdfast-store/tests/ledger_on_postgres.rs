//! The effect ledger's intent on PostgreSQL, recorded by one statement in autocommit, when
//! another attempt of the same job records the same effect at the same moment. Needs
//! `DATABASE_URL` (skipped without it, except under `CI=true`).

use holdfast_core::Backend;
use holdfast_store::{Store, StoreOptions};
use holdfast_testkit::db::with_fresh_db;
use sqlx::{Connection, Executor, Row};
use std::time::{Duration, Instant};

/// The other attempt's entry is still uncommitted when the statement meets it, so the
/// statement waits, and then cannot see it (its snapshot is older than that commit): the
/// answer must still be the entry that exists, with the key the provider was called with.
#[tokio::test]
async fn a_begin_that_meets_another_attempts_entry_answers_with_that_entry() {
    with_fresh_db(Backend::Postgres, "ledger_begin_race", |url| async move {
        let store = Store::open(&StoreOptions::new(&url)).await.expect("open");
        let mut other = sqlx::AnyConnection::connect(&url).await.expect("connect");
        other.execute("BEGIN").await.expect("begin");
        other
            .execute(
                "INSERT INTO effect_ledger (effect_key, state, external_key, created_at, updated_at)
                 VALUES ('charge:o1', 'pending', 'first-attempt-key', 0, 0)",
            )
            .await
            .expect("the other attempt's intent");

        let begin = tokio::spawn({
            let store = store.clone();
            async move { store.ledger_begin("charge:o1", "second-attempt-key").await }
        });
        // The signal: the statement waits on the other attempt's uncommitted row.
        let mut watcher = sqlx::AnyConnection::connect(&url).await.expect("connect");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let waiting: i64 = sqlx::query(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'
                   AND query LIKE '%effect_ledger%'",
            )
            .fetch_one(&mut watcher)
            .await
            .expect("pg_stat_activity")
            .get(0);
            if waiting == 1 {
                break;
            }
            assert!(Instant::now() < deadline, "the begin never waited");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        other.execute("COMMIT").await.expect("commit");

        let (entry, created) = begin.await.expect("joined").expect("ledger_begin");
        assert!(!created, "the other attempt created it");
        assert_eq!(
            (entry.state.as_str(), entry.external_key.as_str()),
            ("pending", "first-attempt-key"),
            "the key the provider may already have seen"
        );
    })
    .await;
}
