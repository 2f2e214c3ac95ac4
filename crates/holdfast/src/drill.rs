//! `holdfast drill`: flags in, report out. The drill itself lives in `holdfast-drill`; this
//! glue turns `DrillArgs` into its options (running `up` from this very executable), prints
//! the table, writes the JSON and HTML, and turns a failed verdict into a non-zero exit.

use anyhow::{bail, Context};
use holdfast_drill::{DrillOptions, Sessions};

use crate::cli::{self, DrillArgs};

pub async fn run(args: DrillArgs) -> anyhow::Result<()> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let mut opts = DrillOptions::new(
        std::env::current_exe().context("finding our own executable")?,
        seed,
    );
    opts.backend = args.backend;
    opts.sessions = match args.sessions {
        cli::SessionMode::Store => Sessions::Store,
        cli::SessionMode::Redis => Sessions::Redis,
        cli::SessionMode::Cookie => Sessions::Cookie,
    };
    if args.restart_redis_every.is_some() && opts.sessions != Sessions::Redis {
        bail!("--restart-redis-every needs --sessions redis (the drill restarts its own Redis)");
    }
    opts.restart_redis_every = args.restart_redis_every;
    opts.think = args.think_time;
    opts.ramp_up = args.ramp_up;
    opts.duration = args.duration;
    opts.users = args.users;
    opts.instances = args.instances;
    opts.workers = args.workers;
    opts.faults = args.faults;
    opts.sabotage = args.sabotage;
    opts.progress = true;
    opts.system_log = args.system_log;
    opts.history = args.history;
    opts.alerts = !args.no_alerts;
    eprintln!(
        "drill: {}, sessions {}, for {:?}, {} users, seed {seed} (repeat with --seed {seed})",
        opts.backend.name(),
        opts.sessions.name(),
        opts.duration,
        opts.users
    );
    let report = holdfast_drill::run(opts).await?;
    print!("{}", report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, report.to_json())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.html {
        std::fs::write(path, report.to_html())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !report.passed() {
        bail!("drill failed: violated {}", report.violated.join(", "));
    }
    Ok(())
}
