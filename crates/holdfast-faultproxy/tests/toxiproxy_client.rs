//! A real Toxiproxy client drives the proxy: the npm package `toxiproxy-node-client`
//! (installed by `scripts/install-peers.sh`), through `tests/node/toxiproxy_client.js`.
//! Effects are checked from Rust, through the proxy.
//!
//! Without node or the package the test is skipped with a note; under `CI=true` it fails.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use holdfast_faultproxy::FaultProxy;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

const INSTALL: &str = "crates/holdfast-faultproxy/scripts/install-peers.sh";

struct NodeClient {
    _child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl NodeClient {
    /// The client talking to `api_url`, or `None` when it cannot run here (skip).
    async fn start(api_url: &str) -> Option<NodeClient> {
        let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let modules = crate_dir.join("tools/node/node_modules");
        let node = Command::new("node").arg("--version").output().await;
        let missing = if !node.is_ok_and(|out| out.status.success()) {
            Some("node is not on PATH")
        } else if !modules.join("toxiproxy-node-client/package.json").exists() {
            Some("toxiproxy-node-client is not installed")
        } else {
            None
        };
        if let Some(missing) = missing {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(!ci, "{missing}: run {INSTALL} (CI=true: not skipping)");
            eprintln!("skipping the npm Toxiproxy client test: {missing}; run {INSTALL}");
            return None;
        }
        let mut child = Command::new("node")
            .arg(crate_dir.join("tests/node/toxiproxy_client.js"))
            .arg(api_url)
            .env("NODE_PATH", &modules)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn node");
        Some(NodeClient {
            stdin: child.stdin.take().unwrap(),
            stdout: BufReader::new(child.stdout.take().unwrap()).lines(),
            _child: child,
        })
    }

    /// Runs one client operation; panics with the client's error if it failed.
    async fn call(&mut self, command: Value) -> Value {
        let line = format!("{command}\n");
        self.stdin.write_all(line.as_bytes()).await.unwrap();
        let answer = within("node client", self.stdout.next_line())
            .await
            .unwrap();
        let answer: Value = serde_json::from_str(&answer.expect("node client exited")).unwrap();
        if let Some(error) = answer.get("error") {
            panic!("node client: {command} failed: {error}");
        }
        answer["ok"].clone()
    }
}

#[tokio::test]
async fn the_npm_toxiproxy_client_drives_the_proxy() {
    let fp = FaultProxy::new();
    let url = serve_api(&fp).await;
    let Some(mut client) = NodeClient::start(&url).await else {
        return;
    };
    let upstream = echo_server().await.to_string();

    let version = client.call(json!({"op": "version"})).await;
    assert!(version.as_str().unwrap().contains("\"2."), "{version}");
    let body = json!({"name": "redis", "listen": "127.0.0.1:0", "upstream": upstream});
    let proxy = client
        .call(json!({"op": "createProxy", "body": body}))
        .await;
    let addr: SocketAddr = proxy["listen"].as_str().unwrap().parse().unwrap();
    assert_ne!(addr.port(), 0);
    let mut conn = connect(addr).await;
    round_trip(&mut conn, b"ping").await;

    let latency = Duration::from_millis(300);
    let toxic = json!({"name": "slow", "type": "latency", "stream": "downstream",
        "toxicity": 1, "attributes": {"latency": 300, "jitter": 0}});
    let added = client
        .call(json!({"op": "addToxic", "proxy": "redis", "body": toxic}))
        .await;
    assert_eq!(added["name"], "slow");
    assert!(round_trip(&mut conn, b"slow").await >= latency);
    client
        .call(json!({"op": "removeToxic", "proxy": "redis", "name": "slow"}))
        .await;
    assert!(round_trip(&mut conn, b"fast").await < latency);

    let cut = json!({"op": "updateProxy", "name": "redis", "changes": {"enabled": false}});
    assert_eq!(client.call(cut).await["enabled"], false);
    assert!(read_until_closed(&mut conn).await.0.is_empty());
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "connect must be refused"
    );

    let restore = json!({"op": "updateProxy", "name": "redis", "changes": {"enabled": true}});
    let proxy = client.call(restore).await;
    assert_eq!(proxy["listen"], addr.to_string());
    round_trip(&mut connect(addr).await, b"back").await;

    client.call(json!({"op": "reset"})).await;
    let all = client.call(json!({"op": "getAll"})).await;
    assert_eq!(all["redis"]["enabled"], true);
}
