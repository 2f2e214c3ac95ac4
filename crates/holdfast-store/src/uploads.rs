//! Resumable uploads' state: one row per upload (length, acknowledged offset, metadata, the
//! writer's fence) and the part ledger that says which blob parts hold its bytes. The bytes
//! themselves are never here; `holdfast-uploads` keeps them in a blob store and calls these
//! primitives to take an upload, to acknowledge bytes once they are durable, and to forget it.
//!
//! Every write after the take names the `attempt` it took the upload with; an upload taken
//! again since (the lease ran out, a delete, the reaper) refuses it with
//! [`Error::UploadLeaseLost`], whatever the writer believes.

use crate::{one_row, Error, Rerun, Result, Store};

/// An upload as the store has it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct UploadRow {
    pub id: String,
    pub owner_id: String,
    /// What the application attached the upload to (say, a product's review).
    pub subject: String,
    pub upload_length: i64,
    /// Bytes acknowledged: durable in the blob store and named by the part ledger.
    pub upload_offset: i64,
    /// The `Upload-Metadata` header as the client sent it (already validated).
    pub metadata: String,
    /// The blob store's own handle for the upload (an S3 multipart upload id), if it has one.
    pub blob_handle: Option<String>,
    /// The fence: bumped by every take.
    pub attempt: i64,
    /// While a writer holds the upload, until when (ms since the epoch).
    pub lease_until: Option<i64>,
    pub created_at: i64,
    /// An unfinished upload is reaped after this.
    pub expires_at: i64,
    pub completed_at: Option<i64>,
    pub deleted_at: Option<i64>,
}

impl UploadRow {
    pub fn is_complete(&self) -> bool {
        self.completed_at.is_some()
    }
    /// Unfinished and past its expiry at `now`.
    pub fn is_expired(&self, now: i64) -> bool {
        self.completed_at.is_none() && self.expires_at <= now
    }
}

/// A new upload. With `lease_until` the creator holds it at once, as attempt 1 (creation with
/// an upload body); without, it waits for its first PATCH.
#[derive(Debug, Clone)]
pub struct NewUpload<'a> {
    pub id: &'a str,
    pub owner_id: &'a str,
    pub subject: &'a str,
    pub length: i64,
    pub metadata: &'a str,
    pub blob_handle: Option<&'a str>,
    pub now: i64,
    pub expires_at: i64,
    pub lease_until: Option<i64>,
    /// The owner's limits, checked in the same transaction as the insert.
    pub quota: UploadQuota,
}

/// How much one owner may hold at once (uploads not deleted): bytes declared, and unfinished
/// uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadQuota {
    pub bytes: i64,
    pub unfinished: i64,
}

/// One acknowledged part: `length` bytes of the upload from `start_offset`, in the blob
/// store's part `part_no`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct UploadPart {
    pub part_no: i64,
    pub start_offset: i64,
    pub part_length: i64,
    /// Hex SHA-256 of the part's bytes.
    pub sha256: String,
    /// The blob store's tag for the part (an S3 part's ETag), if it has one.
    pub etag: Option<String>,
}

/// Bytes to acknowledge: the parts, in order, that continue the upload from `from_offset`.
#[derive(Debug, Clone)]
pub struct UploadAck<'a> {
    pub id: &'a str,
    pub attempt: i64,
    pub from_offset: i64,
    pub parts: &'a [UploadPart],
    pub now: i64,
    /// The upload's new expiry (unfinished uploads slide forward as they progress).
    pub expires_at: i64,
    /// Keep the lease until then (more bytes are coming), or `None` to release it.
    pub lease_until: Option<i64>,
    /// A short last part whose bytes the first of `parts` also holds (it starts where this
    /// one does): it leaves the ledger as they join it.
    pub replaces: Option<&'a UploadPart>,
}

const COLUMNS: &str = "id, owner_id, subject, upload_length, upload_offset, metadata, \
                       blob_handle, attempt, lease_until, created_at, expires_at, completed_at, \
                       deleted_at";

impl Store {
    /// Records a new upload unless it would take its owner past `quota`; `false` when it
    /// would (nothing written).
    pub async fn upload_create(&self, new: &NewUpload<'_>) -> Result<bool> {
        let postgres = self.backend == crate::Backend::Postgres;
        self.run(Rerun::IfUncommitted, "upload_create", || async {
            let mut tx = self.begin_write().await?;
            if postgres {
                // Two creations by one owner at once must not both fit the last of the quota.
                sqlx::query("SELECT id FROM users WHERE id = $1 FOR UPDATE")
                    .bind(new.owner_id)
                    .fetch_optional(tx.conn())
                    .await?;
            }
            let (bytes, unfinished): (i64, i64) = sqlx::query_as(
                "SELECT CAST(COALESCE(SUM(upload_length), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(CASE WHEN completed_at IS NULL THEN 1 ELSE 0 END), 0) AS BIGINT) \
                 FROM uploads WHERE owner_id = $1 AND deleted_at IS NULL",
            )
            .bind(new.owner_id)
            .fetch_one(tx.conn())
            .await?;
            if bytes.saturating_add(new.length) > new.quota.bytes
                || unfinished >= new.quota.unfinished
            {
                return Ok(false);
            }
            let completed = (new.length == 0).then_some(new.now);
            sqlx::query(
                "INSERT INTO uploads (id, owner_id, subject, upload_length, upload_offset, \
                 metadata, blob_handle, attempt, lease_until, created_at, expires_at, completed_at) \
                 VALUES ($1, $2, $3, $4, 0, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind(new.id)
            .bind(new.owner_id)
            .bind(new.subject)
            .bind(new.length)
            .bind(new.metadata)
            .bind(new.blob_handle)
            .bind(i64::from(new.lease_until.is_some()))
            .bind(new.lease_until)
            .bind(new.now)
            .bind(new.expires_at)
            .bind(completed)
            .execute(tx.conn())
            .await?;
            tx.commit().await?;
            Ok(true)
        })
        .await
    }

    /// The owner's upload `id`, unless deleted.
    pub async fn upload_get(&self, owner_id: &str, id: &str) -> Result<Option<UploadRow>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM uploads WHERE id = $1 AND owner_id = $2 AND deleted_at IS NULL"
        );
        self.read_row("upload_get", || sqlx::query(&sql).bind(id).bind(owner_id))
            .await
    }

    /// The owner's uploads, newest first (at most `limit`).
    pub async fn upload_list(&self, owner_id: &str, limit: i64) -> Result<Vec<UploadRow>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM uploads WHERE owner_id = $1 AND deleted_at IS NULL \
             ORDER BY created_at DESC, id LIMIT $2"
        );
        self.read_rows("upload_list", || {
            sqlx::query(&sql).bind(owner_id).bind(limit)
        })
        .await
    }

    /// Takes the owner's unfinished, unexpired upload `id` for one writer until `until`,
    /// unless another writer's lease is still running at `now`. The row returned carries the
    /// new `attempt`, which every later write must name; the number is the writer's first
    /// part number (as [`Store::upload_next_part`] gives them). `None`: not taken (read the
    /// row to say why).
    pub async fn upload_take(
        &self,
        owner_id: &str,
        id: &str,
        now: i64,
        until: i64,
    ) -> Result<Option<(UploadRow, i64)>> {
        let sql = format!(
            "UPDATE uploads SET attempt = attempt + 1, lease_until = $3, next_part = next_part + 1 \
             WHERE id = $1 AND owner_id = $2 AND deleted_at IS NULL AND completed_at IS NULL \
             AND expires_at > $4 AND (lease_until IS NULL OR lease_until <= $4) \
             RETURNING {COLUMNS}, next_part"
        );
        let rows = self
            .run(Rerun::IfUncommitted, "upload_take", || {
                self.write_one_rows(
                    sqlx::query(&sql)
                        .bind(id)
                        .bind(owner_id)
                        .bind(until)
                        .bind(now),
                )
            })
            .await?;
        rows.first()
            .map(|r| {
                Ok((
                    <UploadRow as sqlx::FromRow<_>>::from_row(r)?,
                    sqlx::Row::try_get::<i64, _>(r, "next_part")?,
                ))
            })
            .transpose()
    }

    /// Extends the writer's lease to `until` and gives it a part number no other writer will
    /// ever get.
    pub async fn upload_next_part(&self, id: &str, attempt: i64, until: i64) -> Result<i64> {
        let rows = self
            .run(Rerun::IfUncommitted, "upload_next_part", || {
                self.write_one_rows(
                    sqlx::query(
                        "UPDATE uploads SET next_part = next_part + 1, lease_until = $3 \
                         WHERE id = $1 AND attempt = $2 AND deleted_at IS NULL \
                         RETURNING next_part",
                    )
                    .bind(id)
                    .bind(attempt)
                    .bind(until),
                )
            })
            .await?;
        let row = rows.first().ok_or(Error::UploadLeaseLost)?;
        Ok(sqlx::Row::try_get::<i64, _>(row, 0)?)
    }

    /// Extends the writer's lease to `until`.
    pub async fn upload_renew(&self, id: &str, attempt: i64, until: i64) -> Result<()> {
        let done = self
            .run(Rerun::Always, "upload_renew", || {
                self.write_one(
                    sqlx::query(
                        "UPDATE uploads SET lease_until = $3 \
                         WHERE id = $1 AND attempt = $2 AND deleted_at IS NULL",
                    )
                    .bind(id)
                    .bind(attempt)
                    .bind(until),
                )
            })
            .await?;
        if done == 1 {
            Ok(())
        } else {
            Err(Error::UploadLeaseLost)
        }
    }

    /// Gives the upload back (the writer is done or gave up); a no-op for a stale attempt.
    pub async fn upload_release(&self, id: &str, attempt: i64) -> Result<()> {
        self.run(Rerun::Always, "upload_release", || {
            self.write_one(
                sqlx::query("UPDATE uploads SET lease_until = NULL WHERE id = $1 AND attempt = $2")
                    .bind(id)
                    .bind(attempt),
            )
        })
        .await?;
        Ok(())
    }

    /// Acknowledges `ack.parts`: the ledger gains them and the offset moves past them, in one
    /// transaction, only if the writer's attempt is still current and the offset is still
    /// where it started; the upload is complete when the offset reaches its length.
    pub async fn upload_ack(&self, ack: &UploadAck<'_>) -> Result<i64> {
        let added: i64 = ack.parts.iter().map(|p| p.part_length).sum::<i64>()
            - ack.replaces.map_or(0, |r| r.part_length);
        let to = ack.from_offset + added;
        self.run(Rerun::IfUncommitted, "upload_ack", || async {
            let mut tx = self.begin_write().await?;
            let moved = sqlx::query(
                "UPDATE uploads SET upload_offset = $3, expires_at = $4, lease_until = $5, \
                 completed_at = CASE WHEN $3 = upload_length THEN $6 ELSE NULL END \
                 WHERE id = $1 AND attempt = $2 AND upload_offset = $7 AND deleted_at IS NULL \
                 AND $3 <= upload_length",
            )
            .bind(ack.id)
            .bind(ack.attempt)
            .bind(to)
            .bind(ack.expires_at)
            .bind(ack.lease_until)
            .bind(ack.now)
            .bind(ack.from_offset)
            .execute(tx.conn())
            .await?;
            one_row(&moved, Error::UploadLeaseLost)?;
            if let Some(r) = ack.replaces {
                sqlx::query("DELETE FROM upload_parts WHERE upload_id = $1 AND part_no = $2")
                    .bind(ack.id)
                    .bind(r.part_no)
                    .execute(tx.conn())
                    .await?;
            }
            for p in ack.parts {
                sqlx::query(
                    "INSERT INTO upload_parts (upload_id, part_no, start_offset, part_length, \
                     sha256, etag) VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(ack.id)
                .bind(p.part_no)
                .bind(p.start_offset)
                .bind(p.part_length)
                .bind(&p.sha256)
                .bind(p.etag.as_deref())
                .execute(tx.conn())
                .await?;
            }
            tx.commit().await?;
            Ok(to)
        })
        .await
    }

    /// The upload's part ledger in offset order.
    pub async fn upload_parts(&self, id: &str) -> Result<Vec<UploadPart>> {
        self.read_rows("upload_parts", || {
            sqlx::query(
                "SELECT part_no, start_offset, part_length, sha256, etag FROM upload_parts \
                 WHERE upload_id = $1 ORDER BY start_offset",
            )
            .bind(id)
        })
        .await
    }

    /// Marks the owner's upload deleted and takes it from any writer (their acknowledgements
    /// are refused from now on). The row returned is the upload as it was; its bytes are
    /// still to be removed, then [`Store::upload_forget`].
    pub async fn upload_delete(
        &self,
        owner_id: &str,
        id: &str,
        now: i64,
    ) -> Result<Option<UploadRow>> {
        let sql = format!(
            "UPDATE uploads SET deleted_at = $3, attempt = attempt + 1, lease_until = NULL \
             WHERE id = $1 AND owner_id = $2 AND deleted_at IS NULL RETURNING {COLUMNS}"
        );
        let rows = self
            .run(Rerun::IfUncommitted, "upload_delete", || {
                self.write_one_rows(sqlx::query(&sql).bind(id).bind(owner_id).bind(now))
            })
            .await?;
        rows.first()
            .map(|r| Ok(<UploadRow as sqlx::FromRow<_>>::from_row(r)?))
            .transpose()
    }

    /// Uploads whose bytes should go at `now`: deleted ones, and unfinished ones past their
    /// expiry whose writer's lease (if any) has run out. At most `limit`, oldest expiry first.
    pub async fn upload_reapable(&self, now: i64, limit: i64) -> Result<Vec<UploadRow>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM uploads \
             WHERE (deleted_at IS NOT NULL OR (completed_at IS NULL AND expires_at <= $1)) \
             AND (lease_until IS NULL OR lease_until <= $1) ORDER BY expires_at LIMIT $2"
        );
        self.read_rows("upload_reapable", || {
            sqlx::query(&sql).bind(now).bind(limit)
        })
        .await
    }

    /// Takes a reapable upload for the reaper, fenced by the attempt it was seen with: `false`
    /// when someone took it since (a writer resumed it, another reaper got there first).
    pub async fn upload_take_for_reaping(&self, row: &UploadRow, now: i64) -> Result<bool> {
        let done = self
            .run(Rerun::IfUncommitted, "upload_take_for_reaping", || {
                self.write_one(
                    sqlx::query(
                        "UPDATE uploads SET attempt = attempt + 1, lease_until = NULL, \
                         deleted_at = COALESCE(deleted_at, $3) \
                         WHERE id = $1 AND attempt = $2 \
                         AND (lease_until IS NULL OR lease_until <= $3)",
                    )
                    .bind(&row.id)
                    .bind(row.attempt)
                    .bind(now),
                )
            })
            .await?;
        Ok(done == 1)
    }

    /// Removes a deleted upload's row and ledger, once its bytes are gone.
    pub async fn upload_forget(&self, id: &str) -> Result<()> {
        self.run(Rerun::Always, "upload_forget", || async {
            let mut tx = self.begin_write().await?;
            sqlx::query("DELETE FROM upload_parts WHERE upload_id = $1")
                .bind(id)
                .execute(tx.conn())
                .await?;
            sqlx::query("DELETE FROM uploads WHERE id = $1 AND deleted_at IS NOT NULL")
                .bind(id)
                .execute(tx.conn())
                .await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }
}
