-- Reports' cost and margin of upstream-filled sales (docs/api.md §4 "Reports", §8).
--
-- The products report reads whole days from product_daily, so the upstream figures are
-- rolled up beside the sales they belong to, on the day of the order (not of the
-- purchase's end): how many of the day's counted orders were filled upstream, their
-- amount, what was paid for them, and what was paid for upstream orders since refunded
-- (a refund takes the sale out; the supplier keeps the money).
--
-- The purchase's cost is known only when it ends, after its order row is written, so
-- the sale's upstream part is appended by a trigger on purchases, and a refund (the one
-- change of a fulfilled order) moves it out again. The order path's inserts are not
-- touched.

-- Whatever commits while this runs must see the new triggers or be counted by the
-- backfill below: writers of orders and purchases wait for this migration, and it for
-- them.
LOCK TABLE orders, purchases IN SHARE ROW EXCLUSIVE MODE;

ALTER TABLE sales_pending
    ADD COLUMN upstream_orders bigint NOT NULL DEFAULT 0,
    ADD COLUMN upstream_amount bigint NOT NULL DEFAULT 0,
    ADD COLUMN cost            bigint NOT NULL DEFAULT 0,
    ADD COLUMN refunded_cost   bigint NOT NULL DEFAULT 0;
ALTER TABLE product_daily
    ADD COLUMN upstream_orders bigint NOT NULL DEFAULT 0,
    ADD COLUMN upstream_amount bigint NOT NULL DEFAULT 0,
    ADD COLUMN cost            bigint NOT NULL DEFAULT 0,
    ADD COLUMN refunded_cost   bigint NOT NULL DEFAULT 0;

-- Reports sum it: a fulfilled purchase always says what it cost.
ALTER TABLE purchases ADD CONSTRAINT purchases_fulfilled_cost CHECK (state <> 'fulfilled' OR cost IS NOT NULL);

-- Edge days of the products report read fulfilled purchases by their order's time.
CREATE INDEX purchases_fulfilled_created ON purchases (order_created_at) WHERE state = 'fulfilled';

-- A purchase fulfilled: its order (fulfilled in the same transaction) is an
-- upstream-filled sale. Row-level with a WHEN clause, so the purchase's other updates
-- (attempts, leases) never enter PL/pgSQL.
CREATE FUNCTION purchases_sold() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sales_pending (day, reseller_id, product_id, orders, codes, amount,
                               upstream_orders, upstream_amount, cost)
    VALUES ((NEW.order_created_at AT TIME ZONE 'UTC')::date, NEW.reseller_id, NEW.product_id, 0, 0, 0,
            1, NEW.amount, NEW.cost);
    RETURN NULL;
END $$;
CREATE TRIGGER purchases_sold AFTER UPDATE OF state ON purchases
    FOR EACH ROW WHEN (OLD.state = 'open' AND NEW.state = 'fulfilled') EXECUTE FUNCTION purchases_sold();

-- As in V8, and a refunded upstream order leaves the upstream figures too: its cost moves
-- to refunded_cost. Entering `fulfilled` from `processing` adds nothing here: the
-- purchase's trigger does, once its cost is known.
CREATE OR REPLACE FUNCTION sales_daily_keep() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sales_pending (day, reseller_id, product_id, orders, codes, amount)
    SELECT (created_at AT TIME ZONE 'UTC')::date, reseller_id, product_id, -count(*), -sum(quantity), -sum(amount)
      FROM old_orders WHERE status IN ('fulfilled', 'processing') GROUP BY 1, 2, 3;
    INSERT INTO sales_pending (day, reseller_id, product_id, orders, codes, amount)
    SELECT (created_at AT TIME ZONE 'UTC')::date, reseller_id, product_id, count(*), sum(quantity), sum(amount)
      FROM new_orders WHERE status IN ('fulfilled', 'processing') GROUP BY 1, 2, 3;
    INSERT INTO sales_pending (day, reseller_id, product_id, orders, codes, amount,
                               upstream_orders, upstream_amount, cost, refunded_cost)
    SELECT (o.created_at AT TIME ZONE 'UTC')::date, o.reseller_id, o.product_id, 0, 0, 0,
           -count(*), -sum(o.amount), -sum(p.cost), sum(p.cost)
      FROM old_orders o
      JOIN new_orders n ON n.id = o.id AND n.status = 'refunded'
      JOIN purchases p ON p.order_id = o.order_id AND p.state = 'fulfilled'
     WHERE o.status = 'fulfilled'
     GROUP BY 1, 2, 3;
    RETURN NULL;
END $$;

-- As in V1, with the upstream figures folded into product_daily.
CREATE OR REPLACE FUNCTION sales_fold() RETURNS bigint LANGUAGE sql AS $$
    WITH moved AS (
        DELETE FROM sales_pending RETURNING *
    ), r AS (
        INSERT INTO reseller_daily AS s (day, reseller_id, orders, codes, amount)
        SELECT day, reseller_id, sum(orders), sum(codes), sum(amount) FROM moved GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (day, reseller_id) DO UPDATE
           SET orders = s.orders + excluded.orders, codes = s.codes + excluded.codes, amount = s.amount + excluded.amount
    ), p AS (
        INSERT INTO product_daily AS s (day, product_id, orders, codes, amount,
                                        upstream_orders, upstream_amount, cost, refunded_cost)
        SELECT day, product_id, sum(orders), sum(codes), sum(amount),
               sum(upstream_orders), sum(upstream_amount), sum(cost), sum(refunded_cost)
          FROM moved GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (day, product_id) DO UPDATE
           SET orders = s.orders + excluded.orders, codes = s.codes + excluded.codes, amount = s.amount + excluded.amount,
               upstream_orders = s.upstream_orders + excluded.upstream_orders,
               upstream_amount = s.upstream_amount + excluded.upstream_amount,
               cost = s.cost + excluded.cost, refunded_cost = s.refunded_cost + excluded.refunded_cost
    )
    SELECT count(*) FROM moved;
$$;

-- Purchases fulfilled before this migration.
INSERT INTO sales_pending (day, reseller_id, product_id, orders, codes, amount,
                           upstream_orders, upstream_amount, cost, refunded_cost)
SELECT (p.order_created_at AT TIME ZONE 'UTC')::date, p.reseller_id, p.product_id, 0, 0, 0,
       count(*) FILTER (WHERE o.status = 'fulfilled'),
       coalesce(sum(o.amount) FILTER (WHERE o.status = 'fulfilled'), 0),
       coalesce(sum(p.cost) FILTER (WHERE o.status = 'fulfilled'), 0),
       coalesce(sum(p.cost) FILTER (WHERE o.status = 'refunded'), 0)
  FROM purchases p JOIN orders o ON o.order_id = p.order_id
 WHERE p.state = 'fulfilled'
 GROUP BY 1, 2, 3;
