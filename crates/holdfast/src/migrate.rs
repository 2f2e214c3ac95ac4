//! `holdfast migrate status|plan|up`: how schema changes reach a running fleet. Serving
//! processes no longer migrate on start (they refuse a database that is not exactly their
//! build's, unless `--migrate`); an operator looks (`status`), reads what would run (`plan`)
//! and runs it once (`up`), guarded so that no request waits behind a migration longer than
//! `--lock-timeout` (see `holdfast_store`'s migrate module).

use anyhow::Context;
use holdfast_store::{MigrateMode, MigrationGuard, Store};
use serde::Serialize;

use crate::cli::MigrateCommand;

#[derive(Debug, Serialize)]
struct SchemaLine {
    schema: &'static str,
    applied: Vec<i64>,
    pending: Vec<String>,
    /// Recorded by a newer build; this build does not know them.
    unknown: Vec<String>,
    /// Applied, but the file differs in this build.
    changed: Vec<String>,
}

pub async fn run(cmd: MigrateCommand) -> anyhow::Result<()> {
    match cmd {
        MigrateCommand::Status(list) => {
            let opts = crate::store_options(&list.store, MigrateMode::Inspect)?;
            let store = crate::open_existing_store(&list.store, MigrateMode::Inspect).await?;
            let lines = lines(&store, &opts).await?;
            store.close().await;
            if list.json {
                println!("{}", serde_json::to_string_pretty(&lines)?);
            } else {
                for l in &lines {
                    println!("{}", describe(l));
                }
            }
        }
        MigrateCommand::Plan(only) => {
            let opts = crate::store_options(&only.store, MigrateMode::Inspect)?;
            let store = crate::open_store(&only.store, MigrateMode::Inspect).await?;
            let states = store.migration_status(&opts).await?;
            let backend = store.backend();
            store.close().await;
            let pending: Vec<_> = states.iter().flat_map(|s| s.pending.iter()).collect();
            if pending.is_empty() {
                println!("-- nothing to run: the database has every migration of this build");
            }
            for m in pending {
                println!(
                    "-- {} ({})\n{}",
                    m.file,
                    backend.name(),
                    m.render(backend).trim_end()
                );
            }
        }
        MigrateCommand::Up { store, guard } => {
            let guard = MigrationGuard {
                lock_timeout: guard.lock_timeout,
                statement_timeout: guard.statement_timeout,
                deadline: guard.deadline,
            };
            let opts = crate::store_options(&store, MigrateMode::Inspect)?;
            let before = crate::open_store(&store, MigrateMode::Inspect).await?;
            let pending: usize = before
                .migration_status(&opts)
                .await?
                .iter()
                .map(|s| s.pending.len())
                .sum();
            before.close().await;
            let migrated = crate::open_store(&store, MigrateMode::Apply(guard))
                .await
                .context("migrating")?;
            let lines = lines(&migrated, &opts).await?;
            migrated.close().await;
            println!("applied {pending} migration(s)");
            for l in &lines {
                println!("{}", describe(l));
            }
        }
    }
    Ok(())
}

async fn lines(
    store: &Store,
    opts: &holdfast_store::StoreOptions,
) -> anyhow::Result<Vec<SchemaLine>> {
    Ok(store
        .migration_status(opts)
        .await?
        .into_iter()
        .map(|s| SchemaLine {
            schema: s.schema,
            applied: s.applied.clone(),
            pending: s.pending.iter().map(|m| m.file.to_owned()).collect(),
            unknown: s.unknown.iter().map(|(_, f)| f.clone()).collect(),
            changed: s.changed.iter().map(|(f, _, _)| (*f).to_owned()).collect(),
        })
        .collect())
}

/// `store: 5 applied, up to date` or `shop: 0 applied, 1 pending (…)`.
fn describe(l: &SchemaLine) -> String {
    let mut out = format!("{}: {} applied", l.schema, l.applied.len());
    if l.pending.is_empty() && l.unknown.is_empty() && l.changed.is_empty() {
        out.push_str(", up to date");
    }
    for (what, files) in [
        ("pending", &l.pending),
        ("UNKNOWN to this build (a newer build migrated)", &l.unknown),
        ("CHANGED since applied", &l.changed),
    ] {
        if !files.is_empty() {
            out.push_str(&format!(", {} {what}: {}", files.len(), files.join(", ")));
        }
    }
    out
}
