//! Holdfast's own schema migrations, embedded in the binary and applied at start-up.
//!
//! All pending migrations run in one write transaction that first takes a lock: on SQLite
//! `BEGIN IMMEDIATE` (the file's single write lock), on Postgres a transaction-scoped advisory
//! lock. A second instance starting at the same moment waits, then finds nothing to do.
//! Migrations are append-only: a released file is never edited; a change is a new version.

use crate::{Dialect, Error, Result, Store};
use sqlx::{Executor, Row};

struct Migration {
    version: i64,
    name: &'static str,
    sqlite: &'static str,
    postgres: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "shop",
        sqlite: include_str!("../migrations/sqlite/0001_shop.sql"),
        postgres: include_str!("../migrations/postgres/0001_shop.sql"),
    },
    Migration {
        version: 2,
        name: "jobs",
        sqlite: include_str!("../migrations/sqlite/0002_jobs.sql"),
        postgres: include_str!("../migrations/postgres/0002_jobs.sql"),
    },
    Migration {
        version: 3,
        name: "sessions",
        sqlite: include_str!("../migrations/sqlite/0003_sessions.sql"),
        postgres: include_str!("../migrations/postgres/0003_sessions.sql"),
    },
];

/// Arbitrary constant naming Holdfast's migration lock among the server's advisory locks.
const PG_MIGRATION_LOCK: i64 = 0x486f_6c64_6661_7374; // "Holdfast"

pub(crate) async fn run(store: &Store) -> Result<()> {
    let mut tx = store.pool.begin_with(store.dialect.begin_write()).await?;
    if store.dialect == Dialect::Postgres {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(PG_MIGRATION_LOCK)
            .execute(&mut *tx)
            .await?;
    }
    tx.execute(
        "CREATE TABLE IF NOT EXISTS holdfast_migrations (
             version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
    )
    .await?;
    let current: i64 =
        sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM holdfast_migrations")
            .fetch_one(&mut *tx)
            .await?
            .try_get("v")?;
    for m in MIGRATIONS.iter().filter(|m| m.version > current) {
        let sql = match store.dialect {
            Dialect::Sqlite => m.sqlite,
            Dialect::Postgres => m.postgres,
        };
        tx.execute(sql).await.map_err(|source| Error::Migration {
            version: m.version,
            source,
        })?;
        sqlx::query(
            "INSERT INTO holdfast_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
        )
        .bind(m.version)
        .bind(m.name)
        .bind(holdfast_core::now_ms())
        .execute(&mut *tx)
        .await?;
        tracing::info!(version = m.version, name = m.name, "applied migration");
    }
    tx.commit().await?;
    Ok(())
}
