//! The store's pool, seen on the wire (PostgreSQL): a connection whose user finished goes back
//! without a round trip, and one left in an unknown state (a cancelled statement, a
//! transaction abandoned half-way) is put right before anyone else gets it.
//!
//! Each store here has a pool of one connection and no surplus, so every operation waits for
//! the previous one's connection to be back: what happened on its way back is on the wire
//! before the next operation starts. The last case gives the pool one surplus connection. Needs `DATABASE_URL` (skipped without it, except under `CI=true`).

use holdfast_core::Backend;
use holdfast_store::{Rerun, ScopedFutureExt, Store, StoreOptions, TxError};
use holdfast_testkit::db::with_fresh_db;
use holdfast_testkit::pgwire::RoundTrips;
use sqlx::Executor;
use std::convert::Infallible;
use tokio::sync::oneshot;

/// A store of the database at `url` whose pool holds one connection, reached through the
/// relay returned with it, which counts what crosses it.
async fn one_connection(url: &str) -> (RoundTrips, Store) {
    let wire = RoundTrips::start(url).await;
    let mut opts = StoreOptions::new(wire.url());
    (opts.max_connections, opts.surplus_connections) = (1, 0);
    let store = Store::open(&opts).await.expect("open");
    (wire, store)
}

/// The statements and the pings the wire saw while `op` ran and the connection came back.
async fn seen<F: std::future::Future>(store: &Store, wire: &RoundTrips, op: F) -> (u64, u64) {
    let (statements, pings) = (wire.count(), wire.pings());
    op.await;
    // The one connection is lent again only once it is back, checked or not.
    store
        .ping()
        .await
        .expect("the next user gets the connection");
    (wire.count() - statements - 1, wire.pings() - pings)
}

#[tokio::test]
async fn a_connection_whose_statement_finished_goes_back_without_a_ping() {
    with_fresh_db(Backend::Postgres, "pool_no_ping", |url| async move {
        let (wire, store) = one_connection(&url).await;
        store.ping().await.expect("warm");

        let (statements, pings) = seen(&store, &wire, async {
            for _ in 0..5 {
                store.ping().await.expect("ping");
            }
        })
        .await;
        assert_eq!(
            (statements, pings),
            (5, 0),
            "five statements, no ping between them"
        );

        let read = store.read("two_statements", |conn| {
            async move {
                sqlx::query("SELECT 1").execute(&mut *conn).await?;
                sqlx::query("SELECT 2").execute(&mut *conn).await?;
                Ok::<_, TxError<Infallible>>(())
            }
            .scope_boxed()
        });
        let (statements, pings) = seen(&store, &wire, read).await;
        assert_eq!((statements, pings), (2, 0));
        store.close().await;
    })
    .await;
}

#[tokio::test]
async fn a_statement_cancelled_half_way_leaves_a_connection_the_next_user_can_use() {
    with_fresh_db(Backend::Postgres, "pool_cancelled", |url| async move {
        let (wire, store) = one_connection(&url).await;
        store.ping().await.expect("warm");
        let (sent, cancel) = tokio::sync::oneshot::channel::<()>();
        let mut sent = Some(sent);
        let slow = store.read("slow", |conn| {
            let sent = sent.take();
            async move {
                // A simple query: one message, on the wire at the first poll.
                let running = conn.execute("SELECT pg_sleep(0.3)");
                tokio::pin!(running);
                // Polled once, so the statement is on the wire, then the caller gives up.
                let _ = futures::poll!(&mut running);
                if let Some(sent) = sent {
                    let _ = sent.send(());
                }
                running.await?;
                Ok::<_, TxError<Infallible>>(())
            }
            .scope_boxed()
        });
        let (statements, pings) = seen(&store, &wire, async {
            tokio::select! {
                _ = slow => panic!("the statement was to be cancelled"),
                _ = cancel => {}
            }
        })
        .await;
        assert_eq!(
            (statements, pings),
            (1, 1),
            "the cancelled statement's answer is read and the connection pinged before reuse"
        );
        let answer: i32 = store
            .read("after", |conn| {
                async move {
                    Ok::<_, TxError<Infallible>>(
                        sqlx::query_scalar("SELECT 41 + 1")
                            .fetch_one(&mut *conn)
                            .await?,
                    )
                }
                .scope_boxed()
            })
            .await
            .expect("read");
        assert_eq!(answer, 42, "the next statement gets its own answer");
        store.close().await;
    })
    .await;
}

#[tokio::test]
async fn a_transaction_abandoned_half_way_is_rolled_back_before_its_connection_is_lent() {
    with_fresh_db(Backend::Postgres, "pool_abandoned", |url| async move {
        let (_wire, store) = one_connection(&url).await;
        store
            .read("table", |conn| {
                async move {
                    conn.execute("CREATE TABLE marks (n int)").await?;
                    Ok::<_, TxError<Infallible>>(())
                }
                .scope_boxed()
            })
            .await
            .expect("table");
        let (written, abandon) = tokio::sync::oneshot::channel::<()>();
        let mut written = Some(written);
        let abandoned = store.transaction("abandoned", Rerun::Always, |tx| {
            let written = written.take();
            async move {
                sqlx::query("INSERT INTO marks VALUES (1)")
                    .execute(tx.conn())
                    .await?;
                if let Some(written) = written {
                    let _ = written.send(());
                }
                std::future::pending::<()>().await;
                Ok::<_, TxError<Infallible>>(())
            }
            .scope_boxed()
        });
        tokio::select! {
            _ = abandoned => panic!("the transaction was to be abandoned"),
            _ = abandon => {}
        }
        let (marks, in_transaction): (i64, bool) = store
            .read("after", |conn| {
                async move {
                    Ok::<_, TxError<Infallible>>(
                        sqlx::query_as(
                            "SELECT (SELECT COUNT(*) FROM marks), \
                             pg_current_xact_id_if_assigned() IS NOT NULL",
                        )
                        .fetch_one(&mut *conn)
                        .await?,
                    )
                }
                .scope_boxed()
            })
            .await
            .expect("read");
        assert_eq!(
            (marks, in_transaction),
            (0, false),
            "the insert was rolled back, and the next user is outside any transaction"
        );
        store.close().await;
    })
    .await;
}

#[tokio::test]
async fn connections_held_long_open_the_surplus_and_no_more() {
    with_fresh_db(Backend::Postgres, "pool_surplus", |url| async move {
        let mut opts = StoreOptions::new(&url);
        (opts.max_connections, opts.surplus_connections) = (1, 1);
        opts.acquire_timeout = std::time::Duration::from_millis(500);
        let store = Store::open(&opts).await.expect("open");
        let store = &store;
        // Holds a connection until told to let go.
        let hold = |held: oneshot::Sender<()>, go: oneshot::Receiver<()>| {
            let (mut held, mut go) = (Some(held), Some(go));
            store.read("hold", move |conn| {
                let (held, go) = (held.take(), go.take());
                async move {
                    sqlx::query("SELECT 1").execute(&mut *conn).await?;
                    if let (Some(held), Some(go)) = (held, go) {
                        let _ = held.send(());
                        let _ = go.await;
                    }
                    Ok::<_, TxError<Infallible>>(())
                }
                .scope_boxed()
            })
        };
        // While connections come back quickly, a second borrower waits for the one there is.
        let ((held, holds), (go, goes)) = (oneshot::channel(), oneshot::channel());
        let (first, ()) = tokio::join!(hold(held, goes), async {
            holds.await.expect("the first holds the pool's connection");
            let refused = store.ping().await;
            assert!(
                refused.is_err(),
                "no surplus while connections come back quickly"
            );
            let _ = go.send(());
        });
        first.expect("first");

        // A run of statements that hold their connection longer than twice the threshold
        // (as much as one hold may count): the average hold passes the threshold.
        assert!(holdfast_store::POOL_SLOW_HOLD * 2 <= std::time::Duration::from_millis(350));
        for _ in 0..6 {
            store
                .read("slow", |conn| {
                    async move {
                        sqlx::query("SELECT pg_sleep(0.35)")
                            .execute(&mut *conn)
                            .await?;
                        Ok::<_, TxError<Infallible>>(())
                    }
                    .scope_boxed()
                })
                .await
                .expect("slow");
        }

        // Now a second borrower gets a surplus connection, and a third still waits.
        let ((held_a, a_holds), (go_a, a_goes)) = (oneshot::channel(), oneshot::channel());
        let ((held_b, b_holds), (go_b, b_goes)) = (oneshot::channel(), oneshot::channel());
        let (a, b, ()) = tokio::join!(hold(held_a, a_goes), hold(held_b, b_goes), async {
            a_holds.await.expect("one holds its connection");
            b_holds
                .await
                .expect("and another holds a surplus connection");
            let refused = store.ping().await;
            assert!(
                refused.is_err(),
                "no third connection: one normal, one surplus"
            );
            let _ = (go_a.send(()), go_b.send(()));
        });
        a.and(b).expect("both");

        // Quick statements again: the surplus is withheld once more.
        for _ in 0..20 {
            store.ping().await.expect("quick");
        }
        let ((held, holds), (go, goes)) = (oneshot::channel(), oneshot::channel());
        let (first, ()) = tokio::join!(hold(held, goes), async {
            holds.await.expect("one holds the pool's connection");
            let refused = store.ping().await;
            assert!(refused.is_err(), "the surplus is withheld again");
            let _ = go.send(());
        });
        first.expect("first");
        store.close().await;
    })
    .await;
}
