-- Operator reports (API.md "Reports") read whole UTC days from this rollup and only the
-- partial days at the edges of a range from orders, so a report over months of ten
-- million orders reads thousands of rows, not millions. It counts fulfilled orders
-- (refunded ones leave it) and is kept by statement triggers on orders, so every writer
-- keeps it true: the ledger's commits, last-guard removals and refunds alike.
CREATE TABLE sales_daily (
    day         date   NOT NULL,
    reseller_id bigint NOT NULL,
    product_id  bigint NOT NULL,
    orders      bigint NOT NULL,
    codes       bigint NOT NULL,
    amount      bigint NOT NULL,
    PRIMARY KEY (day, reseller_id, product_id)
);

-- One trigger function for inserts, deletes (last-guard removals) and updates (refunds,
-- corrections): what leaves the fulfilled set is subtracted, what enters it is added.
-- Rows are changed in key order, so two transactions touching the same rows take their
-- locks in the same order and cannot deadlock. Only the transition tables of TG_OP
-- exist; PL/pgSQL plans a statement when it first runs, so the other branch is harmless.
CREATE FUNCTION sales_daily_keep() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        INSERT INTO sales_daily AS s (day, reseller_id, product_id, orders, codes, amount)
        SELECT (created_at AT TIME ZONE 'UTC')::date, reseller_id, product_id, -count(*), -sum(quantity), -sum(amount)
          FROM old_orders WHERE status = 'fulfilled'
         GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (day, reseller_id, product_id) DO UPDATE
           SET orders = s.orders + excluded.orders, codes = s.codes + excluded.codes, amount = s.amount + excluded.amount;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO sales_daily AS s (day, reseller_id, product_id, orders, codes, amount)
        SELECT (created_at AT TIME ZONE 'UTC')::date, reseller_id, product_id, count(*), sum(quantity), sum(amount)
          FROM new_orders WHERE status = 'fulfilled'
         GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (day, reseller_id, product_id) DO UPDATE
           SET orders = s.orders + excluded.orders, codes = s.codes + excluded.codes, amount = s.amount + excluded.amount;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER sales_daily_insert AFTER INSERT ON orders
    REFERENCING NEW TABLE AS new_orders FOR EACH STATEMENT EXECUTE FUNCTION sales_daily_keep();
CREATE TRIGGER sales_daily_delete AFTER DELETE ON orders
    REFERENCING OLD TABLE AS old_orders FOR EACH STATEMENT EXECUTE FUNCTION sales_daily_keep();
CREATE TRIGGER sales_daily_update AFTER UPDATE ON orders
    REFERENCING OLD TABLE AS old_orders NEW TABLE AS new_orders FOR EACH STATEMENT EXECUTE FUNCTION sales_daily_keep();

-- The orders already there.
INSERT INTO sales_daily (day, reseller_id, product_id, orders, codes, amount)
SELECT (created_at AT TIME ZONE 'UTC')::date, reseller_id, product_id, count(*), sum(quantity), sum(amount)
  FROM orders WHERE status = 'fulfilled'
 GROUP BY 1, 2, 3;
