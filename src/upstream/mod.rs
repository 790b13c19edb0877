//! Upstream sourcing (docs/api.md §8, docs/invariants.md invariant 10): orders local stock
//! cannot fill are bought whole from suppliers, exactly once.
//!
//! # A purchase
//!
//! 1. The reservation script holds the money in the hot balance and records the number
//!    as pending, taking no codes (`reserve.lua`, `{'upstream'}`).
//! 2. [`begin`] writes the purchase to Postgres, before any supplier is asked. Its
//!    number upstream ([`upstream_no`]) derives from the order id, so however often it is
//!    asked, a supplier sells it once.
//! 3. Sources are asked in priority order: a definite refusal moves to the next, an
//!    unknown outcome (timeout, `5xx`, connection lost) asks the same one again.
//! 4. Codes within `upstream.answer_within_ms`: the order is written `fulfilled` with its
//!    codes (sealed, delivered) and answered `201`. Every source refusing within it: the
//!    purchase is `refused`, the hold given back, the number freed, `409 out_of_stock`.
//!    Otherwise the order is written `processing` (charged, as any order) and answered
//!    `202`; [`step`] finishes it: `fulfilled`, or `failed` with the money back as an
//!    `upstream_failed` ledger row. A purchase whose lease has run out (its gateway died)
//!    is resumed by any gateway's step the same way.
//!
//! Each gateway keeps every supplier's health ([`health`]): a source whose circuit is open
//! is passed over by a purchase that has not yet asked it (and gone back to when every
//! source after it refuses), and waited for by one that has.
//!
//! Every round of asking holds the purchase by its round number, which each claim bumps:
//! a round that outlived its lease moves the purchase no further.

pub mod cardgate;
pub mod health;

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use deadpool_postgres::GenericClient;
use redis::Script;
use serde::{Deserialize, Serialize};

use crate::app::App;
use crate::audit::{Actor, Audited};
use crate::crypto::Purpose;
use crate::error::ApiError;
use crate::orders::{By, Order, Placed};
use crate::reserve::{utc_day, Fulfilment};

/// Gives back the hold of a purchase that will have no order (see the script).
static UNHOLD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("../reserve/give_back.lua"),
        r"
-- KEYS: 1 idempotency record, 2 hot balance, 3 the reseller's risk state, 4 the key's spend
-- ARGV: 1 order id, 2 amount, 3 the gateway's UTC day of the order
give_back(KEYS[1], ARGV[1], ARGV[3], ARGV[2], KEYS[2], KEYS[3], KEYS[4])
return 1
"
    ))
});

/// Marks the number's record done once its order is in Postgres: replays read it there.
static DONE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HGET', KEYS[1], 'order') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'state', 'done')
end
return 1
",
    )
});

/// The number an order is bought under upstream: derived from its id, the same on every
/// attempt and from every gateway.
pub fn upstream_no(order_id: &str) -> String {
    format!("cg-{order_id}")
}

/// One order as a supplier is asked for it.
pub struct Buy<'a> {
    pub upstream_sku: &'a str,
    pub quantity: i64,
    pub upstream_no: &'a str,
    pub max_unit_cost: i64,
}

/// A supplier's answer, classified.
#[derive(Debug)]
pub enum Answer {
    /// Sold: these codes, at this cost.
    Codes {
        codes: Vec<String>,
        upstream_order_id: String,
        cost: i64,
    },
    /// Definitely not sold (out of stock, price, any `4xx`): the next source.
    Refused(String),
    /// Perhaps sold: the same source again, with the same number.
    Unknown(String),
}

/// What a supplier says of the balance the platform holds with it.
#[derive(Debug)]
pub enum Reported {
    Balance(i64),
    /// A definite answer without a balance (a `4xx`): the supplier works, the key may not.
    Refused(String),
    /// Timeout, `5xx`, connection lost, a malformed answer.
    Unknown(String),
}

/// A supplier protocol. `cardgate` is the first; others implement this.
pub trait Supplier {
    fn buy(&self, buy: &Buy<'_>, now_unix_secs: i64) -> impl std::future::Future<Output = Answer> + Send;
    fn balance(&self, now_unix_secs: i64) -> impl std::future::Future<Output = Reported> + Send;
}

/// A product's source, with what is needed to ask it.
struct Source {
    supplier_pk: i64,
    /// The public id: its health's key and metrics label.
    supplier_id: String,
    upstream_sku: String,
    max_unit_cost: i64,
    adapter: cardgate::Cardgate,
}

// ---------------------------------------------------------------------------------
// Suppliers and sources (operator API)
// ---------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewSupplier {
    pub name: String,
    pub protocol: String,
    pub base_url: String,
    pub key_id: String,
    pub secret: String,
    pub timeout_ms: Option<i32>,
}

#[derive(Debug, Serialize)]
pub struct SupplierView {
    pub supplier_id: String,
    pub name: String,
    pub protocol: String,
    pub base_url: String,
    pub key_id: String,
    pub timeout_ms: i32,
    pub created_at: String,
    /// Purchases asked of it over the last day, and how many it filled.
    pub purchases_24h: i64,
    pub fulfilled_24h: i64,
    /// The supplier's circuit, on the supplier itself (docs/api.md §8): `health.circuit`.
    pub circuit: &'static str,
    /// As this gateway sees it ([`health`]).
    pub health: health::HealthView,
}

fn check_supplier(app: &App, s: &NewSupplier) -> Result<(), ApiError> {
    crate::api::admin::check_name(&s.name)?;
    if s.protocol != "cardgate" {
        return Err(ApiError::invalid("protocol: must be \"cardgate\""));
    }
    let url = reqwest::Url::parse(&s.base_url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some() && s.base_url.len() <= 2000)
        .ok_or_else(|| ApiError::invalid("base_url: an http or https URL"))?;
    if !app.config.upstream.allow_private_targets {
        crate::callbacks::target::check_host(&url).map_err(|e| ApiError::invalid(format!("base_url: {}", e.0)))?;
    }
    if s.key_id.is_empty() || s.key_id.len() > 128 || !s.key_id.bytes().all(|b| b.is_ascii_graphic() && b != b'"') {
        return Err(ApiError::invalid("key_id: 1 to 128 printable characters"));
    }
    if s.secret.is_empty() || s.secret.len() > 256 {
        return Err(ApiError::invalid("secret: 1 to 256 characters"));
    }
    if s.timeout_ms.is_some_and(|t| !(1..=120_000).contains(&t)) {
        return Err(ApiError::invalid("timeout_ms: 1 to 120000"));
    }
    Ok(())
}

pub async fn create_supplier(app: &App, actor: &Actor, s: &NewSupplier) -> Result<SupplierView, ApiError> {
    check_supplier(app, s)?;
    let supplier_id = crate::ids::supplier_id();
    let sealed = app.crypto.encrypt(
        Purpose::SupplierSecret {
            supplier_id: &supplier_id,
        },
        s.secret.as_bytes(),
    );
    let mut client = app.pg.get().await?;
    let tx = Audited::begin(&mut client, actor, "supplier.create", &supplier_id).await?;
    tx.execute(
        "INSERT INTO suppliers (supplier_id, name, protocol, base_url, key_id, secret_enc, timeout_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &supplier_id,
            &s.name,
            &s.protocol,
            &s.base_url,
            &s.key_id,
            &sealed,
            &s.timeout_ms.unwrap_or(10_000),
        ],
    )
    .await?;
    tx.commit(serde_json::json!({"name": s.name, "base_url": s.base_url, "key_id": s.key_id}))
        .await?;
    suppliers(app, &client, Some(&supplier_id))
        .await?
        .pop()
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("supplier vanished")))
}

pub async fn list_suppliers(app: &App, supplier_id: Option<&str>) -> Result<Vec<SupplierView>, ApiError> {
    let client = app.pg.get().await?;
    suppliers(app, &client, supplier_id).await
}

async fn suppliers(
    app: &App,
    c: &impl GenericClient,
    supplier_id: Option<&str>,
) -> Result<Vec<SupplierView>, ApiError> {
    let rows = c
        .query(
            "SELECT s.supplier_id, s.name, s.protocol, s.base_url, s.key_id, s.timeout_ms, s.created_at,
                    (SELECT count(*) FROM purchases p WHERE p.supplier_id = s.id AND p.created_at > now() - interval '1 day'),
                    (SELECT count(*) FROM purchases p WHERE p.supplier_id = s.id AND p.state = 'fulfilled'
                        AND p.created_at > now() - interval '1 day')
               FROM suppliers s WHERE $1::text IS NULL OR s.supplier_id = $1 ORDER BY s.id",
            &[&supplier_id],
        )
        .await?;
    let now_ms = app.clock.now_unix_ms();
    Ok(rows
        .iter()
        .map(|r| {
            let health = app.supplier_health.view(r.get(0), now_ms);
            SupplierView {
                circuit: health.circuit,
                health,
                supplier_id: r.get(0),
                name: r.get(1),
                protocol: r.get(2),
                base_url: r.get(3),
                key_id: r.get(4),
                timeout_ms: r.get(5),
                created_at: crate::http::query::rfc3339(r.get(6)),
                purchases_24h: r.get(7),
                fulfilled_24h: r.get(8),
            }
        })
        .collect())
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    pub supplier_id: String,
    pub sku: String,
    pub max_unit_cost: i64,
    pub priority: i32,
}

/// Replaces a product's sources (and its `source_mode`, when given), inside the
/// product's update transaction.
pub async fn set_sources(
    tx: &impl GenericClient,
    product_id: i64,
    sources: Option<&[SourceSpec]>,
    source_mode: Option<&str>,
) -> Result<(), ApiError> {
    if let Some(mode) = source_mode {
        if mode != "local_first" && mode != "upstream_only" {
            return Err(ApiError::invalid("source_mode: local_first or upstream_only"));
        }
        tx.execute(
            "UPDATE products SET source_mode = $2 WHERE id = $1",
            &[&product_id, &mode],
        )
        .await?;
    }
    let Some(sources) = sources else { return Ok(()) };
    if sources.len() > 16 {
        return Err(ApiError::invalid("sources: at most 16"));
    }
    tx.execute("DELETE FROM product_sources WHERE product_id = $1", &[&product_id])
        .await?;
    for (i, s) in sources.iter().enumerate() {
        crate::money::check_non_negative(&format!("sources[{i}].max_unit_cost"), s.max_unit_cost)?;
        if !crate::api::admin::products::valid_sku(&s.sku) {
            return Err(ApiError::invalid(format!("sources[{i}].sku: a SKU")));
        }
        let n = tx
            .execute(
                "INSERT INTO product_sources (product_id, supplier_id, upstream_sku, max_unit_cost, priority)
                 SELECT $1, id, $3, $4, $5 FROM suppliers WHERE supplier_id = $2
                 ON CONFLICT DO NOTHING",
                &[&product_id, &s.supplier_id, &s.sku, &s.max_unit_cost, &s.priority],
            )
            .await?;
        if n == 0 {
            return Err(ApiError::invalid(format!(
                "sources[{i}].supplier_id: no such supplier, or named twice"
            )));
        }
    }
    Ok(())
}

/// A product's sources and mode, as the operator API shows them.
pub async fn sources_of(c: &impl GenericClient, product_id: i64) -> Result<(String, Vec<SourceSpec>), ApiError> {
    let mode: String = c
        .query_one("SELECT source_mode FROM products WHERE id = $1", &[&product_id])
        .await?
        .get(0);
    let rows = c
        .query(
            "SELECT s.supplier_id, ps.upstream_sku, ps.max_unit_cost, ps.priority
               FROM product_sources ps JOIN suppliers s ON s.id = ps.supplier_id
              WHERE ps.product_id = $1 ORDER BY ps.priority, s.id",
            &[&product_id],
        )
        .await?;
    Ok((
        mode,
        rows.iter()
            .map(|r| SourceSpec {
                supplier_id: r.get(0),
                sku: r.get(1),
                max_unit_cost: r.get(2),
                priority: r.get(3),
            })
            .collect(),
    ))
}

async fn load_sources(app: &App, c: &impl GenericClient, product_id: i64) -> Result<Vec<Source>, ApiError> {
    let rows = c
        .query(
            "SELECT s.id, s.supplier_id, s.base_url, s.key_id, s.secret_enc, s.timeout_ms, ps.upstream_sku, ps.max_unit_cost
               FROM product_sources ps JOIN suppliers s ON s.id = ps.supplier_id
              WHERE ps.product_id = $1 ORDER BY ps.priority, s.id",
            &[&product_id],
        )
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let supplier_id: &str = r.get(1);
        let secret = app
            .crypto
            .decrypt(Purpose::SupplierSecret { supplier_id }, r.get(4))
            .map_err(ApiError::internal)?;
        out.push(Source {
            supplier_pk: r.get(0),
            supplier_id: supplier_id.to_owned(),
            upstream_sku: r.get(6),
            max_unit_cost: r.get(7),
            adapter: cardgate::Cardgate {
                base_url: r.get(2),
                key_id: r.get(3),
                signer: crate::auth::signing::Signer::new(&secret),
                timeout: Duration::from_millis(r.get::<_, i32>(5).max(1) as u64),
                client: client(),
            },
        });
    }
    Ok(out)
}

/// One client for every supplier: no redirects followed (a supplier's answer is its own).
fn client() -> reqwest::Client {
    static CLIENT: LazyLock<reqwest::Client> = LazyLock::new(|| {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default()
    });
    CLIENT.clone()
}

// ---------------------------------------------------------------------------------
// The purchase
// ---------------------------------------------------------------------------------

/// An open purchase, as the steps that work on it read it.
struct Purchase {
    pk: i64,
    f: Fulfilment,
    upstream_no: String,
    source_index: i32,
    /// Its number has gone to the source at `source_index` without a definite answer
    /// (the row's outcome there is unknown): that source must be asked again, circuit or
    /// not.
    asked: bool,
    /// It was sent back to the source at `source_index`, passed over for its open circuit
    /// ([`back_to_passed_over`]), and has not asked it since.
    waiting: bool,
    /// The claim this round holds (the row's `round`): every step it writes is
    /// conditional on it, so a round another has taken over from moves nothing (codes it
    /// was sold are still delivered, [`fulfil`]).
    round: i64,
}

/// How a round of asking the sources ended.
enum Round {
    Bought {
        source: usize,
        codes: Vec<String>,
        upstream_order_id: String,
        cost: i64,
    },
    /// Every source, from the purchase's current one on, refused definitely, and none was
    /// passed over for its open circuit.
    Refused,
    /// Not decided yet: the purchase's row says which source to ask next time (each step
    /// of a round writes it before the next).
    Open,
}

/// Steps 2 to 4 of the module's account, for the order whose money the reservation
/// script has just held.
pub async fn begin(app: &App, f: &Fulfilment) -> Result<Placed, ApiError> {
    let started = Instant::now();
    let window = Duration::from_millis(app.config.upstream.answer_within_ms);
    let client = match app.pg_orders.get().await {
        Ok(c) => c,
        Err(e) => {
            unhold(app, f).await;
            return Err(e.into());
        }
    };
    let sources = match load_sources(app, &client, f.product).await {
        Ok(s) => s,
        Err(e) => {
            unhold(app, f).await;
            return Err(e);
        }
    };
    let lease = app.clock.now() + Duration::from_millis(app.config.upstream.lease_ms);
    let upstream_no = upstream_no(&f.order_id);
    let inserted = client
        .query_one(
            "INSERT INTO purchases (order_id, upstream_no, reseller_id, merchant_order_no, product_id, sku, quantity,
                                    unit_price, amount, key_id, order_created_at, lease_until)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, to_timestamp($11), $12) RETURNING id",
            &[
                &f.order_id,
                &upstream_no,
                &f.reseller,
                &f.merchant_order_no,
                &f.product,
                &f.sku,
                &f.quantity,
                &f.unit_price,
                &f.amount,
                &f.key_id,
                &(f.created_unix_ms() as f64 / 1000.0),
                &lease,
            ],
        )
        .await;
    let pk: i64 = match inserted {
        Ok(r) => r.get(0),
        Err(e) => {
            unhold(app, f).await;
            // A purchase of this number is open already (Redis lost its record meanwhile).
            if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
                return Err(ApiError::OrderInProgress);
            }
            return Err(e.into());
        }
    };
    drop(client);
    metrics::counter!("cardgate_upstream_purchases_total").increment(1);
    let p = Purchase {
        pk,
        f: f.clone(),
        upstream_no,
        source_index: 0,
        asked: false,
        waiting: false,
        round: 1,
    };
    let deadline = started + window;
    // Past the bound on orders waiting on suppliers, the order does not wait: `202` now,
    // and the background step buys it.
    let round = match app.upstream_slots.try_acquire() {
        Ok(_waiting) => ask(app, &p, &sources, Some(deadline)).await,
        Err(_) => Round::Open,
    };
    match round {
        Round::Bought {
            source,
            codes,
            upstream_order_id,
            cost,
        } => match fulfil(app, &p, sources[source].supplier_pk, &codes, &upstream_order_id, cost).await? {
            Some(order) => Ok(Placed::Created(order)),
            None => refused(app, &p).await,
        },
        Round::Refused => refused(app, &p).await,
        Round::Open => {
            let order = processing(app, &p).await?;
            Ok(Placed::Accepted(order))
        }
    }
}

/// The answer to an order every source refused within its window: `409 out_of_stock`,
/// nothing charged. If the purchase was not this round's to refuse (its lease ran out
/// inside the window and another round holds it now), that round decides: the order is
/// written `processing` and answered `202`, as for a window that passed undecided.
async fn refused(app: &App, p: &Purchase) -> Result<Placed, ApiError> {
    if refuse(app, p).await? {
        return Err(ApiError::OutOfStock);
    }
    Ok(Placed::Accepted(processing(app, p).await?))
}

/// Asks the sources from the purchase's current one on. With a deadline (the answer
/// window), an unknown outcome is asked again until it passes; without one (the
/// background step), each source is asked once and an unknown outcome ends the round.
///
/// A source whose circuit is open ([`health`]) is not asked. If the number has gone to
/// it, the round ends undecided there, to ask it again once its circuit lets a call
/// through. If not, the round passes it over for the next (nothing was sent, so moving on
/// cannot buy twice) and remembers it. A source passed over has not refused: when every
/// source after it refuses, the purchase goes back to the first one passed over
/// ([`back_to_passed_over`]) and is undecided, not refused (docs/api.md §8). A purchase
/// sent back so waits there while the circuit stays open, rather than asking the sources
/// after it again on every pass.
async fn ask(app: &App, p: &Purchase, sources: &[Source], deadline: Option<Instant>) -> Round {
    let start = (p.source_index.max(0) as usize).min(sources.len());
    let mut i = start;
    let mut asked = p.asked;
    while let Some(s) = sources.get(i) {
        let Some(permit) = app.supplier_health.admit(&s.supplier_id, app.clock.now_unix_ms()) else {
            let sent_back_here = i == start && p.waiting;
            if asked || sent_back_here || !pass_over(app, p, i).await {
                return Round::Open;
            }
            app.supplier_health.skipped(&s.supplier_id);
            i += 1;
            continue;
        };
        if !asked {
            if !mark_asked(app, p, s.supplier_pk, i).await {
                return Round::Open;
            }
            asked = true;
        }
        let buy = Buy {
            upstream_sku: &s.upstream_sku,
            quantity: p.f.quantity as i64,
            upstream_no: &p.upstream_no,
            max_unit_cost: s.max_unit_cost,
        };
        let started = Instant::now();
        let call = s.adapter.buy(&buy, app.clock.now_unix_secs());
        let answer = match deadline {
            Some(d) => match tokio::time::timeout_at(d.into(), call).await {
                Ok(a) => a,
                // The permit goes unsettled: the window, not the supplier, ended the call.
                Err(_) => return Round::Open,
            },
            None => call.await,
        };
        permit.record(health::Outcome::of(&answer), started.elapsed(), app.clock.now_unix_ms());
        record_attempt(app, p, s.supplier_pk, i, &answer).await;
        match answer {
            Answer::Codes {
                codes,
                upstream_order_id,
                cost,
            } => {
                return Round::Bought {
                    source: i,
                    codes,
                    upstream_order_id,
                    cost,
                }
            }
            Answer::Refused(_) => {
                i += 1;
                asked = false;
            }
            Answer::Unknown(_) => match deadline {
                Some(d) if Instant::now() + Duration::from_millis(50) < d => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                _ => return Round::Open,
            },
        }
    }
    match back_to_passed_over(app, p).await {
        Ok(true) => Round::Open,
        Ok(false) => Round::Refused,
        // Undecided: the next round looks again.
        Err(_) => Round::Open,
    }
}

/// Writes that the round passed over source `index` for its open circuit, before it
/// moves on. Not written (the round is no longer the purchase's, or Postgres failed):
/// `false`, and the round stops there.
async fn pass_over(app: &App, p: &Purchase, index: usize) -> bool {
    step_written(
        app,
        "UPDATE purchases SET passed_over = least(passed_over, $3), updated_at = now()
          WHERE id = $1 AND state = 'open' AND round = $2",
        &[&p.pk, &p.round, &(index as i32)],
        "source passed over not recorded; the round stops",
    )
    .await
}

/// One step of a round, written on the purchase's row by `sql`, whose `WHERE` holds the
/// round's fence: whether it was (Postgres failing, logged with `failed`, counts as not).
async fn step_written(
    app: &App,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    failed: &'static str,
) -> bool {
    let Ok(client) = app.pg_orders.get().await else {
        return false;
    };
    match client.execute(sql, params).await {
        Ok(n) => n == 1,
        Err(e) => {
            tracing::warn!(error = %e, "{failed}");
            false
        }
    }
}

/// Every source from the purchase's current one on has refused: back to the first one
/// passed over for its open circuit, if any, to ask it once the circuit lets a call
/// through. `false`: nothing was passed over (or the round is no longer the purchase's,
/// whose ending is then fenced off too): the purchase is refused.
async fn back_to_passed_over(app: &App, p: &Purchase) -> Result<bool, ApiError> {
    let client = app.pg_orders.get().await?;
    let n = client
        .execute(
            "UPDATE purchases SET source_index = passed_over, passed_over = NULL,
                    outcome = 'waiting: its circuit was open', updated_at = now()
              WHERE id = $1 AND state = 'open' AND round = $2 AND passed_over IS NOT NULL",
            &[&p.pk, &p.round],
        )
        .await?;
    Ok(n == 1)
}

/// Writes that the purchase's number is going to source `index`, before it is sent: if
/// its answer is lost (the window cuts it, the gateway dies), whoever resumes the
/// purchase reads an unknown outcome there and asks that source again, whatever its
/// circuit says. Not written (nor sent) when the round is no longer the purchase's:
/// `false`.
async fn mark_asked(app: &App, p: &Purchase, supplier_pk: i64, index: usize) -> bool {
    step_written(
        app,
        "UPDATE purchases SET supplier_id = $2, source_index = $3, outcome = 'unknown: asking', updated_at = now()
          WHERE id = $1 AND state = 'open' AND round = $4",
        &[&p.pk, &supplier_pk, &(index as i32), &p.round],
        "purchase not marked asked; not sent",
    )
    .await
}

/// Counts the attempt and, after a refusal, moves the purchase to the next source (if
/// the round is still the purchase's).
async fn record_attempt(app: &App, p: &Purchase, supplier_pk: i64, index: usize, answer: &Answer) {
    let (outcome, next) = match answer {
        Answer::Codes { .. } => ("codes".to_string(), index),
        Answer::Refused(c) => (format!("refused: {c}"), index + 1),
        Answer::Unknown(c) => (format!("unknown: {c}"), index),
    };
    let kind = outcome.split(':').next().unwrap_or("").to_string();
    metrics::counter!("cardgate_upstream_attempts_total", "outcome" => kind).increment(1);
    step_written(
        app,
        "UPDATE purchases SET attempts = attempts + 1, supplier_id = $2, source_index = $3, outcome = $4,
                updated_at = now()
          WHERE id = $1 AND state = 'open' AND round = $5",
        &[&p.pk, &supplier_pk, &(next as i32), &outcome, &p.round],
        "purchase attempt not recorded",
    )
    .await;
}

/// The order fulfilled with the codes bought: written (or moved from `processing`) with
/// its codes sealed and delivered, in one transaction with the purchase's end. `None`:
/// the supplier delivered a code this product already holds (sold twice upstream, or
/// imported here too); nothing is delivered and the caller ends the purchase with
/// nothing charged.
async fn fulfil(
    app: &App,
    p: &Purchase,
    supplier_pk: i64,
    codes: &[String],
    upstream_order_id: &str,
    cost: i64,
) -> Result<Option<Order>, ApiError> {
    let mut client = app.pg_orders.get().await?;
    let tx = client.transaction().await?;
    crate::rebuild::fence(&tx).await?;
    let open = lock_open(&tx, p.pk, None).await?;
    if open {
        let moved = tx
            .query_opt(
                "UPDATE orders SET status = 'fulfilled' WHERE order_id = $1 AND status = 'processing' RETURNING id",
                &[&p.f.order_id],
            )
            .await?;
        let order_pk: i64 = match moved {
            Some(r) => r.get(0),
            None => insert_order(&tx, app, p, "fulfilled").await?,
        };
        for (i, code) in codes.iter().enumerate() {
            let sealed = app.crypto.encrypt(
                Purpose::Code {
                    product_id: p.f.product,
                },
                code.as_bytes(),
            );
            let hash = app.crypto.code_hash(code.as_bytes()).to_vec();
            let inserted = tx
                .query_opt(
                    "INSERT INTO codes (product_id, code_hash, code_enc, status) VALUES ($1, $2, $3, 'delivered')
                     ON CONFLICT ON CONSTRAINT codes_unique_per_product DO NOTHING RETURNING id",
                    &[&p.f.product, &hash, &sealed],
                )
                .await?;
            let Some(row) = inserted else {
                drop(tx);
                drop(client);
                return codes_already_held(app, p, upstream_order_id).await.map(|()| None);
            };
            let code_pk: i64 = row.get(0);
            tx.execute(
                "INSERT INTO order_codes (order_id, code_id, position) VALUES ($1, $2, $3)",
                &[&order_pk, &code_pk, &(i as i16)],
            )
            .await?;
        }
        tx.execute(
            "UPDATE purchases SET state = 'fulfilled', supplier_id = $2, cost = $3, upstream_order_id = $4,
                    outcome = 'fulfilled', finished_at = now(), updated_at = now()
              WHERE id = $1",
            &[&p.pk, &supplier_pk, &cost, &upstream_order_id],
        )
        .await?;
        order_event(&tx, order_pk, "order.fulfilled").await?;
        tx.commit().await?;
        metrics::counter!("cardgate_upstream_fulfilled_total").increment(1);
    } else {
        drop(tx);
    }
    drop(client);
    mark_done(app, &p.f).await;
    crate::orders::load(app, p.f.reseller, By::OrderId(&p.f.order_id))
        .await?
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("a fulfilled purchase has no order")))
        .map(Some)
}

/// Within the window, nothing was sold: the purchase ends `refused`, the hold goes back
/// and the number is free. Whether it ended so: not when another round holds it now, or
/// its order was written.
async fn refuse(app: &App, p: &Purchase) -> Result<bool, ApiError> {
    let client = app.pg_orders.get().await?;
    let n = client
        .execute(
            "UPDATE purchases SET state = 'refused', finished_at = now(), updated_at = now()
              WHERE id = $1 AND state = 'open' AND round = $3
                AND NOT EXISTS (SELECT 1 FROM orders WHERE order_id = $2)",
            &[&p.pk, &p.f.order_id, &p.round],
        )
        .await?;
    drop(client);
    // Only the one that ended it gives the hold back: exactly once.
    if n == 1 {
        unhold(app, &p.f).await;
    }
    Ok(n == 1)
}

/// The window passed undecided: the order is written `processing` (and charged as any
/// order is), and the purchase left for the background step.
async fn processing(app: &App, p: &Purchase) -> Result<Order, ApiError> {
    let mut client = app.pg_orders.get().await?;
    let tx = client.transaction().await?;
    crate::rebuild::fence(&tx).await?;
    let open = lock_open(&tx, p.pk, None).await?;
    if open {
        let exists = tx
            .query_opt("SELECT 1 FROM orders WHERE order_id = $1", &[&p.f.order_id])
            .await?
            .is_some();
        if !exists {
            insert_order(&tx, app, p, "processing").await?;
        }
        // Due for the background step at once.
        tx.execute(
            "UPDATE purchases SET lease_until = $2, updated_at = now() WHERE id = $1 AND round = $3",
            &[&p.pk, &app.clock.now(), &p.round],
        )
        .await?;
    }
    tx.commit().await?;
    drop(client);
    mark_done(app, &p.f).await;
    crate::orders::load(app, p.f.reseller, By::OrderId(&p.f.order_id))
        .await?
        .ok_or_else(|| ApiError::Unavailable {
            what: "upstream purchase",
            retry_after_secs: 1,
        })
}

/// After a `202`, every source refused: the order `failed`, its amount back through the
/// ledger (`upstream_failed`), `order.failed` queued, all in one transaction. Whether it
/// ended so (not when it was no longer open, or another round holds it).
async fn fail(app: &App, p: &Purchase) -> Result<bool, ApiError> {
    let mut client = app.pg_orders.get().await?;
    let tx = client.transaction().await?;
    let epoch = crate::rebuild::fence(&tx).await?;
    // Another round holds it now (this one outlived its lease): that round decides.
    if !lock_open(&tx, p.pk, Some(p.round)).await? {
        return Ok(false);
    }
    let failed = tx
        .query_opt(
            "UPDATE orders SET status = 'failed' WHERE order_id = $1 AND status = 'processing' RETURNING id, amount",
            &[&p.f.order_id],
        )
        .await?;
    let Some(row) = failed else {
        // No order was written (its gateway died inside the window): nothing was charged
        // in Postgres, only held in Redis.
        drop(tx);
        drop(client);
        return refuse(app, p).await;
    };
    let (order_pk, amount): (i64, i64) = (row.get(0), row.get(1));
    if amount != 0 {
        let ledger_id: i64 = tx
            .query_one(
                "INSERT INTO balance_ledger (reseller_id, amount, kind, reference, note, actor)
                 VALUES ($1, $2, 'upstream_failed', $3, 'every source refused', 'system') RETURNING id",
                &[&p.f.reseller, &amount, &p.f.order_id],
            )
            .await?
            .get(0);
        crate::hot_balance::record_credit(&tx, p.f.reseller, ledger_id, amount, epoch).await?;
    }
    tx.execute(
        "UPDATE purchases SET state = 'failed', finished_at = now(), updated_at = now() WHERE id = $1",
        &[&p.pk],
    )
    .await?;
    order_event(&tx, order_pk, "order.failed").await?;
    tx.commit().await?;
    drop(client);
    metrics::counter!("cardgate_upstream_failed_total").increment(1);
    crate::hot_balance::settle(app, Some(p.f.reseller)).await;
    Ok(true)
}

/// A supplier sold a code this platform already holds: it is not delivered a second time.
/// The purchase keeps the upstream order's id for the operator to claim the money back;
/// the caller then ends it like a refusal (the buyer charged nothing).
async fn codes_already_held(app: &App, p: &Purchase, upstream_order_id: &str) -> Result<(), ApiError> {
    metrics::counter!("cardgate_upstream_codes_refused_total").increment(1);
    tracing::error!(
        order_id = %p.f.order_id,
        upstream_order_id,
        "a supplier delivered a code this product already holds: not delivered, the order ends unfilled"
    );
    let client = app.pg_orders.get().await?;
    client
        .execute(
            "UPDATE purchases SET upstream_order_id = $2, outcome = 'refused: delivered a code already held',
                    updated_at = now()
              WHERE id = $1 AND state = 'open' AND round = $3",
            &[&p.pk, &upstream_order_id, &p.round],
        )
        .await?;
    Ok(())
}

/// Locks the purchase for the transaction that ends it; whether it is still open (a
/// gateway that resumed it may have ended it meanwhile) and, with `round`, still held by
/// that round.
async fn lock_open(tx: &impl GenericClient, pk: i64, round: Option<i64>) -> Result<bool, ApiError> {
    Ok(tx
        .query_opt("SELECT state, round FROM purchases WHERE id = $1 FOR UPDATE", &[&pk])
        .await?
        .is_some_and(|r| r.get::<_, &str>(0) == "open" && round.is_none_or(|n| r.get::<_, i64>(1) == n)))
}

async fn insert_order(tx: &impl GenericClient, app: &App, p: &Purchase, status: &str) -> Result<i64, ApiError> {
    Ok(tx
        .query_one(
            "INSERT INTO orders (order_id, reseller_id, merchant_order_no, product_id, sku, quantity, unit_price, amount,
                                 currency, created_at, key_id, status)
             SELECT order_id, reseller_id, merchant_order_no, product_id, sku, quantity, unit_price, amount,
                    $2, order_created_at, key_id, $3
               FROM purchases WHERE id = $1
             RETURNING id",
            &[&p.pk, &app.config.currency, &status],
        )
        .await?
        .get(0))
}

async fn order_event(tx: &impl GenericClient, order_pk: i64, kind: &str) -> Result<(), ApiError> {
    tx.execute(
        "INSERT INTO events (reseller_id, type, data)
         SELECT o.reseller_id, $2, order_event_data(o)
           FROM orders o JOIN resellers r ON r.id = o.reseller_id AND r.callback_url IS NOT NULL
          WHERE o.id = $1",
        &[&order_pk, &kind],
    )
    .await?;
    Ok(())
}

async fn unhold(app: &App, f: &Fulfilment) {
    let mut redis = app.redis();
    let r = UNHOLD
        .key(app.keys.idempotency(f.reseller, &f.merchant_order_no))
        .key(app.keys.balance(f.reseller))
        .key(app.keys.risk(f.reseller))
        .key(app.keys.key_spend(f.reseller, &f.key_id))
        .arg(&f.order_id)
        .arg(f.amount)
        .arg(utc_day(f.created_at))
        .invoke_async::<i64>(&mut redis)
        .await;
    if let Err(e) = r {
        // The hot balance stays lower than Postgres's until the next rebuild; reconcile
        // reports it.
        tracing::error!(error = %e, order_id = %f.order_id, "an upstream hold was not given back");
    }
}

async fn mark_done(app: &App, f: &Fulfilment) {
    let mut redis = app.redis();
    let r = DONE
        .key(app.keys.idempotency(f.reseller, &f.merchant_order_no))
        .arg(&f.order_id)
        .invoke_async::<i64>(&mut redis)
        .await;
    if let Err(e) = r {
        // A replay finds the record pending, then the order in Postgres, and answers it.
        tracing::warn!(error = %e, "idempotency record not marked done");
    }
}

/// One pass over the open purchases due (their window passed, or their gateway's lease
/// ran out): each is claimed for `upstream.lease_ms`, its sources asked once more, and
/// ended or left for the next pass. Returns how many were ended.
pub async fn step(app: &App) -> anyhow::Result<usize> {
    let now = app.clock.now();
    let lease = now + Duration::from_millis(app.config.upstream.lease_ms);
    let client = app.pg_orders.get().await?;
    let rows = client
        .query(
            "UPDATE purchases SET lease_until = $2, round = round + 1, updated_at = now()
              WHERE id IN (SELECT id FROM purchases WHERE state = 'open' AND lease_until <= $1
                            ORDER BY lease_until LIMIT 32 FOR UPDATE SKIP LOCKED)
             RETURNING id, order_id, upstream_no, reseller_id, merchant_order_no, product_id, sku, quantity, unit_price,
                       amount, coalesce(key_id, ''), (extract(epoch FROM order_created_at) * 1000)::int8, source_index,
                       coalesce(outcome LIKE 'unknown%', false), coalesce(outcome LIKE 'waiting:%', false), round",
            &[&now, &lease],
        )
        .await?;
    drop(client);
    // Each purchase waits on its own supplier: asked side by side, not one after another.
    let ended = futures_util::future::join_all(rows.iter().map(|r| async move {
        let (created_at, created_ms) = Fulfilment::placed_at(r.get(11));
        let p = Purchase {
            pk: r.get(0),
            upstream_no: r.get(2),
            f: Fulfilment {
                order_id: r.get(1),
                reseller: r.get(3),
                merchant_order_no: r.get(4),
                product: r.get(5),
                sku: r.get(6),
                quantity: r.get(7),
                unit_price: r.get(8),
                amount: r.get(9),
                key_id: r.get(10),
                created_at,
                created_ms,
            },
            source_index: r.get(12),
            asked: r.get(13),
            waiting: r.get(14),
            round: r.get(15),
        };
        let ended = resume(app, &p).await;
        if let Err(e) = &ended {
            tracing::warn!(error = %e, order_id = %p.f.order_id, "upstream purchase not advanced");
        }
        ended.unwrap_or(false)
    }))
    .await;
    Ok(ended.into_iter().filter(|e| *e).count())
}

/// One more round for a claimed purchase; whether it ended.
async fn resume(app: &App, p: &Purchase) -> Result<bool, ApiError> {
    let client = app.pg_orders.get().await?;
    let sources = load_sources(app, &client, p.f.product).await?;
    drop(client);
    match ask(app, p, &sources, None).await {
        Round::Bought {
            source,
            codes,
            upstream_order_id,
            cost,
        } => match fulfil(app, p, sources[source].supplier_pk, &codes, &upstream_order_id, cost).await? {
            Some(_) => Ok(true),
            None => fail(app, p).await,
        },
        Round::Refused => fail(app, p).await,
        Round::Open => {
            let retry = app.clock.now() + Duration::from_millis(app.config.upstream.retry_ms);
            let client = app.pg_orders.get().await?;
            client
                .execute(
                    "UPDATE purchases SET lease_until = $2 WHERE id = $1 AND state = 'open' AND round = $3",
                    &[&p.pk, &retry, &p.round],
                )
                .await?;
            Ok(false)
        }
    }
}

/// The background loop of [`step`].
pub async fn run(app: Arc<App>) {
    let every = Duration::from_millis(app.config.upstream.retry_ms.max(100));
    crate::every(every, || async {
        if let Err(e) = step(&app).await {
            tracing::warn!(error = format!("{e:#}"), "upstream step failed");
        }
    })
    .await;
}
