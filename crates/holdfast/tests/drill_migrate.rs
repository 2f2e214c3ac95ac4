//! `holdfast drill --faults migrate` on Postgres: the shop's change `cart_lines` runs phase by
//! phase under load while a long reader sits on the old table and the web instances roll from
//! the release before the change to this one. Its own test binary, so it does not share the
//! two cores with the other drills.

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

#[test]
fn the_migrate_drill_changes_the_schema_under_load_without_an_error() {
    if !holdfast_testkit::process::postgres_server_binaries_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (out, r, _) = holdfast_testkit::process::run_drill(
        BIN.as_ref(),
        dir.path(),
        "migrate",
        &[
            "--backend",
            "postgres",
            "--faults",
            "migrate",
            "--duration",
            "30s",
            "--users",
            "16",
            "--think-time",
            "100ms",
            "--instances",
            "2",
            "--workers",
            "1",
            "--seed",
            "5",
            "--no-alerts",
        ],
    );
    // Every invariant held: no cart line lost or doubled while both shapes served.
    assert_eq!(r["verdict"], "pass", "violated: {}", r["violated"]);
    assert!(out.status.success());
    assert_eq!(r["cart_items_lost"], 0);
    let m = &r["migration"];
    let phases: Vec<&str> = m["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        [
            "expand",
            "backfill",
            "switch-reads",
            "switch-writes",
            "contract"
        ]
    );
    assert_eq!(m["rolled"], 2, "both web instances rolled to this release");
    assert_eq!(m["server_errors"], 0, "{m:#}");
    assert_eq!(m["transport_errors"], 0, "{m:#}");
    // The long reader was there, and the guard turned the contract away rather than letting
    // it queue the table's users behind it.
    assert!(m["reader_held_s"].as_f64().unwrap() > 0.0, "{m:#}");
    let contract = &m["phases"][4];
    assert!(contract["lock_retries"].as_u64().unwrap() >= 2, "{m:#}");
    let wait = m["longest_lock_wait_ms"].as_f64().unwrap();
    assert!(wait < 1000.0, "longest lock wait {wait} ms");
    for p in m["phases"].as_array().unwrap().iter().take(4) {
        let ms = p["rollback_ms"].as_u64().unwrap();
        assert!(ms <= 5000, "rolling back {} took {ms} ms", p["phase"]);
    }
    // The p99 goal is reported, not asserted: on two shared cores it measures the machine.
    assert!(m["p99_change_pct"].is_number());
}
