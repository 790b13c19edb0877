-- Hot-balance moves decided in Postgres and not yet known to be applied in Redis.
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
