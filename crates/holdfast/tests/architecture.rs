//! The architecture's invariants about who depends on whom, checked over the real crate graph
//! (`cargo metadata` for what the crates declare, `cargo tree` for what the production binary
//! links with its features), so that they cannot silently rot:
//!
//! - the generic crates know nothing of the shop or its payment provider;
//! - `holdfast-core` knows nothing of axum, sqlx, tokio or HTTP;
//! - the drill links no server crate, so it can judge any build from the outside;
//! - the production binary links none of the peers the benchmarks measure against.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

/// Crates that must not know the reference application.
const GENERIC: &[&str] = &[
    "holdfast-core",
    "holdfast-http",
    "holdfast-store",
    "holdfast-jobs",
    "holdfast-web",
    "holdfast-sessions",
    "holdfast-cache",
    "holdfast-uploads",
];
const APPLICATION: &[&str] = &["holdfast-shop", "holdfast-provider"];
const SERVER_CRATES: &[&str] = &[
    "holdfast-store",
    "holdfast-web",
    "holdfast-shop",
    "holdfast-jobs",
    "holdfast-sessions",
    "holdfast-cache",
    "holdfast-provider",
    "holdfast-balancer",
    "holdfast-uploads",
];
const IO_AND_HTTP: &[&str] = &["axum", "sqlx", "tokio", "hyper", "http", "reqwest"];
/// What `holdfast-bench` measures against.
const PEERS: &[&str] = &[
    "moka",
    "tower-sessions",
    "tower-sessions-core",
    "tower-sessions-redis-store",
    "fred",
    "apalis",
];

/// Declared normal (non-dev, non-build) dependencies of each workspace member, by name.
type Graph = BTreeMap<String, BTreeSet<String>>;

/// `cargo ARGS --offline`'s stdout (it must succeed).
fn cargo(args: &[&str]) -> Vec<u8> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .arg("--offline")
        .output()
        .expect("running cargo");
    assert!(
        out.status.success(),
        "cargo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn workspace_graph() -> Graph {
    let out = cargo(&["metadata", "--format-version", "1", "--no-deps"]);
    let meta: Value = serde_json::from_slice(&out).expect("metadata JSON");
    let mut graph = Graph::new();
    for pkg in meta["packages"].as_array().expect("packages") {
        let deps = pkg["dependencies"]
            .as_array()
            .expect("dependencies")
            .iter()
            .filter(|d| d["kind"].is_null())
            .map(|d| d["name"].as_str().expect("a name").to_owned())
            .collect();
        graph.insert(pkg["name"].as_str().expect("a name").to_owned(), deps);
    }
    graph
}

/// Every path from `from` to a crate in `forbidden` through declared normal dependencies
/// (workspace members are followed; other crates are leaves).
fn forbidden_paths(graph: &Graph, from: &str, forbidden: &[&str]) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let mut stack = vec![vec![from.to_owned()]];
    while let Some(path) = stack.pop() {
        let last = path.last().expect("a path has a crate");
        for dep in graph.get(last).into_iter().flatten() {
            if path.contains(dep) {
                continue;
            }
            let mut next = path.clone();
            next.push(dep.clone());
            if forbidden.contains(&dep.as_str()) {
                found.push(next);
            } else if graph.contains_key(dep) {
                stack.push(next);
            }
        }
    }
    found
}

fn assert_none(graph: &Graph, crates: &[&str], forbidden: &[&str], rule: &str) {
    let broken: Vec<String> = crates
        .iter()
        .flat_map(|c| forbidden_paths(graph, c, forbidden))
        .map(|p| p.join(" -> "))
        .collect();
    assert!(broken.is_empty(), "{rule}:\n{}", broken.join("\n"));
}

#[test]
fn the_generic_crates_know_nothing_of_the_shop() {
    let graph = workspace_graph();
    for c in GENERIC
        .iter()
        .chain(APPLICATION)
        .chain(["holdfast", "holdfast-drill"].iter())
    {
        assert!(graph.contains_key(*c), "{c} is a workspace member");
    }
    assert_none(
        &graph,
        GENERIC,
        APPLICATION,
        "a generic crate depends on the application",
    );
}

#[test]
fn the_core_knows_nothing_of_io_or_http() {
    assert_none(
        &workspace_graph(),
        &["holdfast-core"],
        IO_AND_HTTP,
        "holdfast-core does I/O",
    );
}

#[test]
fn the_drill_links_no_server_crate() {
    assert_none(
        &workspace_graph(),
        &["holdfast-drill"],
        SERVER_CRATES,
        "the drill links a server crate",
    );
}

/// What the release binary links, with the features it is built with (`cargo tree`, normal
/// edges only): none of the peers.
#[test]
fn the_production_binary_links_no_peer() {
    let tree = [
        "tree", "-p", "holdfast", "-e", "normal", "--prefix", "none", "--format", "{p}",
    ];
    let out = cargo(&tree);
    let linked: BTreeSet<String> = String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    assert!(
        linked.contains("holdfast-shop"),
        "the tree is the binary's: {linked:?}"
    );
    let peers: Vec<&String> = linked
        .iter()
        .filter(|c| {
            PEERS
                .iter()
                .any(|p| c.as_str() == *p || c.starts_with("apalis"))
        })
        .collect();
    assert!(
        peers.is_empty(),
        "the production binary links peers: {peers:?}"
    );
}

/// The checker finds a planted violation, however deep.
#[test]
fn a_planted_dependency_is_found() {
    let mut graph = Graph::new();
    let deps = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect();
    graph.insert("holdfast-web".into(), deps(&["holdfast-store", "axum"]));
    graph.insert("holdfast-store".into(), deps(&["holdfast-core", "sqlx"]));
    graph.insert("holdfast-core".into(), deps(&["rand"]));
    assert!(forbidden_paths(&graph, "holdfast-web", APPLICATION).is_empty());
    graph.insert("holdfast-core".into(), deps(&["rand", "holdfast-shop"]));
    graph.insert("holdfast-shop".into(), deps(&["holdfast-web"]));
    assert_eq!(
        forbidden_paths(&graph, "holdfast-web", APPLICATION),
        vec![vec![
            "holdfast-web",
            "holdfast-store",
            "holdfast-core",
            "holdfast-shop"
        ]]
    );
}
