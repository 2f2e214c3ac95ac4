//! `holdfast status`: the one screen an operator reads first. What `up` runs in this data dir
//! (from `run/instances.json` and `run/balancer.json`), each process's uptime, restarts and
//! health (the balancer's view of web instances: ready, alive, ejected; a live pid for the
//! rest), then the queue, how long the oldest due payout has waited, and the continuous
//! backup (from `run/backup/state.json`). `--json` for machines.

use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::cli::JobsList;

#[derive(Debug, Deserialize)]
struct Listed {
    role: String,
    pid: u32,
    addr: String,
    #[serde(default)]
    started_at: i64,
    #[serde(default)]
    restarts: u32,
}

#[derive(Debug, Deserialize)]
struct BalancerFile {
    pid: u32,
    addr: String,
    ops_addr: String,
    started_at: i64,
}

#[derive(Debug, Deserialize)]
struct Upstream {
    addr: String,
    healthy: bool,
    alive: bool,
    #[serde(default)]
    ejected: bool,
}

#[derive(Debug, Serialize)]
struct Process {
    role: String,
    pid: u32,
    addr: String,
    uptime_s: u64,
    restarts: u32,
    health: String,
}

#[derive(Debug, Serialize)]
struct Queue {
    queue: String,
    waiting: i64,
    running: i64,
    dead: i64,
}

#[derive(Debug, Serialize)]
struct Status {
    /// The public address, while `up` runs here.
    balancer: Option<String>,
    processes: Vec<Process>,
    queues: Vec<Queue>,
    /// How long the oldest due payout has been waiting (none waiting: null).
    oldest_waiting_payout_s: Option<u64>,
    /// The Redis session tier as the instances see it, or null when no instance runs one.
    redis_sessions: Option<String>,
    /// The last `holdfast drill` recorded in this data dir, or null.
    last_drill: Option<crate::drill::LastDrill>,
    /// The continuous backup of this data dir's store, as it last proved itself, or null.
    backup: Option<holdfast_backup::Health>,
    /// On PostgreSQL, each host the store's URL names: primary or standby, and each
    /// standby's lag (empty on SQLite).
    database: Vec<holdfast_store::Node>,
    #[serde(skip)]
    now_ms: i64,
}

pub async fn run(args: JobsList) -> anyhow::Result<()> {
    let run_dir = args.store.data_dir.join("run");
    let now = holdfast_core::now_ms();
    let age = |since: i64| u64::try_from(now.saturating_sub(since) / 1000).unwrap_or(0);
    let balancer: Option<BalancerFile> = crate::read_json(&run_dir.join(crate::up::BALANCER_FILE));
    let listed: Vec<Listed> = match &balancer {
        Some(_) => crate::read_json(&run_dir.join("instances.json")).unwrap_or_default(),
        None => Vec::new(),
    };
    let upstreams: Vec<Upstream> = match &balancer {
        Some(b) => upstreams(&b.ops_addr).await.unwrap_or_default(),
        None => Vec::new(),
    };
    let redis_sessions = match &balancer {
        Some(b) => redis_sessions(&b.ops_addr).await,
        None => None,
    };
    let mut processes: Vec<Process> = balancer
        .iter()
        .map(|b| Process {
            role: "balancer".into(),
            pid: b.pid,
            addr: b.addr.clone(),
            uptime_s: age(b.started_at),
            restarts: 0,
            health: if upstreams.is_empty() {
                "operator port not answering".into()
            } else {
                "serving".into()
            },
        })
        .collect();
    for l in listed {
        let health = match upstreams.iter().find(|u| u.addr == l.addr) {
            Some(u) if !u.alive => "FROZEN (not answering /healthz)".to_owned(),
            Some(u) if u.ejected => "EJECTED (failing requests)".to_owned(),
            Some(u) if !u.healthy => "not ready (draining or starting)".to_owned(),
            Some(_) => "ready".to_owned(),
            None if crate::pid_alive(l.pid) => "running".to_owned(),
            None => "GONE".to_owned(),
        };
        processes.push(Process {
            uptime_s: age(l.started_at),
            role: l.role,
            pid: l.pid,
            addr: l.addr,
            restarts: l.restarts,
            health,
        });
    }
    let store =
        crate::open_existing_store(&args.store, holdfast_store::MigrateMode::Verify).await?;
    let mut queues: Vec<Queue> = Vec::new();
    for c in store.job_counts().await? {
        let i = match queues.iter().position(|q| q.queue == c.queue) {
            Some(i) => i,
            None => {
                queues.push(Queue {
                    queue: c.queue.clone(),
                    waiting: 0,
                    running: 0,
                    dead: 0,
                });
                queues.len() - 1
            }
        };
        match c.state.as_str() {
            "available" => queues[i].waiting += c.count,
            "running" => queues[i].running += c.count,
            "dead" => queues[i].dead += c.count,
            _ => {}
        }
    }
    let oldest = store.job_next_run_at(holdfast_shop::PAYMENTS_QUEUE).await?;
    let database = store.replication().await;
    store.close().await;
    let status = Status {
        balancer: balancer.map(|b| b.addr),
        processes,
        queues,
        oldest_waiting_payout_s: oldest.filter(|&t| t <= now).map(age),
        redis_sessions,
        last_drill: crate::read_json(&run_dir.join(crate::drill::LAST_DRILL_FILE)),
        backup: crate::read_json(&run_dir.join("backup").join("state.json")),
        database,
        now_ms: now,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", table(&status));
    }
    Ok(())
}

fn table(s: &Status) -> String {
    let mut out = match &s.balancer {
        Some(addr) => format!("holdfast up: serving http://{addr}\n"),
        None => "holdfast up is not running with this data dir\n".to_owned(),
    };
    if !s.processes.is_empty() {
        out.push_str(&format!(
            "{:<10}{:>8}  {:<22}{:>10}{:>10}  health\n",
            "role", "pid", "addr", "uptime", "restarts"
        ));
        for p in &s.processes {
            out.push_str(&format!(
                "{:<10}{:>8}  {:<22}{:>10}{:>10}  {}\n",
                p.role,
                p.pid,
                p.addr,
                uptime(p.uptime_s),
                p.restarts,
                p.health
            ));
        }
    }
    if s.queues.is_empty() {
        out.push_str("queue: no jobs\n");
    } else {
        out.push_str(&format!(
            "{:<10}{:>10}{:>10}{:>10}\n",
            "queue", "waiting", "running", "dead"
        ));
        for q in &s.queues {
            out.push_str(&format!(
                "{:<10}{:>10}{:>10}{:>10}\n",
                q.queue, q.waiting, q.running, q.dead
            ));
        }
    }
    if let Some(redis) = &s.redis_sessions {
        out.push_str(&format!("redis sessions: {redis}\n"));
    }
    out.push_str(&match s.oldest_waiting_payout_s {
        Some(secs) => format!("oldest waiting payout: {}\n", uptime(secs)),
        None => "oldest waiting payout: none waiting\n".to_owned(),
    });
    out.push_str(&match &s.backup {
        None => "backup: none has run here (holdfast up --backup)\n".to_owned(),
        Some(b) => backup_line(b, s.now_ms),
    });
    for node in &s.database {
        out.push_str(&database_line(node));
    }
    out.push_str(&match &s.last_drill {
        Some(d) => {
            let age = u64::try_from((s.now_ms - d.finished_at) / 1000).unwrap_or(0);
            format!("last drill: {}\n", d.line(age, uptime))
        }
        None => {
            "last drill: none recorded here (holdfast drill --data-dir records one)\n".to_owned()
        }
    });
    out
}

/// One database host in one line: its role, and a standby's lag (LAGGING past 10 s, as the
/// `HoldfastReplicaLagging` alert).
fn database_line(n: &holdfast_store::Node) -> String {
    let lag = match (n.lag_bytes, n.lag_seconds) {
        (Some(bytes), Some(secs)) => format!(
            ", {} behind: {bytes} bytes, {secs:.1} s",
            if secs > 10.0 { "LAGGING" } else { "replaying" }
        ),
        (Some(bytes), None) => format!(", replaying: {bytes} bytes behind"),
        _ => String::new(),
    };
    let role = if n.role.starts_with("unreachable") {
        n.role.to_uppercase()
    } else {
        n.role.clone()
    };
    format!("database {}: {role}{lag}\n", n.host)
}

/// The continuous backup in one line: where to, when it last proved itself, and trouble in
/// capitals (its supervisor gone, no proof for 30 s).
fn backup_line(b: &holdfast_backup::Health, now_ms: i64) -> String {
    let proved = match b.last_success_ms {
        Some(at) => format!(
            "last reached {:.1} s ago",
            (now_ms - at).max(0) as f64 / 1000.0
        ),
        None => "never reached".to_owned(),
    };
    let state = if !crate::pid_alive(b.supervisor_pid) {
        "NOT RUNNING"
    } else if b.last_success_ms.is_none_or(|at| now_ms - at > 30_000) {
        "STALE"
    } else {
        "ok"
    };
    let error = b
        .last_error
        .as_deref()
        .map(|e| format!("; last error: {e}"))
        .unwrap_or_default();
    format!(
        "backup: {state}, to {}, {proved}, {} restarts{error}\n",
        b.target, b.restarts
    )
}

fn uptime(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// `holdfast_sessions_redis_up` across the fleet's metrics page, if any instance exports it.
async fn redis_sessions(ops_addr: &str) -> Option<String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .ok()?;
    let page = http
        .get(format!("http://{ops_addr}/ops/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let up: Vec<bool> = page
        .lines()
        .filter(|l| l.starts_with("holdfast_sessions_redis_up{"))
        .filter_map(|l| Some(l.rsplit(' ').next()?.parse::<f64>().ok()? > 0.5))
        .collect();
    let down = up.iter().filter(|u| !**u).count();
    match (up.len(), down) {
        (0, _) => None,
        (n, 0) => Some(format!("up on all {n} instances")),
        (n, d) => Some(format!(
            "DOWN on {d} of {n} instances (sessions served by the store)"
        )),
    }
}

async fn upstreams(ops_addr: &str) -> anyhow::Result<Vec<Upstream>> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()?;
    let url = format!("http://{ops_addr}/ops/upstreams");
    http.get(&url)
        .send()
        .await?
        .json()
        .await
        .with_context(|| format!("reading {url}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drill::LastDrill;

    fn quiet(last_drill: Option<LastDrill>) -> Status {
        Status {
            balancer: None,
            processes: Vec::new(),
            queues: Vec::new(),
            oldest_waiting_payout_s: None,
            redis_sessions: None,
            last_drill,
            backup: None,
            database: Vec::new(),
            now_ms: 10_000_000,
        }
    }

    #[test]
    fn each_database_host_is_one_line_and_a_lagging_standby_says_so() {
        let node = |role: &str, lag_bytes, lag_seconds| holdfast_store::Node {
            host: "db2:5432".into(),
            role: role.into(),
            lag_bytes,
            lag_seconds,
        };
        let mut status = quiet(None);
        status.database = vec![
            node("primary", None, None),
            node("standby", Some(0), Some(0.0)),
            node("standby", Some(4096), Some(12.5)),
            node("unreachable: connection refused", None, None),
        ];
        let text = table(&status);
        assert!(text.contains("database db2:5432: primary\n"), "{text}");
        assert!(
            text.contains("database db2:5432: standby, replaying behind: 0 bytes, 0.0 s\n"),
            "{text}"
        );
        assert!(
            text.contains("database db2:5432: standby, LAGGING behind: 4096 bytes, 12.5 s\n"),
            "{text}"
        );
        assert!(
            text.contains("database db2:5432: UNREACHABLE: CONNECTION REFUSED\n"),
            "{text}"
        );
    }

    #[test]
    fn the_last_drill_is_one_line_with_its_verdict_age_and_alerts() {
        let drill = LastDrill {
            verdict: "fail".into(),
            violated: vec!["alerts_missed".into()],
            finished_at: 10_000_000 - 7_500_000,
            seed: "11".into(),
            backend: "sqlite".into(),
            faults_applied: 5,
            alerts_expected: 4,
            alerts_raised: 3,
        };
        let shown = table(&quiet(Some(drill)));
        assert!(
            shown.contains("last drill: FAIL (alerts_missed) 2h05m ago (sqlite, seed 11, 5 faults, 3/4 alerts raised)\n"),
            "{shown}"
        );
        assert!(table(&quiet(None)).contains("last drill: none recorded here"));
    }

    #[test]
    fn the_backup_is_one_line_that_shouts_when_it_is_stale_or_gone() {
        let mut status = quiet(None);
        assert!(table(&status).contains("backup: none has run here"));
        let backup = holdfast_backup::Health {
            target: "/mnt/backup".into(),
            last_success_ms: Some(10_000_000 - 800),
            supervisor_pid: std::process::id(),
            ..holdfast_backup::Health::default()
        };
        status.backup = Some(backup.clone());
        assert!(
            table(&status)
                .contains("backup: ok, to /mnt/backup, last reached 0.8 s ago, 0 restarts\n"),
            "{}",
            table(&status)
        );
        status.backup = Some(holdfast_backup::Health {
            last_success_ms: Some(10_000_000 - 45_000),
            ..backup.clone()
        });
        assert!(
            table(&status).contains("backup: STALE"),
            "{}",
            table(&status)
        );
        status.backup = Some(holdfast_backup::Health {
            supervisor_pid: u32::MAX,
            ..backup
        });
        assert!(
            table(&status).contains("backup: NOT RUNNING"),
            "{}",
            table(&status)
        );
    }
}
