//! Store conformance suite: one set of cases, run against SQLite and PostgreSQL.
//!
//! Every case below runs twice, as `sqlite::<case>` and `postgres::<case>`, each on a brand-new
//! database. Passing on both proves that the one `Store` API behaves identically on either
//! engine: migrations seed the catalog and are safe to race; users, sessions (absolute and idle
//! expiry, throttled touches), carts (the 99 cap, unknown SKUs) and checkout behave as
//! documented; the two-phase idempotency protocol answers Claimed / InFlight / Mismatch / Replay
//! correctly, fences a stalled claimant out by its token so it can never create an order, and is
//! scoped per user; reaping removes exactly the dead records; and under real concurrency (50
//! racers on one key across several pools, double checkouts, adds racing a checkout) exactly one
//! order exists and no cart line is lost. Error predicates are checked on real engine errors.
//!
//! Time is passed explicitly (`now` in ms) wherever the API takes it, so expiry is tested without
//! sleeping. Postgres cases need `DATABASE_URL`; without it they skip with a note, except under
//! `CI=true`, where they fail.

use futures::future::join_all;
use holdfast_core::{
    Email, IdempotencyKey, OrderId, Quantity, RequestFingerprint, SessionId, Sku, UserId, CATALOG,
};
use holdfast_store::{
    testing, Cart, CartLine,
    ClaimOutcome::{self, InFlight, Mismatch, Replay},
    Dialect, EffectSettle, Error, IdemClaim, IdemCommit, JobFence, JobInsert, JobRow, Order,
    OrderLine, ProductRow, SessionCreate, SessionRecord, Store, StoreOptions, StoredResponse,
};
use serde::Serialize;
use sqlx::{Connection, Executor, Row};
use std::future::Future;
use std::time::{Duration, Instant};

// ---- harness -----------------------------------------------------------------------------

/// `fixture flavor name`: `store` cases get an opened `Store`, `url` cases the URL of a fresh,
/// never-opened database (for migration and multi-pool cases).
macro_rules! conformance {
    ($($fixture:ident $flavor:tt $name:ident),* $(,)?) => {
        conformance!(@backend sqlite Sqlite; $($fixture $flavor $name),*);
        conformance!(@backend postgres Postgres; $($fixture $flavor $name),*);
    };
    (@backend $m:ident $b:ident; $($fixture:ident $flavor:tt $name:ident),*) => {
        mod $m {
            $(
                #[tokio::test(flavor = $flavor)]
                async fn $name() {
                    let test = concat!(stringify!($m), "::", stringify!($name));
                    super::with_db(super::Backend::$b, test, conformance!(@fixture $fixture $name))
                        .await;
                }
            )*
        }
    };
    (@fixture store $name:ident) => {
        |url: String| async move { super::$name(super::open(&url).await).await }
    };
    (@fixture url $name:ident) => {
        super::$name
    };
}

conformance! {
    store "current_thread" catalog_is_seeded,
    url   "current_thread" reopening_is_a_no_op,
    url   "multi_thread"   concurrent_opens_migrate_once,
    store "current_thread" users,
    store "current_thread" session_absolute_expiry,
    store "current_thread" session_idle_expiry_and_touch_throttle,
    store "current_thread" session_delete,
    store "current_thread" session_touch_many_moves_last_use_forward,
    store "current_thread" password_change_ends_every_session_of_the_user,
    store "current_thread" session_blobs,
    store "current_thread" cart_lines,
    store "current_thread" checkout_and_orders,
    store "current_thread" order_list_newest_first,
    store "current_thread" idem_claim_commit_replay,
    store "current_thread" idem_expired_lock_fences_old_token,
    store "current_thread" idem_release_and_user_scope,
    store "current_thread" reap_removes_only_dead_records,
    url   "multi_thread"   fifty_racers_one_key_one_order,
    store "multi_thread"   concurrent_checkouts_with_different_keys,
    url   "multi_thread"   add_racing_checkout_is_not_lost,
    url   "multi_thread"   error_predicates,
    store "current_thread" job_lifecycle,
    store "current_thread" job_attempts_are_fenced,
    store "current_thread" checkout_enqueues_its_payout_atomically,
    url   "multi_thread"   concurrent_claimers_never_share_a_job,
    store "current_thread" ledger_settles_once,
}

#[derive(Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

/// Runs `case` on a fresh database of `backend`; a Postgres database is dropped afterwards
/// (only if the case passed: a failed case leaves its database for inspection).
async fn with_db<F, Fut>(backend: Backend, test: &str, case: F)
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

async fn open(url: &str) -> Store {
    Store::open(&StoreOptions::new(url))
        .await
        .unwrap_or_else(|e| panic!("open {url}: {e}"))
}

/// One integer from a raw query (for facts the API does not expose, like migration rows).
async fn scalar(url: &str, sql: &str) -> i64 {
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(url)
        .await
        .expect("raw connect");
    conn.fetch_one(sql).await.expect(sql).get(0)
}

// ---- fixtures ----------------------------------------------------------------------------

/// An arbitrary fixed "now" (ms); expiry is driven by offsets from it.
const T0: i64 = 1_700_000_000_000;
const LOCK: Duration = Duration::from_secs(30);
const HOUR: Duration = Duration::from_secs(3600);
/// How many migrations a fresh database records.
const MIGRATIONS: i64 = 3;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
fn email(s: &str) -> Email {
    Email::parse(s).unwrap()
}
fn sku(s: &str) -> Sku {
    Sku::parse(s).unwrap()
}
fn qty(n: i64) -> Quantity {
    Quantity::parse(n).unwrap()
}
fn key(s: &str) -> IdempotencyKey {
    IdempotencyKey::parse(s.as_bytes()).unwrap()
}
fn fp(body: &str) -> RequestFingerprint {
    RequestFingerprint::of("POST", "/api/checkout", body.as_bytes())
}

async fn user(store: &Store, name: &str) -> String {
    let e = email(&format!("{name}@example.com"));
    store.user_create(&e, "argon2id$fake").await.unwrap().id
}

/// The response an idempotent request keeps: not valid UTF-8, to prove the bytes are opaque.
fn render<T: Serialize>(v: &T) -> StoredResponse {
    let mut body = vec![0xff, 0x00];
    body.extend(serde_json::to_vec(v).unwrap());
    StoredResponse { status: 201, body }
}

fn commit<'a, T: Serialize>(
    user_id: &'a str,
    key: &'a IdempotencyKey,
    token: &'a str,
) -> IdemCommit<'a, T> {
    IdemCommit {
        user_id,
        key,
        token,
        render: &render::<T>,
    }
}

async fn claim(
    store: &Store,
    user_id: &str,
    k: &IdempotencyKey,
    f: &RequestFingerprint,
    now: i64,
    ttl: Duration,
) -> ClaimOutcome {
    let c = IdemClaim {
        user_id,
        key: k,
        fingerprint: f,
        now,
        lock_ttl: ttl,
    };
    store.idem_claim(c).await.unwrap()
}

fn token(outcome: ClaimOutcome) -> String {
    match outcome {
        ClaimOutcome::Claimed { token } => token,
        other => panic!("expected Claimed, got {other:?}"),
    }
}

async fn add(store: &Store, user_id: &str, s: &str, n: i64) -> Cart {
    store
        .cart_add(user_id, &sku(s), qty(n), None)
        .await
        .unwrap()
        .0
}

async fn cart(store: &Store, user_id: &str) -> Cart {
    store.cart_get(user_id).await.unwrap()
}

fn product(s: &str) -> &'static holdfast_core::Product {
    CATALOG.iter().find(|p| p.sku == s).unwrap()
}

/// The cart that holds `lines` (given in sku order), priced from the catalog.
fn cart_of(lines: &[(&str, i64)]) -> Cart {
    let items: Vec<CartLine> = lines
        .iter()
        .map(|&(s, q)| {
            let p = product(s);
            CartLine {
                sku: s.into(),
                name: p.name.into(),
                qty: q,
                unit_price_cents: p.price_cents,
                line_total_cents: q * p.price_cents,
            }
        })
        .collect();
    let total_cents = items.iter().map(|l| l.line_total_cents).sum();
    Cart { items, total_cents }
}

fn order_lines(lines: &[(&str, i64)]) -> Vec<OrderLine> {
    cart_of(lines)
        .items
        .into_iter()
        .map(|l| OrderLine {
            sku: l.sku,
            name: l.name,
            qty: l.qty,
            unit_price_cents: l.unit_price_cents,
        })
        .collect()
}

fn err_kind<T: std::fmt::Debug>(r: Result<T, Error>) -> String {
    format!("{:?}", r.expect_err("expected an error"))
}

// ---- migrations --------------------------------------------------------------------------

async fn catalog_is_seeded(store: Store) {
    let mut want: Vec<ProductRow> = CATALOG
        .iter()
        .map(|p| ProductRow {
            sku: p.sku.into(),
            name: p.name.into(),
            price_cents: p.price_cents,
        })
        .collect();
    want.sort_by(|a, b| a.sku.cmp(&b.sku));
    assert_eq!(store.product_list().await.unwrap(), want);
}

async fn reopening_is_a_no_op(url: String) {
    let first = open(&url).await;
    let u = user(&first, "keep").await;
    add(&first, &u, "HELMET", 2).await;
    first.close().await;

    let second = open(&url).await;
    let third = open(&url).await;
    assert_eq!(second.product_list().await.unwrap().len(), CATALOG.len());
    assert_eq!(cart(&third, &u).await, cart_of(&[("HELMET", 2)]));
    assert!(third.user_get(&u).await.unwrap().is_some());
    assert_eq!(
        scalar(&url, "SELECT COUNT(*) FROM holdfast_migrations").await,
        MIGRATIONS
    );
}

/// Several instances starting at once on one fresh database (on SQLite: separate pools on one
/// file, as separate processes would be): the migration lock makes exactly one of them migrate.
async fn concurrent_opens_migrate_once(url: String) {
    let opens = (0..4).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { Store::open(&StoreOptions::new(&url)).await })
    });
    for (i, res) in join_all(opens).await.into_iter().enumerate() {
        let store = res
            .unwrap()
            .unwrap_or_else(|e| panic!("concurrent open #{i}: {e}"));
        assert_eq!(store.product_list().await.unwrap().len(), CATALOG.len());
    }
    assert_eq!(scalar(&url, "SELECT COUNT(*) FROM products").await, 6);
    assert_eq!(
        scalar(&url, "SELECT COUNT(*) FROM holdfast_migrations").await,
        MIGRATIONS
    );
}

// ---- users -------------------------------------------------------------------------------

async fn users(store: Store) {
    let ann = store
        .user_create(&email(" Ann@Example.COM "), "hash-1")
        .await
        .unwrap();
    assert_eq!(ann.email, "ann@example.com");
    assert!(UserId::parse(&ann.id).is_ok());

    let dup = store.user_create(&email("ann@example.com"), "hash-2").await;
    assert_eq!(err_kind(dup), "EmailTaken");

    let creds = store
        .user_credentials(&email("ANN@example.com"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (creds.user, creds.password_hash.as_str()),
        (ann.clone(), "hash-1")
    );
    assert!(store
        .user_credentials(&email("bob@example.com"))
        .await
        .unwrap()
        .is_none());

    assert_eq!(store.user_get(&ann.id).await.unwrap(), Some(ann));
    assert_eq!(
        store
            .user_get(&UserId::generate().to_string())
            .await
            .unwrap(),
        None
    );
}

// ---- sessions ----------------------------------------------------------------------------

async fn new_session(store: &Store, user_id: &str, now: i64, absolute_ttl: Duration) -> SessionId {
    let id = SessionId::generate();
    store
        .session_create(SessionCreate {
            id: &id,
            user_id,
            now,
            absolute_ttl,
        })
        .await
        .unwrap();
    id
}

async fn session_absolute_expiry(store: Store) {
    let u = user(&store, "abs").await;
    let sid = new_session(&store, &u, T0, ms(1000)).await;
    // Re-creating the same id (a retried insert) is not an error.
    store
        .session_create(SessionCreate {
            id: &sid,
            user_id: &u,
            now: T0,
            absolute_ttl: ms(1000),
        })
        .await
        .unwrap();

    let get = |now| store.session_get(&sid, now, HOUR, HOUR);
    let want = SessionRecord {
        user_id: u.clone(),
        created_at: T0,
        expires_at: T0 + 1000,
        last_seen_at: T0,
    };
    assert_eq!(get(T0).await.unwrap(), Some(want.clone()));
    assert_eq!(get(T0 + 999).await.unwrap(), Some(want));
    assert_eq!(get(T0 + 1000).await.unwrap(), None);
    // Deleted, not merely hidden: even an earlier clock no longer finds it.
    assert_eq!(get(T0).await.unwrap(), None);
    assert_eq!(
        store
            .session_get(&SessionId::generate(), T0, HOUR, HOUR)
            .await
            .unwrap(),
        None
    );
}

/// idle_ttl 100 ms, touch_every 60 ms: a read refreshes last use only if the previous refresh is
/// at least 60 ms old, so whether a later read survives reveals whether an earlier one touched.
async fn session_idle_expiry_and_touch_throttle(store: Store) {
    let u = user(&store, "idle").await;
    let cases: &[(&str, &[(i64, bool)])] = &[
        (
            "untouched read does not extend",
            &[(50, true), (100, false)],
        ),
        ("idle boundary", &[(99, true), (198, true), (298, false)]),
        (
            "touched reads extend",
            &[(60, true), (159, true), (258, true), (358, false)],
        ),
        (
            "throttled read in between",
            &[(60, true), (100, true), (159, true), (259, false)],
        ),
    ];
    for (what, steps) in cases {
        let sid = new_session(&store, &u, T0, HOUR).await;
        for &(at, alive) in *steps {
            let got = store
                .session_get(&sid, T0 + at, ms(100), ms(60))
                .await
                .unwrap();
            assert_eq!(got.is_some(), alive, "{what}: read at +{at}ms");
        }
    }
}

async fn session_delete(store: Store) {
    let u = user(&store, "del").await;
    let sid = new_session(&store, &u, T0, HOUR).await;
    store.session_delete(&sid).await.unwrap();
    assert_eq!(store.session_get(&sid, T0, HOUR, HOUR).await.unwrap(), None);
    store.session_delete(&sid).await.unwrap(); // deleting twice is fine
}

/// The Redis tier's batched backstop writes: last use only moves forward, a deleted session
/// is reported gone and never resurrected, and batches larger than one statement work.
async fn session_touch_many_moves_last_use_forward(store: Store) {
    let u = user(&store, "touch").await;
    let (a, b) = (
        new_session(&store, &u, T0, HOUR).await,
        new_session(&store, &u, T0, HOUR).await,
    );
    store.session_delete(&b).await.unwrap();
    let never = SessionId::generate();
    let mut touches = vec![
        (a.clone(), T0 + 50),
        (a.clone(), T0 + 40),
        (b.clone(), T0 + 50),
    ];
    touches.push((never.clone(), T0 + 50));
    let strangers: Vec<SessionId> = (0..600).map(|_| SessionId::generate()).collect();
    touches.extend(strangers.iter().map(|s| (s.clone(), T0)));
    let gone = store.session_touch_many(&touches).await.unwrap();
    assert_eq!(gone.len(), 602, "b, never and the 600 strangers");
    assert!(gone.contains(&b) && gone.contains(&never) && !gone.contains(&a));
    assert_eq!(
        store.session_get(&b, T0, HOUR, HOUR).await.unwrap(),
        None,
        "not resurrected"
    );
    // An older touch does not move last use back.
    assert!(store
        .session_touch_many(&[(a.clone(), T0 + 10)])
        .await
        .unwrap()
        .is_empty());
    let get = |now| store.session_get(&a, now, ms(100), HOUR);
    assert_eq!(
        get(T0 + 149).await.unwrap().map(|r| r.last_seen_at),
        Some(T0 + 50)
    );
    assert_eq!(get(T0 + 150).await.unwrap(), None);
}

async fn password_change_ends_every_session_of_the_user(store: Store) {
    let (u, v) = (user(&store, "pw").await, user(&store, "other").await);
    let (s1, s2, s3) = (
        new_session(&store, &u, T0, HOUR).await,
        new_session(&store, &u, T0, HOUR).await,
        new_session(&store, &v, T0, HOUR).await,
    );
    store.user_set_password(&u, "argon2id$new").await.unwrap();
    let creds = store
        .user_credentials(&email("pw@example.com"))
        .await
        .unwrap();
    assert_eq!(creds.unwrap().password_hash, "argon2id$new");
    assert!(matches!(
        store
            .user_set_password(&UserId::generate().to_string(), "x")
            .await,
        Err(Error::NotFound)
    ));
    assert_eq!(store.user_sessions_valid_after(&u).await.unwrap(), Some(0));

    let mut gone = store.session_delete_user(&u, T0 + 5).await.unwrap();
    gone.sort();
    let mut want = vec![s1.storage_hash(), s2.storage_hash()];
    want.sort();
    assert_eq!(gone, want, "exactly the user's sessions, by hash");
    for s in [&s1, &s2] {
        assert_eq!(store.session_get(s, T0, HOUR, HOUR).await.unwrap(), None);
    }
    assert!(store
        .session_get(&s3, T0, HOUR, HOUR)
        .await
        .unwrap()
        .is_some());
    assert_eq!(
        store.user_sessions_valid_after(&u).await.unwrap(),
        Some(T0 + 5)
    );
    assert_eq!(store.user_sessions_valid_after(&v).await.unwrap(), Some(0));
    // The epoch never moves back; a second call finds nothing left to delete.
    assert!(store.session_delete_user(&u, T0).await.unwrap().is_empty());
    assert_eq!(
        store.user_sessions_valid_after(&u).await.unwrap(),
        Some(T0 + 5)
    );
    assert_eq!(
        store
            .user_sessions_valid_after(&UserId::generate().to_string())
            .await
            .unwrap(),
        None
    );
}

/// Opaque blobs (the tower-sessions adapter's table): create refuses a taken id, put
/// replaces, expired blobs are invisible and reaped.
async fn session_blobs(store: Store) {
    assert!(store
        .session_blob_insert("h1", b"\xff\x00one", T0 + 100)
        .await
        .unwrap());
    assert!(!store
        .session_blob_insert("h1", b"other", T0 + 100)
        .await
        .unwrap());
    assert_eq!(
        store.session_blob_get("h1", T0).await.unwrap(),
        Some((b"\xff\x00one".to_vec(), T0 + 100))
    );
    store
        .session_blob_put("h1", b"two", T0 + 200)
        .await
        .unwrap();
    store.session_blob_put("h2", b"new", T0 + 50).await.unwrap();
    assert_eq!(
        store.session_blob_get("h1", T0 + 100).await.unwrap(),
        Some((b"two".to_vec(), T0 + 200))
    );
    assert_eq!(
        store.session_blob_get("h2", T0 + 50).await.unwrap(),
        None,
        "expired"
    );
    assert_eq!(store.session_blob_reap(T0 + 50).await.unwrap(), 1);
    assert_eq!(store.session_blob_reap(T0 + 50).await.unwrap(), 0);
    store.session_blob_delete("h1").await.unwrap();
    store.session_blob_delete("h1").await.unwrap();
    assert_eq!(store.session_blob_get("h1", T0).await.unwrap(), None);
}

// ---- cart --------------------------------------------------------------------------------

async fn cart_lines(store: Store) {
    enum Op {
        Add(&'static str, i64),
        Remove(&'static str),
    }
    use Op::*;
    let u = user(&store, "cart").await;
    let other = user(&store, "other").await;
    add(&store, &other, "HARNESS", 1).await;

    // Each step: the operation, then the resulting cart or the error (which leaves it unchanged).
    let steps: &[(Op, Result<&[(&str, i64)], &str>)] = &[
        (Add("ROPE-10M", 2), Ok(&[("ROPE-10M", 2)])),
        (
            Add("CARABINER", 3),
            Ok(&[("CARABINER", 3), ("ROPE-10M", 2)]),
        ),
        (Add("ROPE-10M", 3), Ok(&[("CARABINER", 3), ("ROPE-10M", 5)])),
        (Add("ROPE-10M", 95), Err("QuantityLimit")),
        (
            Add("ROPE-10M", 94),
            Ok(&[("CARABINER", 3), ("ROPE-10M", 99)]),
        ),
        (Add("ROPE-10M", 1), Err("QuantityLimit")),
        (Add("NOPE", 1), Err(r#"UnknownSku("NOPE")"#)),
        (Remove("HELMET"), Ok(&[("CARABINER", 3), ("ROPE-10M", 99)])),
        (Remove("CARABINER"), Ok(&[("ROPE-10M", 99)])),
    ];
    let mut want = cart_of(&[]);
    for (i, (op, expect)) in steps.iter().enumerate() {
        let got = match op {
            Add(s, n) => store.cart_add(&u, &sku(s), qty(*n), None).await,
            Remove(s) => store.cart_remove(&u, &sku(s), None).await,
        };
        match expect {
            Ok(lines) => {
                want = cart_of(lines);
                assert_eq!(got.unwrap(), (want.clone(), None), "step {i}");
            }
            Err(kind) => assert_eq!(err_kind(got), *kind, "step {i}"),
        }
        assert_eq!(cart(&store, &u).await, want, "step {i}: stored cart");
    }
    // Carts are per user.
    assert_eq!(cart(&store, &other).await, cart_of(&[("HARNESS", 1)]));
}

// ---- checkout and orders -----------------------------------------------------------------

async fn checkout_and_orders(store: Store) {
    let u = user(&store, "buyer").await;
    let v = user(&store, "snoop").await;
    assert_eq!(err_kind(store.checkout(&u, None).await), "EmptyCart");

    add(&store, &u, "ROPE-10M", 1).await;
    add(&store, &u, "HELMET", 2).await;
    let (order, stored) = store.checkout(&u, None).await.unwrap();
    assert_eq!(stored, None);
    assert_eq!(order.status, "pending");
    assert_eq!(order.total_cents, 8900 + 2 * 5900);
    assert_eq!(order.items, order_lines(&[("HELMET", 2), ("ROPE-10M", 1)]));
    assert_eq!(cart(&store, &u).await, cart_of(&[]));
    assert_eq!(err_kind(store.checkout(&u, None).await), "EmptyCart");

    let id = OrderId::parse(&order.order_id).unwrap();
    assert_eq!(store.order_get(&u, &id).await.unwrap(), Some(order.clone()));
    assert_eq!(store.order_get(&v, &id).await.unwrap(), None, "owner-only");
    assert_eq!(
        store.order_get(&u, &OrderId::generate()).await.unwrap(),
        None
    );
    assert_eq!(store.order_list(&u, 10).await.unwrap(), vec![order]);
    assert_eq!(store.order_list(&v, 10).await.unwrap(), vec![]);
}

async fn order_list_newest_first(store: Store) {
    let u = user(&store, "regular").await;
    let mut placed: Vec<Order> = Vec::new();
    for (s, n) in [("CHALK-BAG", 1), ("HARNESS", 2), ("BELAY-DEV", 3)] {
        // order_list sorts by created_at (ms from the store's clock, which the API does not
        // take): let the clock tick past the previous order so the order is defined.
        if let Some(prev) = placed.last() {
            while holdfast_core::now_ms() <= prev.created_at {
                tokio::task::yield_now().await;
            }
        }
        store.cart_add(&u, &sku(s), qty(n), None).await.unwrap();
        placed.push(store.checkout(&u, None).await.unwrap().0);
    }
    placed.reverse();
    assert_eq!(store.order_list(&u, 10).await.unwrap(), placed);
    assert_eq!(store.order_list(&u, 2).await.unwrap(), placed[..2]);
}

// ---- idempotency -------------------------------------------------------------------------

async fn idem_claim_commit_replay(store: Store) {
    let u = user(&store, "idem").await;
    let (k, f, g) = (key("checkout-1"), fp(r#"{"a":1}"#), fp(r#"{"a":2}"#));
    add(&store, &u, "ROPE-10M", 1).await;

    let tok = token(claim(&store, &u, &k, &f, T0, LOCK).await);
    assert_eq!(claim(&store, &u, &k, &f, T0 + 1, LOCK).await, InFlight);
    assert_eq!(claim(&store, &u, &k, &g, T0 + 1, LOCK).await, Mismatch);

    let (order, stored) = store
        .checkout(&u, Some(&commit(&u, &k, &tok)))
        .await
        .unwrap();
    let stored = stored.expect("a committed response");
    assert_eq!(stored, render(&order));
    // Replays return the exact bytes, and a done key never expires by its lock.
    for now in [T0 + 2, T0 + 10 * 3_600_000] {
        assert_eq!(
            claim(&store, &u, &k, &f, now, LOCK).await,
            Replay(stored.clone())
        );
    }
    assert_eq!(claim(&store, &u, &k, &g, T0 + 2, LOCK).await, Mismatch);

    // A re-run of the attempt that already committed (an ambiguous commit retried) is fenced.
    add(&store, &u, "HELMET", 1).await;
    let rerun = store.checkout(&u, Some(&commit(&u, &k, &tok))).await;
    assert_eq!(err_kind(rerun), "IdempotencyLockLost");
    assert_eq!(store.order_list(&u, 10).await.unwrap(), vec![order]);
    assert_eq!(cart(&store, &u).await, cart_of(&[("HELMET", 1)]));
}

async fn idem_expired_lock_fences_old_token(store: Store) {
    let u = user(&store, "stall").await;
    let (k, f) = (key("slow-1"), fp("{}"));
    add(&store, &u, "HARNESS", 1).await;

    // Claims with a 1 s lock, at T0 + `at` ms.
    let at = |at: i64| claim(&store, &u, &k, &f, T0 + at, ms(1000));
    let old = token(at(0).await);
    assert_eq!(at(999).await, InFlight);
    let new = token(at(1000).await);
    assert_ne!(old, new);
    assert_eq!(at(1001).await, InFlight);

    // The stalled claimant can neither free the key nor commit under it.
    store.idem_release(&u, &k, &old).await.unwrap();
    assert_eq!(at(1002).await, InFlight);
    let late = store.checkout(&u, Some(&commit(&u, &k, &old))).await;
    assert_eq!(err_kind(late), "IdempotencyLockLost");
    let none: Vec<Order> = vec![];
    assert_eq!(store.order_list(&u, 10).await.unwrap(), none, "fenced");
    assert_eq!(cart(&store, &u).await, cart_of(&[("HARNESS", 1)]));

    let (order, stored) = store
        .checkout(&u, Some(&commit(&u, &k, &new)))
        .await
        .unwrap();
    assert_eq!(at(1003).await, Replay(stored.unwrap()));
    assert_eq!(store.order_list(&u, 10).await.unwrap(), vec![order]);
}

async fn idem_release_and_user_scope(store: Store) {
    let (u, v) = (user(&store, "rel-u").await, user(&store, "rel-v").await);
    let (k, f, g) = (key("\"shared key\""), fp("x"), fp("y"));

    let tok = token(claim(&store, &u, &k, &f, T0, LOCK).await);
    store.idem_release(&u, &k, "not-the-token").await.unwrap();
    assert_eq!(claim(&store, &u, &k, &f, T0, LOCK).await, InFlight);
    store.idem_release(&u, &k, &tok).await.unwrap();
    // Released means gone: even a different payload may now claim it.
    let tok2 = token(claim(&store, &u, &k, &g, T0, LOCK).await);
    assert_ne!(tok, tok2);

    // Keys are per user: the same key is free for someone else.
    let vtok = token(claim(&store, &v, &k, &f, T0, LOCK).await);
    let (cart, stored) = store
        .cart_add(&v, &sku("HELMET"), qty(1), Some(&commit(&v, &k, &vtok)))
        .await
        .unwrap();
    assert_eq!(stored.as_ref(), Some(&render(&cart)));
    // Releasing a done key does nothing.
    store.idem_release(&v, &k, &vtok).await.unwrap();
    assert_eq!(
        claim(&store, &v, &k, &f, T0, LOCK).await,
        Replay(stored.unwrap())
    );
    assert_eq!(claim(&store, &u, &k, &g, T0, LOCK).await, InFlight);
}

async fn reap_removes_only_dead_records(store: Store) {
    let (idle, retention) = (ms(100), ms(1000));
    let r = T0 + 10_000; // the reaper's now
    let u = user(&store, "reap").await;

    let live = new_session(&store, &u, r - 10, HOUR).await;
    new_session(&store, &u, r - 50, ms(40)).await; // absolute expiry at r-10, not idle
    new_session(&store, &u, r - 100, HOUR).await; // idle exactly idle_ttl

    let f = fp("reap");
    let done = |k: &'static str, now: i64| {
        let (store, u, f) = (&store, &u, &f);
        async move {
            let k = key(k);
            let tok = token(claim(store, u, &k, f, now, LOCK).await);
            store
                .cart_add(u, &sku("HELMET"), qty(1), Some(&commit(u, &k, &tok)))
                .await
                .unwrap();
            store.cart_remove(u, &sku("HELMET"), None).await.unwrap();
        }
    };
    done("old-done", r - 2000).await;
    done("young-done", r - 10).await;
    token(claim(&store, &u, &key("old-expired"), &f, r - 2000, ms(500)).await);
    token(claim(&store, &u, &key("old-live"), &f, r - 2000, HOUR).await);

    assert_eq!(store.reap(r, idle, retention).await.unwrap(), (2, 2));
    assert_eq!(store.reap(r, idle, retention).await.unwrap(), (0, 0));
    assert!(store
        .session_get(&live, r, idle, idle)
        .await
        .unwrap()
        .is_some());

    // A surviving key answers a different payload with Mismatch; a reaped one is free again.
    let g = fp("other");
    for (k, survives) in [
        ("old-done", false),
        ("old-expired", false),
        ("old-live", true),
        ("young-done", true),
    ] {
        let got = claim(&store, &u, &key(k), &g, r, LOCK).await;
        assert_eq!(got == Mismatch, survives, "{k}: {got:?}");
    }
}

// ---- concurrency -------------------------------------------------------------------------

#[derive(Debug)]
enum Raced {
    Committed(Order, StoredResponse),
    Replay(StoredResponse),
    InFlight,
}

/// 50 requests with one key and payload, spread over three stores (three pools) on one
/// database: exactly one does the work; the others see InFlight or replay its answer.
async fn fifty_racers_one_key_one_order(url: String) {
    let stores: Vec<Store> = join_all((0..3).map(|_| open(&url))).await;
    let u = user(&stores[0], "racer").await;
    add(&stores[0], &u, "HELMET", 2).await;
    let (k, f) = (key("race"), fp("{}"));

    let tasks = (0..50).map(|i| {
        let (store, u, k, f) = (stores[i % 3].clone(), u.clone(), k.clone(), f.clone());
        tokio::spawn(async move {
            let c = IdemClaim {
                user_id: &u,
                key: &k,
                fingerprint: &f,
                now: T0,
                lock_ttl: LOCK,
            };
            Ok::<_, Error>(match store.idem_claim(c).await? {
                ClaimOutcome::Claimed { token } => {
                    let (order, stored) = store.checkout(&u, Some(&commit(&u, &k, &token))).await?;
                    Raced::Committed(order, stored.unwrap())
                }
                Replay(r) => Raced::Replay(r),
                InFlight => Raced::InFlight,
                Mismatch => panic!("same fingerprint reported as Mismatch"),
            })
        })
    });
    let results: Vec<Raced> = join_all(tasks)
        .await
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.unwrap()
                .unwrap_or_else(|e| panic!("racer {i} failed: {e}"))
        })
        .collect();

    let committed: Vec<_> = results
        .iter()
        .filter_map(|r| match r {
            Raced::Committed(o, s) => Some((o, s)),
            _ => None,
        })
        .collect();
    assert_eq!(committed.len(), 1, "{results:?}");
    let (order, stored) = committed[0];
    for r in &results {
        if let Raced::Replay(got) = r {
            assert_eq!(got, stored);
        }
    }
    assert_eq!(
        stores[1].order_list(&u, 100).await.unwrap(),
        vec![order.clone()]
    );
    assert_eq!(cart(&stores[2], &u).await, cart_of(&[]));
    assert_eq!(
        claim(&stores[2], &u, &k, &f, T0 + 1, LOCK).await,
        Replay(stored.clone())
    );
}

/// Two checkouts of one cart under different keys, truly in parallel: one order, one EmptyCart
/// (on Postgres this rests on the cart rows being locked `FOR UPDATE OF c`).
async fn concurrent_checkouts_with_different_keys(store: Store) {
    let u = user(&store, "double").await;
    let f = fp("{}");
    const ROUNDS: usize = 15;
    for round in 0..ROUNDS {
        add(&store, &u, "ROPE-10M", 1).await;
        add(&store, &u, "CARABINER", 2).await;
        let keys = [key(&format!("a{round}")), key(&format!("b{round}"))];
        let mut tasks = Vec::new();
        for k in &keys {
            let tok = token(claim(&store, &u, k, &f, T0, LOCK).await);
            let (store, u, k) = (store.clone(), u.clone(), k.clone());
            tasks.push(tokio::spawn(async move {
                let res = store.checkout(&u, Some(&commit(&u, &k, &tok))).await;
                if matches!(res, Err(Error::EmptyCart)) {
                    store.idem_release(&u, &k, &tok).await.unwrap();
                }
                res.map(|(o, _)| o)
            }));
        }
        let mut results: Vec<_> = join_all(tasks)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        results.sort_by_key(Result::is_err);
        assert!(results[0].is_ok(), "round {round}: {results:?}");
        assert_eq!(
            results[0].as_ref().unwrap().items,
            order_lines(&[("CARABINER", 2), ("ROPE-10M", 1)])
        );
        assert!(
            matches!(results[1], Err(Error::EmptyCart)),
            "round {round}: {results:?}"
        );
    }
    assert_eq!(store.order_list(&u, 100).await.unwrap().len(), ROUNDS);
    assert_eq!(cart(&store, &u).await, cart_of(&[]));
}

/// A line added while a checkout is running ends up either in the order or still in the cart,
/// never silently deleted. On Postgres the worst interleaving is forced: the checkout has read
/// (and locked) the cart, then is held at its INSERT into `orders` while the add commits.
/// SQLite's write transaction excludes that interleaving by construction; both also race freely.
async fn add_racing_checkout_is_not_lost(url: String) {
    let store = open(&url).await;
    let u = user(&store, "busy-hands").await;
    let mut added = 0;
    if store.dialect() == Dialect::Postgres {
        add(&store, &u, "HELMET", 1).await;
        let mut blocker = sqlx::PgConnection::connect(&url).await.unwrap();
        blocker
            .execute("BEGIN; LOCK TABLE orders IN EXCLUSIVE MODE")
            .await
            .unwrap();
        let checkout = tokio::spawn({
            let (store, u) = (store.clone(), u.clone());
            async move { store.checkout(&u, None).await }
        });
        wait_for_lock_wait(&url, "INSERT INTO orders%").await;
        add(&store, &u, "CHALK-BAG", 1).await;
        added += 1;
        blocker.execute("COMMIT").await.unwrap();
        let (order, _) = checkout.await.unwrap().unwrap();
        assert_eq!(order.items, order_lines(&[("HELMET", 1)]));
        assert_eq!(
            cart(&store, &u).await,
            cart_of(&[("CHALK-BAG", 1)]),
            "line added mid-checkout was lost"
        );
    }
    for _ in 0..20 {
        add(&store, &u, "HELMET", 1).await;
        let (s1, u1) = (store.clone(), u.clone());
        let checkout = tokio::spawn(async move { s1.checkout(&u1, None).await });
        add(&store, &u, "CHALK-BAG", 1).await;
        added += 1;
        checkout.await.unwrap().unwrap();
    }
    let in_orders: i64 = store
        .order_list(&u, 1000)
        .await
        .unwrap()
        .iter()
        .flat_map(|o| &o.items)
        .filter(|l| l.sku == "CHALK-BAG")
        .map(|l| l.qty)
        .sum();
    let in_cart: i64 = cart(&store, &u)
        .await
        .items
        .iter()
        .filter(|l| l.sku == "CHALK-BAG")
        .map(|l| l.qty)
        .sum();
    assert_eq!(
        in_orders + in_cart,
        added,
        "orders {in_orders} + cart {in_cart}"
    );
}

/// Polls until some backend of this database waits on a lock while running `query_like`.
async fn wait_for_lock_wait(url: &str, query_like: &str) {
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let started = Instant::now();
    loop {
        let n: i64 = sqlx::query(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database()
             AND wait_event_type = 'Lock' AND query LIKE $1",
        )
        .bind(query_like)
        .fetch_one(&mut conn)
        .await
        .unwrap()
        .get(0);
        if n > 0 {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "nothing waited on {query_like}"
        );
        tokio::time::sleep(ms(5)).await;
    }
}

// ---- error predicates --------------------------------------------------------------------

/// What the predicates say: (is_retryable, is_retryable_uncommitted, is_unavailable).
type Class = (bool, bool, bool);
/// Transient and certainly not committed: even a plain write may re-run.
const ROLLED_BACK: Class = (true, true, true);
/// Transient, but the write may have committed: only idempotent work may re-run.
const MAYBE_COMMITTED: Class = (true, false, true);
/// The database refused for good.
const PERMANENT: Class = (false, false, true);
/// The caller's mistake or a domain outcome, not the store's health.
const DOMAIN: Class = (false, false, false);

fn class(e: &Error) -> Class {
    (
        e.is_retryable(),
        e.is_retryable_uncommitted(),
        e.is_unavailable(),
    )
}

fn db_code(e: &sqlx::Error) -> Option<String> {
    e.as_database_error().and_then(|d| d.code()).map(Into::into)
}

async fn error_predicates(url: String) {
    let store = open(&url).await;
    let mut cases: Vec<(String, Error, Class)> = vec![
        ("NotFound".into(), Error::NotFound, DOMAIN),
        ("EmailTaken".into(), Error::EmailTaken, DOMAIN),
        ("UnknownSku".into(), Error::UnknownSku("X".into()), DOMAIN),
        ("QuantityLimit".into(), Error::QuantityLimit, DOMAIN),
        ("EmptyCart".into(), Error::EmptyCart, DOMAIN),
        ("LockLost".into(), Error::IdempotencyLockLost, DOMAIN),
        (
            "PoolTimedOut".into(),
            sqlx::Error::PoolTimedOut.into(),
            ROLLED_BACK,
        ),
        (
            "Io".into(),
            sqlx::Error::Io(std::io::Error::other("reset")).into(),
            MAYBE_COMMITTED,
        ),
    ];
    let bad = Store::open(&StoreOptions::new("mysql://localhost/x")).await;
    cases.push((
        "UnsupportedUrl".into(),
        bad.err().expect("mysql refused"),
        DOMAIN,
    ));

    match store.dialect() {
        Dialect::Sqlite => {
            use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
            use sqlx::ConnectOptions;
            use std::str::FromStr;
            // A real SQLITE_BUSY: one connection holds the write lock, another will not wait.
            let mut holder = SqliteConnection::connect(&url).await.unwrap();
            holder.execute("BEGIN IMMEDIATE").await.unwrap();
            let opts = SqliteConnectOptions::from_str(&url).unwrap();
            let mut impatient = opts.busy_timeout(Duration::ZERO).connect().await.unwrap();
            let busy = impatient.execute("BEGIN IMMEDIATE").await.unwrap_err();
            assert_eq!(db_code(&busy).as_deref(), Some("5"), "{busy:?}");
            cases.push(("SQLITE_BUSY".into(), busy.into(), ROLLED_BACK));
            holder.execute("ROLLBACK").await.unwrap();
            let dup = "INSERT INTO products VALUES ('HELMET', 'x', 1)";
            let dup = impatient.execute(dup).await.unwrap_err();
            cases.push(("SQLITE_CONSTRAINT".into(), dup.into(), PERMANENT));
        }
        Dialect::Postgres => {
            // Real server errors with chosen SQLSTATEs, through the Any driver the store uses.
            let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
            for (code, want) in [
                ("40001", ROLLED_BACK),     // serialization_failure
                ("40P01", ROLLED_BACK),     // deadlock_detected
                ("57P01", MAYBE_COMMITTED), // admin_shutdown
                ("08006", MAYBE_COMMITTED), // connection_failure
                ("23505", PERMANENT),       // unique_violation
                ("42501", PERMANENT),       // insufficient_privilege (low byte 5, like BUSY)
                ("22012", PERMANENT),       // division_by_zero
            ] {
                let sql =
                    format!("DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = '{code}'; END $$");
                let e = conn.execute(sql.as_str()).await.unwrap_err();
                assert_eq!(db_code(&e).as_deref(), Some(code), "{e:?}");
                cases.push((code.into(), e.into(), want));
            }
        }
    }
    for (what, e, want) in cases {
        assert_eq!(class(&e), want, "{what}: {e:?}");
    }
}

// ---- jobs and the effect ledger -------------------------------------------------------

const LEASE: Duration = Duration::from_secs(10);

/// A job due since long ago, so claims at any "now" of the test may take it.
fn job(queue: &str, n: i64) -> JobInsert {
    JobInsert {
        run_at: T0,
        ..JobInsert::new(queue, "noop", format!("{{\"n\":{n}}}"))
    }
}

fn fences(jobs: &[JobRow]) -> Vec<JobFence> {
    jobs.iter().map(JobRow::fence).collect()
}

fn count(counts: &[holdfast_store::QueueCount], queue: &str, state: &str) -> i64 {
    counts
        .iter()
        .find(|c| c.queue == queue && c.state == state)
        .map_or(0, |c| c.count)
}

async fn job_lifecycle(store: Store) {
    let now = holdfast_core::now_ms();
    // Unique keys: the second enqueue is a no-op.
    assert!(store
        .job_enqueue(&job("q", 1).unique("only-once"))
        .await
        .unwrap()
        .is_some());
    assert!(store
        .job_enqueue(&job("q", 1).unique("only-once"))
        .await
        .unwrap()
        .is_none());
    // Priority first, then due time; a scheduled job waits for its time.
    let urgent = JobInsert {
        priority: 0,
        ..job("q", 2)
    };
    let later = JobInsert {
        run_at: now + 60_000,
        ..job("q", 3)
    };
    store
        .job_enqueue_many(&[urgent, later, job("other", 4)])
        .await
        .unwrap();
    let first = store.job_claim("q", "w1", 1, now, LEASE).await.unwrap();
    assert_eq!(
        first[0].args, r#"{"n":2}"#,
        "the most urgent job goes first"
    );
    let rest = store.job_claim("q", "w1", 10, now, LEASE).await.unwrap();
    assert_eq!(rest.len(), 1, "the scheduled job is not due");
    assert_eq!(rest[0].args, r#"{"n":1}"#);
    let got = [first, rest].concat();
    assert!(got.iter().all(|j| j.attempt == 1));
    assert_eq!(
        store.job_next_run_at("q").await.unwrap(),
        Some(now + 60_000)
    );
    // Complete one; fail the other with a retry, then for good.
    assert_eq!(store.job_complete(&[got[0].fence()], now).await.unwrap(), 1);
    assert!(store
        .job_fail(got[1].fence(), "boom", Some(now + 5), now)
        .await
        .unwrap());
    assert!(
        store
            .job_claim("q", "w1", 10, now, LEASE)
            .await
            .unwrap()
            .is_empty(),
        "not due yet"
    );
    let again = store.job_claim("q", "w1", 1, now + 5, LEASE).await.unwrap();
    assert_eq!((again[0].id, again[0].attempt), (got[1].id, 2));
    assert!(store
        .job_fail(again[0].fence(), "boom again", None, now)
        .await
        .unwrap());
    let dead = store.job_dead(10).await.unwrap();
    assert_eq!(
        (dead.len(), dead[0].last_error.as_deref()),
        (1, Some("boom again"))
    );
    // Redrive: available again with a fresh budget.
    assert_eq!(store.job_redrive(Some(dead[0].id), now).await.unwrap(), 1);
    let redriven = store.job_claim("q", "w1", 1, now, LEASE).await.unwrap();
    assert_eq!((redriven[0].id, redriven[0].attempt), (dead[0].id, 1));
    // Release (drain) gives the attempt back without counting it.
    assert_eq!(store.job_release(&fences(&redriven)).await.unwrap(), 1);
    assert_eq!(
        store.job_claim("q", "w1", 1, now, LEASE).await.unwrap()[0].attempt,
        1
    );
    let counts = store.job_counts().await.unwrap();
    assert_eq!(
        (
            count(&counts, "q", "completed"),
            count(&counts, "q", "running"),
            count(&counts, "other", "available")
        ),
        (1, 1, 1)
    );
    // Pruning removes finished jobs only.
    assert_eq!(store.job_prune(now + 1, 100).await.unwrap(), 1);
    assert_eq!(
        count(&store.job_counts().await.unwrap(), "q", "completed"),
        0
    );
}

async fn job_attempts_are_fenced(store: Store) {
    let now = holdfast_core::now_ms();
    store.job_enqueue(&job("q", 1)).await.unwrap();
    let first = store
        .job_claim("q", "stalled", 1, now, LEASE)
        .await
        .unwrap()
        .remove(0);
    // The worker stops heartbeating; its lease lapses and the rescuer frees the job.
    assert_eq!(
        store.job_rescue(now + 1).await.unwrap(),
        (0, 0),
        "lease still live"
    );
    assert_eq!(
        store
            .job_rescue(now + LEASE.as_millis() as i64 + 1)
            .await
            .unwrap(),
        (1, 0)
    );
    let second = store
        .job_claim("q", "fresh", 1, now + 20_000, LEASE)
        .await
        .unwrap()
        .remove(0);
    assert_eq!((second.id, second.attempt), (first.id, 2));
    // The stalled attempt comes back: everything it tries is refused.
    assert_eq!(
        store
            .job_heartbeat(&[first.fence()], now + 99_999)
            .await
            .unwrap(),
        0
    );
    assert_eq!(store.job_complete(&[first.fence()], now).await.unwrap(), 0);
    assert!(!store
        .job_fail(first.fence(), "late", None, now)
        .await
        .unwrap());
    let settle = EffectSettle {
        job: first.fence(),
        effect_key: "charge:x",
        external_id: "ch_1",
        order_paid: None,
        then: None,
    };
    assert_eq!(err_kind(store.effect_settle(&settle).await), "JobLost");
    assert!(
        store.ledger_get("charge:x").await.unwrap().is_none(),
        "a fenced settlement writes nothing"
    );
    // The current attempt still owns it.
    assert_eq!(
        store
            .job_heartbeat(&[second.fence()], now + 99_999)
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.job_complete(&[second.fence()], now).await.unwrap(), 1);
    // A job whose last attempt lapses is dead, not retried forever.
    store
        .job_enqueue(&JobInsert {
            max_attempts: 1,
            ..job("q", 2)
        })
        .await
        .unwrap();
    store.job_claim("q", "w", 1, now, LEASE).await.unwrap();
    assert_eq!(store.job_rescue(now + 60_000).await.unwrap(), (0, 1));
}

async fn checkout_enqueues_its_payout_atomically(store: Store) {
    let u = user(&store, "pay").await;
    assert_eq!(err_kind(store.checkout(&u, None).await), "EmptyCart");
    assert!(
        store.job_counts().await.unwrap().is_empty(),
        "a failed checkout enqueues nothing"
    );
    add(&store, &u, "HELMET", 1).await;
    let (order, _) = store.checkout(&u, None).await.unwrap();
    let jobs = store
        .job_claim(
            holdfast_store::PAYMENTS_QUEUE,
            "w",
            10,
            holdfast_core::now_ms() + 1,
            LEASE,
        )
        .await
        .unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].kind, holdfast_store::PAYOUT_KIND);
    let args: serde_json::Value = serde_json::from_str(&jobs[0].args).unwrap();
    assert_eq!(args["order_id"], order.order_id.as_str());
    // A fenced-out idempotent checkout rolls back its payout job with its order.
    add(&store, &u, "HELMET", 1).await;
    let k = key("pay-1");
    let stale = token(claim(&store, &u, &k, &fp("{}"), T0, ms(1)).await);
    token(claim(&store, &u, &k, &fp("{}"), T0 + 10, LOCK).await);
    assert_eq!(
        err_kind(
            store
                .checkout(&u, Some(&commit::<Order>(&u, &k, &stale)))
                .await
        ),
        "IdempotencyLockLost"
    );
    let counts = store.job_counts().await.unwrap();
    assert_eq!(
        count(&counts, holdfast_store::PAYMENTS_QUEUE, "available"),
        0
    );
    assert_eq!(count(&counts, holdfast_store::PAYMENTS_QUEUE, "running"), 1);
}

async fn concurrent_claimers_never_share_a_job(url: String) {
    let stores = join_all((0..3).map(|_| open(&url))).await;
    let inserts: Vec<JobInsert> = (0..300).map(|n| job("q", n)).collect();
    stores[0].job_enqueue_many(&inserts).await.unwrap();
    let claimers = (0..6).map(|i| {
        let store = stores[i % 3].clone();
        tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = store
                    .job_claim("q", &format!("w{i}"), 7, holdfast_core::now_ms(), LEASE)
                    .await
                    .unwrap();
                if got.is_empty() {
                    return mine;
                }
                store
                    .job_complete(&fences(&got), holdfast_core::now_ms())
                    .await
                    .unwrap();
                mine.extend(got.into_iter().map(|j| j.id));
            }
        })
    });
    let mut all: Vec<i64> = join_all(claimers)
        .await
        .into_iter()
        .flat_map(|r| r.unwrap())
        .collect();
    let claimed = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(
        (claimed, all.len()),
        (300, 300),
        "every job claimed exactly once"
    );
}

async fn ledger_settles_once(store: Store) {
    let u = user(&store, "led").await;
    add(&store, &u, "HARNESS", 1).await;
    let (order, _) = store.checkout(&u, None).await.unwrap();
    let payout = store
        .job_claim(
            holdfast_store::PAYMENTS_QUEUE,
            "w",
            1,
            holdfast_core::now_ms() + 1,
            LEASE,
        )
        .await
        .unwrap()
        .remove(0);
    let effect = format!("charge:{}", order.order_id);
    let (entry, fresh) = store.ledger_begin(&effect, "ext-key-1").await.unwrap();
    assert!(fresh && entry.state == "pending" && entry.external_key == "ext-key-1");
    let (again, fresh) = store.ledger_begin(&effect, "ext-key-2").await.unwrap();
    assert!(
        !fresh && again.external_key == "ext-key-1",
        "a later attempt reuses the first key"
    );
    let receipt = JobInsert::new("email", "receipt_email", "{}".into())
        .unique(format!("receipt:{}", order.order_id));
    let settle = EffectSettle {
        job: payout.fence(),
        effect_key: &effect,
        external_id: "ch_9",
        order_paid: Some(&order.order_id),
        then: Some(receipt),
    };
    store.effect_settle(&settle).await.unwrap();
    let done = store.ledger_get(&effect).await.unwrap().unwrap();
    assert_eq!(
        (done.state.as_str(), done.external_id.as_deref()),
        ("done", Some("ch_9"))
    );
    assert_eq!(
        store
            .order_payout_info(&order.order_id)
            .await
            .unwrap()
            .unwrap()
            .status,
        "paid"
    );
    assert_eq!(
        store
            .order_get(&u, &OrderId::parse(&order.order_id).unwrap())
            .await
            .unwrap()
            .unwrap()
            .status,
        "paid"
    );
    // Settling the same attempt twice is refused; the receipt job exists once.
    assert_eq!(err_kind(store.effect_settle(&settle).await), "JobLost");
    assert_eq!(
        count(&store.job_counts().await.unwrap(), "email", "available"),
        1
    );
}
