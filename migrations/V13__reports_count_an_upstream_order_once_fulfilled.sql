-- The rollups count what is sold: an order bought upstream counts once it is fulfilled,
-- not while it is processing. A processing order used to count from its insert until it
-- failed, so a report listed codes sold that nobody had received yet, and a reseller's
-- spend there differed from the spend its balance and the rebates show (fulfilled orders
-- only, docs/api.md §6).

-- As in V9: no order is inserted, fulfilled or failed while the triggers change and the
-- processing orders are taken out, or one could be counted twice or not at all.
LOCK TABLE orders, purchases IN SHARE ROW EXCLUSIVE MODE;

-- As in V2, counting fulfilled orders only.
CREATE OR REPLACE FUNCTION orders_charge() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    moved integer;
    wanted integer;
BEGIN
    SELECT count(DISTINCT reseller_id) INTO wanted FROM new_orders;
    PERFORM 1 FROM balances WHERE reseller_id IN (SELECT reseller_id FROM new_orders)
      ORDER BY reseller_id FOR UPDATE;
    UPDATE balances b SET balance = b.balance - s.total, updated_at = now()
      FROM (SELECT reseller_id, sum(amount) AS total FROM new_orders GROUP BY reseller_id) s
     WHERE b.reseller_id = s.reseller_id;
    GET DIAGNOSTICS moved = ROW_COUNT;
    IF moved <> wanted THEN
        RAISE EXCEPTION 'an order names a reseller without a balance row';
    END IF;
    INSERT INTO sales_pending (day, reseller_id, product_id, orders, codes, amount)
    SELECT (created_at AT TIME ZONE 'UTC')::date, reseller_id, product_id, count(*), sum(quantity), sum(amount)
      FROM new_orders WHERE status = 'fulfilled' GROUP BY 1, 2, 3;
    RETURN NULL;
END $$;

-- As in V9, counting fulfilled orders only: a processing order enters the rollups when
-- it is fulfilled, and one that fails never does.
CREATE OR REPLACE FUNCTION sales_daily_keep() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sales_pending (day, reseller_id, product_id, orders, codes, amount)
    SELECT (created_at AT TIME ZONE 'UTC')::date, reseller_id, product_id, -count(*), -sum(quantity), -sum(amount)
      FROM old_orders WHERE status = 'fulfilled' GROUP BY 1, 2, 3;
    INSERT INTO sales_pending (day, reseller_id, product_id, orders, codes, amount)
    SELECT (created_at AT TIME ZONE 'UTC')::date, reseller_id, product_id, count(*), sum(quantity), sum(amount)
      FROM new_orders WHERE status = 'fulfilled' GROUP BY 1, 2, 3;
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

-- The orders processing now were counted by the old rule: they leave the rollups, and
-- enter them again if they are fulfilled.
INSERT INTO sales_pending (day, reseller_id, product_id, orders, codes, amount)
SELECT (created_at AT TIME ZONE 'UTC')::date, reseller_id, product_id, -count(*), -sum(quantity), -sum(amount)
  FROM orders WHERE status = 'processing' GROUP BY 1, 2, 3;
