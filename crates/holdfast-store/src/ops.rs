//! The store's operations, named noun-then-verb (`cart_add`, `idem_claim`). Each is one
//! transaction inside [`Store::run`]'s retry loop.

use crate::{
    Cart, CartLine, Credentials, Dialect, Error, JobInsert, Order, OrderLine, ProductRow, Result,
    Safety, SessionRecord, Store, User,
};
use holdfast_core::{
    Email, IdempotencyKey, OrderId, Quantity, RequestFingerprint, SessionId, Sku, UserId,
};
use sqlx::any::AnyRow;
use sqlx::{Any, AnyConnection, Row, Transaction};
use std::collections::{HashMap, HashSet};
use std::ops::{Deref, DerefMut};
use std::time::Duration;

/// Sessions per `UPDATE` in [`Store::session_touch_many`] (two parameters each).
const TOUCH_CHUNK: usize = 128;

/// The queue and kind of the job every checkout enqueues.
pub const PAYMENTS_QUEUE: &str = "payments";
pub const PAYOUT_KIND: &str = "payout";

/// A response kept for replay: status and body bytes, opaque to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

pub struct SessionCreate<'a> {
    pub id: &'a SessionId,
    pub user_id: &'a str,
    pub now: i64,
    pub absolute_ttl: Duration,
}

/// Phase one of an idempotent request: claim the key before doing the work.
pub struct IdemClaim<'a> {
    pub user_id: &'a str,
    pub key: &'a IdempotencyKey,
    pub fingerprint: &'a RequestFingerprint,
    pub now: i64,
    /// How long the claim excludes others. A claimant that dies (SIGKILL) frees the key after
    /// this; one that merely stalls past it is fenced out by its token at commit.
    pub lock_ttl: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// This request owns the key; do the work and commit with this token.
    Claimed { token: String },
    /// The work was done before: answer with this.
    Replay(StoredResponse),
    /// Another request with this key is being processed right now.
    InFlight,
    /// The key was used for a different request.
    Mismatch,
}

/// Phase two: the result is rendered and stored in the same transaction as the effect, so a
/// record exists if and only if its response was kept for replay.
pub struct IdemCommit<'a, T> {
    pub user_id: &'a str,
    pub key: &'a IdempotencyKey,
    pub token: &'a str,
    pub render: &'a (dyn Fn(&T) -> StoredResponse + Sync),
}

/// A write transaction, holding the process's SQLite write gate (if any) until it ends.
pub(crate) struct WriteTx {
    tx: Transaction<'static, Any>,
    _gate: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl WriteTx {
    pub(crate) async fn commit(self) -> Result<()> {
        Ok(self.tx.commit().await?)
    }
}

impl Deref for WriteTx {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self.tx
    }
}

impl DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A fencing token: it only has to differ between claims of one key.
fn new_token() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn user_from(row: &AnyRow) -> Result<User> {
    Ok(User {
        id: row.try_get("id")?,
        email: row.try_get("email")?,
        created_at: row.try_get("created_at")?,
    })
}

impl Store {
    /// A write transaction. On SQLite it first passes this process's write gate: the file
    /// has one write lock, and one waiter per process contending for it (instead of one per
    /// pooled connection) keeps SQLite's sleeping busy handler out of the tail latency.
    pub(crate) async fn begin_write(&self) -> Result<WriteTx> {
        let gate = match &self.write_gate {
            Some(g) => Some(
                g.clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| Error::Db(sqlx::Error::PoolClosed))?,
            ),
            None => None,
        };
        // Begun in its own task: sqlx-sqlite acknowledges a custom BEGIN before it builds the
        // `Transaction`, and a caller dropped in between (a request deadline, a cancelled job)
        // would leave a pooled connection holding the database's write lock with nobody to
        // roll it back. A task is not cancelled with its caller; its `Transaction`, if the
        // caller is gone, is dropped and rolled back.
        let (pool, begin) = (self.pool.clone(), self.dialect.begin_write());
        let tx = tokio::spawn(async move { pool.begin_with(begin).await })
            .await
            .map_err(|_| Error::Db(sqlx::Error::WorkerCrashed))??;
        Ok(WriteTx { tx, _gate: gate })
    }

    // ---- users -------------------------------------------------------------------------

    pub async fn user_create(&self, email: &Email, password_hash: &str) -> Result<User> {
        self.run(Safety::Write, "user_create", || async {
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
            .execute(&self.pool)
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
        self.run(Safety::Idempotent, "user_credentials", || async {
            let row = sqlx::query(
                "SELECT id, email, created_at, password_hash FROM users WHERE email = $1",
            )
            .bind(email.as_str())
            .fetch_optional(&self.pool)
            .await?;
            row.map(|r| {
                Ok(Credentials {
                    user: user_from(&r)?,
                    password_hash: r.try_get("password_hash")?,
                })
            })
            .transpose()
        })
        .await
    }

    /// Replaces a user's password hash. Ending their sessions is a separate step
    /// ([`Store::session_delete_user`]), so that a session tier in front of the store can
    /// purge its own copies of exactly the sessions deleted.
    pub async fn user_set_password(&self, id: &str, password_hash: &str) -> Result<()> {
        self.run(Safety::Idempotent, "user_set_password", || async {
            let n = sqlx::query("UPDATE users SET password_hash = $2 WHERE id = $1")
                .bind(id)
                .bind(password_hash)
                .execute(&self.pool)
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
        self.run(Safety::Idempotent, "user_get", || async {
            let row = sqlx::query("SELECT id, email, created_at FROM users WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
            row.as_ref().map(user_from).transpose()
        })
        .await
    }

    // ---- sessions ----------------------------------------------------------------------

    pub async fn session_create(&self, p: SessionCreate<'_>) -> Result<()> {
        let hash = p.id.storage_hash();
        self.run(Safety::Idempotent, "session_create", || async {
            // Idempotent by construction: the id is fresh, so a re-run after an ambiguous
            // commit hits the primary key, which means the first run succeeded.
            let res = sqlx::query(
                "INSERT INTO sessions (id_hash, user_id, created_at, last_seen_at, expires_at) VALUES ($1, $2, $3, $3, $4)",
            )
            .bind(&hash)
            .bind(p.user_id)
            .bind(p.now)
            .bind(p.now.saturating_add(ms(p.absolute_ttl)))
            .execute(&self.pool)
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
        self.run(Safety::Idempotent, "session_get", || async {
            let Some(row) = sqlx::query("SELECT user_id, created_at, last_seen_at, expires_at FROM sessions WHERE id_hash = $1")
                .bind(&hash)
                .fetch_optional(&self.pool)
                .await?
            else {
                return Ok(None);
            };
            let last_seen: i64 = row.try_get("last_seen_at")?;
            let mut rec = SessionRecord { user_id: row.try_get("user_id")?, created_at: row.try_get("created_at")?, expires_at: row.try_get("expires_at")?, last_seen_at: last_seen };
            if now >= rec.expires_at || now.saturating_sub(last_seen) >= ms(idle_ttl) {
                sqlx::query("DELETE FROM sessions WHERE id_hash = $1").bind(&hash).execute(&self.pool).await?;
                return Ok(None);
            }
            if now.saturating_sub(last_seen) >= ms(touch_every) {
                sqlx::query("UPDATE sessions SET last_seen_at = $2 WHERE id_hash = $1 AND last_seen_at < $2")
                    .bind(&hash)
                    .bind(now)
                    .execute(&self.pool)
                    .await?;
                rec.last_seen_at = now;
            }
            Ok(Some(rec))
        })
        .await
    }

    pub async fn session_delete(&self, id: &SessionId) -> Result<()> {
        let hash = id.storage_hash();
        self.run(Safety::Idempotent, "session_delete", || async {
            sqlx::query("DELETE FROM sessions WHERE id_hash = $1")
                .bind(&hash)
                .execute(&self.pool)
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
            .run(Safety::Idempotent, "session_touch_many", || async {
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
                    for r in q.fetch_all(&mut *tx).await? {
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
        self.run(Safety::Idempotent, "session_delete_user", || async {
            let mut tx = self.begin_write().await?;
            sqlx::query("UPDATE users SET sessions_valid_after = $2 WHERE id = $1 AND sessions_valid_after < $2")
                .bind(user_id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            let rows = sqlx::query("DELETE FROM sessions WHERE user_id = $1 RETURNING id_hash")
                .bind(user_id)
                .fetch_all(&mut *tx)
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
        self.run(Safety::Idempotent, "user_sessions_valid_after", || async {
            let row = sqlx::query("SELECT sessions_valid_after FROM users WHERE id = $1")
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await?;
            row.map(|r| Ok(r.try_get("sessions_valid_after")?))
                .transpose()
        })
        .await
    }

    // ---- opaque session blobs (the tower-sessions adapter) ------------------------------

    /// Inserts a new blob; `false` if `id_hash` is taken (the caller picks another id).
    pub async fn session_blob_insert(
        &self,
        id_hash: &str,
        data: &[u8],
        expires_at: i64,
    ) -> Result<bool> {
        self.run(Safety::Write, "session_blob_insert", || async {
            let res = sqlx::query(
                "INSERT INTO session_blobs (id_hash, data, expires_at) VALUES ($1, $2, $3)",
            )
            .bind(id_hash)
            .bind(data)
            .bind(expires_at)
            .execute(&self.pool)
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
        self.run(Safety::Idempotent, "session_blob_put", || async {
            sqlx::query(
                "INSERT INTO session_blobs (id_hash, data, expires_at) VALUES ($1, $2, $3)
                 ON CONFLICT (id_hash) DO UPDATE SET data = excluded.data, expires_at = excluded.expires_at",
            )
            .bind(id_hash)
            .bind(data)
            .bind(expires_at)
            .execute(&self.pool)
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
        self.run(Safety::Idempotent, "session_blob_get", || async {
            let row = sqlx::query(
                "SELECT data, expires_at FROM session_blobs WHERE id_hash = $1 AND expires_at > $2",
            )
            .bind(id_hash)
            .bind(now)
            .fetch_optional(&self.pool)
            .await?;
            row.map(|r| Ok((r.try_get("data")?, r.try_get("expires_at")?)))
                .transpose()
        })
        .await
    }

    pub async fn session_blob_delete(&self, id_hash: &str) -> Result<()> {
        self.run(Safety::Idempotent, "session_blob_delete", || async {
            sqlx::query("DELETE FROM session_blobs WHERE id_hash = $1")
                .bind(id_hash)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
        .await
    }

    /// Deletes blobs expired at `now`; returns how many.
    pub async fn session_blob_reap(&self, now: i64) -> Result<u64> {
        self.run(Safety::Idempotent, "session_blob_reap", || async {
            Ok(
                sqlx::query("DELETE FROM session_blobs WHERE expires_at <= $1")
                    .bind(now)
                    .execute(&self.pool)
                    .await?
                    .rows_affected(),
            )
        })
        .await
    }

    // ---- catalog and cart --------------------------------------------------------------

    pub async fn product_list(&self) -> Result<Vec<ProductRow>> {
        self.run(Safety::Idempotent, "product_list", || async {
            let rows = sqlx::query("SELECT sku, name, price_cents FROM products ORDER BY sku")
                .fetch_all(&self.pool)
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(ProductRow {
                        sku: r.try_get("sku")?,
                        name: r.try_get("name")?,
                        price_cents: r.try_get("price_cents")?,
                    })
                })
                .collect()
        })
        .await
    }

    pub async fn cart_get(&self, user_id: &str) -> Result<Cart> {
        self.run(Safety::Idempotent, "cart_get", || async {
            let mut conn = self.pool.acquire().await?;
            cart_read(&mut conn, user_id, "").await
        })
        .await
    }

    /// Adds `qty` of `sku` to the cart (a line holds at most 99).
    pub async fn cart_add(
        &self,
        user_id: &str,
        sku: &Sku,
        qty: Quantity,
        idem: Option<&IdemCommit<'_, Cart>>,
    ) -> Result<(Cart, Option<crate::StoredResponse>)> {
        let safety = if idem.is_some() {
            Safety::Idempotent
        } else {
            Safety::Write
        };
        self.run(safety, "cart_add", || async {
            let mut tx = self.begin_write().await?;
            let known = sqlx::query("SELECT 1 AS one FROM products WHERE sku = $1")
                .bind(sku.as_str())
                .fetch_optional(&mut *tx)
                .await?;
            if known.is_none() {
                return Err(Error::UnknownSku(sku.as_str().to_owned()));
            }
            let row = sqlx::query(
                "INSERT INTO cart_items (user_id, sku, qty, added_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (user_id, sku) DO UPDATE SET qty = cart_items.qty + excluded.qty
                 WHERE cart_items.qty + excluded.qty <= 99
                 RETURNING qty",
            )
            .bind(user_id)
            .bind(sku.as_str())
            .bind(qty.get())
            .bind(holdfast_core::now_ms())
            .fetch_optional(&mut *tx)
            .await?;
            if row.is_none() {
                return Err(Error::QuantityLimit);
            }
            let cart = cart_read(&mut tx, user_id, "").await?;
            let stored = idem_finish(&mut tx, idem, &cart).await?;
            tx.commit().await?;
            Ok((cart, stored))
        })
        .await
    }

    /// Removes the line for `sku`; removing an absent line is not an error (DELETE is idempotent).
    pub async fn cart_remove(
        &self,
        user_id: &str,
        sku: &Sku,
        idem: Option<&IdemCommit<'_, Cart>>,
    ) -> Result<(Cart, Option<crate::StoredResponse>)> {
        self.run(Safety::Idempotent, "cart_remove", || async {
            let mut tx = self.begin_write().await?;
            sqlx::query("DELETE FROM cart_items WHERE user_id = $1 AND sku = $2")
                .bind(user_id)
                .bind(sku.as_str())
                .execute(&mut *tx)
                .await?;
            let cart = cart_read(&mut tx, user_id, "").await?;
            let stored = idem_finish(&mut tx, idem, &cart).await?;
            tx.commit().await?;
            Ok((cart, stored))
        })
        .await
    }

    // ---- orders ------------------------------------------------------------------------

    /// Turns the cart into a pending order in one transaction: order, its lines, the emptied
    /// cart and (when given) the idempotency record commit together or not at all.
    pub async fn checkout(
        &self,
        user_id: &str,
        idem: Option<&IdemCommit<'_, Order>>,
    ) -> Result<(Order, Option<crate::StoredResponse>)> {
        let safety = if idem.is_some() {
            Safety::Idempotent
        } else {
            Safety::Write
        };
        let lock = match self.dialect {
            Dialect::Postgres => " FOR UPDATE OF c",
            Dialect::Sqlite => "",
        };
        self.run(safety, "checkout", || async {
            let mut tx = self.begin_write().await?;
            let cart = cart_read(&mut tx, user_id, lock).await?;
            if cart.items.is_empty() {
                return Err(Error::EmptyCart);
            }
            let order = Order {
                order_id: OrderId::generate().to_string(),
                total_cents: cart.total_cents,
                status: "pending".to_owned(),
                created_at: holdfast_core::now_ms(),
                items: cart.items.iter().map(|l| OrderLine { sku: l.sku.clone(), name: l.name.clone(), qty: l.qty, unit_price_cents: l.unit_price_cents }).collect(),
            };
            sqlx::query("INSERT INTO orders (id, user_id, total_cents, status, created_at) VALUES ($1, $2, $3, $4, $5)")
                .bind(&order.order_id)
                .bind(user_id)
                .bind(order.total_cents)
                .bind(&order.status)
                .bind(order.created_at)
                .execute(&mut *tx)
                .await?;
            for l in &order.items {
                sqlx::query("INSERT INTO order_items (order_id, sku, name, qty, unit_price_cents) VALUES ($1, $2, $3, $4, $5)")
                    .bind(&order.order_id)
                    .bind(&l.sku)
                    .bind(&l.name)
                    .bind(l.qty)
                    .bind(l.unit_price_cents)
                    .execute(&mut *tx)
                    .await?;
            }
            // Delete exactly the lines read (and on Postgres locked) above, not the whole cart:
            // under READ COMMITTED a line another transaction added since is visible to a later
            // statement, is not in this order, and must stay in the cart.
            for l in &order.items {
                sqlx::query("DELETE FROM cart_items WHERE user_id = $1 AND sku = $2")
                    .bind(user_id)
                    .bind(&l.sku)
                    .execute(&mut *tx)
                    .await?;
            }
            // The payout job exists if and only if the order does.
            let payout = JobInsert::new(PAYMENTS_QUEUE, PAYOUT_KIND, serde_json::json!({ "order_id": order.order_id }).to_string())
                .unique(format!("payout:{}", order.order_id));
            crate::jobs::insert_jobs(&mut tx, self.dialect, &[payout], order.created_at).await?;
            let stored = idem_finish(&mut tx, idem, &order).await?;
            tx.commit().await?;
            Ok((order, stored))
        })
        .await
    }

    /// The user's orders, newest first (at most `limit`).
    pub async fn order_list(&self, user_id: &str, limit: i64) -> Result<Vec<Order>> {
        self.run(Safety::Idempotent, "order_list", || async {
            let rows = sqlx::query("SELECT id, total_cents, status, created_at FROM orders WHERE user_id = $1 ORDER BY created_at DESC, id LIMIT $2")
                .bind(user_id)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
            let mut orders = rows.iter().map(order_head).collect::<Result<Vec<_>>>()?;
            let lines = sqlx::query(
                "SELECT i.order_id, i.sku, i.name, i.qty, i.unit_price_cents FROM order_items i
                 JOIN (SELECT id FROM orders WHERE user_id = $1 ORDER BY created_at DESC, id LIMIT $2) o
                 ON o.id = i.order_id ORDER BY i.sku",
            )
            .bind(user_id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
            for r in &lines {
                let id: String = r.try_get("order_id")?;
                if let Some(o) = orders.iter_mut().find(|o| o.order_id == id) {
                    o.items.push(order_line(r)?);
                }
            }
            Ok(orders)
        })
        .await
    }

    /// One order, only if it belongs to `user_id`: another user's order is indistinguishable
    /// from a missing one.
    pub async fn order_get(&self, user_id: &str, order_id: &OrderId) -> Result<Option<Order>> {
        self.run(Safety::Idempotent, "order_get", || async {
            let Some(row) = sqlx::query("SELECT id, total_cents, status, created_at FROM orders WHERE id = $1 AND user_id = $2")
                .bind(order_id.as_str())
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await?
            else {
                return Ok(None);
            };
            let mut order = order_head(&row)?;
            let lines = sqlx::query("SELECT sku, name, qty, unit_price_cents FROM order_items WHERE order_id = $1 ORDER BY sku")
                .bind(order_id.as_str())
                .fetch_all(&self.pool)
                .await?;
            order.items = lines.iter().map(order_line).collect::<Result<_>>()?;
            Ok(Some(order))
        })
        .await
    }

    // ---- idempotency keys --------------------------------------------------------------

    pub async fn idem_claim(&self, c: IdemClaim<'_>) -> Result<ClaimOutcome> {
        let for_update = self.dialect.for_update();
        self.run(Safety::Idempotent, "idem_claim", || async {
            let mut tx = self.begin_write().await?;
            let token = new_token();
            let locked_until = c.now.saturating_add(ms(c.lock_ttl));
            let inserted = sqlx::query(
                "INSERT INTO idempotency_keys (user_id, idem_key, fingerprint, state, lock_token, locked_until, created_at)
                 VALUES ($1, $2, $3, 'in_flight', $4, $5, $6) ON CONFLICT (user_id, idem_key) DO NOTHING",
            )
            .bind(c.user_id)
            .bind(c.key.as_str())
            .bind(c.fingerprint.as_str())
            .bind(&token)
            .bind(locked_until)
            .bind(c.now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            let outcome = if inserted == 1 {
                ClaimOutcome::Claimed { token }
            } else {
                let row = sqlx::query(&format!(
                    "SELECT fingerprint, state, locked_until, response_status, response_body FROM idempotency_keys
                     WHERE user_id = $1 AND idem_key = $2{for_update}"
                ))
                .bind(c.user_id)
                .bind(c.key.as_str())
                .fetch_optional(&mut *tx)
                .await?;
                match row {
                    // Released between our insert and our read: whoever released it is done.
                    None => ClaimOutcome::InFlight,
                    Some(r) => {
                        let fingerprint: String = r.try_get("fingerprint")?;
                        let state: String = r.try_get("state")?;
                        let until: i64 = r.try_get("locked_until")?;
                        if fingerprint != c.fingerprint.as_str() {
                            ClaimOutcome::Mismatch
                        } else if state == "done" {
                            let status: Option<i64> = r.try_get("response_status")?;
                            let body: Option<Vec<u8>> = r.try_get("response_body")?;
                            ClaimOutcome::Replay(crate::StoredResponse {
                                status: status.and_then(|s| u16::try_from(s).ok()).unwrap_or(200),
                                body: body.unwrap_or_default(),
                            })
                        } else if until > c.now {
                            ClaimOutcome::InFlight
                        } else {
                            // The previous claimant's lock expired (it died or stalled):
                            // take over with a new token, which fences the old one out.
                            sqlx::query("UPDATE idempotency_keys SET lock_token = $3, locked_until = $4 WHERE user_id = $1 AND idem_key = $2")
                                .bind(c.user_id)
                                .bind(c.key.as_str())
                                .bind(&token)
                                .bind(locked_until)
                                .execute(&mut *tx)
                                .await?;
                            ClaimOutcome::Claimed { token }
                        }
                    }
                }
            };
            tx.commit().await?;
            Ok(outcome)
        })
        .await
    }

    /// Gives a claimed key back without a result (the request failed on a client error or the
    /// store was unavailable), so a retry with the same key runs afresh.
    pub async fn idem_release(
        &self,
        user_id: &str,
        key: &IdempotencyKey,
        token: &str,
    ) -> Result<()> {
        self.run(Safety::Idempotent, "idem_release", || async {
            sqlx::query("DELETE FROM idempotency_keys WHERE user_id = $1 AND idem_key = $2 AND lock_token = $3 AND state = 'in_flight'")
                .bind(user_id)
                .bind(key.as_str())
                .bind(token)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
        .await
    }

    /// Deletes dead sessions and idempotency keys older than `key_retention`. Returns how
    /// many of each were removed.
    pub async fn reap(
        &self,
        now: i64,
        idle_ttl: Duration,
        key_retention: Duration,
    ) -> Result<(u64, u64)> {
        self.run(Safety::Idempotent, "reap", || async {
            let sessions = sqlx::query("DELETE FROM sessions WHERE expires_at <= $1 OR last_seen_at <= $2")
                .bind(now)
                .bind(now.saturating_sub(ms(idle_ttl)))
                .execute(&self.pool)
                .await?
                .rows_affected();
            let keys = sqlx::query("DELETE FROM idempotency_keys WHERE created_at <= $1 AND (state = 'done' OR locked_until <= $2)")
                .bind(now.saturating_sub(ms(key_retention)))
                .bind(now)
                .execute(&self.pool)
                .await?
                .rows_affected();
            Ok((sessions, keys))
        })
        .await
    }
}

async fn cart_read(conn: &mut sqlx::AnyConnection, user_id: &str, lock: &str) -> Result<Cart> {
    let rows = sqlx::query(&format!(
        "SELECT c.sku, p.name, c.qty, p.price_cents FROM cart_items c JOIN products p ON p.sku = c.sku
         WHERE c.user_id = $1 ORDER BY c.sku{lock}"
    ))
    .bind(user_id)
    .fetch_all(&mut *conn)
    .await?;
    let items = rows
        .iter()
        .map(|r| {
            let qty: i64 = r.try_get("qty")?;
            let unit: i64 = r.try_get("price_cents")?;
            Ok(CartLine {
                sku: r.try_get("sku")?,
                name: r.try_get("name")?,
                qty,
                unit_price_cents: unit,
                line_total_cents: qty * unit,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let total_cents = items.iter().map(|l| l.line_total_cents).sum();
    Ok(Cart { items, total_cents })
}

/// Marks the claimed key done with its rendered response, inside the effect's transaction.
/// Zero rows updated means our claim is gone (fenced by a newer claimant, or an earlier try of
/// this very transaction committed): the caller must not report success from this attempt.
async fn idem_finish<T>(
    tx: &mut AnyConnection,
    idem: Option<&IdemCommit<'_, T>>,
    value: &T,
) -> Result<Option<crate::StoredResponse>> {
    let Some(idem) = idem else { return Ok(None) };
    let resp = (idem.render)(value);
    let updated = sqlx::query(
        "UPDATE idempotency_keys SET state = 'done', response_status = $4, response_body = $5, lock_token = NULL
         WHERE user_id = $1 AND idem_key = $2 AND lock_token = $3 AND state = 'in_flight'",
    )
    .bind(idem.user_id)
    .bind(idem.key.as_str())
    .bind(idem.token)
    .bind(i64::from(resp.status))
    .bind(&resp.body)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated != 1 {
        return Err(Error::IdempotencyLockLost);
    }
    Ok(Some(resp))
}

fn order_head(r: &AnyRow) -> Result<Order> {
    Ok(Order {
        order_id: r.try_get("id")?,
        total_cents: r.try_get("total_cents")?,
        status: r.try_get("status")?,
        created_at: r.try_get("created_at")?,
        items: Vec::new(),
    })
}

fn order_line(r: &AnyRow) -> Result<OrderLine> {
    Ok(OrderLine {
        sku: r.try_get("sku")?,
        name: r.try_get("name")?,
        qty: r.try_get("qty")?,
        unit_price_cents: r.try_get("unit_price_cents")?,
    })
}
