//! Catalogue and balance reads, from memory and Redis: no Postgres on this path.

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Serialize;

use super::{signed, Signed};
use crate::app::App;
use crate::auth::scopes::Scope;
use crate::catalogue::Product;
use crate::error::ApiError;
use crate::http::{response, Body, Ctx};

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

/// Live stock counts, in the same Redis round trip as the nonce.
async fn available(app: &App, s: &Signed, products: &[&Product]) -> Result<Vec<i64>, ApiError> {
    // Every cell's pool counts: an order brings stock over from the others.
    let counts = products.iter().map(|p| app.pool_counts.of(&app.keys, p.id)).collect();
    let (_, lens) = s.query(app, redis::pipe(), counts).await?;
    lens.iter()
        .map(|cells| {
            cells.iter().try_fold(0i64, |sum, v| match v {
                redis::Value::Int(n) => Ok(sum + n),
                other => Err(ApiError::internal(anyhow::anyhow!(
                    "a pool count that is not a number: {other:?}"
                ))),
            })
        })
        .collect()
}

pub async fn products(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let s = signed!(app, ctx, req, Scope::CatalogueRead);
    let result = async {
        let snapshot = app.catalogue.snapshot();
        let list: Vec<&Product> = snapshot.values().map(|p| p.as_ref()).collect();
        let tier = &s.caller().reseller.tier;
        #[derive(Serialize)]
        struct Products<'a> {
            products: Vec<ProductView<'a>>,
        }
        let write = |counts: &[i64]| {
            let views: Vec<_> = list.iter().zip(counts).map(|(p, n)| view(app, p, tier, *n)).collect();
            serde_json::to_vec(&Products { products: views }).map_err(ApiError::internal)
        };
        if list.len() > app.config.redis.catalogue_live_max {
            // The nonce and token first, unless spent already: a refused read costs no count.
            if !s.nonce().spent() {
                s.query(app, redis::pipe(), Vec::new()).await?;
            }
            let ids: Vec<i64> = list.iter().map(|p| p.id).collect();
            let counted = app.catalogue_counts.of(app, &ids).await?;
            let body = counted.answer(tier, &snapshot, || write(&counted.sums).map(Bytes::from))?;
            return Ok(response::bytes(StatusCode::OK, response::JSON, body));
        }
        let counts = available(app, &s, &list).await?;
        Ok(response::bytes(StatusCode::OK, response::JSON, write(&counts)?))
    }
    .await;
    s.finish(app, ctx, result).await
}

pub async fn product(app: &App, ctx: &Ctx, req: Request<Incoming>, sku: &str) -> Result<Response<Body>, ApiError> {
    let s = signed!(app, ctx, req, Scope::CatalogueRead);
    let result = async {
        let p = app
            .catalogue
            .get(sku)
            .ok_or_else(|| ApiError::not_found("no such product"))?;
        let n = available(app, &s, &[&p]).await?[0];
        response::json(StatusCode::OK, &view(app, &p, &s.caller().reseller.tier, n))
    }
    .await;
    s.finish(app, ctx, result).await
}

pub async fn balance(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let s = signed!(app, ctx, req, Scope::BalanceRead);
    let result = async {
        let r = &s.caller().reseller;
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(app.keys.balance(r.pk));
        let (replies, _) = s.query(app, pipe, Vec::new()).await?;
        let hot: Option<i64> = redis::from_redis_value(replies.into_iter().next().unwrap_or(redis::Value::Nil))
            .map_err(ApiError::internal)?;
        // The hot balance is what can be spent now; without it (Redis lost its state),
        // the recorded one.
        let balance = match hot {
            Some(b) => b,
            None => app
                .pg_orders
                .get()
                .await?
                .query_one("SELECT balance FROM balances WHERE reseller_id = $1", &[&r.pk])
                .await?
                .get(0),
        };
        // Spend is a rollup read, not the order path's: from the general pool, so balance
        // reads can never take the connections orders commit through.
        let client = app.pg.get().await?;
        let window_days = app.config.vip.window_days;
        let spend = crate::growth::spend(
            &**client,
            r.pk,
            crate::growth::window_start(&app.config, app.clock.now()),
        )
        .await?;
        let next_tier = crate::growth::next_tier(&app.config, &r.tier).map(|(tier, upgrade_spend)| {
            serde_json::json!({"tier": tier, "upgrade_spend": upgrade_spend,
                               "remaining": upgrade_spend.saturating_sub(spend).max(0)})
        });
        response::json(
            StatusCode::OK,
            &serde_json::json!({"balance": balance, "currency": app.config.currency, "tier": r.tier,
                                "credit_limit": r.credit_limit, "available": balance.saturating_add(r.credit_limit),
                                "spend": {"window_days": window_days, "amount": spend},
                                "next_tier": next_tier}),
        )
    }
    .await;
    s.finish(app, ctx, result).await
}
