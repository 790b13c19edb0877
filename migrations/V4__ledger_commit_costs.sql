-- Two costs of the ledger commit that grew with the batch, found by profiling the order
-- path under load (loadtests/run.sh).

-- 1. Order debits are applied per statement by ledger_apply_orders (V2), yet the per-row
--    trigger still ran a PL/pgSQL call per order only to return at once. The WHEN clause
--    is evaluated without entering PL/pgSQL.
DROP TRIGGER ledger_apply ON balance_ledger;
CREATE TRIGGER ledger_apply AFTER INSERT ON balance_ledger
    FOR EACH ROW WHEN (NEW.kind <> 'order') EXECUTE FUNCTION ledger_apply();

-- 2. ledger_commit found each inserted order's index by joining the inserted rows back to
--    the argument arrays; the generic plan (sized for one row) made that a nested loop,
--    n^2 text comparisons for a batch of n. Same function, same answers, otherwise as in V3.
DROP FUNCTION ledger_commit(bigint[], text[], bigint[], text[], bigint[], text[], integer[], bigint[], bigint[], timestamptz[], text, integer[], bigint[], smallint[]);

CREATE FUNCTION ledger_commit(
    p_epochs bigint[], p_order_ids text[], p_resellers bigint[], p_mons text[], p_products bigint[], p_skus text[],
    p_quantities integer[], p_prices bigint[], p_amounts bigint[], p_created timestamptz[], p_currency text,
    p_code_orders integer[], p_code_ids bigint[], p_positions smallint[]
) RETURNS TABLE (idx integer, outcome text) LANGUAGE plpgsql AS $$
DECLARE
    cur bigint := redis_fence();
    -- order id -> its index, looked up in O(log n): joining the inserted rows back to the
    -- arguments made a nested loop of the generic plan, O(n^2) in the batch size.
    position_of jsonb := (SELECT jsonb_object_agg(o, i) FROM unnest(p_order_ids) WITH ORDINALITY AS u(o, i));
    fresh_idx integer[];
    fresh_pk bigint[];
    bad integer[];
BEGIN
    WITH x AS (
        SELECT * FROM unnest(p_order_ids, p_resellers, p_mons, p_products, p_skus, p_quantities, p_prices, p_amounts, p_created, p_epochs)
                 WITH ORDINALITY AS x(o, r, m, p, s, q, u, a, t, e, i)
         WHERE e = cur
    ), ins AS (
        INSERT INTO orders (order_id, reseller_id, merchant_order_no, product_id, sku, quantity, unit_price, amount, currency, created_at)
        SELECT o, r, m, p, s, q, u, a, p_currency, t FROM x ORDER BY r, i
        ON CONFLICT DO NOTHING
        RETURNING orders.id, orders.order_id
    )
    SELECT coalesce(array_agg((position_of ->> ins.order_id)::integer), '{}'), coalesce(array_agg(ins.id), '{}')
      INTO fresh_idx, fresh_pk
      FROM ins;

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
                WHEN p_epochs[i] <> cur THEN 'stale'
                ELSE 'duplicate' END
      FROM generate_series(1, cardinality(p_order_ids)) AS g(i);
END $$;

-- Its statements take whole arrays; a plan that does not depend on their contents is as
-- good as a fresh one, and planning every call would cost more than the work itself.
ALTER FUNCTION ledger_commit SET plan_cache_mode = force_generic_plan;
