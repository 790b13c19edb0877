//! Parse + verify of one signed request: the per-request cost of authentication.

use cardgate::auth::signing::{authorization, parse_header, Message, Signer};
use criterion::{black_box, criterion_group, criterion_main, Criterion};

fn bench(c: &mut Criterion) {
    let secret = b"sk_live_Qm9vdHN0cmFwU2VjcmV0S2V5MTIz";
    let body = br#"{"sku":"steam-cn-100","quantity":2,"merchant_order_no":"M20261123-0001","max_unit_price":9700}"#;
    let message = Message {
        timestamp: 1_763_870_403,
        nonce: "7f3b2c1d9e8a4b5c6d7e8f9a0b1c2d3e",
        method: "POST",
        path: "/v1/orders",
        query: None,
        body,
    };
    let header = authorization("ak_bench", secret, &message);
    // As the key cache holds it: keyed once.
    let signer = Signer::new(secret);
    c.bench_function("parse_header + verify (POST /v1/orders)", |b| {
        b.iter(|| {
            let h = parse_header(black_box(&header)).expect("parses");
            let m = Message {
                timestamp: h.timestamp,
                nonce: h.nonce,
                ..message
            };
            assert!(signer.verify(&m, &h.signature));
        })
    });
    c.bench_function("parse_header only", |b| b.iter(|| parse_header(black_box(&header))));
}

criterion_group!(benches, bench);
criterion_main!(benches);
