//! `protocol: "cardgate"`: another cardgate is the supplier, spoken to as a reseller
//! speaks to this one (docs/api.md §1 signing, §3 `POST /v1/orders` and `GET /v1/balance`).

use std::time::Duration;

use serde_json::{json, Value};

use super::{Answer, Buy, Reported, Supplier};
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
        let sent = self
            .signed(reqwest::Method::POST, "/v1/orders", body, now_unix_secs)
            .header("content-type", "application/json")
            .send()
            .await;
        match read(sent).await {
            Ok((status, v)) => classify(status, &v, buy.quantity),
            Err(why) => Answer::Unknown(why),
        }
    }

    async fn balance(&self, now_unix_secs: i64) -> Reported {
        let sent = self
            .signed(reqwest::Method::GET, "/v1/balance", Vec::new(), now_unix_secs)
            .send()
            .await;
        match read(sent).await {
            Ok((status, v)) => classify_balance(status, &v),
            Err(why) => Reported::Unknown(why),
        }
    }
}

impl Cardgate {
    /// A request to the supplier signed as a reseller signs (§1), with a fresh nonce.
    fn signed(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Vec<u8>,
        now_unix_secs: i64,
    ) -> reqwest::RequestBuilder {
        let nonce = crate::ids::random("", 32);
        let message = Message {
            timestamp: now_unix_secs,
            nonce: &nonce,
            method: method.as_str(),
            path,
            query: None,
            body: &body,
        };
        let authorization = self.signer.authorization(&self.key_id, &message);
        self.client
            .request(method, format!("{}{path}", self.base_url.trim_end_matches('/')))
            .timeout(self.timeout)
            .header("authorization", authorization)
            .body(body)
    }
}

/// A supplier's answer as status and JSON (`null` when it is not JSON), or why there is
/// none: a timeout or a lost connection, after which the request may or may not have
/// taken effect upstream.
async fn read(sent: reqwest::Result<reqwest::Response>) -> Result<(u16, Value), String> {
    let resp = sent.map_err(|e| if e.is_timeout() { "timeout" } else { "connection" }.to_string())?;
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.map_err(|_| "answer cut short".to_string())?;
    Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
}

/// What an answer of the upstream's `GET /v1/balance` says.
pub fn classify_balance(status: u16, v: &Value) -> Reported {
    match status {
        200 => match v.get("balance").and_then(Value::as_i64) {
            Some(b) => Reported::Balance(b),
            None => Reported::Unknown("malformed balance".into()),
        },
        408 | 425 | 429 => Reported::Unknown(format!("http {status}")),
        400..=499 => Reported::Refused(
            v.pointer("/error/code")
                .and_then(Value::as_str)
                .map_or_else(|| format!("http {status}"), |c| c.chars().take(64).collect()),
        ),
        _ => Reported::Unknown(format!("http {status}")),
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

    #[test]
    fn a_balance_is_read_only_from_a_well_formed_200() {
        let ok = json!({"balance": 1234500, "currency": "CNY", "tier": "gold"});
        assert!(matches!(classify_balance(200, &ok), Reported::Balance(1234500)));
        assert!(matches!(
            classify_balance(200, &json!({"balance": "12"})),
            Reported::Unknown(_)
        ));
        let err = json!({"error": {"code": "unauthorized", "message": "m"}});
        assert!(matches!(classify_balance(401, &err), Reported::Refused(c) if c == "unauthorized"));
        assert!(matches!(classify_balance(429, &Value::Null), Reported::Unknown(_)));
        assert!(matches!(classify_balance(502, &Value::Null), Reported::Unknown(_)));
    }
}
