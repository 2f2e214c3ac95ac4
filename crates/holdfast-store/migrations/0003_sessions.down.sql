-- Undoes 0003_sessions.sql.
DROP TABLE session_blobs;
DROP INDEX sessions_user;
ALTER TABLE users DROP COLUMN sessions_valid_after;
