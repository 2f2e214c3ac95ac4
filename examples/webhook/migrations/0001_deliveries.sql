-- One row per accepted POST: where to deliver it, what, and whether it was delivered.
CREATE TABLE deliveries (
    id         TEXT PRIMARY KEY,
    owner      TEXT NOT NULL REFERENCES users (id),
    url        TEXT NOT NULL,
    payload    TEXT NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('pending', 'sent')),
    created_at BIGINT NOT NULL
);
CREATE INDEX deliveries_owner ON deliveries (owner, created_at);
