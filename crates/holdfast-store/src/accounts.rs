//! Accounts and their sessions: users with a password hash, server-side sessions keyed by the
//! SHA-256 of their id, and the opaque session blobs of the tower-sessions adapter. Each
//! operation is one transaction inside [`Store::run`]'s retry loop.

use crate::{Credentials, Error, Pooled, Rerun, Result, SessionRecord, Store, User};
use holdfast_core::{Email, SessionId, UserId};
use sqlx::Row;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// Sessions per `UPDATE` in [`Store::session_touch_many`] (two parameters each).
const TOUCH_CHUNK: usize = 128;

pub struct SessionCreate<'a> {
    pub id: &'a SessionId,
    pub user_id: &'a str,
    pub now: i64,
    pub absolute_ttl: Duration,
}

/// A session a request presented, to be checked by the statement that does the request's work
/// rather than by a read of its own ([`crate::Statement::session_user`]): the same rules as
/// [`Store::session_get`], at `now`.
#[derive(Debug, Clone)]
pub struct SessionCheck {
    pub id: SessionId,
    pub now: i64,
    pub idle_ttl: Duration,
    pub touch_every: Duration,
}

pub(crate) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Store {
    // ---- users -------------------------------------------------------------------------

    pub async fn user_create(&self, email: &Email, password_hash: &str) -> Result<User> {
        self.run(Rerun::IfUncommitted, "user_create", || async {
            let user = User {
                id: UserId::generate().to_string(),
                email: email.as_str().to_owned(),
                created_at: holdfast_core::now_ms(),
            };
            let res = sqlx::query(
                "INSERT INTO users (id, email, password_hash, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(&user.id)
            .bind(&user.email)
            .bind(password_hash)
            .bind(user.created_at)
            .execute_pooled(self)
            .await;
            match res {
                Ok(_) => Ok(user),
                Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                    Err(Error::EmailTaken)
                }
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    pub async fn user_credentials(&self, email: &Email) -> Result<Option<Credentials>> {
        let sql = "SELECT id, email, created_at, password_hash FROM users WHERE email = $1";
        self.read_row("user_credentials", || sqlx::query(sql).bind(email.as_str()))
            .await
    }

    /// Replaces a user's password hash. Ending their sessions is a separate step
    /// ([`Store::session_delete_user`]), so that a session tier in front of the store can
    /// purge its own copies of exactly the sessions deleted.
    pub async fn user_set_password(&self, id: &str, password_hash: &str) -> Result<()> {
        self.run(Rerun::Always, "user_set_password", || async {
            let n = sqlx::query("UPDATE users SET password_hash = $2 WHERE id = $1")
                .bind(id)
                .bind(password_hash)
                .execute_pooled(self)
                .await?
                .rows_affected();
            if n == 0 {
                return Err(Error::NotFound);
            }
            Ok(())
        })
        .await
    }

    pub async fn user_get(&self, id: &str) -> Result<Option<User>> {
        let sql = "SELECT id, email, created_at FROM users WHERE id = $1";
        self.read_row("user_get", || sqlx::query(sql).bind(id))
            .await
    }

    // ---- sessions ----------------------------------------------------------------------

    pub async fn session_create(&self, p: SessionCreate<'_>) -> Result<()> {
        let hash = p.id.storage_hash();
        self.run(Rerun::Always, "session_create", || async {
            // Idempotent by construction: the id is fresh, so a re-run after an ambiguous
            // commit hits the primary key, which means the first run succeeded.
            let res = sqlx::query(
                "INSERT INTO sessions (id_hash, user_id, created_at, last_seen_at, expires_at) VALUES ($1, $2, $3, $3, $4)",
            )
            .bind(&hash)
            .bind(p.user_id)
            .bind(p.now)
            .bind(p.now.saturating_add(ms(p.absolute_ttl)))
            .execute_pooled(self)
            .await;
            match res {
                Err(sqlx::Error::Database(db)) if db.is_unique_violation() => Ok(()),
                other => other.map(drop).map_err(Error::from),
            }
        })
        .await
    }

    /// The session if it is alive: younger than its absolute expiry and used within
    /// `idle_ttl`. Refreshes its last use at most once per `touch_every`, so an active user
    /// costs one write a minute, not one per request. A dead session is deleted.
    pub async fn session_get(
        &self,
        id: &SessionId,
        now: i64,
        idle_ttl: Duration,
        touch_every: Duration,
    ) -> Result<Option<SessionRecord>> {
        let hash = id.storage_hash();
        self.run(Rerun::Always, "session_get", || async {
            let mut conn = self.lend().await?;
            let Some(row) = sqlx::query("SELECT user_id, created_at, last_seen_at, expires_at FROM sessions WHERE id_hash = $1")
                .bind(&hash)
                .fetch_optional(&mut *conn)
                .await?
            else {
                conn.give_back();
                return Ok(None);
            };
            let last_seen: i64 = row.try_get("last_seen_at")?;
            let mut rec = SessionRecord { user_id: row.try_get("user_id")?, created_at: row.try_get("created_at")?, expires_at: row.try_get("expires_at")?, last_seen_at: last_seen };
            if now >= rec.expires_at || now.saturating_sub(last_seen) >= ms(idle_ttl) {
                sqlx::query("DELETE FROM sessions WHERE id_hash = $1").bind(&hash).execute(&mut *conn).await?;
                conn.give_back();
                return Ok(None);
            }
            if now.saturating_sub(last_seen) >= ms(touch_every) {
                sqlx::query("UPDATE sessions SET last_seen_at = $2 WHERE id_hash = $1 AND last_seen_at < $2")
                    .bind(&hash)
                    .bind(now)
                    .execute(&mut *conn)
                    .await?;
                rec.last_seen_at = now;
            }
            conn.give_back();
            Ok(Some(rec))
        })
        .await
    }

    pub async fn session_delete(&self, id: &SessionId) -> Result<()> {
        let hash = id.storage_hash();
        self.run(Rerun::Always, "session_delete", || async {
            sqlx::query("DELETE FROM sessions WHERE id_hash = $1")
                .bind(&hash)
                .execute_pooled(self)
                .await?;
            Ok(())
        })
        .await
    }

    /// Records later uses of many sessions at once (the Redis tier's asynchronous backstop
    /// writes): `last_seen_at` only moves forward, and a row that is gone stays gone — an
    /// `UPDATE`, never an insert, so a late write cannot resurrect a session that was logged
    /// out meanwhile. Returns the sessions that no longer exist.
    pub async fn session_touch_many(&self, touches: &[(SessionId, i64)]) -> Result<Vec<SessionId>> {
        // One row per session, latest use wins: a statement must not join a row twice.
        let mut latest: HashMap<String, (&SessionId, i64)> = HashMap::with_capacity(touches.len());
        for (id, at) in touches {
            let e = latest.entry(id.storage_hash()).or_insert((id, *at));
            e.1 = e.1.max(*at);
        }
        let rows: Vec<(String, &SessionId, i64)> = latest
            .into_iter()
            .map(|(h, (id, at))| (h, id, at))
            .collect();
        let found: HashSet<String> = self
            .run(Rerun::Always, "session_touch_many", || async {
                // One transaction (one commit, one fsync on SQLite) of modest statements: SQLite
                // looks parameters up by name, so very wide statements cost quadratic time.
                let mut tx = self.begin_write().await?;
                let mut found = HashSet::with_capacity(rows.len());
                for chunk in rows.chunks(TOUCH_CHUNK) {
                    let values = (0..chunk.len())
                        .map(|i| format!("(${}, ${})", 2 * i + 1, 2 * i + 2))
                        .collect::<Vec<_>>()
                        .join(", ");
                    // VALUES columns are `column1`, `column2` on both engines.
                    let sql = format!(
                        "UPDATE sessions SET last_seen_at = CASE WHEN v.column2 > sessions.last_seen_at THEN v.column2 ELSE sessions.last_seen_at END
                         FROM (VALUES {values}) AS v WHERE sessions.id_hash = v.column1 RETURNING sessions.id_hash"
                    );
                    let mut q = sqlx::query(&sql);
                    for (hash, _, at) in chunk {
                        q = q.bind(hash).bind(*at);
                    }
                    for r in q.fetch_all(tx.conn()).await? {
                        found.insert(r.try_get("id_hash")?);
                    }
                }
                tx.commit().await?;
                Ok(found)
            })
            .await?;
        let gone = rows
            .iter()
            .filter(|(h, _, _)| !found.contains(h))
            .map(|(_, id, _)| (*id).clone())
            .collect();
        Ok(gone)
    }

    /// Ends every session of a user (password change): deletes their rows and moves the
    /// user's `sessions_valid_after` to `now`, which kills stateless (signed-cookie) sessions
    /// issued before it. Returns the deleted sessions' id hashes, so a cache of them (Redis)
    /// can be purged too.
    pub async fn session_delete_user(&self, user_id: &str, now: i64) -> Result<Vec<String>> {
        self.run(Rerun::Always, "session_delete_user", || async {
            let mut tx = self.begin_write().await?;
            sqlx::query("UPDATE users SET sessions_valid_after = $2 WHERE id = $1 AND sessions_valid_after < $2")
                .bind(user_id)
                .bind(now)
                .execute(tx.conn())
                .await?;
            let rows = sqlx::query("DELETE FROM sessions WHERE user_id = $1 RETURNING id_hash")
                .bind(user_id)
                .fetch_all(tx.conn())
                .await?;
            let hashes = rows
                .iter()
                .map(|r| Ok(r.try_get("id_hash")?))
                .collect::<Result<Vec<String>>>()?;
            tx.commit().await?;
            Ok(hashes)
        })
        .await
    }

    /// Sessions of this user issued before the returned instant (ms) are revoked; `None` when
    /// the user does not exist (any session of theirs is dead too).
    pub async fn user_sessions_valid_after(&self, user_id: &str) -> Result<Option<i64>> {
        let sql = "SELECT sessions_valid_after FROM users WHERE id = $1";
        let row: Option<(i64,)> = self
            .read_row("user_sessions_valid_after", || {
                sqlx::query(sql).bind(user_id)
            })
            .await?;
        Ok(row.map(|(after,)| after))
    }

    // ---- opaque session blobs (the tower-sessions adapter) ------------------------------

    /// Inserts a new blob; `false` if `id_hash` is taken (the caller picks another id).
    pub async fn session_blob_insert(
        &self,
        id_hash: &str,
        data: &[u8],
        expires_at: i64,
    ) -> Result<bool> {
        self.run(Rerun::IfUncommitted, "session_blob_insert", || async {
            let res = sqlx::query(
                "INSERT INTO session_blobs (id_hash, data, expires_at) VALUES ($1, $2, $3)",
            )
            .bind(id_hash)
            .bind(data)
            .bind(expires_at)
            .execute_pooled(self)
            .await;
            match res {
                Ok(_) => Ok(true),
                Err(sqlx::Error::Database(db)) if db.is_unique_violation() => Ok(false),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    /// Inserts or replaces a blob.
    pub async fn session_blob_put(
        &self,
        id_hash: &str,
        data: &[u8],
        expires_at: i64,
    ) -> Result<()> {
        self.run(Rerun::Always, "session_blob_put", || async {
            sqlx::query(
                "INSERT INTO session_blobs (id_hash, data, expires_at) VALUES ($1, $2, $3)
                 ON CONFLICT (id_hash) DO UPDATE SET data = excluded.data, expires_at = excluded.expires_at",
            )
            .bind(id_hash)
            .bind(data)
            .bind(expires_at)
            .execute_pooled(self)
            .await?;
            Ok(())
        })
        .await
    }

    /// The blob and its expiry, if it has not expired at `now`.
    pub async fn session_blob_get(
        &self,
        id_hash: &str,
        now: i64,
    ) -> Result<Option<(Vec<u8>, i64)>> {
        let sql =
            "SELECT data, expires_at FROM session_blobs WHERE id_hash = $1 AND expires_at > $2";
        self.read_row("session_blob_get", || {
            sqlx::query(sql).bind(id_hash).bind(now)
        })
        .await
    }

    pub async fn session_blob_delete(&self, id_hash: &str) -> Result<()> {
        self.run(Rerun::Always, "session_blob_delete", || async {
            sqlx::query("DELETE FROM session_blobs WHERE id_hash = $1")
                .bind(id_hash)
                .execute_pooled(self)
                .await?;
            Ok(())
        })
        .await
    }

    /// Deletes blobs expired at `now`; returns how many.
    pub async fn session_blob_reap(&self, now: i64) -> Result<u64> {
        self.run(Rerun::Always, "session_blob_reap", || async {
            Ok(
                sqlx::query("DELETE FROM session_blobs WHERE expires_at <= $1")
                    .bind(now)
                    .execute_pooled(self)
                    .await?
                    .rows_affected(),
            )
        })
        .await
    }

    /// Deletes sessions past their absolute or idle expiry; returns how many.
    pub async fn session_reap(&self, now: i64, idle_ttl: Duration) -> Result<u64> {
        self.run(Rerun::Always, "session_reap", || async {
            Ok(
                sqlx::query("DELETE FROM sessions WHERE expires_at <= $1 OR last_seen_at <= $2")
                    .bind(now)
                    .bind(now.saturating_sub(ms(idle_ttl)))
                    .execute_pooled(self)
                    .await?
                    .rows_affected(),
            )
        })
        .await
    }
}
