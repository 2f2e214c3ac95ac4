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
