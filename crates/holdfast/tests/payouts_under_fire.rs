//! Acceptance tests of jobs and the effect ledger, against the real binaries on SQLite and
//! Postgres: SIGKILL workers at random points during 500 checkouts while the provider fails
//! some calls and, on others, charges and then times out before answering. Afterwards every
//! order is paid exactly once at the provider, has exactly one receipt, and no job is lost,
//! stuck or dead. The same run with the ledger bypassed (a planted fault) must show
//! duplicate charges, proving the check can fail.

use holdfast_drill::System;
use holdfast_store::{Store, StoreOptions};
use holdfast_testkit::process::get_json;
use holdfast_testkit::system::{spawn_system, Shopper};
use holdfast_testkit::{both_backends, Backend};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

both_backends!(multi_thread;
    every_order_paid_once_while_workers_die,
    bypassing_the_ledger_is_caught
);

/// Fast leases and retries so rescues and retries happen within the test.
const FLAGS: &[&str] = &[
    "--workers",
    "3",
    "--job-lease",
    "1s",
    "--job-retry-base",
    "100ms",
    "--provider-timeout",
    "400ms",
];

struct Run {
    /// order id -> total, for every checkout answered 201.
    orders: HashMap<String, i64>,
    /// order id -> the address of the shopper who placed it.
    owners: HashMap<String, String>,
    charges: Vec<Value>,
    emails: Vec<Value>,
    kills: usize,
}

/// `users` shoppers place `per_user` orders each while a killer SIGKILLs a random worker
/// every 400 ms; then waits for every order to be paid and receipted (or the deadline).
async fn run(sys: &System, users: usize, per_user: usize, faults: Value) -> Run {
    let provider = sys.provider_url.clone();
    let http = reqwest::Client::new();
    let r = http
        .put(format!("{provider}/_faults"))
        .json(&faults)
        .send()
        .await
        .expect("set faults");
    assert!(r.status().is_success(), "faults: {}", r.status());

    let shopping = Arc::new(AtomicBool::new(true));
    let killer = {
        let (shopping, dir) = (shopping.clone(), sys.data_dir().to_owned());
        tokio::spawn(async move {
            let mut kills = 0;
            let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
            while shopping.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(400)).await;
                let workers: Vec<u32> = holdfast_testkit::process::instances(&dir)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|i| i.role == "worker")
                    .map(|i| i.pid)
                    .collect();
                if workers.is_empty() {
                    continue;
                }
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let victim = workers[(seed % workers.len() as u64) as usize];
                if holdfast_testkit::process::runs(BIN.as_ref(), victim) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(victim as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    kills += 1;
                }
            }
            kills
        })
    };
    let shoppers = (0..users).map(|u| {
        let base = sys.url.clone();
        tokio::spawn(async move {
            let address = format!("payer{u}@example.com");
            let s = Shopper::new(&base, &address).await;
            let mut mine = HashMap::new();
            for n in 0..per_user {
                let add = s
                    .retrying(
                        "POST",
                        "/api/cart/items",
                        Some(json!({ "sku": "CARABINER", "qty": 1 + n % 3 })),
                        Some(&format!("add-{u}-{n}")),
                    )
                    .await;
                assert_eq!(add.status, StatusCode::OK, "add: {}", add.body);
                let order = s
                    .retrying("POST", "/api/checkout", None, Some(&format!("co-{u}-{n}")))
                    .await;
                assert_eq!(
                    order.status,
                    StatusCode::CREATED,
                    "checkout: {}",
                    order.body
                );
                mine.insert(
                    order.body["order_id"].as_str().unwrap().to_owned(),
                    (order.body["total_cents"].as_i64().unwrap(), address.clone()),
                );
            }
            mine
        })
    });
    let (mut orders, mut owners) = (HashMap::new(), HashMap::new());
    for s in futures::future::join_all(shoppers).await {
        for (order, (total, address)) in s.expect("shopper") {
            orders.insert(order.clone(), total);
            owners.insert(order, address);
        }
    }
    shopping.store(false, Ordering::SeqCst);
    let kills = killer.await.expect("killer");

    // Faults off; wait until every order has its receipt (bounded).
    http.put(format!("{provider}/_faults"))
        .json(&json!({}))
        .send()
        .await
        .expect("clear faults");
    let deadline = Instant::now() + Duration::from_secs(90);
    let (charges, emails) = loop {
        let emails: Vec<Value> = get_json(&http, &format!("{provider}/emails")).await;
        let receipted: std::collections::HashSet<&str> = emails
            .iter()
            .filter_map(|e| e["order_id"].as_str())
            .collect();
        if orders.keys().all(|o| receipted.contains(o.as_str())) || Instant::now() > deadline {
            // A moment more, so a straggling duplicate would have landed too.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let charges = get_json(&http, &format!("{provider}/charges")).await;
            let emails = get_json(&http, &format!("{provider}/emails")).await;
            break (charges, emails);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    Run {
        orders,
        owners,
        charges,
        emails,
        kills,
    }
}

fn per_order(records: &[Value]) -> HashMap<String, usize> {
    let mut n = HashMap::new();
    for r in records {
        *n.entry(r["order_id"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    n
}

async fn every_order_paid_once_while_workers_die(backend: Backend) {
    let Some(sys) = spawn_system(BIN.as_ref(), backend, 2, "every_order_paid_once", FLAGS).await
    else {
        return;
    };
    let faults =
        json!({ "fail_rate": 0.05, "act_then_timeout_rate": 0.08, "hang_ms": 1500, "seed": 7 });
    let r = run(&sys, 10, 50, faults).await;
    assert_eq!(r.orders.len(), 500);
    assert!(
        r.kills >= 3,
        "workers were killed during the run ({} kills)",
        r.kills
    );

    let charges = per_order(&r.charges);
    let emails = per_order(&r.emails);
    for order in r.orders.keys() {
        assert_eq!(
            charges.get(order),
            Some(&1),
            "order {order}: charged exactly once"
        );
        assert_eq!(
            emails.get(order),
            Some(&1),
            "order {order}: exactly one receipt"
        );
    }
    assert_eq!(
        r.charges.len(),
        r.orders.len(),
        "no charge for an order we do not know"
    );
    for c in &r.charges {
        assert_eq!(
            Some(&c["amount_cents"].as_i64().unwrap()),
            r.orders.get(c["order_id"].as_str().unwrap()),
            "charged the order's total"
        );
    }
    for e in &r.emails {
        assert_eq!(
            e["to"].as_str(),
            r.owners
                .get(e["order_id"].as_str().unwrap())
                .map(String::as_str),
            "the receipt went to the shopper who ordered"
        );
    }
    // The API says paid, and the queue comes to hold nothing running, waiting or dead. A
    // worker killed after its email went out but before it settled leaves that job running
    // until its lease (1 s) runs out and another worker finishes it, so the queue is given
    // a bounded while to drain; a job lost, stuck or dead stays open past it.
    let store = Store::open(&StoreOptions::new(sys.store_url()).schema(&holdfast_shop::SCHEMA))
        .await
        .expect("store");
    let receipted_at = Instant::now();
    let drained_by = receipted_at + Duration::from_secs(30);
    let drained_after = loop {
        let counts = store.job_counts().await.expect("counts");
        let open: Vec<_> = counts.iter().filter(|c| c.state != "completed").collect();
        if open.is_empty() {
            break receipted_at.elapsed();
        }
        assert!(
            Instant::now() < drained_by,
            "no job lost, stuck or dead: {open:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let s = Shopper::new(&sys.url, "payer0@example.com").await;
    let mine = s.retrying("GET", "/api/orders", None, None).await.body;
    assert!(mine["orders"]
        .as_array()
        .unwrap()
        .iter()
        .all(|o| o["status"] == "paid"));
    eprintln!(
        "{backend:?}: 500 orders, {} worker kills, {} charges, {} emails, queue drained {:?} after the last receipt",
        r.kills,
        r.charges.len(),
        r.emails.len(),
        drained_after
    );
}

async fn bypassing_the_ledger_is_caught(backend: Backend) {
    let mut flags = FLAGS.to_vec();
    flags.extend(["--unsafe-sabotage", "ledger-bypass"]);
    let Some(sys) = spawn_system(BIN.as_ref(), backend, 2, "bypassing_the_ledger", &flags).await
    else {
        return;
    };
    // Act-then-timeout on a third of the calls: every such call is retried under a new key.
    let faults = json!({ "act_then_timeout_rate": 0.3, "hang_ms": 1500, "seed": 11 });
    let r = run(&sys, 4, 15, faults).await;
    let charges = per_order(&r.charges);
    let duplicated = charges.values().filter(|&&n| n > 1).count();
    assert!(
        duplicated > 0,
        "the planted fault must show up as duplicate charges ({} charges for {} orders)",
        r.charges.len(),
        r.orders.len()
    );
    eprintln!("{backend:?}: sabotage caught: {duplicated} orders charged more than once");
}
