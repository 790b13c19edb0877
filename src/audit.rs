//! The audit log: who did what, when, from where. Every admin action and every reveal of
//! codes writes one row.
//!
//! Every operator write goes through [`Audited`]: the change is made in its transaction
//! and the audit row is written in that same transaction as it commits, so a change is
//! never in without its row, nor a row without its change. [`record`] alone is for what
//! changes nothing else (logins, reveals) and for streamed imports, whose batches commit
//! one by one by design (`stock::import`).

use deadpool_postgres::GenericClient;
use serde_json::{json, Value};

use crate::app::App;
use crate::error::ApiError;
use crate::http::query::{page, rfc3339, Page, Window};

#[derive(Debug, Clone)]
pub struct Actor {
    pub name: String,
    pub kind: &'static str,
    pub ip: Option<String>,
}

impl Actor {
    pub fn admin(name: &str, ip: std::net::IpAddr) -> Actor {
        Actor {
            name: name.to_string(),
            kind: "admin",
            ip: Some(ip.to_string()),
        }
    }

    pub fn reseller(reseller_id: &str, ip: std::net::IpAddr) -> Actor {
        Actor {
            name: reseller_id.to_string(),
            kind: "reseller",
            ip: Some(ip.to_string()),
        }
    }

    pub fn system() -> Actor {
        Actor {
            name: "system".to_string(),
            kind: "system",
            ip: None,
        }
    }

    /// A `cardgate <command>` run from a shell: a system actor named after the command.
    pub fn command(command: &str) -> Actor {
        Actor {
            name: format!("cardgate {command}"),
            kind: "system",
            ip: None,
        }
    }
}

pub async fn record<C: GenericClient + ?Sized>(
    client: &C,
    actor: &Actor,
    action: &str,
    target: Option<&str>,
    ip_override: Option<&str>,
    detail: Value,
) -> Result<(), tokio_postgres::Error> {
    let ip = ip_override.map(str::to_owned).or_else(|| actor.ip.clone());
    client
        .execute(
            "INSERT INTO audit_log (actor, actor_kind, action, target, ip, detail) VALUES ($1, $2, $3, $4, $5, $6)",
            &[&actor.name, &actor.kind, &action, &target, &ip, &detail],
        )
        .await?;
    Ok(())
}

/// An operator write in progress: a transaction (reach it through `Deref`) that commits
/// only together with the audit row naming the action.
pub struct Audited<'c> {
    tx: deadpool_postgres::Transaction<'c>,
    actor: Actor,
    action: &'static str,
    target: String,
}

impl<'c> Audited<'c> {
    pub async fn begin(
        client: &'c mut deadpool_postgres::Client,
        actor: &Actor,
        action: &'static str,
        target: &str,
    ) -> Result<Audited<'c>, ApiError> {
        Ok(Audited {
            tx: client.transaction().await?,
            actor: actor.clone(),
            action,
            target: target.to_owned(),
        })
    }

    /// Writes the audit row with `detail`, then commits the change and the row together.
    pub async fn commit(self, detail: Value) -> Result<(), ApiError> {
        record(&self.tx, &self.actor, self.action, Some(&self.target), None, detail).await?;
        self.tx.commit().await?;
        Ok(())
    }

    /// Undoes the change; nothing is audited.
    pub async fn rollback(self) -> Result<(), ApiError> {
        self.tx.rollback().await?;
        Ok(())
    }
}

impl<'c> std::ops::Deref for Audited<'c> {
    type Target = deadpool_postgres::Transaction<'c>;
    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

/// What `GET /admin/v1/audit` filters on; every field optional.
pub struct Search<'a> {
    pub actor: Option<&'a str>,
    pub action: Option<&'a str>,
    pub window: Window,
}

/// The audit log, newest first, one page of it.
pub async fn search(app: &App, s: &Search<'_>) -> Result<Page, ApiError> {
    let w = &s.window;
    let client = app.pg.get().await?;
    let mut rows = client
        .query(
            "SELECT id, at, actor, actor_kind, action, target, ip, detail FROM audit_log
             WHERE ($1::text IS NULL OR actor = $1) AND ($2::text IS NULL OR action = $2)
               AND ($3::timestamptz IS NULL OR at >= $3) AND ($4::timestamptz IS NULL OR at < $4)
               AND ($5::bigint IS NULL OR id < $5)
             ORDER BY id DESC LIMIT $6",
            &[&s.actor, &s.action, &w.from, &w.to, &w.cursor, &(w.limit + 1)],
        )
        .await?;
    let more = page(&mut rows, w.limit);
    Ok(Page::of(&rows, more, 0, |r| {
        json!({"id": r.get::<_, i64>(0), "at": rfc3339(r.get(1)), "actor": r.get::<_, &str>(2),
               "actor_kind": r.get::<_, &str>(3), "action": r.get::<_, &str>(4),
               "target": r.get::<_, Option<&str>>(5), "ip": r.get::<_, Option<&str>>(6),
               "detail": r.get::<_, Value>(7)})
    }))
}
