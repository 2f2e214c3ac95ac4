//! `holdfast drill --faults lose-primary`: under load, the whole node (`up`, its instances,
//! workers and the backup's Litestream) is SIGKILLed and its data directory destroyed; a
//! fresh node is restored from the continuous backup onto the same address and users keep
//! shopping. And `--sabotage corrupt-backup` (the backup damaged before the restore reads it)
//! must fail the drill, saying why. On SQLite (Litestream, `scripts/install-backup-tools.sh`)
//! and on Postgres (the drill's own cluster: base backup and WAL, `pg_amcheck`;
//! `scripts/install-drill-deps.sh`).

use holdfast_testkit::process::{
    have_tool, postgres_server_binaries_or_skip, run_drill, small_drill_args as args,
};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");
const INSTALL: &str = "scripts/install-backup-tools.sh";

/// One drill at a time: two systems at once would only measure this machine's two cores.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn a_lost_node_is_restored_from_its_backup_and_users_keep_shopping() {
    if !have_tool("litestream", INSTALL) {
        return;
    }
    lose_and_restore(&[], "integrity_check ok");
}

#[test]
fn a_lost_postgres_node_is_restored_from_its_base_backup_and_wal() {
    if !postgres_server_binaries_or_skip() {
        return;
    }
    lose_and_restore(&["--backend", "postgres"], "pg_amcheck ok");
}

/// The `lose-primary` drill with `engine` flags, whose restore must say `checked`.
fn lose_and_restore(engine: &[&str], checked: &str) {
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let mut more = vec!["--faults", "lose-primary"];
    more.extend_from_slice(engine);
    let (out, r, html) = run_drill(BIN.as_ref(), dir.path(), "lose-primary", &args(&more));
    assert_eq!(r["verdict"], "pass", "violated: {}", r["violated"]);
    assert!(out.status.success());
    let fault = &r["faults"][0];
    assert_eq!(fault["kind"], "lose-primary", "{fault}");
    assert_eq!(fault["applied"], true, "{fault}");
    let restore = &r["restore"];
    assert_eq!(restore["integrity_ok"], true, "{restore}");
    let rto = restore["rto_s"].as_f64().unwrap();
    assert!(rto > 0.0 && rto < 30.0, "RTO {rto} s");
    assert!(
        restore["rpo_ms"].as_u64().unwrap() <= restore["loss_window_ms"].as_u64().unwrap(),
        "{restore}"
    );
    // Every order the restore lost is listed by id, and was acknowledged inside the window.
    for lost in restore["orders_lost"].as_array().unwrap() {
        assert!(
            lost["order_id"].as_str().is_some_and(|id| !id.is_empty()),
            "{lost}"
        );
    }
    let said = restore["said"].as_str().unwrap();
    assert!(
        said.contains("reconciled"),
        "the restore reconciled with the provider: {restore}"
    );
    assert!(said.contains(checked), "{said}");
    // Users kept shopping: orders were acknowledged after the loss too.
    let lost_at = restore["rto_s"].as_f64().unwrap();
    assert!(lost_at > 0.0);
    assert!(
        r["orders_acknowledged"].as_u64().unwrap() > 10,
        "{}",
        r["orders_acknowledged"]
    );
    assert!(html.contains("lose-primary"));
}

#[test]
fn a_corrupt_backup_fails_the_restore_drill_and_says_why() {
    if !have_tool("litestream", INSTALL) {
        return;
    }
    corrupt_backup(&[], "restoring from");
}

#[test]
fn a_corrupt_postgres_backup_fails_the_restore_drill_and_says_why() {
    if !postgres_server_binaries_or_skip() {
        return;
    }
    corrupt_backup(&["--backend", "postgres"], "pg_verifybackup");
}

/// The `corrupt-backup` sabotage with `engine` flags: the drill fails, and its reason names
/// `why_names`.
fn corrupt_backup(engine: &[&str], why_names: &str) {
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let mut more = vec!["--faults", "none", "--sabotage", "corrupt-backup"];
    more.extend_from_slice(engine);
    let (out, r, _) = run_drill(BIN.as_ref(), dir.path(), "corrupt-backup", &args(&more));
    assert!(!out.status.success(), "the drill must fail");
    assert_eq!(r["verdict"], "fail");
    let violated = holdfast_testkit::process::violated(&r);
    assert!(violated.contains(&"restore_failed"), "{violated:?}");
    let why = r["violations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["invariant"] == "restore_failed")
        .map(|v| v["detail"].as_str().unwrap().to_owned())
        .unwrap();
    assert!(
        why.contains("was not restored") && why.contains(why_names),
        "{why}"
    );
}
