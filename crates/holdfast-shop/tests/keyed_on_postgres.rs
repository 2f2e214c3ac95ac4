//! On Postgres an `Idempotency-Key` is claimed inside the checkout's own transaction (one
//! commit for the key, the order and the stored answer): concurrent requests with one key wait
//! for the first and replay its answer, and a request whose transaction rolls back leaves no
//! claim behind.

use holdfast_shop::ShopOptions;
use holdfast_store::{Store, StoreOptions};
use holdfast_testkit::app::{instance_on, local};
use holdfast_testkit::db::with_fresh_db;
use holdfast_testkit::Backend;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_checkouts_with_one_key_make_one_order_and_all_answer_it() {
    with_fresh_db(Backend::Postgres, "keyed_one_commit", |url| async move {
        let migrated = Store::open(&StoreOptions::new(&url).schema(&holdfast_shop::SCHEMA))
            .await
            .expect("migrate");
        let app = instance_on(&url, local(), ShopOptions::default())
            .await
            .expect("instance");
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

async fn pg(url: &str) -> Box<sqlx::PgConnection> {
    use sqlx::Connection;
    Box::new(sqlx::PgConnection::connect(url).await.unwrap())
}
