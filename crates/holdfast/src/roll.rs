//! `holdfast roll`: a rolling restart of what `up` runs in a data dir — web instances one at a
//! time, then workers — checking between steps that users felt nothing. Each step SIGTERMs one
//! process (it drains: readiness off, in-flight work finishes), waits for `up` to list its
//! replacement and, for a web instance, for the balancer to call every instance ready again,
//! then reads the balancer's own 5xx count: any new 5xx during the step aborts the roll,
//! saying why. Before each step it checks there is room on the data dir's disk and every web
//! instance is ready; otherwise it stops there, saying why. Replace the `holdfast` executable on disk first and the roll is an upgrade:
//! `up` starts replacements from the same path.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Deserialize;

use crate::cli::RollArgs;

#[derive(Debug, Clone, Deserialize)]
struct Listed {
    role: String,
    pid: u32,
}

#[derive(Debug, Deserialize)]
struct BalancerFile {
    ops_addr: String,
}

#[derive(Debug, Deserialize)]
struct Upstream {
    healthy: bool,
    alive: bool,
}

pub async fn run(args: RollArgs) -> anyhow::Result<()> {
    let run_dir = args.data_dir.join("run");
    let balancer: BalancerFile = crate::read_json(&run_dir.join(crate::up::BALANCER_FILE))
        .context("`holdfast up` is not running with this data dir (no run/balancer.json)")?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let ops = format!("http://{}", balancer.ops_addr);
    let listed =
        || -> Vec<Listed> { crate::read_json(&run_dir.join("instances.json")).unwrap_or_default() };
    let before = listed();
    let webs: Vec<u32> = before
        .iter()
        .filter(|l| l.role == "web")
        .map(|l| l.pid)
        .collect();
    let workers: Vec<u32> = before
        .iter()
        .filter(|l| l.role == "worker")
        .map(|l| l.pid)
        .collect();
    let want_web = webs.len();
    let mut seen: HashSet<u32> = before.iter().map(|l| l.pid).collect();
    let steps: Vec<(&str, u32)> = webs
        .iter()
        .map(|&p| ("web", p))
        .chain(workers.iter().map(|&p| ("worker", p)))
        .collect();
    if steps.is_empty() {
        bail!("nothing to roll: run/instances.json lists no web instance or worker");
    }
    for (n, (role, pid)) in steps.iter().enumerate() {
        if let Err(why) = fit_for_next_step(&args, &http, &ops, want_web).await {
            bail!(
                "aborted before step {}/{} ({role} pid {pid}): {why}; {}",
                n + 1,
                steps.len(),
                if n == 0 {
                    "nothing was touched"
                } else {
                    "the rest were not touched"
                }
            );
        }
        let errors_before = server_errors(&http, &ops).await?;
        let started = Instant::now();
        kill(Pid::from_raw(*pid as i32), Signal::SIGTERM)
            .with_context(|| format!("SIGTERM to {role} pid {pid}"))?;
        // The replacement: a pid of this role `up` lists that was never listed before.
        let replacement = loop {
            if started.elapsed() > args.step_timeout {
                bail!(
                    "aborted at step {}/{}: no replacement for {role} pid {pid} within {:?}",
                    n + 1,
                    steps.len(),
                    args.step_timeout
                );
            }
            let now = listed();
            let fresh = now
                .iter()
                .find(|l| l.role == *role && !seen.contains(&l.pid));
            let old_gone = !now.iter().any(|l| l.pid == *pid);
            if let (Some(fresh), true) = (fresh, old_gone) {
                break fresh.pid;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        seen.insert(replacement);
        if *role == "web" {
            loop {
                let ups: Vec<Upstream> = http
                    .get(format!("{ops}/ops/upstreams"))
                    .send()
                    .await?
                    .json()
                    .await?;
                if ups.len() == want_web && ups.iter().all(|u| u.healthy && u.alive) {
                    break;
                }
                if started.elapsed() > args.step_timeout {
                    bail!(
                        "aborted at step {}/{}: the web instances were not all ready within {:?} after replacing pid {pid}",
                        n + 1,
                        steps.len(),
                        args.step_timeout
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let errors = server_errors(&http, &ops).await? - errors_before;
        if errors > 0 {
            bail!(
                "aborted at step {}/{}: the balancer answered {errors} 5xx while {role} pid {pid} was replaced; the rest were not touched",
                n + 1,
                steps.len()
            );
        }
        println!(
            "{}/{}: {role} pid {pid} → pid {replacement} in {:.1} s, 0 5xx",
            n + 1,
            steps.len(),
            started.elapsed().as_secs_f64()
        );
        tokio::time::sleep(args.pause).await;
    }
    println!("rolled {} processes", steps.len());
    Ok(())
}

/// The checks before each step: room on the data dir's disk, and every web instance ready and
/// answering (replacing one while another is down would leave too few). Replication lag joins
/// them when `up` runs replicas.
async fn fit_for_next_step(
    args: &RollArgs,
    http: &reqwest::Client,
    ops: &str,
    want_web: usize,
) -> Result<(), String> {
    let fs = nix::sys::statvfs::statvfs(&args.data_dir).map_err(|e| {
        format!(
            "cannot read the free space of {}: {e}",
            args.data_dir.display()
        )
    })?;
    let free_pct = 100.0 * fs.blocks_available() as f64 / (fs.blocks() as f64).max(1.0);
    if free_pct < args.min_free_disk {
        return Err(format!(
            "{} has {free_pct:.1}% free, under --min-free-disk {}%",
            args.data_dir.display(),
            args.min_free_disk
        ));
    }
    let ups: Vec<Upstream> = async {
        http.get(format!("{ops}/ops/upstreams"))
            .send()
            .await?
            .json()
            .await
    }
    .await
    .map_err(|e| format!("cannot read the balancer's upstreams: {e}"))?;
    let ready = ups.iter().filter(|u| u.healthy && u.alive).count();
    if ready < want_web {
        return Err(format!(
            "only {ready} of {want_web} web instances are ready"
        ));
    }
    Ok(())
}

/// The balancer's 5xx answers so far (from its own families on `/ops/metrics`).
async fn server_errors(http: &reqwest::Client, ops: &str) -> anyhow::Result<u64> {
    let page = http
        .get(format!("{ops}/ops/metrics"))
        .send()
        .await?
        .text()
        .await?;
    page.lines()
        .find(|l| l.starts_with("holdfast_balancer_requests_total{") && l.contains("class=\"5xx\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .context("the balancer's /ops/metrics has no holdfast_balancer_requests_total 5xx series")
}
