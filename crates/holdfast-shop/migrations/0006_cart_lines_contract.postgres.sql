-- Contract on Postgres: as 0006_cart_lines_contract.sql, with the trigger functions. Dropping
-- what the expand added, and the old table, is the point of a contract: every build since the
-- expand reads and writes cart_lines, and the operator runs this only once no older build
-- serves.
DROP TRIGGER cart_items_to_lines ON cart_items;
DROP TRIGGER cart_lines_to_items ON cart_lines;
-- squawk-ignore ban-drop-function
DROP FUNCTION holdfast_cart_items_to_lines();
-- squawk-ignore ban-drop-function
DROP FUNCTION holdfast_cart_lines_to_items();
-- squawk-ignore ban-drop-table
DROP TABLE cart_items;
