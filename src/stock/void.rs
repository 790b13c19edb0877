//! Voiding unsold codes (a bad batch from a supplier): out of Redis first, so a code
//! being voided cannot be reserved meanwhile, then marked voided in Postgres, all inside
//! the rebuild fence ([`crate::rebuild`]) and in one transaction with the audit row
//! (`codes.void`, the report as its detail).

use crate::store::redis::Redis;
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};

use crate::app::App;
use crate::audit::{Actor, Audited};
use crate::crypto::Crypto;
use crate::error::ApiError;
use crate::store::keys::Keys;

/// Elements popped per round when voiding everything.
const VOID_ALL_CHUNK: usize = 1000;

#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct VoidReport {
    pub voided: u64,
    /// Not a code of this product.
    pub not_found: u64,
    /// Delivered, already voided, or reserved by an order in flight.
    pub not_available: u64,
}

/// Codes named in one void call.
pub const VOID_CODES_MAX: usize = 10_000;

/// `POST /admin/v1/products/{sku}/codes/void`: either `codes` or `all_available: true`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VoidRequest {
    codes: Option<Vec<String>>,
    #[serde(default)]
    all_available: bool,
}

/// Voids codes of the product `sku`, audited in the same transaction. An unknown SKU is
/// `404` before the request's shape is judged.
pub async fn void(app: &App, actor: &Actor, sku: &str, req: VoidRequest) -> Result<VoidReport, ApiError> {
    let mut client = app.pg.get().await?;
    let product_id = crate::catalogue::products::id_of(&client, sku).await?;
    let codes = match (req.codes, req.all_available) {
        (Some(codes), false) if !codes.is_empty() && codes.len() <= VOID_CODES_MAX => Some(codes),
        (None, true) => None,
        _ => {
            return Err(ApiError::invalid(format!(
                "give either codes (1 to {VOID_CODES_MAX}) or all_available: true"
            )))
        }
    };
    let tx = Audited::begin(&mut client, actor, "codes.void", sku).await?;
    crate::rebuild::fence(&*tx).await?;
    let report = match codes {
        Some(codes) => void_codes(&*tx, app.redis(), &app.crypto, &app.keys, product_id, &codes).await?,
        None => void_all_available(&*tx, app.redis(), &app.keys, product_id).await?,
    };
    tx.commit(serde_json::json!(report)).await?;
    Ok(report)
}

/// In the caller's transaction, which holds the fence.
pub async fn void_codes(
    tx: &impl GenericClient,
    mut redis: Redis,
    crypto: &Crypto,
    keys: &Keys,
    product_id: i64,
    codes: &[String],
) -> Result<VoidReport, ApiError> {
    let mut hashes: Vec<Vec<u8>> = codes
        .iter()
        .map(|c| crypto.code_hash(c.trim().as_bytes()).to_vec())
        .collect();
    hashes.sort();
    hashes.dedup();
    let rows = tx
        .query(
            "SELECT id, code_enc, status FROM codes WHERE product_id = $1 AND code_hash = ANY($2)",
            &[&product_id, &hashes],
        )
        .await?;
    let mut report = VoidReport {
        not_found: (hashes.len() - rows.len()) as u64,
        ..Default::default()
    };
    let available: Vec<_> = rows.iter().filter(|r| r.get::<_, &str>(2) == "available").collect();
    report.not_available += (rows.len() - available.len()) as u64;
    if available.is_empty() {
        return Ok(report);
    }
    let elements: Vec<(i64, Vec<u8>)> = available
        .iter()
        .map(|r| (r.get(0), super::element(r.get(0), r.get::<_, &[u8]>(1))))
        .collect();
    // Whichever cell's pool holds it. The mover may carry a code between pools while it
    // is looked for: one missed is looked for again once the open transfers are complete.
    // One an order holds stays missing.
    let mut pending: Vec<&(i64, Vec<u8>)> = elements.iter().collect();
    let mut ids: Vec<i64> = Vec::with_capacity(pending.len());
    for _ in 0..rounds(keys) {
        if pending.is_empty() {
            break;
        }
        super::mover::finish_open(&mut redis, keys, product_id).await?;
        let mut pipe = redis::pipe();
        for (_, el) in &pending {
            for cell in keys.all_cells() {
                pipe.cmd("LREM").arg(keys.stock(cell, product_id)).arg(1).arg(el);
            }
        }
        let removed: Vec<i64> = pipe.query_async(&mut redis).await?;
        let mut missed = Vec::new();
        for (e, n) in pending.into_iter().zip(removed.chunks(keys.cells() as usize)) {
            if n.iter().sum::<i64>() > 0 {
                ids.push(e.0);
            } else {
                missed.push(e);
            }
        }
        pending = missed;
    }
    // Available in Postgres yet not in the Redis list: reserved by an order in flight.
    report.not_available += (available.len() - ids.len()) as u64;
    report.voided = mark_voided(tx, &ids).await?;
    Ok(report)
}

/// In the caller's transaction, which holds the fence.
pub async fn void_all_available(
    tx: &impl GenericClient,
    mut redis: Redis,
    keys: &Keys,
    product_id: i64,
) -> Result<VoidReport, ApiError> {
    let mut report = VoidReport::default();
    // Pass after pass until no pool and no transfer holds any: the mover may carry codes
    // into a pool already emptied.
    for _ in 0..rounds(keys) {
        super::mover::finish_open(&mut redis, keys, product_id).await?;
        for cell in keys.all_cells() {
            loop {
                let popped: Option<Vec<Vec<u8>>> = redis::cmd("LPOP")
                    .arg(keys.stock(cell, product_id))
                    .arg(VOID_ALL_CHUNK)
                    .query_async(&mut redis)
                    .await?;
                let Some(popped) = popped.filter(|p| !p.is_empty()) else {
                    break;
                };
                let ids: Vec<i64> = super::code_ids(&popped).collect();
                report.voided += mark_voided(tx, &ids).await?;
            }
        }
        let left: usize = super::mover::pool_lengths(&mut redis, keys, product_id)
            .await?
            .iter()
            .sum();
        if left == 0
            && super::mover::open_transfers(&mut redis, keys, product_id)
                .await?
                .is_empty()
        {
            break;
        }
    }
    Ok(report)
}

/// Rounds of looking for codes in the pools: one when there is one cell (no mover).
fn rounds(keys: &Keys) -> usize {
    if keys.cells() == 1 {
        1
    } else {
        4
    }
}

async fn mark_voided(client: &impl GenericClient, ids: &[i64]) -> Result<u64, ApiError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let n = client
        .execute(
            "UPDATE codes SET status = 'voided', voided_at = now() WHERE id = ANY($1) AND status = 'available'",
            &[&ids],
        )
        .await?;
    metrics::counter!("cardgate_codes_voided_total").increment(n);
    Ok(n)
}
