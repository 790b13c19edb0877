//! Route table: a path and a method to a handler, `404`/`405` for the rest.
//!
//! Matching on path segments by hand keeps this allocation-free for the common case and
//! gives every route a fixed name, which is what the metrics are labelled with.

use std::borrow::Cow;

use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use percent_encoding::percent_decode_str;

use super::{Body, Ctx, Surface};
use crate::api;
use crate::app::App;
use crate::error::ApiError;

/// A resolved route with its path parameters (percent-decoded).
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Healthz,
    Readyz,
    Metrics,
    AdminLogin,
    AdminCreateAdmin,
    AdminPatchAdmin(String),
    AdminProducts,
    AdminCreateProduct,
    AdminProduct(String),
    AdminPatchProduct(String),
    AdminImportCodes(String),
    AdminVoidCodes(String),
    AdminSuppliers,
    AdminCreateSupplier,
    AdminSupplier(String),
    AdminResellers,
    AdminCreateReseller,
    AdminReseller(String),
    AdminPatchReseller(String),
    AdminKeys(String),
    AdminCreateKey(String),
    AdminRevokeKey(String),
    AdminRotateKey(String),
    AdminAdjustBalance(String),
    AdminResellerEvents(String),
    AdminRiskEvents,
    AdminRiskRelease(String),
    AdminResellerLedger(String),
    AdminRotateWebhookSecret(String),
    AdminRedeliverEvent(String),
    AdminAudit,
    AdminOrders,
    AdminRefundOrder(String),
    AdminReconcile,
    AdminResellersReport,
    AdminProductsReport,
    AdminRebates,
    AdminCloseRebates,
    Products,
    Product(String),
    Balance,
    Ledger,
    CreateOrder,
    FindOrder,
    BatchOrders,
    Order(String),
}

impl Route {
    /// The route's template: the metrics label, so cardinality stays bounded.
    pub fn name(&self) -> &'static str {
        match self {
            Route::Healthz => "/healthz",
            Route::Readyz => "/readyz",
            Route::Metrics => "/metrics",
            Route::AdminLogin => "/admin/v1/login",
            Route::AdminCreateAdmin => "/admin/v1/admins",
            Route::AdminPatchAdmin(_) => "/admin/v1/admins/{username}",
            Route::AdminProducts | Route::AdminCreateProduct => "/admin/v1/products",
            Route::AdminProduct(_) | Route::AdminPatchProduct(_) => "/admin/v1/products/{sku}",
            Route::AdminSuppliers | Route::AdminCreateSupplier => "/admin/v1/suppliers",
            Route::AdminSupplier(_) => "/admin/v1/suppliers/{supplier_id}",
            Route::AdminImportCodes(_) => "/admin/v1/products/{sku}/codes",
            Route::AdminVoidCodes(_) => "/admin/v1/products/{sku}/codes/void",
            Route::AdminResellers | Route::AdminCreateReseller => "/admin/v1/resellers",
            Route::AdminReseller(_) | Route::AdminPatchReseller(_) => "/admin/v1/resellers/{id}",
            Route::AdminKeys(_) | Route::AdminCreateKey(_) => "/admin/v1/resellers/{id}/keys",
            Route::AdminRevokeKey(_) => "/admin/v1/keys/{key_id}",
            Route::AdminRotateKey(_) => "/admin/v1/keys/{key_id}/rotate",
            Route::AdminAdjustBalance(_) => "/admin/v1/resellers/{id}/balance",
            Route::AdminResellerEvents(_) => "/admin/v1/resellers/{id}/events",
            Route::AdminRiskEvents => "/admin/v1/risk/events",
            Route::AdminRiskRelease(_) => "/admin/v1/resellers/{id}/risk/release",
            Route::AdminResellerLedger(_) => "/admin/v1/resellers/{id}/ledger",
            Route::AdminRotateWebhookSecret(_) => "/admin/v1/resellers/{id}/webhook_secret",
            Route::AdminRedeliverEvent(_) => "/admin/v1/events/{event_id}/redeliver",
            Route::AdminAudit => "/admin/v1/audit",
            Route::AdminOrders => "/admin/v1/orders",
            Route::AdminRefundOrder(_) => "/admin/v1/orders/{order_id}/refund",
            Route::AdminReconcile => "/admin/v1/reconcile",
            Route::AdminResellersReport => "/admin/v1/reports/resellers",
            Route::AdminProductsReport => "/admin/v1/reports/products",
            Route::AdminRebates => "/admin/v1/rebates",
            Route::AdminCloseRebates => "/admin/v1/rebates/close",
            Route::Products => "/v1/products",
            Route::Product(_) => "/v1/products/{sku}",
            Route::Balance => "/v1/balance",
            Route::Ledger => "/v1/ledger",
            Route::CreateOrder | Route::FindOrder => "/v1/orders",
            Route::BatchOrders => "/v1/orders/batch",
            Route::Order(_) => "/v1/orders/{order_id}",
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
        [Some("admin"), Some("v1"), Some(a), b, c, d] => admin(method, a, b, c, d)?,
        [Some("v1"), Some("products"), None, ..] => allow(method, GET, Route::Products)?,
        [Some("v1"), Some("products"), Some(sku), None, ..] => allow(method, GET, Route::Product(param(sku)?.into()))?,
        [Some("v1"), Some("balance"), None, ..] => allow(method, GET, Route::Balance)?,
        [Some("v1"), Some("ledger"), None, ..] => allow(method, GET, Route::Ledger)?,
        [Some("v1"), Some("orders"), None, ..] => match *method {
            Method::POST => Route::CreateOrder,
            _ => allow(method, GET_POST, Route::FindOrder)?,
        },
        // Order ids never read "batch" (crate::ids), so the name is the batch route's alone.
        [Some("v1"), Some("orders"), Some("batch"), None, ..] => allow(method, POST, Route::BatchOrders)?,
        [Some("v1"), Some("orders"), Some(id), None, ..] => allow(method, GET, Route::Order(param(id)?.into()))?,
        _ => return Err(ApiError::not_found("no such route")),
    };
    Ok(route)
}

fn admin(method: &Method, a: &str, b: Option<&str>, c: Option<&str>, d: Option<&str>) -> Result<Route, ApiError> {
    let m = method;
    Ok(match (a, b, c, d) {
        ("login", None, None, None) => allow(m, POST, Route::AdminLogin)?,
        ("admins", None, None, None) => allow(m, POST, Route::AdminCreateAdmin)?,
        ("admins", Some(u), None, None) => allow(m, PATCH, Route::AdminPatchAdmin(param(u)?.into()))?,
        ("products", None, None, None) => match *m {
            Method::POST => Route::AdminCreateProduct,
            _ => allow(m, GET_POST, Route::AdminProducts)?,
        },
        ("suppliers", None, None, None) => match *m {
            Method::POST => Route::AdminCreateSupplier,
            _ => allow(m, GET_POST, Route::AdminSuppliers)?,
        },
        ("suppliers", Some(id), None, None) => allow(m, GET, Route::AdminSupplier(param(id)?.into()))?,
        ("products", Some(sku), None, None) => match *m {
            Method::PATCH => Route::AdminPatchProduct(param(sku)?.into()),
            _ => allow(m, GET_PATCH, Route::AdminProduct(param(sku)?.into()))?,
        },
        ("products", Some(sku), Some("codes"), None) => allow(m, POST, Route::AdminImportCodes(param(sku)?.into()))?,
        ("products", Some(sku), Some("codes"), Some("void")) => {
            allow(m, POST, Route::AdminVoidCodes(param(sku)?.into()))?
        }
        ("resellers", None, None, None) => match *m {
            Method::POST => Route::AdminCreateReseller,
            _ => allow(m, GET_POST, Route::AdminResellers)?,
        },
        ("resellers", Some(id), None, None) => match *m {
            Method::PATCH => Route::AdminPatchReseller(param(id)?.into()),
            _ => allow(m, GET_PATCH, Route::AdminReseller(param(id)?.into()))?,
        },
        ("resellers", Some(id), Some("keys"), None) => match *m {
            Method::POST => Route::AdminCreateKey(param(id)?.into()),
            _ => allow(m, GET_POST, Route::AdminKeys(param(id)?.into()))?,
        },
        ("resellers", Some(id), Some("balance"), None) => allow(m, POST, Route::AdminAdjustBalance(param(id)?.into()))?,
        ("resellers", Some(id), Some("events"), None) => allow(m, GET, Route::AdminResellerEvents(param(id)?.into()))?,
        ("resellers", Some(id), Some("risk"), Some("release")) => {
            allow(m, POST, Route::AdminRiskRelease(param(id)?.into()))?
        }
        ("risk", Some("events"), None, None) => allow(m, GET, Route::AdminRiskEvents)?,
        ("resellers", Some(id), Some("ledger"), None) => allow(m, GET, Route::AdminResellerLedger(param(id)?.into()))?,
        ("resellers", Some(id), Some("webhook_secret"), None) => {
            allow(m, POST, Route::AdminRotateWebhookSecret(param(id)?.into()))?
        }
        ("events", Some(id), Some("redeliver"), None) => allow(m, POST, Route::AdminRedeliverEvent(param(id)?.into()))?,
        ("keys", Some(k), None, None) => allow(m, DELETE, Route::AdminRevokeKey(param(k)?.into()))?,
        ("keys", Some(k), Some("rotate"), None) => allow(m, POST, Route::AdminRotateKey(param(k)?.into()))?,
        ("audit", None, None, None) => allow(m, GET, Route::AdminAudit)?,
        ("orders", None, None, None) => allow(m, GET, Route::AdminOrders)?,
        ("reconcile", None, None, None) => allow(m, GET, Route::AdminReconcile)?,
        ("reports", Some("resellers"), None, None) => allow(m, GET, Route::AdminResellersReport)?,
        ("reports", Some("products"), None, None) => allow(m, GET, Route::AdminProductsReport)?,
        ("rebates", None, None, None) => allow(m, GET, Route::AdminRebates)?,
        ("rebates", Some("close"), None, None) => allow(m, POST, Route::AdminCloseRebates)?,
        ("orders", Some(id), Some("refund"), None) => allow(m, POST, Route::AdminRefundOrder(param(id)?.into()))?,
        _ => return Err(ApiError::not_found("no such route")),
    })
}

/// The methods one path answers, as the `Allow` header spells them.
struct Methods(&'static [Method], &'static str);

const GET: Methods = Methods(&[Method::GET, Method::HEAD], "GET, HEAD");
const POST: Methods = Methods(&[Method::POST], "POST");
const PATCH: Methods = Methods(&[Method::PATCH], "PATCH");
const DELETE: Methods = Methods(&[Method::DELETE], "DELETE");
const GET_POST: Methods = Methods(&[Method::GET, Method::HEAD], "GET, HEAD, POST");
const GET_PATCH: Methods = Methods(&[Method::GET, Method::HEAD], "GET, HEAD, PATCH");

fn allow(method: &Method, allowed: Methods, route: Route) -> Result<Route, ApiError> {
    if allowed.0.contains(method) {
        Ok(route)
    } else {
        Err(ApiError::MethodNotAllowed { allow: allowed.1 })
    }
}

/// A path segment decoded for use as a parameter; invalid UTF-8 is a client error.
pub fn param(seg: &str) -> Result<Cow<'_, str>, ApiError> {
    let p = percent_decode_str(seg)
        .decode_utf8()
        .map_err(|_| ApiError::invalid("path parameter is not valid UTF-8"))?;
    // Postgres text cannot hold NUL: refused here, not as a database error later.
    if p.contains('\0') {
        return Err(ApiError::invalid("path parameter holds a NUL character"));
    }
    Ok(p)
}

pub async fn dispatch(
    app: &App,
    ctx: &Ctx,
    surface: Surface,
    req: Request<Incoming>,
) -> (&'static str, Result<Response<Body>, ApiError>) {
    // Checked on the path, before the method: a route not served here is 404, never 405.
    if !surface.serves(req.uri().path()) {
        return (UNMATCHED, Err(ApiError::not_found("no such route")));
    }
    let route = match resolve(req.method(), req.uri().path()) {
        Ok(route) => route,
        Err(e) => return (UNMATCHED, Err(e)),
    };
    let name = route.name();
    use api::admin::{audit, codes, events, orders, products, rebates, reports, resellers, risk, session, suppliers};
    let result = match route {
        Route::Healthz => api::ops::healthz(),
        Route::Readyz => api::ops::readyz(app).await,
        Route::Metrics => api::ops::metrics(app),
        Route::AdminLogin => session::login(app, ctx, req).await,
        Route::AdminCreateAdmin => session::create_admin(app, ctx, req).await,
        Route::AdminPatchAdmin(u) => session::patch_admin(app, ctx, req, &u).await,
        Route::AdminProducts => products::list(app, ctx, req).await,
        Route::AdminCreateProduct => products::create(app, ctx, req).await,
        Route::AdminProduct(sku) => products::get(app, ctx, req, &sku).await,
        Route::AdminPatchProduct(sku) => products::patch(app, ctx, req, &sku).await,
        Route::AdminImportCodes(sku) => codes::import(app, ctx, req, &sku).await,
        Route::AdminSuppliers => suppliers::list(app, ctx, req).await,
        Route::AdminCreateSupplier => suppliers::create(app, ctx, req).await,
        Route::AdminSupplier(id) => suppliers::get(app, ctx, req, &id).await,
        Route::AdminVoidCodes(sku) => codes::void(app, ctx, req, &sku).await,
        Route::AdminResellers => resellers::list(app, ctx, req).await,
        Route::AdminCreateReseller => resellers::create(app, ctx, req).await,
        Route::AdminReseller(id) => resellers::get(app, ctx, req, &id).await,
        Route::AdminPatchReseller(id) => resellers::patch(app, ctx, req, &id).await,
        Route::AdminKeys(id) => resellers::list_keys(app, ctx, req, &id).await,
        Route::AdminCreateKey(id) => resellers::create_key(app, ctx, req, &id).await,
        Route::AdminRevokeKey(k) => resellers::revoke_key(app, ctx, req, &k).await,
        Route::AdminRotateKey(k) => resellers::rotate_key(app, ctx, req, &k).await,
        Route::AdminAdjustBalance(id) => resellers::adjust_balance(app, ctx, req, &id).await,
        Route::AdminResellerEvents(id) => events::list(app, ctx, req, &id).await,
        Route::AdminRiskEvents => risk::events(app, ctx, req).await,
        Route::AdminRiskRelease(id) => risk::release(app, ctx, req, &id).await,
        Route::AdminResellerLedger(id) => api::statements::of_reseller(app, ctx, req, &id).await,
        Route::AdminRotateWebhookSecret(id) => resellers::rotate_webhook_secret(app, ctx, req, &id).await,
        Route::AdminRedeliverEvent(id) => events::redeliver(app, ctx, req, &id).await,
        Route::AdminAudit => audit::list(app, ctx, req).await,
        Route::AdminOrders => orders::list(app, ctx, req).await,
        Route::AdminRefundOrder(id) => orders::refund(app, ctx, req, &id).await,
        Route::AdminReconcile => orders::reconcile(app, ctx, req).await,
        Route::AdminResellersReport => reports::resellers(app, ctx, req).await,
        Route::AdminProductsReport => reports::products(app, ctx, req).await,
        Route::AdminRebates => rebates::get(app, ctx, req).await,
        Route::AdminCloseRebates => rebates::close(app, ctx, req).await,
        Route::Products => api::v1::reads::products(app, ctx, req).await,
        Route::Product(sku) => api::v1::reads::product(app, ctx, req, &sku).await,
        Route::Balance => api::v1::reads::balance(app, ctx, req).await,
        Route::Ledger => api::statements::own(app, ctx, req).await,
        Route::CreateOrder => api::v1::orders::create(app, ctx, req).await,
        Route::FindOrder => api::v1::orders::find(app, ctx, req).await,
        Route::BatchOrders => api::v1::orders::batch(app, ctx, req).await,
        Route::Order(id) => api::v1::orders::get(app, ctx, req, &id).await,
    };
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
        assert!(matches!(resolve(&Method::GET, "*"), Err(ApiError::NotFound(_))));
        assert_eq!(resolve(&Method::POST, "/v1/orders/batch").unwrap(), Route::BatchOrders);
        assert_eq!(resolve(&Method::GET, "/v1/ledger").unwrap(), Route::Ledger);
        assert_eq!(
            resolve(&Method::GET, "/admin/v1/resellers/rs_1/ledger").unwrap(),
            Route::AdminResellerLedger("rs_1".into())
        );
        assert!(matches!(
            resolve(&Method::POST, "/v1/ledger"),
            Err(ApiError::MethodNotAllowed { allow: "GET, HEAD" })
        ));
        assert_eq!(resolve(&Method::GET, "/admin/v1/rebates").unwrap(), Route::AdminRebates);
        assert_eq!(
            resolve(&Method::POST, "/admin/v1/rebates/close").unwrap(),
            Route::AdminCloseRebates
        );
        assert!(matches!(
            resolve(&Method::GET, "/admin/v1/rebates/close"),
            Err(ApiError::MethodNotAllowed { allow: "POST" })
        ));
        for m in [Method::GET, Method::HEAD, Method::PUT, Method::DELETE] {
            assert!(
                matches!(
                    resolve(&m, "/v1/orders/batch"),
                    Err(ApiError::MethodNotAllowed { allow: "POST" })
                ),
                "{m} /v1/orders/batch"
            );
        }
    }

    #[test]
    fn params_are_percent_decoded() {
        assert_eq!(param("%E8%AF%9D%E8%B4%B9-100").unwrap(), "话费-100");
        assert!(param("%FF").is_err());
        assert!(param("a%00b").is_err());
    }
}
