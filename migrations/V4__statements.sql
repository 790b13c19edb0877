-- Statements (docs/api.md §6): a reseller's movements newest first, paged by
-- (created_at, id). Orders are read backwards on orders_reseller_created; this is the
-- same for balance_ledger, so a page reads its rows and no more. Its id does not follow
-- created_at (a movement's time is its transaction's start, its id is taken at insert),
-- so balance_ledger_reseller (reseller_id, id) cannot give that order.
CREATE INDEX balance_ledger_reseller_created ON balance_ledger (reseller_id, created_at, id);
