//! `holdfast up` as a process: it keeps N instances running behind its balancer, replaces the
//! ones that die, and takes them all with it when it stops.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use holdfast_testkit::process::{
    alive, client, eventually, get_text, instances, spawn_up, status, Instance, Proc,
};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const WITHIN: Duration = Duration::from_secs(20);

/// `holdfast up` with N web instances and no workers: these tests are about the balancer's
/// upstreams.
async fn start_up(dir: &Path, n: usize) -> (Proc, String, String, Vec<Instance>) {
    spawn_up(BIN.as_ref(), dir, n, &["--workers", "0"]).await
}

async fn ops_instances(ops: &str) -> Vec<Instance> {
    let response = client()
        .get(format!("{ops}/ops/instances"))
        .send()
        .await
        .unwrap();
    response.json().await.unwrap()
}

#[tokio::test]
async fn a_killed_or_frozen_instance_is_replaced_while_the_balancer_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (mut up, base, ops, before) = start_up(dir.path(), 2).await;
    assert_eq!(ops_instances(&ops).await, before);
    let public = status(&client(), &format!("{base}/ops/instances")).await;
    assert_eq!(
        public,
        Some(404),
        "operator endpoints are not on the public port"
    );

    checkout_one_order(&base).await;
    assert_fleet_metrics_add_up(&ops, &before).await;
    let screen = holdfast_testkit::process::status_json(BIN.as_ref(), dir.path());
    let processes = screen["processes"].as_array().unwrap();
    assert_eq!(processes[0]["role"], "balancer", "{screen:#}");
    let web: Vec<&serde_json::Value> = processes.iter().filter(|p| p["role"] == "web").collect();
    assert_eq!(web.len(), 2, "{screen:#}");
    assert!(
        web.iter()
            .all(|p| p["health"] == "ready" && p["restarts"] == 0),
        "{screen:#}"
    );

    let victim = before[0].pid;
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    let after = replaced(dir.path(), &base, &before, victim).await;
    let screen = holdfast_testkit::process::status_json(BIN.as_ref(), dir.path());
    let restarted = screen["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["role"] == "web" && p["restarts"] == 1)
        .count();
    assert_eq!(restarted, 1, "the killed slot counts a restart: {screen:#}");
    for i in &after {
        up.adopt(i.pid);
    }
    assert_eq!(ops_instances(&ops).await, after);
    let (client, healthz) = (client(), format!("{base}/healthz"));
    for _ in 0..20 {
        assert_eq!(status(&client, &healthz).await, Some(200));
    }

    // A frozen instance (SIGSTOP: a stopped process keeps its locks) is killed and replaced.
    let frozen = after[1].pid;
    kill(Pid::from_raw(frozen as i32), Signal::SIGSTOP).unwrap();
    let started = Instant::now();
    let fresh = replaced(dir.path(), &base, &after, frozen).await;
    assert!(!alive(frozen), "the frozen instance was killed");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    for i in &fresh {
        up.adopt(i.pid);
    }
}

/// Waits until `victim` is gone from `instances.json` and a new instance took its place,
/// asserting that `/healthz` through the balancer answers 200 all along.
async fn replaced(dir: &Path, base: &str, before: &[Instance], victim: u32) -> Vec<Instance> {
    let old: HashSet<u32> = before.iter().map(|i| i.pid).collect();
    let (client, healthz) = (client(), format!("{base}/healthz"));
    let started = Instant::now();
    loop {
        assert_eq!(
            status(&client, &healthz).await,
            Some(200),
            "a request through the balancer failed while an instance was down"
        );
        let replaced = instances(dir).filter(|now| {
            now.len() == before.len()
                && now
                    .iter()
                    .all(|i| i.role == "web" && i.pid != victim && alive(i.pid))
                && now.iter().any(|i| !old.contains(&i.pid))
        });
        if let Some(now) = replaced {
            return now;
        }
        assert!(
            started.elapsed() < WITHIN,
            "no replacement for {victim} within {WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sigterm_stops_every_instance_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (mut up, _base, _ops, live) = start_up(dir.path(), 2).await;

    up.signal(Signal::SIGTERM);
    let exit = up.exit_status(Duration::from_secs(30)).await;
    assert!(exit.success(), "up exited with {exit}");
    for i in &live {
        assert!(!alive(i.pid), "{i:?} outlived up");
    }
    assert_eq!(instances(dir.path()), Some(vec![]));
}

#[tokio::test]
async fn sigkill_takes_every_instance_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let (up, _base, _ops, live) = start_up(dir.path(), 2).await;

    up.signal(Signal::SIGKILL);
    eventually(
        Duration::from_secs(5),
        "instances to die with up",
        || async { live.iter().all(|i| !alive(i.pid)).then_some(()) },
    )
    .await;
}

/// Signs up, adds to the cart and checks out through the balancer: with no workers, the
/// order's payout job waits in the queue.
async fn checkout_one_order(base: &str) {
    let s = holdfast_testkit::system::Shopper::new(base, "fleet@example.com").await;
    let add = serde_json::json!({ "sku": "HELMET", "qty": 1 });
    let added = s
        .retrying("POST", "/api/cart/items", Some(add), Some("fleet-add"))
        .await;
    assert!(added.status.is_success(), "add: {}", added.status);
    let order = s
        .retrying("POST", "/api/checkout", None, Some("fleet-1"))
        .await;
    assert_eq!(order.status, 201, "checkout");
}

/// The operator port's `/ops/metrics`: the balancer's own families and every instance's,
/// merged into one page where each family is described once, every series says which process
/// it is from, and counters that have not happened yet are there at 0.
async fn assert_fleet_metrics_add_up(ops: &str, live: &[Instance]) {
    let page = get_text(&client(), &format!("{ops}/ops/metrics")).await;
    for family in [
        "holdfast_balancer_requests_total",
        "holdfast_http_requests_total",
        "holdfast_store_retries_total",
        "holdfast_rate_limited_total",
    ] {
        assert_eq!(
            page.matches(&format!("# TYPE {family} ")).count(),
            1,
            "{family}:\n{page}"
        );
        assert_eq!(
            page.matches(&format!("# HELP {family} ")).count(),
            1,
            "{family}"
        );
    }
    // The family's zero series, before any operation names its own (each op's series also
    // starts at 0, from its first attempt).
    let retries: Vec<&str> = page
        .lines()
        .filter(|l| l.starts_with("holdfast_store_retries_total{") && !l.contains("op=\""))
        .collect();
    assert_eq!(
        retries.len(),
        live.len(),
        "one zero series per instance: {retries:?}"
    );
    assert!(
        retries
            .iter()
            .all(|l| l.contains("role=\"web\"") && l.ends_with(" 0")),
        "{retries:?}"
    );
    let instances: std::collections::HashSet<&str> = retries
        .iter()
        .filter_map(|l| l.split("instance=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(instances.len(), live.len(), "{retries:?}");
    assert!(page.contains("holdfast_balancer_requests_total{role=\"balancer\",class=\"2xx\"}"));
    // The queue is counted once for the fleet, not once per process.
    let queue: Vec<&str> = page
        .lines()
        .filter(|l| l.starts_with("holdfast_jobs{"))
        .collect();
    assert_eq!(
        queue,
        ["holdfast_jobs{role=\"balancer\",queue=\"payments\",state=\"available\"} 1"],
        "{page}"
    );
}

#[tokio::test]
async fn a_roll_replaces_every_instance_one_at_a_time_without_a_5xx() {
    let dir = tempfile::tempdir().unwrap();
    let (mut up, base, _ops, before) = start_up(dir.path(), 2).await;
    // Users keep reading while the roll runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, url) = (stop.clone(), format!("{base}/api/products"));
        tokio::spawn(async move {
            let (client, mut answers, mut failures) = (client(), 0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match status(&client, &url).await {
                    Some(200) => answers += 1,
                    other => failures.push(other),
                }
            }
            (answers, failures)
        })
    };
    let data_dir = dir.path().to_str().unwrap().to_owned();
    // A disk with no room: the roll refuses to start, says why and touches nothing.
    let refused = std::process::Command::new(BIN)
        .args(["roll", "--min-free-disk", "100", "--data-dir", &data_dir])
        .output()
        .unwrap();
    let why = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{why}");
    assert!(
        why.contains("aborted before step 1/2")
            && why.contains("--min-free-disk")
            && why.contains("nothing was touched"),
        "{why}"
    );
    assert_eq!(
        instances(dir.path())
            .unwrap()
            .iter()
            .map(|i| i.pid)
            .collect::<HashSet<_>>(),
        before.iter().map(|i| i.pid).collect::<HashSet<_>>()
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN)
            // The free-disk guard is checked above; this roll must not depend on how full the
            // host's disk happens to be.
            .args([
                "roll",
                "--pause",
                "0s",
                "--min-free-disk",
                "0",
                "--data-dir",
                &data_dir,
            ])
            .output()
            .expect("running holdfast roll")
    })
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (answers, failures) = load.await.unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("rolled 2 processes"), "{said}");
    let after = instances(dir.path()).expect("instances.json");
    for i in &after {
        up.adopt(i.pid);
    }
    let old: HashSet<u32> = before.iter().map(|i| i.pid).collect();
    assert_eq!(after.len(), 2);
    assert!(
        after.iter().all(|i| !old.contains(&i.pid)),
        "every instance was replaced"
    );
    assert!(answers > 10, "the load ran ({answers} answers)");
    assert!(
        failures.is_empty(),
        "users saw {failures:?} during the roll"
    );
}

/// The operator page (`/ops` on the operator port) in a real headless Chromium: it lists the
/// instances with their health, and charts the last seconds' traffic.
#[tokio::test]
async fn the_operator_page_shows_the_instances_and_the_traffic_in_a_browser() {
    if !holdfast_testkit::process::have_tool("chromium", "scripts/install-ops-tools.sh") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_up, base, ops, live) = start_up(dir.path(), 2).await;
    let client = client();
    for _ in 0..20 {
        assert_eq!(
            status(&client, &format!("{base}/api/products")).await,
            Some(200)
        );
    }
    let history = eventually(WITHIN, "two seconds of history", || async {
        let h: Vec<serde_json::Value> = client
            .get(format!("{ops}/ops/history"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (h.len() >= 2 && h.iter().any(|s| s["requests"].as_u64() > Some(0))).then_some(h)
    })
    .await;
    assert!(history.iter().all(|s| s["errors"] == 0), "{history:?}");
    let dom = holdfast_testkit::process::rendered_dom(&format!("{ops}/ops")).await;
    for i in &live {
        assert!(
            dom.contains(&format!("data-pid=\"{}\"", i.pid)),
            "{} missing:\n{dom}",
            i.pid
        );
    }
    assert_eq!(dom.matches("<td>ready</td>").count(), 2, "{dom}");
    assert!(dom.contains("<polyline"), "the charts were drawn:\n{dom}");
    assert!(
        dom.contains("s of history</p>"),
        "the page refreshed from the endpoints:\n{dom}"
    );
}
