//! Query strings: decoded pairs for handlers (signing uses the raw form, see `auth`).

use std::borrow::Cow;

use percent_encoding::percent_decode_str;

use crate::error::ApiError;

fn decode(s: &str) -> Result<String, ApiError> {
    let plus: Cow<'_, str> = if s.contains('+') {
        Cow::Owned(s.replace('+', " "))
    } else {
        Cow::Borrowed(s)
    };
    let v = percent_decode_str(&plus)
        .decode_utf8()
        .map_err(|_| ApiError::invalid("query string is not valid UTF-8"))?;
    // Postgres text cannot hold NUL: refused here, not as a database error later.
    if v.contains('\0') {
        return Err(ApiError::invalid("query string holds a NUL character"));
    }
    Ok(v.into_owned())
}

/// Years (UTC) a time parameter may fall in; see `Query::time`.
pub const TIME_YEARS: std::ops::RangeInclusive<i32> = 1970..=9998;

/// Decoded `name=value` pairs, each name at most once.
pub struct Query(Vec<(String, String)>);

impl Query {
    /// A name given twice is refused rather than one of its values picked silently.
    pub fn parse(raw: Option<&str>) -> Result<Query, ApiError> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for part in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            let k = decode(k)?;
            if pairs.iter().any(|(seen, _)| *seen == k) {
                return Err(ApiError::invalid(format!(
                    "query parameter {k} is given more than once"
                )));
            }
            pairs.push((k, decode(v)?));
        }
        Ok(Query(pairs))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }

    /// An RFC 3339 time parameter, in UTC, as [`time_value`] reads it.
    pub fn time(&self, name: &str) -> Result<Option<time::OffsetDateTime>, ApiError> {
        self.get(name)
            .map(|v| {
                // An offset's `+` sent unencoded arrives decoded as a space.
                time_value(name, v).or_else(|e| {
                    if v.contains(' ') {
                        time_value(name, &v.replace(' ', "+"))
                    } else {
                        Err(e)
                    }
                })
            })
            .transpose()
    }

    pub fn int(&self, name: &str) -> Result<Option<i64>, ApiError> {
        self.get(name)
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| ApiError::invalid(format!("{name} must be an integer")))
            })
            .transpose()
    }

    /// `limit` of a paged list: 1 to 1000, 100 when absent.
    pub fn page_limit(&self) -> Result<i64, ApiError> {
        const DEFAULT: i64 = 100;
        const MAX: i64 = 1000;
        let limit = self.int("limit")?.unwrap_or(DEFAULT);
        if !(1..=MAX).contains(&limit) {
            return Err(ApiError::invalid(format!("limit must be 1 to {MAX}")));
        }
        Ok(limit)
    }

    /// The `from`, `to`, `cursor` and `limit` of a newest-first search; `from` must come
    /// before `to`.
    pub fn window(&self) -> Result<Window, ApiError> {
        let limit = self.page_limit()?;
        let (from, to) = (self.time("from")?, self.time("to")?);
        if let (Some(f), Some(t)) = (from, to) {
            if f >= t {
                return Err(ApiError::invalid("from must be before to"));
            }
        }
        Ok(Window {
            from,
            to,
            cursor: self.int("cursor")?,
            limit,
        })
    }
}

/// An RFC 3339 time the client gave as `name`, in UTC. Only times from 1970 to the end of
/// 9998 (UTC) are taken: no order or audit entry is older, and the margin below year 9999
/// keeps the ranges handlers derive from it (a day further, 30 days back) representable.
pub fn time_value(name: &str, v: &str) -> Result<time::OffsetDateTime, ApiError> {
    let t = time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339)
        .map_err(|_| ApiError::invalid(format!("{name} must be an RFC 3339 time")))?;
    t.checked_to_offset(time::UtcOffset::UTC)
        .filter(|t| TIME_YEARS.contains(&t.year()))
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "{name} must be between {}-01-01T00:00:00Z and {}-12-31T23:59:59Z",
                TIME_YEARS.start(),
                TIME_YEARS.end()
            ))
        })
}

/// Trims rows fetched with `LIMIT limit + 1` to the page; true when more follow it, so a
/// page that happens to end the list is not given a cursor to an empty page.
pub fn page<R>(rows: &mut Vec<R>, limit: i64) -> bool {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit.max(0) as usize);
    more
}

/// Where a newest-first search looks: `[from, to)`, below `cursor`, at most `limit` rows.
pub struct Window {
    pub from: Option<time::OffsetDateTime>,
    pub to: Option<time::OffsetDateTime>,
    pub cursor: Option<i64>,
    pub limit: i64,
}

/// One page of a search, newest first: the entries and the cursor to the next page
/// (`None` when none follows).
pub struct Page {
    pub items: Vec<serde_json::Value>,
    pub next_cursor: Option<String>,
}

impl Page {
    /// The page of `rows` (already trimmed by [`page`]), each shown by `show`; the cursor
    /// is the id in column `id_column` of the last row.
    pub fn of(
        rows: &[tokio_postgres::Row],
        more: bool,
        id_column: usize,
        show: impl Fn(&tokio_postgres::Row) -> serde_json::Value,
    ) -> Page {
        Page {
            items: rows.iter().map(show).collect(),
            next_cursor: more
                .then(|| rows.last().map(|r| r.get::<_, i64>(id_column).to_string()))
                .flatten(),
        }
    }
}

/// RFC 3339 in UTC, to the second, as every time in the API is written.
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC).replace_nanosecond(0).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(v: &str) -> Result<Option<time::OffsetDateTime>, ApiError> {
        Query::parse(Some(&format!("to={v}")))?.time("to")
    }

    #[test]
    fn times_are_answered_in_utc() {
        let t = time("2026-03-01T01:30:00%2B08:00").unwrap().unwrap();
        assert_eq!(t.offset(), time::UtcOffset::UTC);
        assert_eq!(rfc3339(t), "2026-02-28T17:30:00Z");
        // An unencoded `+` arrives as a space.
        assert_eq!(
            rfc3339(time("2026-03-01T01:30:00+08:00").unwrap().unwrap()),
            "2026-02-28T17:30:00Z"
        );
    }

    #[test]
    fn times_outside_1970_to_9998_utc_are_invalid_and_name_the_parameter() {
        for bad in [
            "9999-12-31T23:00:00-05:00",
            "9999-12-31T23:59:59Z",
            "9999-01-01T00:00:00Z",
            "9998-12-31T23:00:00-01:00",
            "0000-01-01T00:00:00Z",
            "0000-01-01T00:00:00%2B01:00",
            "1969-12-31T23:59:59Z",
            "1970-01-01T00:30:00%2B01:00",
            "-9999-01-01T00:00:00Z",
            "%2B10000-01-01T00:00:00Z",
        ] {
            match time(bad) {
                Err(e @ ApiError::InvalidRequest(_)) => assert!(e.to_string().starts_with("to "), "{bad}: {e}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        for good in [
            "1970-01-01T00:00:00Z",
            "9998-12-31T23:59:59Z",
            "9999-01-01T00:30:00%2B01:00",
        ] {
            assert!(time(good).is_ok_and(|t| t.is_some()), "{good}");
        }
    }
}
