//! `--graphite` against a real carbon (Debian's graphite-carbon): the figures `/metrics` serves
//! arrive as Graphite series, stored by carbon in whisper files and read back with
//! `whisper-fetch`.
//!
//! Needs carbon-cache (`scripts/install-ops-tools.sh`, which `.ci/run` runs): under `CI=true`
//! its absence is a failure; elsewhere the test says so and passes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use holdfast_testkit::process::{client, eventually, have_tool, status, Proc};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Every whisper file under `dir`, as paths relative to it.
fn whisper_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "wsp") {
                found.push(path.strip_prefix(dir).unwrap().to_owned());
            }
        }
    }
    found
}

/// The values stored in one whisper file (`whisper-fetch` prints `time<TAB>value|None`).
fn stored_values(file: &Path) -> Vec<f64> {
    let out = std::process::Command::new("whisper-fetch")
        .args(["--from", "0"])
        .arg(file)
        .output()
        .expect("running whisper-fetch");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect()
}

#[tokio::test]
async fn an_instance_pushes_its_figures_to_a_real_carbon() {
    if !have_tool("carbon-cache", "scripts/install-ops-tools.sh") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (line_port, pickle_port, query_port) = (free_port(), free_port(), free_port());
    let conf = format!(
        "[cache]\nSTORAGE_DIR = {root}\nLOCAL_DATA_DIR = {root}/whisper\nWHITELISTS_DIR = {root}\n\
         CONF_DIR = {root}\nLOG_DIR = {root}/log\nPID_DIR = {root}\n\
         LINE_RECEIVER_INTERFACE = 127.0.0.1\nLINE_RECEIVER_PORT = {line_port}\n\
         PICKLE_RECEIVER_INTERFACE = 127.0.0.1\nPICKLE_RECEIVER_PORT = {pickle_port}\n\
         CACHE_QUERY_INTERFACE = 127.0.0.1\nCACHE_QUERY_PORT = {query_port}\n\
         ENABLE_UDP_LISTENER = False\nMAX_CREATES_PER_MINUTE = inf\n\
         MAX_UPDATES_PER_SECOND = inf\nENABLE_TAGS = False\n",
        root = root.display()
    );
    std::fs::write(root.join("carbon.conf"), conf).unwrap();
    std::fs::write(
        root.join("storage-schemas.conf"),
        "[everything]\npattern = .*\nretentions = 1s:1h\n",
    )
    .unwrap();
    let config = format!("--config={}", root.join("carbon.conf").display());
    let _carbon = Proc::spawn(
        "carbon-cache".as_ref(),
        &[&config, "--nodaemon", "--logfile=-", "start"],
    );
    eventually(Duration::from_secs(30), "carbon to listen", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", line_port))
            .await
            .ok()
            .map(drop)
    })
    .await;

    let data = root.join("holdfast");
    let target = format!("127.0.0.1:{line_port}");
    let serve = Proc::spawn(
        BIN.as_ref(),
        &[
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--insecure-cookies",
            "--migrate",
            "--graphite",
            &target,
            "--graphite-every",
            "1s",
        ],
    );
    let line = serve.line_after("HOLDFAST_LISTENING ", Duration::from_secs(20));
    let addr = line.split_once(" ops=").unwrap().0.to_owned();
    let http = client();
    for _ in 0..3 {
        assert_eq!(
            status(&http, &format!("http://{addr}/healthz")).await,
            Some(200)
        );
    }

    let whisper = root.join("whisper");
    let instance = addr.replace(['.', ':'], "_");
    let requests = format!("holdfast/web/{instance}/holdfast_http_requests_total");
    let workers = PathBuf::from(format!(
        "holdfast/web/{instance}/holdfast_runtime_workers.wsp"
    ));
    let files = eventually(Duration::from_secs(30), "the series in carbon", || {
        let whisper = whisper.clone();
        let (requests, workers) = (requests.clone(), workers.clone());
        async move {
            let files = whisper_files(&whisper);
            let healthz = files.iter().find(|f| {
                let f = f.to_string_lossy();
                f.starts_with(&requests) && f.contains("route__healthz") && f.contains("status_200")
            })?;
            let served = stored_values(&whisper.join(healthz));
            let threads = stored_values(&whisper.join(&workers));
            (served.iter().any(|v| *v >= 3.0) && threads.iter().any(|v| *v >= 1.0)).then_some(files)
        }
    })
    .await;
    // The families exported at zero arrive too: a dashboard can draw them before any event.
    assert!(
        files
            .iter()
            .any(|f| f.to_string_lossy().contains("holdfast_store_retries_total")),
        "{files:?}"
    );
}
