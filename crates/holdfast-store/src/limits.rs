//! Rate limits that every instance sees and that outlive any of them, and the known devices
//! that let an account's owner past a quota strangers exhausted.
//!
//! A limit is a GCRA cell per key: the key's *theoretical arrival time* (`tat`). A quota of
//! `burst` requests refilled one per `every` admits a request at `now` when
//! `max(tat, now) + every <= now + burst × every`, and then moves `tat` to the left side. One
//! conditional upsert decides and records at once, so two instances taking from the same key
//! at the same moment cannot both take its last unit. Keys are stored as their SHA-256: the
//! table holds no addresses or emails, and any key fits.

use crate::accounts::ms;
use crate::{Pooled, Rerun, Result, Store};
use holdfast_core::DeviceToken;
use sha2::{Digest, Sha256};
use sqlx::Row;
use std::time::Duration;

/// `burst` requests at once, then one more per `every`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub burst: u32,
    pub every: Duration,
}

impl Quota {
    pub const fn new(burst: u32, every: Duration) -> Self {
        Self { burst, every }
    }
}

/// A key had no unit left: which one (its index in the request) and how long until it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub index: usize,
    pub retry_after: Duration,
}

fn key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl Store {
    /// Takes one unit from each key's quota, in order, in one transaction, stopping at the
    /// first key with none left (later keys are not charged for a refused request).
    pub async fn rate_take(&self, keys: &[(&str, Quota)], now: i64) -> Result<Option<Refused>> {
        let cells: Vec<(String, i64, i64)> = keys
            .iter()
            .map(|(key, q)| {
                let every = ms(q.every).max(1);
                (
                    key_hash(key),
                    every,
                    every.saturating_mul(i64::from(q.burst)),
                )
            })
            .collect();
        self.run(Rerun::Always, "rate_take", || async {
            let mut tx = self.begin_write().await?;
            for (index, (hash, every, window)) in cells.iter().enumerate() {
                let taken = sqlx::query(
                    "INSERT INTO rate_limits (key_hash, tat) VALUES ($1, $2 + $3)
                     ON CONFLICT (key_hash) DO UPDATE
                     SET tat = CASE WHEN rate_limits.tat < $2 THEN $2 ELSE rate_limits.tat END + $3
                     WHERE CASE WHEN rate_limits.tat < $2 THEN $2 ELSE rate_limits.tat END + $3 <= $2 + $4
                     RETURNING tat",
                )
                .bind(hash)
                .bind(now)
                .bind(*every)
                .bind(*window)
                .fetch_optional(tx.conn())
                .await?;
                if taken.is_none() {
                    let tat: i64 = sqlx::query("SELECT tat FROM rate_limits WHERE key_hash = $1")
                        .bind(hash)
                        .fetch_one(tx.conn())
                        .await?
                        .try_get("tat")?;
                    tx.commit().await?;
                    let wait = tat.saturating_add(*every).saturating_sub(now.saturating_add(*window));
                    return Ok(Some(Refused {
                        index,
                        retry_after: Duration::from_millis(u64::try_from(wait.max(1)).unwrap_or(1)),
                    }));
                }
            }
            tx.commit().await?;
            Ok(None)
        })
        .await
    }

    /// Deletes cells whose time has passed (equivalent to no cell); returns how many.
    pub async fn rate_reap(&self, now: i64) -> Result<u64> {
        self.run(Rerun::Always, "rate_reap", || async {
            Ok(sqlx::query("DELETE FROM rate_limits WHERE tat <= $1")
                .bind(now)
                .execute_pooled(self)
                .await?
                .rows_affected())
        })
        .await
    }

    /// Remembers that the browser holding `token` logged in to `user_id`.
    pub async fn device_remember(
        &self,
        token: &DeviceToken,
        user_id: &str,
        now: i64,
    ) -> Result<()> {
        let hash = token.storage_hash();
        self.run(Rerun::Always, "device_remember", || async {
            sqlx::query(
                "INSERT INTO known_devices (token_hash, user_id, created_at) VALUES ($1, $2, $3)
                 ON CONFLICT (token_hash) DO NOTHING",
            )
            .bind(&hash)
            .bind(user_id)
            .bind(now)
            .execute_pooled(self)
            .await?;
            Ok(())
        })
        .await
    }

    /// The account the browser holding `token` logged in to, if it is known.
    pub async fn device_owner(&self, token: &DeviceToken) -> Result<Option<String>> {
        let hash = token.storage_hash();
        let sql = "SELECT user_id FROM known_devices WHERE token_hash = $1";
        let row: Option<(String,)> = self
            .read_row("device_owner", || sqlx::query(sql).bind(&hash))
            .await?;
        Ok(row.map(|(id,)| id))
    }

    /// Forgets devices remembered before `before`; returns how many.
    pub async fn device_reap(&self, before: i64) -> Result<u64> {
        self.run(Rerun::Always, "device_reap", || async {
            Ok(
                sqlx::query("DELETE FROM known_devices WHERE created_at < $1")
                    .bind(before)
                    .execute_pooled(self)
                    .await?
                    .rows_affected(),
            )
        })
        .await
    }
}
