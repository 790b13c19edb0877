//! The operator's order search (`GET /admin/v1/orders`): newest first, paged by cursor.

use serde_json::json;

use crate::app::App;
use crate::error::ApiError;
use crate::http::query::{page, rfc3339, Page, Window};

/// What the search filters on; every field optional.
pub struct Search<'a> {
    pub reseller_id: Option<&'a str>,
    pub sku: Option<&'a str>,
    /// `fulfilled` or `refunded`.
    pub status: Option<&'a str>,
    pub window: Window,
}

pub async fn search(app: &App, s: &Search<'_>) -> Result<Page, ApiError> {
    let w = &s.window;
    let client = app.pg.get().await?;
    let mut rows = client
        .query(
            "SELECT o.id, o.order_id, r.reseller_id, o.merchant_order_no, o.sku, o.quantity, o.unit_price, o.amount,
                    o.currency, o.status, o.created_at, o.refunded_at, o.refund_reason
               FROM orders o JOIN resellers r ON r.id = o.reseller_id
              WHERE ($1::text IS NULL OR r.reseller_id = $1) AND ($2::text IS NULL OR o.sku = $2)
                AND ($3::timestamptz IS NULL OR o.created_at >= $3) AND ($4::timestamptz IS NULL OR o.created_at < $4)
                AND ($5::text IS NULL OR o.status = $5) AND ($6::bigint IS NULL OR o.id < $6)
              ORDER BY o.id DESC LIMIT $7",
            &[
                &s.reseller_id,
                &s.sku,
                &w.from,
                &w.to,
                &s.status,
                &w.cursor,
                &(w.limit + 1),
            ],
        )
        .await?;
    let more = page(&mut rows, w.limit);
    Ok(Page::of(&rows, more, 0, |r| {
        json!({"order_id": r.get::<_, &str>(1), "reseller_id": r.get::<_, &str>(2),
               "merchant_order_no": r.get::<_, &str>(3), "sku": r.get::<_, &str>(4),
               "quantity": r.get::<_, i32>(5), "unit_price": r.get::<_, i64>(6), "amount": r.get::<_, i64>(7),
               "currency": r.get::<_, &str>(8), "status": r.get::<_, &str>(9),
               "created_at": rfc3339(r.get(10)),
               "refunded_at": r.get::<_, Option<time::OffsetDateTime>>(11).map(rfc3339),
               "refund_reason": r.get::<_, Option<&str>>(12)})
    }))
}
