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
