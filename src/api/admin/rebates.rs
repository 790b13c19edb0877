//! `GET /admin/v1/rebates?month=` (any role) and `POST /admin/v1/rebates/close` (admin
//! only): a month's rebates, worked out and credited by `crate::rebates`.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;

use super::{authorized_head, authorized_json};
use crate::app::App;
use crate::auth::admin::Need;
use crate::error::ApiError;
use crate::http::query::Query;
use crate::http::{response, Body, Ctx};
use crate::rebates::{self, Month};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CloseBody {
    month: String,
}

pub async fn get(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let (parts, _) = authorized_head(app, ctx, req, Need::Read).await?;
    // An open month is summed from the rollups, as a report is.
    let _slot = app.bulkheads.reports.enter().await?;
    let q = Query::parse(parts.uri.query())?;
    let month = Month::parse(q.get("month").unwrap_or_default())?;
    response::json(StatusCode::OK, &rebates::preview(app, month).await?)
}

pub async fn close(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let (actor, body): (_, CloseBody) = authorized_json(app, ctx, req, Need::CloseRebates).await?;
    let month = Month::parse(&body.month)?;
    let closed = rebates::close(app, &actor, month).await?;
    let mut resp = response::json(StatusCode::OK, &closed)?;
    if closed.replayed {
        response::mark_replayed(&mut resp);
    }
    Ok(resp)
}
