//! `GET /admin/v1/audit`: the audit log, newest first, paged by cursor (`audit::search`).

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json;

use super::authorized_head;
use crate::app::App;
use crate::audit::{self, Search};
use crate::auth::admin::Need;
use crate::error::ApiError;
use crate::http::query::{Query, Window};
use crate::http::{response, Body, Ctx};

pub async fn list(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let (parts, _) = authorized_head(app, ctx, req, Need::ReadAudit).await?;
    let _slot = app.bulkheads.reports.enter().await?;
    let q = Query::parse(parts.uri.query())?;
    let limit = q.page_limit()?;
    let cursor = q.int("cursor")?;
    let search = Search {
        actor: q.get("actor"),
        action: q.get("action"),
        window: Window {
            from: q.time("from")?,
            to: q.time("to")?,
            cursor,
            limit,
        },
    };
    let found = audit::search(app, &search).await?;
    response::json(
        StatusCode::OK,
        &json!({"entries": found.items, "next_cursor": found.next_cursor}),
    )
}
