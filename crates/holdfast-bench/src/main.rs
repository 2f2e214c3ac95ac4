//! `holdfast-bench`: side-by-side benchmarks of Holdfast against its peers — the checkout path
//! through the balancer, the job queue against graphile-worker and apalis, the Redis session
//! tier against tower-sessions' Redis store, the cache against moka.
//!
//! A binary of its own so that the production `holdfast` links none of the peers: `holdfast
//! bench …` runs this program from beside itself. Long runs live here, never in the test suite.

mod bare;
mod cache;
mod checkout;
mod cli;
mod jobs;
mod replica;
mod restore;
mod sessions;
mod uploads;

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::cli::{BenchCommand, Cli};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Only warnings by default: the figures are the output.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    tokio::runtime::Runtime::new()?.block_on(async {
        match cli.command {
            BenchCommand::Checkout(args) => checkout::run(args).await,
            BenchCommand::Jobs(args) => jobs::run(args).await,
            BenchCommand::Sessions(args) => sessions::run(args).await,
            BenchCommand::Cache(args) => cache::run(args).await,
            BenchCommand::Uploads(args) => uploads::run(args).await,
            BenchCommand::Restore(args) => restore::run(args).await,
            BenchCommand::Replica(args) => replica::run(args).await,
        }
    })
}

/// An executable built beside this one (`target/release/holdfast` next to
/// `target/release/holdfast-bench`).
pub(crate) fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("finding our own executable")?;
    let path = me.with_file_name(name);
    anyhow::ensure!(
        path.is_file(),
        "{} not found beside {}; build it with `cargo build --release -p {name}`",
        path.display(),
        me.display()
    );
    Ok(path)
}

/// The middle of `runs` by `key` (the upper middle of an even count); `runs` must not be
/// empty.
pub(crate) fn median_by<T>(mut runs: Vec<T>, key: impl Fn(&T) -> f64) -> T {
    runs.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let middle = runs.len() / 2;
    runs.swap_remove(middle)
}

/// `a ÷ b`, 0 when `b` is not positive.
pub(crate) fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
