//! Merchant callbacks (docs/api.md §4, "Merchant callbacks"): events are queued in Postgres by
//! the transaction that makes them happen (where each type is queued: `events`), and
//! delivered from there by `dispatcher`, at least once, signed with the reseller's webhook
//! secret.

pub mod dispatcher;
pub mod events;
pub mod target;

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio_postgres::Row;

use crate::http::query::rfc3339;

/// `CG-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`.
pub fn signature(secret: &[u8], t: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// The body a receiver gets.
pub fn envelope(event_id: &str, kind: &str, created_at: time::OffsetDateTime, data: &Value) -> Vec<u8> {
    let body = json!({"id": event_id, "type": kind, "created_at": rfc3339(created_at), "data": data});
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Columns of `events e` that `event_json` reads, deliveries included.
pub const EVENT_COLUMNS: &str = "e.event_id, e.type, e.created_at, e.status, e.attempts, e.next_attempt_at,
    e.delivered_at, e.data, e.id,
    coalesce((SELECT jsonb_agg(jsonb_build_object('attempt', d.attempt, 'at', api_time(d.at),
                     'status_code', d.status_code, 'error', d.error, 'duration_ms', d.duration_ms) ORDER BY d.attempt)
                FROM event_deliveries d WHERE d.event_id = e.id), '[]'::jsonb)";

/// An event as the listing routes show it: the envelope's fields and its deliveries.
pub fn event_json(r: &Row) -> Value {
    let status: &str = r.get(3);
    json!({
        "id": r.get::<_, &str>(0),
        "type": r.get::<_, &str>(1),
        "created_at": rfc3339(r.get(2)),
        "status": status,
        "attempts": r.get::<_, i32>(4),
        "next_attempt_at": (status == "pending").then(|| rfc3339(r.get(5))),
        "delivered_at": r.get::<_, Option<time::OffsetDateTime>>(6).map(rfc3339),
        "data": r.get::<_, Value>(7),
        "deliveries": r.get::<_, Value>(9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_of_time_dot_body() {
        // HMAC-SHA256("whsec_test", "1700000000.{}"), computed independently with openssl.
        assert_eq!(
            signature(b"whsec_test", 1_700_000_000, b"{}"),
            "t=1700000000,v1=35495024f4ef3f94e5a93e22221544c4b75e9a42300cd965ab81cb85cd994e91"
        );
    }
}
