//! Catalogue: products, their tier prices and stock counts.

use std::collections::BTreeMap;

use deadpool_postgres::GenericClient;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_postgres::Row;

use super::{authorize, authorized_json, check_name, nullable};
use crate::app::App;
use crate::audit;
use crate::auth::admin::Need;
use crate::error::ApiError;
use crate::http::query::rfc3339;
use crate::http::{response, Body, Ctx};
use crate::money;

pub const PRODUCT_MAX_QUANTITY: i32 = 10_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewProduct {
    sku: String,
    name: String,
    face_value: i64,
    base_price: i64,
    #[serde(default)]
    tier_prices: BTreeMap<String, i64>,
    max_quantity: i32,
    #[serde(default = "on_sale")]
    status: String,
    low_stock_threshold: Option<i32>,
}

fn on_sale() -> String {
    "on_sale".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProductPatch {
    name: Option<String>,
    face_value: Option<i64>,
    base_price: Option<i64>,
    /// Replaces the whole map.
    tier_prices: Option<BTreeMap<String, i64>>,
    max_quantity: Option<i32>,
    status: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    low_stock_threshold: Option<Option<i32>>,
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

pub fn valid_sku(sku: &str) -> bool {
    (1..=64).contains(&sku.chars().count())
        && !sku
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "/?#%\\".contains(c))
}

fn check_status(s: &str) -> Result<(), ApiError> {
    if s != "on_sale" && s != "off_sale" {
        return Err(ApiError::invalid("status must be on_sale or off_sale"));
    }
    Ok(())
}

fn check_max_quantity(q: i32) -> Result<(), ApiError> {
    if !(1..=PRODUCT_MAX_QUANTITY).contains(&q) {
        return Err(ApiError::invalid(format!(
            "max_quantity must be 1 to {PRODUCT_MAX_QUANTITY}"
        )));
    }
    Ok(())
}

fn check_tier_prices(app: &App, prices: &BTreeMap<String, i64>) -> Result<(), ApiError> {
    for (tier, price) in prices {
        if !app.config.tiers.contains_key(tier) {
            return Err(ApiError::invalid(format!("tier_prices: unknown tier {tier:?}")));
        }
        money::check_non_negative(&format!("tier_prices.{tier}"), *price)?;
    }
    Ok(())
}

fn check_threshold(t: Option<i32>) -> Result<(), ApiError> {
    if t.is_some_and(|t| t < 0) {
        return Err(ApiError::invalid("low_stock_threshold must be zero or more"));
    }
    Ok(())
}

pub async fn create(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let (actor, p): (_, NewProduct) = authorized_json(app, ctx, req, Need::Write).await?;
    if !valid_sku(&p.sku) {
        return Err(ApiError::invalid(
            "sku must be 1 to 64 characters without whitespace, / ? # % or \\",
        ));
    }
    check_name(&p.name)?;
    money::check_non_negative("face_value", p.face_value)?;
    money::check_non_negative("base_price", p.base_price)?;
    check_tier_prices(app, &p.tier_prices)?;
    check_max_quantity(p.max_quantity)?;
    check_status(&p.status)?;
    check_threshold(p.low_stock_threshold)?;

    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
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
    set_tier_prices(&tx, id, &p.tier_prices).await?;
    audit::record(
        &tx,
        &actor,
        "product.create",
        Some(&p.sku),
        None,
        json!({"base_price": p.base_price}),
    )
    .await?;
    tx.commit().await?;
    crate::sync::changed(app).await;
    let product = load(&client, app, &p.sku)
        .await?
        .ok_or_else(|| ApiError::not_found("no such product"))?;
    response::json(StatusCode::CREATED, &product)
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

pub async fn patch(app: &App, ctx: &Ctx, req: Request<Incoming>, sku: &str) -> Result<Response<Body>, ApiError> {
    let (actor, p): (_, ProductPatch) = authorized_json(app, ctx, req, Need::Write).await?;
    if let Some(n) = &p.name {
        check_name(n)?;
    }
    for (field, v) in [("face_value", p.face_value), ("base_price", p.base_price)] {
        if let Some(v) = v {
            money::check_non_negative(field, v)?;
        }
    }
    if let Some(tp) = &p.tier_prices {
        check_tier_prices(app, tp)?;
    }
    if let Some(q) = p.max_quantity {
        check_max_quantity(q)?;
    }
    if let Some(s) = &p.status {
        check_status(s)?;
    }
    if let Some(t) = p.low_stock_threshold {
        check_threshold(t)?;
    }
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let (set_threshold, threshold) = match p.low_stock_threshold {
        Some(t) => (true, t),
        None => (false, None),
    };
    let reprices = p.base_price.is_some() || p.tier_prices.is_some();
    // What each reseller with a callback paid before, for product.price_changed.
    let (before_resellers, before_prices): (Vec<i64>, Vec<i64>) = if reprices {
        tx.query(
            "SELECT cp.reseller_id, cp.price FROM products p CROSS JOIN LATERAL callback_prices(p.id) cp WHERE p.sku = $1",
            &[&sku],
        )
        .await?
        .iter()
        .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
        .unzip()
    } else {
        Default::default()
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
        set_tier_prices(&tx, id, tp).await?;
    }
    if !before_resellers.is_empty() {
        tx.execute(
            "INSERT INTO events (reseller_id, type, data)
             SELECT n.reseller_id, 'product.price_changed',
                    jsonb_build_object('sku', p.sku, 'name', p.name, 'price', n.price, 'previous_price', o.price,
                                       'currency', $4::text)
               FROM products p CROSS JOIN LATERAL callback_prices(p.id) n
               JOIN unnest($2::bigint[], $3::bigint[]) AS o(r, price) ON o.r = n.reseller_id
              WHERE p.id = $1 AND n.price <> o.price",
            &[&id, &before_resellers, &before_prices, &app.config.currency],
        )
        .await?;
    }
    audit::record(
        &tx,
        &actor,
        "product.update",
        Some(sku),
        None,
        json!({"base_price": p.base_price, "status": p.status, "tier_prices": p.tier_prices, "max_quantity": p.max_quantity}),
    )
    .await?;
    tx.commit().await?;
    crate::sync::changed(app).await;
    let product = load(&client, app, sku)
        .await?
        .ok_or_else(|| ApiError::not_found("no such product"))?;
    response::json(StatusCode::OK, &product)
}

pub async fn list(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let (parts, _) = req.into_parts();
    authorize(app, ctx, &parts, Need::Read).await?;
    let client = app.pg.get().await?;
    let products = query(&client, app, None).await?;
    response::json(StatusCode::OK, &json!({"products": products}))
}

pub async fn get(app: &App, ctx: &Ctx, req: Request<Incoming>, sku: &str) -> Result<Response<Body>, ApiError> {
    let (parts, _) = req.into_parts();
    authorize(app, ctx, &parts, Need::Read).await?;
    let client = app.pg.get().await?;
    let product = load(&client, app, sku)
        .await?
        .ok_or_else(|| ApiError::not_found("no such product"))?;
    response::json(StatusCode::OK, &product)
}

/// The product's id, if the SKU exists.
pub async fn id_of<C: GenericClient>(c: &C, sku: &str) -> Result<i64, ApiError> {
    c.query_opt("SELECT id FROM products WHERE sku = $1", &[&sku])
        .await?
        .map(|r| r.get(0))
        .ok_or_else(|| ApiError::not_found("no such product"))
}

async fn load<C: GenericClient>(c: &C, app: &App, sku: &str) -> Result<Option<AdminProduct>, ApiError> {
    Ok(query(c, app, Some(sku)).await?.pop())
}

async fn query<C: GenericClient>(c: &C, app: &App, sku: Option<&str>) -> Result<Vec<AdminProduct>, ApiError> {
    let rows = c
        .query(
            "SELECT p.sku, p.name, p.face_value, p.base_price, p.max_quantity, p.status, p.low_stock_threshold,
                    p.created_at, p.updated_at,
                    coalesce((SELECT jsonb_object_agg(tier, price) FROM product_tier_prices WHERE product_id = p.id), '{}'),
                    (SELECT count(*) FROM codes WHERE product_id = p.id AND status = 'available'),
                    (SELECT count(*) FROM codes WHERE product_id = p.id AND status = 'delivered'),
                    (SELECT count(*) FROM codes WHERE product_id = p.id AND status = 'voided')
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
    })
}
