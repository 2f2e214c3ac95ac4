-- Undoes 0001_accounts.sql: every account, session and idempotency key is gone.
DROP TABLE idempotency_keys;
DROP TABLE sessions;
DROP TABLE users;
