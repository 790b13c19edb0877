//! Statements (docs/api.md §6, "Statements"): every movement of a reseller's balance,
//! newest first, paged by an opaque cursor; rendered by `api/statements.rs`.
//!
//! The movements are the reseller's orders (each its own debit, migrations/V2) and its
//! `balance_ledger` rows (refunds, adjustments, rebates): `ledger_entries`, read here
//! source by source so that each is one backward range scan of its index, however long
//! the history. They sum to the balance Postgres holds.
//!
//! Entries are ordered by (created_at, source, row id), newest first, and a page resumes
//! strictly below the last entry of the one before: an entry committed meanwhile lands
//! above or below that point, never shifting what is left to read, so paging never
//! repeats an entry or skips one that was there.

use deadpool_postgres::GenericClient;
use serde::Serialize;
use time::OffsetDateTime;

use crate::app::App;
use crate::crypto::Purpose;
use crate::error::ApiError;
use crate::http::query::{page, rfc3339, Query};

/// What a movement is, as the statement shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryType {
    #[default]
    Order,
    Refund,
    Credit,
    Debit,
    Rebate,
    UpstreamFailed,
}

impl EntryType {
    /// A `balance_ledger` row's type, by its kind and, for an operator's adjustment, its
    /// sign; `None` for a kind this version does not know.
    pub fn of_ledger(kind: &str, amount: i64) -> Option<EntryType> {
        Some(match kind {
            "refund" => EntryType::Refund,
            "adjustment" if amount > 0 => EntryType::Credit,
            "adjustment" => EntryType::Debit,
            "rebate" => EntryType::Rebate,
            "upstream_failed" => EntryType::UpstreamFailed,
            _ => return None,
        })
    }

    /// Whether the movement's reference is the id of the order it belongs to (shown as
    /// `order_id`) rather than a reference of its own (the operator's, or the month's).
    fn names_an_order(self) -> bool {
        matches!(self, EntryType::Order | EntryType::Refund | EntryType::UpstreamFailed)
    }
}

/// One movement, as JSON and CSV both show it (`Default`: the blank line CSV takes its
/// header row from, see `http::response::csv`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Entry {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: EntryType,
    pub amount: i64,
    pub currency: String,
    pub order_id: Option<String>,
    pub reference: Option<String>,
    pub created_at: String,
}

/// One page of a statement, as JSON shows it (CSV carries the cursor in a header).
#[derive(Serialize)]
pub struct Statement {
    pub entries: Vec<Entry>,
    pub next_cursor: Option<String>,
}

/// The query both statement routes take: `[from, to)`, `limit` and `cursor`.
pub struct Asked<'q> {
    pub from: Option<OffsetDateTime>,
    pub to: Option<OffsetDateTime>,
    /// As sent: opened against the reseller it is read for.
    pub cursor: Option<&'q str>,
    pub limit: i64,
}

impl<'q> Asked<'q> {
    pub fn parse(q: &'q Query) -> Result<Asked<'q>, ApiError> {
        let limit = q.page_limit()?;
        let (from, to) = (q.time("from")?, q.time("to")?);
        if let (Some(f), Some(t)) = (from, to) {
            if f >= t {
                return Err(ApiError::invalid("from must be before to"));
            }
        }
        Ok(Asked {
            from,
            to,
            cursor: q.get("cursor"),
            limit,
        })
    }
}

/// Where a movement is kept. At one instant a `balance_ledger` row counts as newer than
/// an order. Orders are timed to the millisecond they were placed (their API shows the
/// second) and ledger rows to the microsecond, so only movements of one millisecond tie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    Orders = 0,
    Ledger = 1,
}

impl Source {
    fn from_byte(b: u8) -> Option<Source> {
        match b {
            0 => Some(Source::Orders),
            1 => Some(Source::Ledger),
            _ => None,
        }
    }
}

/// An entry's place in the order of the statement; what a cursor holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Position {
    /// `created_at` in microseconds since the epoch, Postgres's own precision.
    at: i64,
    source: Source,
    id: i64,
}

const POSITION_BYTES: usize = 17;

impl Position {
    fn to_bytes(self) -> [u8; POSITION_BYTES] {
        let mut b = [0u8; POSITION_BYTES];
        b[..8].copy_from_slice(&self.at.to_be_bytes());
        b[8] = self.source as u8;
        b[9..].copy_from_slice(&self.id.to_be_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> Option<Position> {
        let b: &[u8; POSITION_BYTES] = b.try_into().ok()?;
        Some(Position {
            at: i64::from_be_bytes(b[..8].try_into().ok()?),
            source: Source::from_byte(b[8])?,
            id: i64::from_be_bytes(b[9..].try_into().ok()?),
        })
    }

    /// The cursor to the entries below this one: sealed to the reseller, so that it is
    /// opaque, cannot be forged or edited, and does not open on another statement.
    fn seal(self, app: &App, reseller: i64) -> String {
        hex::encode(
            app.crypto
                .encrypt(Purpose::StatementCursor { reseller }, &self.to_bytes()),
        )
    }

    fn open(app: &App, reseller: i64, cursor: &str) -> Result<Position, ApiError> {
        hex::decode(cursor)
            .ok()
            .and_then(|sealed| app.crypto.decrypt(Purpose::StatementCursor { reseller }, &sealed).ok())
            .and_then(|plain| Position::from_bytes(&plain))
            .ok_or_else(not_a_cursor)
    }

    /// Where `source` resumes below this position: its rows whose `(created_at, id)` is
    /// below the answer. A bound with `i64::MIN` takes exactly the rows before its time.
    fn bound_for(self, source: Source) -> Result<(OffsetDateTime, i64), ApiError> {
        let (at, id) = match source.cmp(&self.source) {
            std::cmp::Ordering::Equal => (self.at, self.id),
            // Its rows at this instant sort below this one: all of them are left to read.
            std::cmp::Ordering::Less => (self.at.checked_add(1).ok_or_else(not_a_cursor)?, i64::MIN),
            // Its rows at this instant sort above this one: none of them is.
            std::cmp::Ordering::Greater => (self.at, i64::MIN),
        };
        Ok((from_micros(at)?, id))
    }
}

fn not_a_cursor() -> ApiError {
    ApiError::invalid("cursor must be a next_cursor of this statement")
}

fn micros(t: OffsetDateTime) -> Result<i64, ApiError> {
    i64::try_from(t.unix_timestamp_nanos().div_euclid(1000))
        .map_err(|_| ApiError::internal(anyhow::anyhow!("a statement time past i64 microseconds")))
}

fn from_micros(us: i64) -> Result<OffsetDateTime, ApiError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000).map_err(|_| not_a_cursor())
}

/// One page of the statement of the reseller whose key is `reseller`.
pub async fn page_of_pk(app: &App, reseller: i64, asked: &Asked<'_>) -> Result<Statement, ApiError> {
    let client = app.pg.get().await?;
    read(app, &client, reseller, asked).await
}

/// One page of the statement of the reseller with the public id `reseller_id`
/// (`404 not_found` for an unknown one).
pub async fn page_of(app: &App, reseller_id: &str, asked: &Asked<'_>) -> Result<Statement, ApiError> {
    let client = app.pg.get().await?;
    let reseller = crate::resellers::pk_of(&client, reseller_id).await?;
    read(app, &client, reseller, asked).await
}

/// Each source's newest `limit + 1` rows in the window, merged: the page and whether
/// more follow. Orders with a zero amount moved nothing and are not movements.
/// (`ledger_entries` itself gives the same rows, but a query over the view reads every
/// order of the reseller before it sorts them.)
const PAGE: &str = "
    (SELECT 0::int2 AS source, o.id, o.created_at, 'order'::text AS kind, -o.amount AS amount, o.order_id AS reference
       FROM orders o
      WHERE o.reseller_id = $1 AND o.amount <> 0
        AND ($2::timestamptz IS NULL OR o.created_at >= $2) AND ($3::timestamptz IS NULL OR o.created_at < $3)
        AND ($4::timestamptz IS NULL OR (o.created_at, o.id) < ($4, $5))
      ORDER BY o.created_at DESC, o.id DESC LIMIT $8)
    UNION ALL
    (SELECT 1::int2, l.id, l.created_at, l.kind, l.amount, l.reference
       FROM balance_ledger l
      WHERE l.reseller_id = $1
        AND ($2::timestamptz IS NULL OR l.created_at >= $2) AND ($3::timestamptz IS NULL OR l.created_at < $3)
        AND ($6::timestamptz IS NULL OR (l.created_at, l.id) < ($6, $7))
      ORDER BY l.created_at DESC, l.id DESC LIMIT $8)
    ORDER BY created_at DESC, source DESC, id DESC LIMIT $8";

async fn read<C: GenericClient>(app: &App, c: &C, reseller: i64, asked: &Asked<'_>) -> Result<Statement, ApiError> {
    let below = asked.cursor.map(|s| Position::open(app, reseller, s)).transpose()?;
    let bound = |source| below.map(|p| p.bound_for(source)).transpose();
    let (orders_at, orders_id) = bound(Source::Orders)?.unzip();
    let (ledger_at, ledger_id) = bound(Source::Ledger)?.unzip();
    let mut rows = c
        .query(
            PAGE,
            &[
                &reseller,
                &asked.from,
                &asked.to,
                &orders_at,
                &orders_id,
                &ledger_at,
                &ledger_id,
                &(asked.limit + 1),
            ],
        )
        .await?;
    let more = page(&mut rows, asked.limit);
    let mut entries = Vec::with_capacity(rows.len());
    let mut last = None;
    for row in &rows {
        let source = u8::try_from(row.get::<_, i16>(0))
            .ok()
            .and_then(Source::from_byte)
            .ok_or_else(|| ApiError::internal(anyhow::anyhow!("a statement row of no known source")))?;
        let at: OffsetDateTime = row.get(2);
        let position = Position {
            at: micros(at)?,
            source,
            id: row.get(1),
        };
        entries.push(entry(app, position, row.get(3), row.get(4), row.get(5), at)?);
        last = Some(position);
    }
    Ok(Statement {
        entries,
        next_cursor: last.filter(|_| more).map(|p| p.seal(app, reseller)),
    })
}

fn entry(
    app: &App,
    position: Position,
    kind: &str,
    amount: i64,
    reference: String,
    created_at: OffsetDateTime,
) -> Result<Entry, ApiError> {
    let kind = match position.source {
        Source::Orders => EntryType::Order,
        Source::Ledger => EntryType::of_ledger(kind, amount)
            .ok_or_else(|| ApiError::internal(anyhow::anyhow!("balance_ledger kind {kind} has no statement type")))?,
    };
    let (order_id, reference) = if kind.names_an_order() {
        (Some(reference), None)
    } else {
        (None, Some(reference))
    };
    Ok(Entry {
        id: entry_id(app, position.source, position.id),
        kind,
        amount,
        currency: app.config.currency.clone(),
        order_id,
        reference,
        created_at: rfc3339(created_at),
    })
}

/// `led_` and 32 hex digits: the same for the same row every time, unique across both
/// sources, and telling nothing of the row numbers (how many orders the platform takes).
fn entry_id(app: &App, source: Source, id: i64) -> String {
    let mut internal = [0u8; 16];
    internal[0] = source as u8;
    internal[1..9].copy_from_slice(&id.to_be_bytes());
    format!("led_{}", hex::encode(app.crypto.opaque_id(internal)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_kinds_map_to_their_types_and_references() {
        use EntryType::*;
        for (kind, amount, want) in [
            ("refund", 19300, Some(Refund)),
            ("adjustment", 1, Some(Credit)),
            ("adjustment", -1, Some(Debit)),
            ("rebate", 500, Some(Rebate)),
            ("upstream_failed", 19300, Some(UpstreamFailed)),
            ("order", -19300, None),
            ("bonus", 1, None),
        ] {
            assert_eq!(EntryType::of_ledger(kind, amount), want, "{kind} {amount}");
        }
        let names: Vec<_> = [Order, Refund, Credit, Debit, Rebate, UpstreamFailed]
            .into_iter()
            .filter(|t| t.names_an_order())
            .collect();
        assert_eq!(names, [Order, Refund, UpstreamFailed]);
        assert_eq!(serde_json::to_value(UpstreamFailed).unwrap(), "upstream_failed");
    }

    #[test]
    fn positions_round_trip_and_refuse_other_bytes() {
        let p = Position {
            at: -1,
            source: Source::Ledger,
            id: i64::MAX,
        };
        assert_eq!(Position::from_bytes(&p.to_bytes()), Some(p));
        let mut bad = p.to_bytes();
        bad[8] = 2;
        assert_eq!(Position::from_bytes(&bad), None);
        assert_eq!(Position::from_bytes(&p.to_bytes()[1..]), None);
    }

    #[test]
    fn each_source_resumes_exactly_below_the_cursor() {
        let at = 1_000_000;
        let p = |source| Position { at, source, id: 7 };
        let t = |us: i64| from_micros(us).unwrap();
        // The same source resumes below the cursor's own row.
        assert_eq!(p(Source::Orders).bound_for(Source::Orders).unwrap(), (t(at), 7));
        // Below a ledger row: every order of the same instant is still to come...
        assert_eq!(
            p(Source::Ledger).bound_for(Source::Orders).unwrap(),
            (t(at + 1), i64::MIN)
        );
        // ...and below an order, no ledger row of that instant is.
        assert_eq!(p(Source::Orders).bound_for(Source::Ledger).unwrap(), (t(at), i64::MIN));
    }
}
