//! `POST /v1/orders`, `POST /v1/orders/batch`, `GET /v1/orders/{order_id}` and
//! `GET /v1/orders?merchant_order_no=` (docs/api.md §3).

use std::collections::HashSet;

use futures_util::future::join_all;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

use super::signed;
use crate::app::App;
use crate::audit::{self, Actor};
use crate::auth::reseller::Caller;
use crate::auth::scopes::Scope;
use crate::error::ApiError;
use crate::http::query::Query;
use crate::http::{body, response, Body, Ctx};
use crate::orders::{self, By, Order, OrderRequest, Placed};

/// The contract's ceiling on one batch (docs/api.md §3); a tier's `max_batch` may be lower.
pub const BATCH_MAX: usize = 100;

pub async fn create(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let s = signed!(app, ctx, req, Scope::OrdersWrite);
    let result = async {
        let order = OrderRequest::parse(&body::parse_json::<Value>(&s.body)?)?;
        match orders::place(app, s.caller(), &order, Some(s.nonce())).await? {
            Placed::Created(o) => response::json(StatusCode::CREATED, &o),
            Placed::Accepted(o) => response::json(StatusCode::ACCEPTED, &o),
            Placed::Replayed(o) => {
                reveal(app, s.caller(), &o, "replay").await?;
                let mut resp = response::json(StatusCode::OK, &o)?;
                response::mark_replayed(&mut resp);
                Ok(resp)
            }
        }
    }
    .await;
    s.finish(app, ctx, result).await
}

fn batch_cap(app: &App, tier: &str) -> usize {
    app.config
        .tiers
        .get(tier)
        .map_or(0, |t| (t.max_batch as usize).min(BATCH_MAX))
}

/// A merchant_order_no named by two items of a batch. Over every item that names one,
/// valid or not: a malformed copy of a number is still a duplicate, and the batch is
/// refused whole.
fn twice(items: &[Value]) -> Option<&str> {
    let mut seen = HashSet::new();
    items
        .iter()
        .filter_map(|i| i.get("merchant_order_no")?.as_str())
        .find(|mon| !seen.insert(*mon))
}

pub async fn batch(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    // One write token per order. The count is read from the body before it is checked;
    // a body that is not a batch the caller's tier may send (not JSON as parsed below,
    // another field, no orders, too many, a number twice) costs one token and is refused
    // below, not charged for orders that will never run.
    let count = |b: &[u8], tier: &str| {
        body::parse_json::<Value>(b)
            .ok()
            .and_then(|v| {
                let o = v.as_object().filter(|o| o.keys().all(|k| k == "orders"))?;
                let items = o.get("orders")?.as_array()?;
                let runs = (1..=batch_cap(app, tier)).contains(&items.len()) && twice(items).is_none();
                runs.then_some(items.len())
            })
            .unwrap_or(1) as u32
    };
    let s = signed!(app, ctx, req, Scope::OrdersWrite, count);
    let result = async {
        // Before anything: the orders below run concurrently, none can carry the nonce,
        // so the nonce is spent here, and the batch's tokens taken with it, all or none.
        s.spend(app).await?;
        let v: Value = body::parse_json(&s.body)?;
        if let Some(o) = v.as_object() {
            orders::refuse_unknown(o, &["orders"])?;
        }
        let cap = batch_cap(app, &s.caller().reseller.tier);
        let items = v
            .get("orders")
            .and_then(Value::as_array)
            .filter(|a| (1..=cap).contains(&a.len()))
            .ok_or_else(|| ApiError::invalid(format!("orders: an array of 1 to {cap} orders")))?;
        if let Some(mon) = twice(items) {
            return Err(ApiError::invalid(format!(
                "orders: merchant_order_no {mon} appears twice; nothing was processed"
            )));
        }
        let parsed: Vec<Result<OrderRequest, ApiError>> = items.iter().map(OrderRequest::parse).collect();
        // Concurrently, so the whole batch shares the ledger writer's commits.
        let caller = s.caller();
        let placed = join_all(parsed.iter().map(|p| async move {
            match p {
                Ok(o) => orders::place(app, caller, o, None).await,
                Err(e) => Err(ApiError::invalid(e.to_string())),
            }
        }))
        .await;
        // A replay shows codes again, so it is audited first; an order whose audit cannot
        // be written is that order's error, its codes withheld, not the whole batch's.
        let caller = s.caller();
        let placed = join_all(placed.into_iter().map(|outcome| async move {
            match outcome {
                Ok(Placed::Replayed(o)) => reveal(app, caller, &o, "replay").await.map(|()| Placed::Replayed(o)),
                other => other,
            }
        }))
        .await;
        let mut results = Vec::with_capacity(items.len());
        for ((item, p), outcome) in items.iter().zip(&parsed).zip(placed) {
            let mon = match p {
                Ok(o) => json!(o.merchant_order_no),
                Err(_) => item.get("merchant_order_no").cloned().unwrap_or(Value::Null),
            };
            results.push(match outcome {
                Ok(Placed::Created(o)) => json!({"merchant_order_no": mon, "status": 201, "order": o}),
                Ok(Placed::Replayed(o)) => json!({"merchant_order_no": mon, "status": 200, "order": o}),
                Ok(Placed::Accepted(o)) => json!({"merchant_order_no": mon, "status": 202, "order": o}),
                Err(e) => {
                    if let ApiError::Internal(cause) = &e {
                        tracing::error!(error = format!("{cause:#}"), request_id = %ctx.request_id, "batch order failed");
                    }
                    json!({"merchant_order_no": mon, "status": e.status().as_u16(),
                           "error": {"code": e.code(), "message": e.client_message()}})
                }
            });
        }
        response::json(StatusCode::OK, &json!({ "results": results }))
    }
    .await;
    s.finish(app, ctx, result).await
}

pub async fn get(app: &App, ctx: &Ctx, req: Request<Incoming>, order_id: &str) -> Result<Response<Body>, ApiError> {
    let s = signed!(app, ctx, req, Scope::OrdersRead);
    let result = async {
        // Before the order is loaded, its codes decrypted and the reveal audited: a replay
        // must cost nothing and leave no trace of a second reveal.
        s.spend(app).await?;
        let o = orders::load(app, s.caller().reseller.pk, By::OrderId(order_id))
            .await?
            .ok_or_else(|| ApiError::not_found("no such order"))?;
        reveal(app, s.caller(), &o, "get").await?;
        response::json(StatusCode::OK, &o)
    }
    .await;
    s.finish(app, ctx, result).await
}

pub async fn find(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let s = signed!(app, ctx, req, Scope::OrdersRead);
    let result = async {
        // First, as in `get`: nothing is loaded or revealed for a replay.
        s.spend(app).await?;
        let q = Query::parse(s.parts.uri.query())?;
        let mon = q
            .get("merchant_order_no")
            .filter(|m| orders::valid_merchant_order_no(m))
            .ok_or_else(|| {
                ApiError::invalid("merchant_order_no: required, 1 to 64 characters of A-Z a-z 0-9 _ . : -")
            })?;
        let reseller = &s.caller().reseller;
        let Some(o) = orders::load(app, reseller.pk, By::MerchantOrderNo(mon)).await? else {
            // Reserved but not yet committed: say so rather than "no such order".
            let mut redis = app.redis();
            let state: Option<String> = redis::cmd("HGET")
                .arg(app.keys.idempotency(reseller.pk, mon))
                .arg("state")
                .query_async(&mut redis)
                .await?;
            return Err(match state.as_deref() {
                Some("pending") => ApiError::OrderInProgress,
                _ => ApiError::not_found("no such order"),
            });
        };
        reveal(app, s.caller(), &o, "get").await?;
        response::json(StatusCode::OK, &o)
    }
    .await;
    s.finish(app, ctx, result).await
}

/// Every answer that shows an order's codes again is audited.
async fn reveal(app: &App, caller: &Caller, o: &Order, via: &str) -> Result<(), ApiError> {
    let client = app.pg_orders.get().await?;
    audit::record(
        &client,
        &Actor::reseller(&caller.reseller.reseller_id, caller.ip),
        "order.reveal",
        Some(&o.order_id),
        None,
        json!({"via": via, "codes": o.codes.len(), "merchant_order_no": o.merchant_order_no}),
    )
    .await?;
    Ok(())
}
