//! Operator reports (docs/api.md §4, "Reports"): reseller loyalty and product sales over a range
//! `[from, to)`; rendered as JSON or CSV by `api/admin/reports.rs`.
//!
//! Whole UTC days come from the daily rollups (`reseller_daily`, `product_daily` in
//! migrations/V1__baseline.sql) and only the partial days at the edges from `orders`, so
//! the cost follows the number of days and resellers, not of orders. Sales are the orders
//! fulfilled and not refunded: one being bought upstream counts once it is fulfilled
//! (migrations/V13), one that fails never. The products report adds what upstream-filled
//! sales cost (migrations/V9__upstream_reports.sql).

use serde::Serialize;
use time::{Duration, OffsetDateTime, Time};

use crate::app::App;
use crate::error::ApiError;
use crate::http::query::{rfc3339, Query};

const DEFAULT_DAYS: i64 = 30;
const SECONDS_PER_DAY: f64 = 86_400.0;
/// A further order within this many days makes a buying day a repeat.
const REPEAT_WITHIN_DAYS: i32 = 30;
/// Churn risk: the time since the last order exceeds this many usual gaps.
const CHURN_GAPS: f64 = 3.0;

/// The range split into what the rollup answers and what `orders` must.
pub struct Range {
    /// When the report was asked for: ranges default to end here, and what lies past it
    /// has not happened yet.
    now: OffsetDateTime,
    pub from: OffsetDateTime,
    pub to: OffsetDateTime,
    /// Whole days `[first, end)`, empty when the range holds none.
    whole: (time::Date, time::Date),
    /// Partial days before and after the whole ones (either may be empty).
    edges: [(OffsetDateTime, OffsetDateTime); 2],
}

impl Range {
    pub fn parse(q: &Query, now: OffsetDateTime) -> Result<Range, ApiError> {
        // `Query::time` answers in UTC and within years it can add days to; the
        // arithmetic is checked all the same, so no time can panic it.
        let out_of_range = || ApiError::invalid("from and to must leave a range of representable times");
        let to = q.time("to")?.unwrap_or(now);
        let from = match q.time("from")? {
            Some(f) => f,
            None => to.checked_sub(Duration::days(DEFAULT_DAYS)).ok_or_else(out_of_range)?,
        };
        if from >= to {
            return Err(ApiError::invalid("from must be before to"));
        }
        let midnight = |t: OffsetDateTime| t.replace_time(Time::MIDNIGHT);
        let first = if midnight(from) == from {
            from
        } else {
            midnight(from).checked_add(Duration::days(1)).ok_or_else(out_of_range)?
        };
        let end = midnight(to);
        Ok(if first < end {
            Range {
                now,
                from,
                to,
                whole: (first.date(), end.date()),
                edges: [(from, first), (end, to)],
            }
        } else {
            Range {
                now,
                from,
                to,
                whole: (first.date(), first.date()),
                edges: [(from, to), (to, to)],
            }
        })
    }

    /// The range up to now: a range ending in the future has not happened yet.
    fn elapsed_days(&self) -> f64 {
        let end = self.to.min(self.now);
        ((end - self.from).as_seconds_f64() / SECONDS_PER_DAY).max(0.0)
    }
}

/// Sales (fulfilled orders) in the range as `(day, <key>, orders, codes,
/// amount)` rows, from the rollup of `key` (`reseller_id` or `product_id`) and the edges
/// from `orders`, with parameters `$1`..`$6` as `rows_params` orders them. Each edge is
/// one scan of a partial day through the BRIN index on `created_at`, which costs the
/// order path next to nothing, where a B-tree per key would cost every order one more
/// index entry.
///
/// Per product, each row adds `upstream_orders, upstream_amount, cost, refunded_cost`.
/// On edge days they come from the fulfilled purchases placed then (a partial index on
/// the order's time; purchases are far fewer than orders), each joined to its order to
/// see whether a refund took its sale out.
fn rows(key: &str) -> String {
    let products = key == "product_id";
    let (rollup, upstream, none) = if products {
        (
            "product_daily",
            ", upstream_orders, upstream_amount, cost, refunded_cost",
            ", 0, 0, 0, 0",
        )
    } else {
        ("reseller_daily", "", "")
    };
    let edge = |from: &str, to: &str| {
        format!(
            "SELECT (created_at AT TIME ZONE 'UTC')::date, {key}, count(*), sum(quantity), sum(amount){none}
               FROM orders
              WHERE status = 'fulfilled' AND created_at >= {from} AND created_at < {to}
              GROUP BY 1, 2"
        )
    };
    let bought = |from: &str, to: &str| {
        format!(
            " UNION ALL
             SELECT (p.order_created_at AT TIME ZONE 'UTC')::date, p.product_id, 0, 0, 0,
                    count(*) FILTER (WHERE o.status = 'fulfilled'),
                    coalesce(sum(o.amount) FILTER (WHERE o.status = 'fulfilled'), 0),
                    coalesce(sum(p.cost) FILTER (WHERE o.status = 'fulfilled'), 0),
                    coalesce(sum(p.cost) FILTER (WHERE o.status = 'refunded'), 0)
               FROM purchases p JOIN orders o ON o.order_id = p.order_id
              WHERE p.state = 'fulfilled' AND p.order_created_at >= {from} AND p.order_created_at < {to}
              GROUP BY 1, 2"
        )
    };
    let mut sql = format!(
        "SELECT day, {key}, orders, codes, amount{upstream} FROM {rollup} WHERE day >= $1 AND day < $2
         UNION ALL {} UNION ALL {}",
        edge("$3", "$4"),
        edge("$5", "$6")
    );
    if products {
        sql.push_str(&bought("$3", "$4"));
        sql.push_str(&bought("$5", "$6"));
    }
    sql
}

fn rows_params(r: &Range) -> [&(dyn tokio_postgres::types::ToSql + Sync); 6] {
    [
        &r.whole.0,
        &r.whole.1,
        &r.edges[0].0,
        &r.edges[0].1,
        &r.edges[1].0,
        &r.edges[1].1,
    ]
}

#[derive(Serialize, Default)]
pub struct ResellerLine {
    pub reseller_id: String,
    pub name: String,
    pub tier: String,
    pub orders: i64,
    pub codes: i64,
    pub amount: i64,
    pub currency: String,
    /// Money, so whole minor units like every amount (rounded to the nearest).
    pub average_order_value: Option<i64>,
    pub active_days: i64,
    pub repeat_purchase_rate: Option<f64>,
    pub last_order_at: Option<String>,
    pub days_since_last_order: Option<f64>,
    pub usual_gap_days: Option<f64>,
    pub churn_risk: bool,
    /// The VIP programme as it stands now, whatever the range: spend over the `[vip]`
    /// window, the credit line and how much of it is used, and the rebate bracket this
    /// UTC month's spend has reached so far (basis points; 0 below every bracket).
    pub spend_in_window: i64,
    pub credit_limit: i64,
    pub credit_used: i64,
    pub month_spend: i64,
    pub rebate_rate_bp: i32,
}

/// `GET /admin/v1/reports/resellers?from=&to=`
pub async fn resellers(app: &App, range: &Range) -> Result<Vec<ResellerLine>, ApiError> {
    let client = app.pg.get().await?;
    // The rollups must hold every order committed so far: what commits appended since the
    // last fold is folded first.
    crate::rollups::fold(&client).await?;
    let sql = format!(
        "WITH rows AS ({}),
         days AS (
             SELECT reseller_id, day, sum(orders) AS orders, sum(codes) AS codes, sum(amount) AS amount,
                    lead(day) OVER (PARTITION BY reseller_id ORDER BY day) - day AS next_gap
               FROM rows GROUP BY reseller_id, day HAVING sum(orders) > 0
         ),
         per AS (
             SELECT reseller_id, sum(orders)::bigint AS orders, sum(codes)::bigint AS codes,
                    sum(amount)::bigint AS amount, count(*) AS active_days,
                    count(*) FILTER (WHERE next_gap <= {REPEAT_WITHIN_DAYS}) AS repeat_days,
                    max(day) - min(day) AS span
               FROM days GROUP BY reseller_id
         )
         SELECT r.reseller_id, r.name, r.tier, coalesce(p.orders, 0), coalesce(p.codes, 0), coalesce(p.amount, 0),
                coalesce(p.active_days, 0), coalesce(p.repeat_days, 0), coalesce(p.span, 0),
                (SELECT max(o.created_at) FROM orders o
                  WHERE o.reseller_id = r.id AND o.created_at < $7 AND o.status = 'fulfilled'),
                (SELECT coalesce(sum(amount), 0)::int8 FROM reseller_daily d WHERE d.reseller_id = r.id AND d.day >= $8),
                r.credit_limit, greatest(0, -b.balance),
                (SELECT coalesce(sum(amount), 0)::int8 FROM reseller_daily d WHERE d.reseller_id = r.id AND d.day >= $9)
           FROM resellers r JOIN balances b ON b.reseller_id = r.id LEFT JOIN per p ON p.reseller_id = r.id
          ORDER BY coalesce(p.amount, 0) DESC, r.reseller_id",
        rows("reseller_id")
    );
    let today = app.clock.now().date();
    let window = crate::growth::window_start(&app.config, app.clock.now());
    let month = today.replace_day(1).unwrap_or(today);
    let mut params = rows_params(range).to_vec();
    params.push(&range.to);
    params.push(&window);
    params.push(&month);
    let rows = client.query(&sql, &params).await?;
    let now = range.to.min(range.now);
    let lines: Vec<ResellerLine> = rows
        .iter()
        .map(|r| {
            let (orders, amount, active_days): (i64, i64, i64) = (r.get(3), r.get(5), r.get(6));
            let (repeat_days, span): (i64, i32) = (r.get(7), r.get(8));
            let last: Option<OffsetDateTime> = r.get(9);
            let since = last.map(|l| round2(((now - l).as_seconds_f64() / SECONDS_PER_DAY).max(0.0)));
            let usual_gap = (active_days >= 2).then(|| round2(span as f64 / (active_days - 1) as f64));
            ResellerLine {
                reseller_id: r.get(0),
                name: r.get(1),
                tier: r.get(2),
                orders,
                codes: r.get(4),
                amount,
                currency: app.config.currency.clone(),
                average_order_value: (orders > 0).then(|| (amount as f64 / orders as f64).round() as i64),
                active_days,
                repeat_purchase_rate: (active_days > 0).then(|| round2(repeat_days as f64 / active_days as f64)),
                last_order_at: last.map(rfc3339),
                days_since_last_order: since,
                usual_gap_days: usual_gap,
                churn_risk: matches!((since, usual_gap), (Some(s), Some(g)) if s > CHURN_GAPS * g),
                spend_in_window: r.get(10),
                credit_limit: r.get(11),
                credit_used: r.get(12),
                month_spend: r.get(13),
                rebate_rate_bp: crate::rebates::rate_for(&app.config.rebates, r.get(13)),
            }
        })
        .collect();
    Ok(lines)
}

#[derive(Serialize, Default)]
pub struct ProductLine {
    pub sku: String,
    pub name: String,
    pub status: String,
    pub orders: i64,
    pub codes_sold: i64,
    pub amount: i64,
    pub currency: String,
    pub sell_rate_per_day: f64,
    pub available: i64,
    pub days_of_stock: Option<f64>,
    /// Of the sales above, those filled upstream (their purchase fulfilled), what the
    /// platform paid suppliers for them, and their amount less that. Last, so CSV readers
    /// of the earlier columns keep their places.
    pub upstream_orders: i64,
    pub cost: i64,
    pub margin: i64,
    /// Paid to suppliers for upstream orders of the range refunded since: no longer a
    /// sale, so in neither `cost` nor `margin`, yet money the platform is out of.
    pub refunded_cost: i64,
}

/// `GET /admin/v1/reports/products?from=&to=`: the lines, and the days the range has
/// run so far (what the sell rates are per).
pub async fn products(app: &App, range: &Range) -> Result<(Vec<ProductLine>, f64), ApiError> {
    let client = app.pg.get().await?;
    // The rollups must hold every order committed so far: what commits appended since the
    // last fold is folded first.
    crate::rollups::fold(&client).await?;
    let sql = format!(
        "WITH rows AS ({}),
         per AS (SELECT product_id, sum(orders)::bigint AS orders, sum(codes)::bigint AS codes,
                        sum(amount)::bigint AS amount, sum(upstream_orders)::bigint AS upstream_orders,
                        sum(upstream_amount)::bigint AS upstream_amount, sum(cost)::bigint AS cost,
                        sum(refunded_cost)::bigint AS refunded_cost
                   FROM rows GROUP BY product_id)
         SELECT p.sku, p.name, p.status, coalesce(per.orders, 0), coalesce(per.codes, 0), coalesce(per.amount, 0),
                (SELECT count(*) FROM codes c WHERE c.product_id = p.id AND c.status = 'available'),
                coalesce(per.upstream_orders, 0), coalesce(per.upstream_amount, 0), coalesce(per.cost, 0),
                coalesce(per.refunded_cost, 0)
           FROM products p LEFT JOIN per ON per.product_id = p.id
          ORDER BY coalesce(per.codes, 0) DESC, p.sku",
        rows("product_id")
    );
    let rows = client.query(&sql, &rows_params(range)).await?;
    let days = range.elapsed_days();
    let lines: Vec<ProductLine> = rows
        .iter()
        .map(|r| {
            let (codes, available): (i64, i64) = (r.get(4), r.get(6));
            let (upstream_amount, cost): (i64, i64) = (r.get(8), r.get(9));
            let rate = if days > 0.0 { codes as f64 / days } else { 0.0 };
            ProductLine {
                sku: r.get(0),
                name: r.get(1),
                status: r.get(2),
                orders: r.get(3),
                codes_sold: codes,
                amount: r.get(5),
                currency: app.config.currency.clone(),
                sell_rate_per_day: round2(rate),
                available,
                days_of_stock: (rate > 0.0).then(|| round2(available as f64 / rate)),
                upstream_orders: r.get(7),
                cost,
                margin: upstream_amount.saturating_sub(cost),
                refunded_cost: r.get(10),
            }
        })
        .collect();
    Ok((lines, round2(days)))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: OffsetDateTime = time::macros::datetime!(2026-12-01 12:00 UTC);

    fn range(from: &str, to: &str) -> Range {
        Range::parse(&Query::parse(Some(&format!("from={from}&to={to}"))).unwrap(), NOW).unwrap_or_else(|_| panic!())
    }

    #[test]
    fn a_range_without_an_end_ends_now_and_only_the_past_counts() {
        let r = Range::parse(&Query::parse(None).unwrap(), NOW).unwrap_or_else(|_| panic!());
        assert_eq!(r.to, NOW);
        assert_eq!(r.from, NOW - Duration::days(DEFAULT_DAYS));
        assert_eq!(r.elapsed_days(), DEFAULT_DAYS as f64);
        let ahead = range("2026-11-30T12:00:00Z", "2026-12-31T00:00:00Z");
        assert_eq!(
            ahead.elapsed_days(),
            1.0,
            "a range into the future has elapsed up to now"
        );
    }

    #[test]
    fn a_range_splits_into_whole_days_and_partial_edges() {
        let r = range("2026-11-01T10:00:00Z", "2026-11-04T06:00:00Z");
        assert_eq!(
            r.whole,
            (time::macros::date!(2026 - 11 - 02), time::macros::date!(2026 - 11 - 04))
        );
        assert_eq!(r.edges[0].1, time::macros::datetime!(2026-11-02 00:00 UTC));
        assert_eq!(r.edges[1].0, time::macros::datetime!(2026-11-04 00:00 UTC));

        let exact = range("2026-11-01T00:00:00Z", "2026-11-03T00:00:00Z");
        assert_eq!(
            exact.whole,
            (time::macros::date!(2026 - 11 - 01), time::macros::date!(2026 - 11 - 03))
        );
        assert!(exact.edges.iter().all(|(a, b)| a == b), "no partial days");

        let within = range("2026-11-01T10:00:00Z", "2026-11-01T12:00:00Z");
        assert_eq!(within.whole.0, within.whole.1, "no whole day");
        assert_eq!(within.edges[0], (within.from, within.to));
        assert_eq!(within.edges[1].0, within.edges[1].1);

        let offset = range("2026-11-01T10:00:00%2B08:00", "2026-11-02T00:00:00Z");
        assert_eq!(
            offset.from,
            time::macros::datetime!(2026-11-01 02:00 UTC),
            "offsets are honoured"
        );
        assert!(Range::parse(
            &Query::parse(Some("from=2026-11-02T00:00:00Z&to=2026-11-01T00:00:00Z")).unwrap(),
            NOW
        )
        .is_err());
    }
}
