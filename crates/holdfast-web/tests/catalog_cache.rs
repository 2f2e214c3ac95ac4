//! `GET /api/products` reads through the catalog cache: many requests, one store query; and
//! flushing the cache loses nothing (the next read asks the store again).
//! Its own test binary, so the process-wide `catalog` counters are this file's alone.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use holdfast_store::{Store, StoreOptions};
use holdfast_web::{app, AppState, CatalogCache, WebOptions};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

mod common;

fn origin_calls(handle: &metrics_exporter_prometheus::PrometheusHandle) -> u64 {
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

/// The tests share the process-wide `catalog` counters: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn products_are_served_from_the_cache_and_correct_after_a_flush() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&StoreOptions::new(holdfast_store::testing::sqlite_url(
        dir.path(),
    )))
    .await
    .unwrap();
    let handle = holdfast_web::install_metrics_recorder().unwrap();
    let state = AppState::new(store.clone(), common::local(), Some(handle.clone()));
    let router = app(state.clone());
    let expected = json!({ "products": store.product_list().await.unwrap() });
    assert!(!expected["products"].as_array().unwrap().is_empty());

    let before = origin_calls(&handle);
    let mut many = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let router = router.clone();
        many.spawn(async move { products(&router).await });
    }
    while let Some(body) = many.join_next().await {
        assert_eq!(body.unwrap(), expected);
    }
    assert_eq!(
        origin_calls(&handle) - before,
        1,
        "50 reads (concurrent and sequential) ask the store once"
    );
    for _ in 0..20 {
        assert_eq!(products(&router).await, expected);
    }
    assert_eq!(origin_calls(&handle) - before, 1);

    state.catalog().flush().await.unwrap();
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
    let Some(admin) = holdfast_cache::testing::redis(test).await else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let prefix = holdfast_cache::testing::unique_prefix(test);
    let dir = tempfile::tempdir().unwrap();
    let url = holdfast_store::testing::sqlite_url(dir.path());
    let handle = holdfast_web::install_metrics_recorder().unwrap();
    let mut fleet = Vec::new();
    for _ in 0..2 {
        let store = Store::open(&StoreOptions::new(url.clone())).await.unwrap();
        let opts = WebOptions {
            catalog_cache: CatalogCache::Redis {
                conn: holdfast_cache::testing::redis(test).await.unwrap(),
                prefix: prefix.clone(),
            },
            ..common::local()
        };
        let state = AppState::new(store, opts, Some(handle.clone()));
        fleet.push((app(state.clone()), state));
    }
    let store = fleet[0].1.store().clone();
    let expected = json!({ "products": store.product_list().await.unwrap() });

    let before = origin_calls(&handle);
    let mut many = tokio::task::JoinSet::new();
    for i in 0..40 {
        let router = fleet[i % 2].0.clone();
        many.spawn(async move { products(&router).await });
    }
    while let Some(body) = many.join_next().await {
        assert_eq!(body.unwrap(), expected);
    }
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
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&StoreOptions::new(holdfast_store::testing::sqlite_url(
        dir.path(),
    )))
    .await
    .unwrap();
    let opts = WebOptions {
        catalog_ttl: std::time::Duration::from_millis(50),
        catalog_stale_if_error: std::time::Duration::from_millis(500),
        ..common::local()
    };
    let router = app(AppState::new(store.clone(), opts, None));
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
