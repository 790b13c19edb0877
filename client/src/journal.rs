//! The output file, one JSON line per finished order, doubling as the resume journal.
//!
//! Codes are money, so a line is on disk (written and fsynced) before the next batch is
//! sent; a crash can lose at most the answer to the batch in flight, and that batch is
//! resent on resume, where the server answers its fulfilled orders as idempotent replays
//! with the same codes. A crash in the middle of a write leaves a torn last line: it is
//! cut off on resume, and its orders are resent like any other unrecorded order.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::input::OrderLine;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Fulfilled,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordError {
    pub code: String,
    pub message: String,
}

/// One output line. Every line carries the same keys (nulls and `[]` on failures), so
/// that tools reading the file need no special case; `error` only appears on failures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub merchant_order_no: String,
    pub status: Status,
    pub order_id: Option<String>,
    pub sku: String,
    pub quantity: u32,
    /// Minor units, in `currency`.
    pub amount: Option<u64>,
    pub currency: Option<String>,
    pub codes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RecordError>,
}

/// What resuming needs from a line: which order, and whether it succeeded. Read leniently
/// so that extra keys (from a later version of this tool) do not stop a resume.
#[derive(Debug, Clone, Deserialize)]
pub struct Recorded {
    pub merchant_order_no: String,
    pub status: Status,
    #[serde(default)]
    pub sku: Option<String>,
    #[serde(default)]
    pub quantity: Option<u32>,
}

#[derive(Debug, Default)]
pub struct Resumed {
    /// By merchant_order_no; the first line wins if a number appears twice.
    pub recorded: HashMap<String, Recorded>,
    /// Bytes of an incomplete last line cut off, 0 if none.
    pub torn_bytes: u64,
}

#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
}

impl Journal {
    /// Opens (or creates) the output file, reads what an earlier run recorded, repairs a
    /// torn last line, and locks the file so that a second run cannot interleave lines.
    pub fn open(path: &Path) -> anyhow::Result<(Journal, Resumed)> {
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => bail!(
                "{} is in use by another cardgate-client run; wait for it to finish",
                path.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
        if !existed {
            sync_parent_dir(path)?;
        }
        let mut journal = Journal {
            file,
            path: path.to_owned(),
        };
        let resumed = journal.recover()?;
        Ok((journal, resumed))
    }

    fn recover(&mut self) -> anyhow::Result<Resumed> {
        let display = self.path.display().to_string();
        self.file.seek(SeekFrom::Start(0))?;
        let mut reader = BufReader::new(&self.file);
        let mut resumed = Resumed::default();
        let mut line = Vec::new();
        let mut offset: u64 = 0;
        // End of the last line that parsed, and whether it lacked its newline.
        let mut good_end: u64 = 0;
        let mut good_needs_newline = false;
        let mut bad: Option<(u64, String)> = None;
        let mut line_no: u64 = 0;
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .with_context(|| format!("reading {display}"))? as u64;
            if n == 0 {
                break;
            }
            line_no += 1;
            if let Some((bad_line, why)) = bad.take() {
                // Only the last line can be torn by a crash; damage before it means the
                // file is not (only) ours, and appending to it would be guessing.
                bail!(
                    "{display}: line {bad_line} is not an order record ({why}); \
                     refusing to resume into a file this tool did not write"
                );
            }
            let complete = line.ends_with(b"\n");
            let content = trim_ascii_whitespace(&line);
            offset += n;
            if content.is_empty() {
                if complete {
                    good_end = offset;
                    good_needs_newline = false;
                }
                continue;
            }
            match serde_json::from_slice::<Recorded>(content) {
                Ok(r) => {
                    resumed.recorded.entry(r.merchant_order_no.clone()).or_insert(r);
                    good_end = offset;
                    good_needs_newline = !complete;
                }
                Err(e) => bad = Some((line_no, e.to_string())),
            }
        }
        drop(reader);
        if bad.is_some() || good_end < offset {
            resumed.torn_bytes = offset - good_end;
            self.file
                .set_len(good_end)
                .with_context(|| format!("cutting the torn last line off {display}"))?;
        }
        if good_needs_newline {
            // The crash fell between a record and its newline: the record is whole, the
            // next one must still start on a line of its own.
            self.file.write_all(b"\n")?;
        }
        if resumed.torn_bytes > 0 || good_needs_newline {
            self.file.sync_data().with_context(|| format!("syncing {display}"))?;
        }
        Ok(resumed)
    }

    /// Appends one batch's records in one write and syncs them to disk before returning.
    pub fn append(&mut self, records: &[Record]) -> anyhow::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(records.len() * 256);
        for r in records {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
        }
        let display = self.path.display();
        self.file
            .write_all(&buf)
            .with_context(|| format!("writing {display}"))?;
        self.file.flush()?;
        self.file.sync_data().with_context(|| format!("syncing {display}"))?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The orders of `orders` an earlier run has not recorded, in file order, plus what the
/// earlier run recorded for the others.
#[derive(Debug, Default)]
pub struct ResumePlan {
    pub to_send: Vec<OrderLine>,
    pub already_fulfilled: u64,
    pub already_failed: u64,
    /// Recorded orders whose sku or quantity differ from the file now: `(line, message)`.
    /// They are skipped all the same (the server would refuse them as
    /// `idempotency_conflict`), but the person running the script should know.
    pub changed: Vec<String>,
}

pub fn plan_resume(orders: Vec<OrderLine>, resumed: &Resumed) -> ResumePlan {
    let mut plan = ResumePlan::default();
    for o in orders {
        let Some(r) = resumed.recorded.get(&o.merchant_order_no) else {
            plan.to_send.push(o);
            continue;
        };
        match r.status {
            Status::Fulfilled => plan.already_fulfilled += 1,
            Status::Failed => plan.already_failed += 1,
        }
        let sku_differs = r.sku.as_deref().is_some_and(|s| s != o.sku);
        let quantity_differs = r.quantity.is_some_and(|q| q != o.quantity);
        if sku_differs || quantity_differs {
            plan.changed.push(format!(
                "line {}: {} is already recorded with sku {} quantity {}; the file now says sku {} quantity {}",
                o.line,
                o.merchant_order_no,
                r.sku.as_deref().unwrap_or("?"),
                r.quantity.map_or("?".into(), |q| q.to_string()),
                o.sku,
                o.quantity
            ));
        }
    }
    plan
}

fn trim_ascii_whitespace(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

/// A new file's directory entry is only durable once its directory is synced.
fn sync_parent_dir(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(parent)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn temp_path(name: &str) -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "cardgate-client-journal-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    fn fulfilled(mon: &str) -> Record {
        Record {
            merchant_order_no: mon.into(),
            status: Status::Fulfilled,
            order_id: Some(format!("ord_{mon}")),
            sku: "steam-cn-100".into(),
            quantity: 1,
            amount: Some(9650),
            currency: Some("CNY".into()),
            codes: vec![format!("CODE-{mon}")],
            error: None,
        }
    }

    fn failed(mon: &str) -> Record {
        Record {
            merchant_order_no: mon.into(),
            status: Status::Failed,
            order_id: None,
            sku: "steam-cn-100".into(),
            quantity: 1,
            amount: None,
            currency: None,
            codes: vec![],
            error: Some(RecordError {
                code: "out_of_stock".into(),
                message: "no".into(),
            }),
        }
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn records_have_the_documented_shape() {
        let v = serde_json::to_value(fulfilled("A")).unwrap();
        assert_eq!(v["status"], "fulfilled");
        assert_eq!(v["codes"][0], "CODE-A");
        assert!(v.get("error").is_none());
        let v = serde_json::to_value(failed("B")).unwrap();
        assert_eq!(v["status"], "failed");
        assert_eq!(v["error"]["code"], "out_of_stock");
        assert!(v["order_id"].is_null());
    }

    #[test]
    fn resumes_after_a_torn_last_line_and_appends_cleanly() {
        let path = temp_path("codes.jsonl");
        {
            let (mut j, r) = Journal::open(&path).unwrap();
            assert!(r.recorded.is_empty());
            j.append(&[fulfilled("A"), failed("B")]).unwrap();
        }
        // A crash in the middle of the next write.
        let full = serde_json::to_string(&fulfilled("C")).unwrap();
        let torn = &full[..full.len() / 2];
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(torn.as_bytes()).unwrap();
        drop(f);

        let (mut j, r) = Journal::open(&path).unwrap();
        assert_eq!(r.torn_bytes, torn.len() as u64);
        assert_eq!(r.recorded.len(), 2);
        assert_eq!(r.recorded["A"].status, Status::Fulfilled);
        assert_eq!(r.recorded["B"].status, Status::Failed);
        assert!(!r.recorded.contains_key("C"));
        j.append(&[fulfilled("C")]).unwrap();
        drop(j);

        let all = lines(&path);
        let mons: Vec<&str> = all.iter().map(|v| v["merchant_order_no"].as_str().unwrap()).collect();
        assert_eq!(mons, ["A", "B", "C"]);
    }

    #[test]
    fn a_whole_record_missing_only_its_newline_is_kept() {
        let path = temp_path("codes.jsonl");
        let line = serde_json::to_string(&fulfilled("A")).unwrap();
        std::fs::write(&path, line).unwrap();
        let (mut j, r) = Journal::open(&path).unwrap();
        assert_eq!(r.torn_bytes, 0);
        assert!(r.recorded.contains_key("A"));
        j.append(&[fulfilled("B")]).unwrap();
        drop(j);
        assert_eq!(lines(&path).len(), 2);
    }

    #[test]
    fn a_torn_line_ending_in_invalid_utf8_is_cut_too() {
        let path = temp_path("codes.jsonl");
        let mut bytes = serde_json::to_vec(&fulfilled("A")).unwrap();
        bytes.push(b'\n');
        bytes.extend_from_slice(b"{\"merchant_order_no\":\"\xe5\x8d");
        std::fs::write(&path, &bytes).unwrap();
        let (_j, r) = Journal::open(&path).unwrap();
        assert_eq!(r.recorded.len(), 1);
        assert_eq!(r.torn_bytes, 24);
    }

    #[test]
    fn damage_before_the_last_line_is_refused() {
        let path = temp_path("codes.jsonl");
        let good = serde_json::to_string(&fulfilled("A")).unwrap();
        std::fs::write(&path, format!("not json\n{good}\n")).unwrap();
        let e = Journal::open(&path).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        // Nothing was cut from a file that is not ours.
        assert!(std::fs::read_to_string(&path).unwrap().starts_with("not json"));
    }

    #[test]
    fn resuming_skips_recorded_orders_and_flags_changed_ones() {
        let path = temp_path("codes.jsonl");
        {
            let (mut j, _) = Journal::open(&path).unwrap();
            j.append(&[fulfilled("A"), failed("B")]).unwrap();
        }
        let (_j, resumed) = Journal::open(&path).unwrap();
        let line = |mon: &str, quantity: u32, line: u64| OrderLine {
            merchant_order_no: mon.into(),
            sku: "steam-cn-100".into(),
            quantity,
            max_unit_price: None,
            line,
        };
        let plan = plan_resume(vec![line("A", 1, 2), line("B", 3, 3), line("C", 1, 4)], &resumed);
        assert_eq!(plan.to_send, vec![line("C", 1, 4)]);
        assert_eq!((plan.already_fulfilled, plan.already_failed), (1, 1));
        assert_eq!(plan.changed.len(), 1);
        assert!(plan.changed[0].starts_with("line 3: B"), "{:?}", plan.changed);
    }

    #[test]
    fn a_second_run_on_the_same_file_is_refused() {
        let path = temp_path("codes.jsonl");
        let (_first, _) = Journal::open(&path).unwrap();
        let e = Journal::open(&path).unwrap_err().to_string();
        assert!(e.contains("in use"), "{e}");
    }
}
