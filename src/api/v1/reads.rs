//! Catalogue and balance reads, from memory and Redis: no Postgres on this path.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Serialize;

use super::{signed, Signed};
use crate::app::App;
use crate::catalogue::Product;
use crate::error::ApiError;
use crate::http::{response, Body, Ctx};
use crate::ratelimit::Class;

#[derive(Serialize)]
pub struct ProductView<'a> {
    sku: &'a str,
    name: &'a str,
    face_value: i64,
    unit_price: i64,
    currency: &'a str,
    available: i64,
    max_quantity: i64,
    status: &'static str,
}

fn view<'a>(app: &'a App, p: &'a Product, tier: &str, available: i64) -> ProductView<'a> {
    let tier_max = app.config.tiers.get(tier).map_or(i64::MAX, |t| t.max_quantity as i64);
    ProductView {
        sku: &p.sku,
        name: &p.name,
        face_value: p.face_value,
        unit_price: p.price_for(tier),
        currency: &app.config.currency,
        available,
        max_quantity: (p.max_quantity as i64).min(tier_max),
        status: if p.on_sale { "on_sale" } else { "off_sale" },
    }
}

/// Live stock counts, one Redis round trip for all of them.
async fn available(app: &App, products: &[&Product]) -> Result<Vec<i64>, ApiError> {
    if products.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for p in products {
        pipe.cmd("LLEN").arg(app.keys.stock(p.id));
    }
    let mut redis = app.redis();
    Ok(pipe.query_async(&mut redis).await?)
}

pub async fn products(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    signed(app, ctx, req, Class::Reads, |s: Signed| async move {
        let snapshot = app.catalogue.snapshot();
        let list: Vec<&Product> = snapshot.values().map(|p| p.as_ref()).collect();
        let counts = available(app, &list).await?;
        let tier = &s.caller.reseller.tier;
        let views: Vec<_> = list.iter().zip(counts).map(|(p, n)| view(app, p, tier, n)).collect();
        response::json(StatusCode::OK, &serde_json::json!({ "products": views }))
    })
    .await
}

pub async fn product(app: &App, ctx: &Ctx, req: Request<Incoming>, sku: &str) -> Result<Response<Body>, ApiError> {
    signed(app, ctx, req, Class::Reads, |s: Signed| async move {
        let p = app
            .catalogue
            .get(sku)
            .ok_or_else(|| ApiError::not_found("no such product"))?;
        let n = available(app, &[&p]).await?[0];
        response::json(StatusCode::OK, &view(app, &p, &s.caller.reseller.tier, n))
    })
    .await
}

pub async fn balance(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    signed(app, ctx, req, Class::Reads, |s: Signed| async move {
        let r = &s.caller.reseller;
        let mut redis = app.redis();
        let hot: Option<i64> = redis::cmd("GET")
            .arg(app.keys.balance(r.pk))
            .query_async(&mut redis)
            .await?;
        // The hot balance is what can be spent now; without it (Redis lost its state),
        // the recorded one.
        let balance = match hot {
            Some(b) => b,
            None => {
                let client = app.pg.get().await?;
                client
                    .query_one("SELECT balance FROM balances WHERE reseller_id = $1", &[&r.pk])
                    .await?
                    .get(0)
            }
        };
        response::json(
            StatusCode::OK,
            &serde_json::json!({"balance": balance, "currency": app.config.currency, "tier": r.tier}),
        )
    })
    .await
}
