//! Signed reads' Redis commands, coalesced: the requests that arrive while earlier
//! pipelines are out share the next one, as orders share a ledger commit. Each read
//! still gets its own nonce spent and its own live figures; under load many go in one
//! write to Redis and one reply, instead of one round trip each, and their nonces and
//! tokens in one script call (one per hash slot on a Redis Cluster), instead of one each.

use std::collections::HashMap;
use std::sync::Arc;

use crate::ratelimit::global::{self, Admit, Spent};
use crate::store::keys::hash_tag;
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
    /// The request's nonce to spend and tokens to take, if it has not spent them.
    admit: Option<Admit>,
    reply: oneshot::Sender<Result<Replied, RedisError>>,
}

/// The replies to a request's own commands, then to each of its shared reads' commands
/// (one slice per shared read, itself shared by the requests that asked it).
pub type Replies = (Vec<Value>, Vec<Arc<[Value]>>);

/// A request's replies, and what spending its nonce said (when it asked).
pub type Replied = (Replies, Option<Spent>);

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

    /// Runs `pipe`'s commands, in order, `shared`'s and `admit`, in a pipeline shared
    /// with other requests and returns their replies. A command Redis refuses fails this
    /// request only (the script that spends nonces, the requests it spends them for),
    /// with Redis's error as it is (a `NOSCRIPT` can be told apart and acted on).
    pub async fn query(
        &self,
        pipe: Arc<Pipeline>,
        shared: Vec<Arc<Pipeline>>,
        admit: Option<Admit>,
    ) -> Result<Replied, RedisError> {
        let (reply, answer) = oneshot::channel();
        let gone = || RedisError::from((ErrorKind::Client, "the Redis coalescer has stopped"));
        self.jobs
            .send(Job {
                pipe,
                shared,
                admit,
                reply,
            })
            .map_err(|_| gone())?;
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
    // request's own round trip would read it. Where each distinct read's replies start,
    // and for each job which of them it asked.
    let mut sent: HashMap<usize, usize> = HashMap::new();
    let mut reads: Vec<(usize, usize)> = Vec::new();
    let asked: Vec<Vec<usize>> = jobs
        .iter()
        .map(|j| {
            j.shared
                .iter()
                .map(|s| {
                    *sent.entry(Arc::as_ptr(s) as usize).or_insert_with(|| {
                        reads.push((pipe.len(), s.len()));
                        for c in s.cmd_iter() {
                            pipe.add_command(c.clone());
                        }
                        reads.len() - 1
                    })
                })
                .collect()
        })
        .collect();
    // The nonces and tokens, in one script call per hash slot: on one Redis a script may
    // name keys of every cell, on a cluster only of one slot. For each call, where its
    // reply is and which jobs it spends for, in order.
    let by_slot = matches!(redis, Redis::Cluster(_));
    let mut admits: Vec<(&str, Vec<usize>)> = Vec::new();
    for (i, j) in jobs.iter().enumerate() {
        if let Some(a) = &j.admit {
            let tag = if by_slot { hash_tag(a.nonce_key()) } else { "" };
            match admits.iter_mut().find(|(t, _)| *t == tag) {
                Some((_, members)) => members.push(i),
                None => admits.push((tag, vec![i])),
            }
        }
    }
    let admits: Vec<(usize, Vec<usize>)> = admits
        .into_iter()
        .map(|(_, members)| {
            let batch: Vec<&Admit> = members.iter().filter_map(|&i| jobs[i].admit.as_ref()).collect();
            let at = pipe.len();
            pipe.add_command(global::admit_cmd(&batch));
            (at, members)
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
        Ok(mut values) => {
            let mut spent: Vec<Option<Result<Spent, RedisError>>> = jobs.iter().map(|_| None).collect();
            for (at, members) in admits {
                match read_admit(std::mem::replace(&mut values[at], Value::Nil), members.len()) {
                    Ok(each) => {
                        for (i, s) in members.into_iter().zip(each) {
                            spent[i] = Some(Ok(s));
                        }
                    }
                    Err(e) => {
                        for i in members {
                            spent[i] = Some(Err(e.clone()));
                        }
                    }
                }
            }
            // Each shared read's replies once, for every job that asked it.
            let reads: Vec<Result<Arc<[Value]>, RedisError>> = reads
                .into_iter()
                .map(|(from, len)| own(&values[from..from + len]).map(Arc::from))
                .collect();
            let mut at = 0;
            for ((j, asked), spent) in jobs.into_iter().zip(asked).zip(spent) {
                let mine = own(&values[at..at + j.pipe.len()]).map(<[Value]>::to_vec);
                at += j.pipe.len();
                let shared = asked.iter().map(|&r| reads[r].clone()).collect::<Result<Vec<_>, _>>();
                let _ = j.reply.send(mine.and_then(|m| Ok(((m, shared?), spent.transpose()?))));
            }
        }
        Err(e) => {
            for j in jobs {
                let _ = j.reply.send(Err(e.clone()));
            }
        }
    }
}

/// One admit call's reply: what it said for each of its `n` requests, or Redis's refusal.
fn read_admit(reply: Value, n: usize) -> Result<Vec<Spent>, RedisError> {
    match reply {
        Value::ServerError(e) => Err(RedisError::from(e)),
        v => global::read_admit(v, n),
    }
}

/// One request's replies, or its first refused command as an error.
fn own(values: &[Value]) -> Result<&[Value], RedisError> {
    match values.iter().find_map(|v| match v {
        Value::ServerError(e) => Some(e.clone()),
        _ => None,
    }) {
        Some(e) => Err(RedisError::from(e)),
        None => Ok(values),
    }
}
