-- Resumable uploads (tus): the upload's state lives here, its bytes in a blob store. Any
-- instance can continue any upload because nothing about it is kept in a process.
--
-- `attempt` fences writers: a PATCH takes the upload by bumping it (and setting
-- `lease_until`), and every later write of that PATCH names the attempt it took, so a writer
-- that lost its lease (paused, partitioned, killed and restarted) can never move the offset.
-- `next_part` hands out part numbers: each part a writer starts gets a number nobody else will
-- ever get, so a stale writer's bytes land in a part the ledger never names.
CREATE TABLE uploads (
    id            TEXT PRIMARY KEY,
    owner_id      TEXT NOT NULL,
    subject       TEXT NOT NULL,
    upload_length BIGINT NOT NULL CHECK (upload_length >= 0),
    upload_offset BIGINT NOT NULL DEFAULT 0,
    metadata      TEXT NOT NULL,
    blob_handle   TEXT,
    attempt       BIGINT NOT NULL DEFAULT 0,
    lease_until   BIGINT,
    next_part     BIGINT NOT NULL DEFAULT 0,
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    completed_at  BIGINT,
    deleted_at    BIGINT,
    CHECK (upload_offset BETWEEN 0 AND upload_length)
);
CREATE INDEX uploads_owner ON uploads (owner_id, created_at);
CREATE INDEX uploads_expires_at ON uploads (expires_at);

-- The part ledger: which blob parts, in offset order, hold an upload's acknowledged bytes.
-- A part is here only once its bytes were durable; `sha256` is the part's own digest.
CREATE TABLE upload_parts (
    upload_id    TEXT NOT NULL REFERENCES uploads (id) ON DELETE CASCADE,
    part_no      BIGINT NOT NULL,
    start_offset BIGINT NOT NULL,
    part_length  BIGINT NOT NULL CHECK (part_length > 0),
    sha256       TEXT NOT NULL,
    etag         TEXT,
    PRIMARY KEY (upload_id, part_no),
    UNIQUE (upload_id, start_offset)
);
