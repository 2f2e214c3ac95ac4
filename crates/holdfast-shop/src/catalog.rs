//! The seeded catalog. Prices are integer cents; nothing in the shop uses floating point money.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Product {
    pub sku: &'static str,
    pub name: &'static str,
    pub price_cents: i64,
}

/// The catalog every fresh store is seeded with (migrations insert exactly these rows).
pub const CATALOG: &[Product] = &[
    Product {
        sku: "ROPE-10M",
        name: "Climbing rope, 10 m",
        price_cents: 8900,
    },
    Product {
        sku: "CARABINER",
        name: "Locking carabiner",
        price_cents: 1250,
    },
    Product {
        sku: "HARNESS",
        name: "Sit harness",
        price_cents: 6400,
    },
    Product {
        sku: "CHALK-BAG",
        name: "Chalk bag",
        price_cents: 1800,
    },
    Product {
        sku: "HELMET",
        name: "Climbing helmet",
        price_cents: 5900,
    },
    Product {
        sku: "BELAY-DEV",
        name: "Assisted-braking belay device",
        price_cents: 9900,
    },
];
