-- Money in callback events carries its currency, as every amount the API shows does
-- (API.md: an integer in minor units plus a currency string). The currency is
-- configuration; each gateway writes it here when it starts (src/store/pg.rs), so the
-- triggers that queue events can name it.
CREATE TABLE platform (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    currency  text    NOT NULL CHECK (currency ~ '^[A-Z]{3}$')
);
INSERT INTO platform (currency) VALUES ('CNY');

-- As in V5, with the currency.
CREATE OR REPLACE FUNCTION balance_low_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO events (reseller_id, type, data)
    SELECT r.id, 'balance.low', jsonb_build_object('balance', NEW.balance, 'low_balance_threshold', r.low_balance_threshold,
                                                   'currency', (SELECT currency FROM platform))
      FROM resellers r
     WHERE r.id = NEW.reseller_id AND r.callback_url IS NOT NULL
       AND NEW.balance < r.low_balance_threshold AND OLD.balance >= r.low_balance_threshold;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION codes_restocked_event() RETURNS trigger LANGUAGE plpgsql AS $$
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
