-- Contract on Postgres: as 0006_cart_lines_contract.sql, in two transactions. First the copying
-- into the old table stops (no build that reads it runs any more): from then on nothing but a
-- straggling reader touches cart_items, so the DROP TABLE below, while it waits for that reader
-- (turned away by the guard's lock_timeout and retried), holds up no request. The first part
-- may commit and the second give up; the next run repeats the first, hence IF EXISTS.
DROP TRIGGER IF EXISTS cart_lines_to_items ON cart_lines;
-- squawk-ignore ban-drop-function
DROP FUNCTION IF EXISTS holdfast_cart_lines_to_items();
-- holdfast: commit here
-- Dropping the old table (and with it its trigger) is the point of a contract: every build
-- since the expand reads and writes cart_lines, and the operator runs this only once no older
-- build serves.
-- squawk-ignore ban-drop-table
DROP TABLE cart_items;
-- squawk-ignore ban-drop-function
DROP FUNCTION holdfast_cart_items_to_lines();
