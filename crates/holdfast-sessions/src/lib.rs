//! Sessions behind one small API, in three tiers. The web crate calls five things — create on
//! login (rotating any id the client already had), load on each request, destroy on logout,
//! destroy all of a user's sessions on a password change, and flush on shutdown — and never
//! learns which tier answered.
//!
//! - **`store`** (the default): the durable store's `sessions` table, as before. Every load is
//!   one indexed read; a use refreshes `last_seen_at` at most once per `touch_every`.
//! - **`redis`**, for scale: the hot path is one Redis `GET` (plus a `SET … XX PX` when a
//!   touch is due), with the durable store as a **backstop** holding every session too. See
//!   `redis_tier.rs` for the write paths; the short version:
//!   - create writes the store *synchronously*, then Redis (login already pays an argon2 hash,
//!     and a session that exists only in Redis would be lost by a Redis restart);
//!   - touches go to the store *asynchronously*, through a bounded queue and one writer task
//!     that keeps the latest use per session and writes whatever accumulated with one
//!     `UPDATE` at a time — and when the queue is full, the request writes its touch
//!     synchronously instead of dropping it;
//!   - a Redis miss reads the store and re-populates Redis (`holdfast_sessions_rehydrated_total`),
//!     so a Redis restart, `FLUSHDB` or eviction costs one store read per active session, not
//!     a re-login: a write Redis acknowledged and then lost is *detected* by that miss;
//!   - logout and password change delete from the store first, then from Redis, and a
//!     re-population re-reads the store after its `SET NX`, so a session that one instance is
//!     re-hydrating while another logs it out cannot come back to life in Redis;
//!   - after a Redis error, loads are served by the store until a background probe finds
//!     Redis again (`holdfast_sessions_store_fallbacks_total`, gauge
//!     `holdfast_sessions_redis_up`): Redis down costs latency, never a login.
//! - **`cookie`**, for tiny payloads and no server state: the cookie *is* the session,
//!   `v1.<kid>.<payload>.<mac>` signed with HMAC-SHA256 by a [`KeyRing`] (see `cookie.rs`).
//!
//! Revocation is immediate and fleet-wide for `store` and `redis`: no instance keeps a
//! session in memory, and a logout or password change commits its deletes in the store and
//! Redis before it answers, so every instance's next load misses. (If Redis cannot be told, a
//! logout fails so the client retries it; a password change goes on, and a Redis copy that
//! survived dies at its next touch, when the backstop no longer has it.)
//!
//! For `cookie` it cannot be immediate, and that is a choice: a revocation list would put a
//! store read on every request, which is what this tier exists to avoid. A logout only clears
//! the cookie in that browser — a copy of it stays valid until its idle or absolute expiry. A
//! password change moves the user's `sessions_valid_after` epoch in the store, and a cookie is
//! checked against it whenever it is refreshed, so every older cookie dies at most
//! `touch_every` after its last refresh. Removing a key from the ring kills every cookie it
//! signed, at once.
//!
//! With the `tower-sessions` feature, `tower::HoldfastStore` implements tower-sessions'
//! `SessionStore` over the same durable store, for axum applications that want Holdfast's
//! storage without the rest of it.
//!
//! Architecture invariant: no session id or signing key is logged or stored in the clear;
//! the store and Redis key sessions by the id's SHA-256.

mod cookie;
mod redis_tier;
#[cfg(feature = "tower-sessions")]
pub mod tower;

pub use cookie::KeyRing;
/// The Redis client this crate is built against, re-exported so callers name the same version.
pub use redis;

use holdfast_core::SessionId;
use holdfast_store::{SessionCheck, SessionCreate, Store};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis_tier::RedisTier;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What went wrong, in words the caller can act on. A bad or expired session is not an
/// error: [`Sessions::load`] answers `Ok(None)` for it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("store: {0}")]
    Store(#[from] holdfast_store::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// `--session-keys` is malformed (never contains the keys themselves).
    #[error("session keys: {0}")]
    Keys(String),
}

impl Error {
    /// A dependency is down or overloaded; the same call may succeed shortly.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Store(e) => e.is_unavailable(),
            Error::Redis(_) => true,
            Error::Keys(_) => false,
        }
    }

    /// A configuration mistake: fix the flags, retrying will not help.
    pub fn is_config(&self) -> bool {
        matches!(self, Error::Keys(_))
    }

    /// Only Redis failed. From a revocation this means the durable part is done and only a
    /// Redis copy may survive — until its next touch, when the backstop no longer has it.
    pub fn is_redis(&self) -> bool {
        matches!(self, Error::Redis(_))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How long sessions live. Same meaning in every tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// A session unused this long is dead.
    pub idle_ttl: Duration,
    /// A session older than this is dead, however active.
    pub absolute_ttl: Duration,
    /// Record a use at most this often (a store or Redis write, a re-issued cookie). The idle
    /// timeout is therefore enforced to within this much.
    pub touch_every: Duration,
}

impl Config {
    /// `touch_every` = a quarter of the idle timeout, at most a minute.
    pub fn new(idle_ttl: Duration, absolute_ttl: Duration) -> Self {
        Self {
            idle_ttl,
            absolute_ttl,
            touch_every: (idle_ttl / 4).min(Duration::from_secs(60)),
        }
    }
}

/// Where sessions live. Built by the binary; the store is passed to [`Sessions::new`] apart,
/// because every tier uses it (as the sessions, as the backstop, as the revocation epoch).
#[derive(Clone, Default)]
pub enum SessionTier {
    #[default]
    Store,
    /// Keys live under `<prefix>:s:<sha256 of id>`.
    Redis {
        conn: ConnectionManager,
        prefix: String,
    },
    Cookie {
        keys: KeyRing,
    },
}

impl SessionTier {
    pub fn name(&self) -> &'static str {
        match self {
            SessionTier::Store => "store",
            SessionTier::Redis { .. } => "redis",
            SessionTier::Cookie { .. } => "cookie",
        }
    }
}

impl fmt::Debug for SessionTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionTier::Store => f.write_str("Store"),
            SessionTier::Redis { prefix, .. } => {
                f.debug_struct("Redis").field("prefix", prefix).finish()
            }
            SessionTier::Cookie { keys } => f.debug_struct("Cookie").field("keys", keys).finish(),
        }
    }
}

/// A Redis connection for the session tier: it connects lazily (an instance starts even while
/// Redis is down, and serves sessions from the store) and gives up on a command quickly, so a
/// dead Redis costs a request at most about a second before the breaker sends it to the store.
pub fn connect_redis(url: &str) -> Result<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_millis(500)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(100));
    Ok(ConnectionManager::new_lazy_with_config(
        redis::Client::open(url)?,
        config,
    )?)
}

/// A session handed to the client: put [`Issued::token`] in the cookie.
pub struct Issued {
    token: String,
    /// When the session ends however active it is (ms since the epoch): the cookie's lifetime.
    pub expires_at: i64,
}

impl Issued {
    /// The cookie value. A secret: never log it.
    pub fn token(&self) -> &str {
        &self.token
    }
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// A live session found by [`Sessions::load`].
#[derive(Debug)]
pub struct Loaded {
    pub user_id: String,
    /// Send this cookie back with the response: a signed cookie re-signed with the current
    /// key or refreshed for the idle timeout. Always `None` for server-side tiers.
    pub reissue: Option<Issued>,
}

/// `Stats` (public, plain numbers) and `Counters` (shared, atomic) with one field per counter,
/// and the snapshot from one to the other.
macro_rules! counters {
    ($($(#[$doc:meta])* $field:ident,)*) => {
        /// What the tiers did, since start. Also exported as `holdfast_sessions_*` metrics.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct Stats {
            $($(#[$doc])* pub $field: u64,)*
        }

        #[derive(Default)]
        pub(crate) struct Counters {
            $($field: AtomicU64,)*
        }

        impl Counters {
            fn snapshot(&self) -> Stats {
                Stats {
                    $($field: self.$field.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

counters! {
    /// Redis misses answered by the backstop and written back to Redis.
    rehydrated,
    redis_errors,
    /// Loads served by the store because Redis was unavailable.
    store_fallbacks,
    /// Touches handed to the backstop store (it coalesces them per session).
    backstop_rows,
    /// Touches written on the request path because the backstop queue was full.
    backstop_sync_writes,
    /// Backstop batches that failed (their touches are lost; the sessions are not).
    backstop_errors,
    /// Redis copies removed because the backstop no longer had the session.
    revoked_by_backstop,
    /// Signed cookies re-signed with the current key.
    resigned,
    /// Signed cookies refused (malformed, unknown key, bad signature, expired, revoked).
    rejected,
}

/// The metric families the session tiers export (see [`holdfast_core::Metric`]).
pub const METRICS: &[holdfast_core::Metric] = &[
    holdfast_core::Metric::gauge(
        "holdfast_sessions_redis_up",
        "1 while the Redis session tier answers, 0 while sessions are served by the store.",
    ),
    holdfast_core::Metric::counter(
        "holdfast_sessions_rehydrated_total",
        "Sessions copied back into Redis from the store after a miss.",
    )
    .at_zero(&[&[]]),
    holdfast_core::Metric::counter(
        "holdfast_sessions_redis_errors_total",
        "Redis commands of the session tier that failed.",
    )
    .at_zero(&[&[]]),
    holdfast_core::Metric::counter(
        "holdfast_sessions_store_fallbacks_total",
        "Session loads served by the store because Redis was unavailable.",
    )
    .at_zero(&[&[]]),
    holdfast_core::Metric::counter(
        "holdfast_sessions_backstop_rows_total",
        "Session touches handed to the store backstop.",
    )
    .at_zero(&[&[]]),
    holdfast_core::Metric::counter(
        "holdfast_sessions_backstop_sync_writes_total",
        "Session touches written on the request path because the backstop queue was full.",
    )
    .at_zero(&[&[]]),
    holdfast_core::Metric::counter(
        "holdfast_sessions_backstop_errors_total",
        "Backstop batches that failed to write.",
    )
    .at_zero(&[&[]]),
    holdfast_core::Metric::counter(
        "holdfast_sessions_revoked_by_backstop_total",
        "Redis session copies removed because the store no longer had the session.",
    )
    .at_zero(&[&[]]),
    holdfast_core::Metric::counter(
        "holdfast_sessions_resigned_total",
        "Signed session cookies re-signed with the current key.",
    )
    .at_zero(&[&[]]),
    holdfast_core::Metric::counter(
        "holdfast_sessions_rejected_total",
        "Signed session cookies refused, by reason.",
    )
    .at_zero(&[&[]]),
];

/// Adds to one of [`Counters`] and to its Prometheus counter of the same name.
macro_rules! count {
    ($counters:expr, $field:ident, $n:expr) => {{
        let n: u64 = $n;
        $counters
            .$field
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        metrics::counter!(concat!("holdfast_sessions_", stringify!($field), "_total")).increment(n);
    }};
}
pub(crate) use count;

/// The session tier of one instance. Cheap to clone: clones share the tier (and, for Redis,
/// the one backstop writer task).
#[derive(Clone)]
pub struct Sessions(Arc<Inner>);

struct Inner {
    store: Store,
    config: Config,
    counters: Arc<Counters>,
    tier: Tier,
}

enum Tier {
    Store,
    Redis(RedisTier),
    Cookie(KeyRing),
}

impl Sessions {
    /// The tier `tier` over `store`. For Redis this spawns the backstop writer, so call it
    /// inside a tokio runtime.
    pub fn new(tier: SessionTier, store: Store, config: Config) -> Self {
        let counters = Arc::new(Counters::default());
        let tier = match tier {
            SessionTier::Store => Tier::Store,
            SessionTier::Redis { conn, prefix } => Tier::Redis(RedisTier::start(
                conn,
                &prefix,
                store.clone(),
                config,
                counters.clone(),
            )),
            SessionTier::Cookie { keys } => Tier::Cookie(keys),
        };
        Self(Arc::new(Inner {
            store,
            config,
            counters,
            tier,
        }))
    }

    /// `store`, `redis` or `cookie`.
    pub fn tier_name(&self) -> &'static str {
        match self.0.tier {
            Tier::Store => "store",
            Tier::Redis(_) => "redis",
            Tier::Cookie(_) => "cookie",
        }
    }

    pub fn config(&self) -> &Config {
        &self.0.config
    }

    pub fn stats(&self) -> Stats {
        self.0.counters.snapshot()
    }

    /// Starts a session for a user who just proved who they are. A session the client already
    /// had (`previous`) is ended first: an id known before login (fixation) never becomes an
    /// authenticated one.
    pub async fn login(&self, user_id: &str, previous: Option<&str>) -> Result<Issued> {
        let (store, config) = (&self.0.store, &self.0.config);
        let now = holdfast_core::now_ms();
        let expires_at = now.saturating_add(ms(config.absolute_ttl));
        if let Some(previous) = previous {
            if let Err(e) = self.logout(previous).await {
                // The old session is gone from the store; a Redis copy that survives dies at
                // its next touch (the backstop no longer has it). Logging in must not fail.
                if !e.is_redis() {
                    return Err(e);
                }
            }
        }
        if let Tier::Cookie(keys) = &self.0.tier {
            let claims = cookie::Claims {
                user_id: user_id.to_owned(),
                issued_at: now,
                expires_at,
                last_seen_at: now,
            };
            return Ok(Issued {
                token: keys.sign(&claims),
                expires_at,
            });
        }
        let id = SessionId::generate();
        match &self.0.tier {
            Tier::Redis(redis) => redis.create(&id, user_id, now).await?,
            _ => {
                store
                    .session_create(SessionCreate {
                        id: &id,
                        user_id,
                        now,
                        absolute_ttl: config.absolute_ttl,
                    })
                    .await?
            }
        }
        Ok(Issued {
            token: id.expose().to_owned(),
            expires_at,
        })
    }

    /// The session's user if `token` names a live session, `None` if it does not (garbage,
    /// tampered, expired, logged out). Errors only when a dependency fails.
    pub async fn load(&self, token: &str) -> Result<Option<Loaded>> {
        let (store, config) = (&self.0.store, &self.0.config);
        let now = holdfast_core::now_ms();
        let plain = |user_id| Loaded {
            user_id,
            reissue: None,
        };
        match &self.0.tier {
            Tier::Store => {
                let Ok(id) = SessionId::parse(token) else {
                    return Ok(None);
                };
                let rec = store
                    .session_get(&id, now, config.idle_ttl, config.touch_every)
                    .await?;
                Ok(rec.map(|r| plain(r.user_id)))
            }
            Tier::Redis(redis) => {
                let Ok(id) = SessionId::parse(token) else {
                    return Ok(None);
                };
                Ok(redis.load(&id, now).await?.map(plain))
            }
            Tier::Cookie(keys) => {
                cookie::load(keys, store, config, &self.0.counters, token, now).await
            }
        }
    }

    /// For the `store` tier: the check of `token`'s session that a statement doing the
    /// request's work can make itself ([`holdfast_store::Statement::session_user`]), the same
    /// check [`Sessions::load`] makes with a read of its own. `None` for the other tiers (their
    /// sessions are not rows of the statement's database) and for a token that is no session
    /// id. A statement that writes nothing for a dead session says nothing either: the caller
    /// then [`load`](Sessions::load)s it.
    pub fn statement_check(&self, token: &str) -> Option<SessionCheck> {
        if !matches!(self.0.tier, Tier::Store) {
            return None;
        }
        let id = SessionId::parse(token).ok()?;
        Some(SessionCheck {
            id,
            now: holdfast_core::now_ms(),
            idle_ttl: self.0.config.idle_ttl,
            touch_every: self.0.config.touch_every,
        })
    }

    /// Ends one session everywhere. For signed cookies there is nothing to end server-side:
    /// the caller clears the cookie (see the crate docs for what that does not cover).
    pub async fn logout(&self, token: &str) -> Result<()> {
        let Ok(id) = SessionId::parse(token) else {
            return Ok(());
        };
        match &self.0.tier {
            Tier::Store => Ok(self.0.store.session_delete(&id).await?),
            Tier::Redis(redis) => redis.logout(&id).await,
            Tier::Cookie(_) => Ok(()),
        }
    }

    /// Ends every session of a user, on every instance (a password change). The caller then
    /// logs the user in afresh if the request that asked should stay signed in.
    pub async fn logout_user(&self, user_id: &str) -> Result<()> {
        let now = holdfast_core::now_ms();
        match &self.0.tier {
            Tier::Redis(redis) => redis.logout_user(user_id, now).await,
            Tier::Store | Tier::Cookie(_) => {
                self.0.store.session_delete_user(user_id, now).await?;
                Ok(())
            }
        }
    }

    /// Waits until every backstop write queued so far is in the store (graceful shutdown,
    /// tests). A no-op for the other tiers.
    pub async fn flush(&self) {
        if let Tier::Redis(redis) = &self.0.tier {
            redis.flush().await;
        }
    }
}

/// `user<sep>t1<sep>t2<sep>t3` (the user id and three instants), as both the signed cookie and
/// the Redis record store a session; `None` for anything else.
pub(crate) fn user_and_times(raw: &[u8], sep: char) -> Option<(String, [i64; 3])> {
    let mut it = std::str::from_utf8(raw).ok()?.split(sep);
    let user_id = it.next()?.to_owned();
    let mut num = || it.next()?.parse::<i64>().ok();
    let times = [num()?, num()?, num()?];
    it.next().is_none().then_some((user_id, times))
}

pub(crate) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
