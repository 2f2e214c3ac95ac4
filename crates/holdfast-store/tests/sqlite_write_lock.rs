//! SQLite: processes writing one database take turns through an exclusive `flock` on
//! `<database>.write-lock`, woken by the kernel, instead of SQLite's sleeping busy handler.
//! Checked from outside, as another process would see it: while a write transaction is open
//! the lock is held, and the moment it commits the lock is free. And stores opened together on
//! a new file all open, and every hold of the lock is measured, for the operator who must tell
//! a saturated lock from a slow disk.

use holdfast_store::{Rerun, ScopedFutureExt, Store, StoreOptions, TxError};
use nix::fcntl::{Flock, FlockArg};
use std::convert::Infallible;

/// Whether another process could take the write lock right now (without waiting).
fn free(lock: &std::path::Path) -> bool {
    let file = std::fs::File::open(lock).expect("the write-lock file exists");
    Flock::lock(file, FlockArg::LockExclusiveNonblock).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_transaction_holds_the_file_lock_until_it_commits() {
    let dir = tempfile::tempdir().unwrap();
    let url = holdfast_store::testing::sqlite_url(dir.path());
    let store = Store::open(&StoreOptions::new(&url)).await.unwrap();
    let lock = dir.path().join("holdfast.sqlite.write-lock");
    assert!(free(&lock), "nobody writes yet");

    let (held_tx, held_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let writer = tokio::spawn({
        let store = store.clone();
        async move {
            let mut signals = Some((held_tx, go_rx));
            store
                .transaction("held", Rerun::IfUncommitted, |tx| {
                    let signals = signals.take();
                    async move {
                        sqlx::query("INSERT INTO rate_limits (key_hash, tat) VALUES ('k', 1)")
                            .execute(tx.conn())
                            .await?;
                        if let Some((held, go)) = signals {
                            let _ = held.send(());
                            let _ = go.await;
                        }
                        Ok::<_, TxError<Infallible>>(())
                    }
                    .scope_boxed()
                })
                .await
        }
    });
    held_rx.await.unwrap();
    assert!(!free(&lock), "held while the transaction is open");
    go_tx.send(()).unwrap();
    writer.await.unwrap().unwrap();
    assert!(free(&lock), "free once it committed");
}

/// Instances started together open a new database file at the same moment, and each new
/// connection switches the file to WAL. Two switches that meet can each hold the lock the
/// other needs next, and SQLite refuses one at once instead of waiting: every open must
/// still succeed. (A race: each round gives it a new file and eight openers.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_opened_together_on_a_new_file_all_open() {
    for round in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let url = holdfast_store::testing::sqlite_url(dir.path());
        let opens = (0..8).map(|_| {
            let url = url.clone();
            tokio::spawn(async move { Store::open(&StoreOptions::new(&url)).await })
        });
        for open in futures::future::join_all(opens).await {
            let opened = open.expect("joined");
            assert!(opened.is_ok(), "round {round}: {:?}", opened.err());
        }
    }
}

/// The `_sum` and `_count` of a histogram (or summary) on a Prometheus page.
fn sum_and_count(page: &str, name: &str) -> (f64, u64) {
    let value = |suffix: &str| {
        page.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}_{suffix} ")))
            .map(|v| v.trim().parse::<f64>().expect("a number"))
            .unwrap_or(0.0)
    };
    (value("sum"), value("count") as u64)
}

// One thread: the recorder below is this thread's, and so is every task of this runtime.
#[tokio::test]
async fn every_hold_of_the_write_lock_is_measured_from_taking_it_to_letting_go() {
    const HELD: &str = "holdfast_store_write_lock_held_seconds";
    const WAIT: &str = "holdfast_store_write_lock_wait_seconds";
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let page = recorder.handle();
    let _recording = metrics::set_default_local_recorder(&recorder);
    let dir = tempfile::tempdir().unwrap();
    let url = holdfast_store::testing::sqlite_url(dir.path());
    let store = Store::open(&StoreOptions::new(&url)).await.unwrap();
    let before = page.render();
    let (held_before, holds_before) = sum_and_count(&before, HELD);
    let (_, waits_before) = sum_and_count(&before, WAIT);

    // Four writes: one keeps the lock while it waits out 200 ms, one gives up (rolled back:
    // the lock was held all the same).
    let linger = std::time::Duration::from_millis(200);
    for n in 0..4 {
        let written = store
            .transaction("measured", Rerun::IfUncommitted, |tx| {
                async move {
                    sqlx::query("INSERT INTO rate_limits (key_hash, tat) VALUES ($1, 1)")
                        .bind(format!("k{n}"))
                        .execute(tx.conn())
                        .await?;
                    match n {
                        1 => tokio::time::sleep(linger).await,
                        3 => return Err(TxError::Abort("gave up")),
                        _ => {}
                    }
                    Ok(())
                }
                .scope_boxed()
            })
            .await;
        assert_eq!(written.is_ok(), n != 3, "write {n}: {written:?}");
    }

    let after = page.render();
    let (held, holds) = sum_and_count(&after, HELD);
    let (_, waits) = sum_and_count(&after, WAIT);
    assert_eq!(
        holds - holds_before,
        4,
        "one hold per transaction, rolled back or not"
    );
    assert_eq!(waits - waits_before, 4, "one wait per transaction");
    let held = held - held_before;
    assert!(
        held >= linger.as_secs_f64() && held < 10.0,
        "held {held} s in all, one hold alone lasting {linger:?}"
    );
}
