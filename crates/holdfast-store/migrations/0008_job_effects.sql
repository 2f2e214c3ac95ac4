-- A job may name the one external effect it causes: its effect ledger key and the
-- dependency's idempotency key. The claim that hands such a job to a worker records the
-- intent in the ledger in the same statement, so the worker needs no round trip and no
-- commit of its own before it calls. A job without one (enqueued by an older build, or by a
-- caller with no effect to name) is begun by the worker, as before.
ALTER TABLE jobs ADD COLUMN effect_key TEXT;
ALTER TABLE jobs ADD COLUMN effect_external_key TEXT;
-- How many claims have begun an entry: 1 for the claim that created it; more when a later
-- attempt found it pending (its outcome may be unknown, so that attempt asks the dependency
-- before it calls). NULL for an entry begun or settled some other way.
ALTER TABLE effect_ledger ADD COLUMN begun BIGINT;
