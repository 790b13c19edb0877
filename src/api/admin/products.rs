//! Catalogue: products, their tier prices and stock counts. The requests are parsed and
//! checked here; `crate::catalogue::products` records them.

use std::collections::BTreeMap;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json;

use super::{authorized_head, authorized_json, check_name};
use crate::app::App;
use crate::auth::admin::Need;
use crate::catalogue::products::{self, NewProduct, ProductPatch};
use crate::error::ApiError;
use crate::http::{response, Body, Ctx};
use crate::money;

pub const PRODUCT_MAX_QUANTITY: i32 = 10_000;

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
    let product = products::create(app, &actor, &p).await?;
    response::json(StatusCode::CREATED, &product)
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
    let product = products::update(app, &actor, sku, &p).await?;
    response::json(StatusCode::OK, &product)
}

pub async fn list(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    authorized_head(app, ctx, req, Need::Read).await?;
    let products = products::list(app).await?;
    response::json(StatusCode::OK, &json!({"products": products}))
}

pub async fn get(app: &App, ctx: &Ctx, req: Request<Incoming>, sku: &str) -> Result<Response<Body>, ApiError> {
    authorized_head(app, ctx, req, Need::Read).await?;
    response::json(StatusCode::OK, &products::get(app, sku).await?)
}
