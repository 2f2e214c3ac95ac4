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
    Ok(Backup::of_data_dir(
        &target.data_dir,
        Target::parse(&target.backup)?,
    )?)
}

/// Starts the continuous backup `up --backup` asks for.
pub fn start(target: &str, data_dir: &std::path::Path) -> anyhow::Result<Continuous> {
    let backup = Backup::of_data_dir(data_dir, Target::parse(target)?)?;
    Continuous::start(backup, CHECK_EVERY).context("--backup")
}

pub async fn run(cmd: BackupCommand) -> anyhow::Result<()> {
    match cmd {
        BackupCommand::Run { target } => {
            let backup = backup_of(&target)?;
            anyhow::ensure!(
                backup.database.exists(),
                "{} does not exist: start the store first (holdfast migrate up)",
                backup.database.display()
            );
            let terminated = crate::on_terminate()?;
            let continuous = Continuous::start(backup, CHECK_EVERY)?;
            println!(
                "backup running: {} to {} every second",
                target.data_dir.display(),
                target.backup
            );
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
            backup.database.display()
        );
    };
    if health.target != backup.target.to_string() {
        bail!(
            "backup NOT RUNNING to {}: the replication of {} goes to {}",
            backup.target,
            backup.database.display(),
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
    let restored = holdfast_backup::restore(&target, &args.to, at).await?;
    let reconciled = match &args.provider_url {
        None => "; no --provider-url: run `holdfast reconcile` before serving it".to_owned(),
        Some(url) => {
            let store = StoreArgs {
                backend: holdfast_core::Backend::Sqlite,
                data_dir: args.to.clone(),
                database_url: Some(format!("sqlite:{}", restored.database.display())),
                backup_checkpoints: false,
            };
            let done = reconcile_store(&store, url).await.with_context(|| {
                format!(
                    "restored {} (integrity_check ok), but not reconciled: run `holdfast reconcile --data-dir {} --provider-url {url}` before serving it",
                    restored.database.display(),
                    args.to.display()
                )
            })?;
            format!("; {}", reconcile_line(&done))
        }
    };
    println!(
        "restored {} as of {} (transaction {}) from {target} in {:.1} s: integrity_check {} ({:.1} s), {} migrations{reconciled}; serve it with `holdfast up --data-dir {}`",
        restored.database.display(),
        rfc3339(restored.as_of.at),
        restored.as_of.txid,
        restored.took.as_secs_f64(),
        restored.integrity,
        restored.checked_in.as_secs_f64(),
        restored.migrations,
        args.to.display()
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
