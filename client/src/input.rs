//! The orders CSV: `merchant_order_no,sku,quantity[,max_unit_price]` with a header.
//!
//! The whole file is checked before anything is sent, and every problem is reported with
//! its line number: a file that is half wrong must not be half bought.

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::path::Path;

use anyhow::Context;

/// Orders are held in memory (they are resent until recorded); this bounds that memory
/// and any single run. Larger jobs are split into several files.
pub const ORDERS_MAX: usize = 1_000_000;
/// Well above a million orders' worth of CSV; the file is read whole.
const INPUT_BYTES_MAX: u64 = 256 << 20;
/// Problems listed before the rest are summarised, so one broken column does not print
/// a million lines.
const PROBLEMS_SHOWN_MAX: usize = 50;
/// The contract (docs/api.md) puts no limit on a SKU; this one only keeps a garbage cell out of every request.
const SKU_LEN_MAX: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderLine {
    pub merchant_order_no: String,
    pub sku: String,
    pub quantity: u32,
    /// Minor units (fen/cents); the server refuses with `price_changed` above it.
    pub max_unit_price: Option<u64>,
    /// Line in the file, for messages.
    pub line: u64,
}

/// Everything wrong with a file, one entry per problem, each with its line.
#[derive(Debug)]
pub struct InvalidInput {
    pub problems: Vec<String>,
    /// How many more problems there were beyond `problems`.
    pub more: usize,
}

impl fmt::Display for InvalidInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the orders file was refused; nothing was sent:")?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        if self.more > 0 {
            write!(f, "\n  ... and {} more problems", self.more)?;
        }
        Ok(())
    }
}

impl std::error::Error for InvalidInput {}

/// docs/api.md §3: 1 to 64 characters of `[A-Za-z0-9_.:-]`.
pub fn valid_merchant_order_no(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

pub fn read_orders_file(path: &Path) -> anyhow::Result<Vec<OrderLine>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut data = Vec::new();
    file.take(INPUT_BYTES_MAX + 1)
        .read_to_end(&mut data)
        .with_context(|| format!("reading {}", path.display()))?;
    if data.len() as u64 > INPUT_BYTES_MAX {
        anyhow::bail!(
            "{} is larger than {} MiB; split it into several runs",
            path.display(),
            INPUT_BYTES_MAX >> 20
        );
    }
    Ok(parse_orders(&data)?)
}

/// Line numbers from byte offsets. csv's own line count leaves out blank lines, which
/// would point people at the wrong line; records arrive in file order, so one forward scan
/// over the data serves every lookup.
struct Lines<'a> {
    data: &'a [u8],
    scanned: usize,
    line: u64,
}

impl Lines<'_> {
    fn at(&mut self, byte: u64) -> u64 {
        let mut byte = (byte as usize).min(self.data.len());
        // csv's record position starts before the blank lines it skipped.
        while matches!(self.data.get(byte), Some(b'\n' | b'\r')) {
            byte += 1;
        }
        if byte < self.scanned {
            // Not expected (records only move forward); recount from the start.
            self.scanned = 0;
            self.line = 1;
        }
        self.line += self.data[self.scanned..byte].iter().filter(|b| **b == b'\n').count() as u64;
        self.scanned = byte;
        self.line
    }
}

struct Columns {
    merchant_order_no: usize,
    sku: usize,
    quantity: usize,
    max_unit_price: Option<usize>,
}

struct Problems {
    shown: Vec<String>,
    more: usize,
}

impl Problems {
    fn add(&mut self, p: String) {
        if self.shown.len() < PROBLEMS_SHOWN_MAX {
            self.shown.push(p);
        } else {
            self.more += 1;
        }
    }

    fn into_result<T>(self, ok: T) -> Result<T, InvalidInput> {
        if self.shown.is_empty() {
            Ok(ok)
        } else {
            Err(InvalidInput {
                problems: self.shown,
                more: self.more,
            })
        }
    }
}

fn one(problem: String) -> InvalidInput {
    InvalidInput {
        problems: vec![problem],
        more: 0,
    }
}

fn columns(header: &csv::StringRecord) -> Result<Columns, InvalidInput> {
    let mut found: HashMap<&str, usize> = HashMap::new();
    let mut problems = Problems {
        shown: Vec::new(),
        more: 0,
    };
    for (i, name) in header.iter().enumerate() {
        match name {
            "merchant_order_no" | "sku" | "quantity" | "max_unit_price" => {
                if found.insert(name, i).is_some() {
                    problems.add(format!("line 1: column {name} appears twice in the header"));
                }
            }
            // A misspelt `max_unit_price` must not silently drop the caller's price guard.
            other => problems.add(format!(
                "line 1: unknown column {other:?} (expected merchant_order_no,sku,quantity[,max_unit_price])"
            )),
        }
    }
    for required in ["merchant_order_no", "sku", "quantity"] {
        if !found.contains_key(required) {
            problems.add(format!("line 1: the header has no {required} column"));
        }
    }
    let cols = Columns {
        merchant_order_no: found.get("merchant_order_no").copied().unwrap_or(0),
        sku: found.get("sku").copied().unwrap_or(0),
        quantity: found.get("quantity").copied().unwrap_or(0),
        max_unit_price: found.get("max_unit_price").copied(),
    };
    problems.into_result(cols)
}

/// Parses and validates a whole file. Empty lines are skipped; cells are trimmed.
pub fn parse_orders(data: &[u8]) -> Result<Vec<OrderLine>, InvalidInput> {
    let mut lines = Lines {
        data,
        scanned: 0,
        line: 1,
    };
    let mut csv = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .trim(csv::Trim::All)
        .from_reader(data);
    let header = match csv.headers() {
        Ok(h) if h.is_empty() => return Err(one("the file is empty: it needs a header line".into())),
        Ok(h) => h.clone(),
        Err(e) => return Err(one(format!("unreadable header: {}", csv_error(&e, &mut lines)))),
    };
    let cols = columns(&header)?;

    let mut orders = Vec::new();
    let mut problems = Problems {
        shown: Vec::new(),
        more: 0,
    };
    let mut first_seen: HashMap<String, u64> = HashMap::new();
    let mut record = csv::StringRecord::new();
    let mut rows: usize = 0;
    loop {
        match csv.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                // A malformed record (wrong field count, bad UTF-8) is reported and the
                // rest still checked, so one run lists every problem.
                problems.add(csv_error(&e, &mut lines));
                continue;
            }
        }
        let line = record.position().map_or(0, |p| lines.at(p.byte()));
        rows += 1;
        if rows > ORDERS_MAX {
            return Err(one(format!(
                "line {line}: more than {ORDERS_MAX} orders; split the file into several runs"
            )));
        }
        match parse_row(&record, &cols, line) {
            Ok(order) => {
                if let Some(first) = first_seen.get(&order.merchant_order_no) {
                    problems.add(format!(
                        "line {line}: merchant_order_no {} already appears on line {first}",
                        order.merchant_order_no
                    ));
                } else {
                    first_seen.insert(order.merchant_order_no.clone(), line);
                    orders.push(order);
                }
            }
            Err(row_problems) => {
                for p in row_problems {
                    problems.add(format!("line {line}: {p}"));
                }
            }
        }
    }
    problems.into_result(orders)
}

fn csv_error(e: &csv::Error, lines: &mut Lines<'_>) -> String {
    match e.position() {
        Some(pos) => format!("line {}: {}", lines.at(pos.byte()), e.kind_message()),
        None => e.kind_message(),
    }
}

trait KindMessage {
    fn kind_message(&self) -> String;
}

impl KindMessage for csv::Error {
    /// csv's own messages repeat the position; this keeps only what went wrong.
    fn kind_message(&self) -> String {
        match self.kind() {
            csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
                format!("{len} fields where the header has {expected_len}")
            }
            csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".into(),
            _ => self.to_string(),
        }
    }
}

fn parse_row(record: &csv::StringRecord, cols: &Columns, line: u64) -> Result<OrderLine, Vec<String>> {
    let cell = |i: usize| record.get(i).unwrap_or("");
    let mut problems = Vec::new();

    let merchant_order_no = cell(cols.merchant_order_no);
    if !valid_merchant_order_no(merchant_order_no) {
        problems.push(format!(
            "merchant_order_no {merchant_order_no:?}: needs 1 to 64 characters of A-Z a-z 0-9 _ . : -"
        ));
    }

    let sku = cell(cols.sku);
    if sku.is_empty() || sku.len() > SKU_LEN_MAX || sku.chars().any(char::is_control) {
        problems.push(format!(
            "sku {sku:?}: needs 1 to {SKU_LEN_MAX} bytes without control characters"
        ));
    }

    let quantity = match cell(cols.quantity).parse::<u32>() {
        Ok(q) if q > 0 => Some(q),
        _ => {
            problems.push(format!(
                "quantity {:?}: needs a positive whole number",
                cell(cols.quantity)
            ));
            None
        }
    };

    let max_unit_price = match cols.max_unit_price.map(cell).filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => match c.parse::<u64>() {
            Ok(p) => Some(p),
            Err(_) => {
                // "97.00" is the classic mistake: prices are minor units, never decimals.
                problems.push(format!(
                    "max_unit_price {c:?}: needs a whole number of minor units (fen/cents), or an empty cell"
                ));
                None
            }
        },
    };

    match quantity {
        Some(quantity) if problems.is_empty() => Ok(OrderLine {
            merchant_order_no: merchant_order_no.to_owned(),
            sku: sku.to_owned(),
            quantity,
            max_unit_price,
            line,
        }),
        _ => Err(problems),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<OrderLine>, InvalidInput> {
        parse_orders(text.as_bytes())
    }

    fn problems(text: &str) -> Vec<String> {
        problems_bytes(text.as_bytes())
    }

    fn problems_bytes(data: &[u8]) -> Vec<String> {
        match parse_orders(data) {
            Ok(o) => panic!("accepted: {o:?}"),
            Err(e) => e.problems,
        }
    }

    #[test]
    fn reads_a_good_file_with_and_without_prices() {
        let orders = parse(
            "merchant_order_no,sku,quantity,max_unit_price\n\
             M-1,steam-cn-100,2,9700\n\
             \n\
             M.2:x_y, 话费-100 ,1,\n",
        )
        .unwrap();
        assert_eq!(orders.len(), 2);
        assert_eq!(orders[0].max_unit_price, Some(9700));
        assert_eq!(orders[0].line, 2);
        assert_eq!(
            (
                orders[1].merchant_order_no.as_str(),
                orders[1].sku.as_str(),
                orders[1].quantity
            ),
            ("M.2:x_y", "话费-100", 1)
        );
        assert_eq!(orders[1].max_unit_price, None);
        assert_eq!(orders[1].line, 4);

        let no_price = parse("sku,quantity,merchant_order_no\r\nsteam,3,A\r\n").unwrap();
        assert_eq!(no_price[0].quantity, 3);
        assert_eq!(no_price[0].max_unit_price, None);
    }

    #[test]
    fn a_spreadsheet_byte_order_mark_is_not_part_of_the_header() {
        let orders = parse("\u{feff}merchant_order_no,sku,quantity\nM-1,s,1\n").unwrap();
        assert_eq!(orders[0].merchant_order_no, "M-1");
    }

    #[test]
    fn every_bad_row_is_reported_with_its_line() {
        let p = problems(
            "merchant_order_no,sku,quantity,max_unit_price\n\
             ok-1,s,1,\n\
             has space,s,1,\n\
             ok-2,s,0,\n\
             ok-3,s,-1,\n\
             ok-4,s,1.5,\n\
             ok-5,,2,\n\
             ok-6,s,2,97.00\n\
             ok-7,s,2\n\
             ,s,1,\n\
             ok-8,s,abc,\n",
        );
        let want = [
            "line 3: merchant_order_no",
            "line 4: quantity \"0\"",
            "line 5: quantity \"-1\"",
            "line 6: quantity \"1.5\"",
            "line 7: sku",
            "line 8: max_unit_price \"97.00\"",
            "line 9: 3 fields where the header has 4",
            "line 10: merchant_order_no \"\"",
            "line 11: quantity \"abc\"",
        ];
        assert_eq!(p.len(), want.len(), "{p:#?}");
        for (got, want) in p.iter().zip(want) {
            assert!(got.starts_with(want), "{got:?} should start with {want:?}");
        }
    }

    #[test]
    fn line_numbers_count_blank_lines_and_quoted_newlines() {
        let p = problems("merchant_order_no,sku,quantity\n\n\nA,\"two\nlines\",1\n\nB,s,0\n");
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].starts_with("line 4: sku"), "{p:?}");
        assert!(p[1].starts_with("line 7: quantity"), "{p:?}");
    }

    #[test]
    fn invalid_utf8_is_reported_with_its_line() {
        let p = problems_bytes(b"merchant_order_no,sku,quantity\nA,s,1\nB,\xff\xfe,1\n");
        assert_eq!(p, vec!["line 3: not valid UTF-8".to_string()]);
    }

    #[test]
    fn merchant_order_numbers_follow_the_api_rule() {
        assert!(valid_merchant_order_no(&"a".repeat(64)));
        assert!(!valid_merchant_order_no(&"a".repeat(65)));
        assert!(!valid_merchant_order_no("订单-1"));
        assert!(!valid_merchant_order_no("a/b"));
    }

    #[test]
    fn duplicates_are_refused_up_front_naming_both_lines() {
        let p = problems("merchant_order_no,sku,quantity\nA,s,1\nB,s,1\nA,t,2\n");
        assert_eq!(
            p,
            vec!["line 4: merchant_order_no A already appears on line 2".to_string()]
        );
    }

    #[test]
    fn headers_must_name_the_known_columns() {
        let p = problems("merchant_order_no,sku,qty,max_unit_prise\nA,s,1,5\n");
        assert!(p.iter().any(|p| p.contains("unknown column \"qty\"")), "{p:?}");
        assert!(
            p.iter().any(|p| p.contains("unknown column \"max_unit_prise\"")),
            "{p:?}"
        );
        assert!(p.iter().any(|p| p.contains("no quantity column")), "{p:?}");
        assert!(!problems("").is_empty());
    }

    #[test]
    fn a_huge_broken_file_lists_a_bounded_number_of_problems() {
        let mut text = String::from("merchant_order_no,sku,quantity\n");
        for i in 0..200 {
            text.push_str(&format!("M{i},s,0\n"));
        }
        let e = parse(&text).unwrap_err();
        assert_eq!(e.problems.len(), PROBLEMS_SHOWN_MAX);
        assert_eq!(e.more, 200 - PROBLEMS_SHOWN_MAX);
        assert!(e.to_string().contains("and 150 more"));
    }
}
