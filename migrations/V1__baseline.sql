-- cardgate schema. Postgres is the system of record: Redis holds a cache of it plus the
-- orders in flight, and the constraints and triggers here are the last guard behind
-- every invariant (docs/invariants.md), whatever the gateway or Redis believe.
--
-- Read top to bottom: settings, tables, the functions and triggers that keep the
-- invariants, seed rows. Later changes are small migrations after this one (V2, V3, ...);
-- tests/api/schema.rs compares a migrated database with migrations/schema.snapshot.
--
-- Settings and extensions: none. gen_random_uuid() (event ids) is built in since
-- Postgres 13. The one per-function setting is on ledger_commit (plan_cache_mode).


-- ===================================================================================
-- Tables
-- ===================================================================================

-- Operators of the admin API. `password_changed_at` ends every token issued before it:
-- the gateway refuses a token whose `iat` is earlier (read with the role on each admin
-- call); NULL means never changed since the account was created.
CREATE TABLE admins (
    id                  bigserial PRIMARY KEY,
    username            text        NOT NULL UNIQUE CHECK (username ~ '^[A-Za-z0-9_.@-]{1,64}$'),
    password_hash       text        NOT NULL,
    role                text        NOT NULL CHECK (role IN ('admin', 'operator', 'auditor')),
    disabled            boolean     NOT NULL DEFAULT false,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    password_changed_at timestamptz
);

-- Resellers: the merchants who buy codes through the signed API. `id` is internal and
-- referenced by every other table; `reseller_id` is the identifier the API shows.
--
-- Money has bounds: 10^15 minor units either way (MONEY_MAX_MINOR in src/money.rs,
-- docs/invariants.md invariant 11). The reservation scripts compare money as Lua numbers
-- (doubles), exact only below 2^53 (about 9.007 * 10^15), and a price times a quantity
-- must stay far from i64 overflow. The gateway refuses larger values with 400; the
-- `*_bounded` constraints on every money column below are the last guard.
CREATE TABLE resellers (
    id                    bigserial PRIMARY KEY,
    reseller_id           text        NOT NULL UNIQUE,
    name                  text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    tier                  text        NOT NULL,
    status                text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    -- CIDRs as text: validated by the gateway, matched in memory on the hot path.
    ip_allowlist          text[]      NOT NULL DEFAULT '{}',
    callback_url          text,
    low_balance_threshold bigint      NOT NULL DEFAULT 0 CHECK (low_balance_threshold >= 0)
                          CONSTRAINT resellers_low_balance_threshold_bounded CHECK (low_balance_threshold <= 1000000000000000),
    -- AES-256-GCM under the master key; needed in clear to sign callbacks.
    webhook_secret_enc    bytea       NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);

-- A reseller's API keys (docs/api.md §1). Revoked keys stay, so old signatures are
-- still attributable.
CREATE TABLE api_keys (
    key_id      text        PRIMARY KEY,
    reseller_id bigint      NOT NULL REFERENCES resellers (id),
    -- Encrypted, not hashed: HMAC verification needs the secret itself.
    secret_enc  bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_reseller ON api_keys (reseller_id);

-- The catalogue. A SKU appears in URLs, hence no '/', '?', '#' or spaces.
CREATE TABLE products (
    id                  bigserial PRIMARY KEY,
    sku                 text        NOT NULL UNIQUE CHECK (sku ~ '^[^/?#[:space:]]{1,64}$'),
    name                text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    face_value          bigint      NOT NULL CHECK (face_value >= 0)
                        CONSTRAINT products_face_value_bounded CHECK (face_value <= 1000000000000000),
    base_price          bigint      NOT NULL CHECK (base_price >= 0)
                        CONSTRAINT products_base_price_bounded CHECK (base_price <= 1000000000000000),
    max_quantity        integer     NOT NULL CHECK (max_quantity BETWEEN 1 AND 10000),
    status              text        NOT NULL DEFAULT 'on_sale' CHECK (status IN ('on_sale', 'off_sale')),
    low_stock_threshold integer     CHECK (low_stock_threshold >= 0),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- A product's price for a tier; without a row the tier pays `base_price`.
CREATE TABLE product_tier_prices (
    product_id bigint NOT NULL REFERENCES products (id) ON DELETE CASCADE,
    tier       text   NOT NULL,
    price      bigint NOT NULL CHECK (price >= 0)
               CONSTRAINT product_tier_prices_price_bounded CHECK (price <= 1000000000000000),
    PRIMARY KEY (product_id, tier)
);

-- The codes themselves, encrypted. A code is imported once per product, and leaves
-- 'available' once: delivered or voided (docs/invariants.md invariant 4).
CREATE TABLE codes (
    id          bigserial PRIMARY KEY,
    product_id  bigint      NOT NULL REFERENCES products (id),
    -- HMAC-SHA256 of the code under a key derived from the master key: finds duplicates
    -- without ever decrypting.
    code_hash   bytea       NOT NULL,
    code_enc    bytea       NOT NULL,
    status      text        NOT NULL DEFAULT 'available' CHECK (status IN ('available', 'delivered', 'voided')),
    imported_at timestamptz NOT NULL DEFAULT now(),
    voided_at   timestamptz,
    CONSTRAINT codes_unique_per_product UNIQUE (product_id, code_hash)
);
-- Stock counts, the Redis rebuild and the restock trigger read only the available codes.
CREATE INDEX codes_available ON codes (product_id, id) WHERE status = 'available';

-- Fulfilled orders, written by ledger_commit() only. Orders are listed by id (which
-- follows creation); the time-range reports filter by reseller or product, which have
-- their own indexes.
CREATE TABLE orders (
    id                bigserial PRIMARY KEY,
    order_id          text        NOT NULL UNIQUE,
    reseller_id       bigint      NOT NULL REFERENCES resellers (id),
    merchant_order_no text        NOT NULL CHECK (merchant_order_no ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    product_id        bigint      NOT NULL REFERENCES products (id),
    sku               text        NOT NULL,
    quantity          integer     NOT NULL CHECK (quantity > 0),
    unit_price        bigint      NOT NULL CHECK (unit_price >= 0)
                      CONSTRAINT orders_unit_price_bounded CHECK (unit_price <= 1000000000000000),
    amount            bigint      NOT NULL
                      CONSTRAINT orders_amount_bounded CHECK (amount BETWEEN 0 AND 1000000000000000),
    currency          text        NOT NULL,
    status            text        NOT NULL DEFAULT 'fulfilled' CHECK (status IN ('fulfilled', 'refunded')),
    created_at        timestamptz NOT NULL,
    refunded_at       timestamptz,
    refund_reason     text,
    CONSTRAINT orders_amount CHECK (amount = unit_price * quantity),
    -- Invariant 6: one merchant_order_no is one order, forever.
    CONSTRAINT orders_idempotency UNIQUE (reseller_id, merchant_order_no)
);
CREATE INDEX orders_reseller_created ON orders (reseller_id, created_at, id);
CREATE INDEX orders_product_created ON orders (product_id, created_at, id);

-- Which codes an order delivered, in the order the API shows them.
CREATE TABLE order_codes (
    order_id bigint   NOT NULL REFERENCES orders (id),
    code_id  bigint   NOT NULL REFERENCES codes (id),
    position smallint NOT NULL,
    PRIMARY KEY (order_id, position),
    -- Invariant 1: whatever Redis says, a code is delivered at most once. A refund voids
    -- the code but keeps this row, so a refunded code can never be sold again either.
    CONSTRAINT delivered_code_unique UNIQUE (code_id)
);

-- A reseller's balance. It changes only through ledger rows: the ledger triggers are
-- the one writer of `balance` (balances_guard refuses any other), and the ledger itself
-- is append-only. Never negative: the last guard against an overdraft.
CREATE TABLE balances (
    reseller_id bigint      PRIMARY KEY REFERENCES resellers (id),
    balance     bigint      NOT NULL DEFAULT 0 CONSTRAINT balance_not_negative CHECK (balance >= 0)
                CONSTRAINT balance_bounded CHECK (balance BETWEEN -1000000000000000 AND 1000000000000000),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Every movement of money, append-only (ledger_append_only, ledger_no_truncate). One
-- (reseller, kind, reference) is one movement: a retried adjustment or refund finds its
-- row instead of moving the balance twice.
CREATE TABLE balance_ledger (
    id            bigserial PRIMARY KEY,
    reseller_id   bigint      NOT NULL REFERENCES resellers (id),
    amount        bigint      NOT NULL CHECK (amount <> 0)
                  CONSTRAINT balance_ledger_amount_bounded CHECK (amount BETWEEN -1000000000000000 AND 1000000000000000),
    kind          text        NOT NULL CHECK (kind IN ('adjustment', 'order', 'refund')),
    -- Operator-given for adjustments, the order id for orders and refunds.
    reference     text        NOT NULL CHECK (length(reference) BETWEEN 1 AND 128),
    note          text,
    actor         text,
    -- Set by ledger_apply for adjustments and refunds (the answer an idempotent replay
    -- repeats); left NULL for order debits, which are written in bulk.
    balance_after bigint,
    created_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT ledger_idempotency UNIQUE (reseller_id, kind, reference)
);
CREATE INDEX balance_ledger_reseller ON balance_ledger (reseller_id, id);

-- Hot-balance moves decided in Postgres and not yet known to be applied in Redis
-- (src/hot_balance.rs).
--
-- A credit (an adjustment or a refund) is spendable only once the hot balance has it;
-- a debit is first held in the hot balance (in-flight orders may already have the
-- money) and given back if its ledger row is not written. Each of those Redis steps can
-- fail after Postgres has decided, so each is recorded here, in the transaction that
-- decides it (or, for a hold, before the hold is taken), and deleted once applied: by
-- the request itself, by a replay of it, or by the background step that retries them.
CREATE TABLE hot_balance_pending (
    -- 'ledger:<ledger id>' for a credit, 'hold:<reseller id>:<reference>' for a debit hold.
    movement    text        PRIMARY KEY,
    reseller_id bigint      NOT NULL REFERENCES resellers (id),
    -- What applying it adds to the hot balance (a hold gives back its amount).
    amount      bigint      NOT NULL CHECK (amount > 0),
    -- 'credit': apply when seen. 'hold': the request that took it is still deciding;
    -- given back only once abandoned. 'release': its ledger row was not written; give back.
    kind        text        NOT NULL CHECK (kind IN ('credit', 'hold', 'release')),
    -- The Redis epoch it was decided under: after a rebuild Redis has Postgres's figure,
    -- which already has it, so the row is dropped unapplied.
    epoch       bigint      NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX hot_balance_pending_reseller ON hot_balance_pending (reseller_id);

-- Who did what: operator actions, reseller-visible changes, system steps.
CREATE TABLE audit_log (
    id         bigserial PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    actor      text        NOT NULL,
    actor_kind text        NOT NULL CHECK (actor_kind IN ('admin', 'reseller', 'system')),
    action     text        NOT NULL,
    target     text,
    ip         text,
    detail     jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_at ON audit_log (at, id);
CREATE INDEX audit_log_actor ON audit_log (actor, at);
CREATE INDEX audit_log_action ON audit_log (action, at);

-- Merchant callbacks (docs/api.md §4, "Merchant callbacks"). An event is queued here by
-- the same transaction that makes it happen (ledger_commit and the event triggers
-- below), so it exists exactly when its cause does; the gateways' dispatchers deliver
-- it afterwards (src/callbacks), never on the order path.
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

-- Each attempt to deliver an event, for the operators' view of a callback.
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

-- The Redis epoch (one row). Redis holds a cache of Postgres (stock, hot balances,
-- idempotency records) plus the fulfilments in flight. When Redis loses it, a gateway
-- rebuilds it from here (src/rebuild.rs); the epoch numbers those rebuilds. Redis keeps
-- the epoch it was built at, the reservation script stamps it on every fulfilment, and
-- ledger_commit() refuses fulfilments of an older one: the rebuild gave their codes and
-- money back already.
CREATE TABLE redis_epoch (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    epoch     bigint  NOT NULL
);

-- Platform-wide facts the triggers need (one row). Money in callback events carries its
-- currency, as every amount the API shows does (docs/api.md: an integer in minor units
-- plus a currency string). The currency is configuration; each gateway writes it here
-- when it starts (src/store/pg.rs), so the triggers that queue events can name it.
CREATE TABLE platform (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    currency  text    NOT NULL CHECK (currency ~ '^[A-Z]{3}$')
);

-- Report rollups (docs/api.md §4, "Reports"). Operator reports read whole UTC days from
-- these two and only the partial days at the edges of a range from orders, so a report
-- over months of ten million orders reads at most days x resellers (or x SKUs) rows.
-- They count fulfilled orders (a refund takes its order out). Only sales_fold() writes
-- them; the order path appends to sales_pending instead (see sales_daily_keep).
CREATE TABLE reseller_daily (
    day         date   NOT NULL,
    reseller_id bigint NOT NULL,
    orders      bigint NOT NULL,
    codes       bigint NOT NULL,
    amount      bigint NOT NULL,
    PRIMARY KEY (day, reseller_id)
);
CREATE TABLE product_daily (
    day        date   NOT NULL,
    product_id bigint NOT NULL,
    orders     bigint NOT NULL,
    codes      bigint NOT NULL,
    amount     bigint NOT NULL,
    PRIMARY KEY (day, product_id)
);

-- What the orders' statements added to or took from the rollups, not yet folded in.
-- Upserting the rollups inside every ledger commit made each commit wait on the rows of
-- the day the previous one still held (at 2,000 orders/s: median order latency doubled,
-- p99 six times; docs/performance.md). Appending here shares no row between
-- transactions. No key: rows are only appended and deleted whole by sales_fold().
CREATE TABLE sales_pending (
    day         date   NOT NULL,
    reseller_id bigint NOT NULL,
    product_id  bigint NOT NULL,
    orders      bigint NOT NULL,
    codes       bigint NOT NULL,
    amount      bigint NOT NULL
);


-- ===================================================================================
-- The ledger: balances move only through it, and it is append-only
-- ===================================================================================

-- Adjustments and refunds move the balance row by row and record the balance after, the
-- answer an idempotent replay repeats. AFTER, not BEFORE: a BEFORE trigger also fires
-- for rows that ON CONFLICT DO NOTHING then skips, which would move the balance for an
-- insert that never happened. Order debits are skipped by the trigger's WHEN clause
-- (evaluated without entering PL/pgSQL) and moved per statement by ledger_apply_orders.
CREATE FUNCTION ledger_apply() RETURNS trigger LANGUAGE plpgsql AS $$
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
CREATE TRIGGER ledger_apply AFTER INSERT ON balance_ledger
    FOR EACH ROW WHEN (NEW.kind <> 'order') EXECUTE FUNCTION ledger_apply();

-- Order debits move balances once per reseller per statement instead of once per row:
-- a batch of a thousand orders from one reseller takes that balance row's lock once.
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

-- Append-only: the one update allowed is ledger_apply filling in balance_after once.
CREATE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND pg_trigger_depth() > 1 AND OLD.balance_after IS NULL
       AND (NEW.id, NEW.reseller_id, NEW.amount, NEW.kind, NEW.reference, NEW.note, NEW.actor, NEW.created_at)
           IS NOT DISTINCT FROM
           (OLD.id, OLD.reseller_id, OLD.amount, OLD.kind, OLD.reference, OLD.note, OLD.actor, OLD.created_at) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'balance_ledger is append-only';
END $$;
CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON balance_ledger
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();

-- Row triggers do not see TRUNCATE.
CREATE FUNCTION ledger_no_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'balance_ledger is append-only';
END $$;
CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON balance_ledger
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_no_truncate();

-- A balance starts at zero and moves only when the ledger triggers move it
-- (pg_trigger_depth() is 1 for a direct UPDATE, 2 from inside ledger_apply).
CREATE FUNCTION balances_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' AND NEW.balance <> 0 THEN
        RAISE EXCEPTION 'a balance starts at zero; credit it through balance_ledger';
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.balance IS DISTINCT FROM OLD.balance AND pg_trigger_depth() < 2 THEN
        RAISE EXCEPTION 'balances change only through balance_ledger';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'balances are never deleted';
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END $$;
CREATE TRIGGER balances_guard BEFORE INSERT OR UPDATE OR DELETE ON balances
    FOR EACH ROW EXECUTE FUNCTION balances_guard();


-- ===================================================================================
-- The Redis fence: Redis writes follow the epoch they were decided under
-- ===================================================================================

-- Every transaction that changes something Redis mirrors (orders, codes, balances) takes
-- this lock shared and learns the epoch; a rebuild holds it exclusive while it reads
-- Postgres and writes Redis. So a change is either in what the rebuild reads or made
-- after it, and a Redis write made on behalf of a change is applied only if Redis is
-- still at the epoch the change saw (src/rebuild.rs).
CREATE FUNCTION redis_fence() RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(7162819512125188460); -- "cgrebuil"
    RETURN (SELECT epoch FROM redis_epoch);
END $$;

-- The rebuild's side of the same lock, exclusive.
CREATE FUNCTION redis_rebuild_lock() RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(7162819512125188460);
    RETURN (SELECT epoch FROM redis_epoch);
END $$;


-- ===================================================================================
-- Event payloads, shared by ledger_commit and the event triggers
-- ===================================================================================

-- Times as the API writes them: RFC 3339, UTC, to the second.
CREATE FUNCTION api_time(t timestamptz) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
$$;

-- An order as docs/api.md shows it, without its codes: codes are revealed only to a
-- signed request, never pushed to a URL.
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


-- ===================================================================================
-- ledger_commit: the group commit of the order path
-- ===================================================================================

-- The ledger writers (src/ledger/writer.rs) hand a whole batch of fulfilments to this
-- function: one round trip, one transaction for many orders. Arguments: arrays of
-- orders (index i = 1..n), each with the Redis epoch it was reserved at, then their
-- codes (the order index each belongs to, the code id, its position). Answers one row
-- per order index:
--   committed   recorded now, or before (an outbox entry read twice)
--   duplicate   another order holds this (reseller, merchant_order_no): not recorded
--   last_guard  a code is not deliverable (delivered, voided, another product, or
--               asked for twice in the batch): not recorded
--   stale       reserved in a Redis state that has since been rebuilt from Postgres:
--               not recorded (the rebuild put its codes and money back already)
-- Nothing is recorded for a duplicate, last_guard or stale order; the rest commit
-- together, each with its codes delivered, its ledger debit and, for a reseller with a
-- callback URL, its order.fulfilled event.
--
-- Its statements take whole arrays; a plan that does not depend on their contents is as
-- good as a fresh one, and planning every call would cost more than the work itself:
-- hence the generic plan. Each inserted order finds its index through a jsonb map, not
-- by a join back to the arguments, which that generic plan (sized for one row) made a
-- nested loop: n^2 text comparisons for a batch of n.
CREATE FUNCTION ledger_commit(
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


-- ===================================================================================
-- Event triggers: the other callbacks, queued by the change that causes them
-- ===================================================================================

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
    SELECT r.id, 'balance.low', jsonb_build_object('balance', NEW.balance, 'low_balance_threshold', r.low_balance_threshold,
                                                   'currency', (SELECT currency FROM platform))
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
    SELECT cp.reseller_id, 'product.restocked',
           jsonb_build_object('sku', p.sku, 'name', p.name, 'price', cp.price, 'currency', (SELECT currency FROM platform))
      FROM (SELECT product_id, min(id) AS first FROM new_codes WHERE status = 'available' GROUP BY product_id) n
      JOIN products p ON p.id = n.product_id AND p.status = 'on_sale'
     CROSS JOIN LATERAL callback_prices(n.product_id) cp
     WHERE NOT EXISTS (SELECT 1 FROM codes c
                        WHERE c.product_id = n.product_id AND c.status = 'available' AND c.id < n.first);
    RETURN NULL;
END $$;
CREATE TRIGGER codes_restocked AFTER INSERT ON codes
    REFERENCING NEW TABLE AS new_codes FOR EACH STATEMENT EXECUTE FUNCTION codes_restocked_event();


-- ===================================================================================
-- Report rollups: kept by every writer of orders, folded off the order path
-- ===================================================================================

-- Statement triggers on orders, so every writer keeps the rollups true: the ledger's
-- commits, last-guard removals (deletes) and refunds (updates) alike. What leaves the
-- fulfilled set is subtracted, what enters it is added, appended to sales_pending. Only
-- the transition tables of TG_OP exist; PL/pgSQL plans a statement when it first runs
-- it, so the other branch is harmless.
CREATE FUNCTION sales_daily_keep() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        INSERT INTO sales_pending (day, reseller_id, product_id, orders, codes, amount)
        SELECT (created_at AT TIME ZONE 'UTC')::date, reseller_id, product_id, -count(*), -sum(quantity), -sum(amount)
          FROM old_orders WHERE status = 'fulfilled' GROUP BY 1, 2, 3;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO sales_pending (day, reseller_id, product_id, orders, codes, amount)
        SELECT (created_at AT TIME ZONE 'UTC')::date, reseller_id, product_id, count(*), sum(quantity), sum(amount)
          FROM new_orders WHERE status = 'fulfilled' GROUP BY 1, 2, 3;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER sales_daily_insert AFTER INSERT ON orders
    REFERENCING NEW TABLE AS new_orders FOR EACH STATEMENT EXECUTE FUNCTION sales_daily_keep();
CREATE TRIGGER sales_daily_delete AFTER DELETE ON orders
    REFERENCING OLD TABLE AS old_orders FOR EACH STATEMENT EXECUTE FUNCTION sales_daily_keep();
CREATE TRIGGER sales_daily_update AFTER UPDATE ON orders
    REFERENCING OLD TABLE AS old_orders NEW TABLE AS new_orders FOR EACH STATEMENT EXECUTE FUNCTION sales_daily_keep();

-- Moves everything pending into the rollups in one transaction; returns the rows moved.
-- Run every few seconds in each gateway (src/rollups.rs) and before every report, so a
-- report still counts every committed order. Two folds at once do not count a row
-- twice: the second's DELETE waits for the first's and skips the rows it took. Rollup
-- rows are taken in key order, so folds never deadlock each other.
CREATE FUNCTION sales_fold() RETURNS bigint LANGUAGE sql AS $$
    WITH moved AS (
        DELETE FROM sales_pending RETURNING *
    ), r AS (
        INSERT INTO reseller_daily AS s (day, reseller_id, orders, codes, amount)
        SELECT day, reseller_id, sum(orders), sum(codes), sum(amount) FROM moved GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (day, reseller_id) DO UPDATE
           SET orders = s.orders + excluded.orders, codes = s.codes + excluded.codes, amount = s.amount + excluded.amount
    ), p AS (
        INSERT INTO product_daily AS s (day, product_id, orders, codes, amount)
        SELECT day, product_id, sum(orders), sum(codes), sum(amount) FROM moved GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (day, product_id) DO UPDATE
           SET orders = s.orders + excluded.orders, codes = s.codes + excluded.codes, amount = s.amount + excluded.amount
    )
    SELECT count(*) FROM moved;
$$;


-- ===================================================================================
-- Seed rows
-- ===================================================================================

-- No rebuild has happened yet.
INSERT INTO redis_epoch (epoch) VALUES (0);
-- A placeholder: every gateway overwrites it with its configured currency right after
-- migrating (src/store/pg.rs).
INSERT INTO platform (currency) VALUES ('CNY');
