-- Undoes 0001_shop.sql: the catalog, carts and orders are gone.
DROP TABLE order_items;
DROP TABLE orders;
DROP TABLE cart_items;
DROP TABLE products;
