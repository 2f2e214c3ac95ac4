-- Durable jobs and the effect ledger. State machine (see holdfast-jobs' crate docs):
--   available -> running -> completed
--                running -> available (retry after backoff, or lease expired: rescued)
--                running -> dead      (attempts exhausted)   dead -> available (redrive)
CREATE TABLE jobs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    queue        TEXT NOT NULL,
    kind         TEXT NOT NULL,
    args         TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('available', 'running', 'completed', 'dead')),
    priority     BIGINT NOT NULL DEFAULT 5,
    unique_key   TEXT UNIQUE,
    attempt      BIGINT NOT NULL DEFAULT 0,
    max_attempts BIGINT NOT NULL,
    run_at       BIGINT NOT NULL,
    lease_until  BIGINT,
    worker_id    TEXT,
    last_error   TEXT,
    created_at   BIGINT NOT NULL,
    started_at   BIGINT,
    finished_at  BIGINT
);
CREATE INDEX jobs_fetch ON jobs (queue, priority, run_at, id) WHERE state = 'available';
CREATE INDEX jobs_leases ON jobs (lease_until) WHERE state = 'running';
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE state = 'completed';

-- One row per effect that must happen once. 'pending': the external call was started and its
-- outcome may be unknown; 'done': confirmed, with the dependency's id for it.
CREATE TABLE effect_ledger (
    effect_key   TEXT PRIMARY KEY,
    state        TEXT NOT NULL CHECK (state IN ('pending', 'done')),
    external_key TEXT NOT NULL,
    external_id  TEXT,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL
);
