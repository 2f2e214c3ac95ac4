//! Backups proven by restoring them: `holdfast up --backup` replicates the SQLite store
//! continuously (Litestream, `scripts/install-backup-tools.sh`); the machine's disk is lost;
//! `holdfast restore` brings the store back on a fresh directory, checked; the system serves
//! the user's orders from it. And every bad input gets one line and touches nothing.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use holdfast_provider::ProviderClient;
use holdfast_testkit::process::{alive, client, eventually, get_text, have_tool, spawn_up, Proc};
use holdfast_testkit::s3::S3Server;
use holdfast_testkit::system::Shopper;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use reqwest::StatusCode;
use serde_json::json;
use sqlx::Connection;

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");
const INSTALL: &str = "scripts/install-backup-tools.sh";

fn litestream_or_skip() -> bool {
    have_tool("litestream", INSTALL)
}

/// `holdfast ARGS` to completion, with `env` set.
fn holdfast(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running holdfast")
}

/// `holdfast restore --backup TARGET --to TO`, to completion.
fn restore_from(target: &Path, to: &Path) -> Output {
    holdfast(
        &["restore", "--backup", path(target), "--to", path(to)],
        &[],
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The one `Error: …` line a failed command printed; panics if it succeeded.
fn refusal(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{}{err}", stdout(out));
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("Error: ")).collect();
    assert_eq!(lines.len(), 1, "one error line: {err}");
    lines[0].to_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// A scratch directory with the paths of a data dir, a backup target and a restore's
/// destination in it (none created).
fn scratch() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let at = |name: &str| root.path().join(name);
    let (data, target, restored) = (at("data"), at("backup"), at("restored"));
    (root, data, target, restored)
}

#[tokio::test]
async fn a_lost_disk_comes_back_from_the_backup_and_serves_the_users_orders() {
    if !litestream_or_skip() {
        return;
    }
    let (root, data, target, restored) = scratch();
    let (up, base, ops, _) = spawn_up(
        BIN.as_ref(),
        &data,
        1,
        &["--workers", "0", "--backup", path(&target)],
    )
    .await;
    let shopper = Shopper::new(&base, "keeper@example.com").await;
    add_first_product(&shopper).await;
    let order_id = buy(&shopper, "keeper-1").await;

    // The operator can force the backup and read its state in one line each.
    let data_flags = ["--backup", path(&target), "--data-dir", path(&data)];
    let now = holdfast(&[&["backup", "now"][..], &data_flags].concat(), &[]);
    assert!(now.status.success(), "{now:?}");
    assert!(
        stdout(&now).starts_with("backed up to "),
        "{}",
        stdout(&now)
    );
    // The replication proves itself every 2 s; its status says so once it has.
    eventually(Duration::from_secs(10), "backup status: ok", || async {
        let status = holdfast(&[&["backup", "status"][..], &data_flags].concat(), &[]);
        (status.status.success() && stdout(&status).starts_with("backup ok: last reached"))
            .then_some(())
    })
    .await;
    // The one status screen says it too.
    let screen = holdfast(&["status", "--data-dir", path(&data)], &[]);
    assert!(stdout(&screen).contains("backup: ok, to "), "{screen:?}");
    let list = holdfast(&[&["backup", "list"][..], &data_flags].concat(), &[]);
    assert!(stdout(&list).contains("restorable from"), "{list:?}");
    // One replication per database: another target, or a second replication, is refused.
    let elsewhere = root.path().join("elsewhere");
    let other = ["--backup", path(&elsewhere), "--data-dir", path(&data)];
    let now_elsewhere = holdfast(&[&["backup", "now"][..], &other].concat(), &[]);
    assert!(
        refusal(&now_elsewhere).contains("runs to"),
        "{now_elsewhere:?}"
    );
    let second = holdfast(&[&["backup", "run"][..], &other].concat(), &[]);
    assert!(refusal(&second).contains("already running"), "{second:?}");
    assert!(
        !elsewhere.exists(),
        "nothing was written to the other target"
    );
    // The operator port says when the backup last proved itself.
    let metrics = get_text(&client(), &format!("{ops}/ops/metrics")).await;
    let proved: f64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("holdfast_backup_last_success_timestamp_seconds{role=\"balancer\"} ")
        })
        .unwrap_or_else(|| panic!("no backup timestamp in\n{metrics}"))
        .parse()
        .unwrap();
    let now_s = holdfast_core::now_ms() as f64 / 1000.0;
    assert!(
        now_s - proved < 30.0,
        "the backup proved itself {}s ago",
        now_s - proved
    );

    // The disk is lost: every process SIGKILLed, the data directory gone. The replication
    // dies with its supervisor.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("run/backup/state.json")).unwrap())
            .unwrap();
    let litestream = state["replicator_pid"].as_u64().expect("litestream's pid") as u32;
    assert!(alive(litestream));
    let _ = kill(Pid::from_raw(up.pid() as i32), Signal::SIGKILL);
    drop(up);
    eventually(
        Duration::from_secs(10),
        "litestream to die with up",
        || async { (!alive(litestream)).then_some(()) },
    )
    .await;
    std::fs::remove_dir_all(&data).unwrap();
    let status = holdfast(&[&["backup", "status"][..], &data_flags].concat(), &[]);
    assert!(
        refusal(&status).contains("backup NOT RUNNING"),
        "{status:?}"
    );

    let restore = restore_from(&target, &restored);
    assert!(restore.status.success(), "{restore:?}");
    let said = stdout(&restore);
    assert!(said.contains("integrity_check ok"), "{said}");
    // Restoring over it again is refused: a restore never writes into a store.
    let again = restore_from(&target, &restored);
    assert!(refusal(&again).contains("is not empty"), "{again:?}");

    let (_up, base, _, _) = spawn_up(BIN.as_ref(), &restored, 1, &["--workers", "0"]).await;
    let shopper = Shopper::new(&base, "keeper@example.com").await;
    let orders = shopper.retrying("GET", "/api/orders", None, None).await;
    assert!(
        orders.body["orders"]
            .as_array()
            .is_some_and(|o| o.iter().any(|o| o["order_id"] == order_id)),
        "the order {order_id} is served from the restored store: {}",
        orders.body
    );
    // The key's answer came back with the store: a retry replays, no second order.
    let retried = shopper
        .retrying("POST", "/api/checkout", None, Some("keeper-1"))
        .await;
    assert!(retried.replayed, "{}", retried.body);
    assert_eq!(retried.body["order_id"], order_id);
}

/// A store with one backup taken by `holdfast backup now` (no replication running): the data
/// dir and the target.
fn store_with_a_backup(root: &Path, target: &str, env: &[(&str, &str)]) -> std::path::PathBuf {
    let data = root.join("data");
    let migrated = holdfast(&["migrate", "up", "--data-dir", path(&data)], &[]);
    assert!(migrated.status.success(), "{migrated:?}");
    let now = holdfast(
        &[
            "backup",
            "now",
            "--backup",
            target,
            "--data-dir",
            path(&data),
        ],
        env,
    );
    assert!(now.status.success(), "{now:?}");
    data
}

#[tokio::test]
async fn every_bad_backup_or_restore_request_gets_one_line_and_touches_nothing() {
    if !litestream_or_skip() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let good = root.path().join("backup");
    store_with_a_backup(root.path(), path(&good), &[]);
    let empty = root.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let foreign = root.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "not a backup").unwrap();
    // A corrupt backup: bytes flipped in every file Litestream wrote.
    let corrupt = root.path().join("corrupt");
    copy_dir(&good, &corrupt);
    for file in files_under(&corrupt) {
        let mut bytes = std::fs::read(&file).unwrap();
        for i in (100..bytes.len()).step_by(97) {
            bytes[i] ^= 0xff;
        }
        std::fs::write(&file, bytes).unwrap();
    }
    let occupied = root.path().join("occupied");
    std::fs::create_dir(&occupied).unwrap();
    std::fs::write(occupied.join("holdfast.sqlite"), "live data").unwrap();
    let to = root.path().join("to");
    let to = path(&to);

    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "a missing backup",
            vec!["--backup", "/nonexistent/backup", "--to", to],
            "no such directory",
        ),
        (
            "an empty backup",
            vec!["--backup", path(&empty), "--to", to],
            "holds no Litestream files",
        ),
        (
            "a foreign backup",
            vec!["--backup", path(&foreign), "--to", to],
            "holds no Litestream files",
        ),
        (
            "a corrupt backup",
            vec!["--backup", path(&corrupt), "--to", to],
            "restoring from",
        ),
        (
            "--at before the first backup",
            vec![
                "--backup",
                path(&good),
                "--to",
                to,
                "--at",
                "2001-01-01T00:00:00Z",
            ],
            "before the first backup",
        ),
        (
            "--at in the future",
            vec![
                "--backup",
                path(&good),
                "--to",
                to,
                "--at",
                "2999-01-01T00:00:00Z",
            ],
            "in the future",
        ),
        (
            "--at that is not a time",
            vec!["--backup", path(&good), "--to", to, "--at", "yesterday"],
            "not an RFC 3339 time",
        ),
        (
            "a target of no known kind",
            vec!["--backup", "gs://bucket", "--to", to],
            "a backup target is",
        ),
        (
            "a destination that is not empty",
            vec!["--backup", path(&good), "--to", path(&occupied)],
            "is not empty",
        ),
    ];
    for (case, args, says) in cases {
        let out = holdfast(&[&["restore"][..], &args].concat(), &[]);
        let line = refusal(&out);
        assert!(line.contains(says), "{case}: {line}");
        assert!(
            !Path::new(to).exists(),
            "{case}: the destination was left behind"
        );
    }
    assert_eq!(
        std::fs::read(occupied.join("holdfast.sqlite")).unwrap(),
        b"live data",
        "a refused restore never touches what is there"
    );
    // Backing up a data dir with no store says so.
    let out = holdfast(
        &[
            "backup",
            "now",
            "--backup",
            path(&good),
            "--data-dir",
            path(&root.path().join("nothing")),
        ],
        &[],
    );
    assert!(refusal(&out).contains("nothing to back up"), "{out:?}");
}

#[tokio::test]
async fn a_backup_to_s3_restores_and_an_unreachable_endpoint_is_one_line() {
    if !litestream_or_skip() {
        return;
    }
    let Some(s3) = S3Server::start("backup_to_s3").await else {
        return;
    };
    let bucket = s3.bucket("backups").await;
    let target = format!("{bucket}/shop");
    let env = s3.aws_env();
    let root = tempfile::tempdir().unwrap();
    store_with_a_backup(root.path(), &target, &env);
    assert!(
        s3.keys("backups")
            .await
            .iter()
            .any(|k| k.starts_with("shop/")),
        "the backup is in the bucket under its prefix"
    );
    let to = root.path().join("restored");
    let restore = holdfast(&["restore", "--backup", &target, "--to", path(&to)], &env);
    assert!(
        stdout(&restore).contains("integrity_check ok"),
        "{restore:?}"
    );
    let refused_to = root.path().join("never");
    let unreachable = [
        ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
    ];
    let out = holdfast(
        &["restore", "--backup", &target, "--to", path(&refused_to)],
        &unreachable,
    );
    assert!(refusal(&out).contains("cannot reach the backup"), "{out:?}");
    assert!(!refused_to.exists());
}

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if src.is_dir() {
            copy_dir(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// A checkout of the cart under `key`: the order's id.
async fn buy(shopper: &Shopper, key: &str) -> serde_json::Value {
    let order = shopper
        .retrying("POST", "/api/checkout", None, Some(key))
        .await;
    assert_eq!(order.status, StatusCode::CREATED, "{}", order.body);
    order.body["order_id"].clone()
}

async fn add_first_product(shopper: &Shopper) {
    let products = shopper.retrying("GET", "/api/products", None, None).await;
    let sku = products.body["products"][0]["sku"].clone();
    let added = shopper
        .retrying(
            "POST",
            "/api/cart/items",
            Some(json!({"sku": sku, "qty": 1})),
            None,
        )
        .await;
    assert!(added.status.is_success(), "{}", added.body);
}

async fn paid(shopper: &Shopper, order: &serde_json::Value) {
    let path = format!("/api/orders/{}", order.as_str().unwrap());
    eventually(Duration::from_secs(20), "the order to be paid", || async {
        let got = shopper.retrying("GET", &path, None, None).await;
        (got.body["status"] == "paid").then_some(())
    })
    .await;
}

/// The seed's case: the provider (the outside world) knows a charge for an order the restored
/// store does not have. The restore reconciles — that charge is refunded — and the customer's
/// retry with the same `Idempotency-Key` ends with one order and one charge.
#[tokio::test]
async fn a_restore_that_loses_a_paid_order_refunds_its_charge_and_the_retry_charges_once() {
    if !litestream_or_skip() {
        return;
    }
    let (_root, data, target, restored) = scratch();
    let provider = Proc::spawn(BIN.as_ref(), &["provider", "--addr", "127.0.0.1:0"]);
    let listening = provider.line_after("HOLDFAST_LISTENING ", Duration::from_secs(20));
    let provider_url = format!("http://{}", listening.split_whitespace().next().unwrap());
    let provider_api = ProviderClient::new(&provider_url, Duration::from_secs(5)).unwrap();
    let node = ["--workers", "1", "--provider-url", provider_url.as_str()];
    let (up, base, _, _) = spawn_up(
        BIN.as_ref(),
        &data,
        1,
        &[&node[..], &["--backup", path(&target)]].concat(),
    )
    .await;
    let shopper = Shopper::new(&base, "twice@example.com").await;
    add_first_product(&shopper).await;
    let kept = buy(&shopper, "kept").await;
    paid(&shopper, &kept).await;
    // The second order's cart line is in the backup too.
    add_first_product(&shopper).await;
    let data_flags = ["--backup", path(&target), "--data-dir", path(&data)];
    assert!(
        holdfast(&[&["backup", "now"][..], &data_flags].concat(), &[])
            .status
            .success()
    );
    // The moment to restore to: the next whole second (Litestream stamps its files by the
    // second), and the second order strictly after it.
    let now = time::OffsetDateTime::now_utc();
    let at = now.replace_nanosecond(0).unwrap() + time::Duration::seconds(1);
    let after = at + time::Duration::seconds(1);
    eventually(
        Duration::from_secs(5),
        "the clock to pass the restore point",
        || async { (time::OffsetDateTime::now_utc() >= after).then_some(()) },
    )
    .await;
    let lost = buy(&shopper, "lost-then-retried").await;
    paid(&shopper, &lost).await;
    assert!(
        holdfast(&[&["backup", "now"][..], &data_flags].concat(), &[])
            .status
            .success()
    );
    assert_eq!(provider_api.charges(None).await.unwrap().len(), 2);

    let _ = kill(Pid::from_raw(up.pid() as i32), Signal::SIGKILL);
    drop(up);
    std::fs::remove_dir_all(&data).unwrap();
    let at = holdfast_backup::rfc3339(at);
    let restore = holdfast(
        &[
            "restore",
            "--backup",
            path(&target),
            "--to",
            path(&restored),
            "--at",
            &at,
            "--provider-url",
            &provider_url,
        ],
        &[],
    );
    let said = stdout(&restore);
    assert!(restore.status.success(), "{restore:?}");
    let lost_id = lost.as_str().unwrap();
    assert!(
        said.contains("1 refunded now") && said.contains(lost_id),
        "{said}"
    );
    let refunds = provider_api.refunds(None).await.unwrap();
    assert_eq!(refunds.len(), 1, "{refunds:?}");
    assert_eq!(refunds[0].order_id, lost_id);
    // Reconciling again changes nothing.
    let again = holdfast(
        &[
            "reconcile",
            "--data-dir",
            path(&restored),
            "--provider-url",
            &provider_url,
        ],
        &[],
    );
    assert!(
        stdout(&again).contains("0 refunded now (orders lost: none), 1 refunded before"),
        "{again:?}"
    );

    let (_up, base, _, _) = spawn_up(BIN.as_ref(), &restored, 1, &node).await;
    let shopper = Shopper::new(&base, "twice@example.com").await;
    let retried = buy(&shopper, "lost-then-retried").await;
    assert_ne!(
        retried, lost,
        "the lost order cannot be replayed; it is placed again"
    );
    paid(&shopper, &retried).await;
    let orders = shopper.retrying("GET", "/api/orders", None, None).await;
    let ids: Vec<&serde_json::Value> = orders.body["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| &o["order_id"])
        .collect();
    assert_eq!(ids.len(), 2, "{}", orders.body);
    assert!(ids.contains(&&kept) && ids.contains(&&retried));
    // One charge per order the customer has; the lost order's charge was given back.
    let refunded: Vec<String> = refunds.iter().map(|r| r.charge_id.clone()).collect();
    let standing: Vec<String> = provider_api
        .charges(None)
        .await
        .unwrap()
        .into_iter()
        .filter(|c| !refunded.contains(&c.id))
        .map(|c| c.order_id)
        .collect();
    let mut want = vec![
        kept.as_str().unwrap().to_owned(),
        retried.as_str().unwrap().to_owned(),
    ];
    let mut standing_sorted = standing.clone();
    standing_sorted.sort();
    want.sort();
    assert_eq!(standing_sorted, want);
}

/// Production's shape: `holdfast backup run` beside the processes that serve the store (here
/// none: the store is written directly), replicating until SIGTERM, then shipping what is
/// left before it exits 0.
#[tokio::test]
async fn backup_run_replicates_beside_serve_until_sigterm() {
    if !litestream_or_skip() {
        return;
    }
    let (_root, data, target, restored) = scratch();
    let migrated = holdfast(&["migrate", "up", "--data-dir", path(&data)], &[]);
    assert!(migrated.status.success(), "{migrated:?}");
    let flags = ["--backup", path(&target), "--data-dir", path(&data)];
    let mut run = Proc::spawn(BIN.as_ref(), &[&["backup", "run"][..], &flags].concat());
    run.line_after("backup running: ", Duration::from_secs(20));
    eventually(Duration::from_secs(10), "backup status: ok", || async {
        let status = holdfast(&[&["backup", "status"][..], &flags].concat(), &[]);
        status.status.success().then_some(())
    })
    .await;
    run.signal(Signal::SIGTERM);
    assert!(run.exit_status(Duration::from_secs(20)).await.success());
    let restore = restore_from(&target, &restored);
    assert!(
        stdout(&restore).contains("integrity_check ok"),
        "{restore:?}"
    );
}

/// A throwaway PostgreSQL cluster with the store migrated on it, `holdfast backup run`
/// replicating it to `target` (with `env`) and proven, and then `kept` rows committed and
/// `backup now` answered: what the backup must hold.
struct PostgresBackedUp {
    _dir: std::sync::Arc<tempfile::TempDir>,
    cluster: std::sync::Arc<holdfast_drill::Cluster>,
    url: String,
    /// `--backend postgres --database-url … --data-dir … --backup …`
    flags: Vec<String>,
    run: Proc,
}

impl PostgresBackedUp {
    async fn start(data: &Path, target: &str, env: &[(&str, &str)], kept: i64) -> Self {
        let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
        let cluster = holdfast_drill::Cluster::start(&dir)
            .await
            .expect("a cluster");
        let url = cluster.url();
        let store = ["--backend", "postgres", "--database-url", url.as_str()];
        let migrated = holdfast(
            &[&["migrate", "up"][..], &store, &["--data-dir", path(data)]].concat(),
            &[],
        );
        assert!(migrated.status.success(), "{migrated:?}");
        let flags: Vec<String> = [&store[..], &["--data-dir", path(data), "--backup", target]]
            .concat()
            .into_iter()
            .map(str::to_owned)
            .collect();
        let with = |cmd: &[&str]| -> Vec<String> {
            cmd.iter()
                .map(|s| (*s).to_owned())
                .chain(flags.iter().cloned())
                .collect()
        };
        let run_args = with(&["backup", "run"]);
        let run_args: Vec<&str> = run_args.iter().map(String::as_str).collect();
        let run = Proc::spawn_with_env(BIN.as_ref(), &run_args, env);
        run.line_after("backup running: ", Duration::from_secs(20));
        let backed_up = PostgresBackedUp {
            _dir: dir,
            cluster,
            url,
            flags,
            run,
        };
        eventually(Duration::from_secs(30), "backup status: ok", || async {
            let status = backed_up.holdfast(&["backup", "status"], env);
            stdout(&status).starts_with("backup ok").then_some(())
        })
        .await;
        let mut conn = sqlx::PgConnection::connect(&backed_up.url).await.unwrap();
        sqlx::raw_sql(&format!(
            "CREATE TABLE kept (n int); INSERT INTO kept SELECT generate_series(1, {kept})"
        ))
        .execute(&mut conn)
        .await
        .unwrap();
        let now = backed_up.holdfast(&["backup", "now"], env);
        assert!(stdout(&now).starts_with("backed up to"), "{now:?}");
        backed_up
    }

    /// `holdfast CMD <the backup's flags>`.
    fn holdfast(&self, cmd: &[&str], env: &[(&str, &str)]) -> Output {
        let flags: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        holdfast(&[cmd, &flags[..]].concat(), env)
    }

    /// `backup run` stops on SIGTERM, having shipped what was left.
    async fn stop_backup(&mut self) {
        self.run.signal(Signal::SIGTERM);
        assert!(self
            .run
            .exit_status(Duration::from_secs(20))
            .await
            .success());
    }

    /// The server and its disk are lost; `holdfast restore` of `target` (as of `at`, or the
    /// newest) goes where its data directory was (its line), and the cluster starts on it.
    async fn lose_and_restore(
        &self,
        target: &str,
        env: &[(&str, &str)],
        at: Option<&str>,
    ) -> String {
        self.cluster.stop().await;
        std::fs::remove_dir_all(&self.cluster.data).unwrap();
        let mut args = vec![
            "restore",
            "--backup",
            target,
            "--to",
            path(&self.cluster.data),
        ];
        args.extend(at.map(|at| ["--at", at]).into_iter().flatten());
        let restore = holdfast(&args, env);
        let said = stdout(&restore);
        assert!(said.contains("pg_amcheck ok"), "{restore:?}");
        self.cluster
            .start_again()
            .await
            .expect("the restored cluster starts");
        said
    }

    /// The rows of `kept` the (restored) cluster has.
    async fn kept(&self) -> i64 {
        let mut conn = sqlx::PgConnection::connect(&self.url).await.unwrap();
        sqlx::query_scalar("SELECT count(*) FROM kept")
            .fetch_one(&mut conn)
            .await
            .unwrap()
    }
}

/// PostgreSQL: `backup run` beside the server (a base backup, then every WAL record as it is
/// written), `status`, `now`, `list`, then `restore` into a new directory, checked by
/// `pg_amcheck`, which a server started on it serves; and its bad inputs, one line each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_backup_runs_proves_itself_and_restores_what_was_committed() {
    if !holdfast_testkit::process::postgres_server_binaries_or_skip() {
        return;
    }
    let (root, data, target, restored) = scratch();
    let mut pg = PostgresBackedUp::start(&data, path(&target), &[], 500).await;
    let url = pg.url.clone();
    let store = ["--backend", "postgres", "--database-url", url.as_str()];
    // A moment to return to: after those 500 rows, before 250 more.
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let moment: String = sqlx::query_scalar(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    sqlx::raw_sql("SELECT pg_sleep(0.05); INSERT INTO kept SELECT generate_series(501, 750)")
        .execute(&mut conn)
        .await
        .unwrap();
    drop(conn);
    let now = pg.holdfast(&["backup", "now"], &[]);
    assert!(stdout(&now).starts_with("backed up to"), "{now:?}");
    // And a moment after the last commit: recovery would end before reaching it, so the
    // restore goes to the newest change.
    let later = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let list = pg.holdfast(&["backup", "list"], &[]);
    assert!(stdout(&list).contains("restorable from"), "{list:?}");
    assert!(
        stdout(&list).contains("snapshot "),
        "a base backup: {list:?}"
    );
    pg.stop_backup().await;
    // Retired, as the runbook says: the slot goes, and with it the WAL kept for it.
    let dropped = std::process::Command::new("psql")
        .args([url.as_str(), "-X", "-q", "-c"])
        .arg("SELECT pg_drop_replication_slot('holdfast_backup')")
        .output()
        .expect("psql");
    assert!(dropped.status.success(), "{dropped:?}");
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let slots: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(slots, 0);
    drop(conn);

    // Back to the moment (point in time), then to the newest change.
    let said = pg.lose_and_restore(path(&target), &[], Some(&moment)).await;
    assert!(said.contains("migrations"), "{said}");
    assert_eq!(
        pg.kept().await,
        500,
        "as of {moment}: the 500 rows, not the 250 after"
    );
    pg.lose_and_restore(path(&target), &[], Some(&later)).await;
    assert_eq!(pg.kept().await, 750, "every committed row came back");

    // Bad inputs: one line each, nothing touched.
    let occupied = root.path().join("occupied");
    std::fs::create_dir(&occupied).unwrap();
    std::fs::write(occupied.join("PG_VERSION"), "15").unwrap();
    let at_flag = |at: &str| {
        holdfast(
            &[
                "restore",
                "--backup",
                path(&target),
                "--to",
                path(&restored),
                "--at",
                at,
            ],
            &[],
        )
    };
    let line = refusal(&at_flag("2001-01-01T00:00:00Z"));
    assert!(line.contains("before the first backup"), "{line}");
    let line = refusal(&at_flag("2999-01-01T00:00:00Z"));
    assert!(line.contains("in the future"), "{line}");
    assert!(!restored.exists(), "nothing was written");
    let line = refusal(&restore_from(&target, &occupied));
    assert!(line.contains("is not empty"), "{line}");
    assert_eq!(
        std::fs::read_to_string(occupied.join("PG_VERSION")).unwrap(),
        "15"
    );
    let unreachable = holdfast(
        &[
            &["backup", "now"][..],
            &store,
            &["--data-dir", path(&data), "--backup", "s3://bucket/pg"],
        ]
        .concat(),
        &[("AWS_ENDPOINT_URL", "http://127.0.0.1:9")],
    );
    assert!(
        refusal(&unreachable).contains("cannot reach the backup"),
        "{unreachable:?}"
    );
    // Another cluster's backup directory is not mixed with this one's.
    let foreign = root.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(
        foreign.join("postgres.json"),
        r#"{"system_identifier":"1","database":"holdfast"}"#,
    )
    .unwrap();
    let mixed = holdfast(
        &[
            &["backup", "now"][..],
            &store,
            &["--data-dir", path(&data), "--backup", path(&foreign)],
        ]
        .concat(),
        &[],
    );
    assert!(
        refusal(&mixed).contains("another PostgreSQL cluster"),
        "{mixed:?}"
    );
}

/// PostgreSQL to an S3-compatible bucket (moto's server): the base backup and the WAL are
/// shipped from a local spool, the segment being received in pieces; the restore fetches
/// them back and every committed row returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_backup_to_s3_restores_what_was_committed() {
    if !holdfast_testkit::process::postgres_server_binaries_or_skip() {
        return;
    }
    let Some(s3) = S3Server::start("pg_backup_to_s3").await else {
        return;
    };
    let bucket = s3.bucket("pgbackups").await;
    let target = format!("{bucket}/cluster");
    let env = s3.aws_env();
    let (_root, data, _, _) = scratch();
    let mut pg = PostgresBackedUp::start(&data, &target, &env, 700).await;
    // (A base backup is over a thousand objects: the listing of `base/` alone would stop
    // short of its `.done`.)
    let done = s3.keys_under("pgbackups", "cluster/base/2").await;
    assert!(
        done.iter().any(|k| k.ends_with(".done")),
        "a complete base backup"
    );
    let wal = s3.keys_under("pgbackups", "cluster/wal/").await;
    assert!(
        wal.iter().any(|k| k.contains(".partial.")),
        "the segment being received, in pieces: {wal:?}"
    );
    let list = pg.holdfast(&["backup", "list"], &env);
    assert!(stdout(&list).contains("snapshot "), "{list:?}");
    pg.stop_backup().await;
    pg.lose_and_restore(&target, &env, None).await;
    assert_eq!(
        pg.kept().await,
        700,
        "every committed row came back from the bucket"
    );
}
