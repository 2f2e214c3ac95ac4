-- The reference shop: its catalog, carts and orders. Runs after the store's own migrations
-- (it refers to `users`). One file for both engines (see holdfast-store's migrate.rs).
CREATE TABLE products (
    sku         TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    price_cents BIGINT NOT NULL CHECK (price_cents >= 0)
);

CREATE TABLE cart_items (
    user_id  TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    sku      TEXT NOT NULL REFERENCES products (sku),
    qty      BIGINT NOT NULL CHECK (qty BETWEEN 1 AND 99),
    added_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, sku)
);

CREATE TABLE orders (
    id          TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users (id),
    total_cents BIGINT NOT NULL,
    status      TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX orders_user ON orders (user_id, created_at);

CREATE TABLE order_items (
    order_id         TEXT NOT NULL REFERENCES orders (id),
    sku              TEXT NOT NULL,
    name             TEXT NOT NULL,
    qty              BIGINT NOT NULL,
    unit_price_cents BIGINT NOT NULL,
    PRIMARY KEY (order_id, sku)
);

INSERT INTO products (sku, name, price_cents) VALUES
    ('ROPE-10M', 'Climbing rope, 10 m', 8900),
    ('CARABINER', 'Locking carabiner', 1250),
    ('HARNESS', 'Sit harness', 6400),
    ('CHALK-BAG', 'Chalk bag', 1800),
    ('HELMET', 'Climbing helmet', 5900),
    ('BELAY-DEV', 'Assisted-braking belay device', 9900);
