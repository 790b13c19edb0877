//! Monthly rebates (阶梯返利, docs/api.md §6 "Rebates"): a reseller's spend in a UTC month
//! earns the rate of the highest `[[rebates]]` bracket it reaches, on the whole of it,
//! credited once when the month is closed.
//!
//! Spend is read from the report rollups (`reseller_daily`: orders by the UTC day they
//! were placed, refunds of those orders already taken out, an order bought upstream once
//! it is fulfilled) and what is pending for them, so a month costs days × resellers rows,
//! not orders.
//!
//! A close is one transaction: the month's row first (`rebate_months`, so of two closes at
//! once one waits on the other's row and then answers its recorded result), the lines as
//! credited, one `rebate` ledger row per reseller with a rebate (reference
//! `rebate:<month>`: the ledger's unique key refuses a second), the pending credits that
//! carry them to the hot balance, the `balance.rebate_credited` events and the audit
//! row. After the commit the credits reach Redis exactly once (`crate::hot_balance`,
//! docs/invariants.md invariant 11). From then on the recorded lines are the month's
//! answer: a refund after the close changes nothing in it.
//!
//! Months are closed by an admin (`api/admin/rebates.rs`), by `cardgate rebates close`,
//! or by [`step`], which every gateway runs each minute.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::GenericClient;
use serde::Serialize;
use time::{Date, OffsetDateTime};

use crate::app::App;
use crate::audit::{Actor, Audited};
use crate::config::RebateBracket;
use crate::error::ApiError;
use crate::http::query::{rfc3339, TIME_YEARS};

/// Basis points in the whole: 10,000 bp = 100 %.
const BP_PER_UNIT: i64 = 10_000;
/// How often each gateway looks for a month whose close is due. A close is due for a
/// day or so (`rebate_close_delay_hours`), so a minute is prompt enough.
const STEP_EVERY: Duration = Duration::from_secs(60);

/// A UTC calendar month from 1970-01 to 9998-12, as `YYYY-MM`: within the years the API
/// represents times in, so its end is always a representable time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Month {
    first: Date,
}

impl Month {
    /// `YYYY-MM` exactly; anything else is `400 invalid_request` naming `month`.
    pub fn parse(s: &str) -> Result<Month, ApiError> {
        let refused = || {
            ApiError::invalid(format!(
                "month must be YYYY-MM, a UTC month from {}-01 to {}-12",
                TIME_YEARS.start(),
                TIME_YEARS.end()
            ))
        };
        let b = s.as_bytes();
        let digits = |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
        if b.len() != 7 || b[4] != b'-' || !digits(0..4) || !digits(5..7) {
            return Err(refused());
        }
        let year: i32 = s[..4].parse().map_err(|_| refused())?;
        let month: u8 = s[5..].parse().map_err(|_| refused())?;
        let month = time::Month::try_from(month).map_err(|_| refused())?;
        Date::from_calendar_date(year, month, 1)
            .ok()
            .and_then(Month::from_first)
            .ok_or_else(refused)
    }

    /// The month holding `t` (in UTC), if within the years months are taken from.
    pub fn of(t: OffsetDateTime) -> Option<Month> {
        let day = t.to_offset(time::UtcOffset::UTC).date();
        Month::from_first(day.replace_day(1).ok()?)
    }

    fn from_first(first: Date) -> Option<Month> {
        TIME_YEARS.contains(&first.year()).then_some(Month { first })
    }

    /// The month before, if within the years months are taken from.
    pub fn previous(self) -> Option<Month> {
        Month::of(self.starts_at().checked_sub(time::Duration::days(1))?)
    }

    pub fn first_day(self) -> Date {
        self.first
    }

    /// The first day of the next month: the month is `[first_day, end_day)`.
    pub fn end_day(self) -> Date {
        let (year, month) = match self.first.month() {
            time::Month::December => (self.first.year() + 1, time::Month::January),
            m => (self.first.year(), m.next()),
        };
        Date::from_calendar_date(year, month, 1).expect("a month ends before the year 10000")
    }

    pub fn starts_at(self) -> OffsetDateTime {
        self.first.midnight().assume_utc()
    }

    /// When the month has ended: midnight UTC on the first day of the next.
    pub fn ends_at(self) -> OffsetDateTime {
        self.end_day().midnight().assume_utc()
    }

    /// The ledger reference of the month's rebates: one per reseller and month.
    pub fn reference(self) -> String {
        format!("rebate:{self}")
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.first.year(), u8::from(self.first.month()))
    }
}

/// The rate of the highest bracket `spend` reaches: the one with the largest `min_spend`
/// at most `spend` (of equal ones, the better rate); 0 when none is reached.
pub fn rate_for(brackets: &[RebateBracket], spend: i64) -> i32 {
    brackets
        .iter()
        .filter(|b| b.min_spend <= spend)
        .max_by_key(|b| (b.min_spend, b.rate_bp))
        // Configuration refuses rates above 10,000 bp; the bound keeps the cast exact.
        .map_or(0, |b| b.rate_bp.min(BP_PER_UNIT as u32) as i32)
}

/// `floor(spend × rate_bp / 10000)`, worked out in 128 bits so that no spend overflows;
/// never more than `spend`.
pub fn rebate_of(spend: i64, rate_bp: i32) -> i64 {
    let rate = i128::from(rate_bp.clamp(0, BP_PER_UNIT as i32));
    let rebate = i128::from(spend.max(0)) * rate / i128::from(BP_PER_UNIT);
    i64::try_from(rebate).unwrap_or(i64::MAX)
}

/// One reseller's month.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Line {
    #[serde(skip)]
    reseller_pk: i64,
    pub reseller_id: String,
    pub spend: i64,
    pub rate_bp: i32,
    pub rebate: i64,
}

/// A month's rebates as `GET /admin/v1/rebates` and the close answer them: recorded when
/// closed, what would be credited so far when open.
#[derive(Debug, Serialize)]
pub struct Rebates {
    pub month: String,
    pub closed: bool,
    pub lines: Vec<Line>,
    pub total: i64,
    pub currency: String,
    /// A close that found the month closed already: its recorded result.
    #[serde(skip)]
    pub replayed: bool,
}

impl Rebates {
    fn of(app: &App, month: Month, closed: bool, mut lines: Vec<Line>) -> Rebates {
        // One order for the close's answer and every later reading of the record alike:
        // Rust's, not the database's collation.
        lines.sort_by(|a, b| b.spend.cmp(&a.spend).then_with(|| a.reseller_id.cmp(&b.reseller_id)));
        Rebates {
            month: month.to_string(),
            closed,
            total: lines.iter().fold(0, |sum: i64, l| sum.saturating_add(l.rebate)),
            lines,
            currency: app.config.currency.clone(),
            replayed: false,
        }
    }

    fn credits(&self) -> usize {
        self.lines.iter().filter(|l| l.rebate > 0).count()
    }
}

/// `GET /admin/v1/rebates?month=`: the recorded lines of a closed month, or what the
/// brackets would credit for an open one's spend so far.
pub async fn preview(app: &App, month: Month) -> Result<Rebates, ApiError> {
    let client = app.pg.get().await?;
    if let Some(closed) = recorded(app, &client, month).await? {
        return Ok(closed);
    }
    // Every order committed so far: spend_lines reads what is pending beside the rollups.
    let lines = spend_lines(&client, &app.config.rebates, month).await?;
    Ok(Rebates::of(app, month, false, lines))
}

/// Closes `month`: credits each reseller its rebate once and records the lines. A month
/// closed already answers its recorded result, `replayed`; one not ended yet (by the
/// gateway's clock) is `409 conflict`.
pub async fn close(app: &App, actor: &Actor, month: Month) -> Result<Rebates, ApiError> {
    if app.clock.now() < month.ends_at() {
        return Err(ApiError::Conflict(
            format!(
                "{month} has not ended yet; it can be closed from {}",
                rfc3339(month.ends_at())
            )
            .into(),
        ));
    }
    let key = month.to_string();
    let mut client = app.pg.get().await?;
    let tx = Audited::begin(&mut client, actor, "rebates.close", &key).await?;
    // The month's row first: a close already under way holds it, so this waits for that
    // one to end and then finds the month closed. Nothing else is held while waiting.
    let claimed = tx
        .execute(
            "INSERT INTO rebate_months (month, closed_by, total) VALUES ($1, $2, 0) ON CONFLICT (month) DO NOTHING",
            &[&key, &actor.name],
        )
        .await?;
    if claimed == 0 {
        tx.rollback().await?;
        let closed = recorded(app, &client, month)
            .await?
            .ok_or_else(|| ApiError::internal(anyhow::anyhow!("rebate month {key} vanished")))?;
        drop(client);
        // The first close may have committed without reaching Redis: finish that now.
        crate::hot_balance::settle_many(app, closed.credits()).await;
        return Ok(Rebates {
            replayed: true,
            ..closed
        });
    }
    crate::rollups::fold(&*tx).await?;
    let lines = spend_lines(&*tx, &app.config.rebates, month).await?;
    let answer = Rebates::of(app, month, true, lines);
    let credited = credit(&tx, actor, month, &answer).await?;
    tx.execute(
        "UPDATE rebate_months SET total = $2 WHERE month = $1",
        &[&key, &answer.total],
    )
    .await?;
    tx.commit(serde_json::json!({"lines": answer.lines.len(), "credited": credited.len(), "total": answer.total}))
        .await?;
    drop(client);
    metrics::counter!("cardgate_rebates_credited_total").increment(credited.len() as u64);
    let amount: i64 = credited.iter().sum();
    metrics::counter!("cardgate_rebates_credited_amount_total").increment(amount.max(0) as u64);
    // Spendable only once recorded; what Redis misses now the background step applies.
    crate::hot_balance::settle_many(app, credited.len()).await;
    tracing::info!(month = %key, lines = answer.lines.len(), credited = credited.len(), total = answer.total, actor = %actor.name, "rebates closed");
    Ok(answer)
}

/// Inside the close: the lines as recorded, a ledger row and a pending hot-balance credit
/// per rebate, and the events. Answers the amounts credited now.
async fn credit(tx: &Audited<'_>, actor: &Actor, month: Month, r: &Rebates) -> Result<Vec<i64>, ApiError> {
    let key = month.to_string();
    let column = |f: fn(&Line) -> i64| r.lines.iter().map(f).collect::<Vec<i64>>();
    let (pks, spends, rebates) = (column(|l| l.reseller_pk), column(|l| l.spend), column(|l| l.rebate));
    let rates: Vec<i32> = r.lines.iter().map(|l| l.rate_bp).collect();
    tx.execute(
        "INSERT INTO rebate_lines (month, reseller_id, spend, rate_bp, rebate)
         SELECT $1, * FROM unnest($2::bigint[], $3::bigint[], $4::integer[], $5::bigint[])",
        &[&key, &pks, &spends, &rates, &rebates],
    )
    .await?;
    // After the lines, which need the month's row; before the credits, which need the
    // epoch this transaction commits under (the rebuild's fence, held shared from here).
    let epoch = crate::rebuild::fence(&**tx).await?;
    // In reseller order, as orders lock balances, so the two never deadlock. A row found
    // already (the ledger's unique key) is not credited again.
    let due: Vec<&Line> = r.lines.iter().filter(|l| l.rebate > 0).collect();
    let (due_pks, due_amounts): (Vec<i64>, Vec<i64>) = due.iter().map(|l| (l.reseller_pk, l.rebate)).unzip();
    let reference = month.reference();
    let rows = tx
        .query(
            "INSERT INTO balance_ledger (reseller_id, amount, kind, reference, actor)
             SELECT r, a, 'rebate', $3, $4 FROM unnest($1::bigint[], $2::bigint[]) AS u(r, a) ORDER BY r
             ON CONFLICT (reseller_id, kind, reference) DO NOTHING
             RETURNING id, reseller_id, amount",
            &[&due_pks, &due_amounts, &reference, &actor.name],
        )
        .await?;
    if rows.len() != due.len() {
        tracing::warn!(month = %key, credited = rows.len(), due = due.len(), "some resellers had this month's rebate in the ledger already; not credited again");
    }
    // Queued together: the client pipelines them on the transaction's connection.
    futures_util::future::try_join_all(
        rows.iter()
            .map(|row| crate::hot_balance::record_credit(&**tx, row.get(1), row.get(0), row.get(2), epoch)),
    )
    .await?;
    let credited_pks: Vec<i64> = rows.iter().map(|row| row.get(1)).collect();
    tx.execute(
        "INSERT INTO events (reseller_id, type, data)
         SELECT r.id, 'balance.rebate_credited',
                jsonb_build_object('month', $1::text, 'spend', u.s, 'rate_bp', u.b, 'amount', u.a, 'currency', $6::text)
           FROM unnest($2::bigint[], $3::bigint[], $4::integer[], $5::bigint[]) AS u(r, s, b, a)
           JOIN resellers r ON r.id = u.r
          WHERE r.callback_url IS NOT NULL AND r.id = ANY($7)
          ORDER BY r.id",
        &[&key, &pks, &spends, &rates, &rebates, &r.currency, &credited_pks],
    )
    .await?;
    Ok(rows.iter().map(|row| row.get(2)).collect())
}

/// The month's spend per reseller (those with some), from the rollups and what is
/// pending for them, in one snapshot, and what the brackets make of it. An order bought
/// upstream enters them once fulfilled: a month closed before then does not count it, as
/// it does not take back a refund made after.
async fn spend_lines(c: &impl GenericClient, brackets: &[RebateBracket], month: Month) -> Result<Vec<Line>, ApiError> {
    let rows = c
        .query(
            "SELECT s.reseller_id, r.reseller_id, sum(s.amount)::int8
               FROM (SELECT reseller_id, day, amount FROM reseller_daily
                     UNION ALL SELECT reseller_id, day, amount FROM sales_pending) s
               JOIN resellers r ON r.id = s.reseller_id
              WHERE s.day >= $1 AND s.day < $2
              GROUP BY s.reseller_id, r.reseller_id HAVING sum(s.amount) > 0",
            &[&month.first_day(), &month.end_day()],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| {
            let spend: i64 = row.get(2);
            let rate_bp = rate_for(brackets, spend);
            Line {
                reseller_pk: row.get(0),
                reseller_id: row.get(1),
                spend,
                rate_bp,
                rebate: rebate_of(spend, rate_bp),
            }
        })
        .collect())
}

/// The month as it was closed, if it was.
async fn recorded(app: &App, c: &impl GenericClient, month: Month) -> Result<Option<Rebates>, ApiError> {
    let key = month.to_string();
    if c.query_opt("SELECT 1 FROM rebate_months WHERE month = $1", &[&key])
        .await?
        .is_none()
    {
        return Ok(None);
    }
    let rows = c
        .query(
            "SELECT l.reseller_id, r.reseller_id, l.spend, l.rate_bp, l.rebate
               FROM rebate_lines l JOIN resellers r ON r.id = l.reseller_id
              WHERE l.month = $1",
            &[&key],
        )
        .await?;
    let lines = rows
        .iter()
        .map(|row| Line {
            reseller_pk: row.get(0),
            reseller_id: row.get(1),
            spend: row.get(2),
            rate_bp: row.get(3),
            rebate: row.get(4),
        })
        .collect();
    Ok(Some(Rebates::of(app, month, true, lines)))
}

/// The month whose close is due at `now`: the last one that ended `delay_hours` or more
/// before it.
pub fn due(now: OffsetDateTime, delay_hours: u32) -> Option<Month> {
    Month::of(now.checked_sub(time::Duration::hours(delay_hours.into()))?)?.previous()
}

/// One round of the automatic close: the month whose close is due, if nobody has closed
/// it, closed now (audited as `system`). Only the latest due month: older ones left open
/// (the programme started later, or every gateway was down for a month) are an admin's
/// to close. Nothing without brackets configured. Answers what it closed.
pub async fn step(app: &App) -> anyhow::Result<Option<Rebates>> {
    if app.config.rebates.is_empty() {
        return Ok(None);
    }
    let Some(month) = due(app.clock.now(), app.config.vip.rebate_close_delay_hours) else {
        return Ok(None);
    };
    let client = app.pg.get().await?;
    if client
        .query_opt("SELECT 1 FROM rebate_months WHERE month = $1", &[&month.to_string()])
        .await?
        .is_some()
    {
        return Ok(None);
    }
    drop(client);
    let closed = close(app, &Actor::system(), month).await?;
    // Another gateway's close that this one waited for is not this one's.
    Ok((!closed.replayed).then_some(closed))
}

/// Runs [`step`] every minute, for the life of the server.
pub async fn run(app: Arc<App>) {
    let app = &app;
    crate::every(STEP_EVERY, move || async move {
        if let Err(e) = step(app).await {
            metrics::counter!("cardgate_rebate_close_failures_total").increment(1);
            tracing::warn!(
                error = format!("{e:#}"),
                "a month due to close was not closed; retrying in a minute"
            );
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    fn month(s: &str) -> Month {
        Month::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn months_are_yyyy_mm_and_nothing_else() {
        for good in ["1970-01", "2026-11", "2026-12", "9998-12"] {
            assert_eq!(month(good).to_string(), good);
        }
        for bad in [
            "",
            "2026-1",
            "2026-13",
            "2026-00",
            "26-11",
            "2026/11",
            "2026-11-01",
            " 2026-11",
            "2026-1a",
            "+026-11",
            "1969-12",
            "9999-01",
            "２０２６-11",
        ] {
            match Month::parse(bad) {
                Err(e @ ApiError::InvalidRequest(_)) => assert!(e.to_string().starts_with("month "), "{bad}: {e}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_month_runs_from_its_first_midnight_to_the_next_months() {
        let nov = month("2026-11");
        assert_eq!(nov.starts_at(), datetime!(2026-11-01 00:00 UTC));
        assert_eq!(nov.ends_at(), datetime!(2026-12-01 00:00 UTC));
        assert_eq!(month("2026-12").ends_at(), datetime!(2027-01-01 00:00 UTC));
        assert_eq!(month("9998-12").end_day(), time::macros::date!(9999 - 01 - 01));
        assert_eq!(month("2027-01").previous(), Some(month("2026-12")));
        assert_eq!(month("1970-01").previous(), None);
        assert_eq!(
            Month::of(datetime!(2026-11-30 23:00 -02:00)),
            Some(month("2026-12")),
            "taken in UTC"
        );
        assert_eq!(nov.reference(), "rebate:2026-11");
    }

    #[test]
    fn the_highest_bracket_reached_applies_to_the_whole_spend() {
        let b = |min_spend, rate_bp| RebateBracket { min_spend, rate_bp };
        let brackets = [b(5_000_000, 500), b(1_000_000, 300), b(1_000_000, 200)];
        assert_eq!(rate_for(&brackets, 999_999), 0);
        assert_eq!(
            rate_for(&brackets, 1_000_000),
            300,
            "of equal brackets, the better rate"
        );
        assert_eq!(rate_for(&brackets, 4_999_999), 300);
        assert_eq!(rate_for(&brackets, 5_000_000), 500);
        assert_eq!(rate_for(&[], i64::MAX), 0);
        // Highest by min_spend, whatever its rate.
        assert_eq!(rate_for(&[b(0, 900), b(100, 100)], 100), 100);
    }

    #[test]
    fn rebates_round_down_and_never_overflow() {
        assert_eq!(rebate_of(1_000_000, 300), 30_000);
        assert_eq!(rebate_of(3_333, 300), 99, "99.99 rounds down");
        assert_eq!(rebate_of(33, 300), 0);
        assert_eq!(rebate_of(i64::MAX, 10_000), i64::MAX);
        assert_eq!(
            rebate_of(i64::MAX, 9_999),
            i64::MAX / 10_000 * 9_999 + (i64::MAX % 10_000) * 9_999 / 10_000
        );
        assert_eq!(rebate_of(-5, 300), 0);
    }

    #[test]
    fn the_close_is_due_once_the_delay_after_the_month_has_passed() {
        let due_at = |t| due(t, 24).map(|m| m.to_string());
        assert_eq!(due_at(datetime!(2026-12-01 23:59:59 UTC)).as_deref(), Some("2026-10"));
        assert_eq!(due_at(datetime!(2026-12-02 00:00 UTC)).as_deref(), Some("2026-11"));
        assert_eq!(due_at(datetime!(2026-12-31 23:59 UTC)).as_deref(), Some("2026-11"));
        assert_eq!(
            due(datetime!(2027-01-01 00:00 UTC), 0)
                .map(|m| m.to_string())
                .as_deref(),
            Some("2026-12")
        );
        assert_eq!(
            due(datetime!(2026-12-15 00:00 UTC), 24 * 40)
                .map(|m| m.to_string())
                .as_deref(),
            Some("2026-10"),
            "a delay past a month reaches further back"
        );
    }
}
