//! `holdfast up --sessions cookie|redis` as real processes: `up` hands every instance the same
//! session configuration (a generated key ring, the Redis URL) through the environment, and a
//! session outlives the instance that created it — and, with Redis, Redis' memory too.

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

use std::time::Duration;

use holdfast_testkit::system::{spawn_system, web_pids, Shopper};
use holdfast_testkit::Backend;
use nix::sys::signal::Signal;
use reqwest::StatusCode;
use serde_json::json;

async fn me_on_every_instance(s: &Shopper, instances: usize) {
    // The balancer goes round-robin: 2 × N requests reach every instance at least once.
    for _ in 0..2 * instances {
        let me = s.retrying("GET", "/api/me", None, None).await;
        assert_eq!(me.status, StatusCode::OK, "{}", me.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_sessions_work_on_every_instance_up_starts() {
    let flags = ["--sessions", "cookie", "--workers", "0"];
    let Some(sys) = spawn_system(BIN.as_ref(), Backend::Sqlite, 2, "cookie_sessions", &flags).await
    else {
        return;
    };
    let s = Shopper::new(&sys.url, "cookie@example.com").await;
    me_on_every_instance(&s, 2).await;
    // No Redis tier here: `holdfast status` says nothing about one.
    assert_eq!(
        holdfast_testkit::process::status_json(BIN.as_ref(), sys.data_dir())["redis_sessions"],
        serde_json::Value::Null
    );

    sys.signal(web_pids(&sys)[0], Signal::SIGKILL);
    me_on_every_instance(&s, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sessions_survive_a_killed_instance_and_a_flushed_redis() {
    let Ok(url) = std::env::var("REDIS_URL") else {
        assert!(
            !holdfast_store::testing::in_ci(),
            "REDIS_URL is not set, and CI=true forbids skipping a Redis test"
        );
        eprintln!("redis_sessions_survive: skipped (set REDIS_URL to run it)");
        return;
    };
    let prefix = format!("holdfast-test:up:{}", uuid::Uuid::new_v4().simple());
    let flags = [
        "--sessions",
        "redis",
        "--redis-url",
        &url,
        "--redis-prefix",
        &prefix,
        "--workers",
        "0",
    ];
    let Some(sys) = spawn_system(BIN.as_ref(), Backend::Sqlite, 2, "redis_sessions", &flags).await
    else {
        return;
    };
    let s = Shopper::new(&sys.url, "redis@example.com").await;
    let add = json!({ "sku": "HELMET", "qty": 1 });
    let added = s
        .retrying("POST", "/api/cart/items", Some(add), Some("add-1"))
        .await;
    assert_eq!(added.status, StatusCode::OK);

    // `holdfast status` sees the Redis tier answering on both instances.
    assert_eq!(
        holdfast_testkit::process::status_json(BIN.as_ref(), sys.data_dir())["redis_sessions"],
        "up on all 2 instances"
    );

    sys.signal(web_pids(&sys)[0], Signal::SIGKILL);
    let admin = holdfast_sessions::connect_redis(&url).unwrap();
    let flushed = holdfast_testkit::redis::flush_prefix(&admin, &prefix)
        .await
        .unwrap();
    assert!(flushed >= 1, "the session was in Redis");
    for _ in 0..4 {
        let cart = s.retrying("GET", "/api/cart", None, None).await;
        assert_eq!(cart.status, StatusCode::OK, "no forced re-login");
        assert_eq!(cart.body["items"][0]["qty"], 1, "no lost cart");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    holdfast_testkit::redis::flush_prefix(&admin, &prefix)
        .await
        .unwrap();
}
