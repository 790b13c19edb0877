//! Redis: one multiplexed connection that reconnects by itself.

use std::time::Duration;

use anyhow::Context;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::ExposeSecret;

use crate::config::Config;

pub fn client(config: &Config) -> anyhow::Result<redis::Client> {
    redis::Client::open(config.redis_url.expose_secret()).context("redis_url is not a valid Redis URL")
}

pub async fn connect(client: &redis::Client, config: &Config) -> anyhow::Result<ConnectionManager> {
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(config.redis.connect_timeout_ms)))
        .set_response_timeout(Some(Duration::from_millis(config.redis.response_timeout_ms)))
        // Reconnection is retried in the background; requests in the meantime fail fast
        // and answer 503 rather than queueing behind a dead server.
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    client
        .get_connection_manager_with_config(manager_config)
        .await
        .context("connecting to Redis (redis_url)")
}

pub async fn ping(conn: &mut ConnectionManager) -> redis::RedisResult<()> {
    redis::cmd("PING").query_async::<()>(conn).await
}

/// Runs a script's `EVALSHA`, loading the script first when Redis does not have it (a
/// restarted Redis has none).
pub async fn evalsha<C: redis::aio::ConnectionLike, T: redis::FromRedisValue>(
    conn: &mut C,
    script: &redis::Script,
    cmd: &redis::Cmd,
) -> redis::RedisResult<T> {
    match cmd.query_async(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            script.prepare_invoke().load_async(conn).await?;
            cmd.query_async(conn).await
        }
        other => other,
    }
}
