//! The shop's SQL against SQLite and PostgreSQL: every case runs as `sqlite::<case>` and
//! `postgres::<case>` on a brand-new database. Migrations seed the catalog (and adopt a shop
//! made before the store's and the shop's schemas were split); carts hold at most 99 of a line
//! and refuse unknown SKUs; checkout turns exactly the cart it read into one order with its
//! payout job, or nothing; and under real concurrency (50 racers on one key across several
//! pools, double checkouts, adds racing a checkout) exactly one order exists and no cart line
//! is lost.
//!
//! The handlers compose these same steps into store transactions; [`Db`] below does it the
//! same way, one call per step.

use futures::future::join_all;
use holdfast_core::{IdempotencyKey, RequestFingerprint};
use holdfast_shop::sql::{self, Cart, CartLine, CartShape, Order, OrderLine, ProductRow};

/// A fresh store has run every migration, the change `cart_lines` included.
const SHAPE: CartShape = CartShape::NEW;
use holdfast_shop::{Error, OrderId, Quantity, Sku, CATALOG, PAYMENTS_QUEUE, PAYOUT_KIND};
use holdfast_store::{
    Backend, ClaimOutcome, IdemClaim, IdemLock, Rerun, ScopedFutureExt, Store, StoreOptions,
    StoredResponse, TxError,
};
use holdfast_testkit::db::race_one_key;
use sqlx::{Connection, Executor, Row};
use std::convert::Infallible;
use std::time::{Duration, Instant};

holdfast_testkit::conformance! {
    open = open_db;
    opened "current_thread" catalog_is_seeded,
    url "current_thread" a_shop_from_before_the_split_is_adopted,
    opened "current_thread" cart_lines,
    opened "current_thread" checkout_and_orders,
    opened "current_thread" order_list_newest_first,
    opened "current_thread" checkout_enqueues_its_payout_atomically,
    url "multi_thread"   fifty_racers_one_key_one_order,
    opened "multi_thread"   concurrent_checkouts_with_different_keys,
    url "multi_thread"   add_racing_checkout_is_not_lost,
}

async fn open_db(url: &str) -> Db {
    Db::open(url).await
}

type Result<T, E = TxError<Error>> = std::result::Result<T, E>;

/// The shop's steps, each in its own store transaction (as a handler composes it).
#[derive(Clone)]
struct Db(Store);

impl Db {
    async fn open(url: &str) -> Db {
        let opts = StoreOptions::new(url).schema(&holdfast_shop::SCHEMA);
        Db(Store::open(&opts)
            .await
            .unwrap_or_else(|e| panic!("open {url}: {e}")))
    }

    async fn user(&self, name: &str) -> String {
        let e = holdfast_core::Email::parse(&format!("{name}@example.com")).unwrap();
        self.0.user_create(&e, "argon2id$fake").await.unwrap().id
    }

    async fn cart_add(&self, u: &str, s: &str, n: i64) -> Result<Cart> {
        let (s, n) = (Sku::parse(s).unwrap(), Quantity::parse(n).unwrap());
        self.0
            .transaction("cart_add", Rerun::IfUncommitted, |tx| {
                sql::cart_add(tx, SHAPE, u, &s, n).scope_boxed()
            })
            .await
    }

    async fn cart_remove(&self, u: &str, s: &str) -> Result<Cart> {
        let s = Sku::parse(s).unwrap();
        self.0
            .transaction("cart_remove", Rerun::IfUncommitted, |tx| {
                sql::cart_remove(tx, SHAPE, u, &s).scope_boxed()
            })
            .await
    }

    async fn checkout(&self, u: &str) -> Result<Order> {
        self.0
            .transaction("checkout", Rerun::IfUncommitted, |tx| {
                sql::checkout(tx, SHAPE, u).scope_boxed()
            })
            .await
    }

    /// A checkout under a claimed key: the order and its stored answer in one commit.
    async fn checkout_keyed(
        &self,
        u: &str,
        k: &IdempotencyKey,
        token: &str,
    ) -> Result<(Order, StoredResponse)> {
        let lock = IdemLock {
            scope: u,
            key: k,
            token,
        };
        self.0
            .transaction("checkout", Rerun::Always, |tx| {
                async move {
                    let order = sql::checkout(tx, SHAPE, u).await?;
                    let answer = render(&order);
                    tx.idem_finish(lock, &answer).await?;
                    Ok((order, answer))
                }
                .scope_boxed()
            })
            .await
    }

    async fn cart(&self, u: &str) -> Cart {
        self.0
            .read("cart", |c| {
                sql::cart_read::<Infallible>(c, u, SHAPE.read, "").scope_boxed()
            })
            .await
            .unwrap()
    }

    async fn orders(&self, u: &str, limit: i64) -> Vec<Order> {
        self.orders_after(u, &sql::OrdersAfter::newest(), limit)
            .await
    }

    async fn orders_after(&self, u: &str, after: &sql::OrdersAfter, limit: i64) -> Vec<Order> {
        self.0
            .read("orders", |c| {
                sql::order_list::<Infallible>(c, u, after, limit).scope_boxed()
            })
            .await
            .unwrap()
    }

    async fn order(&self, u: &str, id: &OrderId) -> Option<Order> {
        self.0
            .read("order", |c| {
                sql::order_get::<Infallible>(c, u, id).scope_boxed()
            })
            .await
            .unwrap()
    }
}

async fn add(db: &Db, u: &str, s: &str, n: i64) -> Cart {
    db.cart_add(u, s, n).await.unwrap()
}

fn err_kind<T: std::fmt::Debug>(r: Result<T>) -> String {
    match r.expect_err("expected an error") {
        TxError::Abort(e) => format!("{e:?}"),
        TxError::Db(e) => format!("{e:?}"),
    }
}

fn render(order: &Order) -> StoredResponse {
    StoredResponse {
        status: 201,
        body: serde_json::to_vec(order).unwrap(),
    }
}

const T0: i64 = 1_700_000_000_000;
const LOCK: Duration = Duration::from_secs(30);
const LEASE: Duration = Duration::from_secs(10);

fn key(s: &str) -> IdempotencyKey {
    IdempotencyKey::parse(s.as_bytes()).unwrap()
}
fn fp(body: &str) -> RequestFingerprint {
    RequestFingerprint::of("POST", "/api/checkout", body.as_bytes())
}

async fn claim(
    db: &Db,
    u: &str,
    k: &IdempotencyKey,
    f: &RequestFingerprint,
    now: i64,
    ttl: Duration,
) -> ClaimOutcome {
    db.0.idem_claim(IdemClaim {
        scope: u,
        key: k,
        fingerprint: f,
        now,
        lock_ttl: ttl,
    })
    .await
    .unwrap()
}

fn token(outcome: ClaimOutcome) -> String {
    match outcome {
        ClaimOutcome::Claimed { token } => token,
        other => panic!("expected Claimed, got {other:?}"),
    }
}

fn count(counts: &[holdfast_store::QueueCount], queue: &str, state: &str) -> i64 {
    counts
        .iter()
        .find(|c| c.queue == queue && c.state == state)
        .map_or(0, |c| c.count)
}

fn product(s: &str) -> &'static holdfast_shop::Product {
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

// ---- catalog and migrations ----

async fn catalog_is_seeded(db: Db) {
    let mut want: Vec<ProductRow> = CATALOG
        .iter()
        .map(|p| ProductRow {
            sku: p.sku.into(),
            name: p.name.into(),
            price_cents: p.price_cents,
        })
        .collect();
    want.sort_by(|a, b| a.sku.cmp(&b.sku));
    let got =
        db.0.read("products", |c| {
            sql::product_list::<Infallible>(c).scope_boxed()
        })
        .await
        .unwrap();
    assert_eq!(got, want);
}

/// A database from before the split (one list of migrations, `holdfast_migrations` 1 to 3)
/// keeps its catalog, carts and orders: the shop's migration is adopted, not run again.
async fn a_shop_from_before_the_split_is_adopted(url: String) {
    let db = Db::open(&url).await;
    let u = db.user("old-timer").await;
    add(&db, &u, "HELMET", 1).await;
    db.checkout(&u).await.unwrap();
    db.0.close().await;
    holdfast_testkit::db::rewind_to_legacy_layout(&url).await;
    let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
    let db = Db::open(&url).await;
    assert_eq!(db.orders(&u, 10).await.len(), 1, "orders kept");
    let n: i64 = conn
        .fetch_one("SELECT COUNT(*) FROM holdfast_schema_migrations WHERE schema_name = 'shop'")
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        n, 6,
        "the legacy version adopted, the change cart_lines applied on top"
    );
    add(&db, &u, "HELMET", 2).await;
    assert_eq!(db.checkout(&u).await.unwrap().total_cents, 2 * 5900);
}

// ---- cart --------------------------------------------------------------------------------

async fn cart_lines(db: Db) {
    enum Op {
        Add(&'static str, i64),
        Remove(&'static str),
    }
    use Op::*;
    let u = db.user("cart").await;
    let other = db.user("other").await;
    add(&db, &other, "HARNESS", 1).await;

    // Each step: the operation, then the resulting cart or the error (which leaves it unchanged).
    type Lines = &'static [(&'static str, i64)];
    let steps: &[(Op, Result<Lines, &str>)] = &[
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
            Add(s, n) => db.cart_add(&u, s, *n).await,
            Remove(s) => db.cart_remove(&u, s).await,
        };
        match expect {
            Ok(lines) => {
                want = cart_of(lines);
                assert_eq!(got.unwrap(), want, "step {i}");
            }
            Err(kind) => assert_eq!(err_kind(got), *kind, "step {i}"),
        }
        assert_eq!(db.cart(&u).await, want, "step {i}: stored cart");
    }
    // Carts are per user.
    assert_eq!(db.cart(&other).await, cart_of(&[("HARNESS", 1)]));
}

// ---- checkout and orders -----------------------------------------------------------------

async fn checkout_and_orders(db: Db) {
    let u = db.user("buyer").await;
    let v = db.user("snoop").await;
    assert_eq!(err_kind(db.checkout(&u).await), "EmptyCart");

    add(&db, &u, "ROPE-10M", 1).await;
    add(&db, &u, "HELMET", 2).await;
    let order = db.checkout(&u).await.unwrap();
    assert_eq!(order.status, "pending");
    assert_eq!(order.total_cents, 8900 + 2 * 5900);
    assert_eq!(order.items, order_lines(&[("HELMET", 2), ("ROPE-10M", 1)]));
    assert_eq!(db.cart(&u).await, cart_of(&[]));
    assert_eq!(err_kind(db.checkout(&u).await), "EmptyCart");

    let id = OrderId::parse(&order.order_id).unwrap();
    assert_eq!(db.order(&u, &id).await, Some(order.clone()));
    assert_eq!(db.order(&v, &id).await, None, "owner-only");
    assert_eq!(db.order(&u, &OrderId::generate()).await, None);
    assert_eq!(db.orders(&u, 10).await, vec![order]);
    assert_eq!(db.orders(&v, 10).await, vec![]);
}

async fn order_list_newest_first(db: Db) {
    let u = db.user("regular").await;
    let mut placed: Vec<Order> = Vec::new();
    for (s, n) in [("CHALK-BAG", 1), ("HARNESS", 2), ("BELAY-DEV", 3)] {
        // order_list sorts by created_at (ms from the store's clock, which the API does not
        // take): let the clock tick past the previous order so the order is defined.
        if let Some(prev) = placed.last() {
            while holdfast_core::now_ms() <= prev.created_at {
                tokio::task::yield_now().await;
            }
        }
        add(&db, &u, s, n).await;
        placed.push(db.checkout(&u).await.unwrap());
    }
    placed.reverse();
    assert_eq!(db.orders(&u, 10).await, placed);
    assert_eq!(db.orders(&u, 2).await, placed[..2]);
    // The next page starts after the last one shown, with nothing skipped or repeated.
    let after = sql::OrdersAfter {
        created_at: placed[1].created_at,
        id: placed[1].order_id.clone(),
    };
    assert_eq!(db.orders_after(&u, &after, 2).await, placed[2..]);
}

async fn checkout_enqueues_its_payout_atomically(db: Db) {
    let u = db.user("pay").await;
    assert_eq!(err_kind(db.checkout(&u).await), "EmptyCart");
    assert!(
        db.0.job_counts().await.unwrap().is_empty(),
        "a failed checkout enqueues nothing"
    );
    add(&db, &u, "HELMET", 1).await;
    let order = db.checkout(&u).await.unwrap();
    let jobs =
        db.0.job_claim(PAYMENTS_QUEUE, "w", 10, holdfast_core::now_ms() + 1, LEASE)
            .await
            .unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].kind, PAYOUT_KIND);
    let args: serde_json::Value = serde_json::from_str(&jobs[0].args).unwrap();
    assert_eq!(
        (
            args["order_id"].as_str(),
            args["total_cents"].as_i64(),
            args["email"].as_str()
        ),
        (
            Some(order.order_id.as_str()),
            Some(order.total_cents),
            Some("pay@example.com")
        ),
        "the payout carries what its worker needs"
    );
    // A fenced-out idempotent checkout rolls back its payout job with its order.
    add(&db, &u, "HELMET", 1).await;
    let k = key("pay-1");
    let stale = token(claim(&db, &u, &k, &fp("{}"), T0, Duration::from_millis(1)).await);
    token(claim(&db, &u, &k, &fp("{}"), T0 + 10, LOCK).await);
    assert_eq!(
        err_kind(db.checkout_keyed(&u, &k, &stale).await),
        "IdempotencyLockLost"
    );
    let counts = db.0.job_counts().await.unwrap();
    assert_eq!(count(&counts, PAYMENTS_QUEUE, "available"), 0);
    assert_eq!(count(&counts, PAYMENTS_QUEUE, "running"), 1);
    assert_eq!(db.orders(&u, 10).await.len(), 1);
}

/// 50 requests with one key and payload, spread over three stores (three pools) on one
/// database: exactly one does the work; the others see InFlight or replay its answer.
async fn fifty_racers_one_key_one_order(url: String) {
    let stores: Vec<Db> = join_all((0..3).map(|_| Db::open(&url))).await;
    let u = stores[0].user("racer").await;
    add(&stores[0], &u, "HELMET", 2).await;
    let pools: Vec<Store> = stores.iter().map(|d| d.0.clone()).collect();
    let order = race_one_key(&pools, 50, &u, |store, won, _| async move {
        Db(store)
            .checkout_keyed(&won.scope, &won.key, &won.token)
            .await
    })
    .await;
    assert_eq!(stores[1].orders(&u, 100).await, vec![order]);
    assert_eq!(stores[2].cart(&u).await, cart_of(&[]));
}

/// Two checkouts of one cart under different keys, truly in parallel: one order, one EmptyCart
/// (on Postgres this rests on the cart rows being locked `FOR UPDATE OF c`).
async fn concurrent_checkouts_with_different_keys(db: Db) {
    let u = db.user("double").await;
    let f = fp("{}");
    const ROUNDS: usize = 15;
    for round in 0..ROUNDS {
        add(&db, &u, "ROPE-10M", 1).await;
        add(&db, &u, "CARABINER", 2).await;
        let keys = [key(&format!("a{round}")), key(&format!("b{round}"))];
        let mut tasks = Vec::new();
        for k in &keys {
            let tok = token(claim(&db, &u, k, &f, T0, LOCK).await);
            let (db, u, k) = (db.clone(), u.clone(), k.clone());
            tasks.push(tokio::spawn(async move {
                let res = db.checkout_keyed(&u, &k, &tok).await;
                if matches!(res, Err(TxError::Abort(Error::EmptyCart))) {
                    let lock = IdemLock {
                        scope: &u,
                        key: &k,
                        token: &tok,
                    };
                    db.0.idem_release(lock).await.unwrap();
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
            matches!(results[1], Err(TxError::Abort(Error::EmptyCart))),
            "round {round}: {results:?}"
        );
    }
    assert_eq!(db.orders(&u, 100).await.len(), ROUNDS);
    assert_eq!(db.cart(&u).await, cart_of(&[]));
}

/// A line added while a checkout is running ends up either in the order or still in the cart,
/// never silently deleted. On Postgres the worst interleaving is forced: the checkout has read
/// (and locked) the cart, then is held at its INSERT into `orders` while the add commits.
/// SQLite's write transaction excludes that interleaving by construction; both also race freely.
async fn add_racing_checkout_is_not_lost(url: String) {
    let db = Db::open(&url).await;
    let u = db.user("busy-hands").await;
    let mut added = 0;
    if db.0.backend() == Backend::Postgres {
        add(&db, &u, "HELMET", 1).await;
        let mut blocker = sqlx::PgConnection::connect(&url).await.unwrap();
        blocker
            .execute("BEGIN; LOCK TABLE orders IN EXCLUSIVE MODE")
            .await
            .unwrap();
        let checkout = tokio::spawn({
            let (db, u) = (db.clone(), u.clone());
            async move { db.checkout(&u).await }
        });
        // The checkout (one statement on Postgres) waits at its INSERT INTO orders.
        wait_for_lock_wait(&url, "%INSERT INTO orders%").await;
        add(&db, &u, "CHALK-BAG", 1).await;
        added += 1;
        blocker.execute("COMMIT").await.unwrap();
        let order = checkout.await.unwrap().unwrap();
        // The line added while the checkout waited is in the order (the one-statement
        // checkout takes its snapshot after the lock wait) or still in the cart (the
        // step-by-step one read the cart first) — exactly once, never dropped.
        let in_order = order.items.iter().any(|l| l.sku == "CHALK-BAG");
        let in_cart = db.cart(&u).await.items.iter().any(|l| l.sku == "CHALK-BAG");
        assert!(
            in_order != in_cart,
            "line added mid-checkout: in the order {in_order}, in the cart {in_cart}"
        );
        assert!(order.items.iter().any(|l| l.sku == "HELMET"));
    }
    for _ in 0..20 {
        add(&db, &u, "HELMET", 1).await;
        let (d1, u1) = (db.clone(), u.clone());
        let checkout = tokio::spawn(async move { d1.checkout(&u1).await });
        add(&db, &u, "CHALK-BAG", 1).await;
        added += 1;
        checkout.await.unwrap().unwrap();
    }
    let in_orders: i64 = db
        .orders(&u, 1000)
        .await
        .iter()
        .flat_map(|o| &o.items)
        .filter(|l| l.sku == "CHALK-BAG")
        .map(|l| l.qty)
        .sum();
    let in_cart: i64 = db
        .cart(&u)
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
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
