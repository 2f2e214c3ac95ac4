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
    let record = LastDrill::of(&report);
    let run_dir = args.data_dir.join("run");
    std::fs::create_dir_all(&run_dir)
        .and_then(|()| {
            std::fs::write(
                run_dir.join(LAST_DRILL_FILE),
                serde_json::to_vec_pretty(&record).unwrap_or_default(),
            )
        })
        .with_context(|| format!("recording the verdict in {}", run_dir.display()))?;
    if !report.passed() {
        bail!("drill failed: violated {}", report.violated.join(", "));
    }
    Ok(())
}

/// In a data dir's `run/`: the last drill's verdict, for `holdfast status`.
pub const LAST_DRILL_FILE: &str = "last-drill.json";

/// What `holdfast status` says about the last drill.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LastDrill {
    pub verdict: String,
    pub violated: Vec<String>,
    /// When it finished (ms since the Unix epoch).
    pub finished_at: i64,
    pub seed: String,
    pub backend: String,
    pub faults_applied: usize,
    pub alerts_expected: usize,
    pub alerts_raised: usize,
}

impl LastDrill {
    fn of(report: &holdfast_drill::Report) -> Self {
        let expected = &report.alerts.expected;
        LastDrill {
            verdict: report.verdict.to_owned(),
            violated: report.violated.iter().map(|v| (*v).to_owned()).collect(),
            finished_at: holdfast_core::now_ms(),
            seed: report.seed.to_string(),
            backend: report.backend.to_owned(),
            faults_applied: report.faults.iter().filter(|f| f.applied).count(),
            alerts_expected: expected.len(),
            alerts_raised: expected
                .iter()
                .filter(|e| e.fired_after_s.is_some())
                .count(),
        }
    }

    /// One line: `PASS 2h05m ago (sqlite, seed 11, 5 faults, 4/4 alerts raised)`.
    pub fn line(&self, age_s: u64, age: impl Fn(u64) -> String) -> String {
        let verdict = if self.violated.is_empty() {
            self.verdict.to_uppercase()
        } else {
            format!(
                "{} ({})",
                self.verdict.to_uppercase(),
                self.violated.join(", ")
            )
        };
        format!(
            "{verdict} {} ago ({}, seed {}, {} faults, {}/{} alerts raised)",
            age(age_s),
            self.backend,
            self.seed,
            self.faults_applied,
            self.alerts_raised,
            self.alerts_expected
        )
    }
}
