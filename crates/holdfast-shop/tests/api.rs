//! The shop's HTTP contract, driven in-process through `app(state)` on a fresh SQLite store
//! per test (the kill and concurrency tests that need real processes live in the binary's
//! tests). Each test states a behaviour a client relies on.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use holdfast_shop::{Sabotage, ShopOptions};
use holdfast_store::ScopedFutureExt;
use holdfast_testkit::app::*;
use holdfast_web::WebOptions;
use serde_json::json;
use tower::ServiceExt;
#[tokio::test]
async fn login_sets_a_hardened_cookie_and_rotates_the_session_id() {
    let t = spawn_app(WebOptions::default()).await;
    let creds = json!({ "email": "ann@example.com", "password": "correct horse battery" });
    t.call("POST", "/api/signup", Some(creds.clone()), None, &[])
        .await;
    let first = t
        .call("POST", "/api/login", Some(creds.clone()), None, &[])
        .await;
    let set = first
        .headers
        .get(header::SET_COOKIE)
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    for flag in ["HttpOnly", "SameSite=Lax", "Secure", "Path=/"] {
        assert!(set.contains(flag), "{set} lacks {flag}");
    }
    assert!(set.starts_with("__Host-holdfast_session="));
    let old = cookie_of(&first);
    // Logging in again while presenting the old cookie yields a new id and kills the old one.
    let second = t
        .call("POST", "/api/login", Some(creds), Some(&old), &[])
        .await;
    let new = cookie_of(&second);
    assert_ne!(old, new);
    assert_eq!(
        t.call("GET", "/api/me", None, Some(&old), &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
    let me = t.call("GET", "/api/me", None, Some(&new), &[]).await;
    assert_eq!(me.json()["email"], "ann@example.com");
}

#[tokio::test]
async fn logout_ends_the_session_everywhere() {
    let t = spawn_app(local()).await;
    let c = t.user("bo@example.com").await;
    assert_eq!(
        t.call("POST", "/api/logout", None, Some(&c), &[])
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        t.call("GET", "/api/me", None, Some(&c), &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn wrong_password_and_unknown_email_look_the_same() {
    let t = spawn_app(local()).await;
    t.user("cy@example.com").await;
    let wrong = t
        .call(
            "POST",
            "/api/login",
            Some(json!({"email":"cy@example.com","password":"not the password"})),
            None,
            &[],
        )
        .await;
    let unknown = t
        .call(
            "POST",
            "/api/login",
            Some(json!({"email":"zz@example.com","password":"not the password"})),
            None,
            &[],
        )
        .await;
    assert_eq!(
        (wrong.status, unknown.status),
        (StatusCode::UNAUTHORIZED, StatusCode::UNAUTHORIZED)
    );
    assert_eq!(wrong.body, unknown.body);
    let dup = t
        .call(
            "POST",
            "/api/signup",
            Some(json!({"email":"CY@example.com","password":"whatever123"})),
            None,
            &[],
        )
        .await;
    assert_eq!(dup.status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn cross_site_writes_are_refused_but_plain_clients_pass() {
    let t = spawn_app(local()).await;
    let c = t.user("di@example.com").await;
    let body = || Some(json!({ "sku": "HELMET", "qty": 1 }));
    let cases: &[(&[(&str, &str)], StatusCode)] = &[
        (&[("sec-fetch-site", "cross-site")], StatusCode::FORBIDDEN),
        (&[("sec-fetch-site", "same-site")], StatusCode::FORBIDDEN),
        (&[("origin", "https://evil.example")], StatusCode::FORBIDDEN),
        (&[("origin", "null")], StatusCode::FORBIDDEN),
        (
            &[
                ("sec-fetch-site", "same-origin"),
                ("origin", "http://shop.test"),
            ],
            StatusCode::OK,
        ),
        (&[("origin", "http://shop.test")], StatusCode::OK),
        (&[], StatusCode::OK),
    ];
    for (headers, want) in cases {
        let r = t
            .call("POST", "/api/cart/items", body(), Some(&c), headers)
            .await;
        assert_eq!(r.status, *want, "{headers:?}");
    }
    let cart = t
        .call(
            "GET",
            "/api/cart",
            None,
            Some(&c),
            &[("sec-fetch-site", "cross-site")],
        )
        .await;
    assert_eq!(
        cart.json()["items"][0]["qty"],
        3,
        "only the three allowed writes landed; reads are not blocked"
    );
}

/// On SQLite a keyed checkout is one script: the order, its lines, the emptied cart, the
/// payout job and the key stored done with the answer SQLite renders, which is, byte for byte,
/// the order as the API renders it. The key is never in flight (stored done by the script),
/// and a key the script finds used writes nothing.
#[tokio::test]
async fn a_keyed_checkout_is_one_script_and_answers_the_orders_own_json() {
    let t = spawn_app(local()).await;
    // A name that every JSON escape touches: quotes, a backslash, control characters and
    // text outside ASCII.
    t.store
        .transaction("odd_product", holdfast_store::Rerun::IfUncommitted, |tx| {
            async move {
                sqlx::query(
                    "INSERT INTO products (sku, name, price_cents) VALUES ('ODD-1', $1, 1234)",
                )
                .bind("Rope \"9 mm\" \\ caf\u{e9} \u{2713}\n\t\u{1}\u{7f} end")
                .execute(tx.conn())
                .await?;
                Ok::<_, holdfast_store::TxError<std::convert::Infallible>>(())
            }
            .scope_boxed()
        })
        .await
        .unwrap();
    let c = t.user("script@example.com").await;
    assert_eq!(t.add(&c, "ODD-1", 2).await.status, StatusCode::OK);
    assert_eq!(t.add(&c, "HELMET", 1).await.status, StatusCode::OK);
    let placed = t.checkout(&c, "k-script").await;
    assert_eq!(placed.status, StatusCode::CREATED, "{:?}", placed.json());
    assert!(!placed.replayed());
    let id = placed.json()["order_id"].as_str().unwrap().to_owned();
    let read = t
        .call("GET", &format!("/api/orders/{id}"), None, Some(&c), &[])
        .await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(
        String::from_utf8_lossy(&placed.body),
        String::from_utf8_lossy(&read.body),
        "the stored answer is the order's own JSON"
    );
    assert_eq!(placed.json()["items"].as_array().unwrap().len(), 2);

    let (lease, payouts): (i64, i64) = t
        .store
        .read("key_row", |conn| {
            async move {
                Ok::<_, holdfast_store::TxError<std::convert::Infallible>>(
                    sqlx::query_as(
                        "SELECT (SELECT locked_until - created_at FROM idempotency_keys WHERE idem_key = 'k-script'),
                                (SELECT COUNT(*) FROM jobs WHERE kind = 'payout')",
                    )
                    .fetch_one(conn)
                    .await?,
                )
            }
            .scope_boxed()
        })
        .await
        .unwrap();
    assert_eq!(
        (lease, payouts),
        (0, 1),
        "the key was stored done by the checkout's script, never claimed in flight; one payout"
    );

    // A retry after the cart changed replays the first answer and writes nothing: the order
    // is not placed again, and the new line stays in the cart.
    assert_eq!(t.add(&c, "HELMET", 1).await.status, StatusCode::OK);
    let again = t.checkout(&c, "k-script").await;
    assert!(again.replayed());
    assert_eq!(again.body, placed.body);
    let cart = t.call("GET", "/api/cart", None, Some(&c), &[]).await.json();
    assert_eq!(cart["items"].as_array().unwrap().len(), 1, "{cart}");
    let orders = t
        .call("GET", "/api/orders", None, Some(&c), &[])
        .await
        .json();
    assert_eq!(orders["orders"].as_array().unwrap().len(), 1, "{orders}");
}

#[tokio::test]
async fn checkout_turns_the_cart_into_an_order_once_per_key() {
    let t = spawn_app(local()).await;
    let c = t.user("ed@example.com").await;
    t.add(&c, "ROPE-10M", 1).await;
    t.add(&c, "CARABINER", 2).await;
    let first = t.checkout(&c, "\"order-1\"").await;
    assert_eq!(first.status, StatusCode::CREATED);
    let order = first.json();
    assert_eq!(order["total_cents"], 8900 + 2 * 1250);
    assert_eq!(order["status"], "pending");
    assert!(order["order_id"].is_string());
    // The retry replays the first answer byte for byte and orders nothing new.
    let again = t.checkout(&c, "\"order-1\"").await;
    assert_eq!(
        (again.status, &again.body),
        (StatusCode::CREATED, &first.body)
    );
    assert_eq!(again.headers.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(
        t.call("GET", "/api/orders", None, Some(&c), &[])
            .await
            .json()["orders"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        t.call("GET", "/api/cart", None, Some(&c), &[]).await.json()["items"],
        json!([])
    );
    // A new key on the now-empty cart is a client error, and the key is not burnt by it.
    let empty = t.checkout(&c, "order-2").await;
    assert_eq!(empty.status, StatusCode::UNPROCESSABLE_ENTITY);
    t.add(&c, "HELMET", 1).await;
    assert_eq!(t.checkout(&c, "order-2").await.status, StatusCode::CREATED);
    // The list is paged: two orders, one per page, linked by `next`.
    let page1 = t
        .call("GET", "/api/orders?limit=1", None, Some(&c), &[])
        .await
        .json();
    assert_eq!(page1["orders"].as_array().unwrap().len(), 1);
    let next = page1["next"].as_str().expect("a next page").to_owned();
    let page2 = t.call("GET", &next, None, Some(&c), &[]).await.json();
    assert_eq!(page2["orders"].as_array().unwrap().len(), 1);
    assert_ne!(
        page2["orders"][0]["order_id"],
        page1["orders"][0]["order_id"]
    );
    assert_eq!(page2["next"], serde_json::Value::Null);
    for bad in ["limit=0", "limit=101", "limit=x", "after=nope", "page=2"] {
        let r = t
            .call("GET", &format!("/api/orders?{bad}"), None, Some(&c), &[])
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(r.is_problem(), "{bad}");
    }
}

#[tokio::test]
async fn idempotency_key_errors_follow_the_draft() {
    let t = spawn_app(local()).await;
    let c = t.user("fi@example.com").await;
    t.add(&c, "HELMET", 1).await;
    // Missing key on checkout: 400.
    let missing = t.call("POST", "/api/checkout", None, Some(&c), &[]).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert!(missing.is_problem());
    // Same key, different payload: 422 (checked before any work, so nothing changes).
    let add = |qty| json!({ "sku": "HELMET", "qty": qty });
    let k = [("idempotency-key", "\"cart-1\"")];
    assert_eq!(
        t.call("POST", "/api/cart/items", Some(add(1)), Some(&c), &k)
            .await
            .status,
        StatusCode::OK
    );
    let other = t
        .call("POST", "/api/cart/items", Some(add(2)), Some(&c), &k)
        .await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(other.is_problem());
    // The same key sent to another endpoint is also a different payload.
    assert_eq!(
        t.checkout(&c, "\"cart-1\"").await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        t.call("GET", "/api/cart", None, Some(&c), &[]).await.json()["items"][0]["qty"],
        2
    );
    // Absurd keys: 400, never stored, never a 5xx.
    let long = format!("\"{}\"", "x".repeat(300));
    for bad in [
        "",
        "\"\"",
        "\"unterminated",
        "two words",
        long.as_str(),
        "\"tab\there\"",
    ] {
        let r = t.checkout(&c, bad).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "key {bad:?}");
    }
    // Keys are per user: another user's identical key is independent.
    let c2 = t.user("gu@example.com").await;
    t.add(&c2, "HELMET", 1).await;
    assert_eq!(
        t.checkout(&c2, "\"cart-1\"").await.status,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn users_cannot_see_each_others_orders_or_carts() {
    let t = spawn_app(local()).await;
    let a = t.user("ha@example.com").await;
    let b = t.user("hb@example.com").await;
    t.add(&a, "HARNESS", 1).await;
    let order = t.checkout(&a, "a-1").await.json();
    let path = format!("/api/orders/{}", order["order_id"].as_str().unwrap());
    assert_eq!(
        t.call("GET", &path, None, Some(&a), &[]).await.status,
        StatusCode::OK
    );
    let theirs = t.call("GET", &path, None, Some(&b), &[]).await;
    assert_eq!(
        theirs.status,
        StatusCode::NOT_FOUND,
        "another user's order is indistinguishable from a missing one"
    );
    assert_eq!(
        t.call("GET", &path, None, None, &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        t.call("GET", "/api/orders", None, Some(&b), &[])
            .await
            .json()["orders"],
        json!([])
    );
    t.add(&b, "HELMET", 2).await;
    assert_eq!(
        t.call("GET", "/api/cart", None, Some(&a), &[]).await.json()["items"],
        json!([])
    );
}

/// Bad input never yields a 5xx or a half-written record: each case names its status.
#[tokio::test]
async fn bad_input_gets_a_clear_problem() {
    let t = spawn_app(WebOptions {
        max_body_bytes: 1024,
        ..local()
    })
    .await;
    let c = t.user("in@example.com").await;
    let raw = |method: &str, path: &str, ct: Option<&str>, body: Vec<u8>, cookie: Option<&str>| {
        let cookie: Vec<(&str, &str)> = cookie.map(|c| ("cookie", c)).into_iter().collect();
        raw_request(method, path, ct, body, &cookie)
    };
    let json_ct = Some("application/json");
    let cases: Vec<(Request<Body>, StatusCode)> = vec![
        (
            raw("POST", "/api/signup", json_ct, b"{not json".to_vec(), None),
            StatusCode::BAD_REQUEST,
        ),
        (
            raw("POST", "/api/signup", json_ct, b"".to_vec(), None),
            StatusCode::BAD_REQUEST,
        ),
        (
            raw(
                "POST",
                "/api/signup",
                json_ct,
                br#"{"email":1,"password":[]}"#.to_vec(),
                None,
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            raw(
                "POST",
                "/api/signup",
                json_ct,
                br#"{"email":"x@y.z","password":"short"}"#.to_vec(),
                None,
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            raw(
                "POST",
                "/api/signup",
                json_ct,
                br#"{"email":"nope","password":"longenough"}"#.to_vec(),
                None,
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            raw(
                "POST",
                "/api/signup",
                Some("text/plain"),
                br#"{"email":"x@y.z","password":"longenough"}"#.to_vec(),
                None,
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            raw("POST", "/api/signup", json_ct, vec![b' '; 4096], None),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            raw(
                "POST",
                "/api/cart/items",
                json_ct,
                br#"{"sku":"NOPE","qty":1}"#.to_vec(),
                Some(&c),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            raw(
                "POST",
                "/api/cart/items",
                json_ct,
                br#"{"sku":"HELMET","qty":-3}"#.to_vec(),
                Some(&c),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            raw(
                "POST",
                "/api/cart/items",
                json_ct,
                br#"{"sku":"HELMET","qty":0}"#.to_vec(),
                Some(&c),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            raw(
                "POST",
                "/api/cart/items",
                json_ct,
                br#"{"sku":"HELMET","qty":1.5}"#.to_vec(),
                Some(&c),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            raw(
                "POST",
                "/api/cart/items",
                json_ct,
                br#"{"sku":"HELMET","qty":1e40}"#.to_vec(),
                Some(&c),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            raw(
                "POST",
                "/api/cart/items",
                json_ct,
                br#"{"sku":"HELMET","qty":"1"}"#.to_vec(),
                Some(&c),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            raw(
                "POST",
                "/api/cart/items",
                json_ct,
                br#"{"sku":"HELMET","qty":1,"price":0}"#.to_vec(),
                Some(&c),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            raw(
                "POST",
                "/api/cart/items",
                json_ct,
                br#"{"sku":"HELMET","qty":99}"#.to_vec(),
                Some(&c),
            ),
            StatusCode::OK,
        ),
        (
            raw(
                "POST",
                "/api/cart/items",
                json_ct,
                br#"{"sku":"HELMET","qty":1}"#.to_vec(),
                Some(&c),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            raw("DELETE", "/api/cart/items/%00%ff", None, vec![], Some(&c)),
            StatusCode::NOT_FOUND,
        ),
        (
            raw("DELETE", "/api/cart/items/lower", None, vec![], Some(&c)),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            raw("GET", "/api/orders/not-a-uuid", None, vec![], Some(&c)),
            StatusCode::NOT_FOUND,
        ),
        (
            raw(
                "GET",
                "/api/me",
                None,
                vec![],
                Some("holdfast_session=garbage"),
            ),
            StatusCode::UNAUTHORIZED,
        ),
        (
            raw(
                "GET",
                "/api/me",
                None,
                vec![],
                Some(&format!("holdfast_session={}", "a".repeat(64))),
            ),
            StatusCode::UNAUTHORIZED,
        ),
        (
            raw(
                "GET",
                "/api/me",
                None,
                vec![],
                Some("holdfast_session=;;==; holdfast_session"),
            ),
            StatusCode::UNAUTHORIZED,
        ),
        (
            raw("GET", "/nope", None, vec![], None),
            StatusCode::NOT_FOUND,
        ),
        (
            raw("PUT", "/api/checkout", None, vec![], Some(&c)),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
    ];
    for (i, (req, want)) in cases.into_iter().enumerate() {
        let r = t.send(req).await;
        assert_eq!(
            r.status,
            want,
            "case {i}: {}",
            String::from_utf8_lossy(&r.body)
        );
        if !want.is_success() {
            assert!(r.is_problem(), "case {i} is not problem+json");
            assert_eq!(r.json()["status"], want.as_u16());
        }
    }
    // The cart holds exactly what the one good request added: no half-written records.
    assert_eq!(
        t.call("GET", "/api/cart", None, Some(&c), &[]).await.json()["items"][0]["qty"],
        99
    );
}

#[tokio::test]
async fn health_readiness_metrics_and_page() {
    let t = spawn_app(local()).await;
    assert_eq!(
        t.call("GET", "/healthz", None, None, &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        t.call("GET", "/readyz", None, None, &[]).await.status,
        StatusCode::OK
    );
    let page = t.call("GET", "/", None, None, &[]).await;
    assert!(String::from_utf8_lossy(&page.body).contains("Holdfast shop"));
    let products = t.call("GET", "/api/products", None, None, &[]).await.json();
    assert_eq!(
        products["products"].as_array().unwrap().len(),
        holdfast_shop::CATALOG.len()
    );
    let public = t.call("GET", "/metrics", None, None, &[]).await;
    assert_eq!(
        public.status,
        StatusCode::NOT_FOUND,
        "metrics are not public"
    );
    let metrics = || async {
        let req = Request::get("/metrics").body(Body::empty()).unwrap();
        String::from_utf8(send(&t.operator, req).await.body).unwrap()
    };
    let m = metrics().await;
    assert!(m.contains("holdfast_http_requests_total"), "{m}");
    assert!(m.contains("holdfast_http_request_duration_seconds_bucket"));
    assert!(m.contains("le=\"0.25\""), "a bucket sits at the SLO");
    let c = t.user("met@example.com").await;
    t.add(&c, "HELMET", 1).await;
    t.checkout(&c, "m-1").await;
    let m = metrics().await;
    assert!(m.contains("holdfast_http_requests_total"), "{m}");
    // Queue depth is the fleet's figure, counted once (by `holdfast up`), not per instance.
    assert!(!m.contains("holdfast_jobs{"), "{m}");
}

#[tokio::test]
async fn draining_turns_readiness_off_but_keeps_serving() {
    let t = spawn_app(local()).await;
    let router = t.router.clone();
    t.shop.edge().start_draining();
    let get = |p: &str| Request::builder().uri(p).body(Body::empty()).unwrap();
    assert_eq!(
        router
            .clone()
            .oneshot(get("/readyz"))
            .await
            .unwrap()
            .status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        router.oneshot(get("/api/products")).await.unwrap().status(),
        StatusCode::OK
    );
}

mod fuzz {
    //! Property test over the request parsers, through the real router: whatever the
    //! bytes, headers and cookies, the answer is never a 5xx.
    use super::*;
    use proptest::prelude::*;

    fn arb_body() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            "\\PC{0,200}".prop_map(String::into_bytes),
            (any::<i64>(), "[A-Z-]{0,12}", any::<bool>()).prop_map(|(q, s, extra)| {
                let mut v =
                    json!({ "sku": s, "qty": q, "email": format!("{s}@x.y"), "password": s });
                if extra {
                    v["extra"] = json!(null);
                }
                v.to_string().into_bytes()
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]
        #[test]
        fn no_input_yields_a_server_error(
            route in prop::sample::select(vec![
                ("POST", "/api/signup"), ("POST", "/api/login"), ("POST", "/api/cart/items"),
                ("POST", "/api/checkout"), ("DELETE", "/api/cart/items/HELMET"), ("GET", "/api/orders/x"),
            ]),
            body in arb_body(),
            json_ct in any::<bool>(),
            key in proptest::collection::vec(any::<u8>(), 0..80),
            cookie in "\\PC{0,90}",
            logged_in in any::<bool>(),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let t = spawn_app(local()).await;
                let session = if logged_in { Some(t.user("fz@example.com").await) } else { None };
                let mut b = Request::builder().method(route.0).uri(route.1).header(header::HOST, "shop.test");
                if json_ct { b = b.header(header::CONTENT_TYPE, "application/json"); }
                if let Ok(v) = axum::http::HeaderValue::from_bytes(&key) { b = b.header("idempotency-key", v); }
                let cookie = session.unwrap_or_else(|| format!("holdfast_session={cookie}"));
                if let Ok(v) = axum::http::HeaderValue::from_str(&cookie) { b = b.header(header::COOKIE, v); }
                let r = t.send(b.body(Body::from(body)).unwrap()).await;
                assert!(!r.status.is_server_error(), "{} {} -> {}: {}", route.0, route.1, r.status, String::from_utf8_lossy(&r.body));
            });
        }
    }
}

/// The sabotage switches (for the drill's self-test) really break what they claim to break.
#[tokio::test]
async fn sabotage_switches_break_what_they_say() {
    let sabotaged = |kind| ShopOptions {
        sabotage: Some(kind),
        ..ShopOptions::default()
    };
    let t = spawn_shop(local(), sabotaged(Sabotage::NoIdempotency)).await;
    let c = t.user("sab@example.com").await;
    let k = [("idempotency-key", "same")];
    let add = || Some(json!({ "sku": "HELMET", "qty": 1 }));
    t.call("POST", "/api/cart/items", add(), Some(&c), &k).await;
    t.call("POST", "/api/cart/items", add(), Some(&c), &k).await;
    let cart = t.call("GET", "/api/cart", None, Some(&c), &[]).await.json();
    assert_eq!(cart["items"][0]["qty"], 2, "a retried add ran twice");

    let t = spawn_shop(local(), sabotaged(Sabotage::AckBeforeCommit)).await;
    let c = t.user("ack@example.com").await;
    t.add(&c, "HELMET", 1).await;
    let promised = t.checkout(&c, "k1").await;
    assert_eq!(promised.status, StatusCode::CREATED);
    let path = format!(
        "/api/orders/{}",
        promised.json()["order_id"].as_str().unwrap()
    );
    assert_eq!(
        t.call("GET", &path, None, Some(&c), &[]).await.status,
        StatusCode::NOT_FOUND,
        "acknowledged, not committed"
    );
}

/// What the shop tells a balancer is true: every route in `KEYED_ROUTES` replays a keyed
/// retry instead of acting twice.
#[tokio::test]
async fn every_declared_keyed_route_replays_a_retry() {
    let t = spawn_app(local()).await;
    let c = t.user("keyed@example.com").await;
    assert!(t.add(&c, "HELMET", 1).await.status.is_success());
    for (i, route) in holdfast_shop::KEYED_ROUTES.iter().enumerate() {
        let (method, path) = route.split_once(' ').unwrap();
        let body = (path == "/api/cart/items").then(|| json!({ "sku": "CHALK-BAG", "qty": 1 }));
        let key = format!("\"declared-{i}\"");
        let key = [("idempotency-key", key.as_str())];
        let first = t.call(method, path, body.clone(), Some(&c), &key).await;
        assert!(first.status.is_success(), "{route}: {}", first.status);
        let again = t.call(method, path, body, Some(&c), &key).await;
        assert_eq!(
            (again.status, again.replayed()),
            (first.status, true),
            "{route}"
        );
        assert_eq!(again.body, first.body, "{route}");
    }
}
