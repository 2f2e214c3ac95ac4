-- Undoes 0008_job_effects.sql: jobs no longer name their effect (a build from before it
-- begins every effect in the worker, as it did).
ALTER TABLE effect_ledger DROP COLUMN begun;
ALTER TABLE jobs DROP COLUMN effect_external_key;
ALTER TABLE jobs DROP COLUMN effect_key;
