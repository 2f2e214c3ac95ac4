//! Acceptance tests of the foundation, against the real binary (`holdfast up`: balancer + N
//! `holdfast serve` processes) on SQLite and on Postgres:
//! (a) SIGKILL of instances during a stream of requests loses no session, no cart item and no
//!     acknowledged order, and a retry with the same key gets the original answer;
//! (b) 50 concurrent checkouts with one key make exactly one order, never a 5xx;
//! (c) the 400 and 422 cases of the idempotency draft;
//! (d) a user cannot read another user's order or cart.

use holdfast_testkit::system::{spawn_system, web_pids, Shopper};
use holdfast_testkit::{both_backends, Backend};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

both_backends!(multi_thread;
    sigkill_during_traffic_loses_nothing,
    one_key_fifty_concurrent_checkouts_one_order,
    idempotency_client_errors,
    users_are_isolated
);

const SKUS: &[(&str, i64)] = &[
    ("ROPE-10M", 8900),
    ("CARABINER", 1250),
    ("HARNESS", 6400),
    ("HELMET", 5900),
];

async fn sigkill_during_traffic_loses_nothing(backend: Backend) {
    let Some(sys) = spawn_system(BIN.as_ref(), backend, 3, "sigkill_during_traffic", &[]).await
    else {
        return;
    };
    let sys = Arc::new(sys);
    const USERS: usize = 6;
    const ROUNDS: usize = 8;
    let acked = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for u in 0..USERS {
        let (base, acked) = (sys.url.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let s = Shopper::new(&base, &format!("u{u}@example.com")).await;
            // What this user was promised: checkout key -> order answered with 201.
            let mut promised: BTreeMap<String, Value> = BTreeMap::new();
            for round in 0..ROUNDS {
                let mut expected = BTreeMap::new();
                for (i, (sku, _)) in SKUS
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| (i + round + u) % 2 == 0)
                {
                    let qty = (i + 1) as i64;
                    let key = format!("add-{u}-{round}-{sku}");
                    let r = s
                        .retrying(
                            "POST",
                            "/api/cart/items",
                            Some(json!({ "sku": sku, "qty": qty })),
                            Some(&key),
                        )
                        .await;
                    assert_eq!(r.status, StatusCode::OK, "add {sku}: {}", r.body);
                    expected.insert(sku.to_string(), qty);
                }
                // The cart holds exactly what was acknowledged: no item lost, none doubled.
                let cart = s.retrying("GET", "/api/cart", None, None).await;
                assert_eq!(
                    cart.status,
                    StatusCode::OK,
                    "session survived: {}",
                    cart.body
                );
                let got: BTreeMap<String, i64> = cart.body["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|l| {
                        (
                            l["sku"].as_str().unwrap().to_owned(),
                            l["qty"].as_i64().unwrap(),
                        )
                    })
                    .collect();
                assert_eq!(got, expected, "{} round {round}: cart", s.email);
                let key = format!("checkout-{u}-{round}");
                let r = s.retrying("POST", "/api/checkout", None, Some(&key)).await;
                assert_eq!(r.status, StatusCode::CREATED, "checkout: {}", r.body);
                let total: i64 = expected
                    .iter()
                    .map(|(sku, q)| q * SKUS.iter().find(|(s, _)| s == sku).unwrap().1)
                    .sum();
                assert_eq!(r.body["total_cents"], total);
                promised.insert(key, r.body);
                acked.fetch_add(1, Ordering::SeqCst);
            }
            (s, promised)
        }));
    }
    // At a third and at two thirds of the orders, an instance stalls (SIGSTOP: requests pile
    // up on it, in flight) and then dies (SIGKILL) before the balancer's health check notices.
    let total = USERS * ROUNDS;
    let mut killed = HashSet::new();
    for threshold in [total / 3, 2 * total / 3] {
        while acked.load(Ordering::SeqCst) < threshold {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let victim = web_pids(&sys)
            .into_iter()
            .find(|p| !killed.contains(p))
            .expect("a live instance");
        sys.signal(victim, nix::sys::signal::Signal::SIGSTOP);
        tokio::time::sleep(Duration::from_millis(150)).await;
        sys.signal(victim, nix::sys::signal::Signal::SIGKILL);
        killed.insert(victim);
    }
    let mut retried = 0;
    for t in tasks {
        let (s, promised) = t.await.expect("shopper task");
        retried += s.retried.load(Ordering::Relaxed);
        // The session still works, every promised order exists exactly once, and no other.
        assert_eq!(
            s.retrying("GET", "/api/me", None, None).await.status,
            StatusCode::OK
        );
        let orders = s.retrying("GET", "/api/orders", None, None).await.body["orders"]
            .as_array()
            .unwrap()
            .clone();
        let ids: Vec<&str> = orders
            .iter()
            .map(|o| o["order_id"].as_str().unwrap())
            .collect();
        let promised_ids: HashSet<&str> = promised
            .values()
            .map(|o| o["order_id"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids.len(),
            ROUNDS,
            "{}: exactly one order per checkout key",
            s.email
        );
        assert_eq!(
            ids.iter().copied().collect::<HashSet<_>>(),
            promised_ids,
            "{}: acknowledged orders",
            s.email
        );
        // A late retry of any checkout replays the original answer.
        for (key, order) in &promised {
            let r = s
                .once("POST", "/api/checkout", None, Some(key))
                .await
                .expect("replay");
            assert_eq!((r.status, r.replayed), (StatusCode::CREATED, true));
            assert_eq!(&r.body, order);
        }
    }
    // The faults hit requests in flight: they were re-sent by the balancer (safe: keyed or
    // idempotent) or retried by the client.
    let stats: Value = reqwest::get(format!("{}/ops/stats", sys.ops_url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rerouted = stats["retries_total"].as_u64().unwrap();
    eprintln!(
        "{backend:?}: {rerouted} requests re-routed by the balancer, {retried} retried by clients"
    );
    assert!(
        rerouted as usize + retried > 0,
        "the kills hit no request in flight: the test proved nothing"
    );
    // The supervisor replaced both killed instances.
    holdfast_testkit::process::eventually(
        Duration::from_secs(20),
        "both killed instances replaced",
        || {
            let pids = web_pids(&sys);
            let replaced = pids.len() == 3 && pids.iter().all(|p| !killed.contains(p));
            async move { replaced.then_some(()) }
        },
    )
    .await;
}

async fn one_key_fifty_concurrent_checkouts_one_order(backend: Backend) {
    let Some(sys) = spawn_system(BIN.as_ref(), backend, 3, "one_key_fifty", &[]).await else {
        return;
    };
    let s = Arc::new(Shopper::new(&sys.url, "race@example.com").await);
    assert_eq!(
        s.retrying(
            "POST",
            "/api/cart/items",
            Some(json!({ "sku": "HELMET", "qty": 2 })),
            None
        )
        .await
        .status,
        StatusCode::OK
    );
    let gate = Arc::new(tokio::sync::Barrier::new(50));
    let answers = futures::future::join_all((0..50).map(|_| {
        let (s, gate) = (s.clone(), gate.clone());
        tokio::spawn(async move {
            gate.wait().await;
            s.once("POST", "/api/checkout", None, Some("\"the-one-key\""))
                .await
                .expect("transport")
        })
    }))
    .await;
    let mut order_ids = HashSet::new();
    for a in answers {
        let a = a.expect("task");
        match a.status {
            StatusCode::CREATED => {
                order_ids.insert(a.body["order_id"].as_str().unwrap().to_owned());
            }
            StatusCode::CONFLICT => {}
            other => panic!("unexpected {other}: {}", a.body),
        }
    }
    assert_eq!(order_ids.len(), 1, "every 201 carries the one order");
    let orders = s.retrying("GET", "/api/orders", None, None).await.body;
    assert_eq!(orders["orders"].as_array().unwrap().len(), 1);
    assert_eq!(orders["orders"][0]["total_cents"], 2 * 5900);
}

async fn idempotency_client_errors(backend: Backend) {
    let Some(sys) = spawn_system(BIN.as_ref(), backend, 2, "idempotency_client_errors", &[]).await
    else {
        return;
    };
    let s = Shopper::new(&sys.url, "keys@example.com").await;
    s.retrying(
        "POST",
        "/api/cart/items",
        Some(json!({ "sku": "HELMET", "qty": 1 })),
        None,
    )
    .await;
    let missing = s.once("POST", "/api/checkout", None, None).await.unwrap();
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    let absurd = s
        .once("POST", "/api/checkout", None, Some(&"k".repeat(4000)))
        .await
        .unwrap();
    assert_eq!(absurd.status, StatusCode::BAD_REQUEST);
    let add = |q| Some(json!({ "sku": "CARABINER", "qty": q }));
    assert_eq!(
        s.once("POST", "/api/cart/items", add(1).as_ref(), Some("k1"))
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    let reused = s
        .once("POST", "/api/cart/items", add(5).as_ref(), Some("k1"))
        .await
        .unwrap();
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reused.body["status"], 422);
    let cart = s.retrying("GET", "/api/cart", None, None).await.body;
    assert_eq!(
        cart["items"].as_array().unwrap().len(),
        2,
        "the 422 changed nothing"
    );
}

async fn users_are_isolated(backend: Backend) {
    let Some(sys) = spawn_system(BIN.as_ref(), backend, 2, "users_are_isolated", &[]).await else {
        return;
    };
    let a = Shopper::new(&sys.url, "alice@example.com").await;
    let b = Shopper::new(&sys.url, "mallory@example.com").await;
    a.retrying(
        "POST",
        "/api/cart/items",
        Some(json!({ "sku": "HARNESS", "qty": 1 })),
        None,
    )
    .await;
    let order = a
        .retrying("POST", "/api/checkout", None, Some("a1"))
        .await
        .body;
    a.retrying(
        "POST",
        "/api/cart/items",
        Some(json!({ "sku": "HELMET", "qty": 1 })),
        None,
    )
    .await;
    let path = format!("/api/orders/{}", order["order_id"].as_str().unwrap());
    assert_eq!(
        a.once("GET", &path, None, None).await.unwrap().status,
        StatusCode::OK
    );
    assert_eq!(
        b.once("GET", &path, None, None).await.unwrap().status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        b.retrying("GET", "/api/orders", None, None).await.body["orders"],
        json!([])
    );
    assert_eq!(
        b.retrying("GET", "/api/cart", None, None).await.body["items"],
        json!([])
    );
    // Mallory's checkout with Alice's key is Mallory's own key space: her cart is empty.
    assert_eq!(
        b.once("POST", "/api/checkout", None, Some("a1"))
            .await
            .unwrap()
            .status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        a.retrying("GET", "/api/cart", None, None).await.body["items"][0]["sku"],
        "HELMET"
    );
}
