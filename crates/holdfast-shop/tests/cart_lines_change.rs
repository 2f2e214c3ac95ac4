//! The change `cart_lines` (carts move from `cart_items.qty` to `cart_lines.quantity`) run
//! phase by phase while an instance of the build from before it and instances of this build
//! serve the same carts side by side, as in a rolling deploy — on both engines. Then every
//! phase rolled back, and the contract that cannot be.

use holdfast_shop::sql::{CartShape, CartTable};
use holdfast_shop::{ShopOptions, SCHEMA, SCHEMA_BEFORE_CART_LINES};
use holdfast_store::{
    MigrateMode, MigrateUntil, MigrationGuard, ScopedFutureExt, Store, StoreOptions,
};
use holdfast_testkit::app::{instance_on, local, TestApp};
use holdfast_testkit::db::with_fresh_db;
use holdfast_testkit::{both_backends, Backend};
use std::convert::Infallible;
use std::time::{Duration, Instant};

const SKUS: [&str; 6] = [
    "BELAY-DEV",
    "CARABINER",
    "CHALK-BAG",
    "HARNESS",
    "HELMET",
    "ROPE-10M",
];

fn old_build() -> ShopOptions {
    ShopOptions {
        schema: &SCHEMA_BEFORE_CART_LINES,
        ..ShopOptions::default()
    }
}

async fn new_instance(url: &str) -> TestApp {
    instance_on(url, local(), ShopOptions::default())
        .await
        .expect("this build starts on the database")
}

async fn old_instance(url: &str) -> TestApp {
    instance_on(url, local(), old_build())
        .await
        .expect("the build from before the change starts on the database")
}

/// The cart as `app` answers it: `(sku, qty)` in SKU order.
async fn cart(app: &TestApp, cookie: &str) -> Vec<(String, i64)> {
    let r = app.call("GET", "/api/cart", None, Some(cookie), &[]).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|l| {
            (
                l["sku"].as_str().expect("sku").to_owned(),
                l["qty"].as_i64().expect("qty"),
            )
        })
        .collect()
}

/// What `holdfast migrate` does, in-process: the store opened without migrating.
struct Migrator {
    store: Store,
    opts: StoreOptions,
    guard: MigrationGuard,
}

impl Migrator {
    async fn open(url: &str) -> Migrator {
        let opts = StoreOptions::new(url)
            .schema(&SCHEMA)
            .migrate(MigrateMode::Inspect);
        Migrator {
            store: Store::open(&opts).await.expect("open the store"),
            opts,
            // One row per batch: the backfill takes several.
            guard: MigrationGuard {
                batch_rows: 1,
                batch_pause: Duration::ZERO,
                ..MigrationGuard::default()
            },
        }
    }

    async fn up_to(&self, version: i64) -> Vec<&'static str> {
        let until = MigrateUntil::Version {
            schema: "shop",
            version,
        };
        self.store
            .migrate_up(&self.opts, &self.guard, &until)
            .await
            .expect("migrate up")
    }

    async fn down_to(&self, version: i64) -> Result<Vec<&'static str>, holdfast_store::Error> {
        self.store
            .migrate_down(&self.opts, "shop", version, &self.guard)
            .await
    }

    /// Every row of `table`: `(user, sku, quantity)`.
    async fn rows(&self, table: CartTable) -> Vec<(String, String, i64)> {
        let (t, q) = match table {
            CartTable::Items => ("cart_items", "qty"),
            CartTable::Lines => ("cart_lines", "quantity"),
        };
        let sql = format!("SELECT user_id, sku, {q} AS n FROM {t} ORDER BY user_id, sku");
        self.store
            .read("rows", |c| {
                let sql = sql.clone();
                async move {
                    let rows: Vec<(String, String, i64)> =
                        sqlx::query_as(&sql).fetch_all(c).await?;
                    Ok::<_, holdfast_store::TxError<Infallible>>(rows)
                }
                .scope_boxed()
            })
            .await
            .expect("read the rows")
    }
}

/// A shopper's whole visit spread over `apps` (instances of either build): each adds a line,
/// one adds to another's line, one removes a line; every instance sees the same cart after
/// each step; the checkout takes exactly that cart and every instance sees it emptied.
async fn shop_across(apps: &[&TestApp], label: &str) {
    let email = format!("{}-{}@example.com", label, uuid::Uuid::new_v4().simple());
    let cookie = apps[0].user(&email).await;
    let mut expected: Vec<(String, i64)> = Vec::new();
    for (i, app) in apps.iter().enumerate() {
        let r = app.add(&cookie, SKUS[i], i as i64 + 1).await;
        assert_eq!(
            r.status,
            200,
            "{label}: add on instance {i}: {:?}",
            r.json()
        );
        expected.push((SKUS[i].to_owned(), i as i64 + 1));
    }
    // One instance adds to a line another wrote (the upsert path, in the other table).
    let last = apps.len() - 1;
    assert_eq!(apps[last].add(&cookie, SKUS[0], 2).await.status, 200);
    expected[0].1 += 2;
    for (i, app) in apps.iter().enumerate() {
        assert_eq!(cart(app, &cookie).await, expected, "{label}: instance {i}");
    }
    let removed = apps[0]
        .call(
            "DELETE",
            &format!("/api/cart/items/{}", SKUS[last]),
            None,
            Some(&cookie),
            &[],
        )
        .await;
    assert_eq!(removed.status, 200, "{label}: {:?}", removed.json());
    expected.pop();
    for (i, app) in apps.iter().enumerate() {
        assert_eq!(cart(app, &cookie).await, expected, "{label}: instance {i}");
    }
    let order = apps[last]
        .checkout(&cookie, &format!("{label}-checkout"))
        .await;
    assert_eq!(order.status, 201, "{label}: {:?}", order.json());
    let ordered: Vec<(String, i64)> = order.json()["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|l| {
            (
                l["sku"].as_str().unwrap().to_owned(),
                l["qty"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ordered, expected, "{label}: the order is the cart");
    for (i, app) in apps.iter().enumerate() {
        assert!(
            cart(app, &cookie).await.is_empty(),
            "{label}: instance {i} still sees lines after the checkout"
        );
    }
}

async fn both_builds_serve_the_same_carts_through_every_phase(backend: Backend) {
    with_fresh_db(backend, "cart_lines_phases", |url| async move {
        let m = Migrator::open(&url).await;
        m.up_to(1).await;
        let old = old_instance(&url).await;
        // Carts from before the change: the backfill carries them over.
        let mut early = Vec::new();
        for i in 0..4i64 {
            let cookie = old.user(&format!("early{i}@example.com")).await;
            assert_eq!(old.add(&cookie, "ROPE-10M", i + 1).await.status, 200);
            assert_eq!(old.add(&cookie, "HELMET", 1).await.status, 200);
            early.push((cookie, i + 1));
        }
        // This build starts with every phase pending: its code runs on either side of each.
        let steady = new_instance(&url).await;
        let (items, lines) = (CartTable::Items, CartTable::Lines);
        for (version, phase, read, write) in [
            (2, "expand", items, items),
            (3, "backfill", items, items),
            (4, "switch-reads", lines, items),
            (5, "switch-writes", lines, lines),
        ] {
            let applied = m.up_to(version).await;
            assert_eq!(applied.len(), 1, "{phase}: {applied:?}");
            assert!(applied[0].contains(&phase.replace('-', "_")), "{applied:?}");
            let fresh = new_instance(&url).await;
            assert_eq!(
                fresh.shop.cart_shape().await.expect("shape"),
                CartShape { read, write },
                "{phase}"
            );
            // The old build still starts, as a rolling deploy needs until the contract.
            let old_again = old_instance(&url).await;
            shop_across(&[&old, &steady, &fresh, &old_again], phase).await;
            if version >= 3 {
                assert_eq!(
                    m.rows(items).await,
                    m.rows(lines).await,
                    "{phase}: both tables hold every cart"
                );
            }
        }
        assert!(
            m.rows(lines).await.len() >= 8,
            "the early carts were copied"
        );

        // The contract waits for every instance to notice the switch, then drops the old
        // shape: the old build is refused from now on; this build's instances keep serving.
        let before = Instant::now();
        assert_eq!(m.up_to(6).await.len(), 1);
        assert!(before.elapsed() < Duration::from_secs(5));
        let refused = instance_on(&url, local(), old_build())
            .await
            .err()
            .expect("the old build is refused after the contract");
        assert!(
            matches!(refused, holdfast_store::Error::SchemaAhead { .. }),
            "{refused}"
        );
        assert!(refused.to_string().contains("0006_cart_lines_contract.sql"));
        let after = new_instance(&url).await;
        assert_eq!(
            after.shop.cart_shape().await.expect("shape"),
            CartShape {
                read: lines,
                write: lines
            }
        );
        shop_across(&[&steady, &after], "contract").await;
        for (cookie, rope) in &early {
            assert_eq!(
                cart(&steady, cookie).await,
                vec![("HELMET".to_owned(), 1), ("ROPE-10M".to_owned(), *rope)],
                "a cart from before the change, after it"
            );
        }
        // There is no way back past the contract, and asking changes nothing.
        let past = m.down_to(1).await.expect_err("down past the contract");
        assert!(
            matches!(past, holdfast_store::Error::PastContract { .. }),
            "{past}"
        );
        assert!(past.to_string().contains("is a contract"), "{past}");
        shop_across(&[&steady, &after], "after-refused-down").await;
    })
    .await;
}

async fn every_phase_rolls_back_in_seconds_losing_no_cart(backend: Backend) {
    with_fresh_db(backend, "cart_lines_rollback", |url| async move {
        let m = Migrator::open(&url).await;
        m.up_to(1).await;
        let old = old_instance(&url).await;
        let steady = new_instance(&url).await;
        let mut carts = Vec::new();
        for version in 2..=5i64 {
            m.up_to(version).await;
            // A cart written in this phase by this build (into cart_lines from version 5).
            let cookie = steady.user(&format!("phase{version}@example.com")).await;
            assert_eq!(steady.add(&cookie, "HARNESS", version).await.status, 200);
            carts.push((cookie, version));
            let started = Instant::now();
            let undone = m.down_to(1).await.expect("down");
            let took = started.elapsed();
            assert_eq!(undone.len() as i64, version - 1, "{undone:?}");
            assert!(
                took < Duration::from_secs(5),
                "rolling back from version {version} took {took:?}"
            );
            // Back to the old shape: both builds see every cart, and serve.
            for app in [&old, &steady] {
                for (cookie, n) in &carts {
                    assert_eq!(
                        cart(app, cookie).await,
                        vec![("HARNESS".to_owned(), *n)],
                        "after rolling back from version {version}"
                    );
                }
            }
            shop_across(&[&old, &steady], &format!("rolled-back-{version}")).await;
        }
    })
    .await;
}

both_backends!(multi_thread;
    both_builds_serve_the_same_carts_through_every_phase,
    every_phase_rolls_back_in_seconds_losing_no_cart,
);

#[test]
fn the_shape_follows_the_switches_a_build_knows() {
    let (items, lines) = (CartTable::Items, CartTable::Lines);
    let shape = |applied: &[i64], known| CartShape::from_applied(applied, known);
    assert_eq!(shape(&[1, 2, 3], 6), CartShape::OLD);
    assert_eq!(
        shape(&[1, 2, 3, 4], 6),
        CartShape {
            read: lines,
            write: items
        }
    );
    assert_eq!(
        shape(&[1, 2, 3, 4, 5], 6),
        CartShape {
            read: lines,
            write: lines
        }
    );
    assert_eq!(
        shape(&[1, 6], 6),
        CartShape {
            read: lines,
            write: lines
        },
        "after the contract only the new shape exists"
    );
    assert_eq!(
        shape(&[1, 2, 3, 4, 5], 1),
        CartShape::OLD,
        "a build that does not know the change ignores its switches"
    );
}
