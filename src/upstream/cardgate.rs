//! `protocol: "cardgate"`: another cardgate is the supplier, spoken to as a reseller
//! speaks to this one (docs/api.md §1 signing, §3 `POST /v1/orders`).

use std::time::Duration;

use serde_json::{json, Value};

use super::{Answer, Buy, Supplier};
use crate::auth::signing::{Message, Signer};

pub struct Cardgate {
    pub base_url: String,
    pub key_id: String,
    pub signer: Signer,
    pub timeout: Duration,
    pub client: reqwest::Client,
}

impl Supplier for Cardgate {
    async fn buy(&self, buy: &Buy<'_>, now_unix_secs: i64) -> Answer {
        let body = json!({
            "sku": buy.upstream_sku,
            "quantity": buy.quantity,
            // The upstream's own idempotency makes every retry of this number one order.
            "merchant_order_no": buy.upstream_no,
            "max_unit_price": buy.max_unit_cost,
        });
        let body = serde_json::to_vec(&body).unwrap_or_default();
        let path = "/v1/orders";
        let nonce = crate::ids::random("", 32);
        let message = Message {
            timestamp: now_unix_secs,
            nonce: &nonce,
            method: "POST",
            path,
            query: None,
            body: &body,
        };
        let authorization = self.signer.authorization(&self.key_id, &message);
        let url = format!("{}{path}", self.base_url.trim_end_matches('/'));
        let sent = self
            .client
            .post(url)
            .timeout(self.timeout)
            .header("authorization", authorization)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            // Timeouts and lost connections: the order may or may not exist upstream.
            Err(e) => {
                return Answer::Unknown(if e.is_timeout() {
                    "timeout".into()
                } else {
                    "connection".into()
                })
            }
        };
        let status = resp.status().as_u16();
        let Ok(bytes) = resp.bytes().await else {
            return Answer::Unknown("answer cut short".into());
        };
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        classify(status, &v, buy.quantity)
    }
}

/// What an answer of the upstream's `POST /v1/orders` means for the purchase.
pub fn classify(status: u16, v: &Value, quantity: i64) -> Answer {
    match status {
        200..=202 => match v.get("status").and_then(Value::as_str) {
            Some("fulfilled") => {
                let codes: Vec<String> = v
                    .get("codes")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(|c| c.as_str().map(str::to_owned)).collect())
                    .unwrap_or_default();
                let (Some(order_id), Some(amount)) = (
                    v.get("order_id").and_then(Value::as_str),
                    v.get("amount").and_then(Value::as_i64),
                ) else {
                    return Answer::Unknown("malformed order".into());
                };
                if codes.len() as i64 != quantity {
                    return Answer::Unknown("wrong number of codes".into());
                }
                Answer::Codes {
                    codes,
                    upstream_order_id: order_id.to_owned(),
                    cost: amount,
                }
            }
            // The upstream is buying from its own sources: ask again later.
            Some("processing") => Answer::Unknown("processing upstream".into()),
            Some(other) => Answer::Refused(format!("order {other}")),
            None => Answer::Unknown("malformed order".into()),
        },
        // Not decided yet upstream, or not now: the same number again later.
        408 | 425 | 429 => Answer::Unknown(format!("http {status}")),
        409 if v.pointer("/error/code").and_then(Value::as_str) == Some("order_in_progress") => {
            Answer::Unknown("order in progress upstream".into())
        }
        400..=499 => Answer::Refused(
            v.pointer("/error/code")
                .and_then(Value::as_str)
                .map_or_else(|| format!("http {status}"), |c| c.chars().take(64).collect()),
        ),
        _ => Answer::Unknown(format!("http {status}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_definite_only_when_they_say_so() {
        let order = json!({"order_id": "ord_1", "amount": 20, "status": "fulfilled", "codes": ["a", "b"]});
        assert!(matches!(classify(201, &order, 2), Answer::Codes { cost: 20, .. }));
        assert!(matches!(classify(200, &order, 2), Answer::Codes { .. }));
        assert!(matches!(classify(201, &order, 3), Answer::Unknown(_)));
        let err = |c: &str| json!({"error": {"code": c, "message": "m"}});
        assert!(matches!(classify(409, &err("out_of_stock"), 1), Answer::Refused(c) if c == "out_of_stock"));
        assert!(matches!(
            classify(402, &err("insufficient_balance"), 1),
            Answer::Refused(_)
        ));
        assert!(matches!(classify(404, &Value::Null, 1), Answer::Refused(_)));
        assert!(matches!(
            classify(409, &err("order_in_progress"), 1),
            Answer::Unknown(_)
        ));
        assert!(matches!(classify(429, &Value::Null, 1), Answer::Unknown(_)));
        assert!(matches!(classify(500, &Value::Null, 1), Answer::Unknown(_)));
        assert!(matches!(classify(503, &Value::Null, 1), Answer::Unknown(_)));
        assert!(matches!(
            classify(202, &json!({"status": "processing"}), 1),
            Answer::Unknown(_)
        ));
    }
}
