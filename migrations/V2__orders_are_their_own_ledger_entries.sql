-- A lean durable record for each order (docs/performance.md, "The per-order record").
--
-- An order is its own ledger entry. It carried a debit row in balance_ledger that said
-- again what the order says (who, how much, under which order id), with three indexes,
-- a foreign key and a trigger of its own: about a third of Postgres's work per order.
-- Now the order moves the balance itself, per statement, and is append-only like the
-- ledger (its one change is the refund). balance_ledger keeps the movements that are not
-- orders; ledger_entries is the two together, the statement of a balance.
--
-- Foreign keys that every order paid for and nothing needs: an order's reseller must
-- have a balance row (orders_charge refuses one without) and its codes must be
-- deliverable codes of its product (ledger_commit refuses any other), and neither
-- resellers, products nor codes are ever deleted. Each key check locked the reseller's
-- and the product's row FOR KEY SHARE in every commit, so concurrent commits shared
-- those rows through multixacts.
--
-- Time scans over orders (reports' edge days, the operators' order search) read a BRIN
-- index on created_at, which the order path keeps for nearly nothing, instead of a
-- B-tree per product.

-- The debits already written are the orders themselves: check that, then drop them.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM balance_ledger l WHERE l.kind = 'order'
                  AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.order_id = l.reference
                                     AND o.reseller_id = l.reseller_id AND o.amount = -l.amount))
       OR EXISTS (SELECT 1 FROM orders o WHERE o.amount <> 0
                     AND NOT EXISTS (SELECT 1 FROM balance_ledger l WHERE l.kind = 'order'
                                        AND l.reference = o.order_id AND l.reseller_id = o.reseller_id)) THEN
        RAISE EXCEPTION 'order debits and orders disagree; run cardgate reconcile on the previous version first';
    END IF;
END $$;
ALTER TABLE balance_ledger DISABLE TRIGGER ledger_append_only;
DELETE FROM balance_ledger WHERE kind = 'order';
ALTER TABLE balance_ledger ENABLE TRIGGER ledger_append_only;

DROP TRIGGER ledger_apply_orders ON balance_ledger;
DROP FUNCTION ledger_apply_orders();
DROP TRIGGER ledger_apply ON balance_ledger;
ALTER TABLE balance_ledger DROP CONSTRAINT balance_ledger_kind_check,
    ADD CONSTRAINT balance_ledger_kind_check CHECK (kind IN ('adjustment', 'refund'));

-- Every movement moves the balance row by row and records the balance after, the answer
-- an idempotent replay repeats. AFTER, not BEFORE: a BEFORE trigger also fires for rows
-- that ON CONFLICT DO NOTHING then skips.
CREATE OR REPLACE FUNCTION ledger_apply() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    after bigint;
BEGIN
    UPDATE balances SET balance = balance + NEW.amount, updated_at = now()
     WHERE reseller_id = NEW.reseller_id
    RETURNING balance INTO after;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no balance row for reseller %', NEW.reseller_id;
    END IF;
    UPDATE balance_ledger SET balance_after = after WHERE id = NEW.id;
    RETURN NULL;
END $$;
CREATE TRIGGER ledger_apply AFTER INSERT ON balance_ledger
    FOR EACH ROW EXECUTE FUNCTION ledger_apply();

ALTER TABLE orders DROP CONSTRAINT orders_reseller_id_fkey, DROP CONSTRAINT orders_product_id_fkey;
ALTER TABLE order_codes DROP CONSTRAINT order_codes_order_id_fkey, DROP CONSTRAINT order_codes_code_id_fkey;
DROP INDEX orders_product_created;
CREATE INDEX orders_created ON orders USING brin (created_at);

-- The statement of a balance: every movement, signed; the amounts sum to the balance.
CREATE VIEW ledger_entries AS
    SELECT reseller_id, 'order'::text AS kind, order_id AS reference, -amount AS amount, created_at
      FROM orders WHERE amount <> 0
    UNION ALL
    SELECT reseller_id, kind, reference, amount, created_at FROM balance_ledger;

-- New orders move their resellers' balances once per reseller per statement (a batch of
-- a thousand orders from one reseller takes that balance row's lock once), and append
-- their sales to the rollups' queue. Balance rows are locked in one order, so concurrent
-- writers cannot deadlock on them.
CREATE FUNCTION orders_charge() RETURNS trigger LANGUAGE plpgsql AS $$
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
      FROM new_orders GROUP BY 1, 2, 3;
    RETURN NULL;
END $$;
DROP TRIGGER sales_daily_insert ON orders;
DROP TRIGGER sales_daily_delete ON orders;
CREATE TRIGGER orders_charge AFTER INSERT ON orders
    REFERENCING NEW TABLE AS new_orders FOR EACH STATEMENT EXECUTE FUNCTION orders_charge();

-- Refunds take their orders out of the rollups (the refund's money is its own ledger row).
CREATE OR REPLACE FUNCTION sales_daily_keep() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sales_pending (day, reseller_id, product_id, orders, codes, amount)
    SELECT (created_at AT TIME ZONE 'UTC')::date, reseller_id, product_id, -count(*), -sum(quantity), -sum(amount)
      FROM old_orders WHERE status = 'fulfilled' GROUP BY 1, 2, 3;
    INSERT INTO sales_pending (day, reseller_id, product_id, orders, codes, amount)
    SELECT (created_at AT TIME ZONE 'UTC')::date, reseller_id, product_id, count(*), sum(quantity), sum(amount)
      FROM new_orders WHERE status = 'fulfilled' GROUP BY 1, 2, 3;
    RETURN NULL;
END $$;

-- Orders are ledger entries: never deleted, and their one change is the refund.
CREATE FUNCTION orders_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.status = 'fulfilled' AND NEW.status = 'refunded'
       AND (NEW.id, NEW.order_id, NEW.reseller_id, NEW.merchant_order_no, NEW.product_id, NEW.sku, NEW.quantity,
            NEW.unit_price, NEW.amount, NEW.currency, NEW.created_at)
           IS NOT DISTINCT FROM
           (OLD.id, OLD.order_id, OLD.reseller_id, OLD.merchant_order_no, OLD.product_id, OLD.sku, OLD.quantity,
            OLD.unit_price, OLD.amount, OLD.currency, OLD.created_at) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'orders are ledger entries: append-only but for their refund';
END $$;
CREATE TRIGGER orders_append_only BEFORE UPDATE OR DELETE ON orders
    FOR EACH ROW EXECUTE FUNCTION orders_append_only();
CREATE FUNCTION orders_no_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'orders are ledger entries: append-only but for their refund';
END $$;
CREATE TRIGGER orders_no_truncate BEFORE TRUNCATE ON orders
    FOR EACH STATEMENT EXECUTE FUNCTION orders_no_truncate();

-- The group commit, as before (V1) but for three changes. Codes are checked before the
-- orders are inserted, so an order that cannot be delivered is never inserted and never
-- deleted. An order already recorded under its id answers 'committed' whatever its codes
-- now say (an outbox entry read twice, even by two writers at once: the second waits on
-- the first's code locks, then finds the order). No ledger rows: the orders are the
-- debits.
CREATE OR REPLACE FUNCTION ledger_commit(
    p_epochs bigint[], p_order_ids text[], p_resellers bigint[], p_mons text[], p_products bigint[], p_skus text[],
    p_quantities integer[], p_prices bigint[], p_amounts bigint[], p_created timestamptz[], p_currency text,
    p_code_orders integer[], p_code_ids bigint[], p_positions smallint[]
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
        SELECT * FROM unnest(p_order_ids, p_resellers, p_mons, p_products, p_skus, p_quantities, p_prices, p_amounts, p_created, p_epochs)
                 WITH ORDINALITY AS x(o, r, m, p, s, q, u, a, t, e, i)
         WHERE e = cur AND NOT (i::integer = ANY(bad))
    ), ins AS (
        INSERT INTO orders (order_id, reseller_id, merchant_order_no, product_id, sku, quantity, unit_price, amount, currency, created_at)
        SELECT o, r, m, p, s, q, u, a, p_currency, t FROM x ORDER BY r, i
        ON CONFLICT DO NOTHING
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
