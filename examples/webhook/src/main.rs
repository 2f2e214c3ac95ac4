//! `webhook-once`: the example service in one process — its web edge and one worker — on a
//! SQLite file (or `--database-url postgres://…`).
//!
//! ```text
//! cargo run -p webhook-once -- --addr 127.0.0.1:8090
//! ```

use anyhow::Context;
use holdfast_jobs::{Wakeup, Worker, WorkerOptions};
use holdfast_store::{Backend, Store, StoreOptions};
use holdfast_web::{AppState, WebOptions};
use std::time::Duration;
use webhook_once::Deliveries;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let (mut addr, mut url) = (
        "127.0.0.1:8090".to_owned(),
        "sqlite:webhook-once.sqlite".to_owned(),
    );
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--addr" => addr = value,
            "--database-url" => url = value,
            other => anyhow::bail!("unknown flag {other} (use --addr, --database-url)"),
        }
    }
    let store = Store::open(&StoreOptions::new(&url).schema(&webhook_once::SCHEMA)).await?;
    let wakeup = match store.backend() {
        Backend::Postgres => Wakeup::Postgres(url.clone()),
        Backend::Sqlite => Wakeup::SqliteFile(url.trim_start_matches("sqlite:").into()),
    };
    let worker = Deliveries::new(store.clone(), Duration::from_secs(5))?.register(Worker::new(
        store.clone(),
        WorkerOptions {
            queues: Deliveries::queues(8),
            wakeup,
            ..WorkerOptions::default()
        },
    ));
    tokio::spawn(worker.run(std::future::pending()));
    let web = WebOptions {
        secure_cookies: false,
        ..WebOptions::default()
    };
    let app = holdfast_web::app(AppState::new(store, web, None), webhook_once::router());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("webhook-once on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
