-- API keys with scopes, an expiry, a label, rotation and their last use (docs/api.md §7).
--
-- `scopes`: what the key may call; keys made before this migration keep every scope, as
-- the API's default does. `expires_at`: refused from then on (judged by each gateway's
-- clock per request). `replaces`: the key this one was rotated from; a key is replaced
-- at most once. `last_used_at`: written every few seconds from each gateway's memory,
-- only ever forward.
ALTER TABLE api_keys
    ADD COLUMN scopes       text[]      NOT NULL
               DEFAULT ARRAY['catalogue:read', 'orders:read', 'orders:write', 'balance:read']
               CONSTRAINT api_keys_scopes_known
               CHECK (cardinality(scopes) >= 1
                      AND scopes <@ ARRAY['catalogue:read', 'orders:read', 'orders:write', 'balance:read']),
    ADD COLUMN label        text        CHECK (length(label) BETWEEN 1 AND 200),
    ADD COLUMN expires_at   timestamptz,
    ADD COLUMN replaces     text        REFERENCES api_keys (key_id),
    ADD COLUMN last_used_at timestamptz;

CREATE UNIQUE INDEX api_keys_replaced_once ON api_keys (replaces) WHERE replaces IS NOT NULL;
