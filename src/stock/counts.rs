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
//! count is used for `redis.catalogue_counts_ms` from when its fetch began: Redis does that
//! work a few times a second whatever the rate of reads. One product's own route
//! (`GET /v1/products/{sku}`) and smaller catalogues stay counted live.
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
            fetching: tokio::sync::Mutex::default(),
        }
    }

    /// Each of `products`' codes over every cell, counted at most `max_age` ago.
    pub async fn of(&self, app: &App, products: &[i64]) -> redis::RedisResult<Arc<Counted>> {
        if let Some(sums) = self.fresh(products) {
            return Ok(sums);
        }
        let _turn = self.fetching.lock().await;
        // The fetch this read waited for may have counted what it needs.
        if let Some(sums) = self.fresh(products) {
            return Ok(sums);
        }
        let began = Instant::now();
        let mut pipe = redis::pipe();
        for &product in products {
            for cell in app.keys.all_cells() {
                pipe.cmd("LLEN").arg(app.keys.stock(cell, product));
            }
        }
        let lens: Vec<i64> = pipe.query_async(&mut app.redis()).await?;
        let cells = app.keys.all_cells().count().max(1);
        if lens.len() != products.len() * cells {
            return Err(std::io::Error::other("pool counts that are not what was asked").into());
        }
        let counted = Arc::new(Counted {
            began,
            products: products.to_vec(),
            sums: lens.chunks(cells).map(|c| c.iter().sum()).collect(),
            answers: Mutex::default(),
        });
        if let Ok(mut latest) = self.latest.lock() {
            *latest = Some(Arc::clone(&counted));
        }
        Ok(counted)
    }

    fn fresh(&self, products: &[i64]) -> Option<Arc<Counted>> {
        let latest = self.latest.lock().ok()?;
        let c = latest.as_ref()?;
        (c.products == products && c.began.elapsed() < self.max_age).then(|| Arc::clone(c))
    }
}
