//! Route table: a path and a method to a handler, `404`/`405` for the rest.
//!
//! Matching on path segments by hand keeps this allocation-free for the common case and
//! gives every route a fixed name, which is what the metrics are labelled with.

use std::borrow::Cow;

use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use percent_encoding::percent_decode_str;

use super::{Body, Ctx};
use crate::api;
use crate::app::App;
use crate::error::ApiError;

/// A resolved route with its path parameters (percent-decoded).
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Healthz,
    Readyz,
    Metrics,
}

impl Route {
    /// The route's template: the metrics label, so cardinality stays bounded.
    pub fn name(&self) -> &'static str {
        match self {
            Route::Healthz => "/healthz",
            Route::Readyz => "/readyz",
            Route::Metrics => "/metrics",
        }
    }
}

const UNMATCHED: &str = "unmatched";

/// Resolves a method and path, or says why not (`404` unknown path, `405` known path).
pub fn resolve(method: &Method, path: &str) -> Result<Route, ApiError> {
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| ApiError::not_found("no such route"))?;
    let mut segs = rest.split('/');
    let s: [Option<&str>; 6] = std::array::from_fn(|_| segs.next());
    if segs.next().is_some() {
        return Err(ApiError::not_found("no such route"));
    }
    let route = match s {
        [Some("healthz"), None, ..] => allow(method, GET, Route::Healthz)?,
        [Some("readyz"), None, ..] => allow(method, GET, Route::Readyz)?,
        [Some("metrics"), None, ..] => allow(method, GET, Route::Metrics)?,
        _ => return Err(ApiError::not_found("no such route")),
    };
    Ok(route)
}

/// The methods one path answers, as the `Allow` header spells them.
struct Methods(&'static [Method], &'static str);

const GET: Methods = Methods(&[Method::GET, Method::HEAD], "GET, HEAD");

fn allow(method: &Method, allowed: Methods, route: Route) -> Result<Route, ApiError> {
    if allowed.0.contains(method) {
        Ok(route)
    } else {
        Err(ApiError::MethodNotAllowed { allow: allowed.1 })
    }
}

/// A path segment decoded for use as a parameter; invalid UTF-8 is a client error.
#[allow(dead_code)]
pub fn param(seg: &str) -> Result<Cow<'_, str>, ApiError> {
    percent_decode_str(seg)
        .decode_utf8()
        .map_err(|_| ApiError::invalid("path parameter is not valid UTF-8"))
}

pub async fn dispatch(
    app: &App,
    ctx: &Ctx,
    req: Request<Incoming>,
) -> (&'static str, Result<Response<Body>, ApiError>) {
    let route = match resolve(req.method(), req.uri().path()) {
        Ok(route) => route,
        Err(e) => return (UNMATCHED, Err(e)),
    };
    let name = route.name();
    let result = match route {
        Route::Healthz => api::ops::healthz(),
        Route::Readyz => api::ops::readyz(app).await,
        Route::Metrics => api::ops::metrics(app),
    };
    let _ = ctx;
    (name, result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_known_routes_and_refuses_the_rest() {
        assert_eq!(resolve(&Method::GET, "/healthz").unwrap(), Route::Healthz);
        assert_eq!(resolve(&Method::HEAD, "/readyz").unwrap(), Route::Readyz);
        assert!(matches!(
            resolve(&Method::POST, "/healthz"),
            Err(ApiError::MethodNotAllowed { .. })
        ));
        assert!(matches!(
            resolve(&Method::GET, "/healthz/x"),
            Err(ApiError::NotFound(_))
        ));
        assert!(matches!(
            resolve(&Method::GET, "/a/b/c/d/e/f/g"),
            Err(ApiError::NotFound(_))
        ));
        assert!(matches!(
            resolve(&Method::GET, "*"),
            Err(ApiError::NotFound(_))
        ));
    }

    #[test]
    fn params_are_percent_decoded() {
        assert_eq!(param("%E8%AF%9D%E8%B4%B9-100").unwrap(), "话费-100");
        assert!(param("%FF").is_err());
    }
}
