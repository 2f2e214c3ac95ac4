-- Undoes the expand: the triggers, then the new table (`cart_items` still holds every cart).
DROP TRIGGER cart_items_to_lines_insert;
DROP TRIGGER cart_items_to_lines_update;
DROP TRIGGER cart_items_to_lines_delete;
DROP TRIGGER cart_lines_to_items_insert;
DROP TRIGGER cart_lines_to_items_update;
DROP TRIGGER cart_lines_to_items_delete;
DROP TABLE cart_lines;
