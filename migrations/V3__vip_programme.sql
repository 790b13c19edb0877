-- The VIP programme (docs/api.md §6): tiers earned by spend, monthly rebates, credit
-- lines. Money still moves only through the ledger: a rebate is a balance_ledger row
-- (kind 'rebate', reference 'rebate:<month>', so a month credits a reseller once).

-- Growth. `tier` is the tier in force; `base_tier` the one an operator gave, which an
-- automatic downgrade never goes below; `tier_locked` stops automatic changes;
-- `below_since` is when spend last fell below the current tier's upgrade_spend (the
-- downgrade grace runs from it), NULL while it is not below.
-- Credit. Orders may take the balance down to -credit_limit (balances_guard below).
ALTER TABLE resellers
    ADD COLUMN base_tier    text,
    ADD COLUMN tier_locked  boolean     NOT NULL DEFAULT false,
    ADD COLUMN below_since  timestamptz,
    ADD COLUMN credit_limit bigint      NOT NULL DEFAULT 0 CHECK (credit_limit >= 0)
               CONSTRAINT resellers_credit_limit_bounded CHECK (credit_limit <= 1000000000000000);
UPDATE resellers SET base_tier = tier;
ALTER TABLE resellers ALTER COLUMN base_tier SET NOT NULL;

-- The floor is -credit_limit, and only debits are held to it: lowering a limit below
-- what is owed is allowed (orders are then refused until the balance covers them), and
-- a credit is always taken. The check names its constraint like a CHECK would, so
-- callers tell it from other refusals.
ALTER TABLE balances DROP CONSTRAINT balance_not_negative;
CREATE OR REPLACE FUNCTION balances_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' AND NEW.balance <> 0 THEN
        RAISE EXCEPTION 'a balance starts at zero; credit it through balance_ledger';
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.balance IS DISTINCT FROM OLD.balance AND pg_trigger_depth() < 2 THEN
        RAISE EXCEPTION 'balances change only through balance_ledger';
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.balance < OLD.balance
       AND NEW.balance < -(SELECT credit_limit FROM resellers WHERE id = NEW.reseller_id) THEN
        RAISE EXCEPTION 'a debit would take the balance below its credit limit'
              USING ERRCODE = 'check_violation', CONSTRAINT = 'balance_within_credit';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'balances are never deleted';
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END $$;

-- balance.low is judged on what can be spent: the balance plus the credit line.
CREATE OR REPLACE FUNCTION balance_low_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO events (reseller_id, type, data)
    SELECT r.id, 'balance.low', jsonb_build_object('balance', NEW.balance, 'credit_limit', r.credit_limit,
                                                   'available', NEW.balance + r.credit_limit,
                                                   'low_balance_threshold', r.low_balance_threshold,
                                                   'currency', (SELECT currency FROM platform))
      FROM resellers r
     WHERE r.id = NEW.reseller_id AND r.callback_url IS NOT NULL
       AND NEW.balance + r.credit_limit < r.low_balance_threshold
       AND OLD.balance + r.credit_limit >= r.low_balance_threshold;
    RETURN NULL;
END $$;

ALTER TABLE balance_ledger DROP CONSTRAINT balance_ledger_kind_check,
    ADD CONSTRAINT balance_ledger_kind_check CHECK (kind IN ('adjustment', 'refund', 'rebate'));
ALTER TABLE events DROP CONSTRAINT events_type_check,
    ADD CONSTRAINT events_type_check CHECK (type IN ('order.fulfilled', 'order.refunded', 'product.restocked',
                                                     'product.price_changed', 'balance.low',
                                                     'reseller.tier_changed', 'balance.rebate_credited'));

-- Rebates. A closed month: its lines, as credited, are the record; a refund after the
-- close changes neither. Closing inserts the month first, so of two closes at once
-- (two gateways) one waits on the other's row and then finds the month closed.
CREATE TABLE rebate_months (
    month     text        PRIMARY KEY CHECK (month ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'),
    closed_at timestamptz NOT NULL DEFAULT now(),
    closed_by text        NOT NULL,
    total     bigint      NOT NULL CHECK (total BETWEEN 0 AND 1000000000000000)
);
CREATE TABLE rebate_lines (
    month       text    NOT NULL REFERENCES rebate_months (month),
    reseller_id bigint  NOT NULL REFERENCES resellers (id),
    spend       bigint  NOT NULL,
    rate_bp     integer NOT NULL CHECK (rate_bp BETWEEN 0 AND 10000),
    rebate      bigint  NOT NULL CHECK (rebate BETWEEN 0 AND 1000000000000000),
    PRIMARY KEY (month, reseller_id)
);
