use std::time::Duration;

use cardgate::auth::signing::{authorization, parse_header, sign, verify, Message, Signer};
use proptest::prelude::*;
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{error_of, nonce, now_secs, spawn_app_on, ManualClock};

/// The published vectors of docs/api.md §1, read from the file the contract links to, so
/// that what resellers are given to check their signing against is what is verified here.
fn vectors() -> Vec<Value> {
    let v: Value = serde_json::from_str(include_str!("../../docs/signing-vectors.json")).unwrap();
    v["vectors"].as_array().unwrap().clone()
}

fn query(v: &Value) -> Option<&str> {
    Some(v["query"].as_str().unwrap()).filter(|q| !q.is_empty())
}

#[test]
fn our_signer_reproduces_every_vector() {
    let vs = vectors();
    assert!(vs.len() >= 6);
    for v in &vs {
        let name = v["name"].as_str().unwrap();
        let message = Message {
            timestamp: v["timestamp"].as_i64().unwrap(),
            nonce: v["nonce"].as_str().unwrap(),
            method: v["method"].as_str().unwrap(),
            path: v["path"].as_str().unwrap(),
            query: query(v),
            body: v["body"].as_str().unwrap().as_bytes(),
        };
        let sts = message.string_to_sign();
        assert_eq!(sts, v["string_to_sign"].as_str().unwrap(), "{name}: string to sign");
        let secret = v["secret"].as_str().unwrap().as_bytes();
        assert_eq!(
            sign(secret, &sts),
            v["signature"].as_str().unwrap(),
            "{name}: signature"
        );
        // The gateway's path: the keyed state cloned, the pieces fed without the string.
        let signer = Signer::new(secret);
        assert_eq!(
            hex::encode(signer.sign(&message)),
            v["signature"].as_str().unwrap(),
            "{name}: signature fed in pieces"
        );
        let given = parse_header(v["authorization"].as_str().unwrap()).unwrap().signature;
        assert!(signer.verify(&message, &given), "{name}: verified in pieces");
        let mut body = message.body.to_vec();
        body.push(b' ');
        assert!(
            !signer.verify(&Message { body: &body, ..message }, &given),
            "{name}: body changed"
        );
        assert!(
            !signer.verify(
                &Message {
                    timestamp: message.timestamp + 1,
                    ..message
                },
                &given
            ),
            "{name}: timestamp changed"
        );
        assert!(
            !Signer::new(b"another secret").verify(&message, &given),
            "{name}: another secret"
        );
        let header = authorization("ak_test_vector", secret, &message);
        assert_eq!(header, v["authorization"].as_str().unwrap(), "{name}: header");
    }
}

#[test]
fn our_verifier_accepts_every_vector_and_rejects_any_one_byte_change() {
    for v in vectors() {
        let name = v["name"].as_str().unwrap();
        let h = parse_header(v["authorization"].as_str().unwrap()).unwrap_or_else(|| panic!("{name}: parses"));
        assert_eq!(h.key_id, "ak_test_vector");
        let secret = v["secret"].as_str().unwrap().as_bytes();
        let sts = v["string_to_sign"].as_str().unwrap();
        assert!(verify(secret, sts, &h.signature), "{name}: accepted");
        for i in 0..32 {
            let mut sig = h.signature;
            sig[i] ^= 0x01;
            assert!(!verify(secret, sts, &sig), "{name}: signature byte {i} changed");
        }
        for i in 0..sts.len() {
            let mut changed = sts.as_bytes().to_vec();
            changed[i] ^= 0x01;
            let changed = String::from_utf8_lossy(&changed);
            assert!(
                !verify(secret, &changed, &h.signature),
                "{name}: string-to-sign byte {i} changed"
            );
        }
        let mut bad_secret = secret.to_vec();
        bad_secret[0] ^= 0x01;
        assert!(!verify(&bad_secret, sts, &h.signature), "{name}: secret changed");
    }
}

/// The window is judged by the gateway's clock, not the host's: on a clock an hour
/// behind, a request signed at the gateway's time is taken and one signed at the real
/// time is refused, until the clock is moved on.
#[tokio::test]
async fn the_timestamp_window_is_judged_by_the_gateways_clock() {
    const BEHIND_SECS: i64 = 3_600;
    const MS_PER_SEC: i64 = 1_000;
    let clock = ManualClock::at_unix_ms((now_secs() - BEHIND_SECS) * MS_PER_SEC);
    let app = spawn_app_on(clock.clone()).await;
    let t = app.root_token().await;
    let k = app.reseller_with_key(&t, "gold", json!({})).await;
    let (app, k) = (&app, &k);
    let signed_at = |timestamp: i64| async move {
        app.signed_at(k, Method::GET, "/v1/balance", None, timestamp, &nonce(), &[])
            .await
    };
    let refused = |(status, code, _): (u16, String, Value)| status == 401 && code == "timestamp_out_of_window";

    let gateway_time = clock.now_unix_ms() / MS_PER_SEC;
    assert_eq!(
        signed_at(gateway_time).await.status(),
        200,
        "signed at the gateway's time"
    );
    assert!(
        refused(error_of(signed_at(now_secs()).await).await),
        "signed at the real time, an hour ahead of the gateway's"
    );

    clock.advance(Duration::from_secs(BEHIND_SECS as u64));
    assert_eq!(signed_at(now_secs()).await.status(), 200, "the gateway has caught up");
    assert!(
        refused(error_of(signed_at(gateway_time).await).await),
        "the gateway's earlier time is an hour old now"
    );
    // Milliseconds sent for seconds, the usual slip: a time far ahead, named as such.
    assert!(
        refused(error_of(signed_at(clock.now_unix_ms()).await).await),
        "milliseconds are a time outside the window, not a malformed header"
    );
}

proptest! {
    #[test]
    fn the_header_parser_never_panics(s in ".{0,300}") {
        let _ = parse_header(&s);
    }

    #[test]
    fn the_header_parser_never_panics_on_near_misses(
        prefix in prop::sample::select(vec!["CG1-HMAC-SHA256 ", "CG1-HMAC-SHA256", "CG1-HMAC-SHA256\t", ""]),
        junk in "[a-z_=\", \t0-9]{0,200}",
    ) {
        let _ = parse_header(&format!("{prefix}{junk}"));
    }

    #[test]
    fn valid_parameters_parse_in_any_order_with_any_spacing(
        order in Just(vec![0usize, 1, 2, 3]).prop_shuffle(),
        spaces in prop::collection::vec("[ \t]{0,3}", 8),
        key_id in "ak_[A-Za-z0-9]{1,30}",
        ts in 0i64..=99_999_999_999,
        nonce in "[A-Za-z0-9_-]{16,64}",
        sig in prop::array::uniform32(any::<u8>()),
    ) {
        let params = [
            format!("key_id=\"{key_id}\""),
            format!("timestamp=\"{ts}\""),
            format!("nonce=\"{nonce}\""),
            format!("signature=\"{}\"", hex::encode(sig)),
        ];
        let mut header = "CG1-HMAC-SHA256 ".to_string();
        for (i, &p) in order.iter().enumerate() {
            if i > 0 {
                header.push_str(&spaces[2 * i]);
                header.push(',');
            }
            header.push_str(&spaces[2 * i + 1]);
            header.push_str(&params[p]);
        }
        let parsed = parse_header(&header).expect("valid header parses");
        prop_assert_eq!(parsed.key_id, key_id.as_str());
        prop_assert_eq!(parsed.timestamp, ts);
        prop_assert_eq!(parsed.nonce, nonce.as_str());
        prop_assert_eq!(parsed.signature, sig);
    }
}
