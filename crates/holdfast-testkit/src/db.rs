//! A fresh database per test, on either engine. Postgres comes from `DATABASE_URL`; without
//! it a Postgres test is skipped with a note, except under `CI=true`, where it fails (see
//! `holdfast_store::testing`).

use holdfast_core::Backend;
use holdfast_store::testing;
use std::future::Future;

/// Runs `case` with the URL of a brand-new, empty database of `backend`. A Postgres database
/// is dropped afterwards, only if the case passed: a failed case leaves its database for
/// inspection. Returns without running the case when Postgres is not configured (outside CI).
pub async fn with_fresh_db<F, Fut>(backend: Backend, test: &str, case: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("tempdir");
            case(testing::sqlite_url(dir.path())).await;
        }
        Backend::Postgres => {
            let Some(url) = testing::fresh_postgres_url(test).await else {
                return;
            };
            case(url.clone()).await;
            let admin = std::env::var("DATABASE_URL").expect("DATABASE_URL");
            let name = url.rsplit('/').next().and_then(|s| s.split('?').next());
            testing::drop_database(&admin, name.expect("database name"))
                .await
                .expect("drop test database");
        }
    }
}

/// One `#[tokio::test]` per backend for each `async fn(Backend)` named, in modules `sqlite`
/// and `postgres`: `both_backends!(multi_thread; case_a, case_b);` (the flavor is
/// `current_thread` or `multi_thread`).
#[macro_export]
macro_rules! both_backends {
    ($flavor:ident; $($name:ident),* $(,)?) => {
        $crate::both_backends!(@one sqlite Sqlite $flavor; $($name),*);
        $crate::both_backends!(@one postgres Postgres $flavor; $($name),*);
    };
    (@one $m:ident $b:ident current_thread; $($name:ident),*) => {
        mod $m { $( #[tokio::test] async fn $name() { super::$name($crate::Backend::$b).await } )* }
    };
    (@one $m:ident $b:ident multi_thread; $($name:ident),*) => {
        mod $m { $( #[tokio::test(flavor = "multi_thread", worker_threads = 4)] async fn $name() { super::$name($crate::Backend::$b).await } )* }
    };
}

/// A store on a fresh SQLite file, with `schemas` on top of the store's own; the file goes
/// when this does.
pub struct TempStore {
    pub store: holdfast_store::Store,
    pub url: String,
    pub dir: tempfile::TempDir,
}

impl TempStore {
    pub async fn open(schemas: &[&'static holdfast_store::Schema]) -> TempStore {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = testing::sqlite_url(dir.path());
        let mut opts = holdfast_store::StoreOptions::new(&url);
        opts.schemas.extend_from_slice(schemas);
        let store = holdfast_store::Store::open(&opts)
            .await
            .expect("open the store");
        TempStore { store, url, dir }
    }

    /// The web edge's state over this store, with `web`'s options and no metrics.
    pub fn edge(&self, web: holdfast_web::WebOptions) -> holdfast_web::AppState {
        holdfast_web::AppState::new(self.store.clone(), web, None)
    }
}

/// What one of many requests racing on one idempotency key saw.
#[derive(Debug)]
pub enum Raced<T> {
    /// It won the claim, did the work and committed this answer.
    Committed(T, holdfast_store::StoredResponse),
    /// The work was done: it replayed this answer.
    Replay(holdfast_store::StoredResponse),
    /// Another racer held the key.
    InFlight,
}

/// A key the racer claimed: what it needs to finish under it.
pub struct Won {
    pub scope: String,
    pub key: holdfast_core::IdempotencyKey,
    pub token: String,
}

impl Won {
    pub fn lock(&self) -> holdfast_store::IdemLock<'_> {
        holdfast_store::IdemLock {
            scope: &self.scope,
            key: &self.key,
            token: &self.token,
        }
    }
}

/// `racers` requests at once with one key and one payload from `scope`, the `i`-th on
/// `stores[i % stores.len()]` (separate pools, as separate instances have): each claims the
/// key and, if it wins, runs `work(store, won, i)`. Asserts exactly one committed, that every
/// replay is its answer, and that a later claim replays it too; returns the work's value.
pub async fn race_one_key<T, W, Fut, E>(
    stores: &[holdfast_store::Store],
    racers: usize,
    scope: &str,
    work: W,
) -> T
where
    T: Send + std::fmt::Debug + 'static,
    E: std::fmt::Debug + Send + 'static,
    W: Fn(holdfast_store::Store, Won, usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(T, holdfast_store::StoredResponse), E>> + Send + 'static,
{
    use holdfast_store::ClaimOutcome;
    let key = holdfast_core::IdempotencyKey::parse(b"race").expect("a key");
    let fingerprint = holdfast_core::RequestFingerprint::of("POST", "/race", b"{}");
    let claim = |store: &holdfast_store::Store, now_offset: i64| {
        let (store, scope, key, fingerprint) = (
            store.clone(),
            scope.to_owned(),
            key.clone(),
            fingerprint.clone(),
        );
        async move {
            let claim = holdfast_store::IdemClaim {
                scope: &scope,
                key: &key,
                fingerprint: &fingerprint,
                now: 1_700_000_000_000 + now_offset,
                lock_ttl: std::time::Duration::from_secs(30),
            };
            store.idem_claim(claim).await.expect("claim")
        }
    };
    let tasks = (0..racers).map(|i| {
        let (store, work) = (stores[i % stores.len()].clone(), work.clone());
        let (claimed, scope, key) = (claim(&store, 0), scope.to_owned(), key.clone());
        tokio::spawn(async move {
            match claimed.await {
                ClaimOutcome::Claimed { token } => {
                    let won = Won { scope, key, token };
                    let (value, answer) = work(store, won, i)
                        .await
                        .unwrap_or_else(|e| panic!("racer {i} failed: {e:?}"));
                    Raced::Committed(value, answer)
                }
                ClaimOutcome::Replay(r) => Raced::Replay(r),
                ClaimOutcome::InFlight => Raced::InFlight,
                ClaimOutcome::Mismatch => {
                    panic!("racer {i}: the same request reported as Mismatch")
                }
            }
        })
    });
    let mut results = Vec::with_capacity(racers);
    for task in tasks {
        results.push(task.await.expect("a racer panicked"));
    }
    let winners = results
        .iter()
        .filter(|r| matches!(r, Raced::Committed(..)))
        .count();
    assert_eq!(winners, 1, "{results:?}");
    let (mut won, mut replays) = (None, Vec::new());
    for r in results {
        match r {
            Raced::Committed(value, answer) => won = Some((value, answer)),
            Raced::Replay(answer) => replays.push(answer),
            Raced::InFlight => {}
        }
    }
    let (value, answer) = won.expect("one winner");
    assert!(replays.iter().all(|r| *r == answer), "a replay differs");
    let later = claim(stores.last().expect("a store"), 1).await;
    assert_eq!(later, ClaimOutcome::Replay(answer), "a later claim replays");
    value
}

/// A conformance suite over both engines: each `fixture flavor name` becomes the tests
/// `sqlite::name` and `postgres::name` on a fresh database. Fixture `opened` hands the case
/// what `open(&url)` returns (the suite's own async opener, named after `open =`), `url` the URL of
/// a fresh database nobody has opened (for migration and multi-pool cases).
///
/// ```ignore
/// holdfast_testkit::conformance! {
///     open = open_db;
///     opened "current_thread" cart_lines,
///     url    "multi_thread"   concurrent_opens_migrate_once,
/// }
/// ```
#[macro_export]
macro_rules! conformance {
    (open = $open:ident; $($fixture:ident $flavor:tt $name:ident),* $(,)?) => {
        $crate::conformance!(@backend sqlite Sqlite $open; $($fixture $flavor $name),*);
        $crate::conformance!(@backend postgres Postgres $open; $($fixture $flavor $name),*);
    };
    (@backend $m:ident $b:ident $open:ident; $($fixture:ident $flavor:tt $name:ident),*) => {
        mod $m {
            $(
                #[tokio::test(flavor = $flavor)]
                async fn $name() {
                    let test = concat!(module_path!(), "::", stringify!($name));
                    $crate::db::with_fresh_db(
                        $crate::Backend::$b,
                        test,
                        $crate::conformance!(@fixture $open $fixture $name),
                    )
                    .await;
                }
            )*
        }
    };
    (@fixture $open:ident opened $name:ident) => {
        |url: String| async move { super::$name(super::$open(&url).await).await }
    };
    (@fixture $open:ident url $name:ident) => {
        super::$name
    };
}

/// Turns the database at `url` (made by this build, closed) back into the layout of a database
/// made before schemas were split by owner: one list of applied versions, 1 to 3, in
/// `holdfast_migrations`, and none of what the migrations after them made (the job `claim`
/// column, the rate-limit and known-device tables).
pub async fn rewind_to_legacy_layout(url: &str) {
    use sqlx::{Connection, Executor};
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(url)
        .await
        .expect("raw connect");
    for sql in [
        "DROP TABLE holdfast_schema_migrations",
        "ALTER TABLE jobs DROP COLUMN claim",
        "ALTER TABLE jobs DROP COLUMN effect_key",
        "ALTER TABLE jobs DROP COLUMN effect_external_key",
        "ALTER TABLE effect_ledger DROP COLUMN begun",
        "DROP TABLE rate_limits",
        "DROP TABLE known_devices",
        "DROP TABLE upload_parts",
        "DROP TABLE uploads",
        "DROP TABLE holdfast_secrets",
        "CREATE TABLE holdfast_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
        "INSERT INTO holdfast_migrations VALUES (1, 'shop', 1), (2, 'jobs', 2), (3, 'sessions', 3)",
    ] {
        conn.execute(sql).await.expect(sql);
    }
    // The shop's carts as they were then, if the shop's tables are here (the change
    // `cart_lines` moved them).
    let has_lines = conn
        .execute("SELECT 1 FROM cart_lines WHERE 1 = 0")
        .await
        .is_ok();
    if has_lines {
        for sql in [
            "ALTER TABLE cart_lines RENAME TO cart_items",
            "ALTER TABLE cart_items RENAME COLUMN quantity TO qty",
        ] {
            conn.execute(sql).await.expect(sql);
        }
    }
    let _ = conn.close().await;
}
