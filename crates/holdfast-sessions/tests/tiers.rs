//! The session tiers' promises, on a fresh SQLite store per test. Redis cases use `REDIS_URL`
//! (skipped without it, a failure under `CI=true`) and each takes its own key prefix; "Redis
//! lost its memory" is the prefix deleted, and "Redis restarted" is that plus every connection
//! cut and refused for a while (through `holdfast-faultproxy`), never the shared server itself.

use holdfast_faultproxy::FaultProxy;
use holdfast_sessions::redis::aio::ConnectionManager;
use holdfast_sessions::{Config, KeyRing, SessionTier, Sessions};
use holdfast_store::Store;
use holdfast_testkit::db::TempStore;
use holdfast_testkit::redis::flush_prefix;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn db() -> TempStore {
    TempStore::open(&[]).await
}

async fn users(store: &Store, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let email = holdfast_core::Email::parse(&format!("u{i}@example.com")).unwrap();
        ids.push(store.user_create(&email, "argon2id$fake").await.unwrap().id);
    }
    ids
}

fn config() -> Config {
    Config::new(Duration::from_secs(1800), Duration::from_secs(12 * 3600))
}

/// Redis for one test: an admin connection, the URL and a fresh prefix; `None` = skip.
async fn redis(test: &str) -> Option<(ConnectionManager, String, String)> {
    let admin = holdfast_testkit::redis::redis(test).await?;
    let url = std::env::var("REDIS_URL").expect("checked by the helper");
    Some((admin, url, holdfast_testkit::redis::unique_prefix(test)))
}

fn tier(url: &str, prefix: &str, store: &Store, config: Config) -> Sessions {
    let conn = holdfast_sessions::connect_redis(url).unwrap();
    let backend = SessionTier::Redis {
        conn,
        prefix: prefix.to_owned(),
    };
    Sessions::new(backend, store.clone(), config)
}

/// `redis://[auth@]host:port[/db]` with `host:port` replaced by `addr`, and the original
/// `host:port`.
fn rewrite_host(url: &str, addr: &str) -> (String, String) {
    let (scheme, rest) = url.split_once("://").expect("a redis:// URL");
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((a, r)) => (format!("{a}@"), r),
        None => (String::new(), rest),
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let host = match &rest[..end] {
        h if h.contains(':') => h.to_owned(),
        h => format!("{h}:6379"),
    };
    (format!("{scheme}://{auth}{addr}{}", &rest[end..]), host)
}

async fn load_user(s: &Sessions, token: &str) -> Option<String> {
    s.load(token).await.unwrap().map(|l| l.user_id)
}

#[tokio::test]
async fn store_tier_creates_rotates_and_revokes() {
    let db = db().await;
    let u = users(&db.store, 2).await;
    let s = Sessions::new(SessionTier::Store, db.store.clone(), config());
    let first = s.login(&u[0], None).await.unwrap();
    assert_eq!(load_user(&s, first.token()).await.as_ref(), Some(&u[0]));
    let second = s.login(&u[0], Some(first.token())).await.unwrap();
    assert_eq!(load_user(&s, first.token()).await, None, "rotated away");
    let other = s.login(&u[1], None).await.unwrap();
    s.logout(second.token()).await.unwrap();
    assert_eq!(load_user(&s, second.token()).await, None);
    let third = s.login(&u[0], None).await.unwrap();
    s.logout_user(&u[0]).await.unwrap();
    assert_eq!(load_user(&s, third.token()).await, None);
    assert_eq!(load_user(&s, other.token()).await.as_ref(), Some(&u[1]));
    for junk in ["", "x", &"g".repeat(64), "v1.k.p.m"] {
        assert!(s.load(junk).await.unwrap().is_none());
        s.logout(junk).await.unwrap();
    }
}

/// The drill's question, answered by design: 500 users on two instances, Redis restarted
/// (connections cut and refused, every key gone) again and again mid-traffic, and not one
/// request finds its user logged out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarts_mid_traffic_force_no_relogin() {
    let Some((admin, url, prefix)) = redis("redis_restarts_mid_traffic_force_no_relogin").await
    else {
        return;
    };
    let db = db().await;
    let faults = FaultProxy::new();
    let (_, upstream) = rewrite_host(&url, "x");
    let proxy = faults
        .create_proxy("redis", "127.0.0.1:0", &upstream)
        .await
        .unwrap();
    let (proxied, _) = rewrite_host(&url, &proxy.listen);
    // Touch often, so backstop writes race the restarts too.
    let config = Config {
        touch_every: Duration::from_millis(50),
        ..config()
    };
    let a = tier(&proxied, &prefix, &db.store, config);
    let b = tier(&proxied, &prefix, &db.store, config);
    let ids = users(&db.store, 500).await;
    let mut sessions = Vec::new();
    for (i, u) in ids.iter().enumerate() {
        let on = if i % 2 == 0 { &a } else { &b };
        sessions.push((u.clone(), on.login(u, None).await.unwrap()));
    }
    let sessions = Arc::new(sessions);

    let stop = Arc::new(AtomicBool::new(false));
    let (loads, relogins) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut traffic = Vec::new();
    for w in 0..16usize {
        let (a, b, sessions) = (a.clone(), b.clone(), sessions.clone());
        let (loads, relogins, stop) = (loads.clone(), relogins.clone(), stop.clone());
        traffic.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let (user, issued) = &sessions[i % sessions.len()];
                let on = if (i / 7) % 2 == 0 { &a } else { &b };
                match on.load(issued.token()).await {
                    Ok(Some(l)) => assert_eq!(&l.user_id, user),
                    Ok(None) => {
                        relogins.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => panic!("load failed: {e}"),
                }
                loads.fetch_add(1, Ordering::Relaxed);
                i += 16 * 31 + 1;
            }
        }));
    }
    // Each restart opens the instances' breakers for a second; leave Redis up long enough
    // after each for the traffic to come back to it (and re-hydrate).
    let restarts = 4;
    for _ in 0..restarts {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        faults.set_enabled("redis", false).await.unwrap();
        flush_prefix(&admin, &prefix).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        faults.set_enabled("redis", true).await.unwrap();
    }
    // And a plain flush, Redis up throughout: every session comes back from the backstop.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rehydrated = || a.stats().rehydrated + b.stats().rehydrated;
    let before = rehydrated();
    flush_prefix(&admin, &prefix).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while rehydrated() < before + 500 {
        assert!(
            Instant::now() < deadline,
            "only {} re-hydrated",
            rehydrated() - before
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in traffic {
        t.await.unwrap();
    }
    let (sa, sb) = (a.stats(), b.stats());
    eprintln!(
        "{restarts} restarts, {} loads; A {sa:?}; B {sb:?}",
        loads.load(Ordering::Relaxed)
    );
    assert_eq!(relogins.load(Ordering::Relaxed), 0, "forced re-logins");
    assert!(
        sa.store_fallbacks + sb.store_fallbacks > 0,
        "Redis was down"
    );
    assert!(sa.backstop_rows + sb.backstop_rows > 0);
    assert_eq!(sa.revoked_by_backstop + sb.revoked_by_backstop, 0);
    // Every session is still valid, on either instance.
    for (user, issued) in sessions.iter() {
        assert_eq!(load_user(&b, issued.token()).await.as_ref(), Some(user));
    }
    flush_prefix(&admin, &prefix).await.unwrap();
}

/// Logout and "log out everywhere" on instance A are seen by instance B at once (the
/// contract is 1 s): nothing is cached per instance, and both deletes commit before the call
/// returns.
#[tokio::test]
async fn logout_and_password_change_reach_every_instance() {
    let Some((admin, url, prefix)) = redis("logout_and_password_change_reach_every_instance").await
    else {
        return;
    };
    let db = db().await;
    let (a, b) = (
        tier(&url, &prefix, &db.store, config()),
        tier(&url, &prefix, &db.store, config()),
    );
    let u = users(&db.store, 2).await;
    let s1 = a.login(&u[0], None).await.unwrap();
    let s2 = b.login(&u[0], None).await.unwrap();
    let s3 = a.login(&u[0], None).await.unwrap();
    let other = b.login(&u[1], None).await.unwrap();
    for s in [&s1, &s2, &s3] {
        assert!(load_user(&a, s.token()).await.is_some());
        assert!(load_user(&b, s.token()).await.is_some());
    }

    a.logout(s1.token()).await.unwrap();
    let t = Instant::now();
    assert_eq!(load_user(&b, s1.token()).await, None);
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(load_user(&b, s2.token()).await.is_some());

    a.logout_user(&u[0]).await.unwrap();
    let t = Instant::now();
    assert_eq!(load_user(&b, s2.token()).await, None);
    assert_eq!(load_user(&b, s3.token()).await, None);
    assert_eq!(load_user(&a, s3.token()).await, None);
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(load_user(&a, other.token()).await.as_ref(), Some(&u[1]));
    // And after Redis loses everything, the dead stay dead (the backstop has no row).
    flush_prefix(&admin, &prefix).await.unwrap();
    assert_eq!(load_user(&a, s2.token()).await, None);
    assert_eq!(load_user(&a, other.token()).await.as_ref(), Some(&u[1]));
    assert_eq!(a.stats().rehydrated, 1);
    flush_prefix(&admin, &prefix).await.unwrap();
}

/// A session revoked behind Redis' back (its backstop row deleted while Redis could not be
/// told) dies at its next touch: the backstop write finds no row and drops the Redis copy.
#[tokio::test]
async fn a_copy_that_escaped_revocation_dies_at_its_next_touch() {
    let Some((admin, url, prefix)) = redis("a_copy_that_escaped_revocation").await else {
        return;
    };
    let db = db().await;
    let config = Config {
        touch_every: Duration::ZERO,
        ..config()
    };
    let s = tier(&url, &prefix, &db.store, config);
    let u = users(&db.store, 1).await;
    let issued = s.login(&u[0], None).await.unwrap();
    let id = holdfast_core::SessionId::parse(issued.token()).unwrap();
    db.store.session_delete(&id).await.unwrap();
    assert!(
        load_user(&s, issued.token()).await.is_some(),
        "Redis still has it"
    );
    s.flush().await;
    assert_eq!(s.stats().revoked_by_backstop, 1);
    assert_eq!(load_user(&s, issued.token()).await, None);
    flush_prefix(&admin, &prefix).await.unwrap();
}

/// With Redis unreachable, logins and loads are served by the store; when it is back, loads
/// go through Redis again and the sessions made meanwhile are re-hydrated.
#[tokio::test]
async fn redis_down_falls_back_to_the_store() {
    let Some((admin, url, prefix)) = redis("redis_down_falls_back_to_the_store").await else {
        return;
    };
    let db = db().await;
    let faults = FaultProxy::new();
    let (_, upstream) = rewrite_host(&url, "x");
    let proxy = faults
        .create_proxy("redis", "127.0.0.1:0", &upstream)
        .await
        .unwrap();
    let (proxied, _) = rewrite_host(&url, &proxy.listen);
    let s = tier(&proxied, &prefix, &db.store, config());
    let u = users(&db.store, 1).await;
    let before = s.login(&u[0], None).await.unwrap();
    assert!(load_user(&s, before.token()).await.is_some());

    faults.set_enabled("redis", false).await.unwrap();
    let during = s.login(&u[0], None).await.unwrap();
    for t in [&before, &during] {
        assert_eq!(load_user(&s, t.token()).await.as_ref(), Some(&u[0]));
    }
    assert!(s.stats().store_fallbacks >= 1 && s.stats().redis_errors >= 1);
    assert!(
        s.logout(before.token()).await.is_err(),
        "Redis could not be told"
    );
    assert_eq!(
        load_user(&s, before.token()).await,
        None,
        "but the store was"
    );

    faults.set_enabled("redis", true).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.stats().rehydrated == 0 {
        assert!(
            Instant::now() < deadline,
            "never re-hydrated: {:?}",
            s.stats()
        );
        assert_eq!(load_user(&s, during.token()).await.as_ref(), Some(&u[0]));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    flush_prefix(&admin, &prefix).await.unwrap();
}

/// Idle and absolute expiry hold on the Redis path and on the backstop path alike.
#[tokio::test]
async fn idle_and_absolute_ttls_hold_on_both_paths() {
    let Some((admin, url, prefix)) = redis("idle_and_absolute_ttls_hold_on_both_paths").await
    else {
        return;
    };
    let db = db().await;
    let config = Config {
        idle_ttl: Duration::from_millis(600),
        absolute_ttl: Duration::from_millis(1500),
        touch_every: Duration::from_millis(100),
    };
    let s = tier(&url, &prefix, &db.store, config);
    let u = users(&db.store, 1).await;
    let (active, idle) = (
        s.login(&u[0], None).await.unwrap(),
        s.login(&u[0], None).await.unwrap(),
    );
    let start = Instant::now();
    let mut flushed = false;
    while start.elapsed() < Duration::from_millis(1300) {
        assert!(
            load_user(&s, active.token()).await.is_some(),
            "kept alive by use"
        );
        if !flushed && start.elapsed() > Duration::from_millis(700) {
            // The idle one is gone from Redis (PX) and from the backstop (idle check).
            assert_eq!(load_user(&s, idle.token()).await, None);
            flush_prefix(&admin, &prefix).await.unwrap();
            flushed = true;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    tokio::time::sleep(Duration::from_millis(1600).saturating_sub(start.elapsed())).await;
    assert_eq!(load_user(&s, active.token()).await, None, "absolute expiry");
    flush_prefix(&admin, &prefix).await.unwrap();
    assert_eq!(
        load_user(&s, active.token()).await,
        None,
        "on the backstop too"
    );
}

fn cookie_tier(store: &Store, spec: &str, config: Config) -> Sessions {
    let keys = KeyRing::parse(spec).unwrap();
    Sessions::new(SessionTier::Cookie { keys }, store.clone(), config)
}

/// Rotation without logging anyone out: an old-key cookie is accepted and re-signed with the
/// new key; once the old key is removed, cookies still signed by it are refused.
#[tokio::test]
async fn cookie_keys_rotate_without_logging_anyone_out() {
    let db = db().await;
    let u = users(&db.store, 1).await;
    let (k1, k2) = (KeyRing::generate_spec("k1"), KeyRing::generate_spec("k2"));
    let old = cookie_tier(&db.store, &k1, config());
    let both = cookie_tier(&db.store, &format!("{k2},{k1}"), config());
    let new = cookie_tier(&db.store, &k2, config());

    let c1 = old.login(&u[0], None).await.unwrap();
    let fresh = old.load(c1.token()).await.unwrap().unwrap();
    assert!(fresh.reissue.is_none(), "current key, recently refreshed");
    let loaded = both.load(c1.token()).await.unwrap().unwrap();
    assert_eq!(loaded.user_id, u[0]);
    let c2 = loaded.reissue.expect("re-signed");
    assert!(c2.token().starts_with("v1.k2."));
    assert_eq!(c2.expires_at, c1.expires_at, "absolute expiry is kept");
    assert_eq!(both.stats().resigned, 1);
    assert!(both
        .load(c2.token())
        .await
        .unwrap()
        .unwrap()
        .reissue
        .is_none());
    assert_eq!(load_user(&new, c2.token()).await.as_ref(), Some(&u[0]));
    assert_eq!(load_user(&new, c1.token()).await, None, "old key removed");
    assert_eq!(new.stats().rejected, 1);
}

/// A cookie is checked against the user's revocation epoch whenever it is refreshed: after a
/// password change ("log out everywhere") the old cookies die at their next refresh.
#[tokio::test]
async fn cookie_sessions_die_at_refresh_after_a_password_change() {
    let db = db().await;
    let u = users(&db.store, 1).await;
    let config = Config {
        touch_every: Duration::ZERO,
        ..config()
    };
    let s = cookie_tier(&db.store, &KeyRing::generate_spec("k"), config);
    let before = s.login(&u[0], None).await.unwrap();
    assert!(s
        .load(before.token())
        .await
        .unwrap()
        .unwrap()
        .reissue
        .is_some());
    tokio::time::sleep(Duration::from_millis(2)).await;
    s.logout_user(&u[0]).await.unwrap();
    assert_eq!(load_user(&s, before.token()).await, None);
    let after = s.login(&u[0], None).await.unwrap();
    assert_eq!(load_user(&s, after.token()).await.as_ref(), Some(&u[0]));
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        /// Whatever the cookie, the cookie tier answers "no session" — never an error, never
        /// a panic — unless it is a real cookie.
        #[test]
        fn no_cookie_string_is_an_error(
            junk in "\\PC{0,300}",
            cut in 0usize..200,
            flip in 0usize..200,
            byte in any::<u8>(),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let db = db().await;
                let u = users(&db.store, 1).await;
                let s = cookie_tier(&db.store, &KeyRing::generate_spec("k"), config());
                let real = s.login(&u[0], None).await.unwrap().token().to_owned();
                let mut tampered = real.clone().into_bytes();
                let i = flip % tampered.len();
                tampered[i] = byte;
                let tampered = String::from_utf8_lossy(&tampered).into_owned();
                let truncated = &real[..cut.min(real.len() - 1)];
                for t in [junk.as_str(), truncated, tampered.as_str(), &format!("v1.k.{junk}")] {
                    if t == real {
                        continue;
                    }
                    let got = s.load(t).await;
                    assert!(matches!(got, Ok(None)), "{t:?}: {got:?}");
                }
            });
        }
    }
}
