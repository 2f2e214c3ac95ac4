-- A job attempt's fence is (id, claim): `claim` grows by one on every claim and never goes
-- back, unlike `attempt`, which counts towards `max_attempts` and starts again at a redrive
-- (and is given back when a draining worker releases a job). Fences are unique forever, so a
-- stalled worker from before a redrive or a release can never settle a later attempt.
ALTER TABLE jobs ADD COLUMN claim BIGINT NOT NULL DEFAULT 0;
UPDATE jobs SET claim = attempt;
