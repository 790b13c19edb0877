//! Stock: streamed code import and voiding.

use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::{authorize, products::id_of};
use crate::app::App;
use crate::audit;
use crate::auth::admin::Need;
use crate::error::ApiError;
use crate::http::{body, response, Body, Ctx};
use crate::stock::import::{ImportReport, Importer};
use crate::stock::void;

/// Codes named in one void call.
const VOID_CODES_MAX: usize = 10_000;
/// Room for that many codes of the longest importable kind (512 bytes, every byte
/// escaped in JSON at worst) in one list; the usual JSON limit would refuse a list of a
/// few thousand short codes.
const VOID_BODY_MAX_BYTES: usize = VOID_CODES_MAX * (2 * 512 + 3) + 64;

pub async fn import(app: &App, ctx: &Ctx, req: Request<Incoming>, sku: &str) -> Result<Response<Body>, ApiError> {
    let (parts, body) = req.into_parts();
    let (_, actor) = authorize(app, ctx, &parts, Need::Write).await?;
    let _slot = app.bulkheads.imports.enter()?;
    if !body::content_type_is(&parts, "text/plain") {
        return Err(ApiError::UnsupportedMediaType(
            "Content-Type must be text/plain, one code per line",
        ));
    }
    let limit = app.config.http.import_body_max_bytes;
    body::refuse_declared_over(&parts, limit)?;
    let client = app.pg.get().await?;
    let product_id = id_of(&client, sku).await?;
    drop(client);
    let importer = Importer {
        pg: &app.pg,
        redis: app.redis(),
        crypto: &app.crypto,
        keys: &app.keys,
        product_id,
    };
    let mut report = ImportReport::default();
    let timeout = Duration::from_millis(app.config.http.import_read_timeout_ms);
    let done = importer.run(body, limit, timeout, &mut report).await;
    // An import cut short keeps the batches it committed: audited all the same, with what
    // went in and what stopped it (re-running it is safe: known codes are duplicates).
    if done.is_ok() || report.imported > 0 {
        let mut detail = serde_json::to_value(report).map_err(ApiError::internal)?;
        if let Err(e) = &done {
            detail["interrupted_by"] = json!(e.code());
        }
        let client = app.pg.get().await?;
        audit::record(&client, &actor, "codes.import", Some(sku), None, detail).await?;
    }
    done?;
    response::json(StatusCode::OK, &report)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VoidRequest {
    codes: Option<Vec<String>>,
    #[serde(default)]
    all_available: bool,
}

pub async fn void(app: &App, ctx: &Ctx, req: Request<Incoming>, sku: &str) -> Result<Response<Body>, ApiError> {
    let (parts, body) = req.into_parts();
    let (_, actor) = authorize(app, ctx, &parts, Need::Write).await?;
    let _slot = app.bulkheads.imports.enter()?;
    let bytes = body::read_json_body_up_to(&parts, body, &app.config.http, VOID_BODY_MAX_BYTES).await?;
    let v: VoidRequest = body::parse_json(&bytes)?;
    let client = app.pg.get().await?;
    let product_id = id_of(&client, sku).await?;
    let report = match (v.codes, v.all_available) {
        (Some(codes), false) if !codes.is_empty() && codes.len() <= VOID_CODES_MAX => {
            void::void_codes(&app.pg, app.redis(), &app.crypto, &app.keys, product_id, &codes).await?
        }
        (None, true) => void::void_all_available(&app.pg, app.redis(), &app.keys, product_id).await?,
        _ => {
            return Err(ApiError::invalid(format!(
                "give either codes (1 to {VOID_CODES_MAX}) or all_available: true"
            )))
        }
    };
    audit::record(&client, &actor, "codes.void", Some(sku), None, json!(report)).await?;
    response::json(StatusCode::OK, &report)
}
