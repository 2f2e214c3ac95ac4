-- Undoes 0007_secrets.sql: the shared secrets are gone (the next use makes new ones; tokens
-- signed with the old ones stop verifying).
DROP TABLE holdfast_secrets;
