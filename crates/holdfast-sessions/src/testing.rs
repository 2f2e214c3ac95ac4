//! Helpers for tests and drills that share one Redis server.
//!
//! Losing Redis' memory is simulated by deleting every key under a tier's prefix: for the
//! session tier that is exactly what a restart of a non-persistent Redis (or a `FLUSHDB`)
//! does, without touching other tests' keys on the same server.

use redis::aio::ConnectionManager;

/// Deletes every key under `<prefix>:`; returns how many.
pub async fn flush_prefix(conn: &ConnectionManager, prefix: &str) -> redis::RedisResult<u64> {
    let mut conn = conn.clone();
    let pattern = format!("{prefix}:*");
    let (mut cursor, mut deleted) = (0u64, 0u64);
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            deleted += redis::cmd("UNLINK")
                .arg(keys)
                .query_async::<u64>(&mut conn)
                .await?;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}
