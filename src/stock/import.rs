//! Streamed code import: lines are encrypted and inserted in batches, each batch then
//! pushed onto the product's Redis stock list.
//!
//! Each batch commits on its own, so an import cut short keeps what went in and can be
//! re-run; its audit row (`codes.import`, the counts) therefore follows the batches
//! rather than sharing their transaction.

use std::time::Duration;

use crate::store::redis::Redis;
use bytes::Bytes;
use deadpool_postgres::Pool;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Serialize;

use super::lines::{Line, Splitter};
use crate::app::App;
use crate::audit::{Actor, Audited};
use crate::crypto::{Crypto, Purpose};
use crate::error::ApiError;
use crate::store::keys::Keys;

/// Codes per Postgres statement: large enough to amortise the round trip and the commit,
/// small enough to keep the import's memory modest. 10,000 imported about 15% faster but
/// doubled the memory an import adds (about 26 MB to 48 MB, measured by the binary test).
pub const IMPORT_BATCH_CODES_MAX: usize = 5000;

#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct ImportReport {
    pub imported: u64,
    pub duplicates: u64,
    pub rejected: u64,
}

/// Imports `body` (one code per line) into the product `sku` within the configured size
/// and time limits, and audits it.
pub async fn import(app: &App, actor: &Actor, sku: &str, body: Incoming) -> Result<ImportReport, ApiError> {
    // No connection is held while the body streams in: each batch takes its own.
    let product_id = crate::catalogue::products::id_of(&app.pg.get().await?, sku).await?;
    let importer = Importer {
        pg: &app.pg,
        redis: app.redis(),
        crypto: &app.crypto,
        keys: &app.keys,
        product_id,
    };
    let mut report = ImportReport::default();
    let limit = app.config.http.import_body_max_bytes;
    let timeout = Duration::from_millis(app.config.http.import_read_timeout_ms);
    let done = importer.run(body, limit, timeout, &mut report).await;
    // An import cut short keeps the batches it committed: audited all the same, with what
    // went in and what stopped it (re-running it is safe: known codes are duplicates).
    if done.is_ok() || report.imported > 0 {
        let mut detail = serde_json::to_value(report).map_err(ApiError::internal)?;
        if let Err(e) = &done {
            detail["interrupted_by"] = serde_json::json!(e.code());
        }
        let mut client = app.pg.get().await?;
        Audited::begin(&mut client, actor, "codes.import", sku)
            .await?
            .commit(detail)
            .await?;
    }
    done?;
    Ok(report)
}

pub struct Importer<'a> {
    pub pg: &'a Pool,
    pub redis: Redis,
    pub crypto: &'a Crypto,
    pub keys: &'a Keys,
    pub product_id: i64,
}

struct Batch {
    hashes: Vec<Vec<u8>>,
    sealed: Vec<Vec<u8>>,
}

impl Importer<'_> {
    /// Reads `body` to its end within `timeout` and at most `limit` bytes.
    /// Imports the body into `report`, which on an error still counts what was committed
    /// before it (batches already in stay in).
    pub async fn run(
        &self,
        mut body: Incoming,
        limit: u64,
        timeout: Duration,
        report: &mut ImportReport,
    ) -> Result<(), ApiError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut splitter = Splitter::default();
        let mut batch = Batch {
            hashes: Vec::new(),
            sealed: Vec::new(),
        };
        let mut read: u64 = 0;
        loop {
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => return Err(ApiError::SlowBody),
                Ok(None) => break,
                Ok(Some(Err(_))) => return Err(ApiError::invalid("request body could not be read")),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else { continue };
            read += data.len() as u64;
            if read > limit {
                return Err(ApiError::PayloadTooLarge);
            }
            self.split(&mut splitter, &data, false, &mut batch, report);
            if batch.hashes.len() >= IMPORT_BATCH_CODES_MAX {
                self.flush(&mut batch, report).await?;
            }
        }
        self.split(&mut splitter, &Bytes::new(), true, &mut batch, report);
        self.flush(&mut batch, report).await
    }

    fn split(&self, splitter: &mut Splitter, data: &[u8], last: bool, batch: &mut Batch, report: &mut ImportReport) {
        let purpose = Purpose::Code {
            product_id: self.product_id,
        };
        let mut emit = |line: Line<'_>| match line {
            Line::Code(code) => {
                batch.hashes.push(self.crypto.code_hash(code.as_bytes()).to_vec());
                batch.sealed.push(self.crypto.encrypt(purpose, code.as_bytes()));
            }
            Line::Rejected => report.rejected += 1,
            Line::Blank => {}
        };
        splitter.push(data, &mut emit);
        if last {
            splitter.finish(&mut emit);
        }
    }

    /// Inserts the batch, skipping codes the product already has (in this body or
    /// before), and pushes the new ones onto the Redis stock list before committing:
    /// if Redis refuses, nothing of the batch is kept and the import can simply be re-run.
    async fn flush(&self, batch: &mut Batch, report: &mut ImportReport) -> Result<(), ApiError> {
        if batch.hashes.is_empty() {
            return Ok(());
        }
        let mut client = self.pg.get().await?;
        let tx = client.transaction().await?;
        // Pushed to Redis inside the fence, so a rebuild cannot come between.
        crate::rebuild::fence(&tx).await?;
        let rows = tx
            .query(
                "INSERT INTO codes (product_id, code_hash, code_enc)
                 SELECT $1, h, e FROM unnest($2::bytea[], $3::bytea[]) AS t(h, e)
                 ON CONFLICT (product_id, code_hash) DO NOTHING
                 RETURNING id, code_enc",
                &[&self.product_id, &batch.hashes, &batch.sealed],
            )
            .await?;
        let elements: Vec<Vec<u8>> = rows
            .iter()
            .map(|r| super::element(r.get(0), r.get::<_, &[u8]>(1)))
            .collect();
        if !elements.is_empty() {
            let mut redis = self.redis.clone();
            // Into the product's import cell; the mover spreads them over the others.
            redis::cmd("RPUSH")
                .arg(
                    self.keys
                        .stock(super::mover::import_cell(self.keys, self.product_id), self.product_id),
                )
                .arg(&elements)
                .query_async::<()>(&mut redis)
                .await?;
            // Before the import answers: no gateway's sell-out of this product still holds.
            if let Err(e) = super::sold_out::restocked(&mut redis, self.keys, self.product_id).await {
                self.take_back(&elements).await;
                return Err(e.into());
            }
        }
        if let Err(e) = tx.commit().await {
            self.take_back(&elements).await;
            return Err(e.into());
        }
        report.imported += elements.len() as u64;
        report.duplicates += (batch.hashes.len() - elements.len()) as u64;
        metrics::counter!("cardgate_codes_imported_total").increment(elements.len() as u64);
        batch.hashes.clear();
        batch.sealed.clear();
        Ok(())
    }

    /// Codes pushed to Redis whose batch is not committed: taken back out, so nothing
    /// unrecorded can be sold.
    async fn take_back(&self, elements: &[Vec<u8>]) {
        let pool = self
            .keys
            .stock(super::mover::import_cell(self.keys, self.product_id), self.product_id);
        let mut redis = self.redis.clone();
        let mut pipe = redis::pipe();
        for el in elements {
            pipe.cmd("LREM").arg(&pool).arg(1).arg(el).ignore();
        }
        let _ = pipe.query_async::<()>(&mut redis).await;
    }
}
