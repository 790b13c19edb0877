//! Prometheus metrics and logging set-up.
//!
//! One recorder per process: `metrics` has a single global recorder, so every server in
//! the process (several in the test binary) shares it and its handle.

use std::sync::OnceLock;
use std::time::Duration;

use hyper::Method;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Latency buckets (seconds): fine below 25 ms, where the targets are.
const LATENCY_BUCKETS_S: &[f64] = &[
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Fulfilments per ledger commit.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

pub fn prometheus() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS_S)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full("cardgate_ledger_batch_size".into()), BATCH_BUCKETS)
                })
                .expect("bucket lists are non-empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only when another recorder was installed first, as a host program may do;
            // then its recorder gets the metrics and ours stays empty.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            // Counters appear at their first increment; these should read 0 from the start,
            // so that an alert on any increase sees the first one.
            for name in [
                "cardgate_last_guard_total",
                "cardgate_ledger_commit_failures_total",
                "cardgate_reconcile_failures_total",
                "cardgate_callbacks_abandoned_total",
                "cardgate_rebate_close_failures_total",
            ] {
                metrics::counter!(name).increment(0);
            }
            handle
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!(
        "cardgate_http_requests_total",
        "HTTP requests answered, by route, method and status"
    );
    metrics::describe_histogram!(
        "cardgate_http_request_duration_seconds",
        metrics::Unit::Seconds,
        "time from request headers to response, by route, method and status"
    );
    metrics::describe_gauge!("cardgate_http_requests_in_flight", "requests being handled now");
    metrics::describe_counter!(
        "cardgate_http_connections_refused_total",
        "connections closed at once because http.connections_max were open"
    );
    metrics::describe_counter!(
        "cardgate_orders_total",
        "orders answered, by outcome (created, replayed, or the error code) and tier"
    );
    metrics::describe_histogram!(
        "cardgate_order_seconds",
        metrics::Unit::Seconds,
        "one order from validation to answer (reservation and commit included), by outcome"
    );
    metrics::describe_histogram!(
        "cardgate_reservation_seconds",
        metrics::Unit::Seconds,
        "the reservation script's round trip to Redis"
    );
    metrics::describe_histogram!(
        "cardgate_ledger_batch_size",
        "fulfilments committed per Postgres transaction"
    );
    metrics::describe_histogram!(
        "cardgate_ledger_commit_seconds",
        metrics::Unit::Seconds,
        "one ledger batch's Postgres transaction"
    );
    metrics::describe_counter!(
        "cardgate_ledger_commit_failures_total",
        "ledger commits that failed and were retried (Postgres down or slow)"
    );
    metrics::describe_counter!(
        "cardgate_last_guard_total",
        "orders Postgres refused to deliver a code for (already delivered or voided): served from other stock; should stay 0"
    );
    metrics::describe_gauge!(
        "cardgate_outbox_length",
        "fulfilments reserved in Redis and not yet committed"
    );
    metrics::describe_gauge!(
        "cardgate_outbox_oldest_age_seconds",
        "age of the oldest uncommitted fulfilment"
    );
    metrics::describe_counter!(
        "cardgate_outbox_malformed_total",
        "outbox entries that could not be decoded"
    );
    metrics::describe_counter!(
        "cardgate_orders_shed_total",
        "orders refused with 503 overloaded to keep higher tiers served, by tier"
    );
    metrics::describe_gauge!(
        "cardgate_orders_in_flight",
        "orders admitted and not yet answered (the ledger wait included): the overload signal"
    );
    metrics::describe_counter!("cardgate_refunds_total", "orders refunded");
    metrics::describe_counter!(
        "cardgate_rebates_credited_total",
        "monthly rebates credited, one per reseller and closed month"
    );
    metrics::describe_counter!(
        "cardgate_rebates_credited_amount_total",
        "minor units credited as monthly rebates"
    );
    metrics::describe_counter!(
        "cardgate_rebate_close_failures_total",
        "automatic month closes that failed and are retried a minute later"
    );
    metrics::describe_counter!("cardgate_codes_sold_total", "codes delivered by new orders, by SKU");
    metrics::describe_gauge!("cardgate_ready", "1 when Redis and Postgres both answer");
    metrics::describe_gauge!("cardgate_stock_available", "codes in stock, by SKU");
    metrics::describe_gauge!(
        "cardgate_stock_low_threshold",
        "the SKU's low-stock threshold, for SKUs that have one"
    );
    metrics::describe_gauge!(
        "cardgate_resellers_low_balance",
        "active resellers whose balance is below their low_balance_threshold"
    );
    metrics::describe_gauge!(
        "cardgate_callbacks_pending",
        "merchant callback events not yet delivered"
    );
    metrics::describe_gauge!(
        "cardgate_callbacks_oldest_pending_seconds",
        "age of the oldest undelivered callback event"
    );
    metrics::describe_gauge!(
        "cardgate_upstream_open_purchases",
        "upstream purchases not yet ended: orders waiting on suppliers, their money held"
    );
    metrics::describe_gauge!(
        "cardgate_upstream_oldest_open_purchase_seconds",
        "age of the oldest upstream purchase not yet ended"
    );
    metrics::describe_counter!(
        "cardgate_callback_attempts_total",
        "callback delivery attempts, by outcome (delivered, http_error, timeout, error)"
    );
    metrics::describe_counter!(
        "cardgate_callbacks_abandoned_total",
        "callback events given up after their 24-hour retry window"
    );
    metrics::describe_counter!(
        "cardgate_reconcile_failures_total",
        "reconciliation reports that found a difference"
    );
    metrics::describe_gauge!(
        "cardgate_supplier_circuit_open",
        "1 while this gateway's circuit for the supplier is not closed (open, or half-open awaiting its trial)"
    );
    metrics::describe_counter!(
        "cardgate_supplier_calls_total",
        "purchase calls to a supplier, by outcome (codes, refused, unknown; skipped: not asked, its circuit open)"
    );
    metrics::describe_histogram!(
        "cardgate_supplier_call_seconds",
        metrics::Unit::Seconds,
        "one purchase call to a supplier, answered or not"
    );
    metrics::describe_histogram!(
        "cardgate_stock_fill_seconds",
        metrics::Unit::Seconds,
        "an order's wait for codes brought at once to its dry home cell from the other cells"
    );
    metrics::describe_histogram!(
        "cardgate_stock_mover_pass_seconds",
        metrics::Unit::Seconds,
        "one pass of the stock mover over every product on sale"
    );
    metrics::describe_gauge!(
        "cardgate_supplier_balance",
        "the balance the supplier last reported, in its minor units"
    );
}

pub fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        // Arbitrary client-chosen methods would make the label unbounded.
        _ => "other",
    }
}

fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        201 => "201",
        204 => "204",
        400 => "400",
        401 => "401",
        402 => "402",
        403 => "403",
        404 => "404",
        405 => "405",
        409 => "409",
        413 => "413",
        415 => "415",
        422 => "422",
        429 => "429",
        500 => "500",
        503 => "503",
        s if s < 300 => "2xx",
        s if s < 500 => "4xx",
        _ => "5xx",
    }
}

pub fn record_request(route: &'static str, method: &'static str, status: u16, elapsed: Duration) {
    let status = status_label(status);
    metrics::counter!("cardgate_http_requests_total", "route" => route, "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!("cardgate_http_request_duration_seconds", "route" => route, "method" => method, "status" => status)
        .record(elapsed.as_secs_f64());
}

/// Counts a request as in flight for as long as it lives, however its handler ends.
pub struct InFlight(());

impl InFlight {
    pub fn enter() -> Self {
        metrics::gauge!("cardgate_http_requests_in_flight").increment(1.0);
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!("cardgate_http_requests_in_flight").decrement(1.0);
    }
}

/// Logs to stderr, filtered by `CARDGATE_LOG` (or `RUST_LOG`), `info` by default.
pub fn init_logging() {
    let filter = std::env::var("CARDGATE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
}
