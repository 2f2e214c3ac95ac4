//! `holdfast migrate` as an operator runs it, and serving processes that refuse a database
//! that is not exactly their build's instead of migrating it behind everyone's back.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use holdfast_core::Backend;
use holdfast_testkit::db::with_fresh_db;

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

fn holdfast(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .output()
        .expect("running holdfast")
}

/// `holdfast migrate up --backend postgres --database-url URL EXTRA…`, off the test's runtime.
fn up_on_postgres(url: &str, extra: &[&str]) -> tokio::task::JoinHandle<Output> {
    let mut args: Vec<String> = [
        "migrate",
        "up",
        "--backend",
        "postgres",
        "--database-url",
        url,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        holdfast(&args)
    })
}

fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn an_instance_refuses_an_unmigrated_database_until_migrate_up_runs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    // Nothing there yet: operator commands refuse a data dir without a database.
    let status = holdfast(&["migrate", "status", "--data-dir", data]);
    assert_eq!(status.status.code(), Some(1), "{}", said(&status));
    assert!(
        said(&status).contains("no database at"),
        "{}",
        said(&status)
    );

    let plan = holdfast(&["migrate", "plan", "--data-dir", data]);
    assert!(plan.status.success(), "{}", said(&plan));
    let plan = said(&plan);
    assert!(
        plan.contains("-- crates/holdfast-store/migrations/0001_accounts.sql (sqlite)")
            && plan.contains("-- crates/holdfast-shop/migrations/0001_shop.sql (sqlite)")
            && plan.contains("CREATE TABLE"),
        "{plan}"
    );
    // `plan` ran nothing: a serving process still finds every migration missing and says what
    // to do, without starting.
    let started = Instant::now();
    let serve = holdfast(&["serve", "--addr", "127.0.0.1:0", "--data-dir", data]);
    assert_eq!(serve.status.code(), Some(1), "{}", said(&serve));
    assert!(
        said(&serve).contains("lacks 9 migration(s)")
            && said(&serve).contains("run `holdfast migrate up` first"),
        "{}",
        said(&serve)
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let worker = holdfast(&[
        "worker",
        "--data-dir",
        data,
        "--provider-url",
        "http://127.0.0.1:9",
    ]);
    assert_eq!(worker.status.code(), Some(1), "{}", said(&worker));
    assert!(
        said(&worker).contains("holdfast migrate up"),
        "{}",
        said(&worker)
    );

    let status = holdfast(&["migrate", "status", "--data-dir", data]);
    assert!(status.status.success(), "{}", said(&status));
    assert!(
        said(&status).contains("store: 0 applied, 8 pending")
            && said(&status).contains("shop: 0 applied, 6 pending"),
        "{}",
        said(&status)
    );

    let up = holdfast(&["migrate", "up", "--data-dir", data]);
    assert!(up.status.success(), "{}", said(&up));
    assert!(
        said(&up).contains("applied 13 migration(s)")
            && said(&up).contains("store: 8 applied, up to date")
            && said(&up).contains("shop: 5 applied, 1 pending")
            && said(&up).contains("0006_cart_lines_contract.sql (contract)"),
        "{}",
        said(&up)
    );
    // Again: nothing to do, nothing changes.
    let again = holdfast(&["migrate", "up", "--data-dir", data]);
    assert!(
        said(&again).contains("applied 0 migration(s)"),
        "{}",
        said(&again)
    );
    let json = holdfast(&["migrate", "status", "--data-dir", data, "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(json[0]["schema"], "store");
    assert_eq!(json[0]["pending"], serde_json::json!([]));
    assert_eq!(json[1]["applied"], serde_json::json!([1, 2, 3, 4, 5]));
}

/// A database a newer build migrated is refused by name — by the instances and by `migrate up`
/// alike, which changes nothing.
#[tokio::test]
async fn a_database_newer_than_the_build_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_owned();
    assert!(holdfast(&["migrate", "up", "--data-dir", &data])
        .status
        .success());
    let url = format!("sqlite:{}/holdfast.sqlite", data);
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::query(
        "INSERT INTO holdfast_schema_migrations (schema_name, version, file, checksum, applied_at) \
         VALUES ('shop', 7, 'crates/holdfast-shop/migrations/0007_from_the_future.sql', 'x', 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM holdfast_schema_migrations")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let before = count().await;
    for args in [
        vec!["serve", "--addr", "127.0.0.1:0", "--data-dir", &data],
        vec![
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
            &data,
            "--migrate",
        ],
        vec!["migrate", "up", "--data-dir", &data],
    ] {
        let out = holdfast(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", said(&out));
        assert!(
            said(&out).contains("0007_from_the_future.sql")
                && said(&out).contains("a newer build migrated it"),
            "{args:?}: {}",
            said(&out)
        );
    }
    assert_eq!(count().await, before, "nothing was changed");
    let status = holdfast(&["migrate", "status", "--data-dir", &data]);
    assert!(
        said(&status).contains("shop: 5 applied, 1 pending")
            && said(&status).contains("1 UNKNOWN to this build"),
        "{}",
        said(&status)
    );
}

/// On Postgres the migration waits at most `--lock-timeout` per try and gives up at
/// `--deadline`, naming the backend that holds the migration lock; once it is released, the
/// same command succeeds.
#[tokio::test]
async fn a_held_migration_lock_makes_up_give_up_in_time_naming_the_holder() {
    with_fresh_db(Backend::Postgres, "migrate_lock", |url| async move {
        let up = |extra: &[&str]| up_on_postgres(&url, extra);
        assert!(up(&[]).await.unwrap().status.success());
        let mut holder = sqlx::PgConnection::connect(&url).await.unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut holder)
            .await
            .unwrap();
        sqlx::query("SELECT pg_advisory_lock(x'486f6c6466617374'::bigint)")
            .execute(&mut holder)
            .await
            .unwrap();
        let started = Instant::now();
        let out = up(&["--lock-timeout", "100ms", "--deadline", "1s"])
            .await
            .unwrap();
        let took = started.elapsed();
        assert_eq!(out.status.code(), Some(1), "{}", said(&out));
        assert!(
            said(&out).contains(&format!(
                "holds the migration lock (Postgres backend pid {pid})"
            )),
            "{}",
            said(&out)
        );
        assert!(took < Duration::from_secs(6), "gave up after {took:?}");
        sqlx::query("SELECT pg_advisory_unlock(x'486f6c6466617374'::bigint)")
            .execute(&mut holder)
            .await
            .unwrap();
        let out = up(&["--lock-timeout", "100ms"]).await.unwrap();
        assert!(out.status.success(), "{}", said(&out));
    })
    .await;
}

/// A long reader on the table a contract drops (a `pg_dump`'s open transaction): the contract
/// waits at most `--lock-timeout` per try, is retried until `--deadline`, gives up saying so
/// and leaves the contract pending; the requests that write carts meanwhile are not held up
/// (its first part already stopped copying into the old table). Once the reader is gone, the
/// same command succeeds, repeating the first part harmlessly.
#[tokio::test]
async fn a_long_reader_turns_the_contract_away_until_it_ends() {
    with_fresh_db(Backend::Postgres, "migrate_reader", |url| async move {
        let up = |extra: &[&str]| up_on_postgres(&url, extra);
        assert!(up(&[]).await.unwrap().status.success());
        let mut reader = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query("BEGIN").execute(&mut reader).await.unwrap();
        sqlx::query("SELECT COUNT(*) FROM cart_items")
            .execute(&mut reader)
            .await
            .unwrap();
        let contract = up(&["--to", "contract", "--lock-timeout", "200ms", "--deadline", "2s"]);
        // Meanwhile a cart write (into cart_lines, as this build writes after switch-writes)
        // goes through at once: nothing it needs waits behind the contract.
        let mut writer = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query("INSERT INTO users (id, email, password_hash, created_at) VALUES ('w', 'w@example.com', 'x', 0)")
            .execute(&mut writer)
            .await
            .unwrap();
        // Once the contract's DROP TABLE is seen queued behind the reader.
        let watcher = sqlx::PgPool::connect(&url).await.unwrap();
        holdfast_testkit::process::eventually(
            Duration::from_secs(10),
            "the contract waiting behind the reader",
            || {
                let watcher = watcher.clone();
                async move {
                    let waiting: i64 = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
                         AND wait_event_type = 'Lock' AND query LIKE '%DROP TABLE cart_items%'",
                    )
                    .fetch_one(&watcher)
                    .await
                    .unwrap();
                    (waiting > 0).then_some(())
                }
            },
        )
        .await;
        let started = Instant::now();
        sqlx::query("INSERT INTO cart_lines (user_id, sku, quantity, added_at) VALUES ('w', 'HELMET', 1, 0)")
            .execute(&mut writer)
            .await
            .unwrap();
        let write_took = started.elapsed();
        let out = contract.await.unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", said(&out));
        assert!(
            said(&out).contains("gave up migrating")
                && said(&out).contains("a long transaction holds a lock"),
            "{}",
            said(&out)
        );
        assert!(
            write_took < Duration::from_millis(150),
            "a cart write waited {write_took:?} behind the contract"
        );
        let status = holdfast(&[
            "migrate", "status", "--backend", "postgres", "--database-url", &url,
        ]);
        assert!(
            said(&status).contains("0006_cart_lines_contract.sql (contract)"),
            "the contract is still pending: {}",
            said(&status)
        );
        sqlx::query("ROLLBACK").execute(&mut reader).await.unwrap();
        let out = up(&["--to", "contract"]).await.unwrap();
        assert!(out.status.success(), "{}", said(&out));
        assert!(said(&out).contains("shop: 6 applied, up to date"), "{}", said(&out));
    })
    .await;
}

/// The lint is CI's gate on migrations: every released one passes (its warnings excused in
/// EXCUSES), and a new one with an unexcused warning fails, naming file, line and rule —
/// until the excuse is written next to the statement.
#[test]
fn migrate_lint_passes_the_released_migrations_and_stops_an_unexcused_warning() {
    if !holdfast_testkit::process::have_tool("squawk", "scripts/install-ops-tools.sh") {
        return;
    }
    let released = holdfast(&["migrate", "lint"]);
    assert!(released.status.success(), "{}", said(&released));
    assert!(
        said(&released).contains("without an excuse") && said(&released).contains(", 0 without")
    );
    let dir = tempfile::tempdir().unwrap();
    let new = dir.path().join("0006_index.sql");
    std::fs::write(&new, "CREATE INDEX users_created ON users (created_at);\n").unwrap();
    let out = holdfast(&["migrate", "lint", new.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    assert!(
        said(&out).contains("0006_index.sql:1 require-concurrent-index-creation")
            && said(&out).contains("NOT EXCUSED"),
        "{}",
        said(&out)
    );
    std::fs::write(
        &new,
        "-- users is tiny: the index builds in milliseconds\n\
         -- squawk-ignore require-concurrent-index-creation\n\
         CREATE INDEX users_created ON users (created_at);\n",
    )
    .unwrap();
    let excused = holdfast(&["migrate", "lint", new.to_str().unwrap()]);
    assert!(excused.status.success(), "{}", said(&excused));
}

/// `down` undoes a schema's newest migrations in one transaction and `up` redoes them; an
/// unknown schema is refused by name; nothing above `--to` is a no-op.
async fn down_then_up(backend: Backend, url: String) {
    let engine = backend.name();
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            holdfast(&args)
        })
    };
    let with_db = |args: &[&str]| -> Vec<String> {
        let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        all.extend([
            "--backend".into(),
            engine.into(),
            "--database-url".into(),
            url.clone(),
        ]);
        all
    };
    let up = run(with_db(&["migrate", "up"])).await.unwrap();
    assert!(up.status.success(), "{}", said(&up));

    let down = run(with_db(&[
        "migrate", "down", "--schema", "store", "--to", "7",
    ]))
    .await
    .unwrap();
    assert!(down.status.success(), "{}", said(&down));
    assert!(
        said(&down).contains(
            "undid 1 migration(s): crates/holdfast-store/migrations/0008_job_effects.sql"
        ) && said(&down).contains("store: 7 applied, 1 pending"),
        "{}",
        said(&down)
    );
    let plan = run(with_db(&["migrate", "plan"])).await.unwrap();
    assert!(
        said(&plan).contains("0008_job_effects.sql") && !said(&plan).contains("0007_secrets"),
        "{}",
        said(&plan)
    );

    let none = run(with_db(&[
        "migrate", "down", "--schema", "store", "--to", "7",
    ]))
    .await
    .unwrap();
    assert!(
        said(&none).contains("undid 0 migration(s)"),
        "{}",
        said(&none)
    );
    let unknown = run(with_db(&[
        "migrate", "down", "--schema", "shops", "--to", "0",
    ]))
    .await
    .unwrap();
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        said(&unknown).contains("no schema named \"shops\""),
        "{}",
        said(&unknown)
    );

    let shop = run(with_db(&[
        "migrate", "down", "--schema", "shop", "--to", "0",
    ]))
    .await
    .unwrap();
    assert!(
        said(&shop).contains("shop: 0 applied, 6 pending"),
        "{}",
        said(&shop)
    );
    // Every down step runs (0008 is already undone): the store back to nothing, then forward.
    let all = run(with_db(&[
        "migrate", "down", "--schema", "store", "--to", "0",
    ]))
    .await
    .unwrap();
    assert!(
        said(&all).contains("undid 7 migration(s)")
            && said(&all).contains("store: 0 applied, 8 pending"),
        "{}",
        said(&all)
    );
    let again = run(with_db(&["migrate", "up"])).await.unwrap();
    assert!(
        said(&again).contains("applied 13 migration(s)")
            && said(&again).contains("store: 8 applied, up to date")
            && said(&again).contains("shop: 5 applied, 1 pending"),
        "{}",
        said(&again)
    );
}

#[tokio::test]
async fn down_then_up_on_sqlite() {
    with_fresh_db(Backend::Sqlite, "migrate_down", |url| {
        down_then_up(Backend::Sqlite, url)
    })
    .await;
}

#[tokio::test]
async fn down_then_up_on_postgres() {
    with_fresh_db(Backend::Postgres, "migrate_down", |url| {
        down_then_up(Backend::Postgres, url)
    })
    .await;
}

/// On SQLite the guard is the file's write lock, waited for at most the busy timeout per try:
/// with another process holding it, `up` gives up at its deadline and says what to look for,
/// changing nothing; once the lock is released it succeeds.
#[tokio::test]
async fn a_held_sqlite_write_lock_makes_up_give_up_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_owned();
    let url = format!("sqlite:{data}/holdfast.sqlite");
    let mut holder = sqlx::SqliteConnection::connect(&format!("{url}?mode=rwc"))
        .await
        .unwrap();
    sqlx::query("PRAGMA journal_mode = WAL")
        .execute(&mut holder)
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut holder)
        .await
        .unwrap();
    let up = |data: String| {
        tokio::task::spawn_blocking(move || {
            holdfast(&["migrate", "up", "--data-dir", &data, "--deadline", "1s"])
        })
    };
    let started = Instant::now();
    let out = up(data.clone()).await.unwrap();
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    assert!(
        said(&out).contains("gave up migrating") && said(&out).contains("SQLite write lock"),
        "{}",
        said(&out)
    );
    assert!(took < Duration::from_secs(15), "gave up after {took:?}");
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    drop(holder);
    let out = up(data).await.unwrap();
    assert!(out.status.success(), "{}", said(&out));
    assert!(
        said(&out).contains("applied 13 migration(s)"),
        "{}",
        said(&out)
    );
}

use sqlx::Connection as _;

/// `up --to` names a phase or a version; a phase nobody has pending, a version this build
/// does not have, a version without its schema and a word that is neither each get one clear
/// error and change nothing. Plain `up` stops before a contract; `--to contract` runs it.
#[test]
fn up_runs_one_phase_at_a_time_and_refuses_what_it_cannot_name() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let up = |to: &[&str]| holdfast(&[&["migrate", "up", "--data-dir", data][..], to].concat());
    let expand = up(&["--to", "expand"]);
    assert!(expand.status.success(), "{}", said(&expand));
    assert!(
        said(&expand).contains("applied 10 migration(s)")
            && said(&expand).contains("shop: 2 applied, 4 pending"),
        "{}",
        said(&expand)
    );
    for (args, says) in [
        (&["--to", "sideways"][..], "neither a version nor a phase"),
        (
            &["--to", "expand"][..],
            "no change has a pending expand phase",
        ),
        (
            &["--to", "9", "--schema", "shop"][..],
            "has no shop migration 9",
        ),
        (&["--to", "2", "--schema", "shop"][..], "already applied"),
        (&["--to", "4"][..], "needs --schema"),
        (
            &["--to", "4", "--schema", "shops"][..],
            "no schema named \"shops\"",
        ),
    ] {
        let out = up(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", said(&out));
        assert!(
            said(&out).contains(says) && said(&out).contains("nothing was changed"),
            "{args:?}: {}",
            said(&out)
        );
        let status = holdfast(&["migrate", "status", "--data-dir", data]);
        assert!(
            said(&status).contains("shop: 2 applied, 4 pending"),
            "{args:?}: {}",
            said(&status)
        );
    }
    let reads = up(&["--to", "switch-reads"]);
    assert!(
        said(&reads).contains("applied 2 migration(s)")
            && said(&reads).contains("0003_cart_lines_backfill.sql, crates/holdfast-shop/migrations/0004_cart_lines_switch_reads.sql"),
        "what precedes the target runs first: {}",
        said(&reads)
    );
    let rest = up(&[]);
    assert!(
        said(&rest).contains("applied 1 migration(s)")
            && said(&rest).contains("shop: 5 applied, 1 pending: crates/holdfast-shop/migrations/0006_cart_lines_contract.sql (contract)"),
        "plain up stops before the contract: {}",
        said(&rest)
    );
    let down = |to: &str| {
        holdfast(&[
            "migrate",
            "down",
            "--data-dir",
            data,
            "--schema",
            "shop",
            "--to",
            to,
        ])
    };
    let back = down("backfill");
    assert!(
        said(&back).contains("undid 2 migration(s)") && said(&back).contains("shop: 3 applied"),
        "down --to a phase keeps it: {}",
        said(&back)
    );
    let contract = up(&["--to", "contract"]);
    assert!(
        said(&contract).contains("applied 3 migration(s)")
            && said(&contract).contains("shop: 6 applied, up to date"),
        "{}",
        said(&contract)
    );
    let past = down("1");
    assert_eq!(past.status.code(), Some(1));
    assert!(
        said(&past).contains("0006_cart_lines_contract.sql is a contract")
            && said(&past).contains("nothing was changed"),
        "{}",
        said(&past)
    );
}

/// A backfill SIGKILLed between batches keeps what it committed, is not recorded as done, and
/// the next `up` finishes it without copying anything twice.
#[tokio::test]
async fn a_killed_backfill_resumes_where_it_stopped() {
    use holdfast_testkit::process::{eventually, Proc};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_owned();
    let expand = holdfast(&["migrate", "up", "--data-dir", &data, "--to", "expand"]);
    assert!(expand.status.success(), "{}", said(&expand));
    let url = format!("sqlite:{data}/holdfast.sqlite");
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    // Carts from before the change, written as the old build writes them, without the
    // expand's triggers (dropped and restored around the writes) so that only the backfill
    // can carry them over.
    let triggers: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'cart_items'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(triggers.len(), 3);
    for (name, _) in &triggers {
        sqlx::query(&format!("DROP TRIGGER {name}"))
            .execute(&pool)
            .await
            .unwrap();
    }
    const CARTS: i64 = 40;
    for i in 0..CARTS {
        sqlx::query(
            "INSERT INTO users (id, email, password_hash, created_at) VALUES ($1, $2, 'x', 0)",
        )
        .bind(format!("u{i:03}"))
        .bind(format!("u{i}@example.com"))
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO cart_items (user_id, sku, qty, added_at) VALUES ($1, 'HELMET', $2, 0)",
        )
        .bind(format!("u{i:03}"))
        .bind(i % 99 + 1)
        .execute(&pool)
        .await
        .unwrap();
    }
    for (_, sql) in &triggers {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    let copied = || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM cart_lines")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    assert_eq!(copied().await, 0);

    let slow = Proc::spawn(
        std::path::Path::new(BIN),
        &[
            "migrate",
            "up",
            "--data-dir",
            &data,
            "--to",
            "backfill",
            "--batch-rows",
            "5",
            "--batch-pause",
            "200ms",
        ],
    );
    let partway = eventually(Duration::from_secs(30), "two batches committed", || async {
        let n = copied().await;
        (n >= 10).then_some(n)
    })
    .await;
    drop(slow); // SIGKILL
    assert!(partway < CARTS, "killed partway: {partway} of {CARTS}");
    let status = holdfast(&["migrate", "status", "--data-dir", &data]);
    assert!(
        said(&status).contains("0003_cart_lines_backfill.sql (backfill)"),
        "the backfill is still pending: {}",
        said(&status)
    );
    let kept = copied().await;
    assert!(
        kept >= partway,
        "committed batches stay: {kept} < {partway}"
    );

    let resumed = holdfast(&["migrate", "up", "--data-dir", &data, "--to", "backfill"]);
    assert!(resumed.status.success(), "{}", said(&resumed));
    assert!(
        said(&resumed).contains("shop: 3 applied"),
        "{}",
        said(&resumed)
    );
    let diff: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM cart_items c LEFT JOIN cart_lines l ON l.user_id = c.user_id AND l.sku = c.sku \
         WHERE l.quantity IS NOT c.qty",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(diff, 0, "every cart copied, with its quantity");
    assert_eq!(copied().await, CARTS, "nothing copied twice");
}
