-- Backfill on Postgres: as 0003_cart_lines_backfill.sql, but each batch locks the rows it copies,
-- so a line deleted while the batch runs is either copied before the delete (and the delete's
-- trigger removes the copy) or not copied at all.
INSERT INTO cart_lines (user_id, sku, quantity, added_at)
SELECT c.user_id, c.sku, c.qty, c.added_at FROM cart_items c
WHERE NOT EXISTS (SELECT 1 FROM cart_lines l WHERE l.user_id = c.user_id AND l.sku = c.sku)
ORDER BY c.user_id, c.sku
LIMIT $1
FOR UPDATE OF c
ON CONFLICT (user_id, sku) DO UPDATE SET quantity = excluded.quantity
