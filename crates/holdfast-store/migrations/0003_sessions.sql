-- Session tiers: a per-user revocation epoch (signed-cookie sessions issued before it are
-- dead), an index to find a user's sessions (password change), and opaque session blobs for
-- the tower-sessions `SessionStore` adapter (keyed, like `sessions`, by the id's SHA-256).
ALTER TABLE users ADD COLUMN sessions_valid_after BIGINT NOT NULL DEFAULT 0;

CREATE INDEX sessions_user ON sessions (user_id);

CREATE TABLE session_blobs (
    id_hash    TEXT PRIMARY KEY,
    data       BLOB NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX session_blobs_expires_at ON session_blobs (expires_at);
