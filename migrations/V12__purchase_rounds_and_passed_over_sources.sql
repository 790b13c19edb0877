-- A purchase's rounds are fenced, and a source passed over for its open circuit is
-- remembered (docs/api.md §8, "The skip rule").
--
-- round: bumped by every claim of the purchase (its first round, in the answer window, is
-- 1). Every step a round writes, and the sends it writes before, is conditional on the
-- round still being its own, so a round that outlived its lease (supplier calls one after
-- another can take longer) stops instead of moving the purchase under the one that took
-- it over: two rounds never send the number to two sources. (Codes bought are delivered
-- whichever round holds it.)
--
-- passed_over: the first source in priority order that a round skipped because its
-- circuit was open, its number never sent there. Skipping it cannot buy twice, but it has
-- not refused: when every source after it refuses, the purchase goes back to it instead
-- of being refused.
ALTER TABLE purchases
    ADD COLUMN round bigint NOT NULL DEFAULT 1,
    ADD COLUMN passed_over integer;
