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

/// `racers` requests at once with one key and one payload (`claim` names them), the `i`-th on
/// `stores[i % stores.len()]` (separate pools, as separate instances have): each claims the
/// key and, if it wins, runs `work(store, token, i)`. Asserts exactly one committed and that
/// every replay is its answer, which it returns with the work's value.
pub async fn race_one_key<T, W, Fut, E>(
    stores: &[holdfast_store::Store],
    racers: usize,
    claim: holdfast_store::IdemClaim<'_>,
    work: W,
) -> (T, holdfast_store::StoredResponse)
where
    T: Send + std::fmt::Debug + 'static,
    E: std::fmt::Debug + Send + 'static,
    W: Fn(holdfast_store::Store, String, usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(T, holdfast_store::StoredResponse), E>> + Send + 'static,
{
    use holdfast_store::ClaimOutcome;
    let (scope, key, fingerprint) = (
        claim.scope.to_owned(),
        claim.key.clone(),
        claim.fingerprint.clone(),
    );
    let (now, lock_ttl) = (claim.now, claim.lock_ttl);
    let tasks = (0..racers).map(|i| {
        let (store, work) = (stores[i % stores.len()].clone(), work.clone());
        let (scope, key, fingerprint) = (scope.clone(), key.clone(), fingerprint.clone());
        tokio::spawn(async move {
            let claim = holdfast_store::IdemClaim {
                scope: &scope,
                key: &key,
                fingerprint: &fingerprint,
                now,
                lock_ttl,
            };
            match store.idem_claim(claim).await.expect("claim") {
                ClaimOutcome::Claimed { token } => {
                    let (value, answer) = work(store, token, i)
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
    (value, answer)
}
