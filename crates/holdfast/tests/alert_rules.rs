//! The alert rules shipped in `ops/prometheus/` are code, and tested like code: `promtool`
//! checks them and runs their unit tests (`holdfast.rules.test.yml`), every alert has a test
//! in which it fires, and every alert's runbook anchor is a section of `docs/RUNBOOK.md`.
//!
//! Needs promtool (`scripts/install-ops-tools.sh`, which `.ci/run` runs): under `CI=true` its
//! absence is a failure; elsewhere the test says so and passes.

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn alerts(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(|n| n.trim().to_owned())
        .collect()
}

#[test]
fn every_alert_fires_in_a_test_and_has_a_runbook_section() {
    let dir = repo().join("ops/prometheus");
    let rules = std::fs::read_to_string(dir.join("holdfast.rules.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("holdfast.rules.test.yml")).unwrap();
    let runbook = std::fs::read_to_string(repo().join("docs/RUNBOOK.md")).unwrap();
    let names = alerts(&rules);
    assert!(names.len() >= 10, "{names:?}");
    for name in &names {
        let fires = format!("alertname: {name}\n        exp_alerts:\n          - ");
        assert!(tests.contains(&fires), "no test in which {name} fires");
        let quiet = format!("alertname: {name}, exp_alerts: [] }}");
        assert!(
            tests.contains(&quiet),
            "no test in which {name} stays quiet"
        );
        let anchor = format!("docs/RUNBOOK.md#alert-{}", name.to_lowercase());
        assert!(rules.contains(&anchor), "{name} does not link {anchor}");
        assert!(
            runbook.contains(&format!("### Alert: {name}\n")),
            "docs/RUNBOOK.md has no section for {name}"
        );
    }
}

#[test]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    if !holdfast_testkit::process::have_tool("promtool", "scripts/install-ops-tools.sh") {
        return;
    }
    let dir = repo().join("ops/prometheus");
    for args in [
        ["check", "rules", "holdfast.rules.yml"],
        ["test", "rules", "holdfast.rules.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
