//! `holdfast`: the one binary. `holdfast up` runs the whole system on one machine,
//! `holdfast serve` runs one stateless instance, `holdfast bench` measures.
//!
//! This file only wires: parse flags, set up logging (to stderr, so stdout stays a channel the
//! supervisor can parse), start a runtime, run the command. See `cli.rs` for the flags.

mod bench;
mod cli;
mod serve;
mod up;

use std::future::Future;
use std::io::IsTerminal;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::cli::{BenchCommand, Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        match cli.command {
            Some(Command::Serve(args)) => serve::run(args).await,
            Some(Command::Up(args)) => up::run(args).await,
            Some(Command::Bench(BenchCommand::Checkout(args))) => bench::run(args).await,
            None => up::run(cli.up).await,
        }
    })
}

/// Installs SIGTERM and SIGINT handlers now (so a signal that comes early is not fatal) and
/// returns a future that resolves on the first of them, naming it: both mean "drain and stop".
pub(crate) fn on_terminate() -> std::io::Result<impl Future<Output = &'static str>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}
