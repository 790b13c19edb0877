//! `GET /admin/v1/audit`: the audit log, newest first, paged by cursor.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json;

use super::authorize;
use crate::app::App;
use crate::auth::admin::Need;
use crate::error::ApiError;
use crate::http::query::{page, rfc3339, Query};
use crate::http::{response, Body, Ctx};

pub async fn list(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let (parts, _) = req.into_parts();
    authorize(app, ctx, &parts, Need::ReadAudit).await?;
    let _slot = app.bulkheads.reports.enter()?;
    let q = Query::parse(parts.uri.query())?;
    let limit = q.page_limit()?;
    let cursor = q.int("cursor")?;
    let client = app.pg.get().await?;
    let mut rows = client
        .query(
            "SELECT id, at, actor, actor_kind, action, target, ip, detail FROM audit_log
             WHERE ($1::text IS NULL OR actor = $1) AND ($2::text IS NULL OR action = $2)
               AND ($3::timestamptz IS NULL OR at >= $3) AND ($4::timestamptz IS NULL OR at < $4)
               AND ($5::bigint IS NULL OR id < $5)
             ORDER BY id DESC LIMIT $6",
            &[
                &q.get("actor"),
                &q.get("action"),
                &q.time("from")?,
                &q.time("to")?,
                &cursor,
                &(limit + 1),
            ],
        )
        .await?;
    let more = page(&mut rows, limit);
    let entries: Vec<_> = rows
        .iter()
        .map(|r| {
            json!({"id": r.get::<_, i64>(0), "at": rfc3339(r.get(1)), "actor": r.get::<_, &str>(2),
                   "actor_kind": r.get::<_, &str>(3), "action": r.get::<_, &str>(4),
                   "target": r.get::<_, Option<&str>>(5), "ip": r.get::<_, Option<&str>>(6),
                   "detail": r.get::<_, serde_json::Value>(7)})
        })
        .collect();
    let next_cursor = more
        .then(|| rows.last().map(|r| r.get::<_, i64>(0).to_string()))
        .flatten();
    response::json(StatusCode::OK, &json!({"entries": entries, "next_cursor": next_cursor}))
}
