//! `holdfast jobs` as an operator runs it (the runbook's "Payments and receipts" commands):
//! tables for people, `--json` for machines, and a clear refusal — never an empty answer — when
//! pointed at the wrong place or at a job that does not exist.

use std::path::Path;
use std::process::{Command, Output};

use holdfast_store::{JobInsert, Store, StoreOptions};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

fn jobs(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("jobs")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .output()
        .expect("running holdfast jobs")
}

fn said(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn operator_commands_list_redrive_and_refuse_what_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();

    // A mistyped data dir is an error naming the file it looked for, and creates nothing.
    let typo = dir.path().join("holdfast-dta");
    let out = jobs(&typo, &["stats"]);
    let (_, err) = said(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("no database at") && err.contains("holdfast-dta"),
        "{err}"
    );
    assert!(!typo.exists(), "the typo'd directory was created");

    // A store with one dead payout and one waiting receipt.
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let url = holdfast_store::testing::sqlite_url(&data);
    let store = Store::open(&StoreOptions::new(&url).schema(&holdfast_shop::SCHEMA))
        .await
        .unwrap();
    let now = holdfast_core::now_ms();
    let payout = JobInsert {
        max_attempts: 1,
        run_at: now,
        ..JobInsert::new("payments", "payout", "{}".to_owned())
    };
    let receipt = JobInsert {
        run_at: now,
        ..JobInsert::new("email", "receipt_email", "{}".to_owned())
    };
    store.job_enqueue(&payout).await.unwrap();
    store.job_enqueue(&receipt).await.unwrap();
    let claimed = store
        .job_claim(
            "payments",
            "test",
            1,
            now,
            std::time::Duration::from_secs(10),
        )
        .await
        .unwrap();
    store
        .job_fail(claimed[0].fence(), "provider said no", None, now)
        .await
        .unwrap();
    store.close().await;
    let dead_id = claimed[0].id.to_string();

    let (table, _) = said(&jobs(&data, &["stats"]));
    assert!(table.starts_with("queue"), "{table}");
    let payments = table.lines().find(|l| l.starts_with("payments")).unwrap();
    assert_eq!(
        payments.split_whitespace().collect::<Vec<_>>(),
        ["payments", "0", "0", "1", "0"]
    );
    let json: serde_json::Value =
        serde_json::from_slice(&jobs(&data, &["stats", "--json"]).stdout).unwrap();
    assert!(json
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["queue"] == "email" && c["state"] == "available"));

    let (dead, _) = said(&jobs(&data, &["dead"]));
    assert!(
        dead.contains("provider said no") && dead.contains(&dead_id),
        "{dead}"
    );

    // An unknown id is an error; the real one is redriven; then there is nothing left to do.
    let out = jobs(&data, &["redrive", "99999"]);
    assert!(!out.status.success());
    assert!(
        said(&out).1.contains("no dead job with id 99999"),
        "{:?}",
        said(&out)
    );
    let out = jobs(&data, &["redrive", &dead_id]);
    assert!(out.status.success());
    assert_eq!(said(&out).0.trim(), format!("redriven: job {dead_id}"));
    assert_eq!(said(&jobs(&data, &["dead"])).0.trim(), "no dead jobs");
    let out = jobs(&data, &["redrive"]);
    assert!(out.status.success());
    assert_eq!(said(&out).0.trim(), "no dead jobs to redrive");

    // `holdfast status` says plainly that nothing runs here, and what the queue holds.
    let out = Command::new(BIN)
        .args(["status", "--data-dir"])
        .arg(&data)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let (screen, err) = said(&out);
    assert!(out.status.success(), "{err}");
    assert!(screen.starts_with("holdfast up is not running"), "{screen}");
    assert!(
        screen.contains("payments") && screen.contains("email"),
        "{screen}"
    );
    let out = Command::new(BIN)
        .args(["status", "--data-dir"])
        .arg(&typo)
        .output()
        .unwrap();
    assert!(!out.status.success() && said(&out).1.contains("no database at"));
}
