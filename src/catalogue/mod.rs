//! The product catalogue in memory: prices, limits and status for the hot path, reloaded
//! whole on a published change and every `CACHE_REFRESH_SECS` (see `crate::sync`).
//! Products and their prices as Postgres records them, and the operator's changes to
//! them, are [`products`].

pub mod products;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use anyhow::Context;
use deadpool_postgres::Pool;

use crate::sync::Latest;

#[derive(Debug)]
pub struct Product {
    pub id: i64,
    pub sku: String,
    pub name: String,
    pub face_value: i64,
    pub base_price: i64,
    pub tier_prices: HashMap<String, i64>,
    pub max_quantity: i32,
    pub on_sale: bool,
    /// Where its orders' codes may come from (docs/api.md §8).
    pub sourcing: crate::reserve::Sourcing,
}

impl Product {
    /// The price a caller of `tier` pays: its tier price, or the base price.
    pub fn price_for(&self, tier: &str) -> i64 {
        self.tier_prices.get(tier).copied().unwrap_or(self.base_price)
    }
}

#[derive(Default)]
pub struct Catalogue {
    products: Latest<BTreeMap<String, Arc<Product>>>,
}

impl Catalogue {
    pub fn get(&self, sku: &str) -> Option<Arc<Product>> {
        self.snapshot().get(sku).cloned()
    }

    pub fn snapshot(&self) -> Arc<BTreeMap<String, Arc<Product>>> {
        self.products.get()
    }

    pub async fn reload(&self, pg: &Pool) -> anyhow::Result<()> {
        let ticket = self.products.ticket();
        let client = pg.get().await.context("loading the catalogue")?;
        let rows = client
            .query(
                "SELECT p.id, p.sku, p.name, p.face_value, p.base_price, p.max_quantity, p.status,
                        coalesce((SELECT jsonb_object_agg(tier, price) FROM product_tier_prices WHERE product_id = p.id), '{}'),
                        p.source_mode, EXISTS (SELECT 1 FROM product_sources s WHERE s.product_id = p.id)
                 FROM products p",
                &[],
            )
            .await
            .context("loading the catalogue")?;
        let mut products = BTreeMap::new();
        for r in rows {
            let tier_prices: HashMap<String, i64> =
                serde_json::from_value(r.get::<_, serde_json::Value>(7)).context("tier prices")?;
            let p = Product {
                id: r.get(0),
                sku: r.get(1),
                name: r.get(2),
                face_value: r.get(3),
                base_price: r.get(4),
                max_quantity: r.get(5),
                on_sale: r.get::<_, &str>(6) == "on_sale",
                tier_prices,
                sourcing: match (r.get::<_, &str>(8), r.get::<_, bool>(9)) {
                    ("upstream_only", true) => crate::reserve::Sourcing::Only,
                    ("upstream_only", false) => crate::reserve::Sourcing::Nowhere,
                    (_, false) => crate::reserve::Sourcing::Local,
                    _ => crate::reserve::Sourcing::Fallback,
                },
            };
            products.insert(p.sku.clone(), Arc::new(p));
        }
        self.products.install(ticket, products);
        Ok(())
    }
}
