//! Schema migrations: the store's own and each application's, embedded in the binary.
//!
//! A [`Schema`] is a named, ordered list of [`Migration`]s. The store's schema (accounts,
//! sessions, idempotency keys, jobs, the effect ledger) always comes first; an application
//! passes its own in `StoreOptions::schemas` (the reference shop's lives in `holdfast-shop`).
//!
//! All pending migrations run in one write transaction that first takes a lock: on SQLite
//! `BEGIN IMMEDIATE` (the file's single write lock), on Postgres a transaction-scoped advisory
//! lock. A second instance starting at the same moment waits, then finds nothing to do.
//!
//! Migrations are append-only: a released file is never edited; a change is a new version.
//! That is checked, not promised: each applied migration is recorded with the SHA-256 of its
//! file, and opening a database whose record differs from this build's file fails with
//! [`Error::MigrationChanged`], naming the file.
//!
//! One file serves both engines. It is written as SQLite reads it, with `BIGINT` for every
//! integer that may exceed 32 bits; for Postgres, `BLOB` becomes `BYTEA` and
//! `INTEGER PRIMARY KEY AUTOINCREMENT` becomes `BIGSERIAL PRIMARY KEY` (see [`render`]).

use crate::{Backend, Error, Result, Store};
use sha2::{Digest, Sha256};
use sqlx::{Executor, Row};
use std::collections::HashMap;

/// One step of a schema.
#[derive(Debug)]
pub struct Migration {
    /// Position in its schema, from 1.
    pub version: i64,
    /// Where the file lives in the repository, for messages.
    pub file: &'static str,
    pub sql: &'static str,
    /// Databases made before schemas were split by owner recorded one list of versions in
    /// `holdfast_migrations`; this migration's statements were part of that list's `legacy`
    /// version. Such a database adopts it as applied instead of running it again.
    pub legacy: Option<i64>,
}

/// A named list of migrations owned by one crate.
#[derive(Debug)]
pub struct Schema {
    /// Unique among the schemas of one database (`store`, `shop`, …).
    pub name: &'static str,
    pub migrations: &'static [Migration],
}

impl Migration {
    /// Migration `version`, whose SQL is `sql`, from the file `file` (its repository path).
    pub const fn new(version: i64, file: &'static str, sql: &'static str) -> Self {
        Migration {
            version,
            file,
            sql,
            legacy: None,
        }
    }

    /// This migration's statements were the one-list layout's version `legacy` (see
    /// [`Migration::legacy`]).
    pub const fn replacing_legacy(self, legacy: i64) -> Self {
        Migration {
            legacy: Some(legacy),
            ..self
        }
    }

    /// SHA-256 of the file, hex.
    pub fn checksum(&self) -> String {
        hex::encode(Sha256::digest(self.sql.as_bytes()))
    }
}

/// One of the store's migrations, by its file name in `crates/holdfast-store/migrations/`.
macro_rules! store_file {
    ($version:literal, $name:literal) => {
        Migration::new(
            $version,
            concat!("crates/holdfast-store/migrations/", $name),
            include_str!(concat!("../migrations/", $name)),
        )
    };
}

/// The store's own schema.
pub(crate) static SCHEMA: Schema = Schema {
    name: "store",
    migrations: &[
        store_file!(1, "0001_accounts.sql").replacing_legacy(1),
        store_file!(2, "0002_jobs.sql").replacing_legacy(2),
        store_file!(3, "0003_sessions.sql").replacing_legacy(3),
        store_file!(4, "0004_job_claims.sql"),
        store_file!(5, "0005_rate_limits.sql"),
    ],
};

/// Arbitrary constant naming Holdfast's migration lock among the server's advisory locks.
const PG_MIGRATION_LOCK: i64 = 0x486f_6c64_6661_7374; // "Holdfast"

/// The table of applied migrations.
const TABLE: &str = "holdfast_schema_migrations";
/// The one-list table of databases made before schemas were split (kept, never written).
const LEGACY_TABLE: &str = "holdfast_migrations";

/// A migration's SQL for `backend`.
pub(crate) fn render(sql: &str, backend: Backend) -> String {
    match backend {
        Backend::Sqlite => sql.to_owned(),
        Backend::Postgres => replace_word(
            &sql.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY"),
            "BLOB",
            "BYTEA",
        ),
    }
}

/// Replaces `word` where it stands as a whole word (not inside `session_blobs`).
fn replace_word(text: &str, word: &str, with: &str) -> String {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(word) {
        let before = rest[..i].chars().next_back();
        let after = rest[i + word.len()..].chars().next();
        out.push_str(&rest[..i]);
        if before.is_some_and(ident) || after.is_some_and(ident) {
            out.push_str(word);
        } else {
            out.push_str(with);
        }
        rest = &rest[i + word.len()..];
    }
    out.push_str(rest);
    out
}

pub(crate) async fn run(store: &Store, schemas: &[&Schema]) -> Result<()> {
    let mut tx = store.begin_write().await?;
    if store.backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(PG_MIGRATION_LOCK)
            .execute(tx.conn())
            .await?;
    }
    tx.conn()
        .execute(
            format!(
                "CREATE TABLE IF NOT EXISTS {TABLE} (
                     schema_name TEXT NOT NULL, version BIGINT NOT NULL, file TEXT NOT NULL,
                     checksum TEXT NOT NULL, applied_at BIGINT NOT NULL,
                     PRIMARY KEY (schema_name, version))"
            )
            .as_str(),
        )
        .await?;
    adopt_legacy(&mut tx, schemas).await?;
    let mut applied: HashMap<(String, i64), String> = HashMap::new();
    for r in sqlx::query(&format!(
        "SELECT schema_name, version, checksum FROM {TABLE}"
    ))
    .fetch_all(tx.conn())
    .await?
    {
        applied.insert(
            (r.try_get("schema_name")?, r.try_get("version")?),
            r.try_get("checksum")?,
        );
    }
    for schema in schemas {
        for m in schema.migrations {
            let built = m.checksum();
            if let Some(recorded) = applied.get(&(schema.name.to_owned(), m.version)) {
                if *recorded != built {
                    return Err(Error::MigrationChanged {
                        file: m.file,
                        recorded: recorded.clone(),
                        built,
                    });
                }
                continue;
            }
            tx.conn()
                .execute(render(m.sql, store.backend).as_str())
                .await
                .map_err(|source| Error::Migration {
                    file: m.file,
                    source,
                })?;
            record(&mut tx, schema, m, holdfast_core::now_ms()).await?;
            tracing::info!(
                schema = schema.name,
                version = m.version,
                file = m.file,
                "applied migration"
            );
        }
    }
    tx.commit().await
}

async fn record(tx: &mut crate::Tx, schema: &Schema, m: &Migration, applied_at: i64) -> Result<()> {
    sqlx::query(&format!(
        "INSERT INTO {TABLE} (schema_name, version, file, checksum, applied_at) VALUES ($1, $2, $3, $4, $5)"
    ))
    .bind(schema.name)
    .bind(m.version)
    .bind(m.file)
    .bind(m.checksum())
    .bind(applied_at)
    .execute(tx.conn())
    .await?;
    Ok(())
}

/// A database from before schemas were split lists its applied versions in the legacy table:
/// every migration that names one of them as its `legacy` version is recorded as applied
/// (with this build's checksum) rather than run again. The legacy table stays, so a schema
/// that joins later is adopted too.
async fn adopt_legacy(tx: &mut crate::Tx, schemas: &[&Schema]) -> Result<()> {
    let exists = match tx.backend() {
        Backend::Sqlite => "SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table' AND name = $1",
        Backend::Postgres => "SELECT COUNT(*) AS n FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = $1",
    };
    let n: i64 = sqlx::query(exists)
        .bind(LEGACY_TABLE)
        .fetch_one(tx.conn())
        .await?
        .try_get("n")?;
    if n == 0 {
        return Ok(());
    }
    let mut legacy: HashMap<i64, i64> = HashMap::new();
    for r in sqlx::query(&format!("SELECT version, applied_at FROM {LEGACY_TABLE}"))
        .fetch_all(tx.conn())
        .await?
    {
        legacy.insert(r.try_get("version")?, r.try_get("applied_at")?);
    }
    for schema in schemas {
        for m in schema.migrations {
            let Some(applied_at) = m.legacy.and_then(|v| legacy.get(&v)) else {
                continue;
            };
            let known = sqlx::query(&format!(
                "SELECT 1 AS one FROM {TABLE} WHERE schema_name = $1 AND version = $2"
            ))
            .bind(schema.name)
            .bind(m.version)
            .fetch_optional(tx.conn())
            .await?;
            if known.is_none() {
                record(tx, schema, m, *applied_at).await?;
                tracing::info!(
                    schema = schema.name,
                    version = m.version,
                    "adopted a migration applied before schemas were split"
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_gets_its_spelling_of_blobs_and_serial_keys_only() {
        let sql = "CREATE TABLE session_blobs (id INTEGER PRIMARY KEY AUTOINCREMENT, data BLOB NOT NULL, b BLOB, blobby TEXT, x_BLOB TEXT);";
        assert_eq!(render(sql, Backend::Sqlite), sql);
        assert_eq!(
            render(sql, Backend::Postgres),
            "CREATE TABLE session_blobs (id BIGSERIAL PRIMARY KEY, data BYTEA NOT NULL, b BYTEA, blobby TEXT, x_BLOB TEXT);"
        );
    }

    #[test]
    fn versions_count_up_from_one_and_name_their_files() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        for (i, m) in SCHEMA.migrations.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1);
            let on_disk = std::fs::read_to_string(root.join(m.file)).expect(m.file);
            assert_eq!(on_disk, m.sql, "{} is the file it names", m.file);
        }
    }
}
