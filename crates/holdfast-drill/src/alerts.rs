//! The alert rules, proven by the drill. A rule that never fired on a real failure is a guess;
//! so the drill runs a real Prometheus beside the drilled system: it scrapes the balancer's
//! combined `/ops/metrics` every second and evaluates the shipped rules
//! (`ops/prometheus/holdfast.rules.yml`, compiled in) every second, with every duration in
//! them divided by [`TIME_COMPRESSION`] — an hour's window becomes a minute, `for: 5m` five
//! seconds — so a drill of a minute sees what an hour of production would. Thresholds are
//! left alone: the rules under test are the shipped ones, only faster.
//!
//! Judged afterwards from Prometheus's own `ALERTS` series: each applied fault must raise the
//! alerts [`expected`] names within [`WINDOW_S`] of its start, and a drill without faults must
//! raise none. Alerts that fired with no fault expecting them are reported, not failed: a
//! fault can hurt in more ways than the one it is meant to show.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::process::{Child, Command};

use crate::checker::{Verdict, Violation};
use crate::faults::{FaultKind, Injected};

/// The shipped rules, as the drill loads them (before compression).
pub const RULES: &str = include_str!("../../../ops/prometheus/holdfast.rules.yml");

/// Every duration in [`RULES`] is divided by this for the drill.
pub const TIME_COMPRESSION: u64 = 60;

/// How long after a fault starts (plus its hold) the alerts it expects may take to fire.
pub const WINDOW_S: f64 = 30.0;

/// The alerts one fault kind must raise (every one of them), by name — with the `role` label
/// where the alert has one, so a worker's kill is not credited to an instance's. Drains and
/// key rotations are how operators change a running system (a rolling restart is a stream of
/// drains), so what they raise is the `info` record of a rolling restart, never a ticket.
pub fn expected(kind: FaultKind) -> &'static [&'static str] {
    match kind {
        FaultKind::KillInstance | FaultKind::KillMidUpload => {
            &["HoldfastProcessesFailing{role=\"web\"}"]
        }
        FaultKind::KillWorker => &["HoldfastProcessesFailing{role=\"worker\"}"],
        FaultKind::PauseInstance => &["HoldfastInstanceFroze"],
        // Frozen past `up --kill-unresponsive-after`: seen frozen, then killed and replaced.
        FaultKind::FreezeInstance => &[
            "HoldfastInstanceFroze",
            "HoldfastProcessesFailing{role=\"web\"}",
        ],
        FaultKind::RestartDb | FaultKind::CutDb => &["HoldfastStoreFlaking"],
        FaultKind::SlowDb => &["HoldfastSlowAnswers"],
        FaultKind::ProviderTimeouts => &["HoldfastPaymentsRetrying"],
        FaultKind::RestartRedis | FaultKind::FlushCache => &["HoldfastSessionsLostByRedis"],
        FaultKind::LoginFlood => &["HoldfastClientsRateLimited"],
        FaultKind::SlowClients => &["HoldfastSlowClients"],
        FaultKind::DrainInstance | FaultKind::RotateKeys | FaultKind::Migrate => {
            &["HoldfastProcessesReplaced{role=\"web\"}"]
        }
        // The node's own figures die with it, and the restored node's start from zero: what
        // pages for a lost node is outside it (the scrape target down, the backup's age).
        FaultKind::LosePrimary | FaultKind::PromoteStandby => &[],
        // Reads move to the primary and nobody sees an error: nothing for a person to do now.
        FaultKind::FailReplica => &[],
    }
}

/// The rules with every duration (range selectors `[1h]`, `for: 5m`) divided by `factor`,
/// written in milliseconds.
pub fn compress(rules: &str, factor: u64) -> String {
    let mut out = String::with_capacity(rules.len());
    for line in rules.lines() {
        let trimmed = line.trim_start();
        if let Some(value) = trimmed.strip_prefix("for: ") {
            let indent = &line[..line.len() - trimmed.len()];
            match scaled(value.trim(), factor) {
                Some(ms) => out.push_str(&format!("{indent}for: {ms}ms")),
                None => out.push_str(line),
            }
        } else {
            let mut rest = line;
            while let Some(open) = rest.find('[') {
                out.push_str(&rest[..=open]);
                rest = &rest[open + 1..];
                if let Some(close) = rest.find(']') {
                    if let Some(ms) = scaled(&rest[..close], factor) {
                        out.push_str(&format!("{ms}ms"));
                        rest = &rest[close..];
                    }
                }
            }
            out.push_str(rest);
        }
        out.push('\n');
    }
    out
}

/// `5m` → 5 min / factor in ms; `None` if not one number and one unit.
fn scaled(duration: &str, factor: u64) -> Option<u64> {
    let unit_at = duration.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = duration.split_at(unit_at);
    let n: u64 = n.parse().ok()?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    Some((n * ms / factor.max(1)).max(1))
}

/// One alert as Prometheus had it firing, in seconds from the start of the load.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Fired {
    pub alert: String,
    pub first_s: f64,
    pub last_s: f64,
    /// Fired with no applied fault expecting it within its window.
    pub unexplained: bool,
}

/// One fault's expected alert and whether (when) it fired.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Expected {
    pub fault: &'static str,
    pub at_s: f64,
    pub alert: &'static str,
    /// Seconds from the fault's start to the alert firing; `None`: it did not fire in time.
    pub fired_after_s: Option<f64>,
}

/// The report's `alerts` section.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Alerts {
    /// `checked`, or why not (no Prometheus on this machine, `--no-alerts`).
    pub status: String,
    pub time_compression: u64,
    pub fired: Vec<Fired>,
    pub expected: Vec<Expected>,
}

impl Alerts {
    pub fn not_checked(why: &str) -> Self {
        Alerts {
            status: why.to_owned(),
            time_compression: TIME_COMPRESSION,
            ..Alerts::default()
        }
    }

    /// Adds to `verdict` each expected alert that did not fire (`alerts_missed`) and, in a
    /// drill without faults, each alert that fired at all (`alerts_on_clean_run`).
    pub fn judge_into(&self, verdict: &mut Verdict, faults_applied: usize) {
        for v in self.violations(faults_applied) {
            match v.invariant {
                "alerts_missed" => verdict.counts.alerts_missed += 1,
                _ => verdict.counts.alerts_on_clean_run += 1,
            }
            verdict.violations.push(v);
        }
    }

    fn violations(&self, faults_applied: usize) -> Vec<Violation> {
        let mut out: Vec<Violation> = self
            .expected
            .iter()
            .filter(|e| e.fired_after_s.is_none())
            .map(|e| Violation {
                invariant: "alerts_missed",
                detail: format!(
                    "{} at {:.1}s should have raised {} within {WINDOW_S}s; it did not",
                    e.fault, e.at_s, e.alert
                ),
            })
            .collect();
        if faults_applied == 0 {
            out.extend(self.fired.iter().map(|f| Violation {
                invariant: "alerts_on_clean_run",
                detail: format!(
                    "{} fired at {:.1}s in a drill without faults: noise",
                    f.alert, f.first_s
                ),
            }));
        }
        out
    }
}

/// Matches what fired (per alert, the seconds it was firing) with what the faults expect.
pub fn judge(firing: &[(String, Vec<f64>)], injected: &[Injected]) -> (Vec<Fired>, Vec<Expected>) {
    let applied: Vec<&Injected> = injected.iter().filter(|f| f.applied).collect();
    let mut wanted = Vec::new();
    for f in &applied {
        for alert in expected(f.kind) {
            let (from, to) = (f.at_s, f.at_s + f.hold_s + WINDOW_S);
            let fired_at = firing
                .iter()
                .filter(|(name, _)| name == alert)
                .flat_map(|(_, ts)| ts.iter().copied())
                // A firing that began before the fault and lasts into it counts too: the
                // condition holds, whoever caused it first.
                .filter(|t| *t >= from - 1.0 && *t <= to)
                .reduce(f64::min);
            wanted.push(Expected {
                fault: f.kind.name(),
                at_s: f.at_s,
                alert,
                fired_after_s: fired_at.map(|t| ((t - f.at_s).max(0.0) * 10.0).round() / 10.0),
            });
        }
    }
    let fired = firing
        .iter()
        .filter(|(_, ts)| !ts.is_empty())
        .map(|(alert, ts)| {
            let first = ts.iter().copied().fold(f64::INFINITY, f64::min);
            let last = ts.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let explained = applied.iter().any(|f| {
                expected(f.kind).contains(&alert.as_str())
                    && first >= f.at_s - 1.0
                    && first <= f.at_s + f.hold_s + WINDOW_S
            });
            Fired {
                alert: alert.clone(),
                first_s: first,
                last_s: last,
                unexplained: !explained,
            }
        })
        .collect();
    (fired, wanted)
}

/// A Prometheus process of the drill's own, killed when dropped.
pub struct Prometheus {
    child: Child,
    url: String,
}

impl Prometheus {
    /// Starts `prometheus` scraping `ops_url`'s `/ops/metrics` with the compressed rules, in
    /// `dir`; `Ok(None)` if there is no `prometheus` on this machine.
    pub async fn start(ops_url: &str, dir: &Path) -> Result<Option<Prometheus>, String> {
        if std::process::Command::new("prometheus")
            .arg("--version")
            .output()
            .is_err()
        {
            return Ok(None);
        }
        let dir = dir.join("prometheus");
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let target = ops_url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let rules = dir.join("rules.yml");
        std::fs::write(&rules, compress(RULES, TIME_COMPRESSION))
            .map_err(|e| format!("writing {}: {e}", rules.display()))?;
        // `honor_labels`: the combined scrape carries each process's own `instance` label.
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
             rule_files: [{rules:?}]\n\
             scrape_configs:\n  - job_name: holdfast\n    honor_labels: true\n    metrics_path: /ops/metrics\n    static_configs: [{{ targets: [{target:?}] }}]\n",
            rules = rules.display().to_string(),
        );
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config)
            .map_err(|e| format!("writing {}: {e}", config_file.display()))?;
        let port = crate::system::port_for_a_child()
            .map_err(|e| format!("finding a port for Prometheus: {e}"))?;
        let log = std::fs::File::create(dir.join("prometheus.log"))
            .map_err(|e| format!("creating Prometheus's log: {e}"))?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting prometheus: {e}"))?;
        let prometheus = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let http = reqwest::Client::new();
        for _ in 0..100 {
            let ready = http
                .get(format!("{}/-/ready", prometheus.url))
                .timeout(Duration::from_secs(1))
                .send()
                .await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                prometheus.scraped_twice(&http).await?;
                return Ok(Some(prometheus));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(format!(
            "Prometheus did not become ready; see {}",
            dir.join("prometheus.log").display()
        ))
    }

    /// Waits until Prometheus has scraped the system successfully twice, so every counter has
    /// a sample from before the first fault: `increase` over a single sample is nothing.
    async fn scraped_twice(&self, http: &reqwest::Client) -> Result<(), String> {
        for _ in 0..100 {
            let answer = http
                .get(format!("{}/api/v1/query", self.url))
                .query(&[("query", "sum_over_time(up{job=\"holdfast\"}[1m])")])
                .timeout(Duration::from_secs(1))
                .send()
                .await;
            if let Ok(answer) = answer {
                let body: serde_json::Value = answer.json().await.unwrap_or_default();
                let scrapes = body["data"]["result"][0]["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0);
                if scrapes >= 2.0 {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err("Prometheus did not scrape the system twice within 20 s".into())
    }

    /// Per alert, the seconds (from `load_started`) at which Prometheus had it firing, from
    /// then until now.
    pub async fn firing(
        &self,
        load_started: SystemTime,
    ) -> Result<Vec<(String, Vec<f64>)>, String> {
        let epoch = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64()
        };
        let (start, end) = (epoch(load_started), epoch(SystemTime::now()));
        // One more evaluation, so what the last scrape showed is judged too.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let resp = reqwest::Client::new()
            .get(format!("{}/api/v1/query_range", self.url))
            .query(&[
                ("query", "ALERTS{alertstate=\"firing\"}"),
                ("start", &format!("{:.3}", start - 5.0)),
                ("end", &format!("{:.3}", end + 2.0)),
                ("step", "1"),
            ])
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| format!("asking Prometheus for ALERTS: {e}"))?;
        let body: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| format!("reading Prometheus's answer: {e}"))?;
        let mut by_alert: Vec<(String, Vec<f64>)> = Vec::new();
        for series in body["data"]["result"].as_array().into_iter().flatten() {
            let Some(alertname) = series["metric"]["alertname"].as_str() else {
                continue;
            };
            let name = match series["metric"]["role"].as_str() {
                Some(role) => format!("{alertname}{{role=\"{role}\"}}"),
                None => alertname.to_owned(),
            };
            let name = name.as_str();
            let times = series["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v[0].as_f64())
                .map(|t| ((t - start) * 10.0).round() / 10.0);
            match by_alert.iter_mut().find(|(n, _)| n == name) {
                Some((_, ts)) => ts.extend(times),
                None => by_alert.push((name.to_owned(), times.collect())),
            }
        }
        for (_, ts) in &mut by_alert {
            ts.sort_by(f64::total_cmp);
            ts.dedup();
        }
        Ok(by_alert)
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_duration_is_compressed_and_nothing_else_changes() {
        let rules = "      - record: x\n        expr: sum(rate(a[5m])) / sum(rate(b[1h])) > (14.4 * 0.001)\n        for: 2m\n        summary: \"[not a duration]\"\n";
        assert_eq!(
            compress(rules, 60),
            "      - record: x\n        expr: sum(rate(a[5000ms])) / sum(rate(b[60000ms])) > (14.4 * 0.001)\n        for: 2000ms\n        summary: \"[not a duration]\"\n"
        );
        let shipped = compress(RULES, TIME_COMPRESSION);
        assert!(!shipped.contains("[1h]") && !shipped.contains("for: 5m"));
        assert_eq!(shipped.lines().count(), RULES.lines().count());
    }

    #[test]
    fn every_fault_kind_names_alerts_that_exist() {
        for kind in FaultKind::ALL.iter().chain(FaultKind::ABUSE.iter()) {
            for alert in expected(*kind) {
                let name = alert.split('{').next().unwrap_or_default();
                assert!(
                    RULES.contains(&format!("- alert: {name}\n")),
                    "{kind:?} expects {alert}, which is not in the rules"
                );
            }
        }
    }

    fn fault(kind: FaultKind, at_s: f64) -> Injected {
        Injected {
            kind,
            at_s,
            target: String::new(),
            hold_s: 0.0,
            applied: true,
            note: String::new(),
        }
    }

    #[test]
    fn a_missing_alert_and_noise_on_a_clean_run_are_violations() {
        let kill = fault(FaultKind::KillInstance, 10.0);
        let firing = vec![(
            "HoldfastProcessesFailing{role=\"web\"}".to_owned(),
            vec![12.0, 13.0],
        )];
        let (fired, expected) = judge(&firing, std::slice::from_ref(&kill));
        assert_eq!(expected[0].fired_after_s, Some(2.0));
        assert!(!fired[0].unexplained);
        let alerts = Alerts {
            status: "checked".into(),
            time_compression: 60,
            fired,
            expected,
        };
        let mut verdict = Verdict::default();
        alerts.judge_into(&mut verdict, 1);
        assert!(verdict.passed(), "{verdict:?}");

        // The same alert, too late: a violation naming the fault.
        let late = vec![(
            "HoldfastProcessesFailing{role=\"web\"}".to_owned(),
            vec![45.0],
        )];
        let (fired, expected) = judge(&late, &[kill]);
        assert!(fired[0].unexplained);
        let alerts = Alerts {
            fired,
            expected,
            ..Alerts::not_checked("checked")
        };
        let mut verdict = Verdict::default();
        alerts.judge_into(&mut verdict, 1);
        assert_eq!(verdict.counts.violated(), ["alerts_missed"]);
        assert!(
            verdict.violations[0].detail.contains("kill-instance"),
            "{:?}",
            verdict.violations
        );

        // No faults, one alert: noise.
        let (fired, expected) = judge(&firing, &[]);
        let alerts = Alerts {
            fired,
            expected,
            ..Alerts::not_checked("checked")
        };
        let mut verdict = Verdict::default();
        alerts.judge_into(&mut verdict, 0);
        assert_eq!(verdict.counts.violated(), ["alerts_on_clean_run"]);
    }
}
