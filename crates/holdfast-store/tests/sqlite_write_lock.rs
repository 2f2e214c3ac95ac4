//! SQLite: processes writing one database take turns through an exclusive `flock` on
//! `<database>.write-lock`, woken by the kernel, instead of SQLite's sleeping busy handler.
//! Checked from outside, as another process would see it: while a write transaction is open
//! the lock is held, and the moment it commits the lock is free. And stores opened together on
//! a new file all open.

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
