//! The container image is a deliverable, so CI builds it and runs it: `scripts/build-image.sh`
//! builds `ops/container/Containerfile` around this test's binary; the container serves
//! `/readyz`, its own `HEALTHCHECK` passes, and `podman stop` (SIGTERM, the image's stop signal)
//! ends it with a clean drain — exit 0, well inside the grace period — rather than a SIGKILL.
//!
//! Needs podman with runc (`scripts/install-container-tools.sh`, which `.ci/run` runs): under
//! `CI=true` their absence is a failure; elsewhere the test says so and passes.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use holdfast_testkit::process::{client, eventually, have_tool, status};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .arg("--runtime")
        .arg("runc")
        .args(args)
        .output()
        .expect("running podman")
}

/// Removes the container and the image however the test ends.
struct Cleanup {
    container: String,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        podman(&["rm", "--force", "--time", "0", &self.container]);
        podman(&["rmi", "--force", &self.image]);
    }
}

#[tokio::test]
async fn the_image_serves_readyz_passes_its_healthcheck_and_drains_on_stop() {
    if !have_tool("podman", "scripts/install-container-tools.sh") {
        return;
    }
    let id = std::process::id();
    let cleanup = Cleanup {
        container: format!("holdfast-test-{id}"),
        image: format!("localhost/holdfast-test:{id}"),
    };
    let built = Command::new("bash")
        .arg(repo().join("scripts/build-image.sh"))
        .args([BIN, &cleanup.image])
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "build-image.sh failed: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let inspect = podman(&["image", "inspect", &cleanup.image]);
    let image: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let config = &image[0]["Config"];
    assert_eq!(config["StopSignal"], "SIGTERM", "{config}");
    assert_eq!(config["User"], "10001:10001", "runs unprivileged: {config}");
    let check = image[0]["Healthcheck"]["Test"].to_string();
    assert!(
        check.contains("probe") && check.contains("/readyz"),
        "{check}"
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let publish = format!("127.0.0.1:{port}:8080");
    // Raising rlimits is refused in some sandboxes (this machine's among them); the engine's
    // defaults would ask for more than the host has, so ask for what any host allows.
    let started = podman(&[
        "run",
        "--detach",
        "--name",
        &cleanup.container,
        "--ulimit",
        "nofile=4096:4096",
        "--ulimit",
        "nproc=4096:4096",
        "--stop-timeout",
        "20",
        "--publish",
        &publish,
        &cleanup.image,
        // The default command, on plain HTTP for the test.
        "serve",
        "--addr",
        "0.0.0.0:8080",
        "--ops-addr",
        "0.0.0.0:9090",
        "--data-dir",
        "/data",
        "--drain-delay",
        "2s",
        "--insecure-cookies",
        "--migrate",
    ]);
    assert!(
        started.status.success(),
        "podman run failed: {}",
        String::from_utf8_lossy(&started.stderr)
    );
    let http = client();
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    eventually(
        Duration::from_secs(30),
        "the container's /readyz",
        || async { (status(&http, &readyz).await == Some(200)).then_some(()) },
    )
    .await;
    let health = podman(&["healthcheck", "run", &cleanup.container]);
    assert!(
        health.status.success(),
        "the image's HEALTHCHECK failed: {} {}",
        String::from_utf8_lossy(&health.stdout),
        String::from_utf8_lossy(&health.stderr)
    );

    let stopping = Instant::now();
    let stopped = podman(&["stop", "--time", "20", &cleanup.container]);
    let took = stopping.elapsed();
    assert!(stopped.status.success());
    let exit = podman(&[
        "inspect",
        "--format",
        "{{.State.ExitCode}}",
        &cleanup.container,
    ]);
    assert_eq!(
        String::from_utf8_lossy(&exit.stdout).trim(),
        "0",
        "SIGTERM drains and exits 0; a SIGKILL after the grace period would be 137"
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(15),
        "the drain delay is kept, the grace period is not needed: {took:?}"
    );
    let logs = podman(&["logs", &cleanup.container]);
    let logs = String::from_utf8_lossy(&logs.stderr);
    assert!(logs.contains("draining"), "{logs}");
}

/// `ops/container/compose.yml` is a valid compose file, and every command it gives the
/// Holdfast image is one this build accepts (each is parsed with `--help` appended: clap
/// rejects an unknown flag or a bad value before it prints help).
#[test]
fn the_compose_file_is_valid_and_its_commands_parse() {
    if !have_tool("podman-compose", "scripts/install-container-tools.sh") {
        return;
    }
    let file = repo().join("ops/container/compose.yml");
    let checked = Command::new("podman-compose")
        .arg("-f")
        .arg(&file)
        .arg("config")
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "podman-compose config: {}",
        String::from_utf8_lossy(&checked.stderr)
    );
    let as_json = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        as_json.status.success(),
        "{}",
        String::from_utf8_lossy(&as_json.stderr)
    );
    let compose: serde_json::Value = serde_json::from_slice(&as_json.stdout).unwrap();
    let services = compose["services"].as_object().unwrap();
    let ours: Vec<(&String, &serde_json::Value)> = services
        .iter()
        .filter(|(_, s)| s["image"] == "localhost/holdfast:latest")
        .collect();
    let names: Vec<&str> = ours.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["balancer", "migrate", "provider", "web", "worker"]);
    for (name, service) in &ours {
        let args: Vec<&str> = service["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let parsed = Command::new(BIN)
            .args(&args)
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            parsed.status.success(),
            "{name}: holdfast {args:?} is refused: {}",
            String::from_utf8_lossy(&parsed.stderr)
        );
    }
    // The operator port is published on loopback only; the instances' :9090 not at all.
    let ports = services["balancer"]["ports"].to_string();
    assert!(
        ports.contains("127.0.0.1:8081:8081") && !ports.contains("9090"),
        "{ports}"
    );
    assert!(services["web"]["ports"].is_null());
    assert_eq!(services["web"]["deploy"]["replicas"], 3);
}
