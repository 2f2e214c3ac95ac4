//! The Redis tier: Redis answers the hot path, the durable store (the *backstop*) holds every
//! session too, so losing Redis' memory loses no session.
//!
//! Key `<prefix>:s:<sha256 of id>` holds `user_id,created_at,expires_at,last_seen_at` with
//! `PX` = what is left of `min(last_seen + idle, expires_at)`: Redis forgets a session exactly
//! when it dies, and the load path checks the same bounds again. The backstop row carries the
//! same four facts.
//!
//! Orderings that make the races come out right:
//! - **create**: store `INSERT` (synchronous), then `SET`. Every session Redis has, the
//!   backstop has — so the store is also the index of a user's sessions (password change).
//! - **touch** (a use, at most once per `touch_every`): `SET … XX` (never re-creates a key a
//!   logout just deleted), then the backstop `UPDATE` goes through the queue. An `UPDATE`
//!   cannot resurrect a deleted row, so a queued touch losing the race to a logout is
//!   harmless; and when it finds the row gone, the writer deletes the Redis copy too — any
//!   copy that escaped a revocation (a Redis that was unreachable during the logout) dies at
//!   its next use.
//! - **miss**: read the backstop, `SET … NX`, then read the backstop *again*; if the row is
//!   gone, `DEL`. A logout deletes the row and then the key, so either the logout's `DEL`
//!   comes after our `SET`, or our second read comes after its row delete: a session cannot
//!   be re-hydrated back to life.
//! - **logout**: store first, then Redis, both before answering; Redis is attempted even while
//!   Redis is known to be down, and its failure is the caller's error (retry the logout).

use crate::{count, ms, Config, Counters, Error, Result};
use holdfast_core::SessionId;
use holdfast_store::{SessionCreate, SessionRecord, Store};
use redis::aio::ConnectionManager;
use redis::RedisError;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Touches waiting for the writer; beyond this a request writes its own touch.
const QUEUE: usize = 8192;
/// Most messages the writer takes off the queue at once.
const BATCH: usize = 1024;
/// Most sessions waiting for the next backstop write (see [`writer`]).
const MAX_PENDING: usize = 65_536;
/// At most one backstop write per this long (see [`writer`]).
const LINGER: Duration = Duration::from_millis(250);
/// While Redis is down, how often it is pinged to see whether it is back.
const PROBE_EVERY: Duration = Duration::from_millis(200);

enum Msg {
    Touch(SessionId, i64),
    Flush(oneshot::Sender<()>),
}

pub(crate) struct RedisTier {
    conn: ConnectionManager,
    prefix: Arc<str>,
    store: Store,
    config: Config,
    counters: Arc<Counters>,
    queue: mpsc::Sender<Msg>,
    /// Set by a Redis error, cleared by a successful probe: while set, loads and creates skip
    /// Redis and use the store.
    down: Arc<AtomicBool>,
}

/// The value kept in Redis.
struct Cached {
    user_id: String,
    created_at: i64,
    expires_at: i64,
    last_seen_at: i64,
}

impl Cached {
    fn encode(&self) -> String {
        format!(
            "{},{},{},{}",
            self.user_id, self.created_at, self.expires_at, self.last_seen_at
        )
    }

    fn decode(raw: &[u8]) -> Option<Self> {
        let (user_id, [created_at, expires_at, last_seen_at]) = crate::user_and_times(raw, ',')?;
        Some(Self {
            user_id,
            created_at,
            expires_at,
            last_seen_at,
        })
    }

    /// How much longer the session lives (≤ 0: dead).
    fn ttl_ms(&self, now: i64, config: &Config) -> i64 {
        self.last_seen_at
            .saturating_add(ms(config.idle_ttl))
            .min(self.expires_at)
            .saturating_sub(now)
    }
}

impl From<SessionRecord> for Cached {
    fn from(r: SessionRecord) -> Self {
        Self {
            user_id: r.user_id,
            created_at: r.created_at,
            expires_at: r.expires_at,
            last_seen_at: r.last_seen_at,
        }
    }
}

fn key(prefix: &str, id: &SessionId) -> String {
    format!("{prefix}:s:{}", id.storage_hash())
}

impl RedisTier {
    pub(crate) fn start(
        conn: ConnectionManager,
        prefix: &str,
        store: Store,
        config: Config,
        counters: Arc<Counters>,
    ) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        let prefix: Arc<str> = prefix.into();
        tokio::spawn(writer(
            rx,
            store.clone(),
            conn.clone(),
            prefix.clone(),
            counters.clone(),
        ));
        metrics::gauge!("holdfast_sessions_redis_up").set(1.0);
        Self {
            conn,
            prefix,
            store,
            config,
            counters,
            queue,
            down: Arc::new(AtomicBool::new(false)),
        }
    }

    fn available(&self) -> bool {
        !self.down.load(Ordering::Relaxed)
    }

    /// Counts the error and, on the first one, sends sessions to the store until a probe
    /// finds Redis answering again (so requests do not each wait out a dead Redis, and come
    /// back to it within a probe interval or two of its return).
    fn failed(&self, e: &RedisError) {
        count!(self.counters, redis_errors, 1);
        if self.down.swap(true, Ordering::Relaxed) {
            return;
        }
        tracing::warn!(error = %e, "redis failed; sessions are served by the store until it is back");
        metrics::gauge!("holdfast_sessions_redis_up").set(0.0);
        let (down, mut conn) = (Arc::downgrade(&self.down), self.conn());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                // The tier is gone: stop probing.
                let Some(down) = down.upgrade() else { return };
                let pong: Result<String, RedisError> =
                    redis::cmd("PING").query_async(&mut conn).await;
                if pong.is_ok() {
                    down.store(false, Ordering::Relaxed);
                    metrics::gauge!("holdfast_sessions_redis_up").set(1.0);
                    tracing::info!("redis is back; sessions are served by redis again");
                    return;
                }
            }
        });
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    pub(crate) async fn create(&self, id: &SessionId, user_id: &str, now: i64) -> Result<()> {
        self.store
            .session_create(SessionCreate {
                id,
                user_id,
                now,
                absolute_ttl: self.config.absolute_ttl,
            })
            .await?;
        let c = Cached {
            user_id: user_id.to_owned(),
            created_at: now,
            expires_at: now.saturating_add(ms(self.config.absolute_ttl)),
            last_seen_at: now,
        };
        if self.available() {
            let set: Result<(), RedisError> = redis::cmd("SET")
                .arg(key(&self.prefix, id))
                .arg(c.encode())
                .arg("PX")
                .arg(c.ttl_ms(now, &self.config).max(1))
                .query_async(&mut self.conn())
                .await;
            // The backstop has it; the first load will re-hydrate it.
            if let Err(e) = set {
                self.failed(&e);
            }
        }
        Ok(())
    }

    pub(crate) async fn load(&self, id: &SessionId, now: i64) -> Result<Option<String>> {
        if !self.available() {
            count!(self.counters, store_fallbacks, 1);
            return Ok(self.stored(id, now).await?.map(|r| r.user_id));
        }
        let key = key(&self.prefix, id);
        let got: Option<Vec<u8>> = match redis::cmd("GET")
            .arg(&key)
            .query_async(&mut self.conn())
            .await
        {
            Ok(v) => v,
            Err(e) => {
                self.failed(&e);
                count!(self.counters, store_fallbacks, 1);
                return Ok(self.stored(id, now).await?.map(|r| r.user_id));
            }
        };
        let Some(raw) = got else {
            return self.rehydrate(id, &key, now).await;
        };
        match Cached::decode(&raw) {
            Some(c) if c.ttl_ms(now, &self.config) > 0 => {
                if now.saturating_sub(c.last_seen_at) >= ms(self.config.touch_every) {
                    return self.touch(id, &key, c, now).await;
                }
                Ok(Some(c.user_id))
            }
            // Dead by its own bounds (clocks differ) or unreadable: the backstop decides.
            _ => {
                if let Err(e) = redis::cmd("DEL")
                    .arg(&key)
                    .query_async::<()>(&mut self.conn())
                    .await
                {
                    self.failed(&e);
                }
                self.rehydrate(id, &key, now).await
            }
        }
    }

    async fn touch(
        &self,
        id: &SessionId,
        key: &str,
        c: Cached,
        now: i64,
    ) -> Result<Option<String>> {
        let c = Cached {
            last_seen_at: now,
            ..c
        };
        let set: Result<Option<String>, RedisError> = redis::cmd("SET")
            .arg(key)
            .arg(c.encode())
            .arg("XX")
            .arg("PX")
            .arg(c.ttl_ms(now, &self.config).max(1))
            .query_async(&mut self.conn())
            .await;
        match set {
            Ok(Some(_)) => {}
            // Deleted since our GET (a logout, a flush): the backstop decides.
            Ok(None) => return self.rehydrate(id, key, now).await,
            Err(e) => self.failed(&e),
        }
        match self.queue.try_send(Msg::Touch(id.clone(), now)) {
            Ok(()) => Ok(Some(c.user_id)),
            Err(_) => {
                // Full (or the writer is gone): write it here rather than drop it.
                count!(self.counters, backstop_sync_writes, 1);
                let gone = write_touches(
                    &self.store,
                    &self.conn,
                    &self.prefix,
                    &self.counters,
                    &[(id.clone(), now)],
                )
                .await?;
                Ok(gone.is_empty().then_some(c.user_id))
            }
        }
    }

    async fn rehydrate(&self, id: &SessionId, key: &str, now: i64) -> Result<Option<String>> {
        let Some(rec) = self.stored(id, now).await? else {
            return Ok(None);
        };
        let c = Cached::from(rec);
        let ttl = c.ttl_ms(now, &self.config);
        if ttl <= 0 {
            return Ok(Some(c.user_id));
        }
        let set: Result<Option<String>, RedisError> = redis::cmd("SET")
            .arg(key)
            .arg(c.encode())
            .arg("NX")
            .arg("PX")
            .arg(ttl)
            .query_async(&mut self.conn())
            .await;
        match set {
            Ok(Some(_)) => {
                // A logout may have deleted the row after our read and the key before our SET.
                if self.stored(id, now).await?.is_none() {
                    let _ = redis::cmd("DEL")
                        .arg(key)
                        .query_async::<()>(&mut self.conn())
                        .await;
                    return Ok(None);
                }
                count!(self.counters, rehydrated, 1);
            }
            // Another instance re-populated it first.
            Ok(None) => {}
            Err(e) => self.failed(&e),
        }
        Ok(Some(c.user_id))
    }

    /// The backstop's answer (it deletes a dead session and touches a live one when due).
    async fn stored(&self, id: &SessionId, now: i64) -> Result<Option<SessionRecord>> {
        let c = &self.config;
        Ok(self
            .store
            .session_get(id, now, c.idle_ttl, c.touch_every)
            .await?)
    }

    pub(crate) async fn logout(&self, id: &SessionId) -> Result<()> {
        self.store.session_delete(id).await?;
        self.delete_keys(vec![key(&self.prefix, id)]).await
    }

    pub(crate) async fn logout_user(&self, user_id: &str, now: i64) -> Result<()> {
        let hashes = self.store.session_delete_user(user_id, now).await?;
        let keys = hashes
            .iter()
            .map(|h| format!("{}:s:{h}", self.prefix))
            .collect();
        self.delete_keys(keys).await
    }

    async fn delete_keys(&self, keys: Vec<String>) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let del: Result<(), RedisError> = redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut self.conn())
            .await;
        del.map_err(|e| {
            self.failed(&e);
            Error::Redis(e)
        })
    }

    pub(crate) async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.queue.send(Msg::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// The backstop writer. It keeps draining the queue into `pending` — the latest use per
/// session — while one store write at a time takes whatever has accumulated, at most one
/// write per `LINGER` (sooner when asked to flush). So the queue stays short however slow a
/// write is, and a busy session costs the store one row per `LINGER`, not one per touch (a
/// last-use time only matters to within `touch_every` anyway). Past `MAX_PENDING` sessions it
/// stops draining, the queue fills, and requests write their own touches: back-pressure,
/// never loss.
async fn writer(
    mut rx: mpsc::Receiver<Msg>,
    store: Store,
    conn: ConnectionManager,
    prefix: Arc<str>,
    counters: Arc<Counters>,
) {
    let mut buf = Vec::with_capacity(BATCH);
    let mut pending: HashMap<String, (SessionId, i64)> = HashMap::new();
    let mut acks: Vec<oneshot::Sender<()>> = Vec::new();
    let mut writing: Option<JoinHandle<()>> = None;
    let mut next_write = Instant::now();
    let mut open = true;
    while open || writing.is_some() || !pending.is_empty() || !acks.is_empty() {
        let due = Instant::now() >= next_write
            || !acks.is_empty()
            || !open
            || pending.len() >= MAX_PENDING;
        if writing.is_none() && due && (!pending.is_empty() || !acks.is_empty()) {
            next_write = Instant::now() + LINGER;
            let batch: Vec<(SessionId, i64)> = pending.drain().map(|(_, t)| t).collect();
            let done = std::mem::take(&mut acks);
            let (store, conn, prefix, counters) = (
                store.clone(),
                conn.clone(),
                prefix.clone(),
                counters.clone(),
            );
            writing = Some(tokio::spawn(async move {
                if !batch.is_empty() {
                    if let Err(e) = write_touches(&store, &conn, &prefix, &counters, &batch).await {
                        // The store already retried. The sessions live on (in Redis and as
                        // backstop rows); only these later last-use times are lost.
                        count!(counters, backstop_errors, 1);
                        tracing::warn!(error = %e, n = batch.len(), "session backstop write failed");
                    }
                }
                for ack in done {
                    let _ = ack.send(());
                }
            }));
        }
        tokio::select! {
            n = rx.recv_many(&mut buf, BATCH), if open && pending.len() < MAX_PENDING => {
                open = n > 0;
                for m in buf.drain(..) {
                    match m {
                        Msg::Touch(id, at) => {
                            let e = pending.entry(id.storage_hash()).or_insert((id, at));
                            e.1 = e.1.max(at);
                        }
                        Msg::Flush(ack) => acks.push(ack),
                    }
                }
            }
            _ = async { writing.as_mut().expect("guarded").await }, if writing.is_some() => {
                writing = None;
            }
            () = tokio::time::sleep_until(next_write), if writing.is_none() && !pending.is_empty() => {}
        }
    }
}

/// Writes touches to the backstop; a session the backstop no longer has is deleted from Redis
/// too. Returns those sessions.
async fn write_touches(
    store: &Store,
    conn: &ConnectionManager,
    prefix: &str,
    counters: &Counters,
    touches: &[(SessionId, i64)],
) -> Result<Vec<SessionId>> {
    let gone = store.session_touch_many(touches).await?;
    count!(counters, backstop_rows, touches.len() as u64);
    if !gone.is_empty() {
        count!(counters, revoked_by_backstop, gone.len() as u64);
        let keys: Vec<String> = gone.iter().map(|id| key(prefix, id)).collect();
        if let Err(e) = redis::cmd("DEL")
            .arg(keys)
            .query_async::<()>(&mut conn.clone())
            .await
        {
            count!(counters, redis_errors, 1);
            tracing::warn!(error = %e, "could not drop revoked sessions from redis");
        }
    }
    Ok(gone)
}
