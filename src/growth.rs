//! Tiers earned by spend (docs/api.md §6, "Growth").
//!
//! A reseller's spend is the amount of its fulfilled orders over the `[vip]` window (the
//! current UTC day and the `window_days - 1` before it), refunds taken out: the
//! `reseller_daily` rollup plus what commits appended to `sales_pending` since the last
//! fold (an order bought upstream enters them once fulfilled). Every gateway runs
//! [`step`] every `EVERY`: it moves a reseller up as soon as its spend reaches a higher
//! tier's `upgrade_spend`, and down once spend has stayed below its tier's
//! `upgrade_spend` for `downgrade_grace_days`, never below the `base_tier` an operator
//! gave and never while `tier_locked`.
//!
//! Each change is its own transaction on the reseller's locked row, made only if the row
//! still says what the step read: two gateways stepping at once make one change, audited
//! once (actor `system`) and called back once (`reseller.tier_changed`, with the price
//! changes a new tier brings). The key caches are then reloaded everywhere, so the new
//! tier's prices and limits apply on every gateway at once.

use std::sync::Arc;
use std::time::Duration;

use time::{Date, OffsetDateTime};
use tokio_postgres::GenericClient;

use crate::app::App;
use crate::audit::{Actor, Audited};
use crate::callbacks::events::{self, Repricing};
use crate::config::Config;
use crate::error::ApiError;

/// Well inside the contract's minute between the commit that crosses a threshold and
/// the upgrade.
const EVERY: Duration = Duration::from_secs(15);

pub async fn run(app: Arc<App>) {
    let app = &app;
    crate::every(EVERY, move || async move {
        if let Err(e) = step(app).await {
            tracing::warn!(error = format!("{e:#}"), "tier changes not evaluated");
        }
    })
    .await
}

/// A tier change the step made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub reseller_id: String,
    pub from: String,
    pub to: String,
    /// `upgrade` or `downgrade`.
    pub reason: &'static str,
}

/// The first day of the window that ends today.
pub fn window_start(config: &Config, now: OffsetDateTime) -> Date {
    let back = i64::from(config.vip.window_days.saturating_sub(1));
    now.date().checked_sub(time::Duration::days(back)).unwrap_or(Date::MIN)
}

/// One reseller's spend over the window, as of the last commit.
pub async fn spend<C: GenericClient>(client: &C, reseller_pk: i64, since: Date) -> Result<i64, ApiError> {
    let row = client
        .query_one(
            "SELECT (coalesce((SELECT sum(amount) FROM reseller_daily WHERE reseller_id = $1 AND day >= $2), 0)
                   + coalesce((SELECT sum(amount) FROM sales_pending WHERE reseller_id = $1 AND day >= $2), 0))::int8",
            &[&reseller_pk, &since],
        )
        .await?;
    Ok(row.get(0))
}

/// The tier above `tier` that spend earns next: the lowest-priority tier with an
/// `upgrade_spend` whose priority is above it (`None` at the top).
pub fn next_tier<'a>(config: &'a Config, tier: &str) -> Option<(&'a str, i64)> {
    let current = config.tiers.get(tier).map_or(0, |t| t.priority);
    config
        .tiers
        .iter()
        .filter_map(|(name, t)| t.upgrade_spend.map(|s| (name.as_str(), t.priority, s)))
        .filter(|(_, p, _)| *p > current)
        .min_by_key(|(_, p, _)| *p)
        .map(|(name, _, s)| (name, s))
}

/// The highest-priority tier `spend` earns, if any.
fn earned(config: &Config, spend: i64) -> Option<&str> {
    config
        .tiers
        .iter()
        .filter(|(_, t)| t.upgrade_spend.is_some_and(|s| spend >= s))
        .max_by_key(|(_, t)| t.priority)
        .map(|(name, _)| name.as_str())
}

/// What growth makes of one reseller now: a new tier, or what to do with the grace clock.
#[derive(Debug, PartialEq, Eq)]
enum Verdict<'a> {
    Keep,
    /// Spend is below the tier's `upgrade_spend`: the grace period runs from now.
    StartGrace,
    /// Spend covers the tier again: the grace period is off.
    StopGrace,
    Move(&'a str, &'static str),
}

fn verdict<'a>(
    config: &'a Config,
    tier: &str,
    base_tier: &'a str,
    below_since: Option<OffsetDateTime>,
    spend: i64,
    now: OffsetDateTime,
) -> Verdict<'a> {
    let priority = |t: &str| config.tiers.get(t).map_or(0, |t| t.priority);
    let earned = earned(config, spend);
    if let Some(up) = earned.filter(|e| priority(e) > priority(tier)) {
        return Verdict::Move(up, "upgrade");
    }
    // Below its tier's threshold, and with somewhere to go: the base tier is the floor.
    let below = match config.tiers.get(tier).and_then(|t| t.upgrade_spend) {
        Some(s) => tier != base_tier && spend < s,
        // A tier without a threshold is an operator's to give and take.
        None => false,
    };
    match (below, below_since) {
        (false, None) => Verdict::Keep,
        (false, Some(_)) => Verdict::StopGrace,
        (true, None) => Verdict::StartGrace,
        (true, Some(since)) => {
            let grace = time::Duration::days(i64::from(config.vip.downgrade_grace_days));
            if now - since < grace {
                return Verdict::Keep;
            }
            // The highest tier the spend earns, never below the operator's.
            let to = match earned {
                Some(e) if priority(e) > priority(base_tier) => e,
                _ => base_tier,
            };
            if to == tier {
                Verdict::StopGrace
            } else {
                Verdict::Move(to, "downgrade")
            }
        }
    }
}

/// Evaluates every reseller not locked once; answers the tier changes it made.
pub async fn step(app: &App) -> anyhow::Result<Vec<Change>> {
    let config = &app.config;
    if config.tiers.values().all(|t| t.upgrade_spend.is_none()) {
        return Ok(Vec::new());
    }
    let mut client = app.pg.get().await?;
    crate::rollups::fold(&client).await?;
    let now = app.clock.now();
    let since = window_start(config, now);
    let rows = client
        .query(
            "SELECT r.id, r.reseller_id, r.tier, r.base_tier, r.below_since,
                    (coalesce(d.amount, 0) + coalesce(p.amount, 0))::int8
               FROM resellers r
               LEFT JOIN (SELECT reseller_id, sum(amount) AS amount FROM reseller_daily WHERE day >= $1 GROUP BY 1) d
                      ON d.reseller_id = r.id
               LEFT JOIN (SELECT reseller_id, sum(amount) AS amount FROM sales_pending WHERE day >= $1 GROUP BY 1) p
                      ON p.reseller_id = r.id
              WHERE NOT r.tier_locked
              ORDER BY r.id",
            &[&since],
        )
        .await?;
    let mut changes = Vec::new();
    for r in rows {
        let (pk, reseller_id, tier, base_tier): (i64, String, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let below_since: Option<OffsetDateTime> = r.get(4);
        let spend: i64 = r.get(5);
        let guard = (&pk, &tier);
        match verdict(config, &tier, &base_tier, below_since, spend, now) {
            Verdict::Keep => {}
            Verdict::StartGrace => {
                client
                    .execute(
                        "UPDATE resellers SET below_since = $3 WHERE id = $1 AND tier = $2 AND below_since IS NULL
                            AND NOT tier_locked",
                        &[guard.0, guard.1, &now],
                    )
                    .await?;
            }
            Verdict::StopGrace => {
                client
                    .execute(
                        "UPDATE resellers SET below_since = NULL WHERE id = $1 AND tier = $2",
                        &[guard.0, guard.1],
                    )
                    .await?;
            }
            Verdict::Move(to, reason) => {
                if move_tier(app, &mut client, pk, &reseller_id, &tier, to, reason).await? {
                    changes.push(Change {
                        reseller_id,
                        from: tier.clone(),
                        to: to.to_string(),
                        reason,
                    });
                }
            }
        }
    }
    drop(client);
    if !changes.is_empty() {
        crate::sync::changed(app).await;
    }
    Ok(changes)
}

/// Moves one reseller from `from` to `to` if its row still has `from` and is not
/// locked; says whether it did.
async fn move_tier(
    app: &App,
    client: &mut deadpool_postgres::Object,
    pk: i64,
    reseller_id: &str,
    from: &str,
    to: &str,
    reason: &'static str,
) -> anyhow::Result<bool> {
    let tx = Audited::begin(client, &Actor::system(), "reseller.tier_change", reseller_id).await?;
    let moved = tx
        .execute(
            "UPDATE resellers SET tier = $3, below_since = NULL, updated_at = now()
              WHERE id = $1 AND tier = $2 AND NOT tier_locked",
            &[&pk, &from, &to],
        )
        .await?;
    if moved == 0 {
        tx.rollback().await?;
        return Ok(false);
    }
    let why = Repricing::Tier {
        reseller_pk: pk,
        from,
        to,
    };
    events::product_price_changed(&*tx, why, &app.config.currency).await?;
    events::tier_changed(&*tx, pk, from, to, reason).await?;
    tx.commit(serde_json::json!({"previous_tier": from, "tier": to, "reason": reason}))
        .await?;
    metrics::counter!("cardgate_tier_changes_total", "reason" => reason).increment(1);
    tracing::info!(reseller_id, from, to, reason, "tier changed");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config() -> Config {
        let toml = "
            [tiers.standard]
            priority = 10
            orders_per_second = 1
            orders_burst = 1
            reads_per_second = 1
            reads_burst = 1
            max_quantity = 1
            max_batch = 1
            [tiers.gold]
            priority = 30
            orders_per_second = 1
            orders_burst = 1
            reads_per_second = 1
            reads_burst = 1
            max_quantity = 1
            max_batch = 1
            upgrade_spend = 5000
            [tiers.diamond]
            priority = 40
            orders_per_second = 1
            orders_burst = 1
            reads_per_second = 1
            reads_burst = 1
            max_quantity = 1
            max_batch = 1
            upgrade_spend = 20000
        ";
        let path = std::env::temp_dir().join(format!("cardgate-growth-{}.toml", std::process::id()));
        std::fs::write(&path, toml).expect("write config");
        let env = HashMap::from([
            ("CARDGATE_CONFIG".to_string(), path.display().to_string()),
            ("CARDGATE_VIP__DOWNGRADE_GRACE_DAYS".to_string(), "7".to_string()),
        ]);
        let c = Config::load(&env).expect("config");
        let _ = std::fs::remove_file(&path);
        c
    }

    #[test]
    fn upgrades_at_once_downgrades_after_the_grace_never_below_the_base() {
        let c = config();
        let now = OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
        let day = time::Duration::days(1);
        assert_eq!(verdict(&c, "standard", "standard", None, 4999, now), Verdict::Keep);
        assert_eq!(
            verdict(&c, "standard", "standard", None, 5000, now),
            Verdict::Move("gold", "upgrade")
        );
        assert_eq!(
            verdict(&c, "standard", "standard", None, 25000, now),
            Verdict::Move("diamond", "upgrade")
        );
        // diamond earned, spend falls to gold's level: grace first, then gold.
        assert_eq!(verdict(&c, "diamond", "standard", None, 6000, now), Verdict::StartGrace);
        assert_eq!(
            verdict(&c, "diamond", "standard", Some(now - 6 * day), 6000, now),
            Verdict::Keep
        );
        assert_eq!(
            verdict(&c, "diamond", "standard", Some(now - 7 * day), 6000, now),
            Verdict::Move("gold", "downgrade")
        );
        // Recovered within the grace: the clock stops.
        assert_eq!(
            verdict(&c, "diamond", "standard", Some(now - 3 * day), 20000, now),
            Verdict::StopGrace
        );
        // Never below the base tier an operator gave, whatever the spend.
        assert_eq!(
            verdict(&c, "diamond", "gold", Some(now - 8 * day), 0, now),
            Verdict::Move("gold", "downgrade")
        );
        assert_eq!(
            verdict(&c, "gold", "gold", Some(now - 8 * day), 0, now),
            Verdict::StopGrace
        );
        // A tier without a threshold is never left by growth except upwards.
        assert_eq!(
            verdict(&c, "standard", "standard", Some(now - 9 * day), 0, now),
            Verdict::StopGrace
        );
        assert_eq!(next_tier(&c, "standard"), Some(("gold", 5000)));
        assert_eq!(next_tier(&c, "gold"), Some(("diamond", 20000)));
        assert_eq!(next_tier(&c, "diamond"), None);
    }
}
