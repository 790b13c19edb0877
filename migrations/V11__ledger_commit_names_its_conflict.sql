-- ledger_commit as in V7, its orders' insert naming the one conflict it can meet, the
-- merchant_order_no under its reseller (a fulfilment sent again, or a second reservation
-- of the number), instead of checking every unique index before each row: order_id and
-- id cannot meet one of their own (an order id is drawn once, and a fulfilment sent
-- again carries its number too). About a sixth of the function's index lookups
-- (docs/performance.md).
CREATE OR REPLACE FUNCTION ledger_commit(
    p_epochs bigint[], p_order_ids text[], p_resellers bigint[], p_mons text[], p_products bigint[], p_skus text[],
    p_quantities integer[], p_prices bigint[], p_amounts bigint[], p_created timestamptz[], p_currency text,
    p_code_orders integer[], p_code_ids bigint[], p_positions smallint[], p_key_ids text[]
) RETURNS TABLE (idx integer, outcome text) LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    cur bigint := redis_fence();
    -- order id -> its index, looked up in O(log n): joining the inserted rows back to the
    -- arguments made a nested loop of the generic plan, O(n^2) in the batch size.
    position_of jsonb := (SELECT jsonb_object_agg(o, i) FROM unnest(p_order_ids) WITH ORDINALITY AS u(o, i));
    fresh_idx integer[];
    fresh_pk bigint[];
    bad integer[];
BEGIN
    -- Lock the codes of the orders reserved at this epoch, then find the orders holding
    -- one that cannot be delivered (delivered, voided, another product's, or asked for
    -- twice in the batch).
    PERFORM 1 FROM codes
      WHERE id IN (SELECT code FROM unnest(p_code_orders, p_code_ids) AS u(i, code) WHERE p_epochs[u.i] = cur)
      ORDER BY id FOR UPDATE;
    WITH asked AS (
        SELECT u.i, u.code, count(*) OVER (PARTITION BY u.code) AS times
          FROM unnest(p_code_orders, p_code_ids) AS u(i, code) WHERE p_epochs[u.i] = cur
    )
    SELECT coalesce(array_agg(DISTINCT a.i), '{}') INTO bad
      FROM asked a LEFT JOIN codes k ON k.id = a.code AND k.product_id = p_products[a.i] AND k.status = 'available'
     WHERE k.id IS NULL OR a.times > 1;

    WITH x AS (
        SELECT * FROM unnest(p_order_ids, p_resellers, p_mons, p_products, p_skus, p_quantities, p_prices, p_amounts, p_created, p_epochs, p_key_ids)
                 WITH ORDINALITY AS x(o, r, m, p, s, q, u, a, t, e, k, i)
         WHERE e = cur AND NOT (i::integer = ANY(bad))
    ), ins AS (
        INSERT INTO orders (order_id, reseller_id, merchant_order_no, product_id, sku, quantity, unit_price, amount, currency, created_at, key_id)
        SELECT o, r, m, p, s, q, u, a, p_currency, t, k FROM x ORDER BY r, i
        ON CONFLICT (reseller_id, merchant_order_no) DO NOTHING
        RETURNING orders.id, orders.order_id
    )
    SELECT coalesce(array_agg((position_of ->> ins.order_id)::integer), '{}'), coalesce(array_agg(ins.id), '{}')
      INTO fresh_idx, fresh_pk
      FROM ins;

    WITH deliver AS (
        SELECT f.pk, u.code, u.pos FROM unnest(p_code_orders, p_code_ids, p_positions) AS u(i, code, pos)
          JOIN unnest(fresh_idx, fresh_pk) AS f(i, pk) ON f.i = u.i
    ), delivered AS (
        UPDATE codes SET status = 'delivered' WHERE id IN (SELECT code FROM deliver) RETURNING id
    )
    INSERT INTO order_codes (order_id, code_id, position) SELECT pk, code, pos FROM deliver;

    IF EXISTS (SELECT 1 FROM resellers WHERE id = ANY(p_resellers) AND callback_url IS NOT NULL) THEN
        INSERT INTO events (reseller_id, type, data)
        SELECT o.reseller_id, 'order.fulfilled', order_event_data(o)
          FROM orders o JOIN resellers r ON r.id = o.reseller_id AND r.callback_url IS NOT NULL
         WHERE o.id = ANY(fresh_pk)
         ORDER BY o.id;
    END IF;

    RETURN QUERY
    SELECT i::integer,
           CASE WHEN i::integer = ANY(fresh_idx) THEN 'committed'
                WHEN EXISTS (SELECT 1 FROM orders o WHERE o.order_id = p_order_ids[i]) THEN 'committed'
                WHEN p_epochs[i] <> cur THEN 'stale'
                WHEN i::integer = ANY(bad) THEN 'last_guard'
                ELSE 'duplicate' END
      FROM generate_series(1, cardinality(p_order_ids)) AS g(i);
END $$;
