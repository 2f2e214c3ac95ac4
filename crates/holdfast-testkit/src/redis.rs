//! Redis for tests, with the same policy as databases: Redis comes from `REDIS_URL`; without
//! it a Redis test is skipped with a note, except under `CI=true`, where a skip would hide a
//! broken pipeline and it panics. A `REDIS_URL` that does not answer is always a failure.
//! Tests share one server, so each takes its own key prefix from [`unique_prefix`] and
//! "Redis lost its memory" is [`flush_prefix`] — the shared server is never flushed.

use holdfast_cache::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::time::Duration;

pub use holdfast_cache::delete_prefix as flush_prefix;

/// A connection to the `REDIS_URL` server, or `None` (with a note on stderr) when none is
/// configured outside CI. Call it once per simulated instance: each gets its own connection.
pub async fn redis(test: &str) -> Option<ConnectionManager> {
    let Ok(url) = std::env::var("REDIS_URL") else {
        assert!(
            !holdfast_store::testing::in_ci(),
            "{test}: REDIS_URL is not set, and CI=true forbids skipping a Redis test"
        );
        eprintln!("{test}: skipped on Redis (set REDIS_URL to run it)");
        return None;
    };
    match connect(&url).await {
        Ok(conn) => Some(conn),
        Err(e) => panic!("{test}: REDIS_URL is set but Redis does not answer: {e}"),
    }
}

/// Connects with short timeouts, and proves the server answers.
pub async fn connect(url: &str) -> holdfast_cache::redis::RedisResult<ConnectionManager> {
    let client = holdfast_cache::redis::Client::open(url)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(2);
    let mut conn = ConnectionManager::new_with_config(client, config).await?;
    let _: String = holdfast_cache::redis::cmd("PING")
        .query_async(&mut conn)
        .await?;
    Ok(conn)
}

/// A key prefix no other test (or run) uses.
pub fn unique_prefix(test: &str) -> String {
    format!("holdfast-test:{test}:{}", uuid::Uuid::new_v4().simple())
}
