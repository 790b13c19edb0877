-- cardgate schema: Postgres is the system of record. The constraints here are the last
-- guard behind every invariant in DESIGN.md, whatever the gateway or Redis believe.

CREATE TABLE admins (
    id            bigserial PRIMARY KEY,
    username      text        NOT NULL UNIQUE CHECK (username ~ '^[A-Za-z0-9_.@-]{1,64}$'),
    password_hash text        NOT NULL,
    role          text        NOT NULL CHECK (role IN ('admin', 'operator', 'auditor')),
    disabled      boolean     NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE resellers (
    id                    bigserial PRIMARY KEY,
    reseller_id           text        NOT NULL UNIQUE,
    name                  text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    tier                  text        NOT NULL,
    status                text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    -- CIDRs as text: validated by the gateway, matched in memory on the hot path.
    ip_allowlist          text[]      NOT NULL DEFAULT '{}',
    callback_url          text,
    low_balance_threshold bigint      NOT NULL DEFAULT 0 CHECK (low_balance_threshold >= 0),
    -- AES-256-GCM under the master key; needed in clear to sign callbacks.
    webhook_secret_enc    bytea       NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    key_id      text        PRIMARY KEY,
    reseller_id bigint      NOT NULL REFERENCES resellers (id),
    -- Encrypted, not hashed: HMAC verification needs the secret itself.
    secret_enc  bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_reseller ON api_keys (reseller_id);

CREATE TABLE products (
    id                  bigserial PRIMARY KEY,
    sku                 text        NOT NULL UNIQUE CHECK (sku ~ '^[^/?#[:space:]]{1,64}$'),
    name                text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    face_value          bigint      NOT NULL CHECK (face_value >= 0),
    base_price          bigint      NOT NULL CHECK (base_price >= 0),
    max_quantity        integer     NOT NULL CHECK (max_quantity BETWEEN 1 AND 10000),
    status              text        NOT NULL DEFAULT 'on_sale' CHECK (status IN ('on_sale', 'off_sale')),
    low_stock_threshold integer     CHECK (low_stock_threshold >= 0),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE product_tier_prices (
    product_id bigint NOT NULL REFERENCES products (id) ON DELETE CASCADE,
    tier       text   NOT NULL,
    price      bigint NOT NULL CHECK (price >= 0),
    PRIMARY KEY (product_id, tier)
);

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
CREATE INDEX codes_available ON codes (product_id, id) WHERE status = 'available';

CREATE TABLE orders (
    id                bigserial PRIMARY KEY,
    order_id          text        NOT NULL UNIQUE,
    reseller_id       bigint      NOT NULL REFERENCES resellers (id),
    merchant_order_no text        NOT NULL CHECK (merchant_order_no ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    product_id        bigint      NOT NULL REFERENCES products (id),
    sku               text        NOT NULL,
    quantity          integer     NOT NULL CHECK (quantity > 0),
    unit_price        bigint      NOT NULL CHECK (unit_price >= 0),
    amount            bigint      NOT NULL,
    currency          text        NOT NULL,
    status            text        NOT NULL DEFAULT 'fulfilled' CHECK (status IN ('fulfilled', 'refunded')),
    created_at        timestamptz NOT NULL,
    refunded_at       timestamptz,
    refund_reason     text,
    CONSTRAINT orders_amount CHECK (amount = unit_price * quantity),
    -- Invariant 6: one merchant_order_no is one order, forever.
    CONSTRAINT orders_idempotency UNIQUE (reseller_id, merchant_order_no)
);
CREATE INDEX orders_created ON orders (created_at, id);
CREATE INDEX orders_reseller_created ON orders (reseller_id, created_at, id);
CREATE INDEX orders_product_created ON orders (product_id, created_at, id);

CREATE TABLE order_codes (
    order_id bigint   NOT NULL REFERENCES orders (id),
    code_id  bigint   NOT NULL REFERENCES codes (id),
    position smallint NOT NULL,
    PRIMARY KEY (order_id, position),
    -- Invariant 1: whatever Redis says, a code is delivered at most once. A refund voids
    -- the code but keeps this row, so a refunded code can never be sold again either.
    CONSTRAINT delivered_code_unique UNIQUE (code_id)
);

-- Balances change only through ledger rows: the ledger trigger is the one writer of
-- balances.balance, and the ledger itself is append-only.
CREATE TABLE balances (
    reseller_id bigint      PRIMARY KEY REFERENCES resellers (id),
    balance     bigint      NOT NULL DEFAULT 0 CONSTRAINT balance_not_negative CHECK (balance >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE balance_ledger (
    id            bigserial PRIMARY KEY,
    reseller_id   bigint      NOT NULL REFERENCES resellers (id),
    amount        bigint      NOT NULL CHECK (amount <> 0),
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

-- AFTER, not BEFORE: a BEFORE trigger also fires for rows that ON CONFLICT DO NOTHING
-- then skips, which would move the balance for an insert that never happened.
CREATE FUNCTION ledger_apply() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    after bigint;
BEGIN
    UPDATE balances SET balance = balance + NEW.amount, updated_at = now()
     WHERE reseller_id = NEW.reseller_id
    RETURNING balance INTO after;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no balance row for reseller %', NEW.reseller_id;
    END IF;
    IF NEW.kind <> 'order' THEN
        UPDATE balance_ledger SET balance_after = after WHERE id = NEW.id;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER ledger_apply AFTER INSERT ON balance_ledger
    FOR EACH ROW EXECUTE FUNCTION ledger_apply();

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
CREATE FUNCTION ledger_no_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'balance_ledger is append-only';
END $$;
CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON balance_ledger
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_no_truncate();

-- A balance starts at zero and moves only when the ledger trigger moves it
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
