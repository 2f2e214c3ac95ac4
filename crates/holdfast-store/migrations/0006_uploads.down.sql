-- Undoes 0006_uploads.sql: every upload's state is gone (its bytes stay in the blob store
-- until removed by hand).
DROP TABLE upload_parts;
DROP TABLE uploads;
