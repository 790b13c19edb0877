-- A password change ends every token issued before it: the gateway refuses a token
-- whose `iat` is before this (read with the role on each admin call). NULL: never
-- changed since the account was created.
ALTER TABLE admins ADD COLUMN password_changed_at timestamptz;

-- Money has bounds: 10^15 minor units either way (MONEY_MAX_MINOR in src/money.rs). The
-- reservation scripts compare money as Lua numbers (doubles), exact only below 2^53
-- (about 9.007 * 10^15), and a price times a quantity must stay far from i64 overflow.
-- The gateway refuses larger values with 400; these constraints are the last guard.
ALTER TABLE products
    ADD CONSTRAINT products_face_value_bounded CHECK (face_value <= 1000000000000000),
    ADD CONSTRAINT products_base_price_bounded CHECK (base_price <= 1000000000000000);
ALTER TABLE product_tier_prices
    ADD CONSTRAINT product_tier_prices_price_bounded CHECK (price <= 1000000000000000);
ALTER TABLE resellers
    ADD CONSTRAINT resellers_low_balance_threshold_bounded CHECK (low_balance_threshold <= 1000000000000000);
ALTER TABLE balances
    ADD CONSTRAINT balance_bounded CHECK (balance BETWEEN -1000000000000000 AND 1000000000000000);
ALTER TABLE balance_ledger
    ADD CONSTRAINT balance_ledger_amount_bounded CHECK (amount BETWEEN -1000000000000000 AND 1000000000000000);
ALTER TABLE orders
    ADD CONSTRAINT orders_unit_price_bounded CHECK (unit_price <= 1000000000000000),
    ADD CONSTRAINT orders_amount_bounded CHECK (amount BETWEEN 0 AND 1000000000000000);
