//! "An axum user can adopt it alone": tower-sessions' own `SessionManagerLayer` over
//! [`HoldfastStore`], in a tiny axum app, on two store handles of one database (two
//! instances). The session follows the client from one to the other, lives in the store
//! under the SHA-256 of its id only, and ends on `flush`.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::routing::get;
use axum::Router;
use holdfast_sessions::tower::HoldfastStore;
use holdfast_store::{Store, StoreOptions};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tower::ServiceExt;
use tower_sessions::session::{Id, Record};
use tower_sessions::session_store::ExpiredDeletion;
use tower_sessions::{Session, SessionManagerLayer, SessionStore};

async fn count(session: Session) -> Result<String, StatusCode> {
    let err = |_| StatusCode::INTERNAL_SERVER_ERROR;
    let n = session.get::<u64>("n").await.map_err(err)?.unwrap_or(0) + 1;
    session.insert("n", n).await.map_err(err)?;
    Ok(n.to_string())
}

async fn logout(session: Session) -> Result<&'static str, StatusCode> {
    session
        .flush()
        .await
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    Ok("bye")
}

fn app(store: Store) -> Router {
    Router::new()
        .route("/", get(count))
        .route("/logout", get(logout))
        .layer(SessionManagerLayer::new(HoldfastStore::new(store)).with_secure(false))
}

async fn get_with(app: &Router, path: &str, cookie: Option<&str>) -> (String, Option<String>) {
    let mut req = Request::builder().uri(path);
    if let Some(c) = cookie {
        req = req.header(header::COOKIE, c);
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let set = resp
        .headers()
        .get(header::SET_COOKIE)
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_owned());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (String::from_utf8(body.to_vec()).unwrap(), set)
}

async fn open(url: &str) -> Store {
    Store::open(&StoreOptions::new(url)).await.unwrap()
}

#[tokio::test]
async fn session_manager_layer_runs_on_the_durable_store() {
    let dir = tempfile::tempdir().unwrap();
    let url = holdfast_store::testing::sqlite_url(dir.path());
    let (one, two) = (open(&url).await, open(&url).await);
    let (a, b) = (app(one.clone()), app(two));

    let (n, set) = get_with(&a, "/", None).await;
    assert_eq!(n, "1");
    let cookie = set.expect("a session cookie");
    assert_eq!(
        get_with(&b, "/", Some(&cookie)).await.0,
        "2",
        "other instance"
    );
    assert_eq!(get_with(&a, "/", Some(&cookie)).await.0, "3");

    // Stored under the id's hash, never the id.
    let id = cookie.split_once('=').unwrap().1;
    let now = holdfast_core::now_ms();
    let hash = hex::encode(Sha256::digest(id.as_bytes()));
    assert!(one.session_blob_get(&hash, now).await.unwrap().is_some());
    assert!(one.session_blob_get(id, now).await.unwrap().is_none());

    get_with(&b, "/logout", Some(&cookie)).await;
    assert!(one.session_blob_get(&hash, now).await.unwrap().is_none());
    assert_eq!(
        get_with(&a, "/", Some(&cookie)).await.0,
        "1",
        "a new session"
    );
}

#[tokio::test]
async fn create_avoids_collisions_and_expired_records_are_gone() {
    let dir = tempfile::tempdir().unwrap();
    let store = HoldfastStore::new(open(&holdfast_store::testing::sqlite_url(dir.path())).await);
    // Whole seconds: the store keeps expiries to the millisecond.
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let in_an_hour = time::OffsetDateTime::from_unix_timestamp(now + 3600).unwrap();
    let mut first = Record {
        id: Id(7),
        data: Default::default(),
        expiry_date: in_an_hour,
    };
    store.create(&mut first).await.unwrap();
    let mut second = first.clone();
    second.data.insert("k".into(), serde_json::json!("v"));
    store.create(&mut second).await.unwrap();
    assert_ne!(second.id, first.id, "a colliding id was replaced");
    assert_eq!(store.load(&second.id).await.unwrap(), Some(second.clone()));

    let mut old = second.clone();
    old.expiry_date = time::OffsetDateTime::now_utc() - time::Duration::seconds(1);
    store.save(&old).await.unwrap();
    assert_eq!(store.load(&old.id).await.unwrap(), None, "expired");
    store.delete_expired().await.unwrap();
    assert_eq!(store.load(&first.id).await.unwrap(), Some(first.clone()));
    store.delete(&first.id).await.unwrap();
    assert_eq!(store.load(&first.id).await.unwrap(), None);
}
