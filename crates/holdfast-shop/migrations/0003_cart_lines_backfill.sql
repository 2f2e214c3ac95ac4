-- Backfill (change `cart_lines`, phase 2 of 5): one batch, run again and again (each in its own
-- short transaction, `$1` rows at most) until a batch copies nothing; only then is the phase
-- recorded. A killed backfill resumes where it stopped: what is copied is not copied again.
INSERT INTO cart_lines (user_id, sku, quantity, added_at)
SELECT c.user_id, c.sku, c.qty, c.added_at FROM cart_items c
WHERE NOT EXISTS (SELECT 1 FROM cart_lines l WHERE l.user_id = c.user_id AND l.sku = c.sku)
ORDER BY c.user_id, c.sku
LIMIT $1
ON CONFLICT (user_id, sku) DO UPDATE SET quantity = excluded.quantity
