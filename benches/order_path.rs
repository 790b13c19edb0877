//! The per-order work of the gateway's own, apart from Redis and Postgres: decrypting the
//! codes, building the reservation call, encoding the answer.

use cardgate::config::Tier;
use cardgate::crypto::{Crypto, Purpose};
use cardgate::orders::Order;
use cardgate::ratelimit::global::Charge;
use cardgate::ratelimit::Class;
use cardgate::reserve::{fingerprint, reserve_cmd, Fulfilment, Guards, Sourcing};
use cardgate::store::keys::Keys;
use criterion::{black_box, criterion_group, criterion_main, Criterion};

fn order(codes: usize) -> Order {
    Order {
        order_id: "ord_2Yx9Qm4LkT7bVn3Rc8Hd".into(),
        merchant_order_no: "M20261123-0001".into(),
        sku: "steam-cn-100".into(),
        quantity: codes as i64,
        unit_price: 9650,
        amount: 9650 * codes as i64,
        currency: "CNY".into(),
        status: "fulfilled".into(),
        created_at: "2026-11-23T04:00:00Z".into(),
        codes: (0..codes).map(|i| format!("STEAM-{i:04}-ABCD-EFGH-JKLM")).collect(),
    }
}

fn bench(c: &mut Criterion) {
    let crypto = Crypto::new(&[7u8; 32]);
    let purpose = Purpose::Code { product_id: 42 };
    let sealed = crypto.encrypt(purpose, b"STEAM-0001-ABCD-EFGH-JKLM");
    c.bench_function("AES-256-GCM decrypt of one code", |b| {
        b.iter(|| {
            crypto
                .decrypt(black_box(purpose), black_box(&sealed))
                .expect("decrypts")
        })
    });

    let keys = Keys::new("cg");
    let f = Fulfilment {
        order_id: "ord_2Yx9Qm4LkT7bVn3Rc8Hd".into(),
        reseller: 1234,
        merchant_order_no: "M20261123-0001".into(),
        product: 42,
        sku: "steam-cn-100".into(),
        quantity: 1,
        unit_price: 9650,
        amount: 9650,
        created_at: 1_763_870_403,
        created_ms: 0,
        key_id: "ak_bench".into(),
    };
    // The rules on by default, as a gateway runs them.
    let guards = Guards {
        address: Some("203.0.113.7".into()),
        velocity: Some((10.0, 60)),
        ..Guards::default()
    };
    let fp = fingerprint(&f.sku, 1);
    // The order's write token, as the gateway takes it with the nonce (the gold tier).
    let tiers = std::collections::BTreeMap::from([(
        "gold".to_string(),
        Tier {
            priority: 30,
            orders_per_second: 200,
            orders_burst: 400,
            reads_per_second: 500,
            reads_burst: 1000,
            max_quantity: 100,
            max_batch: 100,
            upgrade_spend: None,
        },
    )]);
    let charge = Charge::new(&tiers, "gold", Class::Writes, f.reseller, 1);
    c.bench_function("reservation EVALSHA built and packed", |b| {
        b.iter(|| {
            reserve_cmd(
                &keys,
                black_box(&f),
                &fp,
                None,
                604_800,
                Some("cg:{s0}:nonce:ak_bench:7f3b2c1d9e8a4b5c6d7e8f9a0b1c2d3e"),
                charge.as_ref(),
                &guards,
                Sourcing::Local,
                true,
                "",
            )
            .get_packed_command()
        })
    });

    for n in [1, 10] {
        let o = order(n);
        c.bench_function(&format!("order answer JSON, {n} code(s)"), |b| {
            b.iter(|| serde_json::to_vec(black_box(&o)).expect("encodes"))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
