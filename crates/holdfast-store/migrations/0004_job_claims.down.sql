-- Undoes 0004_job_claims.sql (a build from before it fences by attempt, as it did).
ALTER TABLE jobs DROP COLUMN claim;
