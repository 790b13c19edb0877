//! Redis: one Redis (possibly with replicas) or a Redis Cluster, behind one handle.
//!
//! Every key the gateway writes carries one hash tag (`crate::store::keys`), so every script and
//! pipeline lands in one slot and the same commands work on both layouts: the cluster client
//! only has to route them and absorb `MOVED`/`ASK`/`TRYAGAIN` while slots move or a replica is
//! promoted.

use std::time::Duration;

use anyhow::Context;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use secrecy::ExposeSecret;

use crate::config::Config;

/// How the gateway reaches Redis, for connections beyond the shared one (the ledger writers'
/// blocking reads, pub/sub).
#[derive(Clone)]
pub enum Client {
    Single(redis::Client),
    /// `nodes`: the seed nodes one by one, for pub/sub (below).
    Cluster {
        cluster: Box<ClusterClient>,
        nodes: Vec<redis::Client>,
    },
}

/// A multiplexed Redis handle; clones share one connection (one per node on a cluster).
#[derive(Clone)]
pub enum Redis {
    /// The shared connection to one Redis; it reconnects by itself.
    Single(ConnectionManager),
    /// A connection of its own to one Redis, for work that blocks (the ledger writers).
    Own(MultiplexedConnection),
    Cluster(ClusterConnection),
}

/// The seed URLs in `redis_url`: one, or several separated by commas.
pub fn seed_urls(redis_url: &str) -> Vec<&str> {
    redis_url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect()
}

/// Whether `redis_url` names a Redis Cluster: several seeds, or `redis.cluster`.
pub fn is_cluster(config: &Config) -> bool {
    config.redis.cluster || seed_urls(config.redis_url.expose_secret()).len() > 1
}

fn cluster_client(
    seeds: &[&str],
    connect_timeout: Duration,
    response_timeout: Duration,
) -> redis::RedisResult<ClusterClient> {
    ClusterClientBuilder::new(seeds.to_vec())
        .connection_timeout(connect_timeout)
        .response_timeout(response_timeout)
        // A redirection or a promotion in progress is retried a few times, quickly; past that
        // the request fails and answers 503 rather than queueing behind a failover (a
        // failover takes the cluster's node timeout, seconds).
        .retries(4)
        .min_retry_wait(20)
        .max_retry_wait(400)
        .retry_wait_formula(25, 2)
        .overall_response_timeout(Some(response_timeout * 2))
        .build()
}

pub fn client(config: &Config) -> anyhow::Result<Client> {
    let url = config.redis_url.expose_secret();
    let seeds = seed_urls(url);
    if !is_cluster(config) {
        return Ok(Client::Single(
            redis::Client::open(url.trim()).context("redis_url is not a valid Redis URL")?,
        ));
    }
    let cluster = cluster_client(
        &seeds,
        Duration::from_millis(config.redis.connect_timeout_ms),
        Duration::from_millis(config.redis.response_timeout_ms),
    )
    .context("redis_url is not a valid list of Redis Cluster nodes")?;
    let nodes = seeds
        .iter()
        .map(|u| redis::Client::open(*u))
        .collect::<redis::RedisResult<Vec<_>>>()
        .context("redis_url is not a valid list of Redis Cluster nodes")?;
    Ok(Client::Cluster {
        cluster: Box::new(cluster),
        nodes,
    })
}

/// The shared connection of the process.
pub async fn connect(client: &Client, config: &Config) -> anyhow::Result<Redis> {
    match client {
        Client::Single(c) => {
            let manager_config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_millis(config.redis.connect_timeout_ms)))
                .set_response_timeout(Some(Duration::from_millis(config.redis.response_timeout_ms)))
                // Reconnection is retried in the background; requests in the meantime fail fast
                // and answer 503 rather than queueing behind a dead server.
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500));
            let manager = c
                .get_connection_manager_with_config(manager_config)
                .await
                .context("connecting to Redis (redis_url)")?;
            Ok(Redis::Single(manager))
        }
        Client::Cluster { cluster, .. } => {
            let conn = cluster
                .get_async_connection()
                .await
                .context("connecting to the Redis Cluster (redis_url)")?;
            Ok(Redis::Cluster(conn))
        }
    }
}

impl Client {
    /// A connection apart from the shared one, whose replies may take `response_timeout`
    /// (a blocking read must not hold up, nor be timed out by, everyone else's commands).
    pub async fn own_connection(&self, config: &Config, response_timeout: Duration) -> redis::RedisResult<Redis> {
        let connect_timeout = Duration::from_millis(config.redis.connect_timeout_ms);
        match self {
            Client::Single(c) => {
                let timeouts = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(Some(response_timeout));
                Ok(Redis::Own(
                    c.get_multiplexed_async_connection_with_config(&timeouts).await?,
                ))
            }
            Client::Cluster { .. } => {
                let seeds = seed_urls(config.redis_url.expose_secret());
                let client = cluster_client(&seeds, connect_timeout, response_timeout)?;
                Ok(Redis::Cluster(client.get_async_connection().await?))
            }
        }
    }

    /// A subscriber. On a cluster, `PUBLISH` reaches every node, so subscribing on any one
    /// node hears every announcement; the first seed that answers is taken, and when it goes
    /// away the caller subscribes again (to the next one that answers).
    pub async fn pubsub(&self) -> redis::RedisResult<redis::aio::PubSub> {
        match self {
            Client::Single(c) => c.get_async_pubsub().await,
            Client::Cluster { nodes, .. } => {
                let mut last = None;
                for node in nodes {
                    match node.get_async_pubsub().await {
                        Ok(p) => return Ok(p),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| {
                    redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "no Redis Cluster node"))
                }))
            }
        }
    }
}

impl ConnectionLike for Redis {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Redis::Single(c) => c.req_packed_command(cmd),
            Redis::Own(c) => c.req_packed_command(cmd),
            Redis::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Redis::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Redis::Own(c) => c.req_packed_commands(pipeline, offset, count),
            // A cluster takes a pipeline only when all of it is in one slot, and a pipeline
            // here may span cells (a rebuild's writes, the writers' reads of every outbox,
            // many resellers' reads coalesced): each command goes on its own, all at once,
            // so the multiplexed connection still pipelines those that share a node. A
            // transaction must be in one slot anyway and goes as it is.
            Redis::Cluster(c) if !pipeline.is_transaction() => {
                let c = c.clone();
                Box::pin(async move {
                    let sent = pipeline.cmd_iter().map(|cmd| {
                        let mut c = c.clone();
                        async move { c.req_packed_command(cmd).await }
                    });
                    let replies = futures_util::future::join_all(sent).await;
                    // A command Redis refused is that command's reply, as from one Redis: a
                    // pipeline ignoring errors (many resellers' reads coalesced) hands it to
                    // the request it belongs to alone.
                    replies
                        .into_iter()
                        .skip(offset)
                        .take(count)
                        .map(|r| r.or_else(|e| redis::ServerError::try_from(e).map(Value::ServerError)))
                        .collect()
                })
            }
            Redis::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Redis::Single(c) => c.get_db(),
            Redis::Own(c) => c.get_db(),
            Redis::Cluster(c) => c.get_db(),
        }
    }
}

/// On a cluster, `PING` goes to every primary: the answer says the whole cluster serves.
pub async fn ping(conn: &mut Redis) -> redis::RedisResult<()> {
    redis::cmd("PING").query_async::<()>(conn).await
}

/// How long a script whose slot is being migrated is tried again before the request fails
/// (and answers 503) when it serves a client; see [`SlotMoving`].
pub const SLOT_MOVING_PATIENCE: Duration = Duration::from_secs(2);

/// Whether `e` says the command's slot is being migrated between nodes and the command did
/// not run. A script names several keys, and while its slot moves some of them are on the
/// old node and some on the new one (or do not exist yet, like a new idempotency record):
/// each node refuses it with `TRYAGAIN` until the last key has moved. `ASK` and `MOVED`
/// surface only when the cluster client's own retries ran out on them.
pub fn slot_moving(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    matches!(
        e.kind(),
        ErrorKind::Server(ServerErrorKind::TryAgain | ServerErrorKind::Ask | ServerErrorKind::Moved)
    )
}

/// Patience with a command refused because its slot is moving: [`SlotMoving::wait`] waits a
/// little longer each time before the command is tried again, until `patience` is spent. The
/// cluster client retries those refusals itself a few times within a fraction of a second; a
/// slot holding many keys (a busy cell's nonces and idempotency records) takes longer to
/// move, and a refused command changed nothing, so trying it again is safe.
pub struct SlotMoving {
    started: tokio::time::Instant,
    wait: Duration,
    patience: Duration,
}

impl SlotMoving {
    pub fn new(patience: Duration) -> SlotMoving {
        SlotMoving {
            started: tokio::time::Instant::now(),
            wait: Duration::from_millis(25),
            patience,
        }
    }

    /// Waits and returns true when `e` says the slot is moving and patience allows another
    /// try; false at once otherwise.
    pub async fn wait(&mut self, e: &redis::RedisError) -> bool {
        if !slot_moving(e) || self.started.elapsed() + self.wait >= self.patience {
            return false;
        }
        metrics::counter!("cardgate_redis_slot_moving_retries_total").increment(1);
        tokio::time::sleep(self.wait).await;
        self.wait = (self.wait * 2).min(Duration::from_millis(250));
        true
    }
}

/// Runs a script's `EVALSHA`, loading the script first when Redis does not have it (a
/// restarted Redis, or a replica just promoted, has none), and trying it again for up to
/// [`SLOT_MOVING_PATIENCE`] while its slot moves between nodes. On a cluster `EVALSHA` goes
/// to the node owning its first key and `SCRIPT LOAD` to every node.
pub async fn evalsha<C: redis::aio::ConnectionLike, T: redis::FromRedisValue>(
    conn: &mut C,
    script: &redis::Script,
    cmd: &redis::Cmd,
) -> redis::RedisResult<T> {
    let mut moving = SlotMoving::new(SLOT_MOVING_PATIENCE);
    loop {
        let reply = match cmd.query_async(conn).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                script.prepare_invoke().load_async(conn).await?;
                cmd.query_async(conn).await
            }
            other => other,
        };
        match reply {
            Err(e) if moving.wait(&e).await => {}
            other => return other,
        }
    }
}
