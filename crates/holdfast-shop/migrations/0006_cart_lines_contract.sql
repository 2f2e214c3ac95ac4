-- Contract (change `cart_lines`, phase 5 of 5): the old table and the triggers go. One-way:
-- there is no down step, and no build that reads `cart_items` may run from here on.
DROP TRIGGER cart_items_to_lines_insert;
DROP TRIGGER cart_items_to_lines_update;
DROP TRIGGER cart_items_to_lines_delete;
DROP TRIGGER cart_lines_to_items_insert;
DROP TRIGGER cart_lines_to_items_update;
DROP TRIGGER cart_lines_to_items_delete;
DROP TABLE cart_items;
