//! A drill without faults raises no alert: the shipped rules (ops/prometheus) speak up for
//! faults — `tests/drill.rs` shows each fault raising its alert — not for a healthy system.
//! Its own test binary, so it does not share the machine with the other drills: "healthy"
//! here means users at a human pace (think time), arriving over a few seconds rather than all
//! signing up in the same instant, on a machine doing nothing else.
//!
//! Needs prometheus (`scripts/install-ops-tools.sh`, which `.ci/run` runs): under `CI=true`
//! its absence is a failure; elsewhere the test says so and passes.

use holdfast_testkit::process::{have_tool, run_drill};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

#[test]
fn a_drill_without_faults_raises_no_alert() {
    if !have_tool("prometheus", "scripts/install-ops-tools.sh") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--duration",
        "15s",
        "--users",
        "16",
        "--think-time",
        "300ms",
        "--ramp-up",
        "5s",
        "--faults",
        "none",
        "--seed",
        "5",
    ];
    let (out, r, _) = run_drill(BIN.as_ref(), dir.path(), "clean", &args);
    assert_eq!(r["verdict"], "pass", "violated: {}", r["violated"]);
    assert!(out.status.success());
    assert_eq!(r["alerts"]["status"], "checked", "{}", r["alerts"]);
    assert_eq!(
        r["alerts"]["fired"],
        serde_json::json!([]),
        "{}",
        r["alerts"]
    );
    assert_eq!(r["alerts_on_clean_run"], 0);
}
