//! Reads on the standby, writes always visible to their writer. Given a URL that names a
//! primary and its streaming standby, the shop's order history and catalog are read from the
//! standby; a user who just wrote carries a signed read-your-writes token and is served by
//! the standby only once it has replayed the write, else by the primary. A token that does
//! not verify sends the read to the primary; a standby that dies, lags past the bound, or was
//! never reachable is skipped, and no read fails for it.
//!
//! The standby is made to lag on purpose (`pg_wal_replay_pause()`), so what each read saw
//! says where it was served: the standby without the new order, or the primary with it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast_drill::Cluster;
use holdfast_shop::ShopOptions;
use holdfast_store::{Freshness, ReplicaOptions, Store, StoreOptions};
use holdfast_testkit::app::{instance_on, local, Reply, TestApp};
use sqlx::Connection;

/// A primary with the shop's schema and a streaming standby of it.
async fn primary_and_standby(dir: &Arc<tempfile::TempDir>) -> (Arc<Cluster>, Arc<Cluster>) {
    let primary = Cluster::start(dir).await.expect("the primary");
    Store::open(&StoreOptions::new(primary.url()).schema(&holdfast_shop::SCHEMA))
        .await
        .expect("migrate the primary")
        .close()
        .await;
    let standby = Cluster::start_standby(&primary, dir)
        .await
        .expect("a standby");
    (primary, standby)
}

/// Both hosts in one URL, the standby first (the store must ask which is which).
fn both(primary: &Cluster, standby: &Cluster) -> String {
    format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/holdfast",
        standby.port, primary.port
    )
}

/// Runs one statement on `cluster` as the superuser.
async fn on(cluster: &Cluster, sql: &str) {
    let mut conn = sqlx::PgConnection::connect(&cluster.url()).await.unwrap();
    sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
}

/// The `name=value` of the read-your-writes cookie an answer sets.
fn read_token(reply: &Reply) -> Option<String> {
    let name = holdfast_web::read_cookie_name(false);
    reply
        .headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .find(|pair| pair.starts_with(&format!("{name}=")))
        .map(str::to_owned)
}

/// A user with one order, checked out while the standby replays nothing: the session
/// cookie, the read token the checkout handed out, and the order's id.
async fn an_order_the_standby_has_not_replayed(
    app: &TestApp,
    standby: &Cluster,
) -> (String, String, String) {
    let cookie = app.user("reader@example.com").await;
    assert_eq!(app.add(&cookie, "HELMET", 1).await.status, 200);
    on(standby, "SELECT pg_wal_replay_pause()").await;
    let co = app.checkout(&cookie, "order-1").await;
    assert_eq!(co.status, 201, "{:?}", co.json());
    let token = read_token(&co).expect("a checkout hands out a read-your-writes token");
    let id = co.json()["order_id"].as_str().unwrap().to_owned();
    (cookie, token, id)
}

/// One `bigint` read as a read that tolerates staleness ([`Freshness::Any`]).
async fn any_replica_scalar(store: &Store, sql: &'static str) -> i64 {
    use holdfast_store::ScopedFutureExt;
    store
        .read_replica("test_scalar", Freshness::Any, |c| {
            async move {
                Ok::<_, holdfast_store::TxError<std::convert::Infallible>>(
                    sqlx::query_scalar(sql)
                        .fetch_one(c)
                        .await
                        .map_err(holdfast_store::Error::from)?,
                )
            }
            .scope_boxed()
        })
        .await
        .unwrap()
}

async fn get(app: &TestApp, path: &str, cookies: &str) -> Reply {
    app.call("GET", path, None, Some(cookies), &[]).await
}

/// A primary and its standby, a shop instance given both hosts, and a user whose order the
/// standby has not replayed (its replay is paused).
struct Lagging {
    _dir: Arc<tempfile::TempDir>,
    primary: Arc<Cluster>,
    standby: Arc<Cluster>,
    app: TestApp,
    /// The user's session cookie.
    cookie: String,
    /// The read-your-writes token the checkout handed out.
    token: String,
    /// `/api/orders/ID` of the order.
    order: String,
}

/// [`Lagging`], or `None` where the server binaries are missing (outside CI).
async fn lagging() -> Option<Lagging> {
    if !holdfast_testkit::process::postgres_server_binaries_or_skip() {
        return None;
    }
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let (primary, standby) = primary_and_standby(&dir).await;
    let app = instance_on(&both(&primary, &standby), local(), ShopOptions::default())
        .await
        .expect("an instance on both hosts");
    assert!(app.store.reads_from_replicas());
    let (cookie, token, id) = an_order_the_standby_has_not_replayed(&app, &standby).await;
    Some(Lagging {
        _dir: dir,
        primary,
        standby,
        app,
        cookie,
        token,
        order: format!("/api/orders/{id}"),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_reads_its_write_while_the_standby_lags_and_others_read_the_standby() {
    // Every field bound: one left out would be dropped here, and a dropped cluster stops.
    let Some(Lagging {
        _dir,
        primary: _primary,
        standby,
        app,
        cookie,
        token,
        order,
    }) = lagging().await
    else {
        return;
    };

    // With its token the writer is served by the primary: the standby has not replayed it.
    let with_token = format!("{cookie}; {token}");
    assert_eq!(get(&app, &order, &with_token).await.status, 200);
    let list = get(&app, "/api/orders", &with_token).await;
    assert_eq!(list.json()["orders"].as_array().unwrap().len(), 1);

    // Without it, the standby serves: the order is not there yet. (This is what a browser
    // that dropped the cookie sees, and it shows the reads really go to the standby.)
    assert_eq!(get(&app, &order, &cookie).await.status, 404);
    let stale = get(&app, "/api/orders", &cookie).await;
    assert_eq!(stale.json()["orders"].as_array().unwrap().len(), 0);

    // A token that does not verify is no error and no stale read: the primary serves.
    let (body, _sig) = token.rsplit_once('.').unwrap();
    let (name, _) = token.split_once('=').unwrap();
    let expires = holdfast_core::now_ms() / 1000 + 60;
    for bad in [
        format!("{body}.AAAAAAAAAAAAAAAAAAAAAA"),
        format!("{name}=1.{expires}.AAAAAAAAAAAAAAAAAAAAAA"),
        format!("{name}=garbage"),
        format!("{name}=ffffffffffff.1.x"),
    ] {
        let r = get(&app, &order, &format!("{cookie}; {bad}")).await;
        assert_eq!(r.status, 200, "{bad}: {:?}", r.json());
    }

    // Once the standby replays the write, the token's reads go back to it and find it.
    on(&standby, "SELECT pg_wal_replay_resume()").await;
    assert_eq!(get(&app, &order, &with_token).await.status, 200);
    assert_eq!(get(&app, &order, &cookie).await.status, 200);
    app.store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_move_to_the_primary_when_the_standby_dies_or_lags_past_the_bound() {
    let Some(Lagging {
        _dir,
        primary,
        standby,
        app,
        cookie,
        order,
        token: _,
    }) = lagging().await
    else {
        return;
    };
    assert_eq!(
        get(&app, &order, &cookie).await.status,
        404,
        "the standby serves"
    );

    // A store whose bound is short takes the paused standby out of rotation as the primary
    // moves on; its reads then see the primary's rows.
    let short = Store::open(&StoreOptions {
        replicas: Some(ReplicaOptions {
            max_lag: Duration::from_millis(600),
            ..ReplicaOptions::default()
        }),
        ..StoreOptions::new(both(&primary, &standby))
            .schema(&holdfast_shop::SCHEMA)
            .migrate(holdfast_store::MigrateMode::Verify)
    })
    .await
    .unwrap();
    let standby_host = format!("127.0.0.1:{}", standby.port);
    let in_rotation = |store: &Store| {
        store
            .replica_rotation()
            .into_iter()
            .any(|(host, yes, _)| host == standby_host && yes)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while in_rotation(&short) {
        assert!(
            Instant::now() < deadline,
            "a lagging standby stays in rotation"
        );
        // The primary's WAL moves on; the standby's does not.
        on(
            &primary,
            "SELECT pg_switch_wal(); CREATE TEMP TABLE t AS SELECT 1",
        )
        .await;
        tokio::time::sleep(holdfast_store::REPLICA_WATCH_EVERY).await;
    }
    // What the runbook's "a replica is lagging" has the operator run.
    let status = holdfast_testkit::process::status_of_postgres(
        env!("CARGO_BIN_EXE_holdfast").as_ref(),
        &both(&primary, &standby),
    );
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("database {standby_host}: standby")))
        .unwrap_or_else(|| panic!("{status}"));
    assert!(!line.contains("behind: 0 bytes"), "{status}");
    let orders = any_replica_scalar(&short, "SELECT count(*) FROM orders").await;
    assert_eq!(orders, 1, "the primary served the read");
    short.close().await;

    // The standby dies: the next read that would have gone to it is served by the primary,
    // with no error, and the standby is out of rotation.
    standby.stop().await;
    let r = get(&app, &order, &cookie).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert!(!in_rotation(&app.store));
    let catalog = get(&app, "/api/products", &cookie).await;
    assert_eq!(catalog.status, 200);
    app.store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_unreachable_at_start_is_reported_and_skipped() {
    if !holdfast_testkit::process::postgres_server_binaries_or_skip() {
        return;
    }
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let primary = Cluster::start(&dir).await.expect("the primary");
    // A port nothing listens on: bound, then released.
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = gone.local_addr().unwrap().port();
    drop(gone);
    let url = format!(
        "postgres://postgres@127.0.0.1:{port},127.0.0.1:{}/holdfast",
        primary.port
    );
    let store = Store::open(&StoreOptions::new(url).schema(&holdfast_shop::SCHEMA))
        .await
        .expect("the store opens on the primary");
    let rotation = store.replica_rotation();
    let dead = rotation
        .iter()
        .find(|(host, _, _)| host == &format!("127.0.0.1:{port}"))
        .expect("the dead host is listed");
    assert!(!dead.1, "{rotation:?}");
    let one = any_replica_scalar(&store, "SELECT 1::bigint").await;
    assert_eq!(one, 1);
    store.close().await;
}

/// `holdfast up --backend postgres --replica`: a local try of a primary and its standby.
/// The fleet reads from the standby, exports which host is the primary and the standby's
/// lag, and a shopper's checkout is visible to their next read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_a_replica_runs_a_primary_and_a_standby_and_reads_from_it() {
    use holdfast_testkit::process::{buy_through, client, spawn_up};
    if !holdfast_testkit::process::postgres_server_binaries_or_skip() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let (_up, base, ops, _web) = spawn_up(
        env!("CARGO_BIN_EXE_holdfast").as_ref(),
        data.path(),
        2,
        &["--backend", "postgres", "--replica", "--workers", "0"],
    )
    .await;
    let http = client();
    // Each instance puts the standby in rotation once its watcher has measured the lag; until
    // then its reads go to the primary. Wait for both (a fresh fleet, not a slow one).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = metrics_page(&http, &ops).await;
        let reading = page
            .lines()
            .filter(|l| l.starts_with("holdfast_replica_in_rotation{") && l.ends_with(" 1"))
            .count();
        if reading == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the standby never joined both instances' rotation: {page}"
        );
        tokio::time::sleep(holdfast_store::REPLICA_WATCH_EVERY).await;
    }
    let bought = buy_through(&base, "up@example.com", "HELMET").await;
    let session = bought.session;
    let token = bought
        .set_by_checkout
        .into_iter()
        .find(|c| c.starts_with(holdfast_web::read_cookie_name(false)))
        .expect("a read-your-writes token");
    let id = bought.order["order_id"].as_str().unwrap();
    let read = http
        .get(format!("{base}/api/orders/{id}"))
        .header("cookie", format!("{session}; {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);

    let metrics = metrics_page(&http, &ops).await;
    let line = |prefix: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in {metrics}"))
            .to_owned()
    };
    let primaries = metrics
        .lines()
        .filter(|l| l.starts_with("holdfast_store_primary{") && l.ends_with(" 1"))
        .count();
    assert_eq!(primaries, 1, "{metrics}");
    line("holdfast_replica_lag_seconds{");
    let served: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("holdfast_store_replica_reads_total{") && l.contains("served=\"replica\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        served >= 1.0,
        "no read was served by the standby: {metrics}"
    );

    // The operator page shows which host is the primary and the standby's lag.
    if holdfast_testkit::process::have_tool("chromium", "scripts/install-ops-tools.sh") {
        let dom = holdfast_testkit::process::rendered_dom(&format!("{ops}/ops")).await;
        assert!(dom.contains("data-role=\"primary\""), "{dom}");
        assert!(dom.contains("data-role=\"standby\""), "{dom}");
        assert!(dom.contains(" s</td>"), "the standby's lag:\n{dom}");
    }
}

/// The fleet's metrics page, from the operator listener at `ops`.
async fn metrics_page(http: &reqwest::Client, ops: &str) -> String {
    http.get(format!("{ops}/ops/metrics"))
        .send()
        .await
        .expect("the operator listener answers")
        .text()
        .await
        .expect("a metrics page")
}
