//! Stock: streamed code import and voiding (`crate::stock`).

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::authorize;
use crate::app::App;
use crate::auth::admin::Need;
use crate::error::ApiError;
use crate::http::{body, response, Body, Ctx};
use crate::stock::void::{VoidRequest, VOID_CODES_MAX};
use crate::stock::{import, void};

/// Room for that many codes of the longest importable kind (512 bytes, every byte
/// escaped in JSON at worst) in one list; the usual JSON limit would refuse a list of a
/// few thousand short codes.
const VOID_BODY_MAX_BYTES: usize = VOID_CODES_MAX * (2 * 512 + 3) + 64;

pub async fn import(app: &App, ctx: &Ctx, req: Request<Incoming>, sku: &str) -> Result<Response<Body>, ApiError> {
    let (parts, body) = req.into_parts();
    let (_, actor) = authorize(app, ctx, &parts, Need::Write).await?;
    let _slot = app.bulkheads.imports.enter().await?;
    if !body::content_type_is(&parts, "text/plain") {
        return Err(ApiError::UnsupportedMediaType(
            "Content-Type must be text/plain, one code per line",
        ));
    }
    body::refuse_declared_over(&parts, app.config.http.import_body_max_bytes)?;
    let report = import::import(app, &actor, sku, body).await?;
    response::json(StatusCode::OK, &report)
}

pub async fn void(app: &App, ctx: &Ctx, req: Request<Incoming>, sku: &str) -> Result<Response<Body>, ApiError> {
    let (parts, body) = req.into_parts();
    let (_, actor) = authorize(app, ctx, &parts, Need::Write).await?;
    let _slot = app.bulkheads.imports.enter().await?;
    let bytes = body::read_json_body_up_to(&parts, body, &app.config.http, VOID_BODY_MAX_BYTES).await?;
    let v: VoidRequest = body::parse_json(&bytes)?;
    let report = void::void(app, &actor, sku, v).await?;
    response::json(StatusCode::OK, &report)
}
