//! Products and their tier prices as Postgres records them, with their stock counts:
//! what the operator API creates, changes and reads. Every change commits with its audit
//! row and its `product.price_changed` events, then reaches every gateway's in-memory
//! catalogue (the parent module) through `crate::sync::changed`.

use std::collections::BTreeMap;

use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_postgres::Row;

use crate::app::App;
use crate::audit::{Actor, Audited};
use crate::callbacks::events::{self, PricesBefore, Repricing};
use crate::error::ApiError;
use crate::http::body::nullable;
use crate::http::query::rfc3339;

/// `POST /admin/v1/products`, checked by the handler.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewProduct {
    pub sku: String,
    pub name: String,
    pub face_value: i64,
    pub base_price: i64,
    #[serde(default)]
    pub tier_prices: BTreeMap<String, i64>,
    pub max_quantity: i32,
    #[serde(default = "on_sale")]
    pub status: String,
    pub low_stock_threshold: Option<i32>,
}

fn on_sale() -> String {
    "on_sale".into()
}

/// `PATCH /admin/v1/products/{sku}`: absent fields stay as they are.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductPatch {
    pub name: Option<String>,
    pub face_value: Option<i64>,
    pub base_price: Option<i64>,
    /// Replaces the whole map.
    pub tier_prices: Option<BTreeMap<String, i64>>,
    pub max_quantity: Option<i32>,
    pub status: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub low_stock_threshold: Option<Option<i32>>,
    /// Replaces the product's upstream sources (docs/api.md §8).
    pub sources: Option<Vec<crate::upstream::SourceSpec>>,
    pub source_mode: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct AdminProduct {
    pub sku: String,
    pub name: String,
    pub face_value: i64,
    pub base_price: i64,
    pub tier_prices: BTreeMap<String, i64>,
    pub max_quantity: i32,
    pub status: String,
    pub low_stock_threshold: Option<i32>,
    pub currency: String,
    pub stock: Stock,
    pub source_mode: String,
    pub sources: serde_json::Value,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Default, Serialize)]
pub struct Stock {
    /// Unsold in Postgres (includes codes reserved by orders in flight).
    pub available: i64,
    pub delivered: i64,
    pub voided: i64,
}

pub async fn create(app: &App, actor: &Actor, p: &NewProduct) -> Result<AdminProduct, ApiError> {
    let mut client = app.pg.get().await?;
    let tx = Audited::begin(&mut client, actor, "product.create", &p.sku).await?;
    let id: i64 = tx
        .query_opt(
            "INSERT INTO products (sku, name, face_value, base_price, max_quantity, status, low_stock_threshold)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (sku) DO NOTHING RETURNING id",
            &[
                &p.sku,
                &p.name,
                &p.face_value,
                &p.base_price,
                &p.max_quantity,
                &p.status,
                &p.low_stock_threshold,
            ],
        )
        .await?
        .ok_or_else(|| ApiError::Conflict("a product with this sku exists".into()))?
        .get(0);
    set_tier_prices(&*tx, id, &p.tier_prices).await?;
    tx.commit(json!({"base_price": p.base_price})).await?;
    crate::sync::changed(app).await;
    get_with(&client, app, &p.sku).await
}

async fn set_tier_prices<C: GenericClient>(
    c: &C,
    product_id: i64,
    prices: &BTreeMap<String, i64>,
) -> Result<(), ApiError> {
    c.execute("DELETE FROM product_tier_prices WHERE product_id = $1", &[&product_id])
        .await?;
    let tiers: Vec<&str> = prices.keys().map(String::as_str).collect();
    let values: Vec<i64> = prices.values().copied().collect();
    c.execute(
        "INSERT INTO product_tier_prices (product_id, tier, price) SELECT $1, t, p FROM unnest($2::text[], $3::bigint[]) AS u(t, p)",
        &[&product_id, &tiers, &values],
    )
    .await?;
    Ok(())
}

pub async fn update(app: &App, actor: &Actor, sku: &str, p: &ProductPatch) -> Result<AdminProduct, ApiError> {
    let mut client = app.pg.get().await?;
    let tx = Audited::begin(&mut client, actor, "product.update", sku).await?;
    let (set_threshold, threshold) = match p.low_stock_threshold {
        Some(t) => (true, t),
        None => (false, None),
    };
    let reprices = p.base_price.is_some() || p.tier_prices.is_some();
    let before = if reprices {
        PricesBefore::read(&*tx, sku).await?
    } else {
        PricesBefore::default()
    };
    let id: i64 = tx
        .query_opt(
            "UPDATE products SET name = coalesce($2, name), face_value = coalesce($3, face_value),
                    base_price = coalesce($4, base_price), max_quantity = coalesce($5, max_quantity),
                    status = coalesce($6, status),
                    low_stock_threshold = CASE WHEN $7 THEN $8 ELSE low_stock_threshold END,
                    updated_at = now()
             WHERE sku = $1 RETURNING id",
            &[
                &sku,
                &p.name,
                &p.face_value,
                &p.base_price,
                &p.max_quantity,
                &p.status,
                &set_threshold,
                &threshold,
            ],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("no such product"))?
        .get(0);
    if let Some(tp) = &p.tier_prices {
        set_tier_prices(&*tx, id, tp).await?;
    }
    crate::upstream::set_sources(&*tx, id, p.sources.as_deref(), p.source_mode.as_deref()).await?;
    let why = Repricing::Product {
        product_id: id,
        before: &before,
    };
    events::product_price_changed(&*tx, why, &app.config.currency).await?;
    tx.commit(
        json!({"base_price": p.base_price, "status": p.status, "tier_prices": p.tier_prices, "max_quantity": p.max_quantity}),
    )
    .await?;
    crate::sync::changed(app).await;
    get_with(&client, app, sku).await
}

pub async fn list(app: &App) -> Result<Vec<AdminProduct>, ApiError> {
    let client = app.pg.get().await?;
    query(&client, app, None).await
}

pub async fn get(app: &App, sku: &str) -> Result<AdminProduct, ApiError> {
    let client = app.pg.get().await?;
    get_with(&client, app, sku).await
}

/// The product's id (`404` for an unknown SKU).
pub async fn id_of<C: GenericClient>(c: &C, sku: &str) -> Result<i64, ApiError> {
    c.query_opt("SELECT id FROM products WHERE sku = $1", &[&sku])
        .await?
        .map(|r| r.get(0))
        .ok_or_else(|| ApiError::not_found("no such product"))
}

async fn get_with<C: GenericClient>(c: &C, app: &App, sku: &str) -> Result<AdminProduct, ApiError> {
    query(c, app, Some(sku))
        .await?
        .pop()
        .ok_or_else(|| ApiError::not_found("no such product"))
}

async fn query<C: GenericClient>(c: &C, app: &App, sku: Option<&str>) -> Result<Vec<AdminProduct>, ApiError> {
    let rows = c
        .query(
            "SELECT p.sku, p.name, p.face_value, p.base_price, p.max_quantity, p.status, p.low_stock_threshold,
                    p.created_at, p.updated_at,
                    coalesce((SELECT jsonb_object_agg(tier, price) FROM product_tier_prices WHERE product_id = p.id), '{}'),
                    (SELECT count(*) FROM codes WHERE product_id = p.id AND status = 'available'),
                    (SELECT count(*) FROM codes WHERE product_id = p.id AND status = 'delivered'),
                    (SELECT count(*) FROM codes WHERE product_id = p.id AND status = 'voided'),
                    p.source_mode,
                    coalesce((SELECT jsonb_agg(jsonb_build_object('supplier_id', s.supplier_id, 'sku', ps.upstream_sku,
                                                                  'max_unit_cost', ps.max_unit_cost, 'priority', ps.priority)
                                               ORDER BY ps.priority, s.id)
                                FROM product_sources ps JOIN suppliers s ON s.id = ps.supplier_id
                               WHERE ps.product_id = p.id), '[]')
             FROM products p WHERE $1::text IS NULL OR p.sku = $1 ORDER BY p.sku",
            &[&sku],
        )
        .await?;
    rows.iter().map(|r| product_of(r, &app.config.currency)).collect()
}

fn product_of(r: &Row, currency: &str) -> Result<AdminProduct, ApiError> {
    let tier_prices: serde_json::Value = r.get(9);
    Ok(AdminProduct {
        sku: r.get(0),
        name: r.get(1),
        face_value: r.get(2),
        base_price: r.get(3),
        max_quantity: r.get(4),
        status: r.get(5),
        low_stock_threshold: r.get(6),
        created_at: rfc3339(r.get(7)),
        updated_at: rfc3339(r.get(8)),
        tier_prices: serde_json::from_value(tier_prices).map_err(ApiError::internal)?,
        currency: currency.to_string(),
        stock: Stock {
            available: r.get(10),
            delivered: r.get(11),
            voided: r.get(12),
        },
        source_mode: r.get(13),
        sources: r.get(14),
    })
}
