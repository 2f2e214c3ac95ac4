-- Expand (change `cart_lines`, phase 1 of 5): carts move from `cart_items` (quantity in `qty`)
-- to `cart_lines` (in `quantity`). The new table stands beside the old; triggers copy every
-- write to either table into the other, so a build that knows only `cart_items` and one that
-- reads or writes `cart_lines` serve the same carts side by side. Postgres has its own spelling
-- of the triggers in 0002_cart_lines_expand.postgres.sql.
CREATE TABLE cart_lines (
    user_id  TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    sku      TEXT NOT NULL REFERENCES products (sku),
    quantity BIGINT NOT NULL CHECK (quantity BETWEEN 1 AND 99),
    added_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, sku)
);

-- Each copy is conditional, so the copy's own trigger finds nothing to do and stops.
CREATE TRIGGER cart_items_to_lines_insert AFTER INSERT ON cart_items BEGIN
    INSERT INTO cart_lines (user_id, sku, quantity, added_at)
    VALUES (NEW.user_id, NEW.sku, NEW.qty, NEW.added_at)
    ON CONFLICT (user_id, sku) DO UPDATE SET quantity = excluded.quantity
    WHERE cart_lines.quantity <> excluded.quantity;
END;
CREATE TRIGGER cart_items_to_lines_update AFTER UPDATE ON cart_items BEGIN
    INSERT INTO cart_lines (user_id, sku, quantity, added_at)
    VALUES (NEW.user_id, NEW.sku, NEW.qty, NEW.added_at)
    ON CONFLICT (user_id, sku) DO UPDATE SET quantity = excluded.quantity
    WHERE cart_lines.quantity <> excluded.quantity;
END;
CREATE TRIGGER cart_items_to_lines_delete AFTER DELETE ON cart_items BEGIN
    DELETE FROM cart_lines WHERE user_id = OLD.user_id AND sku = OLD.sku;
END;
CREATE TRIGGER cart_lines_to_items_insert AFTER INSERT ON cart_lines BEGIN
    INSERT INTO cart_items (user_id, sku, qty, added_at)
    VALUES (NEW.user_id, NEW.sku, NEW.quantity, NEW.added_at)
    ON CONFLICT (user_id, sku) DO UPDATE SET qty = excluded.qty
    WHERE cart_items.qty <> excluded.qty;
END;
CREATE TRIGGER cart_lines_to_items_update AFTER UPDATE ON cart_lines BEGIN
    INSERT INTO cart_items (user_id, sku, qty, added_at)
    VALUES (NEW.user_id, NEW.sku, NEW.quantity, NEW.added_at)
    ON CONFLICT (user_id, sku) DO UPDATE SET qty = excluded.qty
    WHERE cart_items.qty <> excluded.qty;
END;
CREATE TRIGGER cart_lines_to_items_delete AFTER DELETE ON cart_lines BEGIN
    DELETE FROM cart_items WHERE user_id = OLD.user_id AND sku = OLD.sku;
END;
