//! Reconciliation: proves the invariants of docs/invariants.md from both stores at once.
//!
//! For every SKU, imported = available (Redis stock: every cell's pool and every open
//! transfer between cells) + in flight (every cell's outbox) + delivered + voided, and
//! those codes are exactly the codes Postgres holds as sellable, each held once. Every balance equals the sum of its ledger, and every hot balance
//! equals it less the orders in flight (orders are their own debits: `ledger_entries`).
//! Every order holds exactly its codes, of its product, every refund its ledger row, and
//! every rebate of a closed month its ledger row.
//!
//! The stores are read one after the other, so an order moving between them can make
//! one pass disagree; a difference is reported only if it is still there after
//! `PASSES` passes.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::store::redis::Redis;
use serde::Serialize;

use crate::app::App;
use crate::reserve;

const PASSES: usize = 3;
const PAUSE: Duration = Duration::from_millis(500);
const CHUNK: isize = 10_000;

#[derive(Debug, Serialize)]
pub struct Report {
    pub ok: bool,
    pub products: Vec<ProductCheck>,
    pub resellers_checked: usize,
    pub orders_in_flight: usize,
    /// Every difference found, in words; empty when `ok`.
    pub problems: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ProductCheck {
    pub sku: String,
    pub imported: i64,
    pub available: i64,
    pub in_flight: i64,
    pub delivered: i64,
    pub voided: i64,
    pub ok: bool,
}

pub async fn run(app: &App) -> anyhow::Result<Report> {
    let mut report = pass(app).await?;
    for _ in 1..PASSES {
        if report.ok {
            break;
        }
        tokio::time::sleep(PAUSE).await;
        report = pass(app).await?;
    }
    Ok(report)
}

#[derive(Default)]
struct InFlight {
    codes: HashMap<i64, Vec<i64>>,
    amounts: HashMap<i64, i64>,
    orders: usize,
}

async fn in_flight(app: &App, redis: &mut Redis, problems: &mut Vec<String>) -> anyhow::Result<InFlight> {
    let mut out = InFlight::default();
    for cell in app.keys.all_cells() {
        outbox_in_flight(app, redis, cell, &mut out, problems).await?;
    }
    Ok(out)
}

async fn outbox_in_flight(
    app: &App,
    redis: &mut Redis,
    cell: u32,
    out: &mut InFlight,
    problems: &mut Vec<String>,
) -> anyhow::Result<()> {
    let mut start = "-".to_string();
    loop {
        let page: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(app.keys.outbox(cell))
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(CHUNK)
            .query_async(redis)
            .await?;
        let Some(last) = page.ids.last() else { break };
        start = format!("({}", last.id);
        for s in &page.ids {
            let Some(e) = reserve::Entry::decode(s) else {
                problems.push(format!("outbox entry {} is malformed", s.id));
                continue;
            };
            out.orders += 1;
            *out.amounts.entry(e.f.reseller).or_default() += e.f.amount;
            let ids = out.codes.entry(e.f.product).or_default();
            ids.extend(crate::stock::code_ids(&e.elements));
        }
    }
    Ok(())
}

/// The code ids of a product held in Redis outside the outbox: every cell's pool and
/// every transfer's record whose codes have not arrived yet.
async fn stock_ids(app: &App, redis: &mut Redis, product: i64) -> anyhow::Result<Vec<i64>> {
    let keys = &app.keys;
    let mut ids = Vec::new();
    for cell in keys.all_cells() {
        list_ids(redis, &keys.stock(cell, product), &mut ids).await?;
    }
    for t in crate::stock::mover::in_transit(redis, keys, product).await? {
        list_ids(redis, &keys.transfer(t.from, &t.id), &mut ids).await?;
    }
    Ok(ids)
}

async fn list_ids(redis: &mut Redis, key: &str, ids: &mut Vec<i64>) -> anyhow::Result<()> {
    let mut from = 0isize;
    loop {
        let chunk: Vec<Vec<u8>> = redis::cmd("LRANGE")
            .arg(key)
            .arg(from)
            .arg(from + CHUNK - 1)
            .query_async(redis)
            .await?;
        // A malformed element counts as id 0, which no code has: reported below.
        ids.extend(
            chunk
                .iter()
                .map(|e| crate::stock::parse_element(e).map_or(0, |(id, _)| id)),
        );
        if (chunk.len() as isize) < CHUNK {
            return Ok(());
        }
        from += CHUNK;
    }
}

async fn pass(app: &App) -> anyhow::Result<Report> {
    let mut problems = Vec::new();
    let mut redis = app.redis();
    let flight = in_flight(app, &mut redis, &mut problems).await?;
    let client = app.pg.get().await?;

    let mut products = Vec::new();
    for p in client.query("SELECT id, sku FROM products ORDER BY sku", &[]).await? {
        let (id, sku): (i64, String) = (p.get(0), p.get(1));
        let stock = stock_ids(app, &mut redis, id).await?;
        let flying = flight.codes.get(&id).cloned().unwrap_or_default();
        let counts = client
            .query_one(
                "SELECT count(*),
                        count(*) FILTER (WHERE status = 'delivered'),
                        count(*) FILTER (WHERE status = 'voided'),
                        (SELECT count(*) FROM order_codes oc JOIN orders o ON o.id = oc.order_id
                          WHERE o.product_id = $1 AND o.status = 'fulfilled'),
                        (SELECT count(*) FROM order_codes oc JOIN orders o ON o.id = oc.order_id
                           JOIN codes c ON c.id = oc.code_id
                          WHERE o.product_id = $1
                            AND ((o.status = 'fulfilled' AND c.status <> 'delivered')
                              OR (o.status = 'refunded' AND c.status <> 'voided')))
                   FROM codes WHERE product_id = $1",
                &[&id],
            )
            .await?;
        let (imported, delivered, voided, sold, mismatched): (i64, i64, i64, i64, i64) = (
            counts.get(0),
            counts.get(1),
            counts.get(2),
            counts.get(3),
            counts.get(4),
        );
        let sellable: HashSet<i64> = client
            .query(
                "SELECT id FROM codes WHERE product_id = $1 AND status = 'available'",
                &[&id],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let before = problems.len();
        let mut held = HashSet::new();
        let doubled = stock.iter().chain(&flying).filter(|c| !held.insert(**c)).count();
        if doubled > 0 {
            problems.push(format!(
                "{sku}: {doubled} codes are held twice in Redis (stock or outbox)"
            ));
        }
        let unsellable = held.difference(&sellable).count();
        if unsellable > 0 {
            problems.push(format!(
                "{sku}: {unsellable} codes in Redis are not sellable in Postgres"
            ));
        }
        let missing = sellable.difference(&held).count();
        if missing > 0 {
            problems.push(format!("{sku}: {missing} sellable codes are missing from Redis"));
        }
        if delivered != sold {
            problems.push(format!(
                "{sku}: {delivered} codes marked delivered, {sold} delivered by fulfilled orders"
            ));
        }
        if mismatched > 0 {
            problems.push(format!(
                "{sku}: {mismatched} ordered codes have a status that contradicts their order"
            ));
        }
        let (available, in_flight) = (stock.len() as i64, flying.len() as i64);
        if imported != available + in_flight + delivered + voided {
            problems.push(format!(
                "{sku}: imported {imported} != available {available} + in flight {in_flight} + delivered {delivered} + voided {voided}"
            ));
        }
        products.push(ProductCheck {
            sku,
            imported,
            available,
            in_flight,
            delivered,
            voided,
            ok: problems.len() == before,
        });
    }

    let balances = client
        .query(
            "SELECT r.id, r.reseller_id, b.balance,
                    coalesce((SELECT sum(amount) FROM ledger_entries l WHERE l.reseller_id = r.id), 0)::int8
               FROM resellers r JOIN balances b ON b.reseller_id = r.id ORDER BY r.id",
            &[],
        )
        .await?;
    let keys: Vec<String> = balances.iter().map(|r| app.keys.balance(r.get(0))).collect();
    let mut hot: Vec<Option<i64>> = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(CHUNK as usize) {
        let got: Vec<Option<i64>> = redis::cmd("MGET").arg(chunk).query_async(&mut redis).await?;
        hot.extend(got);
    }
    let unapplied = crate::hot_balance::unapplied(app, &client, &mut redis).await?;
    // Open purchases without an order yet: held in the hot balance, not yet in Postgres.
    let upstream_held: std::collections::HashMap<i64, i64> = client
        .query(
            "SELECT p.reseller_id, sum(p.amount)::int8 FROM purchases p
              WHERE p.state = 'open' AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.order_id = p.order_id)
              GROUP BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (r, hot) in balances.iter().zip(hot) {
        let (pk, rid, balance, ledger): (i64, &str, i64, i64) = (r.get(0), r.get(1), r.get(2), r.get(3));
        if balance != ledger {
            problems.push(format!("{rid}: balance {balance} != ledger sum {ledger}"));
        }
        let holding = flight.amounts.get(&pk).copied().unwrap_or(0) + upstream_held.get(&pk).copied().unwrap_or(0);
        let pending = unapplied.get(&pk).copied().unwrap_or(0);
        match hot {
            None => problems.push(format!("{rid}: no hot balance in Redis")),
            Some(h) if h != balance - holding - pending => problems.push(format!(
                "{rid}: hot balance {h} != balance {balance} - in flight {holding} - not yet applied {pending}"
            )),
            Some(_) => {}
        }
    }

    // Orders are their own debits (ledger_entries); what is left to check is that each
    // holds its codes, each refund its order and each rebate its closed month's line.
    let orders = client
        .query_one(
            "SELECT (SELECT count(*) FROM orders o
                      WHERE (SELECT count(*) FROM order_codes oc WHERE oc.order_id = o.id)
                            <> CASE WHEN o.status IN ('processing', 'failed') THEN 0 ELSE o.quantity END),
                    -- Joined, not a correlated NOT EXISTS: the planner turned that into a join
                    -- of every order with every code of its product (seconds at 20,000 codes).
                    (SELECT count(*) FROM order_codes oc
                       LEFT JOIN orders o ON o.id = oc.order_id
                       LEFT JOIN codes c ON c.id = oc.code_id
                      WHERE o.id IS NULL OR c.id IS NULL OR c.product_id <> o.product_id
                         OR c.status <> CASE o.status WHEN 'fulfilled' THEN 'delivered' ELSE 'voided' END),
                    (SELECT count(*) FROM orders o WHERE o.status = 'refunded' AND o.amount <> 0
                        AND NOT EXISTS (SELECT 1 FROM balance_ledger l WHERE l.reseller_id = o.reseller_id
                                           AND l.kind = 'refund' AND l.reference = o.order_id AND l.amount = o.amount)),
                    (SELECT count(*) FROM balance_ledger l WHERE l.kind = 'refund'
                        AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.order_id = l.reference
                                           AND o.reseller_id = l.reseller_id AND o.status = 'refunded')),
                    (SELECT count(*) FROM rebate_lines rl WHERE rl.rebate > 0
                        AND NOT EXISTS (SELECT 1 FROM balance_ledger l WHERE l.reseller_id = rl.reseller_id
                                           AND l.kind = 'rebate' AND l.reference = 'rebate:' || rl.month
                                           AND l.amount = rl.rebate)),
                    (SELECT count(*) FROM balance_ledger l WHERE l.kind = 'rebate'
                        AND NOT EXISTS (SELECT 1 FROM rebate_lines rl WHERE rl.reseller_id = l.reseller_id
                                           AND 'rebate:' || rl.month = l.reference AND rl.rebate = l.amount)),
                    (SELECT count(*) FROM purchases p WHERE p.state IN ('fulfilled', 'failed')
                        AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.order_id = p.order_id
                                           AND o.reseller_id = p.reseller_id
                                           AND o.status IN (CASE p.state WHEN 'fulfilled' THEN 'fulfilled' ELSE 'failed' END, 'refunded'))),
                    (SELECT count(*) FROM orders o WHERE o.status IN ('processing', 'failed')
                        AND NOT EXISTS (SELECT 1 FROM purchases p WHERE p.order_id = o.order_id
                                           AND p.state = CASE o.status WHEN 'processing' THEN 'open' ELSE 'failed' END)),
                    (SELECT count(*) FROM purchases p WHERE p.state = 'refused'
                        AND EXISTS (SELECT 1 FROM orders o WHERE o.order_id = p.order_id)),
                    (SELECT count(*) FROM orders o WHERE o.status = 'failed' AND o.amount <> 0
                        AND (SELECT count(*) FROM balance_ledger l WHERE l.reseller_id = o.reseller_id
                                AND l.kind = 'upstream_failed' AND l.reference = o.order_id AND l.amount = o.amount) <> 1),
                    (SELECT count(*) FROM balance_ledger l WHERE l.kind = 'upstream_failed'
                        AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.order_id = l.reference
                                           AND o.reseller_id = l.reseller_id AND o.status = 'failed'))",
            &[],
        )
        .await?;
    for (i, what) in [
        "orders do not hold exactly their quantity of codes",
        "delivered codes are not codes of their order's product in its order's state",
        "refunded orders have no matching refund in the ledger",
        "ledger refunds name an order that does not exist or was not refunded",
        "closed months' rebates have no matching rebate in the ledger",
        "ledger rebates match no closed month's rebate",
        "ended upstream purchases have no order in their state",
        "processing or failed orders have no open or failed purchase",
        "refused upstream purchases have an order",
        "failed orders are not given back exactly once in the ledger",
        "ledger upstream_failed rows name no failed order",
    ]
    .into_iter()
    .enumerate()
    {
        let n: i64 = orders.get(i);
        if n > 0 {
            problems.push(format!("{n} {what}"));
        }
    }

    Ok(Report {
        ok: problems.is_empty(),
        products,
        resellers_checked: balances.len(),
        orders_in_flight: flight.orders,
        problems,
    })
}
