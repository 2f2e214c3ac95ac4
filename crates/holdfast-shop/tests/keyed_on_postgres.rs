//! On Postgres a keyed checkout is one statement: the session's check, the key stored done
//! with its answer, the order, its lines, the emptied cart and the payout job, in one round
//! trip and one commit. Concurrent requests with one key wait for the first and replay its
//! answer, and a request that placed nothing (an empty cart) leaves no claim behind.

use holdfast_shop::ShopOptions;
use holdfast_store::{Store, StoreOptions};
use holdfast_testkit::app::{instance_on, local};
use holdfast_testkit::db::with_fresh_db;
use holdfast_testkit::pgwire::RoundTrips;
use holdfast_testkit::Backend;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_checkouts_with_one_key_make_one_order_and_all_answer_it() {
    with_fresh_db(Backend::Postgres, "keyed_one_commit", |url| async move {
        let migrated = migrated(&url).await;
        let app = shop_on(&url).await;
        let cookie = app.user("racer@example.com").await;
        assert_eq!(app.add(&cookie, "HELMET", 2).await.status, 200);

        // A key whose first attempt fails (empty cart after a rollback) is not left claimed:
        // the same key works at once afterwards.
        let other = app.user("empty@example.com").await;
        let empty = app.checkout(&other, "k-empty").await;
        assert_eq!(empty.status, 422, "{:?}", empty.json());
        assert_eq!(app.add(&other, "HARNESS", 1).await.status, 200);
        let later = app.checkout(&other, "k-empty").await;
        assert_eq!(later.status, 201, "{:?}", later.json());

        let answers =
            futures::future::join_all((0..20).map(|_| app.checkout(&cookie, "k-race"))).await;
        let statuses: Vec<u16> = answers.iter().map(|r| r.status.as_u16()).collect();
        assert!(statuses.iter().all(|&s| s == 201), "{statuses:?}");
        let fresh = answers.iter().filter(|r| !r.replayed()).count();
        assert_eq!(fresh, 1, "one request did the work, the others replayed it");
        let first = &answers[0].body;
        assert!(
            answers.iter().all(|r| &r.body == first),
            "every answer is the same order"
        );
        let orders: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM orders")
            .fetch_one(&mut *pg(&url).await)
            .await
            .unwrap();
        assert_eq!(orders, 2, "one order per key");
        migrated.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_checkout_is_one_round_trip_and_answers_the_orders_own_json() {
    with_fresh_db(Backend::Postgres, "keyed_one_trip", |url| async move {
        let migrated = migrated(&url).await;
        // A name that every JSON escape touches: quotes, a backslash, control characters
        // and text outside ASCII.
        sqlx::query("INSERT INTO products (sku, name, price_cents) VALUES ('ODD-1', $1, 1234)")
            .bind("Rope \"9 mm\" \\ caf\u{e9} \u{2713}\n\t\u{1}\u{7f} end")
            .execute(&mut *pg(&url).await)
            .await
            .unwrap();
        let wire = RoundTrips::start(&url).await;
        let app = shop_on(wire.url()).await;
        let cookie = app.user("two-trips@example.com").await;
        // Several connections in the pool first, so that no request below opens one (a new
        // connection's own setup statements would be counted with the request's).
        let reads = (0..8).map(|_| app.call("GET", "/api/cart", None, Some(&cookie), &[]));
        for read in futures::future::join_all(reads).await {
            assert_eq!(read.status, 200);
        }
        assert_eq!(app.add(&cookie, "ODD-1", 2).await.status, 200);
        // Up to three adds: a pool that had to open a connection anyway (a background
        // statement holding the idle one) counts that connection's setup with one add.
        let (mut trips, mut helmets) = (Vec::new(), 0);
        let added = loop {
            let (before, pings) = (wire.count(), wire.pings());
            let added = app.add(&cookie, "HELMET", 1).await;
            assert_eq!(added.status, 200);
            helmets += 1;
            trips.push(wire.count() - before);
            assert_eq!(wire.pings(), pings, "connections go back to the pool without a ping");
            if trips.last() == Some(&1) || helmets == 3 {
                break added;
            }
        };
        assert_eq!(trips.last(), Some(&1), "the add, its session's check included, as one statement: {trips:?}");
        let lines: Vec<(String, i64)> = added.json()["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| (l["sku"].as_str().unwrap().to_owned(), l["qty"].as_i64().unwrap()))
            .collect();
        assert_eq!(lines, [("HELMET".to_owned(), helmets), ("ODD-1".to_owned(), 2)]);
        // What the statement refuses, it refuses as the transaction did, writing nothing.
        let unknown = app.add(&cookie, "NO-SUCH-1", 1).await;
        assert_eq!(
            (unknown.status.as_u16(), unknown.json()["type"].as_str().map(|t| t.ends_with("unknown-sku"))),
            (422, Some(true)),
            "{:?}",
            unknown.json()
        );
        let over = app.add(&cookie, "HELMET", 99).await;
        assert_eq!(over.status, 422, "{:?}", over.json());

        let mut workers = sqlx::postgres::PgListener::connect(&url).await.unwrap();
        workers.listen(holdfast_store::NOTIFY_CHANNEL).await.unwrap();
        let (before, pings) = (wire.count(), wire.pings());
        let placed = app.checkout(&cookie, "k-two").await;
        let trips = wire.count() - before;
        assert_eq!(placed.status, 201, "{:?}", placed.json());
        assert_eq!(trips, 1, "the checkout, its session's check included, as one statement");
        assert_eq!(
            wire.pings() - pings,
            0,
            "connections go back to the pool without a ping (the store's pool, not sqlx's)"
        );
        let woken = tokio::time::timeout(std::time::Duration::from_secs(5), workers.recv())
            .await
            .expect("the payout's queue is notified at commit")
            .unwrap();
        assert_eq!(woken.payload(), holdfast_shop::PAYMENTS_QUEUE);

        // The answer the database rendered is, byte for byte, the order as the API renders it.
        let id = placed.json()["order_id"].as_str().unwrap().to_owned();
        let read = app
            .call("GET", &format!("/api/orders/{id}"), None, Some(&cookie), &[])
            .await;
        assert_eq!(read.status, 200);
        assert_eq!(
            String::from_utf8_lossy(&placed.body),
            String::from_utf8_lossy(&read.body)
        );
        let items = placed.json()["items"].as_array().unwrap().len();
        assert_eq!(items, 2, "both lines are in the order");

        // The retry replays those bytes; an empty cart with a fresh key places nothing.
        let again = app.checkout(&cookie, "k-two").await;
        assert!(again.replayed());
        assert_eq!(again.body, placed.body);
        let empty = app.checkout(&cookie, "k-after").await;
        assert_eq!(empty.status, 422, "{:?}", empty.json());
        let (orders, jobs): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM orders), (SELECT COUNT(*) FROM jobs WHERE kind = 'payout')",
        )
        .fetch_one(&mut *pg(&url).await)
        .await
        .unwrap();
        assert_eq!((orders, jobs), (1, 1), "one order and its one payout job");
        let args: String = sqlx::query_scalar("SELECT args FROM jobs WHERE kind = 'payout'")
            .fetch_one(&mut *pg(&url).await)
            .await
            .unwrap();
        let args: serde_json::Value = serde_json::from_str(&args).unwrap();
        assert_eq!(
            (args["order_id"].as_str(), args["total_cents"].as_i64(), args["email"].as_str()),
            (Some(id.as_str()), placed.json()["total_cents"].as_i64(), Some("two-trips@example.com")),
            "the payout carries what its worker needs: {args}"
        );
        migrated.close().await;
    })
    .await;
}

/// The checkout's and the add's statements check the session as a read of it would: a session
/// used a while ago is refreshed, and one left idle past its timeout, past its absolute expiry
/// or logged out is a 401 that writes nothing (and the dead one is deleted, as a read deletes
/// it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkouts_statement_checks_the_session_itself() {
    with_fresh_db(Backend::Postgres, "keyed_session", |url| async move {
        let migrated = migrated(&url).await;
        let app = shop_on(&url).await;
        let db = &mut *pg(&url).await;
        let now = holdfast_core::now_ms();
        let minute = 60_000;

        // Used two minutes ago (a touch is due each minute, the idle timeout is 30): the
        // checkout goes through and records the use.
        let used = app.user("used@example.com").await;
        assert_eq!(app.add(&used, "HELMET", 1).await.status, 200);
        let back = now - 2 * minute;
        sqlx::query("UPDATE sessions SET last_seen_at = $1").bind(back).execute(&mut *db).await.unwrap();
        let placed = app.checkout(&used, "k-used").await;
        assert_eq!(placed.status, 201, "{:?}", placed.json());
        let seen: i64 = sqlx::query_scalar("SELECT last_seen_at FROM sessions")
            .fetch_one(&mut *db)
            .await
            .unwrap();
        assert!(seen >= now, "the use is recorded: {seen} against {now}");

        // Dead three ways, each once for a checkout and once for an add, each with a cart.
        let owner = "(SELECT id FROM users WHERE email = $2)";
        for request in ["checkout", "add"] {
            let (idle, expired, gone) = (
                format!("idle-{request}@example.com"),
                format!("expired-{request}@example.com"),
                format!("gone-{request}@example.com"),
            );
            let mut cookies = Vec::new();
            for email in [&idle, &expired, &gone] {
                let cookie = app.user(email).await;
                assert_eq!(app.add(&cookie, "HARNESS", 1).await.status, 200);
                cookies.push(cookie);
            }
            sqlx::query(&format!("UPDATE sessions SET last_seen_at = $1 WHERE user_id = {owner}"))
                .bind(now - 31 * minute)
                .bind(&idle)
                .execute(&mut *db)
                .await
                .unwrap();
            sqlx::query(&format!("UPDATE sessions SET expires_at = $1 WHERE user_id = {owner}"))
                .bind(now - 1)
                .bind(&expired)
                .execute(&mut *db)
                .await
                .unwrap();
            let out = app.call("POST", "/api/logout", None, Some(&cookies[2]), &[]).await;
            assert!(out.status.is_success(), "{:?}", out.json());
            for (cookie, who) in cookies.iter().zip([&idle, &expired, &gone]) {
                let refused = match request {
                    "checkout" => app.checkout(cookie, "k-dead").await,
                    _ => app.add(cookie, "HELMET", 1).await,
                };
                assert_eq!(refused.status, 401, "{who}: {:?}", refused.json());
            }
        }
        let (orders, keys, sessions, carts): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM orders), (SELECT COUNT(*) FROM idempotency_keys),
                    (SELECT COUNT(*) FROM sessions), (SELECT COUNT(*) FROM cart_lines)",
        )
        .fetch_one(&mut *db)
        .await
        .unwrap();
        assert_eq!(
            (orders, keys, sessions, carts),
            (1, 1, 1, 6),
            "only the live session's order and key; the dead sessions are deleted; their carts are untouched"
        );
        migrated.close().await;
    })
    .await;
}

/// The shop's schema migrated on `url`; close it at the end.
async fn migrated(url: &str) -> Store {
    Store::open(&StoreOptions::new(url).schema(&holdfast_shop::SCHEMA))
        .await
        .expect("migrate")
}

/// A shop instance on `url` (the database itself, or a proxy in front of it).
async fn shop_on(url: &str) -> holdfast_testkit::app::TestApp {
    instance_on(url, local(), ShopOptions::default())
        .await
        .expect("instance")
}

async fn pg(url: &str) -> Box<sqlx::PgConnection> {
    use sqlx::Connection;
    Box::new(sqlx::PgConnection::connect(url).await.unwrap())
}
