//! The audit log: who did what, when, from where. Every admin action and every reveal of
//! codes writes one row, in the same transaction as the action where there is one.

use deadpool_postgres::GenericClient;
use serde_json::Value;

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
