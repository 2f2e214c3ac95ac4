-- Secrets every instance sharing the store must agree on without being configured with
-- them (the key that signs read-your-writes tokens): made by the first instance that needs
-- one, read by the rest. Deleting a row rotates that secret.
CREATE TABLE holdfast_secrets (
    name       TEXT PRIMARY KEY,
    secret     TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
