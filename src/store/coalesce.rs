//! Signed reads' Redis commands, coalesced: the requests that arrive while earlier
//! pipelines are out share the next one, as orders share a ledger commit. Each read
//! still gets its own nonce spent and its own live figures; under load many go in one
//! write to Redis and one reply, instead of one round trip each.

use std::collections::HashMap;
use std::sync::Arc;

use crate::store::redis::Redis;
use redis::{ErrorKind, Pipeline, RedisError, Value};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Pipelines out at once: while they are, new requests queue for the next.
const IN_FLIGHT: usize = 4;
/// Requests in one pipeline at most, so one reply never grows without bound.
const MAX_REQUESTS: usize = 256;

struct Job {
    /// Shared with the caller, which may send it again (a script Redis had not loaded).
    pipe: Arc<Pipeline>,
    /// Reads whose replies are the same for every request in one pipeline (a product's
    /// pool counts): the same `Arc` asked by many requests is sent once per pipeline.
    shared: Vec<Arc<Pipeline>>,
    reply: oneshot::Sender<Result<Replies, RedisError>>,
}

/// The replies to a request's own commands, then to each of its shared reads' commands.
pub type Replies = (Vec<Value>, Vec<Value>);

#[derive(Clone)]
pub struct Coalescer {
    jobs: mpsc::UnboundedSender<Job>,
}

impl Coalescer {
    /// Starts the task that sends the pipelines; it ends when the last handle is dropped.
    pub fn start(redis: Redis) -> Self {
        let (jobs, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, redis));
        Coalescer { jobs }
    }

    /// Runs `pipe`'s commands, in order, and `shared`'s, in a pipeline shared with other
    /// requests and returns their replies. A command Redis refuses fails this request
    /// only, with Redis's error as it is (a `NOSCRIPT` can be told apart and acted on).
    pub async fn query(&self, pipe: Arc<Pipeline>, shared: Vec<Arc<Pipeline>>) -> Result<Replies, RedisError> {
        let (reply, answer) = oneshot::channel();
        let gone = || RedisError::from((ErrorKind::Client, "the Redis coalescer has stopped"));
        self.jobs.send(Job { pipe, shared, reply }).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn run(mut rx: mpsc::UnboundedReceiver<Job>, redis: Redis) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        // A free slot first, then whatever has queued meanwhile: the batch forms while
        // the slots are busy, and an idle gateway sends each request at once.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else { return };
        let mut jobs = vec![first];
        while jobs.len() < MAX_REQUESTS {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let mut redis = redis.clone();
        tokio::spawn(async move {
            send(&mut redis, jobs).await;
            drop(slot);
        });
    }
}

async fn send(redis: &mut Redis, jobs: Vec<Job>) {
    metrics::histogram!("cardgate_redis_coalesced_requests").record(jobs.len() as f64);
    let mut pipe = redis::pipe();
    // Errors come back per command, so one request's refusal is not another's.
    pipe.ignore_errors();
    for j in &jobs {
        for c in j.pipe.cmd_iter() {
            pipe.add_command(c.clone());
        }
    }
    // Each shared read once, however many requests ask it: its figure is as live as a
    // request's own round trip would read it. For each job, where each of its shared
    // reads' replies start.
    let mut sent: HashMap<usize, usize> = HashMap::new();
    let starts: Vec<Vec<usize>> = jobs
        .iter()
        .map(|j| {
            j.shared
                .iter()
                .map(|s| {
                    *sent.entry(Arc::as_ptr(s) as usize).or_insert_with(|| {
                        let at = pipe.len();
                        for c in s.cmd_iter() {
                            pipe.add_command(c.clone());
                        }
                        at
                    })
                })
                .collect()
        })
        .collect();
    match pipe.query_async::<Vec<Value>>(redis).await {
        Ok(values) if values.len() != pipe.len() => {
            for j in jobs {
                let _ = j.reply.send(Err(RedisError::from((
                    ErrorKind::Client,
                    "pipeline reply of the wrong length",
                    format!("{} commands, {} replies", pipe.len(), values.len()),
                ))));
            }
        }
        Ok(values) => {
            let mut at = 0;
            for (j, starts) in jobs.into_iter().zip(starts) {
                let mine = values[at..at + j.pipe.len()].to_vec();
                at += j.pipe.len();
                let shared = j
                    .shared
                    .iter()
                    .zip(starts)
                    .flat_map(|(s, from)| values[from..from + s.len()].iter().cloned())
                    .collect();
                let _ = j.reply.send(own(mine).and_then(|m| Ok((m, own(shared)?))));
            }
        }
        Err(e) => {
            for j in jobs {
                let _ = j.reply.send(Err(e.clone()));
            }
        }
    }
}

/// One request's replies, or its first refused command as an error.
fn own(values: Vec<Value>) -> Result<Vec<Value>, RedisError> {
    match values.iter().find_map(|v| match v {
        Value::ServerError(e) => Some(e.clone()),
        _ => None,
    }) {
        Some(e) => Err(RedisError::from(e)),
        None => Ok(values),
    }
}
