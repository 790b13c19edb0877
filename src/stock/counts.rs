//! A large catalogue's stock counts, taken by one fetch that the catalogue reads of a
//! moment share.
//!
//! A product's `available` is the sum of its pools over every cell, an `LLEN` per cell.
//! A catalogue read asks them live in its coalesced pipeline, each product's once however
//! many reads share the pipeline. But pipelines follow one another as fast as Redis
//! answers: with a thousand products on sixteen cells each one was 16,000 commands, and
//! 64 connections reading the catalogue (1,500 reads a second) kept Redis so busy that
//! orders at 2,000/s went from a median of 4 ms to 90 ms. A catalogue listing more than
//! `redis.catalogue_live_max` products is therefore counted by one fetch at a time, and a
//! read takes a count whose fetch began at most `redis.catalogue_counts_ms` before the
//! read arrived, or waits for the next fetch with everyone who arrived meanwhile (its
//! failure too is theirs): Redis counts the catalogue one fetch after another at most,
//! whatever the rate of reads. One product's own route (`GET /v1/products/{sku}`) and
//! smaller catalogues stay counted live.
//!
//! Every read of one tier given the same counts and the same catalogue gets the same
//! answer, so the answer is written once ([`Counted::answer`]): a thousand products are
//! about 150 KB of JSON, and writing it for each read was the gateway's largest cost.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::app::App;
use crate::catalogue::Product;

/// A catalogue as the gateway holds it (`crate::catalogue::Catalogue::snapshot`).
pub type Snapshot = Arc<BTreeMap<String, Arc<Product>>>;

/// Answers kept per count, at most: one per tier for each catalogue seen meanwhile.
const ANSWERS_MAX: usize = 32;

pub struct CatalogueCounts {
    max_age: Duration,
    latest: Mutex<Option<Arc<Counted>>>,
    /// When the last fetch that failed began, and why it failed.
    failed: Mutex<Option<(Instant, String)>>,
    /// One fetch at a time: the reads that find the counts too old wait for the same one.
    fetching: tokio::sync::Mutex<()>,
}

pub struct Counted {
    began: Instant,
    products: Vec<i64>,
    /// Each product's codes over every cell, in the order asked.
    pub sums: Vec<i64>,
    /// Answers written from these counts: tier, the catalogue they list, the body.
    answers: Mutex<Vec<(String, Snapshot, Bytes)>>,
}

impl Counted {
    /// The answer for `tier` listing `catalogue` from these counts, written by `write` the
    /// first time it is asked.
    pub fn answer<E>(
        &self,
        tier: &str,
        catalogue: &Snapshot,
        write: impl FnOnce() -> Result<Bytes, E>,
    ) -> Result<Bytes, E> {
        let kept = |answers: &[(String, Snapshot, Bytes)]| {
            answers
                .iter()
                .find(|(t, c, _)| t == tier && Arc::ptr_eq(c, catalogue))
                .map(|(_, _, body)| body.clone())
        };
        if let Some(body) = self.answers.lock().ok().and_then(|a| kept(&a)) {
            return Ok(body);
        }
        let body = write()?;
        if let Ok(mut answers) = self.answers.lock() {
            if answers.len() < ANSWERS_MAX && kept(&answers).is_none() {
                answers.push((tier.to_owned(), Arc::clone(catalogue), body.clone()));
            }
        }
        Ok(body)
    }
}

impl CatalogueCounts {
    pub fn new(max_age: Duration) -> CatalogueCounts {
        CatalogueCounts {
            max_age,
            latest: Mutex::default(),
            failed: Mutex::default(),
            fetching: tokio::sync::Mutex::default(),
        }
    }

    /// Each of `products`' codes over every cell, from a fetch that began at most
    /// `max_age` before this call.
    pub async fn of(&self, app: &App, products: &[i64]) -> redis::RedisResult<Arc<Counted>> {
        let arrived = Instant::now();
        let oldest = arrived.checked_sub(self.max_age);
        if let Some(counted) = self.since(products, oldest) {
            return Ok(counted);
        }
        let _turn = self.fetching.lock().await;
        // The fetch this read waited for, if it began in time, answers it.
        if let Some(counted) = self.since(products, oldest) {
            return Ok(counted);
        }
        if let Some((_, why)) = self
            .failed
            .lock()
            .ok()
            .and_then(|f| f.clone())
            .filter(|(began, _)| *began >= arrived)
        {
            return Err(std::io::Error::other(format!("counting the catalogue failed: {why}")).into());
        }
        let began = Instant::now();
        let counted = self.fetch(app, products, began).await;
        if let Err(e) = &counted {
            if let Ok(mut failed) = self.failed.lock() {
                *failed = Some((began, e.to_string()));
            }
        }
        counted
    }

    async fn fetch(&self, app: &App, products: &[i64], began: Instant) -> redis::RedisResult<Arc<Counted>> {
        let sums = crate::stock::mover::available(&mut app.redis(), &app.keys, products).await?;
        let counted = Arc::new(Counted {
            began,
            products: products.to_vec(),
            sums,
            answers: Mutex::default(),
        });
        if let Ok(mut latest) = self.latest.lock() {
            *latest = Some(Arc::clone(&counted));
        }
        Ok(counted)
    }

    /// The latest count of `products`, if its fetch began at `oldest` or later (`None`: any).
    fn since(&self, products: &[i64], oldest: Option<Instant>) -> Option<Arc<Counted>> {
        let latest = self.latest.lock().ok()?;
        let c = latest.as_ref()?;
        (c.products == products && oldest.is_none_or(|t| c.began >= t)).then(|| Arc::clone(c))
    }
}
