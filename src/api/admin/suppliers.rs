//! Suppliers (docs/api.md §8): created by admins only, their secrets sealed and never
//! shown again; `crate::upstream` records them and buys from them.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json;

use super::{authorized_head, authorized_json};
use crate::app::App;
use crate::auth::admin::Need;
use crate::error::ApiError;
use crate::http::{response, Body, Ctx};
use crate::upstream::{self, NewSupplier};

pub async fn create(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    // Who may buy with the platform's money upstream: admins only.
    let (actor, s): (_, NewSupplier) = authorized_json(app, ctx, req, Need::ManageAdmins).await?;
    let supplier = upstream::create_supplier(app, &actor, &s).await?;
    response::json(StatusCode::CREATED, &supplier)
}

pub async fn list(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    authorized_head(app, ctx, req, Need::Read).await?;
    let suppliers = upstream::list_suppliers(app, None).await?;
    response::json(StatusCode::OK, &json!({"suppliers": suppliers}))
}

pub async fn get(app: &App, ctx: &Ctx, req: Request<Incoming>, id: &str) -> Result<Response<Body>, ApiError> {
    authorized_head(app, ctx, req, Need::Read).await?;
    let supplier = upstream::list_suppliers(app, Some(id))
        .await?
        .pop()
        .ok_or_else(|| ApiError::not_found("no such supplier"))?;
    response::json(StatusCode::OK, &supplier)
}
