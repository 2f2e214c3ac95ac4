//! The store follows its primary. Given a URL that names several PostgreSQL hosts, it writes
//! to whichever is the primary; when that one dies and a standby is promoted, the next
//! writes find the new primary within the retry deadline, and none is lost or doubled. When
//! every host is a standby, the store refuses to open, and says so.
//!
//! Real clusters: the drill's throwaway `Cluster` and a streaming standby of it
//! (`pg_basebackup -R`); `scripts/install-drill-deps.sh` installs the server binaries.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast_drill::Cluster;
use holdfast_store::{Rerun, ScopedFutureExt, Store, StoreOptions, TxError};
use sqlx::Connection;

/// One row, `n`, in a transaction that must not run twice.
async fn write(store: &Store, n: i64) -> Result<(), holdfast_store::Error> {
    store
        .transaction("failover_write", Rerun::IfUncommitted, |tx| {
            async move {
                sqlx::query("INSERT INTO failover_rows (n) VALUES ($1)")
                    .bind(n)
                    .execute(tx.conn())
                    .await
                    .map_err(holdfast_store::Error::from)?;
                Ok(())
            }
            .scope_boxed()
        })
        .await
        .map_err(TxError::<Infallible>::into_db)
}

/// `holdfast status` of the store at `url` (no `up` running): its text.
fn status_of(url: &str) -> String {
    holdfast_testkit::process::status_of_postgres(env!("CARGO_BIN_EXE_holdfast").as_ref(), url)
}

async fn rows(url: &str) -> Vec<i64> {
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    sqlx::query_scalar("SELECT n FROM failover_rows ORDER BY n")
        .fetch_all(&mut conn)
        .await
        .expect("rows")
}

/// A throwaway primary with the tests' table, and a connection of the test's own to it.
async fn primary_with_rows(dir: &Arc<tempfile::TempDir>) -> (Arc<Cluster>, sqlx::PgConnection) {
    let primary = Cluster::start(dir).await.expect("the primary");
    let mut admin = sqlx::PgConnection::connect(&primary.url()).await.unwrap();
    sqlx::raw_sql("CREATE TABLE failover_rows (n bigint PRIMARY KEY)")
        .execute(&mut admin)
        .await
        .unwrap();
    (primary, admin)
}

/// [`primary_with_rows`] and a streaming standby of it.
async fn primary_with_rows_and_standby(
    dir: &Arc<tempfile::TempDir>,
) -> (Arc<Cluster>, Arc<Cluster>) {
    let (primary, admin) = primary_with_rows(dir).await;
    drop(admin);
    let standby = Cluster::start_standby(&primary, dir)
        .await
        .expect("a standby");
    (primary, standby)
}

/// Ends every client connection to the store's database but `admin`'s own, as a server
/// restart or an operator would: one `true` for each connection ended.
async fn end_store_connections(admin: &mut sqlx::PgConnection) -> Vec<bool> {
    sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = 'holdfast' AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
    )
    .fetch_all(admin)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_follow_the_primary_when_a_standby_is_promoted() {
    if !holdfast_testkit::process::postgres_server_binaries_or_skip() {
        return;
    }
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let (primary, standby) = primary_with_rows_and_standby(&dir).await;
    // The standby is named first: the store must ask, not assume.
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/holdfast",
        standby.port, primary.port
    );
    // The shop's schema too, so that `holdfast status` can open it.
    let mut opts = StoreOptions::new(&url).schema(&holdfast_shop::SCHEMA);
    opts.acquire_timeout = Duration::from_secs(1);
    opts.retry.deadline = Duration::from_secs(10);
    let store = Store::open(&opts)
        .await
        .expect("the store finds the primary");
    for n in 1..=3 {
        write(&store, n).await.expect("a write to the primary");
    }
    // Where a worker's LISTEN goes: the host the writes go to.
    let host = |port: u16| format!("postgres://postgres@127.0.0.1:{port}/holdfast");
    assert_eq!(store.primary_url(), Some(host(primary.port)));
    // Which host is which, and the standby's lag: what `holdfast status` and the fleet's
    // metrics show.
    // (Asynchronous: the standby catches up on its own time; wait until it has.)
    let caught_up = Instant::now() + Duration::from_secs(10);
    let nodes = loop {
        let nodes = store.replication().await;
        if nodes[0].lag_bytes == Some(0) || Instant::now() > caught_up {
            break nodes;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    assert_eq!(nodes[0].host, format!("127.0.0.1:{}", standby.port));
    assert_eq!(nodes[0].role, "standby");
    assert_eq!(nodes[0].lag_bytes, Some(0), "caught up: {nodes:?}");
    assert_eq!(nodes[0].lag_seconds, Some(0.0), "{nodes:?}");
    assert_eq!(nodes[1].role, "primary");
    let status = status_of(&url);
    assert!(
        status.contains(&format!("database 127.0.0.1:{}: standby", standby.port)),
        "{status}"
    );
    assert!(
        status.contains(&format!("database 127.0.0.1:{}: primary", primary.port)),
        "{status}"
    );

    // The primary dies at once (no shutdown checkpoint); the standby is promoted.
    primary.stop().await;
    standby.promote().await.expect("promote");
    let flipped = Instant::now();
    write(&store, 4)
        .await
        .expect("the write finds the new primary");
    let recovered = flipped.elapsed();
    eprintln!("writes came back {recovered:?} after the promotion");
    assert!(
        recovered < Duration::from_secs(5),
        "writes came back after {recovered:?}"
    );
    for n in 5..=6 {
        write(&store, n).await.expect("and stays there");
    }
    assert_eq!(store.primary_url(), Some(host(standby.port)));
    let status = status_of(&url);
    assert!(
        status.contains(&format!("database 127.0.0.1:{}: primary", standby.port)),
        "{status}"
    );
    assert!(
        status.contains(&format!("database 127.0.0.1:{}: UNREACHABLE", primary.port)),
        "{status}"
    );
    // Asynchronous replication: what the primary had acknowledged before it died had
    // reached the standby (it was idle); nothing was written twice.
    assert_eq!(rows(&standby.url()).await, vec![1, 2, 3, 4, 5, 6]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_meets_the_dead_primary_mid_promotion_waits_for_the_new_one() {
    if !holdfast_testkit::process::postgres_server_binaries_or_skip() {
        return;
    }
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let (primary, standby) = primary_with_rows_and_standby(&dir).await;
    // The primary through a relay, as the drill reaches it through its fault proxy: once the
    // server is gone, a connection is taken and dropped at once (not refused), so each
    // attempt fails within a millisecond.
    let relay = holdfast_testkit::pgwire::RoundTrips::start(&primary.url()).await;
    let relayed = reqwest::Url::parse(relay.url()).expect("the relay's url");
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/holdfast",
        relayed.port().expect("a port"),
        standby.port
    );
    // The store's defaults: five attempts, a 3 s acquire timeout.
    let store = Store::open(&StoreOptions::new(&url))
        .await
        .expect("the store finds the primary");
    write(&store, 1).await.expect("a write to the primary");

    primary.stop().await;
    let writing = tokio::spawn({
        let store = store.clone();
        async move { write(&store, 2).await }
    });
    // The promotion takes its time (here half a second): longer than five quick attempts,
    // within the search's wait for a primary.
    tokio::time::sleep(Duration::from_millis(500)).await;
    standby.promote().await.expect("promote");
    writing
        .await
        .expect("the write's task")
        .expect("the write waited for the promotion, then landed on the new primary");
    assert_eq!(rows(&standby.url()).await, vec![1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_of_standbys_only_refuses_to_open_and_says_why() {
    if !holdfast_testkit::process::postgres_server_binaries_or_skip() {
        return;
    }
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let primary = Cluster::start(&dir).await.expect("the primary");
    let standby = Cluster::start_standby(&primary, &dir)
        .await
        .expect("a standby");
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:1/holdfast",
        standby.port
    );
    let mut opts = StoreOptions::new(&url);
    opts.acquire_timeout = Duration::from_secs(1);
    let err = match Store::open(&opts).await {
        Ok(_) => panic!("a store of standbys must not open"),
        Err(e) => e,
    };
    let said = err.to_string();
    assert!(said.contains("no primary"), "{said}");
    assert!(said.contains("is a standby"), "{said}");
    assert!(err.is_unavailable());
    // One host, a standby: every new connection is refused as one.
    let alone = StoreOptions::new(standby.url());
    let err = match Store::open(&alone).await {
        Ok(_) => panic!("a standby alone must not open"),
        Err(e) => e,
    };
    assert!(err.to_string().contains("standby"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_primary_fails_writes_within_the_deadline_and_they_come_back() {
    if !holdfast_testkit::process::postgres_server_binaries_or_skip() {
        return;
    }
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let (primary, mut admin) = primary_with_rows(&dir).await;
    let mut opts = StoreOptions::new(primary.url());
    opts.acquire_timeout = Duration::from_secs(1);
    opts.retry.deadline = Duration::from_secs(2);
    let store = Store::open(&opts).await.expect("the store");
    write(&store, 1).await.expect("a write");

    // Demoted in place, as some failover tools do it: new sessions are read-only, and the
    // open ones are ended (the store's connections with them).
    sqlx::raw_sql("ALTER DATABASE holdfast SET default_transaction_read_only = on")
        .execute(&mut admin)
        .await
        .unwrap();
    end_store_connections(&mut admin).await;
    let started = Instant::now();
    let err = write(&store, 2).await.expect_err("no node takes writes");
    assert!(err.is_unavailable(), "{err}: a 503, not a client's mistake");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "gave up after {:?}, past the deadline",
        started.elapsed()
    );

    sqlx::raw_sql("ALTER DATABASE holdfast RESET default_transaction_read_only")
        .execute(&mut admin)
        .await
        .unwrap();
    write(&store, 3).await.expect("writes come back");
    assert_eq!(
        rows(&primary.url()).await,
        vec![1, 3],
        "the refused write left nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_must_not_run_twice_survives_its_pooled_connection_being_ended() {
    if !holdfast_testkit::process::postgres_server_binaries_or_skip() {
        return;
    }
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let (primary, mut admin) = primary_with_rows(&dir).await;
    let mut opts = StoreOptions::new(primary.url());
    (opts.max_connections, opts.surplus_connections) = (1, 0);
    let store = Store::open(&opts).await.expect("the store");
    write(&store, 1).await.expect("a write");

    // The server ends the pool's one connection a moment after its last use: the pool lends
    // it again without a ping (it was idle for less than a second), so the next write meets
    // the dead connection. That is before its COMMIT, so nothing can have committed and the
    // store retries it on a new connection, even though it must not run twice.
    let ended = end_store_connections(&mut admin).await;
    assert_eq!(ended, vec![true], "the store's connection was ended");
    write(&store, 2)
        .await
        .expect("the write lands on a new connection");
    assert_eq!(rows(&primary.url()).await, vec![1, 2], "each once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_one_statement_meets_a_dead_connection_the_pool_checks_the_rest() {
    if !holdfast_testkit::process::postgres_server_binaries_or_skip() {
        return;
    }
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let primary = Cluster::start(&dir).await.expect("the primary");
    let mut opts = StoreOptions::new(primary.url());
    (opts.max_connections, opts.surplus_connections) = (2, 0);
    let store = Store::open(&opts).await.expect("the store");
    // Two reads that wait for each other: the pool holds two connections.
    let both = tokio::sync::Barrier::new(2);
    let read_together = || {
        store.read("two_at_once", |conn| {
            let both = &both;
            async move {
                both.wait().await;
                sqlx::query("SELECT 1")
                    .execute(conn)
                    .await
                    .map_err(holdfast_store::Error::from)?;
                Ok::<_, TxError<Infallible>>(())
            }
            .scope_boxed()
        })
    };
    let (a, b) = tokio::join!(read_together(), read_together());
    a.and(b).expect("two reads");

    let mut admin = sqlx::PgConnection::connect(&primary.url()).await.unwrap();
    let ended = end_store_connections(&mut admin).await;
    assert_eq!(ended, vec![true, true], "both of the store's connections");

    // A single statement that must not run twice meets one dead connection (used a moment
    // ago, so lent without a ping) and fails: whether it committed is unknown to the store.
    let email = |s: &str| holdfast_core::Email::parse(s).unwrap();
    let first = store.user_create(&email("first@example.com"), "hash").await;
    assert!(
        first
            .as_ref()
            .is_err_and(holdfast_store::Error::is_unavailable),
        "{first:?}"
    );
    // The next one is lent the other dead connection, which went back to the pool before
    // that failure: it is pinged, found dead and replaced, and the write lands.
    store
        .user_create(&email("second@example.com"), "hash")
        .await
        .expect("the pool replaced the other dead connection before lending it");
}
