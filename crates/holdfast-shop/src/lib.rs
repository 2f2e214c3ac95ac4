//! The reference application: a small shop composed on Holdfast's generic crates, and the
//! one place that knows what an order is.
//!
//! - `sql.rs`: its tables' SQL (catalog, carts, checkout, orders), steps that compose into
//!   the store's transactions; `migrations/` holds its [`SCHEMA`].
//! - `http.rs`: its routes, wrapped by `holdfast_web::app` in sessions, CSRF, idempotency
//!   keys and the operator endpoints; the catalog is read through `holdfast-cache`.
//! - `flows.rs`: its jobs — charge an order, send its receipt — through the effect ledger of
//!   `holdfast-jobs`, against the payment provider of `holdfast-provider`.
//! - `sabotage.rs`: the deliberately broken variants the drill must catch.
//!
//! A checkout is one transaction: order, lines, emptied cart, payout job and the stored
//! answer for its `Idempotency-Key` commit together. A worker then charges the order once,
//! marks it paid and enqueues its receipt — again one transaction, fenced by the job's claim.

mod catalog;
mod domain;
pub mod flows;
mod http;
pub mod sabotage;
pub mod sql;

pub use catalog::{Product, CATALOG};
pub use domain::{OrderId, Quantity, Sku};
pub use flows::Flows;
pub use http::{app, CatalogBody, CatalogCache, Shop, ShopOptions};
pub use sabotage::Sabotage;

use holdfast_store::{Migration, Schema};

/// The queue a checkout's payout job runs on, and its kind.
/// The routes that honour `Idempotency-Key` (they take an `Idempotent` extractor), as a
/// balancer or proxy needs to know them to re-send a keyed request safely.
pub const KEYED_ROUTES: &[&str] = &["POST /api/cart/items", "POST /api/checkout"];

pub const PAYMENTS_QUEUE: &str = "payments";
pub const PAYOUT_KIND: &str = "payout";
/// The queue an order's receipt runs on, and its kind.
pub const EMAIL_QUEUE: &str = "email";
pub const RECEIPT_KIND: &str = "receipt_email";

/// The shop's tables, migrated after the store's own.
pub static SCHEMA: Schema = Schema {
    name: "shop",
    migrations: &[Migration::new(
        1,
        "crates/holdfast-shop/migrations/0001_shop.sql",
        include_str!("../migrations/0001_shop.sql"),
    )
    .replacing_legacy(1)
    .with_down(include_str!("../migrations/0001_shop.down.sql"))],
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
        }
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
