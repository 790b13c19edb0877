//! Orders: placing one (reserve in Redis, wait for the ledger writer's commit), reading
//! one back from Postgres, refunding one (`refund`), searching them for operators (`search`).
//!
//! # An order, hop by hop
//!
//! From the socket to the commit and back (`POST /v1/orders`; a batch runs hops 5 to 9
//! per order, concurrently):
//!
//! 1. `http/mod.rs` [`serve`](crate::http::serve): the connection is accepted within
//!    `connections_max` and the client's share (`http/per_client.rs`), read by hyper
//!    under the header limits, and closed with a linger (`http/linger.rs`).
//! 2. `http/router.rs`: the path and method name the route (`Route::CreateOrder`).
//! 3. `api/v1/mod.rs` [`begin`](crate::api::v1::begin): the `Authorization` header and
//!    timestamp (`auth/reseller.rs`), the body read within its limits (`http/body.rs`),
//!    the HMAC checked against the key cache (`auth/signing.rs`, `auth/keys.rs`) with the
//!    key's expiry and scope (`auth/scopes.rs`), admission under overload (`overload.rs`)
//!    and the tier's local shield (`ratelimit.rs`; the global bucket is charged in hop 6).
//! 4. `api/v1/orders.rs` `create`: the body parsed into an [`OrderRequest`].
//! 5. Here, [`place`]: the product and price from the catalogue cache (`catalogue/mod.rs`);
//!    refusals the gateway can decide are settled into a [`Refusal`] but not yet reported;
//!    the [`Fulfilment`] is built and a waiter registered (`ledger/mod.rs` `Waiters`).
//! 6. `reserve/mod.rs` `reserve_cmd` and `reserve/reserve.lua`: one `EVALSHA` takes the
//!    order's token from the reseller's write bucket shared by every gateway
//!    (`ratelimit/gcra.lua`), spends the nonce, checks the epoch, the idempotency record,
//!    the refusal, stock and hot balance, pops the codes (ciphertext), debits the hot
//!    balance, records the reservation and appends the fulfilment to the outbox stream.
//!    Its answer comes back as [`Reserved`] (`Ok`, `Seen` or `Refused(Refusal)`: one
//!    mapping each way, `Refusal::wire`), with the bucket for the `RateLimit-*` headers.
//!    Every key is in the reseller's home cell, the stock being that cell's pool; a pool
//!    that cannot fill the order answers `cell_dry`, and `stock/mover.rs` `fill` brings
//!    codes from the other cells before the reservation runs again.
//! 7. `ledger/writer.rs`: a ledger writer of some gateway reads every cell's outbox
//!    (a consumer group each), and commits a batch of fulfilments in one Postgres transaction through
//!    `ledger_commit()` (the schema in `migrations/`): orders, their codes behind the
//!    unique guard, the ledger debits; then `settle.lua` acknowledges them in Redis, or
//!    `release.lua` undoes those Postgres refused.
//! 8. The writer wakes the waiter with a `ledger::Settled` (a writer of another gateway
//!    publishes it on the settle channel, `sync.rs`).
//! 9. Back here: `Committed` decrypts the codes (`crypto.rs`) into an [`Order`];
//!    `api/v1/orders.rs` renders it `201`, and the request id and metrics are added in
//!    `http/mod.rs`. Any refusal maps to `error.rs`'s one table of statuses and codes.

pub mod refund;
pub mod search;

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::app::App;
use crate::auth::keys::Reseller;
use crate::auth::reseller::{Caller, Nonce};
use crate::config::RiskAction;
use crate::crypto::Purpose;
use crate::error::ApiError;
use crate::ledger::Settled;
use crate::reserve::{self, Fulfilment, Guards, Refusal, Reservation, Reserved};

/// Times a dry home cell is filled from the others and the order reserved again, before
/// the gateway answers that stock is being moved (503) rather than out of stock.
const DRY_RETRIES: usize = 8;

/// Reservations retried after the last guard refused a code, before giving up.
const LAST_GUARD_RETRIES: usize = 3;
/// The answer to a merchant_order_no sent again for another order.
const SAME_NUMBER_OTHER_ORDER: &str = "merchant_order_no was already used with a different sku or quantity";

/// A `POST /v1/orders` body, checked.
#[derive(Debug, Clone)]
pub struct OrderRequest {
    pub sku: String,
    /// As sent: out of range is refused after the idempotency check, not here.
    pub quantity: i64,
    pub merchant_order_no: String,
    pub max_unit_price: Option<i64>,
}

impl OrderRequest {
    /// Checks the shape of an order body; `invalid_request` names the field.
    pub fn parse(v: &Value) -> Result<OrderRequest, ApiError> {
        let o = v
            .as_object()
            .ok_or_else(|| ApiError::invalid("an order must be a JSON object"))?;
        // Refused, as Stripe does: a misspelt `max_unit_price` must not place the order
        // without the caller's price guard.
        refuse_unknown(o, &["sku", "quantity", "merchant_order_no", "max_unit_price"])?;
        let sku = match o.get("sku") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(ApiError::invalid("sku: required, a non-empty string")),
        };
        let quantity = match o.get("quantity") {
            Some(Value::Number(n)) if n.is_i64() => n.as_i64().unwrap_or(0),
            // Whole numbers too large for 64 bits are still whole numbers: out of range.
            Some(Value::Number(n)) if n.is_u64() => i64::MAX,
            _ => return Err(ApiError::invalid("quantity: required, an integer")),
        };
        let merchant_order_no = match o.get("merchant_order_no") {
            Some(Value::String(s)) if valid_merchant_order_no(s) => s.clone(),
            _ => {
                return Err(ApiError::invalid(
                    "merchant_order_no: required, 1 to 64 characters of A-Z a-z 0-9 _ . : -",
                ))
            }
        };
        let max_unit_price = match o.get("max_unit_price") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) if n.as_i64().is_some_and(|p| p >= 0) => n.as_i64(),
            Some(Value::Number(n)) if n.is_u64() => Some(i64::MAX),
            _ => return Err(ApiError::invalid("max_unit_price: a non-negative integer")),
        };
        Ok(OrderRequest {
            sku,
            quantity,
            merchant_order_no,
            max_unit_price,
        })
    }
}

/// `invalid_request` naming the first field of `o` not in `known`.
pub fn refuse_unknown(o: &serde_json::Map<String, Value>, known: &[&str]) -> Result<(), ApiError> {
    match o.keys().find(|k| !known.contains(&k.as_str())) {
        None => Ok(()),
        Some(k) => {
            let name: String = k.chars().take(64).collect();
            Err(ApiError::invalid(format!(
                "unknown field {name:?}; expected {}",
                known.join(", ")
            )))
        }
    }
}

pub fn valid_merchant_order_no(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// An order as docs/api.md §3 shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Order {
    pub order_id: String,
    pub merchant_order_no: String,
    pub sku: String,
    pub quantity: i64,
    pub unit_price: i64,
    pub amount: i64,
    pub currency: String,
    pub status: String,
    pub created_at: String,
    pub codes: Vec<String>,
}

pub enum Placed {
    /// `201`: new, committed.
    Created(Order),
    /// `200` with `Idempotent-Replayed: true`.
    Replayed(Order),
    /// `202`: charged, being bought upstream (docs/api.md §8); no codes yet.
    Accepted(Order),
}

/// Places one order for `reseller`, answering only once Postgres holds it. A `nonce`
/// not yet spent is spent by the reservation script, before anything else it does.
pub async fn place(
    app: &App,
    caller: &Caller,
    req: &OrderRequest,
    nonce: Option<Nonce<'_>>,
) -> Result<Placed, ApiError> {
    let started = Instant::now();
    let reseller = &*caller.reseller;
    let result = place_inner(app, caller, req, nonce).await;
    let outcome = match &result {
        Ok(Placed::Created(_)) => "created",
        Ok(Placed::Replayed(_)) => "replayed",
        Ok(Placed::Accepted(_)) => "accepted",
        Err(e) => e.code(),
    };
    metrics::counter!("cardgate_orders_total", "outcome" => outcome, "tier" => reseller.tier.clone()).increment(1);
    if let Ok(Placed::Created(o)) = &result {
        metrics::counter!("cardgate_codes_sold_total", "sku" => o.sku.clone()).increment(o.quantity as u64);
    }
    metrics::histogram!("cardgate_order_seconds", "outcome" => outcome).record(started.elapsed().as_secs_f64());
    result
}

async fn place_inner(
    app: &App,
    caller: &Caller,
    req: &OrderRequest,
    nonce: Option<Nonce<'_>>,
) -> Result<Placed, ApiError> {
    let reseller = &*caller.reseller;
    // Nothing reserved could be committed: answer now rather than after the commit timeout.
    if !app.health.postgres_up() {
        return Err(ApiError::Unavailable {
            what: "order ledger",
            retry_after_secs: 1,
        });
    }
    let product = app.catalogue.get(&req.sku);
    let tier_max = app
        .config
        .tiers
        .get(&reseller.tier)
        .map_or(0, |t| t.max_quantity as i64);
    let unit_price = product.as_ref().map_or(0, |p| p.price_for(&reseller.tier));
    // Past the money bound no balance could pay it, and the reservation script compares
    // amounts as doubles: refused as an overflow is.
    let amount = unit_price
        .checked_mul(req.quantity)
        .filter(|a| *a <= crate::money::MONEY_MAX_MINOR);
    // Refusals decided here are reported only after the idempotency check, so that a
    // replay of an order placed before a price or status change still gets its order.
    let refusal = match &product {
        None => Some(Refusal::UnknownProduct),
        Some(p) if !p.on_sale => Some(Refusal::ProductUnavailable),
        Some(p) if req.quantity < 1 || req.quantity > (p.max_quantity as i64).min(tier_max) => {
            Some(Refusal::QuantityOutOfRange)
        }
        _ if amount.is_none() => Some(Refusal::QuantityOutOfRange),
        _ if req.max_unit_price.is_some_and(|max| unit_price > max) => Some(Refusal::PriceChanged),
        Some(p) if p.sourcing == reserve::Sourcing::Nowhere => Some(Refusal::OutOfStock),
        _ => None,
    };
    let fingerprint = reserve::fingerprint(&req.sku, req.quantity);
    let ttl = app.config.orders.idempotency_ttl_secs;
    let risk = &app.config.risk;
    let guards = Guards {
        credit_limit: reseller.credit_limit,
        reseller_daily_limit: reseller.daily_spend_limit,
        key_daily_limit: caller.key_daily_limit,
        address: (risk.new_address != RiskAction::Off).then(|| caller.ip.to_string()),
        velocity: (risk.velocity != RiskAction::Off).then_some((risk.velocity_factor, risk.velocity_min_per_minute)),
        holds: crate::risk::order_holds(risk),
    };
    // Other cells may hold what the home cell lacks, until a fill finds that none does.
    let mut other_cells = app.keys.cells() > 1;
    let mut dry = 0;
    for _ in 0..LAST_GUARD_RETRIES {
        let (created_at, created_ms) = Fulfilment::placed_at(app.clock.now_unix_ms());
        let f = Fulfilment {
            order_id: crate::ids::order_id(),
            reseller: reseller.pk,
            merchant_order_no: req.merchant_order_no.clone(),
            product: product.as_ref().map_or(0, |p| p.id),
            sku: req.sku.clone(),
            quantity: req.quantity.clamp(0, i32::MAX as i64) as i32,
            unit_price,
            amount: amount.unwrap_or(0),
            created_at,
            created_ms,
            key_id: caller.key_id.clone(),
        };
        let mut waiter = app.waiters.register(&f.order_id);
        let t = Instant::now();
        let mut redis = app.redis();
        // The nonce and the request's write tokens, with the first reservation only.
        let spend = nonce.as_ref().and_then(|n| n.take());
        let sourcing = product.as_ref().map_or(reserve::Sourcing::Local, |p| p.sourcing);
        let cell = app.keys.cell_of(f.reseller);
        let want = usize::try_from(f.quantity).unwrap_or(0);
        // A sell-out this gateway found already: refused in this one call if still one.
        let sold_out = app.sold_out.as_of(f.product, cell, want);
        let command = |spend: Option<crate::auth::reseller::Spend>, other_cells| {
            reserve::reserve_cmd(
                &app.keys,
                &f,
                &fingerprint,
                refusal,
                ttl,
                spend.map(|s| s.nonce_key),
                spend.and_then(|s| s.charge),
                &guards,
                sourcing,
                other_cells,
                &sold_out,
            )
        };
        let mut cmd = command(spend, other_cells);
        let Reservation { reserved, bucket } = loop {
            let r = reserve::reserve(&mut redis, &cmd).await?;
            if matches!(r.reserved, Reserved::Ok { .. }) {
                app.waiters.reserved();
            }
            if r.reserved != Reserved::Refused(Refusal::CellDry) || dry == DRY_RETRIES {
                break r;
            }
            // The nonce and tokens went with the first attempt (recorded here).
            if let Some(n) = &nonce {
                n.tokens().record(r.bucket);
            }
            dry += 1;
            match crate::stock::mover::fill(app, f.product, cell, want).await? {
                crate::stock::mover::Fill::Moved => {}
                // No cell can fill it: out_of_stock, or bought upstream where allowed.
                crate::stock::mover::Fill::Short { as_of, total } => {
                    app.sold_out.note(f.product, cell, as_of, total);
                    other_cells = false;
                }
                crate::stock::mover::Fill::Rebuilding => return Err(Refusal::Rebuilding.into()),
            }
            cmd = command(None, other_cells);
        };
        metrics::histogram!("cardgate_reservation_seconds").record(t.elapsed().as_secs_f64());
        // The answer's RateLimit-* headers, whatever comes of the order.
        if let Some(n) = &nonce {
            n.tokens().record(bucket);
        }
        // The rules the reservation fired, whether it took the money or placed a hold.
        let signal = |fired: String| {
            crate::risk::order_fired(
                app,
                crate::risk::Signal::Order {
                    reseller_pk: reseller.pk,
                    key_id: caller.key_id.clone(),
                    address: caller.ip,
                    fired,
                },
            )
        };
        let elements = match reserved {
            Reserved::Seen {
                pending,
                fingerprint: seen,
                order_id,
                upstream,
            } => {
                if seen != fingerprint {
                    return Err(ApiError::IdempotencyConflict(SAME_NUMBER_OTHER_ORDER));
                }
                // This attempt's own reservation, its answer lost and the script sent again
                // (a cluster connection does so when a node fails over mid-call): the order
                // is this request's, and its codes are read from Postgres once committed;
                // one to be bought upstream has its purchase begun here, as it never was.
                if pending && order_id == f.order_id {
                    if upstream {
                        drop(waiter);
                        return crate::upstream::begin(app, &f).await;
                    }
                    None
                } else {
                    // Postgres decides: a committed order's record still says 'pending'
                    // (only a rebuild, or the end of an upstream purchase, writes 'done'),
                    // and a replay gets the order as Postgres holds it.
                    return match recorded(app, reseller, req, &fingerprint).await? {
                        Some(placed) => Ok(placed),
                        None if pending => Err(ApiError::OrderInProgress),
                        None => Err(ApiError::internal(anyhow::anyhow!(
                            "idempotency record names an order Postgres does not hold"
                        ))),
                    };
                }
            }
            Reserved::Refused(Refusal::NonceReused) => return Err(ApiError::NonceReused),
            // Refused before the idempotency record was read, and Postgres is not asked
            // either: an order over the limit must cost nothing more.
            Reserved::Refused(Refusal::RateLimited) => {
                return Err(nonce.map_or_else(|| Refusal::RateLimited.into(), |n| n.tokens().limited()))
            }
            Reserved::Refused(refusal) => return refused(app, reseller, req, &fingerprint, refusal).await,
            Reserved::Held { signals } => {
                signal(signals);
                return refused(app, reseller, req, &fingerprint, Refusal::RiskHold).await;
            }
            Reserved::Upstream { signals } => {
                signal(signals);
                drop(waiter);
                return crate::upstream::begin(app, &f).await;
            }
            Reserved::Ok { signals, elements } => {
                signal(signals);
                Some(elements)
            }
        };
        let timeout = Duration::from_millis(app.config.orders.commit_timeout_ms);
        match tokio::time::timeout(timeout, waiter.settled()).await {
            Ok(Some(Settled::Committed)) => {
                let Some(elements) = elements else {
                    return match recorded(app, reseller, req, &fingerprint).await? {
                        Some(Placed::Replayed(order)) => Ok(Placed::Created(order)),
                        _ => Err(ApiError::internal(anyhow::anyhow!(
                            "committed order vanished from Postgres"
                        ))),
                    };
                };
                let codes = decrypt_codes(app, f.product, elements.iter().map(|e| e.as_slice()))?;
                return Ok(Placed::Created(Order {
                    order_id: f.order_id,
                    merchant_order_no: f.merchant_order_no,
                    sku: f.sku,
                    quantity: req.quantity,
                    unit_price,
                    amount: f.amount,
                    currency: app.config.currency.clone(),
                    status: "fulfilled".into(),
                    created_at: rfc3339(f.created_at),
                    codes,
                }));
            }
            Ok(Some(Settled::Duplicate)) => {
                return recorded(app, reseller, req, &fingerprint)
                    .await?
                    .ok_or_else(|| ApiError::internal(anyhow::anyhow!("duplicate order vanished from Postgres")));
            }
            // A code Postgres would not deliver, or a Redis rebuilt meanwhile: reserve again.
            Ok(Some(Settled::LastGuard | Settled::Stale)) => continue,
            Ok(Some(Settled::Failed)) => {
                return Err(ApiError::internal(anyhow::anyhow!(
                    "Postgres refused the order; nothing was charged"
                )))
            }
            // Still reserved, and committed when Postgres answers: a retry with the same
            // merchant_order_no then gets this order.
            Ok(None) | Err(_) => {
                return Err(ApiError::Unavailable {
                    what: "order ledger",
                    retry_after_secs: 1,
                })
            }
        }
    }
    Err(ApiError::Unavailable {
        what: "stock",
        retry_after_secs: 1,
    })
}

/// A reservation refused: Redis has no record of this number, but Postgres may (the
/// record expired, or Redis was rebuilt), and its answer wins over any refusal.
async fn refused(
    app: &App,
    reseller: &Reseller,
    req: &OrderRequest,
    fingerprint: &str,
    refusal: Refusal,
) -> Result<Placed, ApiError> {
    match recorded(app, reseller, req, fingerprint).await? {
        Some(placed) => Ok(placed),
        None => Err(refusal.into()),
    }
}

/// The order Postgres holds for this merchant_order_no: a replay if it matches, a
/// conflict if not, `None` if there is none.
async fn recorded(
    app: &App,
    reseller: &Reseller,
    req: &OrderRequest,
    fingerprint: &str,
) -> Result<Option<Placed>, ApiError> {
    let Some(order) = load(app, reseller.pk, By::MerchantOrderNo(&req.merchant_order_no)).await? else {
        return Ok(None);
    };
    if reserve::fingerprint(&order.sku, order.quantity) != fingerprint {
        return Err(ApiError::IdempotencyConflict(SAME_NUMBER_OTHER_ORDER));
    }
    Ok(Some(Placed::Replayed(order)))
}

pub enum By<'a> {
    OrderId(&'a str),
    MerchantOrderNo(&'a str),
}

/// One of `reseller_pk`'s orders from Postgres, codes decrypted.
pub async fn load(app: &App, reseller_pk: i64, by: By<'_>) -> Result<Option<Order>, ApiError> {
    let (column, value) = match by {
        By::OrderId(v) => ("order_id", v),
        By::MerchantOrderNo(v) => ("merchant_order_no", v),
    };
    let client = app.pg_orders.get().await?;
    let sql = format!(
        "SELECT o.order_id, o.merchant_order_no, o.sku, o.quantity, o.unit_price, o.amount, o.currency, o.status,
                o.created_at, o.product_id,
                array(SELECT c.code_enc FROM order_codes oc JOIN codes c ON c.id = oc.code_id
                       WHERE oc.order_id = o.id ORDER BY oc.position)
           FROM orders o WHERE o.reseller_id = $1 AND o.{column} = $2"
    );
    let Some(row) = client.query_opt(&sql, &[&reseller_pk, &value]).await? else {
        return Ok(None);
    };
    let sealed: Vec<Vec<u8>> = row.get(10);
    let codes = decrypt_sealed(app, row.get(9), sealed.iter().map(|s| s.as_slice()))?;
    Ok(Some(Order {
        order_id: row.get(0),
        merchant_order_no: row.get(1),
        sku: row.get(2),
        quantity: row.get::<_, i32>(3) as i64,
        unit_price: row.get(4),
        amount: row.get(5),
        currency: row.get(6),
        status: row.get(7),
        created_at: crate::http::query::rfc3339(row.get(8)),
        codes,
    }))
}

fn decrypt_codes<'a>(
    app: &App,
    product_id: i64,
    elements: impl Iterator<Item = &'a [u8]>,
) -> Result<Vec<String>, ApiError> {
    let sealed: Vec<&[u8]> = elements
        .map(|e| {
            crate::stock::parse_element(e)
                .map(|(_, enc)| enc)
                .ok_or_else(|| ApiError::internal(anyhow::anyhow!("malformed stock element")))
        })
        .collect::<Result<_, _>>()?;
    decrypt_sealed(app, product_id, sealed.into_iter())
}

fn decrypt_sealed<'a>(
    app: &App,
    product_id: i64,
    sealed: impl Iterator<Item = &'a [u8]>,
) -> Result<Vec<String>, ApiError> {
    sealed
        .map(|s| {
            let plain = app
                .crypto
                .decrypt(Purpose::Code { product_id }, s)
                .map_err(ApiError::internal)?;
            String::from_utf8(plain).map_err(|_| ApiError::internal(anyhow::anyhow!("stored code is not UTF-8")))
        })
        .collect()
}

fn rfc3339(unix: i64) -> String {
    crate::http::query::rfc3339(
        time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn order_bodies_are_checked_field_by_field() {
        let ok = OrderRequest::parse(&json!({"sku": "a", "quantity": 2, "merchant_order_no": "M-1:x.y_z"})).unwrap();
        assert_eq!((ok.quantity, ok.max_unit_price), (2, None));
        let huge = OrderRequest::parse(&json!({"sku": "a", "quantity": u64::MAX, "merchant_order_no": "M"})).unwrap();
        assert_eq!(huge.quantity, i64::MAX, "out of range, not malformed");
        for (body, field) in [
            (json!([]), "object"),
            (json!({"quantity": 1, "merchant_order_no": "M"}), "sku"),
            (
                json!({"sku": "a", "quantity": 1.5, "merchant_order_no": "M"}),
                "quantity",
            ),
            (
                json!({"sku": "a", "quantity": "1", "merchant_order_no": "M"}),
                "quantity",
            ),
            (
                json!({"sku": "a", "quantity": 1, "merchant_order_no": "M 1"}),
                "merchant_order_no",
            ),
            (
                json!({"sku": "a", "quantity": 1, "merchant_order_no": "x".repeat(65)}),
                "merchant_order_no",
            ),
            (
                json!({"sku": "a", "quantity": 1, "merchant_order_no": "M", "max_unit_price": -1}),
                "max_unit_price",
            ),
        ] {
            let e = OrderRequest::parse(&body).unwrap_err();
            assert!(e.to_string().contains(field), "{body}: {e}");
        }
    }
}
