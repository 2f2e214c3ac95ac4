-- Rate limits every instance shares: one cell per limited key (the SHA-256 of, say, "login
-- from this address"), holding the key's theoretical arrival time (GCRA). A cell whose time
-- has passed is the same as no cell, so the reaper may delete it.
CREATE TABLE rate_limits (
    key_hash TEXT PRIMARY KEY,
    tat      BIGINT NOT NULL
);
CREATE INDEX rate_limits_tat ON rate_limits (tat);

-- Browsers that have logged in to an account (by the SHA-256 of the token in their cookie):
-- such a browser logs in on a quota of its own, so exhausting an account's shared quota
-- locks out strangers, not the owner's own devices.
CREATE TABLE known_devices (
    token_hash TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX known_devices_created_at ON known_devices (created_at);
