-- Expand (change `cart_lines`, phase 1 of 5), Postgres's spelling of
-- 0002_cart_lines_expand.sql: the new table, and one trigger function per direction that copies
-- every write to either table into the other. A copy made by a trigger (depth 2) is not copied
-- back.
CREATE TABLE cart_lines (
    user_id  TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    sku      TEXT NOT NULL REFERENCES products (sku),
    quantity BIGINT NOT NULL CHECK (quantity BETWEEN 1 AND 99),
    added_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, sku)
);

CREATE FUNCTION holdfast_cart_items_to_lines() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF pg_trigger_depth() > 1 THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        DELETE FROM cart_lines WHERE user_id = OLD.user_id AND sku = OLD.sku;
    ELSE
        INSERT INTO cart_lines (user_id, sku, quantity, added_at)
        VALUES (NEW.user_id, NEW.sku, NEW.qty, NEW.added_at)
        ON CONFLICT (user_id, sku) DO UPDATE SET quantity = excluded.quantity;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION holdfast_cart_lines_to_items() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF pg_trigger_depth() > 1 THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        DELETE FROM cart_items WHERE user_id = OLD.user_id AND sku = OLD.sku;
    ELSE
        INSERT INTO cart_items (user_id, sku, qty, added_at)
        VALUES (NEW.user_id, NEW.sku, NEW.quantity, NEW.added_at)
        ON CONFLICT (user_id, sku) DO UPDATE SET qty = excluded.qty;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER cart_items_to_lines AFTER INSERT OR UPDATE OR DELETE ON cart_items
    FOR EACH ROW EXECUTE FUNCTION holdfast_cart_items_to_lines();
CREATE TRIGGER cart_lines_to_items AFTER INSERT OR UPDATE OR DELETE ON cart_lines
    FOR EACH ROW EXECUTE FUNCTION holdfast_cart_lines_to_items();
