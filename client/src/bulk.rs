//! The bulk-order loop: batches, pacing, retries, and recording every finished order.
//!
//! Safety rests on one rule: an order is only ever sent with its own `merchant_order_no`,
//! which the gateway treats as the idempotency key. Whatever goes wrong in between (a
//! timeout, a dropped connection, a crash of this process), sending the order again can
//! at worst return the original order as a replay, never buy it a second time. So every
//! doubt is resolved by resending, and an order counts as done only once its result is on
//! disk.
//!
//! One batch is in flight at a time: the server's limit is per reseller, so parallel
//! batches would only be refused sooner, and two in-flight copies of one order would turn
//! into `order_in_progress` churn.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use anyhow::bail;
use rand::Rng;
use tokio::time::{sleep, sleep_until, Instant};

use crate::api::{item_outcome, Answer, Api, BatchAnswer, ItemOutcome, ItemResult, Order, OrderBody};
use crate::input::OrderLine;
use crate::journal::{Journal, Record, RecordError, Status};
use crate::pacing::{backoff, retry_after_with_jitter, TokenBucket};
use crate::progress::Progress;

/// docs/api.md §3: a batch holds 1 to 100 orders.
pub const BATCH_SIZE_MAX: usize = 100;
/// Consecutive failed attempts at one batch (transport errors, 5xx) before giving up.
pub const TRANSIENT_ATTEMPTS_MAX: u32 = 8;
/// Consecutive `429`/`503` answers to one batch before giving up; higher than the above
/// because these are the server pacing us, not failing.
pub const THROTTLED_ATTEMPTS_MAX: u32 = 120;
/// Times one order is resent after an unsettled result (`order_in_progress`, an item
/// `503`) before it is left for a later run.
pub const ITEM_RETRIES_MAX: u32 = 8;
/// First wait before resending an unsettled order; doubles per retry.
const ITEM_RETRY_BASE: Duration = Duration::from_secs(1);
const ITEM_RETRY_MAX: Duration = Duration::from_secs(30);

pub struct Settings {
    pub batch_size: usize,
    pub rate_per_sec: f64,
}

/// An order not yet recorded.
#[derive(Debug, Clone)]
struct Pending {
    /// Index into the orders given to [`run`].
    index: usize,
    retries: u32,
    not_before: Instant,
    last_reason: String,
}

#[derive(Debug, Default)]
pub struct Summary {
    /// Orders recorded by this run.
    pub fulfilled: u64,
    pub failed: u64,
    /// Orders still unsettled after every retry: `(merchant_order_no, last reason)`.
    pub unsettled: Vec<(String, String)>,
}

enum BatchOutcome {
    Results(Vec<ItemResult>),
    /// The batch went back to the queue; send batches of this size from now on.
    Shrink {
        size: usize,
        why: String,
    },
}

/// Sends `orders` (none of them recorded yet) and records each one's outcome in
/// `journal`. Returns an error when the run must stop (authentication, the server gone
/// for good, the disk): everything recorded until then stays recorded.
pub async fn run(
    api: &Api,
    settings: &Settings,
    orders: &[OrderLine],
    journal: &mut Journal,
    progress: &mut Progress,
) -> anyhow::Result<Summary> {
    let mut batch_size = settings.batch_size.clamp(1, BATCH_SIZE_MAX);
    let start = Instant::now();
    let mut bucket = TokenBucket::new(settings.rate_per_sec, start);
    let mut summary = Summary::default();
    let mut ready: VecDeque<Pending> = (0..orders.len())
        .map(|index| Pending {
            index,
            retries: 0,
            not_before: start,
            last_reason: String::new(),
        })
        .collect();
    // Unsettled orders wait here for their retry time; few at any moment.
    let mut waiting: Vec<Pending> = Vec::new();

    loop {
        let now = Instant::now();
        promote_due(&mut waiting, &mut ready, now);
        let batch: Vec<Pending> = ready.drain(..batch_size.min(ready.len())).collect();
        if batch.is_empty() {
            match waiting.iter().map(|p| p.not_before).min() {
                Some(t) => {
                    sleep_until(t).await;
                    continue;
                }
                None => break,
            }
        }

        let wait = bucket.reserve(batch.len() as u32, now);
        if !wait.is_zero() {
            sleep(wait).await;
        }
        let bodies: Vec<OrderBody<'_>> = batch
            .iter()
            .map(|p| {
                let o = &orders[p.index];
                OrderBody {
                    sku: &o.sku,
                    quantity: o.quantity,
                    merchant_order_no: &o.merchant_order_no,
                    max_unit_price: o.max_unit_price,
                }
            })
            .collect();

        let results = match send(api, &bodies, &mut bucket, progress).await? {
            BatchOutcome::Results(r) => r,
            BatchOutcome::Shrink { size, why } => {
                progress.note(format!(
                    "the server refused a batch of {} ({why}); sending batches of {size}",
                    batch.len()
                ));
                batch_size = size;
                bucket.refund(batch.len() as u32, Instant::now());
                // Back at the front, in their order: nothing in a refused batch was processed.
                for p in batch.into_iter().rev() {
                    ready.push_front(p);
                }
                continue;
            }
        };

        let (records, retry) = settle(orders, batch, results, progress);
        journal.append(&records)?;
        let (f, x) = records.iter().fold((0, 0), |(f, x), r| match r.status {
            Status::Fulfilled => (f + 1, x),
            Status::Failed => (f, x + 1),
        });
        summary.fulfilled += f;
        summary.failed += x;
        progress.recorded(f, x);

        if let Some(first) = retry.first() {
            progress.note(format!(
                "{} orders not settled yet ({}{}); sending them again shortly",
                retry.len(),
                first.last_reason,
                if retry.len() > 1 { ", ..." } else { "" }
            ));
        }
        let now = Instant::now();
        let mut rng = rand::thread_rng();
        for mut p in retry {
            p.retries += 1;
            if p.retries > ITEM_RETRIES_MAX {
                summary
                    .unsettled
                    .push((orders[p.index].merchant_order_no.clone(), p.last_reason));
                continue;
            }
            p.not_before = now + item_retry_delay(p.retries, &mut rng);
            waiting.push(p);
        }
    }
    Ok(summary)
}

fn promote_due(waiting: &mut Vec<Pending>, ready: &mut VecDeque<Pending>, now: Instant) {
    // Due retries go first: they have waited longest, and their orders may be settled
    // already on the server (a replay is cheap).
    let mut due = Vec::new();
    waiting.retain(|p| {
        if p.not_before <= now {
            due.push(p.clone());
            false
        } else {
            true
        }
    });
    due.sort_by_key(|p| p.index);
    for p in due.into_iter().rev() {
        ready.push_front(p);
    }
}

fn item_retry_delay(retries: u32, rng: &mut impl Rng) -> Duration {
    let d = ITEM_RETRY_BASE
        .saturating_mul(1 << retries.saturating_sub(1).min(8))
        .min(ITEM_RETRY_MAX);
    d.mul_f64(rng.gen_range(0.8..=1.2))
}

/// Sends one batch until it has an answer with results, or the batch must change size,
/// or the run must stop.
async fn send(
    api: &Api,
    bodies: &[OrderBody<'_>],
    bucket: &mut TokenBucket,
    progress: &Progress,
) -> anyhow::Result<BatchOutcome> {
    let mut transient: u32 = 0;
    let mut throttled: u32 = 0;
    loop {
        let Answer { batch, rate_limit } = api.post_batch(bodies).await;
        let now = Instant::now();
        if rate_limit.remaining == Some(0) {
            // The server's bucket is empty: the next batch would be refused whole.
            let reset = rate_limit.reset.unwrap_or(Duration::ZERO).max(Duration::from_secs(1));
            bucket.pause(reset, now);
        }
        match batch {
            BatchAnswer::Results(r) => return Ok(BatchOutcome::Results(r)),
            BatchAnswer::Throttled {
                status,
                code,
                retry_after,
            } => {
                // A batch needs all its tokens at once; one bigger than the tier's burst
                // would be refused forever, however long we waited.
                if status == 429 {
                    if let Some(limit) = rate_limit.limit {
                        if (limit as usize) < bodies.len() {
                            return Ok(BatchOutcome::Shrink {
                                size: (limit as usize).max(1),
                                why: format!("{code}: more orders than the tier's burst of {limit}"),
                            });
                        }
                    }
                }
                throttled += 1;
                if throttled > THROTTLED_ATTEMPTS_MAX {
                    bail!("the server kept answering {status} {code} ({throttled} times in a row); stopped, run again later to resume");
                }
                let pause = retry_after_with_jitter(retry_after, &mut rand::thread_rng());
                bucket.pause(pause, now);
                progress.note(format!(
                    "server answered {status}{}{code}: waiting {:.1} s as asked, then resending the same {} orders",
                    if code.is_empty() { "" } else { " " },
                    pause.as_secs_f64(),
                    bodies.len()
                ));
                sleep(bucket.paused_for(now)).await;
            }
            BatchAnswer::TooLarge { message } => {
                if bodies.len() > 1 {
                    return Ok(BatchOutcome::Shrink {
                        size: bodies.len() / 2,
                        why: message,
                    });
                }
                bail!("the server refused a batch of one order: {message}");
            }
            BatchAnswer::Transient(why) => {
                transient += 1;
                if transient >= TRANSIENT_ATTEMPTS_MAX {
                    bail!(
                        "gave up after {transient} attempts at one batch, the last: {why}; \
                         run the same command again to resume"
                    );
                }
                let wait = backoff(transient, &mut rand::thread_rng());
                progress.note(format!(
                    "attempt {transient} of {TRANSIENT_ATTEMPTS_MAX} failed ({why}); resending the same {} orders in {:.1} s",
                    bodies.len(),
                    wait.as_secs_f64()
                ));
                sleep(wait).await;
            }
            BatchAnswer::Fatal(why) => bail!("{why}"),
        }
    }
}

/// Turns a batch's results into records to write now and orders to send again.
fn settle(
    orders: &[OrderLine],
    batch: Vec<Pending>,
    results: Vec<ItemResult>,
    progress: &Progress,
) -> (Vec<Record>, Vec<Pending>) {
    let mut by_number: HashMap<String, ItemResult> = HashMap::with_capacity(results.len());
    for r in results {
        // Should a number come back twice, the first answer is the one in its position.
        by_number.entry(r.merchant_order_no.clone()).or_insert(r);
    }
    let mut records = Vec::with_capacity(batch.len());
    let mut retry = Vec::new();
    for mut p in batch {
        let line = &orders[p.index];
        let Some(result) = by_number.remove(line.merchant_order_no.as_str()) else {
            p.last_reason = "no result for it in the server's answer".into();
            retry.push(p);
            continue;
        };
        match item_outcome(&result) {
            ItemOutcome::Done(order) => match fulfilled_record(line, order) {
                Ok(r) => records.push(r),
                Err(why) => {
                    p.last_reason = why;
                    retry.push(p);
                }
            },
            ItemOutcome::Failed { code, message } => records.push(failed_record(line, None, code, message)),
            ItemOutcome::Retry(why) => {
                p.last_reason = why;
                retry.push(p);
            }
        }
    }
    if !by_number.is_empty() {
        progress.note(format!(
            "ignored {} results for orders not in that batch",
            by_number.len()
        ));
    }
    (records, retry)
}

fn fulfilled_record(line: &OrderLine, order: Order) -> Result<Record, String> {
    if order
        .merchant_order_no
        .as_deref()
        .is_some_and(|m| m != line.merchant_order_no)
    {
        return Err(format!(
            "the server answered with order {} for another merchant_order_no",
            order.order_id
        ));
    }
    match order.status.as_deref() {
        None | Some("fulfilled") => Ok(Record {
            merchant_order_no: line.merchant_order_no.clone(),
            status: Status::Fulfilled,
            order_id: Some(order.order_id),
            sku: order.sku.unwrap_or_else(|| line.sku.clone()),
            quantity: order.quantity.unwrap_or(line.quantity),
            amount: order.amount,
            currency: order.currency,
            codes: order.codes,
            error: None,
        }),
        // A replay of an order refunded since: its codes are void, so none are written.
        Some(other) => Ok(failed_record(
            line,
            Some(order.order_id),
            format!("order_{other}"),
            format!("the server holds this order as {other}; its codes are not usable"),
        )),
    }
}

fn failed_record(line: &OrderLine, order_id: Option<String>, code: String, message: String) -> Record {
    Record {
        merchant_order_no: line.merchant_order_no.clone(),
        status: Status::Failed,
        order_id,
        sku: line.sku.clone(),
        quantity: line.quantity,
        amount: None,
        currency: None,
        codes: Vec::new(),
        error: Some(RecordError { code, message }),
    }
}
