//! Reseller accounts, their API keys and webhook secrets, as Postgres records them; a new
//! account's hot balance (zero) in Redis. Every change is audited with it
//! ([`crate::audit::Audited`]) and announced to every gateway's key cache
//! (`crate::sync::changed`, `crate::auth::keys`) once committed.
//!
//! Money is not here: a balance credit or debit goes route -> `api/admin/resellers.rs`
//! (`adjust_balance` parses it) -> [`crate::balance`] (the ledger row) ->
//! [`crate::hot_balance`] (made spendable in Redis exactly once).

use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::OffsetDateTime;
use tokio_postgres::Row;

use crate::app::App;
use crate::audit::{Actor, Audited};
use crate::auth::keys::KeySettings;
use crate::auth::scopes::Scopes;
use crate::callbacks::events::{self, Repricing};
use crate::crypto::Purpose;
use crate::error::ApiError;
use crate::http::body::nullable;
use crate::http::query::rfc3339;
use crate::ids;

/// `POST /admin/v1/resellers`, checked by the handler (the allow-list normalised).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewReseller {
    pub name: String,
    pub tier: String,
    #[serde(default)]
    pub ip_allowlist: Vec<String>,
    pub callback_url: Option<String>,
    #[serde(default)]
    pub low_balance_threshold: i64,
}

/// `PATCH /admin/v1/resellers/{id}`: absent fields stay as they are.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResellerPatch {
    pub name: Option<String>,
    pub tier: Option<String>,
    pub status: Option<String>,
    pub ip_allowlist: Option<Vec<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub callback_url: Option<Option<String>>,
    pub low_balance_threshold: Option<i64>,
    /// Stops automatic tier changes (growth); `tier` also sets `base_tier`.
    pub tier_locked: Option<bool>,
    pub credit_limit: Option<i64>,
    /// `null` removes the limit.
    #[serde(default, deserialize_with = "nullable")]
    pub daily_spend_limit: Option<Option<i64>>,
}

/// A reseller as the operator API shows it.
#[derive(Serialize)]
pub struct Reseller {
    pub reseller_id: String,
    pub name: String,
    pub tier: String,
    pub status: String,
    pub ip_allowlist: Vec<String>,
    pub callback_url: Option<String>,
    pub low_balance_threshold: i64,
    pub balance: i64,
    /// The balance may go down to minus this; `available` is `balance + credit_limit`.
    pub credit_limit: i64,
    pub available: i64,
    /// The tier an operator gave; automatic downgrades never go below it.
    pub base_tier: String,
    /// No automatic tier changes while set.
    pub tier_locked: bool,
    /// Minor units per UTC day; `None`: no limit.
    pub daily_spend_limit: Option<i64>,
    /// Set while risk control holds the reseller's orders.
    pub risk_hold: Option<serde_json::Value>,
    pub currency: String,
    pub created_at: String,
    pub updated_at: String,
}

/// A new API key; its secret is in this answer only.
#[derive(Serialize)]
pub struct NewKey {
    pub key_id: String,
    pub secret: String,
    pub reseller_id: String,
    pub scopes: Scopes,
    pub label: Option<String>,
    pub daily_spend_limit: Option<i64>,
    pub expires_at: Option<String>,
    pub created_at: String,
}

/// A key made by rotating another, which keeps working until `replaced_key_expires_at`.
#[derive(Serialize)]
pub struct Rotated {
    #[serde(flatten)]
    pub key: NewKey,
    pub replaces: String,
    pub replaced_key_expires_at: String,
}

/// An API key as the operator API lists it: never its secret.
#[derive(Serialize)]
pub struct KeyView {
    pub key_id: String,
    pub scopes: Scopes,
    pub label: Option<String>,
    pub daily_spend_limit: Option<i64>,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    pub last_used_at: Option<String>,
    /// The key this one was rotated from.
    pub replaces: Option<String>,
}

/// The longest a rotated key may keep working beside the key that replaces it.
pub const ROTATION_OVERLAP_MAX_SECS: i64 = 30 * 86_400;
/// Without `overlap_seconds`, the old key keeps working a day: long enough to deploy the
/// new secret everywhere, the example of docs/api.md §7.
pub const ROTATION_OVERLAP_DEFAULT_SECS: i64 = 86_400;

const RESELLER_COLUMNS: &str = "r.id, r.reseller_id, r.name, r.tier, r.status, r.ip_allowlist, r.callback_url,
     r.low_balance_threshold, r.created_at, r.updated_at, b.balance, r.credit_limit, r.base_tier, r.tier_locked,
     r.daily_spend_limit, r.risk_hold_at, r.risk_hold_rule";

fn reseller_of(r: &Row, currency: &str) -> Reseller {
    Reseller {
        reseller_id: r.get(1),
        name: r.get(2),
        tier: r.get(3),
        status: r.get(4),
        ip_allowlist: r.get(5),
        callback_url: r.get(6),
        low_balance_threshold: r.get(7),
        balance: r.get(10),
        credit_limit: r.get(11),
        available: r.get::<_, i64>(10).saturating_add(r.get(11)),
        base_tier: r.get(12),
        tier_locked: r.get(13),
        daily_spend_limit: r.get(14),
        risk_hold: r
            .get::<_, Option<time::OffsetDateTime>>(15)
            .map(|at| json!({"since": rfc3339(at), "rule": r.get::<_, Option<String>>(16)})),
        currency: currency.to_string(),
        created_at: rfc3339(r.get(8)),
        updated_at: rfc3339(r.get(9)),
    }
}

async fn load<C: GenericClient>(client: &C, reseller_id: &str) -> Result<Row, ApiError> {
    let sql = format!(
        "SELECT {RESELLER_COLUMNS} FROM resellers r JOIN balances b ON b.reseller_id = r.id WHERE r.reseller_id = $1"
    );
    client
        .query_opt(&sql, &[&reseller_id])
        .await?
        .ok_or_else(|| ApiError::not_found("no such reseller"))
}

/// The reseller's row id (`404` for an unknown reseller).
pub async fn pk_of<C: GenericClient>(client: &C, reseller_id: &str) -> Result<i64, ApiError> {
    Ok(client
        .query_opt("SELECT id FROM resellers WHERE reseller_id = $1", &[&reseller_id])
        .await?
        .ok_or_else(|| ApiError::not_found("no such reseller"))?
        .get(0))
}

/// Creates the account with a zero balance; answers it and its webhook secret (shown
/// only in this answer).
pub async fn create(app: &App, actor: &Actor, new: &NewReseller) -> Result<(Reseller, String), ApiError> {
    let reseller_id = ids::reseller_id();
    let webhook_secret = ids::webhook_secret();
    let sealed = app.crypto.encrypt(
        Purpose::WebhookSecret {
            reseller_id: &reseller_id,
        },
        webhook_secret.as_bytes(),
    );
    let mut client = app.pg.get().await?;
    let tx = Audited::begin(&mut client, actor, "reseller.create", &reseller_id).await?;
    crate::rebuild::fence(&*tx).await?;
    let pk: i64 = tx
        .query_one(
            "INSERT INTO resellers (reseller_id, name, tier, base_tier, ip_allowlist, callback_url, low_balance_threshold,
                                    webhook_secret_enc)
             VALUES ($1, $2, $3, $3, $4, $5, $6, $7) RETURNING id",
            &[&reseller_id, &new.name, &new.tier, &new.ip_allowlist, &new.callback_url, &new.low_balance_threshold, &sealed],
        )
        .await?
        .get(0);
    tx.execute("INSERT INTO balances (reseller_id) VALUES ($1)", &[&pk])
        .await?;
    // The hot balance starts at zero, set inside the fence so that no rebuild comes
    // between (NX: one that ran first has set it already).
    let mut redis = app.redis();
    redis::cmd("SET")
        .arg(app.keys.balance(pk))
        .arg(0)
        .arg("NX")
        .query_async::<()>(&mut redis)
        .await?;
    tx.commit(json!({"tier": new.tier})).await?;
    let row = load(&client, &reseller_id).await?;
    Ok((reseller_of(&row, &app.config.currency), webhook_secret))
}

pub async fn update(app: &App, actor: &Actor, reseller_id: &str, p: &ResellerPatch) -> Result<Reseller, ApiError> {
    let (set_url, url) = match &p.callback_url {
        Some(u) => (true, u.clone()),
        None => (false, None),
    };
    let mut client = app.pg.get().await?;
    let tx = Audited::begin(&mut client, actor, "reseller.update", reseller_id).await?;
    let (pk, old_tier): (i64, String) = tx
        .query_opt(
            "SELECT id, tier FROM resellers WHERE reseller_id = $1 FOR UPDATE",
            &[&reseller_id],
        )
        .await?
        .map(|r| (r.get(0), r.get(1)))
        .ok_or_else(|| ApiError::not_found("no such reseller"))?;
    tx.execute(
        "UPDATE resellers SET name = coalesce($2, name), tier = coalesce($3, tier), status = coalesce($4, status),
                base_tier = coalesce($3, base_tier), ip_allowlist = coalesce($5, ip_allowlist),
                callback_url = CASE WHEN $6 THEN $7 ELSE callback_url END,
                low_balance_threshold = coalesce($8, low_balance_threshold),
                tier_locked = coalesce($9, tier_locked), credit_limit = coalesce($10, credit_limit),
                daily_spend_limit = CASE WHEN $11 THEN $12 ELSE daily_spend_limit END,
                below_since = CASE WHEN $3 IS NULL THEN below_since END, updated_at = now()
         WHERE id = $1",
        &[
            &pk,
            &p.name,
            &p.tier,
            &p.status,
            &p.ip_allowlist,
            &set_url,
            &url,
            &p.low_balance_threshold,
            &p.tier_locked,
            &p.credit_limit,
            &p.daily_spend_limit.is_some(),
            &p.daily_spend_limit.flatten(),
        ],
    )
    .await?;
    // A new tier is a new price list, announced as a product's own price change is.
    let tier_changed = p.tier.as_deref().filter(|t| *t != old_tier);
    if let Some(new_tier) = tier_changed {
        let why = Repricing::Tier {
            reseller_pk: pk,
            from: &old_tier,
            to: new_tier,
        };
        events::product_price_changed(&*tx, why, &app.config.currency).await?;
        events::tier_changed(&*tx, pk, &old_tier, new_tier, "operator").await?;
    }
    tx.commit(
        json!({"tier": p.tier, "status": p.status, "ip_allowlist": p.ip_allowlist,
               "callback_url_changed": set_url, "tier_locked": p.tier_locked, "credit_limit": p.credit_limit,
               "daily_spend_limit": p.daily_spend_limit}),
    )
    .await?;
    if tier_changed.is_some() {
        metrics::counter!("cardgate_tier_changes_total", "reason" => "operator").increment(1);
    }
    crate::sync::changed(app).await;
    let row = load(&client, reseller_id).await?;
    Ok(reseller_of(&row, &app.config.currency))
}

pub async fn get(app: &App, reseller_id: &str) -> Result<Reseller, ApiError> {
    let client = app.pg.get().await?;
    let row = load(&client, reseller_id).await?;
    Ok(reseller_of(&row, &app.config.currency))
}

pub async fn list(app: &App) -> Result<Vec<Reseller>, ApiError> {
    let client = app.pg.get().await?;
    let sql =
        format!("SELECT {RESELLER_COLUMNS} FROM resellers r JOIN balances b ON b.reseller_id = r.id ORDER BY r.id");
    let rows = client.query(&sql, &[]).await?;
    Ok(rows.iter().map(|r| reseller_of(r, &app.config.currency)).collect())
}

/// A new API key for the reseller. The key and its audit row commit together: a key
/// whose creation could not be audited would exist with its secret already lost to a
/// failed answer.
pub async fn create_key(
    app: &App,
    actor: &Actor,
    reseller_id: &str,
    settings: &KeySettings,
    expires_at: Option<OffsetDateTime>,
) -> Result<NewKey, ApiError> {
    let key = Minted::new(app);
    let mut client = app.pg.get().await?;
    let tx = Audited::begin(&mut client, actor, "key.create", &key.key_id).await?;
    let pk: i64 = load(&*tx, reseller_id).await?.get(0);
    let created_at = key.insert(&*tx, pk, settings, expires_at, None).await?;
    let detail = json!({"reseller_id": reseller_id, "scopes": settings.scopes, "label": settings.label,
                        "expires_at": expires_at.map(rfc3339)});
    tx.commit(detail).await?;
    crate::sync::changed(app).await;
    Ok(key.answer(reseller_id, settings, expires_at, created_at))
}

/// Replaces the key with a new one of the same settings; the old one keeps working for
/// `overlap_secs` more (never longer than it would have), `0` ending it now. A revoked or
/// expired key, or one rotated already, is not rotated (`409 conflict`): it is a new key
/// that is wanted, or the rotation of its replacement.
pub async fn rotate_key(app: &App, actor: &Actor, key_id: &str, overlap_secs: i64) -> Result<Rotated, ApiError> {
    let now = app.clock.now();
    let new = Minted::new(app);
    let mut client = app.pg.get().await?;
    let tx = Audited::begin(&mut client, actor, "key.rotate", key_id).await?;
    let sql = format!(
        "SELECT k.reseller_id, r.reseller_id, k.revoked_at, k.expires_at, {}
           FROM api_keys k JOIN resellers r ON r.id = k.reseller_id
          WHERE k.key_id = $1 FOR UPDATE OF k",
        KeySettings::COLUMNS
    );
    let old = tx
        .query_opt(&sql, &[&key_id])
        .await?
        .ok_or_else(|| ApiError::not_found("no such key"))?;
    let (pk, reseller_id): (i64, String) = (old.get(0), old.get(1));
    let expires_at: Option<OffsetDateTime> = old.get(3);
    if old.get::<_, Option<OffsetDateTime>>(2).is_some() {
        return Err(ApiError::Conflict(
            "the key is revoked; create a new key instead".into(),
        ));
    }
    if expires_at.is_some_and(|end| end <= now) {
        return Err(ApiError::Conflict(
            "the key has expired; create a new key instead".into(),
        ));
    }
    // Asked once the key is locked, so a rotation that committed meanwhile is seen.
    if let Some(successor) = tx
        .query_opt("SELECT key_id FROM api_keys WHERE replaces = $1", &[&key_id])
        .await?
    {
        let successor: String = successor.get(0);
        return Err(ApiError::Conflict(
            format!("the key was rotated already, to {successor}; rotate or revoke that one").into(),
        ));
    }
    let settings = KeySettings::from_row(&old, 4);
    // Whole seconds, as every time in the API is shown: the end written is the one answered.
    let ends = now.replace_nanosecond(0).unwrap_or(now) + time::Duration::seconds(overlap_secs);
    let ends = expires_at.map_or(ends, |e| e.min(ends));
    let created_at = new.insert(&*tx, pk, &settings, None, Some(key_id)).await?;
    tx.execute(
        "UPDATE api_keys SET expires_at = $2 WHERE key_id = $1",
        &[&key_id, &ends],
    )
    .await?;
    let detail = json!({"reseller_id": reseller_id, "key_id": new.key_id, "overlap_seconds": overlap_secs,
                        "replaced_key_expires_at": rfc3339(ends), "scopes": settings.scopes});
    tx.commit(detail).await?;
    crate::sync::changed(app).await;
    Ok(Rotated {
        key: new.answer(&reseller_id, &settings, None, created_at),
        replaces: key_id.to_string(),
        replaced_key_expires_at: rfc3339(ends),
    })
}

/// The reseller's keys, revoked and expired ones included, oldest first.
pub async fn list_keys(app: &App, reseller_id: &str) -> Result<Vec<KeyView>, ApiError> {
    let client = app.pg.get().await?;
    let pk = pk_of(&client, reseller_id).await?;
    let sql = format!(
        "SELECT k.key_id, k.created_at, k.expires_at, k.revoked_at, k.last_used_at, k.replaces, {}
           FROM api_keys k WHERE k.reseller_id = $1 ORDER BY k.created_at, k.key_id",
        KeySettings::COLUMNS
    );
    let rows = client.query(&sql, &[&pk]).await?;
    let time = |r: &Row, i: usize| r.get::<_, Option<OffsetDateTime>>(i).map(rfc3339);
    Ok(rows
        .iter()
        .map(|r| {
            let settings = KeySettings::from_row(r, 6);
            KeyView {
                key_id: r.get(0),
                scopes: settings.scopes,
                label: settings.label,
                daily_spend_limit: settings.daily_spend_limit,
                created_at: rfc3339(r.get(1)),
                expires_at: time(r, 2),
                revoked_at: time(r, 3),
                last_used_at: time(r, 4),
                replaces: r.get(5),
            }
        })
        .collect())
}

/// A key about to be made: its id, and its secret, shown once and sealed for Postgres.
struct Minted {
    key_id: String,
    secret: String,
    sealed: Vec<u8>,
}

impl Minted {
    fn new(app: &App) -> Minted {
        let key_id = ids::key_id();
        let secret = ids::api_secret();
        let sealed = app
            .crypto
            .encrypt(Purpose::ApiSecret { key_id: &key_id }, secret.as_bytes());
        Minted { key_id, secret, sealed }
    }

    /// Records the key; answers when Postgres made it.
    async fn insert<C: GenericClient>(
        &self,
        client: &C,
        reseller_pk: i64,
        settings: &KeySettings,
        expires_at: Option<OffsetDateTime>,
        replaces: Option<&str>,
    ) -> Result<OffsetDateTime, ApiError> {
        let scopes = settings.scopes.names();
        Ok(client
            .query_one(
                "INSERT INTO api_keys (key_id, reseller_id, secret_enc, scopes, label, expires_at, replaces,
                                       daily_spend_limit)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING created_at",
                &[
                    &self.key_id,
                    &reseller_pk,
                    &self.sealed,
                    &scopes,
                    &settings.label,
                    &expires_at,
                    &replaces,
                    &settings.daily_spend_limit,
                ],
            )
            .await?
            .get(0))
    }

    fn answer(
        self,
        reseller_id: &str,
        settings: &KeySettings,
        expires_at: Option<OffsetDateTime>,
        created_at: OffsetDateTime,
    ) -> NewKey {
        NewKey {
            key_id: self.key_id,
            secret: self.secret,
            reseller_id: reseller_id.to_string(),
            scopes: settings.scopes,
            label: settings.label.clone(),
            daily_spend_limit: settings.daily_spend_limit,
            expires_at: expires_at.map(rfc3339),
            created_at: rfc3339(created_at),
        }
    }
}

/// Revokes the key (a second call keeps the first time) and answers when it was revoked.
pub async fn revoke_key(app: &App, actor: &Actor, key_id: &str) -> Result<OffsetDateTime, ApiError> {
    let mut client = app.pg.get().await?;
    let tx = Audited::begin(&mut client, actor, "key.revoke", key_id).await?;
    let revoked_at = tx
        .query_opt(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE key_id = $1 RETURNING revoked_at",
            &[&key_id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("no such key"))?
        .get(0);
    tx.commit(json!({})).await?;
    crate::sync::changed(app).await;
    Ok(revoked_at)
}

/// A new webhook secret, shown only in this answer; every callback sent from now on is
/// signed with it alone. With its audit row or not at all: a rotation that went through
/// unanswered would leave the merchant unable to verify anything.
pub async fn rotate_webhook_secret(app: &App, actor: &Actor, reseller_id: &str) -> Result<String, ApiError> {
    let secret = ids::webhook_secret();
    let sealed = app
        .crypto
        .encrypt(Purpose::WebhookSecret { reseller_id }, secret.as_bytes());
    let mut client = app.pg.get().await?;
    let tx = Audited::begin(&mut client, actor, "reseller.webhook_secret.rotate", reseller_id).await?;
    let n = tx
        .execute(
            "UPDATE resellers SET webhook_secret_enc = $2, updated_at = now() WHERE reseller_id = $1",
            &[&reseller_id, &sealed],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::not_found("no such reseller"));
    }
    tx.commit(json!({})).await?;
    Ok(secret)
}
