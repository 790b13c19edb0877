-- Upstream sourcing (docs/api.md §8, docs/invariants.md invariant 10).
--
-- A product's sources are suppliers' SKUs, asked in priority order when local stock
-- cannot fill an order (or always, for an `upstream_only` product). Each order bought
-- upstream has one purchase, written before the first call to a supplier: it carries the
-- order's facts (the order row itself is written only once the purchase has an outcome
-- or the answer window has passed), the upstream idempotency key, and a lease, so a
-- purchase left by a gateway that died is resumed by any gateway.

CREATE TABLE suppliers (
    id          bigserial   PRIMARY KEY,
    supplier_id text        NOT NULL UNIQUE,
    name        text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    protocol    text        NOT NULL CHECK (protocol IN ('cardgate')),
    base_url    text        NOT NULL CHECK (length(base_url) BETWEEN 1 AND 2000),
    key_id      text        NOT NULL CHECK (length(key_id) BETWEEN 1 AND 128),
    -- AES-256-GCM under the master key, like an API secret: needed in clear to sign.
    secret_enc  bytea       NOT NULL,
    timeout_ms  integer     NOT NULL CHECK (timeout_ms BETWEEN 1 AND 120000),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE product_sources (
    product_id    bigint  NOT NULL REFERENCES products (id),
    supplier_id   bigint  NOT NULL REFERENCES suppliers (id),
    upstream_sku  text    NOT NULL CHECK (upstream_sku ~ '^[^/?#[:space:]]{1,64}$'),
    max_unit_cost bigint  NOT NULL CHECK (max_unit_cost >= 0)
                  CONSTRAINT product_sources_max_unit_cost_bounded CHECK (max_unit_cost <= 1000000000000000),
    priority      integer NOT NULL,
    PRIMARY KEY (product_id, supplier_id)
);

ALTER TABLE products
    ADD COLUMN source_mode text NOT NULL DEFAULT 'local_first' CHECK (source_mode IN ('local_first', 'upstream_only'));

CREATE TABLE purchases (
    id                bigserial   PRIMARY KEY,
    -- The order it fills: one purchase per order, and its number upstream derives from it.
    order_id          text        NOT NULL UNIQUE,
    upstream_no       text        NOT NULL UNIQUE,
    reseller_id       bigint      NOT NULL REFERENCES resellers (id),
    merchant_order_no text        NOT NULL,
    product_id        bigint      NOT NULL REFERENCES products (id),
    sku               text        NOT NULL,
    quantity          integer     NOT NULL CHECK (quantity > 0),
    unit_price        bigint      NOT NULL,
    amount            bigint      NOT NULL,
    key_id            text,
    order_created_at  timestamptz NOT NULL,
    -- open: being bought; fulfilled: codes bought and delivered; failed: every source
    -- refused after the order was answered 202 (the money went back); refused: every
    -- source refused within the answer window (nothing was charged, no order exists).
    state             text        NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'fulfilled', 'failed', 'refused')),
    -- Which source is being asked (its position in priority order): an unknown outcome
    -- asks the same one again, a definite refusal moves to the next.
    source_index      integer     NOT NULL DEFAULT 0,
    supplier_id       bigint      REFERENCES suppliers (id),
    attempts          integer     NOT NULL DEFAULT 0,
    cost              bigint,
    upstream_order_id text,
    outcome           text,
    -- Whoever works on an open purchase holds it until then.
    lease_until       timestamptz NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz
);
-- One purchase in progress per merchant_order_no: a replay cannot start a second.
CREATE UNIQUE INDEX purchases_open_number ON purchases (reseller_id, merchant_order_no) WHERE state = 'open';
CREATE INDEX purchases_due ON purchases (lease_until) WHERE state = 'open';

-- Orders bought upstream are `processing` until the purchase ends, then `fulfilled` or
-- `failed` (the money back as an `upstream_failed` ledger row).
ALTER TABLE orders DROP CONSTRAINT orders_status_check,
    ADD CONSTRAINT orders_status_check CHECK (status IN ('fulfilled', 'refunded', 'processing', 'failed'));
ALTER TABLE balance_ledger DROP CONSTRAINT balance_ledger_kind_check,
    ADD CONSTRAINT balance_ledger_kind_check CHECK (kind IN ('adjustment', 'refund', 'rebate', 'upstream_failed'));
ALTER TABLE events DROP CONSTRAINT events_type_check,
    ADD CONSTRAINT events_type_check CHECK (type IN ('order.fulfilled', 'order.refunded', 'product.restocked',
                                                     'product.price_changed', 'balance.low',
                                                     'reseller.tier_changed', 'balance.rebate_credited',
                                                     'account.held', 'account.released', 'order.failed'));

-- Orders stay append-only; besides the refund, a processing order may end once.
CREATE OR REPLACE FUNCTION orders_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE'
       AND ((OLD.status = 'fulfilled' AND NEW.status = 'refunded')
            OR (OLD.status = 'processing' AND NEW.status IN ('fulfilled', 'failed')))
       AND (NEW.id, NEW.order_id, NEW.reseller_id, NEW.merchant_order_no, NEW.product_id, NEW.sku, NEW.quantity,
            NEW.unit_price, NEW.amount, NEW.currency, NEW.created_at)
           IS NOT DISTINCT FROM
           (OLD.id, OLD.order_id, OLD.reseller_id, OLD.merchant_order_no, OLD.product_id, OLD.sku, OLD.quantity,
            OLD.unit_price, OLD.amount, OLD.currency, OLD.created_at) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'orders are ledger entries: append-only but for their refund or the end of their purchase';
END $$;

-- The rollups count what is sold: a processing order counts (orders_charge added it when
-- it was inserted) until it fails.
CREATE OR REPLACE FUNCTION sales_daily_keep() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sales_pending (day, reseller_id, product_id, orders, codes, amount)
    SELECT (created_at AT TIME ZONE 'UTC')::date, reseller_id, product_id, -count(*), -sum(quantity), -sum(amount)
      FROM old_orders WHERE status IN ('fulfilled', 'processing') GROUP BY 1, 2, 3;
    INSERT INTO sales_pending (day, reseller_id, product_id, orders, codes, amount)
    SELECT (created_at AT TIME ZONE 'UTC')::date, reseller_id, product_id, count(*), sum(quantity), sum(amount)
      FROM new_orders WHERE status IN ('fulfilled', 'processing') GROUP BY 1, 2, 3;
    RETURN NULL;
END $$;
