//! `holdfast`: the one binary. `holdfast up` runs the whole system on one machine,
//! `holdfast serve` runs one stateless instance, `holdfast bench` measures.
//!
//! This file only wires: parse flags, set up logging (to stderr, so stdout stays a channel the
//! supervisor can parse), start a runtime, run the command. See `cli.rs` for the flags.

mod bench;
mod bench_cache;
mod bench_jobs;
mod bench_sessions;
mod cli;
mod drill;
mod provider;
mod serve;
mod up;
mod worker;

use std::future::Future;
use std::io::IsTerminal;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use anyhow::Context;

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
            Some(Command::Bench(BenchCommand::Jobs(args))) => bench_jobs::run(args).await,
            Some(Command::Bench(BenchCommand::Sessions(args))) => bench_sessions::run(args).await,
            Some(Command::Bench(BenchCommand::Cache(args))) => bench_cache::run(args).await,
            Some(Command::Worker(args)) => worker::run(args).await,
            Some(Command::Provider(args)) => provider::run(args).await,
            Some(Command::Jobs(cmd)) => worker::jobs_command(cmd).await,
            Some(Command::Drill(args)) => drill::run(args).await,
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

/// Tells a supervisor where we listen: one line `HOLDFAST_LISTENING <addr>` on stdout.
pub(crate) fn announce_listening(addr: std::net::SocketAddr) -> std::io::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{} {addr}", serve::LISTENING)?;
    stdout.flush()
}

/// Under `up`, an instance must not outlive its supervisor, even one killed by SIGKILL (which
/// gets no chance to stop us). Linux's parent-death signal does that, set here rather than in an
/// `unsafe` `pre_exec` hook; the check after it covers a supervisor that died before it was set
/// (we would already have been reparented).
#[cfg(target_os = "linux")]
pub(crate) fn die_with_parent(parent: Option<i32>) -> anyhow::Result<()> {
    let Some(parent) = parent else { return Ok(()) };
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .context("prctl(PR_SET_PDEATHSIG)")?;
    anyhow::ensure!(
        nix::unistd::getppid().as_raw() == parent,
        "supervisor {parent} is gone"
    );
    Ok(())
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn die_with_parent(_parent: Option<i32>) -> anyhow::Result<()> {
    Ok(())
}
