//! `holdfast backup run|now|status|list` and `holdfast restore`: one line each, for an
//! operator at 2 a.m. The work is in `holdfast-backup`.

use std::time::Duration;

use anyhow::{bail, Context};
use holdfast_backup::{rfc3339, Backup, Continuous, Health, Target};
use time::OffsetDateTime;
use tracing::info;

use crate::cli::{BackupCommand, BackupTarget, ReconcileArgs, RestoreArgs, StoreArgs};

/// How often the continuous backup proves itself with a forced sync.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);

fn backup_of(target: &BackupTarget) -> anyhow::Result<Backup> {
    backup_to(&target.backup, &target.store)
}

/// The backup of the store `store` names to `target`: the SQLite file in its data dir, or its
/// PostgreSQL server.
fn backup_to(target: &str, store: &StoreArgs) -> anyhow::Result<Backup> {
    let target = Target::parse(target)?;
    Ok(match store.backend {
        holdfast_core::Backend::Sqlite => {
            let url = store.store_url()?;
            let file = store.data_dir.join(holdfast_backup::DATABASE_FILE);
            anyhow::ensure!(
                url == format!("sqlite:{}", file.display()),
                "--backup backs up the store in --data-dir ({}), not {url}",
                file.display()
            );
            Backup::of_data_dir(&store.data_dir, target)?
        }
        holdfast_core::Backend::Postgres => {
            Backup::of_postgres(&store.store_url()?, &store.data_dir, target)?
        }
    })
}

/// Starts the continuous backup `up --backup` asks for.
pub fn start(target: &str, store: &StoreArgs) -> anyhow::Result<Continuous> {
    let backup = backup_to(target, store)?;
    Continuous::start(backup, CHECK_EVERY).context("--backup")
}

pub async fn run(cmd: BackupCommand) -> anyhow::Result<()> {
    match cmd {
        BackupCommand::Run { target } => {
            let backup = backup_of(&target)?;
            if let holdfast_backup::Source::Sqlite(file) = &backup.source {
                anyhow::ensure!(
                    file.exists(),
                    "{} does not exist: start the store first (holdfast migrate up)",
                    file.display()
                );
            }
            let terminated = crate::on_terminate()?;
            let source = backup.source.to_string();
            let continuous = Continuous::start(backup, CHECK_EVERY)?;
            println!("backup running: {source} to {}", target.backup);
            let signal = terminated.await;
            info!(
                signal,
                "stopping the backup once it has shipped what is left"
            );
            continuous.finish().await?;
            Ok(())
        }
        BackupCommand::Now { target } => {
            let synced = backup_of(&target)?.now().await?;
            let txid = synced
                .txid
                .map(|t| format!(" (transaction {t:#x})"))
                .unwrap_or_default();
            println!(
                "backed up to {}{txid} in {} ms",
                target.backup,
                synced.took.as_millis()
            );
            Ok(())
        }
        BackupCommand::Status {
            target,
            stale_after,
        } => status(&backup_of(&target)?, stale_after).await,
        BackupCommand::List { target } => {
            let points = backup_of(&target)?.points().await?;
            println!(
                "{}: restorable from {} to {} (transaction {}); {} files, {} bytes",
                target.backup,
                rfc3339(points.first),
                rfc3339(points.last.at),
                points.last.txid,
                points.files,
                points.bytes
            );
            for s in &points.snapshots {
                println!(
                    "snapshot {} transaction {} {} bytes",
                    rfc3339(s.at),
                    s.txid,
                    s.bytes
                );
            }
            Ok(())
        }
    }
}

async fn status(backup: &Backup, stale_after: Duration) -> anyhow::Result<()> {
    let Some(health) = Health::read(backup) else {
        bail!(
            "backup NOT RUNNING: no continuous backup has run for {} (holdfast up --backup, or holdfast backup run)",
            backup.source
        );
    };
    if health.target != backup.target.to_string() {
        bail!(
            "backup NOT RUNNING to {}: the replication of {} goes to {}",
            backup.target,
            backup.source,
            health.target
        );
    }
    let age = |ms: i64| Duration::from_millis((holdfast_core::now_ms() - ms).max(0) as u64);
    let last = match health.last_success_ms {
        Some(ms) => format!(
            "last reached {} {:.1} s ago",
            health.target,
            age(ms).as_secs_f64()
        ),
        None => format!("never reached {}", health.target),
    };
    let why = health
        .last_error
        .as_deref()
        .map(|e| format!("; last error: {e}"))
        .unwrap_or_default();
    if !crate::pid_alive(health.supervisor_pid) {
        bail!(
            "backup NOT RUNNING: its process {} is gone; {last}{why}",
            health.supervisor_pid
        );
    }
    match health.last_success_ms {
        Some(ms) if age(ms) <= stale_after => {
            let txid = health
                .txid
                .map(|t| format!(", transaction {t:#x}"))
                .unwrap_or_default();
            println!(
                "backup ok: {last}{txid}, {} restarts of the replication",
                health.restarts
            );
            Ok(())
        }
        _ => bail!("backup STALE: {last} (over {stale_after:?}){why}"),
    }
}

pub async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let target = Target::parse(&args.backup)?;
    let at = args
        .at
        .as_deref()
        .map(|at| {
            OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).with_context(
                || format!("--at {at:?} is not an RFC 3339 time (e.g. 2026-11-30T02:15:00Z); nothing was touched"),
            )
        })
        .transpose()?;
    let then: Option<holdfast_backup::Then> = args.provider_url.clone().map(|provider| {
        let to = args.to.clone();
        Box::new(move |url: String| {
            Box::pin(async move {
                let store = StoreArgs {
                    backend: holdfast_core::Backend::of_url(&url)
                        .unwrap_or(holdfast_core::Backend::Sqlite),
                    data_dir: to,
                    database_url: Some(url),
                    backup_checkpoints: false,
                    replica_max_lag: holdfast_store::ReplicaOptions::default().max_lag,
                    replica_wait: holdfast_store::ReplicaOptions::default().wait,
                    db_surplus_connections: 0,
                };
                reconcile_store(&store, &provider)
                    .await
                    .map(|done| reconcile_line(&done))
                    .map_err(|e| format!("{e:#}"))
            }) as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>
        }) as holdfast_backup::Then
    });
    let restored = holdfast_backup::restore(&target, &args.to, at, then).await?;
    let postgres = restored.engine == "postgres";
    let reconcile_later = if postgres {
        format!(
            "start it (pg_ctl -D {} start), then run `holdfast reconcile --backend postgres --database-url <its URL> --provider-url {}` before serving it",
            args.to.display(),
            args.provider_url.as_deref().unwrap_or("<provider>")
        )
    } else {
        format!(
            "run `holdfast reconcile --data-dir {} --provider-url {}` before serving it",
            args.to.display(),
            args.provider_url.as_deref().unwrap_or("<provider>")
        )
    };
    let reconciled = match &restored.then {
        None => format!("; no --provider-url: {reconcile_later}"),
        Some(Ok(line)) => format!("; {line}"),
        Some(Err(why)) => bail!(
            "restored {} ({}), but not reconciled ({why}): {reconcile_later}",
            restored.database.display(),
            restored.integrity
        ),
    };
    let serve = if postgres {
        format!(
            "start it with `pg_ctl -D {} start` and serve it with `holdfast up --backend postgres --database-url <its URL>`",
            args.to.display()
        )
    } else {
        format!(
            "serve it with `holdfast up --data-dir {}`",
            args.to.display()
        )
    };
    println!(
        "restored {} as of {} ({}) from {target} in {:.1} s: {} ({:.1} s), {} migrations{reconciled}; {serve}",
        restored.database.display(),
        rfc3339(restored.as_of.at),
        if postgres {
            format!("WAL to {}", restored.as_of.txid)
        } else {
            format!("transaction {}", restored.as_of.txid)
        },
        restored.took.as_secs_f64(),
        restored.integrity,
        restored.checked_in.as_secs_f64(),
        restored.migrations,
    );
    Ok(())
}

/// `holdfast reconcile`.
pub async fn reconcile(args: ReconcileArgs) -> anyhow::Result<()> {
    let done = reconcile_store(&args.store, &args.provider_url).await?;
    println!("{}", reconcile_line(&done));
    for orphan in &done.refunded {
        println!(
            "refunded {} ({} cents) for lost order {} (refund {})",
            orphan.charge_id, orphan.amount_cents, orphan.order_id, orphan.refund_id
        );
    }
    Ok(())
}

async fn reconcile_store(
    store: &StoreArgs,
    provider_url: &str,
) -> anyhow::Result<holdfast_shop::reconcile::Reconciled> {
    let store = crate::open_existing_store(store, holdfast_store::MigrateMode::Verify).await?;
    let provider = holdfast_provider::ProviderClient::new(provider_url, Duration::from_secs(10))?;
    Ok(holdfast_shop::reconcile::reconcile(&store, &provider).await?)
}

fn reconcile_line(done: &holdfast_shop::reconcile::Reconciled) -> String {
    let orders: Vec<&str> = done.refunded.iter().map(|o| o.order_id.as_str()).collect();
    let back = if done.present_but_refunded.is_empty() {
        String::new()
    } else {
        format!(
            "; ATTENTION: orders present whose charge was refunded: {}",
            done.present_but_refunded.join(", ")
        )
    };
    format!(
        "reconciled {} charges: {} linked to their orders, {} refunded now (orders lost: {}), {} refunded before{back}",
        done.charges,
        done.linked,
        done.refunded.len(),
        if orders.is_empty() { "none".to_owned() } else { orders.join(", ") },
        done.already_refunded
    )
}
