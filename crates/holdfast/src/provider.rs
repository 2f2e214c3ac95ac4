//! `holdfast provider`: the fake payment provider and mail sink, as its own process, so the
//! workers meet it the way they would meet a real one: over HTTP, with its own idempotency
//! keys and its own bad days (`--fail-rate`, `--act-then-timeout-rate`, or `PUT /_faults`).

use anyhow::Context;
use holdfast_provider::{Faults, ProviderOptions};
use tracing::info;

use crate::cli::ProviderArgs;

pub async fn run(args: ProviderArgs) -> anyhow::Result<()> {
    crate::die_with_parent(args.parent_pid)?;
    let terminated = crate::on_terminate()?;
    let faults = Faults {
        latency_ms: args.latency_ms,
        fail_rate: args.fail_rate,
        act_then_timeout_rate: args.act_then_timeout_rate,
        seed: args.seed,
        ..Faults::default()
    };
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("binding {}", args.addr))?;
    let addr = listener.local_addr()?;
    crate::announce_listening(addr, None)?;
    info!(%addr, ?faults, "provider listening");
    holdfast_provider::serve(listener, ProviderOptions { faults }, async {
        terminated.await;
    })
    .await?;
    Ok(())
}
