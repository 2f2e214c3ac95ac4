//! Rate limits on the accounts routes, as an attacker and the attacked meet them: quotas per
//! address and per account that every instance shares through the store and that outlive
//! the instances; a 429 problem with `Retry-After`; and an account's own browsers logging in
//! while strangers have exhausted its shared quota.
//!
//! Requests arrive as through our balancer: from a loopback peer, with the client's address
//! in `X-Forwarded-For`.

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use holdfast_testkit::app::{cookie_of, local, request, send, Reply, PASSWORD};
use holdfast_testkit::db::TempStore;
use holdfast_web::{Quota, RateLimits, WebOptions};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;

const MINUTE: Duration = Duration::from_secs(60);

fn strict() -> WebOptions {
    WebOptions {
        rate_limits: RateLimits {
            login_per_address: Quota::new(5, MINUTE),
            login_per_account: Quota::new(3, MINUTE),
            login_per_device: Quota::new(3, MINUTE),
            signup_per_address: Quota::new(2, MINUTE),
            password_change_per_user: Quota::new(2, MINUTE),
        },
        ..local()
    }
}

/// One instance of the accounts routes on `db`.
fn instance(db: &TempStore) -> Router {
    holdfast_web::app(db.edge(strict()), Router::new())
}

/// A request from `client` as our balancer on loopback forwards it.
async fn from(app: &Router, client: &str, path: &str, body: Value, cookie: Option<&str>) -> Reply {
    let mut headers = vec![("x-forwarded-for", client)];
    headers.extend(cookie.map(|c| ("cookie", c)));
    let mut req: Request<Body> = request("POST", path, Some(body), &headers);
    req.extensions_mut()
        .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
    send(app, req).await
}

/// `POST /api/login` from `client` as [`from`] sends it.
async fn login(
    app: &Router,
    client: &str,
    email: &str,
    password: &str,
    cookie: Option<&str>,
) -> Reply {
    from(app, client, "/api/login", creds(email, password), cookie).await
}

fn creds(email: &str, password: &str) -> Value {
    json!({ "email": email, "password": password })
}

fn assert_rate_limited(r: &Reply) {
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{:?}", r.json());
    assert!(r.is_problem());
    assert_eq!(r.json()["type"], "/problems/rate-limited");
    let wait: u64 = r.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "Retry-After {wait}");
}

/// Every `Set-Cookie` of a reply as one `Cookie` header value.
fn all_cookies(r: &Reply) -> String {
    r.headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok()?.split(';').next())
        .collect::<Vec<_>>()
        .join("; ")
}

#[tokio::test]
async fn one_address_guessing_at_many_accounts_is_refused_and_others_are_not() {
    let db = TempStore::open(&[]).await;
    let app = instance(&db);
    for i in 0..5 {
        let r = login(
            &app,
            "198.51.100.1",
            &format!("v{i}@example.com"),
            "wrong guess!",
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "attempt {i}");
    }
    let r = login(&app, "198.51.100.1", "v9@example.com", "wrong guess!", None).await;
    assert_rate_limited(&r);
    // Malformed attempts count too: they are no cheaper a way to probe.
    let r = login(&app, "198.51.100.1", "not an email", "x", None).await;
    assert_rate_limited(&r);
    let r = login(&app, "198.51.100.2", "v9@example.com", "wrong guess!", None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // The instance remembers the refusal until it lapses: refusing again costs no store
    // round trip (with the store gone, a refused address still gets its 429, not a 503).
    db.store.close().await;
    let again = creds("v1@example.com", "wrong guess!");
    assert_rate_limited(&from(&app, "198.51.100.1", "/api/login", again, None).await);
}

#[tokio::test]
async fn an_accounts_quota_is_shared_by_instances_and_outlives_them() {
    let db = TempStore::open(&[]).await;
    let (a, b) = (instance(&db), instance(&db));
    let signup = from(
        &a,
        "192.0.2.1",
        "/api/signup",
        creds("shared@example.com", PASSWORD),
        None,
    )
    .await;
    assert_eq!(signup.status, StatusCode::CREATED);
    // Three guesses from three addresses, spread over both instances, use the account's quota.
    for (i, app) in [&a, &b, &a].into_iter().enumerate() {
        let addr = format!("203.0.113.{i}");
        let r = login(app, &addr, "Shared@Example.com", "wrong guess!", None).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "guess {i}");
    }
    assert_rate_limited(
        &login(
            &b,
            "203.0.113.9",
            "shared@example.com",
            "wrong guess!",
            None,
        )
        .await,
    );
    // Both instances die; a fresh one on the same store forgives nothing.
    drop((a, b));
    let c = instance(&db);
    assert_rate_limited(&login(&c, "203.0.113.10", "shared@example.com", PASSWORD, None).await);
    // An email with no account behaves the same: the quota does not tell which emails exist.
    for i in 0..3 {
        let r = login(
            &c,
            "203.0.113.20",
            "nobody@example.com",
            "wrong guess!",
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "guess {i}");
    }
    assert_rate_limited(
        &login(
            &c,
            "203.0.113.21",
            "nobody@example.com",
            "wrong guess!",
            None,
        )
        .await,
    );
}

#[tokio::test]
async fn strangers_exhausting_an_account_do_not_lock_out_its_owners_browser() {
    let db = TempStore::open(&[]).await;
    let app = instance(&db);
    let owner = "192.0.2.50";
    let signup = from(
        &app,
        owner,
        "/api/signup",
        creds("victim@example.com", PASSWORD),
        None,
    )
    .await;
    assert_eq!(signup.status, StatusCode::CREATED);
    let first = login(&app, owner, "victim@example.com", PASSWORD, None).await;
    assert_eq!(first.status, StatusCode::OK);
    let browser = all_cookies(&first);
    assert!(browser.contains("holdfast_device="), "{browser}");
    let device_cookie = first
        .headers
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|v| v.starts_with("holdfast_device="))
        .unwrap();
    assert!(device_cookie.contains("HttpOnly") && device_cookie.contains("SameSite=Strict"));

    // Strangers from many addresses guess until the account's shared quota is gone.
    for i in 0..2 {
        let r = login(
            &app,
            &format!("203.0.113.{i}"),
            "victim@example.com",
            "wrong guess!",
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    assert_rate_limited(
        &login(
            &app,
            "203.0.113.7",
            "victim@example.com",
            "wrong guess!",
            None,
        )
        .await,
    );
    // A forged device cookie is just a stranger.
    let forged = format!("holdfast_device={}", "ab".repeat(32));
    assert_rate_limited(
        &login(
            &app,
            "203.0.113.8",
            "victim@example.com",
            PASSWORD,
            Some(&forged),
        )
        .await,
    );
    // A browser the account never used is locked out for now, even with the right password…
    assert_rate_limited(&login(&app, "192.0.2.51", "victim@example.com", PASSWORD, None).await);
    // …but the owner's own browser logs in, again and again, on a quota of its own.
    for i in 0..3 {
        let r = login(&app, owner, "victim@example.com", PASSWORD, Some(&browser)).await;
        assert_eq!(r.status, StatusCode::OK, "owner login {i}: {:?}", r.json());
    }
    assert_rate_limited(&login(&app, owner, "victim@example.com", PASSWORD, Some(&browser)).await);
    // A device known to one account is a stranger to another.
    let other = from(
        &app,
        "192.0.2.60",
        "/api/signup",
        creds("other@example.com", PASSWORD),
        None,
    )
    .await;
    assert_eq!(other.status, StatusCode::CREATED);
    for _ in 0..3 {
        login(
            &app,
            "203.0.113.30",
            "other@example.com",
            "wrong guess!",
            None,
        )
        .await;
    }
    assert_rate_limited(&login(&app, owner, "other@example.com", PASSWORD, Some(&browser)).await);
}

#[tokio::test]
async fn signups_from_one_address_are_limited_hard() {
    let db = TempStore::open(&[]).await;
    let app = instance(&db);
    for i in 0..2 {
        let r = from(
            &app,
            "198.51.100.5",
            "/api/signup",
            creds(&format!("new{i}@example.com"), PASSWORD),
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    // Probing whether an email has an account is as limited as creating accounts.
    assert_rate_limited(
        &from(
            &app,
            "198.51.100.5",
            "/api/signup",
            creds("new0@example.com", PASSWORD),
            None,
        )
        .await,
    );
    let r = from(
        &app,
        "198.51.100.6",
        "/api/signup",
        creds("new0@example.com", PASSWORD),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn guessing_the_current_password_of_a_signed_in_session_is_limited() {
    let db = TempStore::open(&[]).await;
    let app = instance(&db);
    from(
        &app,
        "192.0.2.1",
        "/api/signup",
        creds("me@example.com", PASSWORD),
        None,
    )
    .await;
    let signed_in = login(&app, "192.0.2.1", "me@example.com", PASSWORD, None).await;
    let session = cookie_of(&signed_in);
    let change = |current: &str| json!({ "current_password": current, "new_password": "another long password" });
    for i in 0..2 {
        let r = from(
            &app,
            "192.0.2.1",
            "/api/password",
            change("wrong guess!"),
            Some(&session),
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "guess {i}");
    }
    assert_rate_limited(
        &from(
            &app,
            "192.0.2.1",
            "/api/password",
            change(PASSWORD),
            Some(&session),
        )
        .await,
    );
}
