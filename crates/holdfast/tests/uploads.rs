//! A real tus client against the real system: `tus-js-client` from npm (installed by
//! `crates/holdfast-uploads/scripts/install-peers.sh`, driven through
//! `tests/node/tus_upload.js`) uploads a video review through `holdfast up`'s balancer, and
//! the instance taking its PATCH is SIGKILLed mid-body. The client must resume the same upload
//! on the other instance and finish it with the bytes it sent — and nothing on our side knows
//! which client it is.
//!
//! Without node or the package the test is skipped with a note; under `CI=true` it fails.

use holdfast_faultproxy::{FaultProxy, ProxySpec, Stream, Toxic, ToxicSpec};
use holdfast_testkit::system::{spawn_system, web_pids};
use holdfast_testkit::Backend;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");
const INSTALL: &str = "crates/holdfast-uploads/scripts/install-peers.sh";

/// Where the npm packages are, or `None` (skip) when node or tus-js-client is missing.
fn node_modules() -> Option<std::path::PathBuf> {
    let modules =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../holdfast-uploads/tools/node/node_modules");
    let node = std::process::Command::new("node").arg("--version").output();
    let missing = if !node.is_ok_and(|out| out.status.success()) {
        "node is not on PATH"
    } else if !modules.join("tus-js-client/package.json").exists() {
        "tus-js-client is not installed"
    } else {
        return Some(modules);
    };
    assert!(
        !holdfast_store::testing::in_ci(),
        "{missing}: run {INSTALL} (CI=true: not skipping)"
    );
    eprintln!("skipping the tus-js-client test: {missing}; run {INSTALL}");
    None
}

/// Signs up, logs in (the cookie, as a header value) and orders `sku`, so that a review of it
/// may be uploaded.
async fn buyer(base: &str, sku: &str) -> String {
    holdfast_testkit::process::buy_through(base, "reviewer@example.com", sku)
        .await
        .session
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tus_js_client_finishes_an_upload_whose_instance_is_killed_mid_patch() {
    let Some(modules) = node_modules() else {
        return;
    };
    let Some(mut system) = spawn_system(
        BIN.as_ref(),
        Backend::Sqlite,
        2,
        "tus_js_client",
        &["--workers", "0"],
    )
    .await
    else {
        return;
    };
    let sku = holdfast_shop::CATALOG[0].sku;
    let cookie = buyer(&system.url, sku).await;
    // The client reaches the balancer through a fault proxy that lets 8 MB/s through, so its
    // one PATCH of 32 MiB is still flowing when its instance dies.
    let proxy = FaultProxy::new();
    let balancer = system.url.trim_start_matches("http://").to_owned();
    let info = proxy
        .add_proxy(ProxySpec::new("shop", "127.0.0.1:0", &balancer))
        .await
        .expect("proxy");
    let throttle = ToxicSpec::new(Toxic::Bandwidth { rate: 8000 }).with_stream(Stream::Upstream);
    proxy
        .add_toxic("shop", throttle)
        .await
        .expect("bandwidth toxic");
    let base = format!("http://{}", info.listen_addr().expect("listening"));

    let bytes: Vec<u8> = (0..32u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("review.bin");
    std::fs::write(&file, &bytes).expect("write the file");
    let mut node = tokio::process::Command::new("node")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node/tus_upload.js"))
        .arg(format!("{base}/api/uploads"))
        .arg(&cookie)
        .arg(&file)
        .arg(sku)
        .env("NODE_PATH", &modules)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn node");
    let mut lines = BufReader::new(node.stdout.take().expect("stdout")).lines();
    let (mut killed, mut acked_at_kill, mut location, mut done) = (None, 0, None, None);
    let (mut offsets, mut answers) = (Vec::new(), Vec::new());
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while let Ok(Ok(Some(line))) = tokio::time::timeout_at(deadline, lines.next_line()).await {
        let said: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
        if let Some(url) = said["url"].as_str() {
            location = Some(url.trim_start_matches(&base).to_owned());
        } else if said["sent"].is_u64() {
            // Once the server has acknowledged a part (it says so to HEAD), kill the instance
            // still writing the PATCH.
            let (None, Some(at)) = (killed, &location) else {
                continue;
            };
            let head = http
                .head(format!("{}{at}", system.url))
                .header("cookie", &cookie)
                .header("tus-resumable", "1.0.0")
                .send()
                .await
                .expect("HEAD");
            let acked: u64 = head.headers()["upload-offset"]
                .to_str()
                .ok()
                .and_then(|v| v.parse().ok())
                .expect("an offset");
            if acked == 0 || acked == bytes.len() as u64 {
                continue;
            }
            if let Some(pid) = holdfast_drill::uploads::writing_under(
                &web_pids(&system),
                &system.data_dir().join("uploads"),
            ) {
                assert!(
                    system.signal(pid, nix::sys::signal::Signal::SIGKILL),
                    "kill {pid}"
                );
                (killed, acked_at_kill) = (Some(pid), acked);
            }
        } else if let Some(offset) = said["head_offset"].as_u64() {
            offsets.push(offset);
        } else if let Some(answer) = said["answer"].as_str() {
            answers.push(answer.to_owned());
        } else if said["done"].is_string() {
            done = location.clone();
            break;
        } else {
            panic!("tus-js-client failed: {line} (answers: {answers:?})");
        }
    }
    let url = done.unwrap_or_else(|| panic!("tus-js-client did not finish (answers: {answers:?})"));
    let victim = killed.expect("the instance writing the upload was killed mid-PATCH");
    assert!(!web_pids(&system).contains(&victim), "{victim} is gone");
    assert!(
        answers.iter().any(|a| a.starts_with("PATCH 50")),
        "the PATCH in flight failed: {answers:?}"
    );
    // It resumed the same upload (a new one would start over at 0 and ask no HEAD), from
    // no earlier than what the server had acknowledged before the kill.
    assert!(
        !offsets.is_empty(),
        "the client asked where the upload stood: {answers:?}"
    );
    assert!(
        offsets.windows(2).all(|w| w[0] <= w[1]),
        "no acknowledged offset went backwards: {offsets:?}"
    );
    let resumed = offsets[0];
    eprintln!("killed {victim} with {acked_at_kill} bytes acknowledged; resumed at {resumed}; answers {answers:?}; HEAD offsets {offsets:?}");
    assert!(
        resumed >= acked_at_kill,
        "resumed at {resumed}, but {acked_at_kill} were acknowledged before the kill"
    );

    let got = reqwest::Client::new()
        .get(format!("{}{url}", system.url))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("download");
    assert_eq!(got.status(), 200);
    let got = got.bytes().await.expect("body");
    assert_eq!(
        hex::encode(Sha256::digest(&got)),
        hex::encode(Sha256::digest(&bytes)),
        "the bytes sent"
    );
    system.stop().await;
}
