-- Merchant callbacks (API.md "Merchant callbacks"). An event is queued here by the same
-- transaction that makes it happen, so it exists exactly when its cause does; the
-- gateways' dispatchers deliver it afterwards (src/callbacks), never on the order path.
CREATE TABLE events (
    id              bigserial   PRIMARY KEY,
    event_id        text        NOT NULL UNIQUE DEFAULT ('evt_' || replace(gen_random_uuid()::text, '-', '')),
    reseller_id     bigint      NOT NULL REFERENCES resellers (id),
    type            text        NOT NULL CHECK (type IN ('order.fulfilled', 'order.refunded', 'product.restocked',
                                                         'product.price_changed', 'balance.low')),
    data            jsonb       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    status          text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer     NOT NULL DEFAULT 0,
    -- While an attempt runs this is its lease: a dispatcher that dies mid-attempt leaves
    -- the event due again when the lease ends.
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    -- Retries stop here (24 hours after the event); a redelivery opens a new window.
    retry_until     timestamptz NOT NULL DEFAULT now() + interval '24 hours',
    delivered_at    timestamptz
);
CREATE INDEX events_due ON events (next_attempt_at) WHERE status = 'pending';
CREATE INDEX events_reseller ON events (reseller_id, id);

CREATE TABLE event_deliveries (
    event_id    bigint      NOT NULL REFERENCES events (id),
    attempt     integer     NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    -- The receiver's status, or NULL when there was none (timeout, refused connection).
    status_code integer,
    error       text,
    duration_ms integer     NOT NULL,
    PRIMARY KEY (event_id, attempt)
);

-- Times as the API writes them: RFC 3339, UTC, to the second.
CREATE FUNCTION api_time(t timestamptz) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
$$;

-- An order as API.md shows it, without its codes: codes are revealed only to a signed
-- request, never pushed to a URL.
CREATE FUNCTION order_event_data(o orders) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('order_id', o.order_id, 'merchant_order_no', o.merchant_order_no, 'sku', o.sku,
                              'quantity', o.quantity, 'unit_price', o.unit_price, 'amount', o.amount,
                              'currency', o.currency, 'status', o.status, 'created_at', api_time(o.created_at))
$$;

-- Active resellers with a callback URL and what a product costs each of them.
CREATE FUNCTION callback_prices(product bigint) RETURNS TABLE (reseller_id bigint, price bigint)
LANGUAGE sql STABLE AS $$
    SELECT r.id, coalesce(tp.price, p.base_price)
      FROM resellers r
      JOIN products p ON p.id = product
      LEFT JOIN product_tier_prices tp ON tp.product_id = p.id AND tp.tier = r.tier
     WHERE r.callback_url IS NOT NULL AND r.status = 'active'
$$;

CREATE FUNCTION order_refunded_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO events (reseller_id, type, data)
    SELECT NEW.reseller_id, 'order.refunded',
           order_event_data(NEW) || jsonb_build_object('refunded_at', api_time(NEW.refunded_at), 'refund_reason', NEW.refund_reason)
      FROM resellers r WHERE r.id = NEW.reseller_id AND r.callback_url IS NOT NULL;
    RETURN NULL;
END $$;
CREATE TRIGGER order_refunded AFTER UPDATE OF status ON orders
    FOR EACH ROW WHEN (OLD.status = 'fulfilled' AND NEW.status = 'refunded') EXECUTE FUNCTION order_refunded_event();

-- Crossing the threshold downwards, once: not again until the balance has been above it.
CREATE FUNCTION balance_low_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO events (reseller_id, type, data)
    SELECT r.id, 'balance.low', jsonb_build_object('balance', NEW.balance, 'low_balance_threshold', r.low_balance_threshold)
      FROM resellers r
     WHERE r.id = NEW.reseller_id AND r.callback_url IS NOT NULL
       AND NEW.balance < r.low_balance_threshold AND OLD.balance >= r.low_balance_threshold;
    RETURN NULL;
END $$;
CREATE TRIGGER balance_low AFTER UPDATE OF balance ON balances
    FOR EACH ROW WHEN (NEW.balance < OLD.balance) EXECUTE FUNCTION balance_low_event();

-- A SKU went from no available code to some. Imports insert in chunks; only the chunk
-- that finds no older available code of the product fires. Codes reserved in Redis but
-- not yet committed still count as available here, so a restock within milliseconds of
-- a sell-out may not fire.
CREATE FUNCTION codes_restocked_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO events (reseller_id, type, data)
    SELECT cp.reseller_id, 'product.restocked', jsonb_build_object('sku', p.sku, 'name', p.name, 'price', cp.price)
      FROM (SELECT product_id, min(id) AS first FROM new_codes WHERE status = 'available' GROUP BY product_id) n
      JOIN products p ON p.id = n.product_id AND p.status = 'on_sale'
     CROSS JOIN LATERAL callback_prices(n.product_id) cp
     WHERE NOT EXISTS (SELECT 1 FROM codes c
                        WHERE c.product_id = n.product_id AND c.status = 'available' AND c.id < n.first);
    RETURN NULL;
END $$;
CREATE TRIGGER codes_restocked AFTER INSERT ON codes
    REFERENCING NEW TABLE AS new_codes FOR EACH STATEMENT EXECUTE FUNCTION codes_restocked_event();

-- ledger_commit as in V4, and an order.fulfilled event for each committed order of a
-- reseller with a callback URL, in the same transaction.
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

    IF EXISTS (SELECT 1 FROM resellers WHERE id = ANY(p_resellers) AND callback_url IS NOT NULL) THEN
        INSERT INTO events (reseller_id, type, data)
        SELECT o.reseller_id, 'order.fulfilled', order_event_data(o)
          FROM orders o JOIN resellers r ON r.id = o.reseller_id AND r.callback_url IS NOT NULL
         WHERE o.id IN (SELECT pk FROM unnest(fresh_idx, fresh_pk) AS f(i, pk) WHERE NOT (f.i = ANY(bad)))
         ORDER BY o.id;
    END IF;

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
