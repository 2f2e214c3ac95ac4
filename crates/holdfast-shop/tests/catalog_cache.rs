//! `GET /api/products` reads through the catalog cache: many requests, one store query; and
//! flushing the cache loses nothing (the next read asks the store again).
//! Its own test binary, so the process-wide `catalog` counters are this file's alone.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use holdfast_shop::{CatalogCache, ShopOptions};
use holdfast_store::{ScopedFutureExt, Store};
use holdfast_testkit::app::{local, spawn_shop};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

fn origin_calls(handle: &holdfast_web::PrometheusHandle) -> u64 {
    handle
        .render()
        .lines()
        .find(|l| l.starts_with("holdfast_cache_origin_calls_total{cache=\"catalog\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0, |n| n.parse().unwrap())
}

async fn products(router: &axum::Router) -> Value {
    let req = Request::builder()
        .uri("/api/products")
        .header(header::HOST, "shop.test")
        .body(Body::empty())
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
    serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

/// The catalog as the store has it.
async fn product_list(store: &Store) -> Vec<holdfast_shop::sql::ProductRow> {
    store
        .read("product_list", |c| {
            holdfast_shop::sql::product_list::<std::convert::Infallible>(c).scope_boxed()
        })
        .await
        .unwrap()
}

/// `n` catalog reads at once, round-robin over `routers`; each must answer `expected`.
async fn read_concurrently(routers: &[axum::Router], n: usize, expected: &Value) {
    let mut many = tokio::task::JoinSet::new();
    for i in 0..n {
        let router = routers[i % routers.len()].clone();
        many.spawn(async move { products(&router).await });
    }
    while let Some(body) = many.join_next().await {
        assert_eq!(body.unwrap(), *expected);
    }
}

/// The tests share the process-wide `catalog` counters: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn products_are_served_from_the_cache_and_correct_after_a_flush() {
    let _serial = SERIAL.lock().await;
    let t = spawn_shop(local(), ShopOptions::default()).await;
    let handle = holdfast_web::install_metrics_recorder().unwrap();
    let (router, store) = (t.router.clone(), t.store.clone());
    let expected = json!({ "products": product_list(&store).await });
    assert!(!expected["products"].as_array().unwrap().is_empty());

    let before = origin_calls(&handle);
    read_concurrently(std::slice::from_ref(&router), 50, &expected).await;
    assert_eq!(
        origin_calls(&handle) - before,
        1,
        "50 reads (concurrent and sequential) ask the store once"
    );
    for _ in 0..20 {
        assert_eq!(products(&router).await, expected);
    }
    assert_eq!(origin_calls(&handle) - before, 1);

    t.shop.catalog().flush().await.unwrap();
    assert_eq!(products(&router).await, expected, "a flush loses nothing");
    assert_eq!(
        origin_calls(&handle) - before,
        2,
        "after a flush the store is asked again, once"
    );
    assert_eq!(products(&router).await, expected);
    assert_eq!(origin_calls(&handle) - before, 2);
}

/// Two instances sharing a Redis prefix: one store query for the fleet, and a flush on one
/// instance is seen by the other.
#[tokio::test]
async fn with_redis_the_fleet_asks_the_store_once() {
    let test = "web_catalog_fleet";
    let Some(admin) = holdfast_testkit::redis::redis(test).await else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let prefix = holdfast_testkit::redis::unique_prefix(test);
    let handle = holdfast_web::install_metrics_recorder().unwrap();
    let redis_shop = || async {
        ShopOptions {
            catalog_cache: CatalogCache::Redis {
                conn: holdfast_testkit::redis::redis(test).await.unwrap(),
                prefix: prefix.clone(),
            },
            ..ShopOptions::default()
        }
    };
    let first = spawn_shop(local(), redis_shop().await).await;
    let second = first.sibling_shop(local(), redis_shop().await).await;
    let fleet = [
        (first.router.clone(), first.shop.clone()),
        (second.router.clone(), second.shop.clone()),
    ];
    let expected = json!({ "products": product_list(&first.store).await });

    let before = origin_calls(&handle);
    let routers = [fleet[0].0.clone(), fleet[1].0.clone()];
    read_concurrently(&routers, 40, &expected).await;
    assert_eq!(
        origin_calls(&handle) - before,
        1,
        "one store query per fleet"
    );

    fleet[0].1.catalog().flush().await.unwrap();
    assert_eq!(
        products(&fleet[1].0).await,
        expected,
        "a flush loses nothing"
    );
    assert_eq!(
        origin_calls(&handle) - before,
        2,
        "the flush was fleet-wide"
    );
    assert_eq!(products(&fleet[0].0).await, expected);
    assert_eq!(origin_calls(&handle) - before, 2);
    fleet[0].1.catalog().flush().await.unwrap();
    drop(admin);
}

/// A store outage past the TTL still serves the last catalog (stale-if-error), and past that
/// window the outage shows.
#[tokio::test]
async fn a_store_outage_serves_the_last_catalog_within_stale_if_error() {
    let _serial = SERIAL.lock().await;
    let opts = ShopOptions {
        catalog_ttl: std::time::Duration::from_millis(50),
        catalog_stale_if_error: std::time::Duration::from_millis(500),
        ..ShopOptions::default()
    };
    let t = spawn_shop(local(), opts).await;
    let (router, store) = (t.router.clone(), t.store.clone());
    let expected = products(&router).await;
    store.close().await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(products(&router).await, expected, "stale, but served");
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let req = Request::builder()
        .uri("/api/products")
        .header(header::HOST, "shop.test")
        .body(Body::empty())
        .unwrap();
    let status = router.oneshot(req).await.unwrap().status();
    assert!(status.is_server_error(), "past the window: {status}");
}
