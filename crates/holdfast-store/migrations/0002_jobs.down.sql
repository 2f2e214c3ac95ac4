-- Undoes 0002_jobs.sql: the queue and the effect ledger are gone.
DROP TABLE effect_ledger;
DROP TABLE jobs;
