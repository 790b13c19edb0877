-- Orders are listed by id (which follows creation); the time-range reports filter by
-- reseller or product, which have their own indexes.
DROP INDEX orders_created;

-- Group commit in one round trip: the ledger writer hands a whole batch of fulfilments
-- to ledger_commit(), which records them in one statement's transaction.

-- Order debits move balances once per reseller per statement instead of once per row:
-- a batch of a thousand orders from one reseller takes that balance row's lock once.
CREATE OR REPLACE FUNCTION ledger_apply() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    after bigint;
BEGIN
    IF NEW.kind = 'order' THEN
        RETURN NULL; -- ledger_apply_orders, per statement
    END IF;
    UPDATE balances SET balance = balance + NEW.amount, updated_at = now()
     WHERE reseller_id = NEW.reseller_id
    RETURNING balance INTO after;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no balance row for reseller %', NEW.reseller_id;
    END IF;
    UPDATE balance_ledger SET balance_after = after WHERE id = NEW.id;
    RETURN NULL;
END $$;

CREATE FUNCTION ledger_apply_orders() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    moved integer;
    wanted integer;
BEGIN
    SELECT count(DISTINCT reseller_id) INTO wanted FROM new_rows WHERE kind = 'order';
    IF wanted = 0 THEN
        RETURN NULL;
    END IF;
    -- Rows locked in one order, so concurrent writers cannot deadlock on them.
    PERFORM 1 FROM balances
      WHERE reseller_id IN (SELECT reseller_id FROM new_rows WHERE kind = 'order')
      ORDER BY reseller_id FOR UPDATE;
    UPDATE balances b SET balance = b.balance + s.total, updated_at = now()
      FROM (SELECT reseller_id, sum(amount) AS total FROM new_rows WHERE kind = 'order' GROUP BY reseller_id) s
     WHERE b.reseller_id = s.reseller_id;
    GET DIAGNOSTICS moved = ROW_COUNT;
    IF moved <> wanted THEN
        RAISE EXCEPTION 'an order debit names a reseller without a balance row';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER ledger_apply_orders AFTER INSERT ON balance_ledger
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_apply_orders();

-- Records a batch of fulfilments. Arrays of orders (index i = 1..n), then their codes
-- (the order index each belongs to, the code id, its position). Answers one row per
-- order index:
--   committed   recorded now, or before (an outbox entry read twice)
--   duplicate   another order holds this (reseller, merchant_order_no): not recorded
--   last_guard  a code is not deliverable (delivered, voided, another product, or
--               asked for twice in the batch): not recorded
-- Nothing is recorded for a duplicate or a last_guard order; the rest commit together.
CREATE FUNCTION ledger_commit(
    p_order_ids text[], p_resellers bigint[], p_mons text[], p_products bigint[], p_skus text[],
    p_quantities integer[], p_prices bigint[], p_amounts bigint[], p_created timestamptz[], p_currency text,
    p_code_orders integer[], p_code_ids bigint[], p_positions smallint[]
) RETURNS TABLE (idx integer, outcome text) LANGUAGE plpgsql AS $$
DECLARE
    fresh_idx integer[];
    fresh_pk bigint[];
    bad integer[];
BEGIN
    WITH x AS (
        SELECT * FROM unnest(p_order_ids, p_resellers, p_mons, p_products, p_skus, p_quantities, p_prices, p_amounts, p_created)
                 WITH ORDINALITY AS x(o, r, m, p, s, q, u, a, t, i)
    ), ins AS (
        INSERT INTO orders (order_id, reseller_id, merchant_order_no, product_id, sku, quantity, unit_price, amount, currency, created_at)
        SELECT o, r, m, p, s, q, u, a, p_currency, t FROM x ORDER BY r, i
        ON CONFLICT DO NOTHING
        RETURNING orders.id, orders.order_id
    )
    SELECT coalesce(array_agg(x.i::integer), '{}'), coalesce(array_agg(ins.id), '{}')
      INTO fresh_idx, fresh_pk
      FROM ins JOIN x ON x.o = ins.order_id;

    -- Lock the new orders' codes, then find the orders holding one that cannot be delivered.
    PERFORM 1 FROM codes
      WHERE id IN (SELECT code FROM unnest(p_code_orders, p_code_ids) AS u(i, code) WHERE i = ANY(fresh_idx))
      ORDER BY id FOR UPDATE;
    WITH asked AS (
        SELECT u.i, u.code, count(*) OVER (PARTITION BY u.code) AS times
          FROM unnest(p_code_orders, p_code_ids) AS u(i, code) WHERE u.i = ANY(fresh_idx)
    )
    SELECT coalesce(array_agg(DISTINCT a.i), '{}') INTO bad
      FROM asked a LEFT JOIN codes k ON k.id = a.code AND k.product_id = p_products[a.i] AND k.status = 'available'
     WHERE k.id IS NULL OR a.times > 1;
    IF cardinality(bad) > 0 THEN
        DELETE FROM orders WHERE id IN (
            SELECT pk FROM unnest(fresh_idx, fresh_pk) AS f(i, pk) WHERE i = ANY(bad));
    END IF;

    WITH good AS (
        SELECT f.i, f.pk FROM unnest(fresh_idx, fresh_pk) AS f(i, pk) WHERE NOT (f.i = ANY(bad))
    ), deliver AS (
        SELECT good.pk, u.code, u.pos FROM unnest(p_code_orders, p_code_ids, p_positions) AS u(i, code, pos)
          JOIN good ON good.i = u.i
    ), delivered AS (
        UPDATE codes SET status = 'delivered' WHERE id IN (SELECT code FROM deliver) RETURNING id
    )
    INSERT INTO order_codes (order_id, code_id, position) SELECT pk, code, pos FROM deliver;

    INSERT INTO balance_ledger (reseller_id, amount, kind, reference)
    SELECT p_resellers[f.i], -p_amounts[f.i], 'order', p_order_ids[f.i]
      FROM unnest(fresh_idx) AS f(i)
     WHERE NOT (f.i = ANY(bad)) AND p_amounts[f.i] <> 0
     ORDER BY p_resellers[f.i];

    RETURN QUERY
    SELECT i::integer,
           CASE WHEN i::integer = ANY(bad) THEN 'last_guard'
                WHEN i::integer = ANY(fresh_idx) THEN 'committed'
                WHEN EXISTS (SELECT 1 FROM orders o WHERE o.order_id = p_order_ids[i]) THEN 'committed'
                ELSE 'duplicate' END
      FROM generate_series(1, cardinality(p_order_ids)) AS g(i);
END $$;

-- Its statements take whole arrays; a plan that does not depend on their contents is as
-- good as a fresh one, and planning every call would cost more than the work itself.
ALTER FUNCTION ledger_commit SET plan_cache_mode = force_generic_plan;
