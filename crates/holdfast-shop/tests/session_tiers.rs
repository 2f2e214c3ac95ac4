//! The session tiers through the real router: several instances (routers with their own store
//! pool and session tier) on one database and one Redis prefix, as `holdfast up` runs them.
//! Redis cases use `REDIS_URL` (skipped without it, a failure under `CI=true`); "Redis lost
//! its memory" is the test's key prefix deleted — the shared server is never flushed.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use holdfast_sessions::redis::aio::ConnectionManager;
use holdfast_testkit::app::*;
use holdfast_testkit::redis::flush_prefix;
use holdfast_web::{KeyRing, SessionTier, WebOptions};
use serde_json::json;
use std::time::{Duration, Instant};

/// An admin connection and a Redis tier backend on a fresh prefix; `None` = skip.
async fn redis(test: &str) -> Option<(ConnectionManager, String, SessionTier)> {
    let admin = holdfast_testkit::redis::redis(test).await?;
    let url = std::env::var("REDIS_URL").expect("checked by the helper");
    let prefix = holdfast_testkit::redis::unique_prefix(test);
    let backend = SessionTier::Redis {
        conn: holdfast_sessions::connect_redis(&url).unwrap(),
        prefix: prefix.clone(),
    };
    Some((admin, prefix, backend))
}

fn with(backend: SessionTier) -> WebOptions {
    WebOptions {
        sessions: backend,
        ..local()
    }
}

fn cookie_backend(spec: &str) -> SessionTier {
    SessionTier::Cookie {
        keys: KeyRing::parse(spec).unwrap(),
    }
}

async fn login(t: &TestApp, email: &str, password: &str) -> Reply {
    let creds = json!({ "email": email, "password": password });
    t.call("POST", "/api/login", Some(creds), None, &[]).await
}

async fn change(t: &TestApp, cookie: &str, current: &str, new: &str) -> Reply {
    let body = json!({ "current_password": current, "new_password": new });
    t.call("POST", "/api/password", Some(body), Some(cookie), &[])
        .await
}

async fn me(t: &TestApp, cookie: &str) -> StatusCode {
    t.call("GET", "/api/me", None, Some(cookie), &[])
        .await
        .status
}

/// Invariant 5 through the HTTP edge: Redis loses its memory again and again while users
/// shop on two instances; nobody is asked to log in again and every cart line is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_flushes_mid_traffic_lose_no_session_and_no_cart() {
    let Some((admin, prefix, backend)) = redis("redis_flushes_mid_traffic").await else {
        return;
    };
    let a = spawn_app(with(backend.clone())).await;
    let b = a.sibling(with(backend)).await;
    let mut shoppers = Vec::new();
    for i in 0..8 {
        shoppers.push(a.user(&format!("shopper{i}@example.com")).await);
    }
    const ADDS: i64 = 20;
    let mut flushes = 0;
    for n in 0..ADDS {
        // Every round's adds race a flush: Redis loses its memory in the middle of traffic,
        // however fast the adds are.
        let on = if n % 2 == 0 { &a } else { &b };
        let adds = futures::future::join_all(shoppers.iter().map(|c| on.add(c, "HELMET", 1)));
        let (replies, flushed) = tokio::join!(adds, flush_prefix(&admin, &prefix));
        for r in replies {
            assert_eq!(r.status, StatusCode::OK, "add {n}: {:?}", r.json());
        }
        flushes += flushed.unwrap().min(1);
    }
    assert!(flushes > 3, "Redis lost its memory {flushes} times");
    for cookie in &shoppers {
        let cart = b.call("GET", "/api/cart", None, Some(cookie), &[]).await;
        assert_eq!(cart.status, StatusCode::OK);
        assert_eq!(cart.json()["items"][0]["qty"], ADDS, "no cart line lost");
    }
    flush_prefix(&admin, &prefix).await.unwrap();
}

/// A logout on instance A is seen by instance B at once (the contract: within 1 s).
#[tokio::test]
async fn logout_on_one_instance_is_seen_by_another_within_a_second() {
    let Some((admin, prefix, backend)) = redis("logout_on_one_instance").await else {
        return;
    };
    let a = spawn_app(with(backend.clone())).await;
    let b = a.sibling(with(backend)).await;
    let c = a.user("leaver@example.com").await;
    assert_eq!(
        me(&b, &c).await,
        StatusCode::OK,
        "B has it (and Redis now too)"
    );
    let r = a.call("POST", "/api/logout", None, Some(&c), &[]).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let t = Instant::now();
    let seen = b.call("GET", "/api/me", None, Some(&c), &[]).await;
    assert_eq!(seen.status, StatusCode::UNAUTHORIZED);
    assert!(seen.is_problem());
    assert!(t.elapsed() < Duration::from_secs(1));
    flush_prefix(&admin, &prefix).await.unwrap();
}

/// `POST /api/password` on every tier: the other sessions die on every instance (signed
/// cookies at their next refresh, bounded by `touch_every`), the caller gets a fresh session,
/// and only the new password logs in.
#[tokio::test]
async fn password_change_ends_the_other_sessions_on_every_tier() {
    let mut tiers = vec![
        ("store", SessionTier::Store, None),
        ("cookie", cookie_backend(&KeyRing::generate_spec("k")), None),
    ];
    if let Some((admin, prefix, backend)) = redis("password_change").await {
        tiers.push(("redis", backend, Some((admin, prefix))));
    }
    for (tier, backend, redis) in tiers {
        // A short idle timeout makes the cookie tier's refresh (idle/4) come quickly.
        let opts = WebOptions {
            session_idle_ttl: Duration::from_secs(2),
            ..with(backend)
        };
        let a = spawn_app(opts.clone()).await;
        let b = a.sibling(opts).await;
        let email = format!("pw-{tier}@example.com");
        let c1 = a.user(&email).await;
        let c2 = cookie_of(&login(&b, &email, PASSWORD).await);
        assert_eq!(me(&b, &c2).await, StatusCode::OK);

        let wrong = change(&a, &c1, "not the password", "brand new password").await;
        assert_eq!(
            (wrong.status, wrong.is_problem()),
            (StatusCode::FORBIDDEN, true),
            "{tier}"
        );
        let short = change(&a, &c1, PASSWORD, "short").await;
        assert_eq!(short.status, StatusCode::UNPROCESSABLE_ENTITY, "{tier}");
        let anon = a
            .call(
                "POST",
                "/api/password",
                Some(json!({"current_password": PASSWORD, "new_password": "brand new password"})),
                None,
                &[],
            )
            .await;
        assert_eq!(anon.status, StatusCode::UNAUTHORIZED, "{tier}");

        let ok = change(&a, &c1, PASSWORD, "brand new password").await;
        assert_eq!(ok.status, StatusCode::NO_CONTENT, "{tier}");
        let fresh = cookie_of(&ok);
        assert_ne!(fresh, c1);
        assert_eq!(
            me(&b, &fresh).await,
            StatusCode::OK,
            "{tier}: the caller stays in"
        );
        // Server-side tiers: at once. Signed cookies: at their next refresh.
        let bound = if tier == "cookie" {
            Duration::from_millis(500 + 500)
        } else {
            Duration::ZERO
        };
        let t = Instant::now();
        loop {
            let (s1, s2) = (me(&a, &c1).await, me(&b, &c2).await);
            if s1 == StatusCode::UNAUTHORIZED && s2 == StatusCode::UNAUTHORIZED {
                break;
            }
            assert!(
                t.elapsed() <= bound,
                "{tier}: old sessions alive ({s1}, {s2})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            login(&b, &email, PASSWORD).await.status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            login(&b, &email, "brand new password").await.status,
            StatusCode::OK
        );
        if let Some((admin, prefix)) = redis {
            flush_prefix(&admin, &prefix).await.unwrap();
        }
    }
}

/// Rotation without logging anyone out: a cookie signed by the old key is accepted by an
/// instance whose ring has a new current key, and re-signed with it on that response (with the
/// usual flags); once the old key is removed, the old cookie is refused and the new one works.
#[tokio::test]
async fn cookie_key_rotation_re_signs_on_use_and_removal_rejects() {
    let (k1, k2) = (KeyRing::generate_spec("k1"), KeyRing::generate_spec("k2"));
    let secure = |spec: &str| WebOptions {
        sessions: cookie_backend(spec),
        ..WebOptions::default()
    };
    let old = spawn_app(secure(&k1)).await;
    let rotating = old.sibling(secure(&format!("{k2},{k1}"))).await;
    let rotated = old.sibling(secure(&k2)).await;
    let creds = json!({ "email": "rot@example.com", "password": PASSWORD });
    old.call("POST", "/api/signup", Some(creds.clone()), None, &[])
        .await;
    let c1 = cookie_of(&old.call("POST", "/api/login", Some(creds), None, &[]).await);
    assert!(c1.starts_with("__Host-holdfast_session=v1.k1."), "{c1}");

    let r = rotating.call("GET", "/api/me", None, Some(&c1), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    let set = r.headers.get(header::SET_COOKIE).unwrap().to_str().unwrap();
    for flag in ["HttpOnly", "SameSite=Lax", "Secure", "Path=/", "Max-Age="] {
        assert!(set.contains(flag), "{set} lacks {flag}");
    }
    let c2 = cookie_of(&r);
    assert!(c2.starts_with("__Host-holdfast_session=v1.k2."), "{c2}");
    let again = rotating.call("GET", "/api/me", None, Some(&c2), &[]).await;
    assert!(
        again.headers.get(header::SET_COOKIE).is_none(),
        "current key: no re-sign"
    );

    assert_eq!(me(&rotated, &c2).await, StatusCode::OK);
    let replay = rotated.call("GET", "/api/me", None, Some(&c1), &[]).await;
    assert_eq!(
        (replay.status, replay.is_problem()),
        (StatusCode::UNAUTHORIZED, true)
    );
}

/// Tampered, truncated, wrong-kid, replayed-after-rotation and garbage cookies: 401
/// problem+json, never a 5xx.
#[tokio::test]
async fn bad_cookies_are_refused_with_a_401_problem() {
    let (k1, k2) = (KeyRing::generate_spec("k1"), KeyRing::generate_spec("k2"));
    let t = spawn_app(with(cookie_backend(&k1))).await;
    let c = t.user("bad@example.com").await;
    let (name, value) = c.split_once('=').unwrap();
    let parts: Vec<&str> = value.split('.').collect();
    assert_eq!(parts.len(), 4);
    let flip = |s: &str, i: usize| {
        let mut b = s.as_bytes().to_vec();
        b[i] = if b[i] == b'A' { b'B' } else { b'A' };
        String::from_utf8(b).unwrap()
    };
    // Same kid, different key: what a cookie from before a key was replaced looks like.
    let other = KeyRing::generate_spec("k1");
    let forged = {
        let u = spawn_app(with(cookie_backend(&other))).await;
        u.user("bad@example.com").await
    };
    let forged_value = forged.split_once('=').unwrap().1;
    let cases = [
        (
            "payload tampered",
            format!(
                "{}.{}.{}.{}",
                parts[0],
                parts[1],
                flip(parts[2], 5),
                parts[3]
            ),
        ),
        (
            "mac tampered",
            format!(
                "{}.{}.{}.{}",
                parts[0],
                parts[1],
                parts[2],
                flip(parts[3], 3)
            ),
        ),
        ("truncated", value[..value.len() - 5].to_owned()),
        ("truncated to three parts", parts[..3].join(".")),
        (
            "unknown kid",
            format!("{}.zz.{}.{}", parts[0], parts[2], parts[3]),
        ),
        (
            "kid swapped",
            format!("{}.k2.{}.{}", parts[0], parts[2], parts[3]),
        ),
        (
            "other version",
            format!("v2.{}.{}.{}", parts[1], parts[2], parts[3]),
        ),
        ("signed by a replaced key", forged_value.to_owned()),
        ("garbage", "%%%not-a-cookie%%%".to_owned()),
        ("a store session id", "ab".repeat(32)),
        ("empty parts", "v1...".to_owned()),
    ];
    let rotated = t.sibling(with(cookie_backend(&format!("{k2},{k1}")))).await;
    for (what, v) in &cases {
        for app in [&t, &rotated] {
            let r = app
                .call("GET", "/api/me", None, Some(&format!("{name}={v}")), &[])
                .await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}");
            assert!(r.is_problem(), "{what}");
        }
    }
    assert_eq!(me(&t, &c).await, StatusCode::OK, "the real one still works");
}

mod fuzz {
    //! Whatever the cookie — random, or a real one cut or with a byte changed — the cookie
    //! tier answers 401 problem+json or, for the untouched real cookie, 200. Never a 5xx.
    use super::*;
    use holdfast_sessions::{Config, Sessions};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn no_cookie_yields_a_server_error(
            junk in "[ -~]{0,300}",
            cut in 0usize..200,
            at in 0usize..200,
            byte in 0x21u8..0x7f,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let spec = KeyRing::generate_spec("k");
                let t = spawn_app(with(cookie_backend(&spec))).await;
                // Mint a real cookie without argon2: same ring, same store.
                let email = holdfast_core::Email::parse("fz@example.com").unwrap();
                let user = t.store.user_create(&email, "argon2id$fake").await.unwrap();
                let keys = KeyRing::parse(&spec).unwrap();
                let minter = Sessions::new(SessionTier::Cookie { keys }, t.store.clone(),
                    Config::new(Duration::from_secs(60), Duration::from_secs(600)));
                let real = minter.login(&user.id, None).await.unwrap().token().to_owned();
                let mut changed = real.clone().into_bytes();
                let i = at % changed.len();
                changed[i] = byte;
                let changed = String::from_utf8(changed).unwrap();
                for v in [junk.clone(), real[..cut.min(real.len())].to_owned(), changed, real.clone()] {
                    let cookie = format!("holdfast_session={v}");
                    let Ok(hv) = axum::http::HeaderValue::from_str(&cookie) else { continue };
                    let req = Request::builder().uri("/api/me").header(header::HOST, "shop.test")
                        .header(header::COOKIE, hv).body(Body::empty()).unwrap();
                    let r = t.send(req).await;
                    let want = if v == real { StatusCode::OK } else { StatusCode::UNAUTHORIZED };
                    assert_eq!(r.status, want, "{v:?}");
                    assert!(r.status == StatusCode::OK || r.is_problem());
                }
            });
        }
    }
}
