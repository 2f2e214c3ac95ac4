//! The shared Redis tier: values, leases and versions, each key written with an expiry.
//!
//! Keys for cache key `k` under `prefix`: `prefix:val:k` (the JSON record, `PX` = its TTL plus
//! the writer's stale window), `prefix:lease:k` (the token of the one instance allowed to
//! fill, `PX` = the lease TTL) and `prefix:ver:k` (bumped by invalidation). Freshness is read
//! from the value's remaining `PTTL`, so only Redis' clock matters, never skew between hosts.
//! Every multi-step change is one Lua script, so it is atomic.

use crate::inner::{Config, Entry};
use redis::aio::ConnectionManager;
use redis::{RedisResult, Script};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::fmt::Display;
use std::time::Duration;
use tokio::time::Instant;

/// `{value, pttl}` of the record.
const READ: &str = r"
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
";

/// Takes the lease if free; then returns `{version, value, pttl}` read under it, so a fill
/// that landed just before is seen.
const ACQUIRE: &str = r"
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
return {redis.call('GET', KEYS[3]) or '0', redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
";

/// Fills only while still holding the lease and while the version is the one the lease
/// was taken under; releases the lease either way (if it is still ours).
const FILL: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
if (redis.call('GET', KEYS[3]) or '0') ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
return 1
";

/// Deletes the lease only if it is still ours.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Drops the value, revokes any lease and bumps the version (which expires too).
const INVALIDATE: &str = r"
redis.call('DEL', KEYS[1], KEYS[2])
local v = redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[1])
return v
";

/// The record in `prefix:val:k`.
#[derive(Serialize, Deserialize)]
struct Wire<S, B> {
    /// The lease token it was filled under: tells one fill from the next.
    fill: S,
    delta_ms: u64,
    stale_ms: u64,
    body: B,
}

/// Explicit so that a `V` that itself serializes as `null` stays distinct from "not found".
#[derive(Serialize, Deserialize)]
enum Body<V> {
    Found(V),
    NotFound,
}

pub(crate) struct Meta {
    fill: String,
    delta_ms: u64,
    stale_ms: u64,
}

type Encode<V> = fn(Option<&V>, &Meta) -> serde_json::Result<Vec<u8>>;
type Decode<V> = fn(&[u8]) -> serde_json::Result<(Option<V>, Meta)>;

fn encode<V: Serialize>(value: Option<&V>, meta: &Meta) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&Wire {
        fill: meta.fill.as_str(),
        delta_ms: meta.delta_ms,
        stale_ms: meta.stale_ms,
        body: value.map_or(Body::NotFound, Body::Found),
    })
}

fn decode<V: DeserializeOwned>(bytes: &[u8]) -> serde_json::Result<(Option<V>, Meta)> {
    let wire: Wire<String, Body<V>> = serde_json::from_slice(bytes)?;
    let value = match wire.body {
        Body::Found(v) => Some(v),
        Body::NotFound => None,
    };
    let meta = Meta {
        fill: wire.fill,
        delta_ms: wire.delta_ms,
        stale_ms: wire.stale_ms,
    };
    Ok((value, meta))
}

/// A record read from Redis, its freshness converted to this process' clock.
pub(crate) struct Stored<V> {
    pub entry: Entry<V>,
    pub fill: String,
}

/// A lease this instance holds, with what the key held when it was taken.
pub(crate) struct Lease<V> {
    token: String,
    version: String,
    pub current: Option<Stored<V>>,
}

struct Scripts {
    read: Script,
    acquire: Script,
    fill: Script,
    release: Script,
    invalidate: Script,
}

pub(crate) struct Tier<K, V> {
    conn: ConnectionManager,
    prefix: String,
    name: fn(&K) -> String,
    encode: Encode<V>,
    decode: Decode<V>,
    scripts: Scripts,
}

fn ms(d: Duration) -> u64 {
    // Far beyond any sane TTL, and well inside Redis' signed 64-bit milliseconds.
    u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX)
        .min(1 << 50)
}

impl<K, V> Tier<K, V> {
    pub fn new(conn: ConnectionManager, prefix: String) -> Self
    where
        K: Display,
        V: Serialize + DeserializeOwned,
    {
        Tier {
            conn,
            prefix,
            name: |k: &K| k.to_string(),
            encode: encode::<V>,
            decode: decode::<V>,
            scripts: Scripts {
                read: Script::new(READ),
                acquire: Script::new(ACQUIRE),
                fill: Script::new(FILL),
                release: Script::new(RELEASE),
                invalidate: Script::new(INVALIDATE),
            },
        }
    }

    /// `[value, lease, version]` keys.
    fn keys(&self, key: &K) -> [String; 3] {
        let (p, k) = (&self.prefix, (self.name)(key));
        [
            format!("{p}:val:{k}"),
            format!("{p}:lease:{k}"),
            format!("{p}:ver:{k}"),
        ]
    }

    fn stored(&self, bytes: Option<Vec<u8>>, pttl: i64, now: Instant) -> Option<Stored<V>> {
        let bytes = bytes?;
        if pttl < 0 {
            // Gone, or written without an expiry by someone else: treat as a miss and
            // overwrite it with a record that has one.
            return None;
        }
        let (value, meta) = match (self.decode)(&bytes) {
            Ok(decoded) => decoded,
            Err(e) => {
                // Another build's format; the next fill replaces it.
                tracing::warn!(error = %e, prefix = %self.prefix, "undecodable cache record");
                return None;
            }
        };
        let remaining = pttl - i64::try_from(meta.stale_ms).unwrap_or(i64::MAX);
        let fresh_until = if remaining >= 0 {
            now + Duration::from_millis(remaining.unsigned_abs())
        } else {
            now.checked_sub(Duration::from_millis(remaining.unsigned_abs()))?
        };
        Some(Stored {
            entry: Entry {
                value,
                fresh_until,
                delta: Duration::from_millis(meta.delta_ms),
            },
            fill: meta.fill,
        })
    }

    pub async fn read(&self, key: &K) -> RedisResult<Option<Stored<V>>> {
        let [val, _, _] = self.keys(key);
        let (bytes, pttl): (Option<Vec<u8>>, i64) = self
            .scripts
            .read
            .key(val)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(self.stored(bytes, pttl, Instant::now()))
    }

    /// `SET lease <token> NX PX <ttl>`: `None` when another instance holds it.
    pub async fn acquire(&self, key: &K, ttl: Duration) -> RedisResult<Option<Lease<V>>> {
        let [val, lease, ver] = self.keys(key);
        let token = format!("{:032x}", rand::random::<u128>());
        let got: Option<(String, Option<Vec<u8>>, i64)> = self
            .scripts
            .acquire
            .key(val)
            .key(lease)
            .key(ver)
            .arg(&token)
            .arg(ms(ttl).max(1))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(got.map(|(version, bytes, pttl)| Lease {
            token,
            version,
            current: self.stored(bytes, pttl, Instant::now()),
        }))
    }

    /// Writes the origin's answer if `lease` is still ours and the key was not invalidated
    /// since; `Ok(false)` when fenced off. Releases the lease.
    pub async fn fill(
        &self,
        key: &K,
        lease: &Lease<V>,
        value: Option<&V>,
        delta: Duration,
        cfg: &Config,
    ) -> RedisResult<bool> {
        let meta = Meta {
            fill: lease.token.clone(),
            delta_ms: ms(delta),
            stale_ms: ms(cfg.max_stale()),
        };
        let px = ms(cfg.ttl_for(&value) + cfg.max_stale()).max(1);
        let payload = match (self.encode)(value, &meta) {
            Ok(payload) => payload,
            Err(e) => {
                tracing::warn!(error = %e, prefix = %self.prefix, "value not encodable; not cached");
                self.release(key, lease).await?;
                return Ok(false);
            }
        };
        let [val, lease_key, ver] = self.keys(key);
        let filled: i64 = self
            .scripts
            .fill
            .key(val)
            .key(lease_key)
            .key(ver)
            .arg(&lease.token)
            .arg(&lease.version)
            .arg(payload)
            .arg(px)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(filled == 1)
    }

    /// Gives the lease back without filling — only if it is still ours.
    pub async fn release(&self, key: &K, lease: &Lease<V>) -> RedisResult<bool> {
        let [_, lease_key, _] = self.keys(key);
        let released: i64 = self
            .scripts
            .release
            .key(lease_key)
            .arg(&lease.token)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(released == 1)
    }

    pub async fn invalidate(&self, key: &K, cfg: &Config) -> RedisResult<()> {
        let [val, lease, ver] = self.keys(key);
        // The version must outlive any lease taken before the bump; a fill also needs its
        // lease, so anything longer than that is belt and braces.
        let keep = ms(cfg.lease_ttl + cfg.ttl + cfg.max_stale()).max(1);
        let _: i64 = self
            .scripts
            .invalidate
            .key(val)
            .key(lease)
            .key(ver)
            .arg(keep)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Deletes every key under the prefix (values, leases, versions): revoked leases mean
    /// no fill that started before the flush can land after it.
    pub async fn flush(&self) -> RedisResult<()> {
        delete_prefix(&self.conn, &self.prefix).await.map(drop)
    }
}

/// Deletes every key under `<prefix>:` (SCAN, then UNLINK, a batch at a time); returns how
/// many. Other keys on the server are untouched, so deployments and tests can share one Redis:
/// for a tier this is exactly what a restart of a non-persistent Redis does to it.
pub async fn delete_prefix(conn: &ConnectionManager, prefix: &str) -> RedisResult<u64> {
    let pattern = format!("{}:*", glob_escape(prefix));
    let mut conn = conn.clone();
    let (mut cursor, mut deleted) = (0u64, 0u64);
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(500)
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

/// Escapes Redis glob metacharacters so a prefix matches only itself.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_keep_found_null_and_not_found_apart() {
        let meta = Meta {
            fill: "t".into(),
            delta_ms: 5,
            stale_ms: 7,
        };
        let found_null = encode::<Option<u8>>(Some(&None), &meta).unwrap();
        let not_found = encode::<Option<u8>>(None, &meta).unwrap();
        assert_ne!(found_null, not_found);
        assert!(matches!(
            decode::<Option<u8>>(&found_null),
            Ok((Some(None), _))
        ));
        let (value, meta) = decode::<Option<u8>>(&not_found).unwrap();
        assert!(value.is_none());
        assert_eq!(
            (meta.fill.as_str(), meta.delta_ms, meta.stale_ms),
            ("t", 5, 7)
        );
    }

    #[test]
    fn glob_escape_matches_only_the_prefix_itself() {
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
        assert_eq!(glob_escape("plain:prefix"), "plain:prefix");
    }

    async fn tier(test: &str) -> Option<Tier<String, u32>> {
        let conn = holdfast_testkit::redis::redis(test).await?;
        Some(Tier::new(
            conn,
            holdfast_testkit::redis::unique_prefix(test),
        ))
    }

    /// A holder whose lease expired must not release (or fill under) its successor's lease.
    #[tokio::test]
    async fn a_lease_is_released_and_filled_only_by_its_holder() {
        let Some(tier) = tier("lease_holder_only").await else {
            return;
        };
        let key = "k".to_string();
        let long = Duration::from_secs(30);
        let first = tier.acquire(&key, long).await.unwrap().expect("free lease");
        assert!(tier.acquire(&key, long).await.unwrap().is_none(), "held");
        // The first holder's lease expires (simulated exactly by deleting it).
        let [_, lease_key, _] = tier.keys(&key);
        let _: i64 = redis::cmd("DEL")
            .arg(&lease_key)
            .query_async(&mut tier.conn.clone())
            .await
            .unwrap();
        let second = tier
            .acquire(&key, long)
            .await
            .unwrap()
            .expect("expired lease");

        assert!(!tier.release(&key, &first).await.unwrap(), "not the holder");
        let cfg = crate::Cache::<String, u32>::builder(crate::Ttl::from_secs(60)).build();
        let cfg = &cfg.inner.cfg;
        let late = tier.fill(&key, &first, Some(&1), Duration::ZERO, cfg).await;
        assert!(!late.unwrap(), "a lost lease cannot fill");
        let holder: Option<String> = redis::cmd("GET")
            .arg(&lease_key)
            .query_async(&mut tier.conn.clone())
            .await
            .unwrap();
        assert_eq!(holder.as_deref(), Some(second.token.as_str()));

        assert!(tier
            .fill(&key, &second, Some(&2), Duration::ZERO, cfg)
            .await
            .unwrap());
        let stored = tier.read(&key).await.unwrap().expect("filled");
        assert_eq!(stored.entry.value, Some(2));
        assert_eq!(stored.fill, second.token);
        assert!(
            tier.acquire(&key, long).await.unwrap().is_some(),
            "fill released it"
        );
        tier.flush().await.unwrap();
    }
}
