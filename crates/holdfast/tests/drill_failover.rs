//! `holdfast drill --backend postgres --faults promote-standby`: under load, the database's
//! primary is stopped at once and its streaming standby promoted; `up`, given both hosts,
//! follows, users keep shopping, and nothing acknowledged is lost outside the window the
//! asynchronous replication allows. Needs the PostgreSQL server binaries
//! (`scripts/install-drill-deps.sh`).

use holdfast_testkit::process::{postgres_server_binaries_or_skip, run_drill, small_drill_args};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

#[test]
fn the_system_follows_a_promoted_standby_and_keeps_what_it_acknowledged() {
    if !postgres_server_binaries_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (out, r, html) = run_drill(
        BIN.as_ref(),
        dir.path(),
        "promote-standby",
        &small_drill_args(&["--backend", "postgres", "--faults", "promote-standby"]),
    );
    assert_eq!(r["verdict"], "pass", "violated: {}", r["violated"]);
    assert!(out.status.success());
    let fault = &r["faults"][0];
    assert_eq!(fault["kind"], "promote-standby", "{fault}");
    assert_eq!(fault["applied"], true, "{fault}");
    let failover = &r["failover"];
    let back = failover["writes_back_s"]
        .as_f64()
        .unwrap_or_else(|| panic!("no order was acknowledged after the flip: {failover}"));
    assert!(back < 5.0, "writes came back after {back} s");
    for lost in failover["orders_lost"].as_array().unwrap() {
        assert_eq!(lost["excused"], true, "{lost}");
    }
    assert!(html.contains("promote-standby"));
}
