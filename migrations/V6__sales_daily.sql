-- Operator reports (API.md "Reports") read whole UTC days from two daily rollups and
-- only the partial days at the edges of a range from orders, so a report over months of
-- ten million orders reads at most days x resellers (or x SKUs) rows. They count
-- fulfilled orders (a refund takes its order out) and are kept by statement triggers on
-- orders, so every writer keeps them true: the ledger's commits, last-guard removals
-- and refunds alike.
--
-- A flash sale has every ledger writer adding to the same SKU's row of the day; one row
-- would make them wait for each other's commits. Each connection adds to its own stripe
-- (`shard`) of a product's day instead, and the report sums them. A reseller's day is
-- one row: its balance row is locked by the same commits anyway.
CREATE TABLE reseller_daily (
    day         date   NOT NULL,
    reseller_id bigint NOT NULL,
    orders      bigint NOT NULL,
    codes       bigint NOT NULL,
    amount      bigint NOT NULL,
    PRIMARY KEY (day, reseller_id)
);
CREATE TABLE product_daily (
    day        date     NOT NULL,
    product_id bigint   NOT NULL,
    shard      smallint NOT NULL,
    orders     bigint   NOT NULL,
    codes      bigint   NOT NULL,
    amount     bigint   NOT NULL,
    PRIMARY KEY (day, product_id, shard)
);

-- One trigger function for inserts, deletes (last-guard removals) and updates (refunds):
-- what leaves the fulfilled set is subtracted, what enters it is added, in key order, so
-- two transactions touching the same rows lock them in the same order. Only the
-- transition tables of TG_OP exist; PL/pgSQL plans a statement when it first runs it, so
-- the other branch is harmless.
CREATE FUNCTION sales_daily_keep() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    stripe smallint := pg_backend_pid() % 8;
BEGIN
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        WITH o AS (
            SELECT (created_at AT TIME ZONE 'UTC')::date AS day, reseller_id, product_id, quantity, amount
              FROM old_orders WHERE status = 'fulfilled'
        ), r AS (
            INSERT INTO reseller_daily AS s (day, reseller_id, orders, codes, amount)
            SELECT day, reseller_id, -count(*), -sum(quantity), -sum(amount)
              FROM o GROUP BY 1, 2 ORDER BY 1, 2
            ON CONFLICT (day, reseller_id) DO UPDATE
               SET orders = s.orders + excluded.orders, codes = s.codes + excluded.codes, amount = s.amount + excluded.amount
        )
        INSERT INTO product_daily AS s (day, product_id, shard, orders, codes, amount)
        SELECT day, product_id, stripe, -count(*), -sum(quantity), -sum(amount)
          FROM o GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (day, product_id, shard) DO UPDATE
           SET orders = s.orders + excluded.orders, codes = s.codes + excluded.codes, amount = s.amount + excluded.amount;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        WITH o AS (
            SELECT (created_at AT TIME ZONE 'UTC')::date AS day, reseller_id, product_id, quantity, amount
              FROM new_orders WHERE status = 'fulfilled'
        ), r AS (
            INSERT INTO reseller_daily AS s (day, reseller_id, orders, codes, amount)
            SELECT day, reseller_id, count(*), sum(quantity), sum(amount)
              FROM o GROUP BY 1, 2 ORDER BY 1, 2
            ON CONFLICT (day, reseller_id) DO UPDATE
               SET orders = s.orders + excluded.orders, codes = s.codes + excluded.codes, amount = s.amount + excluded.amount
        )
        INSERT INTO product_daily AS s (day, product_id, shard, orders, codes, amount)
        SELECT day, product_id, stripe, count(*), sum(quantity), sum(amount)
          FROM o GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (day, product_id, shard) DO UPDATE
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
INSERT INTO reseller_daily (day, reseller_id, orders, codes, amount)
SELECT (created_at AT TIME ZONE 'UTC')::date, reseller_id, count(*), sum(quantity), sum(amount)
  FROM orders WHERE status = 'fulfilled' GROUP BY 1, 2;
INSERT INTO product_daily (day, product_id, shard, orders, codes, amount)
SELECT (created_at AT TIME ZONE 'UTC')::date, product_id, 0, count(*), sum(quantity), sum(amount)
  FROM orders WHERE status = 'fulfilled' GROUP BY 1, 2;
