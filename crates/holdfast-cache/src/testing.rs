//! Redis for tests in any crate of the workspace, with `holdfast_store::testing`'s policy.
//!
//! Redis comes from `REDIS_URL`. Without it a Redis test is skipped with a note, except
//! under `CI=true`, where a skip would hide a broken pipeline: there it panics. A `REDIS_URL`
//! that does not answer is always a failure. Tests share one server, so each one takes its
//! own key prefix from [`unique_prefix`].

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::time::Duration;

/// True when running under CI, where backend tests must not skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A connection to the `REDIS_URL` server, or `None` (with a note on stderr) when none is
/// configured outside CI. Call it once per simulated instance: each gets its own connection.
pub async fn redis(test: &str) -> Option<ConnectionManager> {
    let Ok(url) = std::env::var("REDIS_URL") else {
        assert!(
            !in_ci(),
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
pub async fn connect(url: &str) -> redis::RedisResult<ConnectionManager> {
    let client = redis::Client::open(url)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(2);
    let mut conn = ConnectionManager::new_with_config(client, config).await?;
    let _: String = redis::cmd("PING").query_async(&mut conn).await?;
    Ok(conn)
}

/// A key prefix no other test (or run) uses.
pub fn unique_prefix(test: &str) -> String {
    format!("holdfast-test:{test}:{:016x}", rand::random::<u64>())
}
