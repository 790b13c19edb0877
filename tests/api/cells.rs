//! Home cells (docs/design.md, "Scale-out"): resellers spread over cells, each product's
//! codes over per-cell pools that the stock mover keeps filled, against real Redis and
//! Postgres. docs/invariants.md, stock conservation across cells.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use cardgate::stock::mover::{self, Transfer};

use crate::helpers::*;
use crate::orders::buyer;

const SKU: &str = "CELLS-50";

async fn cell_shop(cells: u32, codes: usize) -> (TestApp, String, Vec<String>) {
    // A sell-out found is trusted for a minute: a slow machine does not count every cell
    // again half way through a test.
    let app = spawn_app_with(|env| {
        env.insert("CARDGATE_REDIS__CELLS".into(), cells.to_string());
        env.insert("CARDGATE_REDIS__SOLD_OUT_TRUST_MS".into(), "60000".into());
        env.insert(MANUAL_BACKGROUND.into(), "1".into());
    })
    .await;
    let t = app.root_token().await;
    app.create_product(&t, SKU).await;
    let imported: Vec<String> = (0..codes).map(|i| format!("CELL-{i:05}-{}", random_suffix())).collect();
    let resp = app.import_codes(&t, SKU, imported.join("\n")).await;
    assert_eq!(resp.status(), 200);
    (app, t, imported)
}

/// Each cell's pool length of the product.
async fn pools(app: &TestApp, product: i64) -> Vec<i64> {
    let state = app.state.as_ref().unwrap();
    let mut r = app.redis().await;
    let mut out = Vec::new();
    for cell in state.keys.all_cells() {
        let n: i64 = redis::cmd("LLEN")
            .arg(state.keys.stock(cell, product))
            .query_async(&mut r)
            .await
            .unwrap();
        out.push(n);
    }
    out
}

/// `available` of the SKU as a reseller reads it, in the catalogue and on its own.
async fn listed(app: &TestApp, k: &ResellerKey) -> (i64, i64) {
    let read = async |path: &str| -> serde_json::Value {
        let resp = app.signed(k, reqwest::Method::GET, path, None).await;
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    };
    let catalogue = read("/v1/products").await;
    let in_catalogue = catalogue["products"]
        .as_array()
        .and_then(|all| all.iter().find(|p| p["sku"] == SKU))
        .and_then(|p| p["available"].as_i64());
    let alone = read(&format!("/v1/products/{SKU}")).await["available"].as_i64();
    (in_catalogue.unwrap_or(-1), alone.unwrap_or(-1))
}

/// Buyers until every one of `cells` cells is the home of at least two.
pub(crate) async fn buyers_in_every_cell(app: &TestApp, t: &str, cells: u32) -> Vec<Arc<ResellerKey>> {
    let mut per_cell = vec![0; cells as usize];
    let mut keys = Vec::new();
    while per_cell.iter().any(|n| *n < 2) {
        let k = buyer(app, t, "diamond", 10_000_000).await;
        let cell = app.reseller_pk(&k.reseller_id).await.rem_euclid(i64::from(cells)) as usize;
        per_cell[cell] += 1;
        keys.push(Arc::new(k));
    }
    keys
}

/// One SKU imported into one cell sells out to resellers of every cell at once: every
/// order is filled while any cell holds stock (a dry cell brings codes over instead of
/// answering out_of_stock), every code is sold exactly once, and only then is the answer
/// out_of_stock.
#[tokio::test]
async fn a_sku_imported_into_one_cell_sells_out_from_every_cell_exactly_once() {
    let cells = 8;
    let (app, t, imported) = cell_shop(cells, 120).await;
    let app = Arc::new(app);
    let product = app.product_pk(SKU).await;
    let start = pools(&app, product).await;
    assert_eq!(
        start.iter().filter(|n| **n > 0).count(),
        1,
        "imported into one cell: {start:?}"
    );
    assert_eq!(start.iter().sum::<i64>(), 120);
    let keys = buyers_in_every_cell(&app, &t, cells).await;

    // As many codes ordered as there are, from every cell at once: none may be refused.
    let mut tasks = Vec::new();
    let mut ordered = 0;
    let mut i = 0;
    while ordered < 120 {
        let q = (1 + i % 3).min(120 - ordered) as i64;
        ordered += q as usize;
        let (app, k) = (app.clone(), keys[i % keys.len()].clone());
        tasks.push(tokio::spawn(async move {
            app.order(&k, order_body(SKU, q, &format!("wave-{i}"))).await
        }));
        i += 1;
    }
    let mut delivered = Vec::new();
    for task in tasks {
        let (s, body, _) = task.await.unwrap();
        assert_eq!(s, 201, "refused while stock remained: {body}");
        delivered.extend(codes_of(&body));
    }
    assert_eq!(delivered.len(), 120, "every code sold");
    let distinct: HashSet<_> = delivered.iter().collect();
    assert_eq!(distinct.len(), 120, "no code delivered twice");
    assert!(delivered.iter().all(|c| imported.contains(c)));
    assert_eq!(pools(&app, product).await.iter().sum::<i64>(), 0);

    // Nothing left anywhere: now, and only now, out_of_stock, from every cell.
    for (j, k) in keys.iter().enumerate() {
        let (s, body, _) = app.order(k, order_body(SKU, 1, &format!("after-{j}"))).await;
        assert_eq!(
            (s, body["error"]["code"].as_str()),
            (409, Some("out_of_stock")),
            "{body}"
        );
    }
    let report = app.assert_reconciled(&t).await;
    assert_eq!(report["products"][0]["delivered"], 120);
    assert_eq!(report["products"][0]["available"], 0);
}

/// After a sell-out, an order is refused in its one reservation call: the count of every
/// cell that found the sell-out is not run again for each order (in a flash sale the
/// refusals cost more than the sales), and a restock ends it at once, on any gateway.
#[tokio::test]
async fn a_sell_out_once_found_is_refused_without_counting_every_cell_until_a_restock() {
    let cells = 4;
    let (app, t, _) = cell_shop(cells, 6).await;
    let product = app.product_pk(SKU).await;
    let keys = buyers_in_every_cell(&app, &t, cells).await;
    for i in 0..6 {
        let (s, body, _) = app
            .order(&keys[i % keys.len()], order_body(SKU, 1, &format!("sale-{i}")))
            .await;
        assert_eq!(s, 201, "{body}");
    }
    // A buyer whose home pool the restock below does not go into.
    let state = app.state.as_ref().unwrap();
    let import_cell = mover::import_cell(&state.keys, product);
    let mut buyer = &keys[0];
    for k in &keys {
        if app.reseller_pk(&k.reseller_id).await.rem_euclid(i64::from(cells)) as u32 != import_cell {
            buyer = k;
            break;
        }
    }
    let refused = async |mon: &str| {
        let (s, body, _) = app.order(buyer, order_body(SKU, 1, mon)).await;
        assert_eq!(
            (s, body["error"]["code"].as_str()),
            (409, Some("out_of_stock")),
            "{mon}: {body}"
        );
    };
    refused("after-0").await;

    // Another cell's pool made unreadable: counting every cell again would now fail.
    let home = app.reseller_pk(&buyer.reseller_id).await.rem_euclid(i64::from(cells)) as u32;
    let other = state.keys.stock((home + 1) % cells, product);
    let mut r = app.redis().await;
    let _: () = redis::cmd("SET")
        .arg(&other)
        .arg("not a pool")
        .query_async(&mut r)
        .await
        .unwrap();
    refused("after-1").await;
    let _: () = redis::cmd("DEL").arg(&other).query_async(&mut r).await.unwrap();

    // The import counts as a restock in every cell before it answers.
    let resp = app.import_codes(&t, SKU, "RESTOCK-1\nRESTOCK-2").await;
    assert_eq!(resp.status(), 200);
    let (s, body, _) = app.order(buyer, order_body(SKU, 1, "restocked")).await;
    assert_eq!(s, 201, "a sell-out found before the import no longer holds: {body}");
    assert_eq!(codes_of(&body).len(), 1);
    app.assert_reconciled(&t).await;
}

/// Codes a writer gives back (a reservation Postgres refused) count as a restock in every
/// cell, so no gateway's sell-out of the product holds past them.
#[tokio::test]
async fn codes_given_back_count_as_a_restock_in_every_cell() {
    use cardgate::reserve::{release, Fulfilment};
    let cells = 4;
    let (app, t, _) = cell_shop(cells, 1).await;
    let state = app.state.as_ref().unwrap();
    let product = app.product_pk(SKU).await;
    let k = buyer(&app, &t, "gold", 100_000).await;
    let mut r = app.redis().await;
    let counters = async |r: &mut redis::aio::MultiplexedConnection| -> Vec<i64> {
        let mut pipe = redis::pipe();
        for cell in state.keys.all_cells() {
            pipe.cmd("GET").arg(state.keys.restocked(cell, product));
        }
        let got: Vec<Option<i64>> = pipe.query_async(r).await.unwrap();
        got.into_iter().map(Option::unwrap_or_default).collect()
    };
    let before = counters(&mut r).await;
    let f = Fulfilment {
        order_id: cardgate::ids::order_id(),
        reseller: app.reseller_pk(&k.reseller_id).await,
        merchant_order_no: "GIVEN-BACK".into(),
        product,
        sku: SKU.into(),
        quantity: 1,
        unit_price: 9800,
        amount: 9800,
        created_at: 0,
        created_ms: 0,
        key_id: k.key_id.clone(),
    };
    // The outbox entry a writer undoes, at the cell's epoch.
    let cell = state.keys.cell_of(f.reseller);
    let entry: String = redis::cmd("XADD")
        .arg(state.keys.outbox(cell))
        .arg("*")
        .arg("o")
        .arg("undone")
        .query_async(&mut r)
        .await
        .unwrap();
    let epoch: i64 = redis::cmd("GET")
        .arg(state.keys.epoch(cell))
        .query_async(&mut r)
        .await
        .unwrap();
    let element = cardgate::stock::element(i64::MAX, b"given back");
    assert!(release(&mut r, &state.keys, &entry, epoch, &f, &[element], false)
        .await
        .unwrap());
    let after = counters(&mut r).await;
    assert_eq!(
        after,
        before.iter().map(|n| n + 1).collect::<Vec<_>>(),
        "every cell counted the restock"
    );
}

/// A catalogue listing more than `redis.catalogue_live_max` products is counted by one
/// fetch shared for `redis.catalogue_counts_ms` (every cell's pools, as live counts are),
/// while one product's own route stays live.
#[tokio::test]
async fn a_large_catalogue_is_counted_by_one_shared_fetch_and_one_product_live() {
    let app = spawn_app_with(|env| {
        env.insert("CARDGATE_REDIS__CELLS".into(), "4".into());
        env.insert("CARDGATE_REDIS__CATALOGUE_LIVE_MAX".into(), "1".into());
        env.insert("CARDGATE_REDIS__CATALOGUE_COUNTS_MS".into(), "60000".into());
        env.insert(MANUAL_BACKGROUND.into(), "1".into());
    })
    .await;
    let t = app.root_token().await;
    for (sku, n) in [(SKU, 12), ("CELLS-OTHER", 5)] {
        app.create_product(&t, sku).await;
        let codes: Vec<String> = (0..n).map(|i| format!("{sku}-{i}-{}", random_suffix())).collect();
        assert_eq!(app.import_codes(&t, sku, codes.join("\n")).await.status(), 200);
    }
    let state = app.state.clone().unwrap();
    mover::step(&state).await.unwrap();
    let k = buyer(&app, &t, "diamond", 1_000_000).await;
    let gold = buyer(&app, &t, "gold", 1_000_000).await;
    // Each product's (available, unit_price) as `who` reads the catalogue.
    let catalogue = async |who: &ResellerKey| -> Vec<(i64, i64)> {
        let resp = app.signed(who, reqwest::Method::GET, "/v1/products", None).await;
        assert_eq!(resp.status(), 200);
        let body: serde_json::Value = resp.json().await.unwrap();
        let of = |sku: &str| {
            let p = body["products"]
                .as_array()
                .and_then(|all| all.iter().find(|p| p["sku"] == sku))
                .cloned()
                .unwrap_or_default();
            (
                p["available"].as_i64().unwrap_or(-1),
                p["unit_price"].as_i64().unwrap_or(-1),
            )
        };
        vec![of(SKU), of("CELLS-OTHER")]
    };
    assert_eq!(
        catalogue(&k).await,
        [(12, 9800), (5, 9800)],
        "every cell's pools counted"
    );
    let (s, body, _) = app.order(&k, order_body(SKU, 2, "counted")).await;
    assert_eq!(s, 201, "{body}");
    assert_eq!(
        catalogue(&k).await,
        [(12, 9800), (5, 9800)],
        "the shared count, until it is catalogue_counts_ms old"
    );
    // The answer written once is each tier's own, and a catalogue change is listed at once.
    assert_eq!(catalogue(&gold).await, [(12, 9650), (5, 9650)], "gold's prices");
    app.admin_ok(
        &t,
        reqwest::Method::PATCH,
        "/admin/v1/products/CELLS-OTHER",
        Some(serde_json::json!({"base_price": 9900})),
        200,
    )
    .await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            catalogue(&k).await == [(12, 9800), (5, 9900)]
        })
        .await,
        "a new price is listed with the same counts"
    );
    let resp = app
        .signed(&k, reqwest::Method::GET, &format!("/v1/products/{SKU}"), None)
        .await;
    let one: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(one["available"], 10, "one product's route counts live: {one}");
}

/// The mover's two steps are idempotent: a transfer cut short after step 1 (its codes
/// in a transfer record, in no pool) is completed by the next pass, step 1 retried pops
/// nothing more, step 2 retried pushes nothing twice; no code is lost or doubled, and
/// reconciliation counts the record's codes meanwhile.
#[tokio::test]
async fn a_transfer_cut_short_between_its_steps_loses_and_doubles_nothing() {
    let cells = 4;
    let (app, t, imported) = cell_shop(cells, 60).await;
    let state = app.state.clone().unwrap();
    let keys = &state.keys;
    let product = app.product_pk(SKU).await;
    let from = mover::import_cell(keys, product);
    let to = (from + 1) % cells;
    let mut r = app.redis().await;
    let epoch = cardgate::rebuild::redis_epoch(&mut r, &state).await.unwrap().unwrap();

    // Step 1, and its retry (the answer was lost): 20 codes out, not 40.
    let cut = Transfer::new(product, from, to, epoch);
    assert_eq!(mover::take_out(&mut r, keys, &cut, 20).await.unwrap(), Some(20));
    assert_eq!(mover::take_out(&mut r, keys, &cut, 20).await.unwrap(), Some(20));
    let p = pools(&app, product).await;
    assert_eq!(p.iter().sum::<i64>(), 40, "20 codes in the record, in no pool: {p:?}");
    // The process dies here. Reconciliation sees the record's codes as stock.
    let report = app.assert_reconciled(&t).await;
    assert_eq!(report["products"][0]["available"], 60);

    // The next pass completes it, and rebalances.
    mover::step(&state).await.unwrap();
    assert!(mover::open_transfers(&mut r, keys, product).await.unwrap().is_empty());
    let p = pools(&app, product).await;
    assert_eq!(p.iter().sum::<i64>(), 60, "{p:?}");
    assert!(p.iter().all(|n| *n > 0), "every pool stocked: {p:?}");
    // Step 2 and step 1 again, late: nothing pushed, nothing popped.
    assert_eq!(mover::complete(&mut r, keys, &cut).await.unwrap(), 0);
    assert_eq!(mover::take_out(&mut r, keys, &cut, 20).await.unwrap(), Some(0));
    assert_eq!(pools(&app, product).await.iter().sum::<i64>(), 60);

    // A transfer completed twice by two movers at once pushes its codes once.
    let twice = Transfer::new(product, to, from, epoch);
    assert!(mover::take_out(&mut r, keys, &twice, 5).await.unwrap().unwrap() > 0);
    let mut r2 = app.redis().await;
    let (a, b) = tokio::join!(
        mover::complete(&mut r, keys, &twice),
        mover::complete(&mut r2, keys, &twice)
    );
    assert!(a.unwrap() + b.unwrap() <= 5);
    assert_eq!(pools(&app, product).await.iter().sum::<i64>(), 60);
    app.assert_reconciled(&t).await;

    // Every code still sells exactly once.
    let k = buyer(&app, &t, "diamond", 10_000_000).await;
    let (s, body, _) = app.order(&k, order_body(SKU, 60, "all-of-it")).await;
    assert_eq!(s, 201, "{body}");
    let codes: HashSet<String> = codes_of(&body).into_iter().collect();
    assert_eq!(codes, imported.into_iter().collect::<HashSet<_>>());
    app.assert_reconciled(&t).await;
}

/// A rebuild with several cells puts each reseller's balance in its home cell and deals
/// the codes over every cell's pool; orders from every cell go on after it.
#[tokio::test]
async fn a_rebuild_with_cells_restores_balances_and_pools() {
    let cells = 4;
    let (app, t, _) = cell_shop(cells, 40).await;
    let state = app.state.clone().unwrap();
    let product = app.product_pk(SKU).await;
    let keys = buyers_in_every_cell(&app, &t, cells).await;
    for (i, k) in keys.iter().enumerate() {
        let (s, body, _) = app.order(k, order_body(SKU, 1, &format!("before-{i}"))).await;
        assert_eq!(s, 201, "{body}");
    }
    let sold = keys.len() as i64;
    let mut before = Vec::new();
    for k in &keys {
        before.push(app.balance_of(k).await);
    }

    // Redis loses everything of this gateway's.
    let mut r = app.redis().await;
    let lost: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", app.redis_prefix()))
        .query_async(&mut r)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL").arg(&lost).query_async(&mut r).await.unwrap();
    let report = cardgate::rebuild::rebuild(&state, true).await.unwrap().unwrap();
    assert_eq!(report.codes as i64, 40 - sold);

    for (k, want) in keys.iter().zip(&before) {
        assert_eq!(app.balance_of(k).await, *want, "{}", k.reseller_id);
    }
    let p = pools(&app, product).await;
    assert_eq!(p.iter().sum::<i64>(), 40 - sold);
    assert!(
        p.iter().max().unwrap() - p.iter().min().unwrap() <= 1,
        "dealt evenly: {p:?}"
    );
    app.assert_reconciled(&t).await;

    for (i, k) in keys.iter().enumerate() {
        let (s, body, _) = app.order(k, order_body(SKU, 1, &format!("after-{i}"))).await;
        assert_eq!(s, 201, "{body}");
    }
    app.assert_reconciled(&t).await;
}

/// The mover's pass spreads a product imported into one cell over every pool, then keeps
/// each pool in proportion to how fast its cell sells.
#[tokio::test]
async fn the_mover_keeps_pools_in_proportion_to_sales() {
    let cells = 4;
    let (app, t, _) = cell_shop(cells, 400).await;
    let state = app.state.clone().unwrap();
    let product = app.product_pk(SKU).await;

    mover::step(&state).await.unwrap();
    let p = pools(&app, product).await;
    assert_eq!(p.iter().sum::<i64>(), 400);
    assert!(
        p.iter().all(|n| (90..=110).contains(n)),
        "spread evenly while nothing sells: {p:?}"
    );

    // One cell sells; the others do not.
    let k = buyer(&app, &t, "diamond", 10_000_000).await;
    let busy = state.keys.cell_of(app.reseller_pk(&k.reseller_id).await) as usize;
    for i in 0..10 {
        let (s, body, _) = app.order(&k, order_body(SKU, 3, &format!("busy-{i}"))).await;
        assert_eq!(s, 201, "{body}");
    }
    mover::step(&state).await.unwrap();
    let p = pools(&app, product).await;
    assert_eq!(p.iter().sum::<i64>(), 370);
    assert_eq!(listed(&app, &k).await, (370, 370), "every pool counted: {p:?}");
    // A catalogue of two products, counted live: the same figures, for each product.
    app.create_product(&t, "CELLS-OTHER").await;
    let other: Vec<String> = (0..7).map(|i| format!("OTHER-{i}-{}", random_suffix())).collect();
    assert_eq!(
        app.import_codes(&t, "CELLS-OTHER", other.join("\n")).await.status(),
        200
    );
    mover::step(&state).await.unwrap();
    assert_eq!(listed(&app, &k).await, (370, 370), "every pool counted: {p:?}");
    assert_eq!(
        catalogue_available(&app, &k, &[SKU, "CELLS-OTHER"]).await,
        [Some(370), Some(7)]
    );
    for (cell, n) in p.iter().enumerate() {
        if cell != busy {
            assert!(p[busy] > 3 * n, "the selling cell holds the most: {p:?}");
        }
    }
    app.assert_reconciled(&t).await;
}

/// A cell whose outbox cannot be read (on a cluster, its primary away or its data lost)
/// holds back no other cell's orders: the writers read every cell's outbox on its own,
/// commit what the others hold, and start the lost one again when it is back.
#[tokio::test]
async fn an_outbox_that_cannot_be_read_holds_back_no_other_cells_orders() {
    let (app, t, _) = cell_shop(16, 20).await;
    let k = buyer(&app, &t, "diamond", 1_000_000).await;
    let other = buyer(&app, &t, "diamond", 1_000_000).await;
    let keys = app.keys();
    let (home, broken) = (
        keys.cell_of(app.reseller_pk(&k.reseller_id).await),
        keys.cell_of(app.reseller_pk(&other.reseller_id).await),
    );
    assert_ne!(home, broken);
    let outbox = keys.outbox(broken);
    let mut r = app.redis().await;
    // A key of another type answers every stream command with an error, as a cell whose
    // node is away does.
    let _: () = redis::pipe()
        .cmd("DEL")
        .arg(&outbox)
        .ignore()
        .cmd("SET")
        .arg(&outbox)
        .arg("not a stream")
        .ignore()
        .query_async(&mut r)
        .await
        .unwrap();
    // Long enough for every writer to meet the broken cell in its reads.
    tokio::time::sleep(Duration::from_millis(600)).await;
    for i in 0..3 {
        let (s, body, _) = app.order(&k, order_body(SKU, 1, &format!("healthy-{i}"))).await;
        assert_eq!(s, 201, "an order of a healthy cell: {body}");
    }

    // The cell's outbox back, empty, as after its node lost its data: its orders commit.
    let _: () = redis::cmd("DEL").arg(&outbox).query_async(&mut r).await.unwrap();
    let (s, body, _) = app.order(&other, order_body(SKU, 1, "back-1")).await;
    assert_eq!(s, 201, "an order of the cell that came back: {body}");
    app.assert_reconciled(&t).await;
}
