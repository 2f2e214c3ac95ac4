//! The reference application: a small shop composed on Holdfast's generic crates, and the
//! one place that knows what an order is.
//!
//! - `sql.rs`: its tables' SQL (catalog, carts, checkout, orders), steps that compose into
//!   the store's transactions; `migrations/` holds its [`SCHEMA`].
//! - `http.rs`: its routes, wrapped by `holdfast_web::app` in sessions, CSRF, idempotency
//!   keys and the operator endpoints; the catalog is read through `holdfast-cache`.
//! - `flows.rs`: its jobs — charge an order, send its receipt — through the effect ledger of
//!   `holdfast-jobs`, against the payment provider of `holdfast-provider`.
//! - `reviews.rs`: what a user may upload (a video review of a product they ordered), through
//!   `holdfast-uploads`.
//! - `sabotage.rs`: the deliberately broken variants the drill must catch.
//!
//! A checkout is one transaction: order, lines, emptied cart, payout job and the stored
//! answer for its `Idempotency-Key` commit together. A worker then charges the order once,
//! marks it paid and enqueues its receipt — again one transaction, fenced by the job's claim.

mod catalog;
mod domain;
pub mod flows;
mod http;
pub mod reconcile;
mod reviews;
pub mod sabotage;
pub mod sql;

pub use catalog::{Product, CATALOG};
pub use domain::{OrderId, Quantity, Sku};
pub use flows::Flows;
pub use http::{app, CatalogBody, CatalogCache, Shop, ShopOptions, UploadSetup};
pub use reviews::Reviews;
pub use sabotage::Sabotage;

use holdfast_store::{Migration, Phase, Schema};

/// The queue a checkout's payout job runs on, and its kind.
/// The routes that honour `Idempotency-Key` (they take an `Idempotent` extractor), as a
/// balancer or proxy needs to know them to re-send a keyed request safely.
pub const KEYED_ROUTES: &[&str] = &["POST /api/cart/items", "POST /api/checkout"];

/// The routes whose request bodies a balancer should stream instead of buffering (a video
/// review's bytes: tus creation-with-upload and PATCH), never re-sending them.
pub const STREAMED_ROUTES: &[&str] = &["POST /api/uploads", "PATCH /api/uploads/{id}"];

pub const PAYMENTS_QUEUE: &str = "payments";
pub const PAYOUT_KIND: &str = "payout";
/// The queue an order's receipt runs on, and its kind.
pub const EMAIL_QUEUE: &str = "email";
pub const RECEIPT_KIND: &str = "receipt_email";

/// One of the shop's migrations, by its name in `crates/holdfast-shop/migrations/`: the file
/// `NAME.sql` and what undoes it, `NAME.down.sql`.
macro_rules! shop_file {
    ($version:literal, $name:literal) => {
        Migration::new(
            $version,
            concat!("crates/holdfast-shop/migrations/", $name, ".sql"),
            include_str!(concat!("../migrations/", $name, ".sql")),
        )
    };
}

/// The shop's tables, migrated after the store's own.
///
/// Versions 2–6 are the change `cart_lines` (carts move from `cart_items.qty` to
/// `cart_lines.quantity`) as expand/contract phases; [`sql::CartShape`] is how the code runs
/// on either side of each.
pub static SCHEMA: Schema = Schema {
    name: "shop",
    migrations: MIGRATIONS,
};

const MIGRATIONS: &[Migration] = &[
    shop_file!(1, "0001_shop")
        .replacing_legacy(1)
        .with_down(include_str!("../migrations/0001_shop.down.sql")),
    shop_file!(2, "0002_cart_lines_expand")
        .phase(Phase::Expand)
        .with_down(include_str!(
            "../migrations/0002_cart_lines_expand.down.sql"
        ))
        .with_postgres(
            include_str!("../migrations/0002_cart_lines_expand.postgres.sql"),
            Some(include_str!(
                "../migrations/0002_cart_lines_expand.postgres.down.sql"
            )),
        ),
    shop_file!(3, "0003_cart_lines_backfill")
        .phase(Phase::Backfill)
        .with_down(include_str!(
            "../migrations/0003_cart_lines_backfill.down.sql"
        ))
        .with_postgres(
            include_str!("../migrations/0003_cart_lines_backfill.postgres.sql"),
            Some(include_str!(
                "../migrations/0003_cart_lines_backfill.down.sql"
            )),
        ),
    shop_file!(4, "0004_cart_lines_switch_reads")
        .phase(Phase::SwitchReads)
        .with_down(include_str!(
            "../migrations/0004_cart_lines_switch_reads.down.sql"
        )),
    shop_file!(5, "0005_cart_lines_switch_writes")
        .phase(Phase::SwitchWrites)
        .with_down(include_str!(
            "../migrations/0005_cart_lines_switch_writes.down.sql"
        )),
    shop_file!(6, "0006_cart_lines_contract")
        .phase(Phase::Contract)
        .with_postgres(
            include_str!("../migrations/0006_cart_lines_contract.postgres.sql"),
            None,
        ),
];

/// The shop's schema as a build from before the change `cart_lines` had it (version 1 only):
/// what `holdfast serve --as-old-release` runs with, the old binary of a rolling deploy.
pub static SCHEMA_BEFORE_CART_LINES: Schema = Schema {
    name: "shop",
    migrations: MIGRATIONS.split_at(1).0,
};

/// What a shop request can get wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("unknown sku {0}")]
    UnknownSku(String),
    #[error("a cart line holds at most 99 of one item")]
    QuantityLimit,
    #[error("the cart is empty")]
    EmptyCart,
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_schema_names_its_files() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        for (i, m) in super::SCHEMA.migrations.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1);
            let on_disk = std::fs::read_to_string(root.join(m.file)).expect(m.file);
            assert_eq!(on_disk, m.sql, "{} is the file it names", m.file);
            if let Some((up, _)) = m.postgres {
                let pg = m.file.replace(".sql", ".postgres.sql");
                let on_disk = std::fs::read_to_string(root.join(&pg)).expect(&pg);
                assert_eq!(on_disk, up, "{pg} is Postgres's spelling of {}", m.file);
            }
        }
    }

    #[test]
    fn the_streamed_routes_are_where_uploads_are_mounted() {
        let base = holdfast_uploads::UploadOptions::default().base_path;
        assert_eq!(
            super::STREAMED_ROUTES,
            [format!("POST {base}"), format!("PATCH {base}/{{id}}")]
        );
    }

    #[test]
    fn the_seeded_catalog_is_the_migrations_catalog() {
        let sql = super::SCHEMA.migrations[0].sql;
        for p in super::CATALOG {
            let row = format!("('{}', '{}', {})", p.sku, p.name, p.price_cents);
            assert!(sql.contains(&row), "{row} is seeded");
        }
    }
}
