//! `holdfast`: the one binary. `holdfast up` runs the whole system on one machine,
//! `holdfast serve` runs one stateless instance, `holdfast worker` works the queues,
//! `holdfast drill` runs a game day; `holdfast bench` hands over to `holdfast-bench`.
//!
//! This file only wires: parse flags, set up logging (to stderr, so stdout stays a channel the
//! supervisor can parse), start a runtime, run the command. See `cli.rs` for the flags.

mod backup;
mod balance;
mod cli;
mod drill;
mod graphite;
mod migrate;
mod provider;
mod roll;
mod serve;
mod status;
mod up;
mod worker;

use std::future::Future;
use std::io::IsTerminal;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use anyhow::Context;

use crate::cli::{Cli, Command};

/// Errors end the process with one readable line (the cause chain), exit status 1 — no
/// backtrace, whatever `RUST_BACKTRACE` says: an operator wants the sentence.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
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
            Some(Command::Bench { args }) => run_bench(&args),
            Some(Command::Worker(args)) => worker::run(args).await,
            Some(Command::Provider(args)) => provider::run(args).await,
            Some(Command::Jobs(cmd)) => worker::jobs_command(cmd).await,
            Some(Command::Status(args)) => status::run(args).await,
            Some(Command::Roll(args)) => roll::run(args).await,
            Some(Command::Drill(args)) => drill::run(args).await,
            Some(Command::Migrate(cmd)) => migrate::run(cmd).await,
            Some(Command::Balance(args)) => balance::run(args).await,
            Some(Command::Probe(args)) => balance::probe(args).await,
            Some(Command::Backup(cmd)) => backup::run(cmd).await,
            Some(Command::Restore(args)) => backup::restore(args).await,
            Some(Command::Reconcile(args)) => backup::reconcile(args).await,
            None => up::run(cli.up).await,
        }
    })
}

/// `holdfast bench ARGS` is `holdfast-bench ARGS`, run from beside this executable: the
/// benchmarks link the peers they measure against, and the production binary links none.
fn run_bench(args: &[std::ffi::OsString]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let me = std::env::current_exe().context("finding our own executable")?;
    let bench = me.with_file_name("holdfast-bench");
    anyhow::ensure!(
        bench.is_file(),
        "holdfast bench runs {}, which is not built; run `cargo build --release -p holdfast-bench`",
        bench.display()
    );
    let err = std::process::Command::new(&bench).args(args).exec();
    Err(anyhow::Error::new(err).context(format!("running {}", bench.display())))
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

/// The store options the flags name: the shop's schema, and what to do about migrations.
pub(crate) fn store_options(
    args: &cli::StoreArgs,
    migrate: holdfast_store::MigrateMode,
) -> anyhow::Result<holdfast_store::StoreOptions> {
    store_options_as(args, migrate, &holdfast_shop::SCHEMA)
}

/// [`store_options`] with the shop schema `shop` (an older release's, for `--as-old-release`).
fn store_options_as(
    args: &cli::StoreArgs,
    migrate: holdfast_store::MigrateMode,
    shop: &'static holdfast_store::Schema,
) -> anyhow::Result<holdfast_store::StoreOptions> {
    let mut opts = holdfast_store::StoreOptions::new(args.store_url()?)
        .schema(shop)
        .migrate(migrate);
    opts.sqlite_autocheckpoint = !args.backup_checkpoints;
    opts.surplus_connections = args.db_surplus_connections;
    anyhow::ensure!(
        args.replica_max_lag < holdfast_web::READ_TOKEN_TTL,
        "--replica-max-lag must be under the read-your-writes token's {} s: a standby that far \
         behind could serve a reader whose token has expired a write it lacks",
        holdfast_web::READ_TOKEN_TTL.as_secs()
    );
    opts.replicas = Some(holdfast_store::ReplicaOptions {
        max_lag: args.replica_max_lag,
        wait: args.replica_wait,
        ..holdfast_store::ReplicaOptions::default()
    });
    Ok(opts)
}

/// Opens the store the flags name, with the shop's schema; `migrate` says whether pending
/// migrations are applied or refused.
pub(crate) async fn open_store(
    args: &cli::StoreArgs,
    migrate: holdfast_store::MigrateMode,
) -> anyhow::Result<holdfast_store::Store> {
    open_store_as(args, migrate, &holdfast_shop::SCHEMA).await
}

/// [`open_store`] with the shop schema `shop`.
pub(crate) async fn open_store_as(
    args: &cli::StoreArgs,
    migrate: holdfast_store::MigrateMode,
    shop: &'static holdfast_store::Schema,
) -> anyhow::Result<holdfast_store::Store> {
    holdfast_store::Store::open(&store_options_as(args, migrate, shop)?)
        .await
        .context("opening the store")
}

/// Serving processes verify the schema unless `--migrate` asks them to apply what is pending.
pub(crate) fn serving_mode(migrate: bool) -> holdfast_store::MigrateMode {
    if migrate {
        holdfast_store::MigrateMode::Apply(holdfast_store::MigrationGuard::default())
    } else {
        holdfast_store::MigrateMode::Verify
    }
}

/// The store for an operator command: it must already exist. A mistyped `--data-dir` is an
/// error, not a fresh empty database that answers "nothing here".
pub(crate) async fn open_existing_store(
    args: &cli::StoreArgs,
    migrate: holdfast_store::MigrateMode,
) -> anyhow::Result<holdfast_store::Store> {
    let sqlite_from_env = std::env::var("DATABASE_URL").is_ok_and(|u| u.starts_with("sqlite:"));
    if args.backend == holdfast_store::Backend::Sqlite
        && args.database_url.is_none()
        && !sqlite_from_env
    {
        let file = args.data_dir.join("holdfast.sqlite");
        anyhow::ensure!(
            file.is_file(),
            "no database at {}: is --data-dir right? (`holdfast up` or `holdfast migrate up` creates it)",
            file.display()
        );
    }
    open_store(args, migrate).await
}

/// A JSON file `up` keeps in its data dir's `run/`, if it is there and reads as a `T`.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Whether a process with this pid exists (signal 0 delivers nothing, only checks).
pub(crate) fn pid_alive(pid: u32) -> bool {
    i32::try_from(pid)
        .is_ok_and(|pid| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok())
}

/// Tells a supervisor where we listen: one line `HOLDFAST_LISTENING <addr>` on stdout, with
/// ` ops=<addr>` when the operator endpoints have a listener of their own.
pub(crate) fn announce_listening(
    addr: std::net::SocketAddr,
    ops: Option<std::net::SocketAddr>,
) -> std::io::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match ops {
        Some(ops) => writeln!(stdout, "{} {addr} ops={ops}", serve::LISTENING)?,
        None => writeln!(stdout, "{} {addr}", serve::LISTENING)?,
    }
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

/// The `instance` label of a process's metrics: its address, which tells processes on one
/// machine apart — unless it listens on every interface (a container's `0.0.0.0:8080`, the
/// same in every replica), where the host name (the container's id) comes first.
pub(crate) fn instance_label(addr: std::net::SocketAddr) -> String {
    if !addr.ip().is_unspecified() {
        return addr.to_string();
    }
    match std::fs::read_to_string("/proc/sys/kernel/hostname") {
        Ok(host) if !host.trim().is_empty() => format!("{}:{}", host.trim(), addr.port()),
        _ => addr.to_string(),
    }
}
