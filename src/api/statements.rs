//! Statements (docs/api.md §6): `GET /v1/ledger`, a reseller's own, signed, and
//! `GET /admin/v1/resellers/{id}/ledger`, any operator role. The same query and answer
//! on both (worked out by `crate::statements`): JSON, or CSV with `Accept: text/csv`.

use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::http::request::Parts;
use hyper::{Request, Response, StatusCode};

use super::admin::authorized_head;
use super::v1::signed;
use crate::app::App;
use crate::auth::admin::Need;
use crate::auth::scopes::Scope;
use crate::error::ApiError;
use crate::http::query::Query;
use crate::http::response::{self, CsvLine};
use crate::http::{Body, Ctx};
use crate::statements::{self, Asked, Entry, Statement};

/// `GET /v1/ledger?from=&to=&limit=&cursor=`: the caller's own statement. A read like the
/// balance: no codes are shown, so nothing is audited.
pub async fn own(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let s = signed!(app, ctx, req, Scope::BalanceRead);
    let result = async {
        // Before Postgres is asked anything: a replay costs a Redis round trip, no more.
        s.spend(app).await?;
        let q = Query::parse(s.parts.uri.query())?;
        let reseller = &s.caller().reseller;
        let statement = statements::page_of_pk(app, reseller.pk, &Asked::parse(&q)?).await?;
        answer(&s.parts, &reseller.reseller_id, statement)
    }
    .await;
    s.finish(app, ctx, result).await
}

/// `GET /admin/v1/resellers/{id}/ledger`: the same, for any reseller.
pub async fn of_reseller(
    app: &App,
    ctx: &Ctx,
    req: Request<Incoming>,
    reseller_id: &str,
) -> Result<Response<Body>, ApiError> {
    let (parts, _) = authorized_head(app, ctx, req, Need::Read).await?;
    let q = Query::parse(parts.uri.query())?;
    let statement = statements::page_of(app, reseller_id, &Asked::parse(&q)?).await?;
    answer(&parts, reseller_id, statement)
}

impl CsvLine for Entry {
    fn text_cells(&mut self) -> Vec<&mut String> {
        [&mut self.order_id, &mut self.reference]
            .into_iter()
            .filter_map(Option::as_mut)
            .collect()
    }
}

/// JSON `{"entries", "next_cursor"}`, or CSV: the entries' fields as columns, the cursor
/// to the next page in `Next-Cursor` (absent on the last page).
fn answer(parts: &Parts, reseller_id: &str, statement: Statement) -> Result<Response<Body>, ApiError> {
    if !response::wants_csv(parts) {
        return response::json(StatusCode::OK, &statement);
    }
    let mut resp = response::csv(statement.entries, &format!("ledger-{reseller_id}.csv"))?;
    if let Some(v) = statement.next_cursor.and_then(|c| HeaderValue::from_str(&c).ok()) {
        resp.headers_mut().insert("next-cursor", v);
    }
    Ok(resp)
}
