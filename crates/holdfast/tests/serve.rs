//! `holdfast serve` as a process: it announces its address and drains on SIGTERM.

use std::time::Duration;

use holdfast_testkit::process::{client, eventually, status, Proc};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");
use nix::sys::signal::Signal;

#[tokio::test]
async fn sigterm_drains_then_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Proc::spawn(
        BIN.as_ref(),
        &[
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--insecure-cookies",
            "--migrate",
            "--drain-delay",
            "3s",
        ],
    );
    let line = serve.line_after("HOLDFAST_LISTENING ", Duration::from_secs(20));
    let (addr, ops) = line
        .split_once(" ops=")
        .expect("the operator address is announced");
    let (client, base) = (client(), format!("http://{addr}"));
    assert_eq!(
        status(&client, &format!("{base}/metrics")).await,
        Some(404),
        "metrics are not on the public port"
    );
    assert_eq!(
        status(&client, &format!("http://{ops}/metrics")).await,
        Some(200)
    );
    let (readyz, healthz) = (format!("{base}/readyz"), format!("{base}/healthz"));
    // Every answer names the instance, opaquely: not its address.
    let answer = client.get(&healthz).send().await.unwrap();
    let served_by = answer.headers()["x-served-by"].to_str().unwrap().to_owned();
    assert!(
        served_by.starts_with("i-") && served_by.len() == 10,
        "{served_by}"
    );
    assert!(
        !served_by.contains(addr.split(':').next_back().unwrap()),
        "{served_by}"
    );
    assert_eq!(status(&client, &healthz).await, Some(200));
    assert_eq!(status(&client, &readyz).await, Some(200));

    serve.signal(Signal::SIGTERM);
    eventually(Duration::from_secs(2), "/readyz to answer 503", || async {
        (status(&client, &readyz).await == Some(503)).then_some(())
    })
    .await;
    assert_eq!(
        status(&client, &healthz).await,
        Some(200),
        "a draining instance still serves"
    );

    let exit = serve.exit_status(Duration::from_secs(20)).await;
    assert!(exit.success(), "serve exited with {exit}");
    assert_eq!(
        status(&client, &healthz).await,
        None,
        "nothing listens after exit"
    );
}

/// `holdfast balance` in front of instances it did not start (as in the compose file): it
/// spreads requests over every named upstream, and `holdfast probe` (the image's health
/// check) exits 0 only for a 2xx answer.
#[tokio::test]
async fn balance_spreads_over_named_upstreams_and_probe_judges_readyz() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let serve_args = [
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--data-dir",
        data,
        "--insecure-cookies",
        "--migrate",
    ];
    let first = Proc::spawn(BIN.as_ref(), &serve_args);
    let first_addr = listening(&first);
    let second = Proc::spawn(BIN.as_ref(), &serve_args);
    let second_addr = listening(&second);
    // One upstream by name, one by address: both forms an orchestrator hands out.
    let by_name = format!("localhost:{}", second_addr.port());
    let balance = Proc::spawn(
        BIN.as_ref(),
        &[
            "balance",
            "--addr",
            "127.0.0.1:0",
            "--ops-addr",
            "127.0.0.1:0",
            "--upstream",
            &first_addr.to_string(),
            "--upstream",
            &by_name,
        ],
    );
    let line = balance.line_after("HOLDFAST_LISTENING ", Duration::from_secs(20));
    let (addr, ops) = line.split_once(" ops=").unwrap();
    let client = client();
    let served_by = eventually(Duration::from_secs(10), "both instances to serve", || {
        let client = client.clone();
        async move {
            let mut names = std::collections::BTreeSet::new();
            for _ in 0..20 {
                let resp = client
                    .get(format!("http://{addr}/healthz"))
                    .send()
                    .await
                    .ok()?;
                if resp.status() == 200 {
                    names.insert(resp.headers()["x-served-by"].to_str().ok()?.to_owned());
                }
            }
            (names.len() == 2).then_some(names)
        }
    })
    .await;
    assert_eq!(served_by.len(), 2);
    let upstreams: serde_json::Value =
        holdfast_testkit::process::get_json(&client, &format!("http://{ops}/ops/upstreams")).await;
    let listed = upstreams.to_string();
    assert!(
        listed.contains(&first_addr.to_string()),
        "{listed} lacks {first_addr}"
    );
    assert!(
        listed.contains(&format!("127.0.0.1:{}", second_addr.port())),
        "{listed} lacks the resolved {by_name}"
    );

    let probe = |url: String| {
        std::process::Command::new(BIN)
            .args(["probe", &url, "--timeout", "2s"])
            .output()
            .unwrap()
    };
    assert!(probe(format!("http://{first_addr}/readyz"))
        .status
        .success());
    let refused = probe(format!("http://{first_addr}/no-such-page"));
    assert_eq!(refused.status.code(), Some(1), "a 404 is not healthy");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("404"));
    drop(first);
    let gone = probe(format!("http://{first_addr}/readyz"));
    assert_eq!(
        gone.status.code(),
        Some(1),
        "nothing listening is not healthy"
    );
}

fn listening(proc: &Proc) -> std::net::SocketAddr {
    let line = proc.line_after("HOLDFAST_LISTENING ", Duration::from_secs(20));
    line.split_once(" ops=").unwrap().0.parse().unwrap()
}
