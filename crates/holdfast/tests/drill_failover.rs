//! `holdfast drill --backend postgres --faults promote-standby`: under load, the database's
//! primary is stopped at once and its streaming standby promoted; `up`, given both hosts,
//! follows, users keep shopping, and nothing acknowledged is lost outside the window the
//! asynchronous replication allows. `--faults fail-replica`: the standby, serving reads, is
//! stopped instead; reads move to the primary and no user misses their own write. Needs the
//! PostgreSQL server binaries (`scripts/install-drill-deps.sh`).
use holdfast_testkit::process::{postgres_server_binaries_or_skip, run_drill, small_drill_args};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

/// A small drill on the drill's own cluster with `fault`, which must pass with the fault
/// applied: its JSON report.
fn drill_passing_with(fault: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let (out, r, html) = run_drill(
        BIN.as_ref(),
        dir.path(),
        fault,
        &small_drill_args(&["--backend", "postgres", "--faults", fault]),
    );
    assert_eq!(r["verdict"], "pass", "violated: {}", r["violated"]);
    assert!(out.status.success());
    let injected = &r["faults"][0];
    assert_eq!(injected["kind"], fault, "{injected}");
    assert_eq!(injected["applied"], true, "{injected}");
    assert!(html.contains(fault));
    r
}

#[test]
fn the_system_follows_a_promoted_standby_and_keeps_what_it_acknowledged() {
    if !postgres_server_binaries_or_skip() {
        return;
    }
    let r = drill_passing_with("promote-standby");
    let failover = &r["failover"];
    let back = failover["writes_back_s"]
        .as_f64()
        .unwrap_or_else(|| panic!("no order was acknowledged after the flip: {failover}"));
    assert!(back < 5.0, "writes came back after {back} s");
    for lost in failover["orders_lost"].as_array().unwrap() {
        assert_eq!(lost["excused"], true, "{lost}");
    }
}

#[test]
fn reads_move_to_the_primary_when_the_standby_dies_and_nobody_reads_a_stale_write() {
    if !postgres_server_binaries_or_skip() {
        return;
    }
    // Passing includes the read-your-writes check: no acknowledged order missing from its
    // owner's later read, with the standby serving order history and then gone.
    let r = drill_passing_with("fail-replica");
    assert_eq!(r["orders_missing_on_read"], 0);
    let lost = &r["replica_lost"];
    assert!(lost["replica_reads_before"].as_u64().unwrap() > 0, "{lost}");
    assert!(lost["primary_reads_after"].as_u64().unwrap() > 0, "{lost}");
}
