-- Undoes the expand on Postgres: the triggers and their functions, then the new table.
DROP TRIGGER cart_items_to_lines ON cart_items;
DROP TRIGGER cart_lines_to_items ON cart_lines;
DROP FUNCTION holdfast_cart_items_to_lines();
DROP FUNCTION holdfast_cart_lines_to_items();
DROP TABLE cart_lines;
