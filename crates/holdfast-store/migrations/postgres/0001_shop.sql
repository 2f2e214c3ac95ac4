CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    email         TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_at    BIGINT NOT NULL
);

CREATE TABLE sessions (
    id_hash      TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at   BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL
);
CREATE INDEX sessions_expires_at ON sessions (expires_at);

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

CREATE TABLE idempotency_keys (
    user_id         TEXT NOT NULL,
    idem_key        TEXT NOT NULL,
    fingerprint     TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('in_flight', 'done')),
    lock_token      TEXT,
    locked_until    BIGINT NOT NULL,
    response_status BIGINT,
    response_body   BYTEA,
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (user_id, idem_key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

INSERT INTO products (sku, name, price_cents) VALUES
    ('ROPE-10M', 'Climbing rope, 10 m', 8900),
    ('CARABINER', 'Locking carabiner', 1250),
    ('HARNESS', 'Sit harness', 6400),
    ('CHALK-BAG', 'Chalk bag', 1800),
    ('HELMET', 'Climbing helmet', 5900),
    ('BELAY-DEV', 'Assisted-braking belay device', 9900);
