//! `holdfast worker`: one job worker, and `holdfast jobs …`: the queue's operator commands.
//!
//! A worker is as disposable as a web instance: SIGKILL it mid-payout and the job's lease
//! lapses, another worker rescues it, and the effect ledger makes sure the order is charged
//! and receipted once. SIGTERM drains it: it stops claiming, finishes what it runs (bounded)
//! and gives the rest back. It serves `/healthz` and `/metrics` on `--addr`.

use std::time::Duration;

use anyhow::{bail, Context};
use axum::routing::get;
use holdfast_jobs::{Wakeup, Worker, WorkerOptions};
use holdfast_provider::ProviderClient;
use holdfast_shop::Flows;
use holdfast_store::Backend;
use tracing::info;

use crate::cli::{JobsCommand, WorkerArgs};

pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    crate::die_with_parent(args.parent_pid)?;
    let terminated = crate::on_terminate()?;
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("binding {}", args.addr))?;
    let addr = listener.local_addr()?;
    let metrics = holdfast_web::install_labelled_metrics_recorder(
        &[
            ("role", "worker".to_owned()),
            ("instance", crate::instance_label(addr)),
        ],
        &[
            holdfast_jobs::METRICS,
            holdfast_store::METRICS,
            holdfast_web::RUNTIME_METRICS,
        ],
    )
    .map_err(anyhow::Error::msg)?;
    let url = args.store.store_url()?;
    let store = crate::open_store(&args.store, crate::serving_mode(args.migrate)).await?;
    let wakeup = match store.backend() {
        Backend::Postgres => Wakeup::Postgres(url.clone()),
        Backend::Sqlite => Wakeup::SqliteFile(
            url.trim_start_matches("sqlite:")
                .split('?')
                .next()
                .unwrap_or_default()
                .into(),
        ),
    };
    let jobs = &args.jobs;
    let sabotage = args.sabotage.unsafe_sabotage;
    if let Some(kind) = sabotage {
        tracing::warn!(%kind, "SABOTAGE: this worker is broken on purpose");
    }
    let flows = Flows::new(
        store.clone(),
        ProviderClient::new(&args.provider_url, jobs.provider_timeout)?,
        sabotage,
    );
    let defaults = WorkerOptions::default();
    let opts = WorkerOptions {
        queues: Flows::queues(jobs.job_concurrency.max(1)),
        lease: jobs.job_lease,
        heartbeat_every: (jobs.job_lease / 4).max(Duration::from_millis(50)),
        rescue_every: (jobs.job_lease / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(1)),
        backoff: holdfast_core::retry::RetryPolicy {
            base: jobs.job_retry_base,
            cap: Duration::from_secs(300),
            ..defaults.backoff
        },
        wakeup,
        queue_gauges: !args.no_queue_metrics,
        ..defaults
    };
    let worker = flows.register(Worker::new(store.clone(), opts));

    let render = move || {
        holdfast_web::record_runtime_metrics();
        std::future::ready(metrics.render())
    };
    crate::graphite::spawn(&args.graphite, render.clone());
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(render));
    tokio::spawn(async move { axum::serve(listener, app).await });
    crate::announce_listening(addr, None)?;
    info!(%addr, backend = %store.backend(), "worker serving /metrics");

    worker
        .run(async {
            let signal = terminated.await;
            info!(signal, "draining: no new jobs, finishing running ones");
        })
        .await?;
    store.close().await;
    Ok(())
}

pub async fn jobs_command(cmd: JobsCommand) -> anyhow::Result<()> {
    let store_args = match &cmd {
        JobsCommand::Stats(l) | JobsCommand::Dead(l) => &l.store,
        JobsCommand::Redrive { store, .. } => store,
    };
    let store = crate::open_existing_store(store_args, holdfast_store::MigrateMode::Verify).await?;
    let out = match cmd {
        JobsCommand::Stats(l) => {
            let counts = store.job_counts().await?;
            if l.json {
                serde_json::to_string_pretty(&counts)?
            } else {
                stats_table(&counts)
            }
        }
        JobsCommand::Dead(l) => {
            let dead = store.job_dead(1000).await?;
            if l.json {
                serde_json::to_string_pretty(&dead)?
            } else {
                dead_table(&dead)
            }
        }
        JobsCommand::Redrive { id, .. } => {
            let n = store.job_redrive(id, holdfast_core::now_ms()).await?;
            match (id, n) {
                (Some(id), 0) => bail!("no dead job with id {id} (see `holdfast jobs dead`)"),
                (Some(id), _) => format!("redriven: job {id}"),
                (None, 0) => "no dead jobs to redrive".to_owned(),
                (None, n) => format!("redriven: {n} dead jobs"),
            }
        }
    };
    println!("{out}");
    Ok(())
}

/// One line per queue: how many jobs are in each state.
fn stats_table(counts: &[holdfast_store::QueueCount]) -> String {
    if counts.is_empty() {
        return "no jobs".to_owned();
    }
    let mut rows: std::collections::BTreeMap<&str, [i64; 4]> = Default::default();
    for c in counts {
        let row = rows.entry(c.queue.as_str()).or_default();
        let col = match c.state.as_str() {
            "available" => 0,
            "running" => 1,
            "dead" => 2,
            _ => 3,
        };
        row[col] += c.count;
    }
    let mut out = format!(
        "{:<16}{:>10}{:>10}{:>10}{:>10}",
        "queue", "waiting", "running", "dead", "other"
    );
    for (queue, [waiting, running, dead, other]) in rows {
        out.push_str(&format!(
            "\n{queue:<16}{waiting:>10}{running:>10}{dead:>10}{other:>10}"
        ));
    }
    out
}

/// One line per dead job, newest error last.
fn dead_table(dead: &[holdfast_store::DeadJob]) -> String {
    if dead.is_empty() {
        return "no dead jobs".to_owned();
    }
    let mut out = format!(
        "{:>8}  {:<12}{:<16}{:>9}  last error",
        "id", "queue", "kind", "attempts"
    );
    for d in dead {
        let error: String = d
            .last_error
            .as_deref()
            .unwrap_or("-")
            .chars()
            .take(100)
            .collect();
        out.push_str(&format!(
            "\n{:>8}  {:<12}{:<16}{:>9}  {error}",
            d.job.id, d.job.queue, d.job.kind, d.job.attempt
        ));
    }
    out
}
