//! Operations endpoints (docs/api.md §5): unsigned, for load balancers and Prometheus.

use std::time::Duration;

use hyper::header::HeaderValue;
use hyper::{Response, StatusCode};
use serde_json::json;

use crate::app::App;
use crate::error::ApiError;
use crate::http::{response, Body};

/// How long a readiness probe waits for each store.
const READY_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

pub fn healthz() -> Result<Response<Body>, ApiError> {
    response::json(StatusCode::OK, &json!({"status": "ok"}))
}

pub async fn readyz(app: &App) -> Result<Response<Body>, ApiError> {
    let mut redis = app.redis();
    let redis_epoch = tokio::time::timeout(READY_PROBE_TIMEOUT, crate::rebuild::redis_epoch(&mut redis, app)).await;
    let (redis_ok, rebuilt) = match redis_epoch {
        Ok(Ok(epoch)) => (true, epoch.is_some()),
        _ => (false, false),
    };
    // The probe's verdict (at most half a second old) rather than a pool connection per
    // call: a flood of probes cannot take connections, nor a busy pool read as down.
    let pg_ok = app.health.postgres_up();
    let what = match (redis_ok, pg_ok) {
        // Redis answers but has lost its state: nothing is sold until it is rebuilt.
        (true, true) if !rebuilt => "redis (being rebuilt from postgres)",
        (true, true) => {
            return response::json(
                StatusCode::OK,
                &json!({"status": "ready", "redis": "ok", "postgres": "ok"}),
            )
        }
        (false, true) => "redis",
        (true, false) => "postgres",
        (false, false) => "redis and postgres",
    };
    Err(ApiError::Unavailable {
        what,
        retry_after_secs: 1,
    })
}

pub fn metrics(app: &App) -> Result<Response<Body>, ApiError> {
    let text = app.metrics.render();
    Ok(response::bytes(
        StatusCode::OK,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        text,
    ))
}
