//! The drill's report: a table for the terminal, JSON for machines, one HTML page for people.
//!
//! The JSON keys are a contract (CI and the notes read them): `verdict`, `seed` (a string), `duration_s`,
//! `requests_total`, `client_errors` (4xx answers), `server_errors` (5xx answers),
//! `transport_errors` (no answer), `latency_ms.{p50,p95,p99,max}` (every HTTP attempt after the
//! first `warmup_s`),
//! `faults` [{kind, at_s, target, …}], `orders_acknowledged` and one count per invariant
//! (see [`crate::checker`]). Keys are only ever added.
//!
//! The HTML page is self-contained — inline CSS and SVG, no script, no network — so it can be
//! archived with a CI run and opened anywhere: throughput and latency per second over the run,
//! with every fault marked on the time axis.

use std::fmt::Write;
use std::time::Duration;

use serde::Serialize;

use crate::abuse::{Flood, SlowClients};
use crate::checker::{Counts, Verdict, Violation};
use crate::faults::{Injected, Skipped};
use crate::users::{by_second, percentile, Class, Sample};
use crate::DrillOptions;

/// At most this many example violations per invariant are kept.
const EXAMPLES_PER_INVARIANT: usize = 10;
/// Requests completing this long after a fault ends still count as "under faults".
const RECOVERY_TAIL_MS: u64 = 2000;
/// The first this-long of the load (connections, caches and pools warming up) is left out of
/// the headline latency; the timeline still shows it.
const WARMUP_MS: u64 = 2000;

/// How long after a fault ended the load looked healthy again: the first whole second with
/// no 5xx and no unanswered attempt and a p99 within twice the p99 of the fault-free seconds
/// (or 50 ms) (`None`: not within the run).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Recovery {
    pub kind: crate::FaultKind,
    pub at_s: f64,
    pub recovered_after_s: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    fn of(mut us: Vec<u64>) -> Latency {
        us.sort_unstable();
        let ms = |q: f64| percentile(&us, q) as f64 / 1000.0;
        Latency {
            p50: ms(0.50),
            p95: ms(0.95),
            p99: ms(0.99),
            max: ms(1.0),
        }
    }
}

/// One second of the load.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Second {
    pub t_s: u64,
    pub requests: u64,
    pub ok: u64,
    pub client_errors: u64,
    pub server_errors: u64,
    pub transport_errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Payouts waiting in the queue (the fleet's count), when it was read that second.
    pub payouts_waiting: Option<u64>,
}

/// One web process's peak resident memory (its `VmHWM`) over the load.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PeakRss {
    pub pid: u32,
    pub mb: f64,
}

/// Honest users' requests that completed while some abuse was in force.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Honest {
    pub requests: u64,
    pub latency_ms: Latency,
    pub checkout_latency_ms: Latency,
    /// 503 answers (overloaded, busy: honest refusals with `Retry-After`).
    pub busy_503: u64,
    /// 5xx answers other than 503: failures.
    pub server_errors_other: u64,
    pub no_answer: u64,
    /// Every answer that was not 2xx/3xx or 4xx, and no answer, as a percentage.
    pub error_rate_pct: f64,
}

/// What the abuse faults did and what honest users felt meanwhile (`--faults abuse`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Abuse {
    pub login_flood: Flood,
    pub slow_clients: SlowClients,
    /// Honest requests while any abuse was in force.
    pub honest: Honest,
    /// Honest requests while an instance was frozen: how many took over a second.
    pub frozen_requests: u64,
    pub frozen_over_1s: u64,
    pub frozen_max_ms: f64,
}

/// What the `migrate` fault did and what users felt while it ran (`--faults migrate`).
#[derive(Clone, Debug, Serialize)]
pub struct Migration {
    #[serde(flatten)]
    pub seen: crate::migration::Observed,
    /// From the first phase to the end of the contract, seconds since the load started.
    pub window_s: [f64; 2],
    pub requests: u64,
    /// Answers 5xx while it ran (goal: 0).
    pub server_errors: u64,
    pub transport_errors: u64,
    /// p99 over as long a stretch just before it (warm-up left out), and while it ran.
    pub p99_before_ms: f64,
    pub p99_during_ms: f64,
    /// `p99_during_ms` against `p99_before_ms`, in percent (goal: under +20%).
    pub p99_change_pct: f64,
    /// p99 while each phase ran (its rollback and re-apply included), and while the web
    /// instances were rolled: where the cost is.
    pub p99_by_stage_ms: Vec<(String, f64)>,
    pub goals: Vec<Goal>,
}

/// One of the `migrate` fault's goals (the numbers), measured.
#[derive(Clone, Debug, Serialize)]
pub struct Goal {
    pub what: &'static str,
    pub goal: &'static str,
    pub value: String,
    /// Whether it was met; none where this engine cannot measure it.
    pub met: Option<bool>,
}

/// Top-level keys of [`Report::to_json`] that scripts may rely on.
pub const STABLE_KEYS: &[&str] = &[
    "verdict",
    "seed",
    "duration_s",
    "requests_total",
    "client_errors",
    "server_errors",
    "faults",
    "orders_acknowledged",
    "orders_lost",
    "orders_duplicated",
    "charges_duplicated",
    "emails_duplicated",
    "orders_unpaid",
    "sessions_lost",
    "cart_items_lost",
];

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// `pass` when every invariant held, else `fail`.
    pub verdict: &'static str,
    /// The report keys of the violated invariants.
    pub violated: Vec<&'static str>,
    /// Written as a string: a 64-bit seed does not survive a JSON number in every reader (jq).
    #[serde(serialize_with = "as_string")]
    pub seed: u64,
    pub backend: &'static str,
    pub sabotage: Option<&'static str>,
    /// Where the drilled system kept sessions: `store`, `redis` or `cookie`.
    pub sessions: &'static str,
    /// Virtual users that logged in at least once.
    pub active_users: usize,
    /// `forced_relogins` as a percentage of `logins`.
    pub forced_relogins_pct: f64,
    /// How often the drill's redis-server was restarted (memory lost).
    pub redis_restarts: usize,
    /// The requested load duration.
    pub duration_s: f64,
    /// How long the load actually ran (the last operations finish after `duration_s`).
    pub load_s: f64,
    pub setup_s: f64,
    /// Waiting for payouts and receipts after the load.
    pub settle_s: f64,
    pub users: usize,
    pub instances: u16,
    pub workers: u16,
    pub requests_total: u64,
    pub requests_per_s: f64,
    pub client_errors: u64,
    pub server_errors: u64,
    pub transport_errors: u64,
    pub latency_ms: Latency,
    /// Requests that completed while a fault was in force (or within 2 s after).
    pub latency_under_faults_ms: Latency,
    pub requests_under_faults: u64,
    /// Every `POST /api/checkout` attempt.
    pub checkout_latency_ms: Latency,
    /// Left out of `latency_ms` (seconds from the start of the load).
    pub warmup_s: f64,
    /// The most payouts waiting at once (sampled each second; `timeline[].payouts_waiting`).
    pub max_payouts_waiting: Option<u64>,
    /// Per applied fault, how long until the load looked healthy again.
    pub recovery: Vec<Recovery>,
    /// Attempts that were not answered 2xx/3xx, by operation and status (`none`: no answer).
    pub errors_by_op: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
    /// Each web process's peak resident memory, and the largest.
    pub peak_rss: Vec<PeakRss>,
    pub max_peak_rss_mb: f64,
    /// Present when the drill injected abuse.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abuse: Option<Abuse>,
    /// Present when the drill ran the `migrate` fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<Migration>,
    /// Present when the drill ran the `kill-mid-upload` fault: every upload as its client
    /// lived it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uploads: Option<crate::uploads::Observed>,
    /// Present when the drill lost the node and restored it (`lose-primary`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore: Option<Restore>,
    /// Present when the drill promoted the standby (`promote-standby`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failover: Option<Failover>,
    /// Present when the drill stopped the standby that served reads (`fail-replica`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica_lost: Option<crate::failover::ReplicaLost>,
    pub faults: Vec<Injected>,
    pub faults_skipped: Vec<Skipped>,
    /// What the shipped alert rules made of the run (a real Prometheus; see `alerts.rs`).
    pub alerts: crate::alerts::Alerts,
    #[serde(flatten)]
    pub counts: Counts,
    pub violations: Vec<Violation>,
    pub notes: Vec<String>,
    pub timeline: Vec<Second>,
}

fn as_string<S: serde::Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&n.to_string())
}

pub(crate) struct Inputs<'a> {
    pub opts: &'a DrillOptions,
    pub setup: Duration,
    pub load_s: f64,
    pub settle: Duration,
    pub samples: &'a [Sample],
    pub injected: &'a [Injected],
    pub skipped: &'a [Skipped],
    pub verdict: Verdict,
    pub notes: Vec<String>,
    pub active_users: usize,
    pub flood: Flood,
    pub slow_clients: SlowClients,
    pub peak_rss_kb: std::collections::BTreeMap<u32, u64>,
    pub payouts_waiting: std::collections::BTreeMap<u64, u64>,
    pub alerts: crate::alerts::Alerts,
    pub migration: Option<crate::migration::Observed>,
    pub uploads: Option<crate::uploads::Observed>,
    pub restore: Option<crate::restore::Observed>,
    /// What `promote-standby` saw, and the writes' recovery time after it.
    pub failover: Option<(crate::failover::Observed, Option<u64>)>,
    /// What `fail-replica` saw.
    pub replica_lost: Option<crate::failover::ReplicaLost>,
}

/// The `promote-standby` fault's figures.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Failover {
    /// `pg_ctl promote`.
    pub promote_s: f64,
    /// The flip → the first order acknowledged that was asked for after it (goal ≤ 5 s);
    /// absent when none was.
    pub writes_back_s: Option<f64>,
    /// What may be lost (asynchronous replication) and still pass.
    pub loss_window_ms: u64,
    /// The acknowledged orders the promoted standby did not have, by id (those outside the
    /// window are also `orders_lost` violations).
    pub orders_lost: Vec<crate::checker::LostToRestore>,
}

fn failover(i: &Inputs) -> Option<Failover> {
    let (seen, back) = i.failover.as_ref()?;
    Some(Failover {
        promote_s: seen.promote_ms as f64 / 1000.0,
        writes_back_s: back.map(|ms| ms as f64 / 1000.0),
        loss_window_ms: crate::failover::LOSS_WINDOW_MS,
        orders_lost: i.verdict.lost_to_restore.clone(),
    })
}

/// The `lose-primary` fault's figures.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Restore {
    /// Loss → the first 2xx the restored node served through the same address.
    pub rto_s: f64,
    /// `holdfast restore` alone (restore, integrity check, reconciliation).
    pub restore_s: f64,
    /// The oldest acknowledged order the restore lost, inside the window or not: how far back
    /// the loss reached (0 when none was lost).
    pub rpo_ms: u64,
    /// What may be lost and still pass.
    pub loss_window_ms: u64,
    pub integrity_ok: bool,
    /// The acknowledged orders the restore lost, by id (those outside the window are also
    /// `orders_lost` violations).
    pub orders_lost: Vec<crate::checker::LostToRestore>,
    /// `holdfast restore`'s line: the transaction restored, the integrity check, and what the
    /// reconciliation refunded.
    pub said: String,
}

fn restore(i: &Inputs) -> Option<Restore> {
    let seen = i.restore.as_ref()?;
    let rpo_ms = i
        .verdict
        .lost_to_restore
        .iter()
        .map(|l| l.before_loss_ms)
        .max()
        .unwrap_or(0);
    Some(Restore {
        rto_s: seen.rto_ms as f64 / 1000.0,
        restore_s: seen.restore_ms as f64 / 1000.0,
        rpo_ms,
        loss_window_ms: crate::restore::LOSS_WINDOW_MS,
        integrity_ok: seen.integrity_ok,
        orders_lost: i.verdict.lost_to_restore.clone(),
        said: seen.restore_said.clone(),
    })
}

/// One line per acknowledged order a loss took (`before`: what it was taken before).
fn lost_lines(s: &mut String, lost: &[crate::checker::LostToRestore], before: &str) {
    use std::fmt::Write;
    for l in lost {
        let _ = writeln!(
            s,
            "    lost  order {} of {} (key {}), acknowledged {} ms before {before}{}",
            l.order_id,
            l.account,
            l.key,
            l.before_loss_ms,
            if l.excused {
                ""
            } else {
                ": OUTSIDE THE WINDOW"
            }
        );
    }
}

/// Whether the sample completed inside one of the applied faults that `which` selects.
fn during(s: &Sample, injected: &[Injected], which: impl Fn(&Injected) -> bool) -> bool {
    injected.iter().filter(|f| f.applied && which(f)).any(|f| {
        let from = (f.at_s * 1000.0) as u64;
        let to = ((f.at_s + f.hold_s) * 1000.0) as u64;
        (from..=to).contains(&s.t_ms)
    })
}

fn recovery(samples: &[Sample], injected: &[Injected]) -> Vec<Recovery> {
    let applied: Vec<&Injected> = injected.iter().filter(|f| f.applied).collect();
    let quiet = |s: &&Sample| {
        s.t_ms >= WARMUP_MS
            && !applied.iter().any(|f| {
                let from = (f.at_s * 1000.0) as u64;
                let to = ((f.at_s + f.hold_s) * 1000.0) as u64 + RECOVERY_TAIL_MS;
                (from..=to).contains(&s.t_ms)
            })
    };
    let mut baseline: Vec<u64> = samples.iter().filter(quiet).map(|s| s.latency_us).collect();
    if baseline.is_empty() {
        baseline = samples.iter().map(|s| s.latency_us).collect();
    }
    baseline.sort_unstable();
    // Twice the p99 while no fault was in force, and never stricter than 50 ms.
    let healthy_p99 = (percentile(&baseline, 0.99) * 2).max(50_000);
    let seconds = by_second(samples);
    applied
        .iter()
        .map(|f| {
            let end_ms = ((f.at_s + f.hold_s) * 1000.0) as u64;
            let recovered = seconds.range(end_ms / 1000..).find(|(_, ss)| {
                let mut us: Vec<u64> = ss.iter().map(|s| s.latency_us).collect();
                us.sort_unstable();
                !ss.is_empty()
                    && ss
                        .iter()
                        .all(|s| s.class != Class::ServerError && s.class != Class::NoAnswer)
                    && percentile(&us, 0.99) <= healthy_p99
            });
            Recovery {
                kind: f.kind,
                at_s: f.at_s,
                recovered_after_s: recovered
                    .map(|(t, _)| ((t + 1) * 1000).saturating_sub(end_ms) as f64 / 1000.0),
            }
        })
        .collect()
}

fn migration(i: &Inputs<'_>) -> Option<Migration> {
    let seen = i.migration.clone()?;
    let run = i
        .injected
        .iter()
        .find(|f| f.applied && f.kind == crate::FaultKind::Migrate)?;
    let (from, to) = (
        (run.at_s * 1000.0) as u64,
        ((run.at_s + run.hold_s) * 1000.0) as u64,
    );
    let before_from = from.saturating_sub(to - from).max(WARMUP_MS);
    let p99 = |range: std::ops::Range<u64>| {
        let mut us: Vec<u64> = i
            .samples
            .iter()
            .filter(|s| range.contains(&s.t_ms))
            .map(|s| s.latency_us)
            .collect();
        us.sort_unstable();
        percentile(&us, 0.99) as f64 / 1000.0
    };
    let during: Vec<&Sample> = i
        .samples
        .iter()
        .filter(|s| (from..=to).contains(&s.t_ms))
        .collect();
    let server_errors = during.iter().filter(|s| s.status >= 500).count() as u64;
    let (before, while_) = (p99(before_from..from), p99(from..to + 1));
    let change = if before > 0.0 {
        100.0 * (while_ - before) / before
    } else {
        0.0
    };
    let rollback = seen.phases.iter().filter_map(|p| p.rollback_ms).max();
    let stage = |[a, b]: [f64; 2]| {
        let ms = |x: f64| from + (x * 1000.0) as u64;
        (p99(ms(a)..ms(b) + 1) * 10.0).round() / 10.0
    };
    let mut p99_by_stage_ms: Vec<(String, f64)> = seen
        .phases
        .iter()
        .map(|p| (p.phase.to_owned(), stage(p.span_s)))
        .collect();
    p99_by_stage_ms.insert(1, ("roll".to_owned(), stage(seen.roll_span_s)));
    let round = |x: f64| (x * 10.0).round() / 10.0;
    let goals = vec![
        Goal {
            what: "5xx caused",
            goal: "0",
            value: server_errors.to_string(),
            met: Some(server_errors == 0),
        },
        Goal {
            what: "p99 during vs before",
            goal: "under +20%",
            value: format!("{:+.1}% ({before:.1} ms -> {while_:.1} ms)", change),
            met: Some(change < 20.0),
        },
        Goal {
            what: "longest lock wait",
            goal: "under 1 s",
            value: match seen.longest_lock_wait_ms {
                Some(ms) => format!("{ms:.0} ms"),
                None => "not sampled (SQLite has no pg_stat_activity)".into(),
            },
            met: seen.longest_lock_wait_ms.map(|ms| ms < 1000.0),
        },
        Goal {
            what: "slowest rollback of a phase",
            goal: "at most 5 s",
            value: format!("{} ms", rollback.unwrap_or(0)),
            met: rollback.map(|ms| ms <= 5000),
        },
    ];
    Some(Migration {
        seen,
        window_s: [round(run.at_s), round(run.at_s + run.hold_s)],
        requests: during.len() as u64,
        server_errors,
        transport_errors: during.iter().filter(|s| s.class == Class::NoAnswer).count() as u64,
        p99_before_ms: round(before),
        p99_during_ms: round(while_),
        p99_change_pct: round(change),
        p99_by_stage_ms,
        goals,
    })
}

fn abuse(i: &Inputs<'_>) -> Option<Abuse> {
    if !i.injected.iter().any(|f| f.applied && f.kind.is_abuse()) {
        return None;
    }
    let honest: Vec<&Sample> = i
        .samples
        .iter()
        .filter(|s| during(s, i.injected, |f| f.kind.is_abuse()))
        .collect();
    let n = |p: &dyn Fn(&Sample) -> bool| honest.iter().filter(|s| p(s)).count() as u64;
    let busy_503 = n(&|s| s.status == 503);
    let server_errors_other = n(&|s| s.status >= 500 && s.status != 503);
    let no_answer = n(&|s| s.class == Class::NoAnswer);
    let frozen: Vec<u64> = i
        .samples
        .iter()
        .filter(|s| {
            during(s, i.injected, |f| {
                f.kind == crate::FaultKind::FreezeInstance
            })
        })
        .map(|s| s.latency_us)
        .collect();
    Some(Abuse {
        login_flood: i.flood.clone(),
        slow_clients: i.slow_clients.clone(),
        honest: Honest {
            requests: honest.len() as u64,
            latency_ms: Latency::of(honest.iter().map(|s| s.latency_us).collect()),
            checkout_latency_ms: Latency::of(
                honest
                    .iter()
                    .filter(|s| s.checkout)
                    .map(|s| s.latency_us)
                    .collect(),
            ),
            busy_503,
            server_errors_other,
            no_answer,
            error_rate_pct: 100.0 * (busy_503 + server_errors_other + no_answer) as f64
                / honest.len().max(1) as f64,
        },
        frozen_requests: frozen.len() as u64,
        frozen_over_1s: frozen.iter().filter(|&&us| us > 1_000_000).count() as u64,
        frozen_max_ms: frozen.iter().copied().max().unwrap_or(0) as f64 / 1000.0,
    })
}

pub(crate) fn build(i: Inputs<'_>) -> Report {
    let count = |class: Class| i.samples.iter().filter(|s| s.class == class).count() as u64;
    let under_fault = |s: &Sample| {
        i.injected.iter().filter(|f| f.applied).any(|f| {
            let from = (f.at_s * 1000.0) as u64;
            let to = ((f.at_s + f.hold_s) * 1000.0) as u64 + RECOVERY_TAIL_MS;
            (from..=to).contains(&s.t_ms)
        })
    };
    let faulted: Vec<u64> = i
        .samples
        .iter()
        .filter(|s| under_fault(s))
        .map(|s| s.latency_us)
        .collect();
    // Every second of the load, the quiet ones too: a stall shows as a gap, not a slope.
    let mut seconds = by_second(i.samples);
    let last = seconds.keys().next_back().copied().unwrap_or(0);
    for t in 0..=last {
        seconds.entry(t).or_default();
    }
    let timeline = seconds
        .into_iter()
        .map(|(t_s, ss)| {
            let n = |class: Class| ss.iter().filter(|s| s.class == class).count() as u64;
            let mut us: Vec<u64> = ss.iter().map(|s| s.latency_us).collect();
            us.sort_unstable();
            Second {
                t_s,
                requests: ss.len() as u64,
                ok: n(Class::Ok),
                client_errors: n(Class::ClientError),
                server_errors: n(Class::ServerError),
                transport_errors: n(Class::NoAnswer),
                p50_ms: percentile(&us, 0.5) as f64 / 1000.0,
                p99_ms: percentile(&us, 0.99) as f64 / 1000.0,
                payouts_waiting: i.payouts_waiting.get(&t_s).copied(),
            }
        })
        .collect();
    let mut violations = Vec::new();
    for v in &i.verdict.violations {
        let shown = violations
            .iter()
            .filter(|x: &&Violation| x.invariant == v.invariant)
            .count();
        if shown < EXAMPLES_PER_INVARIANT {
            violations.push(v.clone());
        }
    }
    let requests_total = i.samples.len() as u64;
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    Report {
        verdict: if i.verdict.passed() { "pass" } else { "fail" },
        violated: i.verdict.counts.violated(),
        seed: i.opts.seed,
        backend: i.opts.backend.name(),
        sabotage: i.opts.sabotage.map(|s| s.name()),
        sessions: i.opts.sessions.name(),
        active_users: i.active_users,
        forced_relogins_pct: round(
            100.0 * i.verdict.counts.forced_relogins as f64 / i.verdict.counts.logins.max(1) as f64,
        ),
        redis_restarts: i
            .injected
            .iter()
            .filter(|f| f.applied && f.kind == crate::FaultKind::RestartRedis)
            .count(),
        duration_s: i.opts.duration.as_secs_f64(),
        load_s: round(i.load_s),
        setup_s: round(i.setup.as_secs_f64()),
        settle_s: round(i.settle.as_secs_f64()),
        users: i.opts.users,
        instances: i.opts.instances,
        workers: i.opts.workers,
        requests_total,
        requests_per_s: round(requests_total as f64 / i.load_s.max(0.001)),
        client_errors: count(Class::ClientError),
        server_errors: count(Class::ServerError),
        transport_errors: count(Class::NoAnswer),
        latency_ms: Latency::of(
            i.samples
                .iter()
                .filter(|s| s.t_ms >= WARMUP_MS)
                .map(|s| s.latency_us)
                .collect(),
        ),
        warmup_s: WARMUP_MS as f64 / 1000.0,
        max_payouts_waiting: i.payouts_waiting.values().copied().max(),
        recovery: recovery(i.samples, i.injected),
        requests_under_faults: faulted.len() as u64,
        latency_under_faults_ms: Latency::of(faulted),
        checkout_latency_ms: Latency::of(
            i.samples
                .iter()
                .filter(|s| s.checkout)
                .map(|s| s.latency_us)
                .collect(),
        ),
        peak_rss: i
            .peak_rss_kb
            .iter()
            .map(|(&pid, &kb)| PeakRss {
                pid,
                mb: round(kb as f64 / 1024.0),
            })
            .collect(),
        max_peak_rss_mb: round(i.peak_rss_kb.values().copied().max().unwrap_or(0) as f64 / 1024.0),
        abuse: abuse(&i),
        migration: migration(&i),
        uploads: i.uploads.clone(),
        restore: restore(&i),
        failover: failover(&i),
        replica_lost: i.replica_lost.clone(),
        errors_by_op: {
            let mut by: std::collections::BTreeMap<
                String,
                std::collections::BTreeMap<String, u64>,
            > = Default::default();
            for s in i.samples.iter().filter(|s| s.class != Class::Ok) {
                let status = if s.status == 0 {
                    "none".to_owned()
                } else {
                    s.status.to_string()
                };
                *by.entry(s.op.to_owned())
                    .or_default()
                    .entry(status)
                    .or_default() += 1;
            }
            by
        },
        faults: i.injected.to_vec(),
        faults_skipped: i.skipped.to_vec(),
        alerts: i.alerts,
        counts: i.verdict.counts.clone(),
        violations,
        notes: i.notes,
        timeline,
    }
}

impl Report {
    pub fn passed(&self) -> bool {
        self.verdict == "pass"
    }

    /// The report as JSON; its top level always has [`STABLE_KEYS`].
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report serializes")
    }

    /// The end-of-run summary for the terminal.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let sabotage = self
            .sabotage
            .map(|k| format!(", SABOTAGE {k}"))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "holdfast drill: {}, sessions {}, {} s, {} users, {} instances, {} workers, seed {}{sabotage}",
            self.backend,
            self.sessions,
            self.duration_s,
            self.users,
            self.instances,
            self.workers,
            self.seed
        );
        let _ = writeln!(
            s,
            "  sessions      {} active users   {} logins   forced re-logins {} ({:.3}%)   redis restarts {}",
            self.active_users,
            self.counts.logins,
            self.counts.forced_relogins,
            self.forced_relogins_pct,
            self.redis_restarts
        );
        let l = &self.latency_ms;
        let f = &self.latency_under_faults_ms;
        let _ = writeln!(
            s,
            "  requests      {} ({:.1}/s)   4xx {}   5xx {}   no answer {}",
            self.requests_total,
            self.requests_per_s,
            self.client_errors,
            self.server_errors,
            self.transport_errors
        );
        let _ = writeln!(
            s,
            "  latency ms    p50 {:.1}   p95 {:.1}   p99 {:.1}   max {:.1}",
            l.p50, l.p95, l.p99, l.max
        );
        let _ = writeln!(
            s,
            "  under faults  p50 {:.1}   p95 {:.1}   p99 {:.1}   max {:.1}   ({} requests)",
            f.p50, f.p95, f.p99, f.max, self.requests_under_faults
        );
        if !self.errors_by_op.is_empty() {
            let parts: Vec<String> = self
                .errors_by_op
                .iter()
                .flat_map(|(op, by)| by.iter().map(move |(st, n)| format!("{op} {st}×{n}")))
                .collect();
            let _ = writeln!(s, "  errors        {}", parts.join(", "));
        }
        if let Some(max) = self.max_payouts_waiting {
            let _ = writeln!(
                s,
                "  payouts       at most {max} waiting at once (the fleet's queue, each second)"
            );
        }
        let c = &self.checkout_latency_ms;
        let _ = writeln!(
            s,
            "  checkout ms   p50 {:.1}   p95 {:.1}   p99 {:.1}   max {:.1}",
            c.p50, c.p95, c.p99, c.max
        );
        let peaks: Vec<String> = self
            .peak_rss
            .iter()
            .map(|p| format!("{} {:.1}", p.pid, p.mb))
            .collect();
        let _ = writeln!(
            s,
            "  peak RSS MB   max {:.1}   per web pid: {}",
            self.max_peak_rss_mb,
            peaks.join(", ")
        );
        if let Some(a) = &self.abuse {
            let h = &a.honest;
            let _ = writeln!(
                s,
                "  under abuse   honest requests {}   p99 {:.1} ms   checkout p99 {:.1} ms   503 {}   other 5xx {}   no answer {}   error rate {:.2}%",
                h.requests, h.latency_ms.p99, h.checkout_latency_ms.p99, h.busy_503, h.server_errors_other, h.no_answer, h.error_rate_pct
            );
            let f = &a.login_flood;
            let _ = writeln!(
                s,
                "  login flood   {} attempts   429 {}   503 {}   401 {}   other {}   no answer {}",
                f.attempts, f.rate_limited_429, f.busy_503, f.denied_401, f.other, f.no_answer
            );
            let sc = &a.slow_clients;
            let _ = writeln!(
                s,
                "  slow clients  {} connections   408 {}   503 {}   closed {}   held {}   probe GETs {} (max {:.0} ms, {} over 1 s, {} failed)",
                sc.connections, sc.timed_out_408, sc.refused_503, sc.closed, sc.held_to_the_end, sc.probe_gets, sc.probe_max_ms, sc.probe_over_1s, sc.probe_failed
            );
            let _ = writeln!(
                s,
                "  frozen        {} honest requests while an instance was frozen   max {:.0} ms   {} over 1 s",
                a.frozen_requests, a.frozen_max_ms, a.frozen_over_1s
            );
        }
        if let Some(u) = &self.uploads {
            let _ = writeln!(
                s,
                "  uploads       {} ({} complete, {} MiB)   {} instances killed mid-PATCH   {} resumes   at most {} KiB sent again (chunk {} KiB)",
                u.uploads.len(),
                u.completed(),
                u.uploads.iter().filter(|r| r.completed).map(|r| r.length).sum::<u64>() >> 20,
                u.kills_mid_patch,
                u.resumes(),
                u.max_resent() / 1024,
                u.chunk_bytes / 1024
            );
        }
        if let Some(r) = &self.restore {
            let _ = writeln!(
                s,
                "  restore       RTO {:.1} s (restore {:.1} s)   RPO {} ms (window {} ms)   integrity {}   {} acknowledged orders lost",
                r.rto_s,
                r.restore_s,
                r.rpo_ms,
                r.loss_window_ms,
                if r.integrity_ok { "ok" } else { "NOT CHECKED" },
                r.orders_lost.len()
            );
            lost_lines(&mut s, &r.orders_lost, "the loss");
            let _ = writeln!(s, "    {}", r.said);
        }
        if let Some(f) = &self.failover {
            let _ = writeln!(
                s,
                "  failover      standby promoted in {:.2} s   writes back after {}   {} acknowledged orders lost (window {} ms)",
                f.promote_s,
                f.writes_back_s
                    .map_or("NEVER".to_owned(), |b| format!("{b:.1} s")),
                f.orders_lost.len(),
                f.loss_window_ms
            );
            lost_lines(&mut s, &f.orders_lost, "the flip");
        }
        if let Some(r) = &self.replica_lost {
            let _ = writeln!(
                s,
                "  replica lost  {} reads served by the standby before; in the {} s after, {} on the primary, {} on the standby; stale self-reads {}",
                r.replica_reads_before,
                crate::failover::REPLICA_LOST_WATCH.as_secs(),
                r.primary_reads_after,
                r.replica_reads_after,
                self.counts.orders_missing_on_read
            );
        }
        if let Some(m) = &self.migration {
            let _ = writeln!(
                s,
                "  migration     {:.1}–{:.1} s   {} requests   5xx {}   no answer {}   {} web instances rolled",
                m.window_s[0], m.window_s[1], m.requests, m.server_errors, m.transport_errors, m.seen.rolled
            );
            for p in &m.seen.phases {
                let _ = writeln!(
                    s,
                    "    {:<14} up {:>5} ms   rollback {}   lock waits turned away {}",
                    p.phase,
                    p.up_ms,
                    p.rollback_ms
                        .map_or("—".to_owned(), |ms| format!("{ms:>5} ms")),
                    p.lock_retries
                );
            }
            let stages: Vec<String> = m
                .p99_by_stage_ms
                .iter()
                .map(|(stage, ms)| format!("{stage} {ms:.0}"))
                .collect();
            let _ = writeln!(s, "    p99 ms by stage   {}", stages.join("   "));
            for g in &m.goals {
                let verdict = match g.met {
                    Some(true) => "met",
                    Some(false) => "MISSED",
                    None => "n/a",
                };
                let _ = writeln!(
                    s,
                    "    goal {:<28} {:<12} {:<40} {verdict}",
                    g.what, g.goal, g.value
                );
            }
        }
        let _ = writeln!(
            s,
            "  phases        setup {:.1} s   load {:.1} s   settle {:.1} s",
            self.setup_s, self.load_s, self.settle_s
        );
        let applied = self.faults.iter().filter(|f| f.applied).count();
        let _ = writeln!(s, "  faults        {applied} injected");
        for fault in &self.faults {
            let detail = if fault.applied {
                let hold = if fault.hold_s > 0.0 {
                    format!(" for {:.1} s", fault.hold_s)
                } else {
                    String::new()
                };
                let healthy = self
                    .recovery
                    .iter()
                    .find(|r| r.kind == fault.kind && r.at_s == fault.at_s)
                    .map(|r| match r.recovered_after_s {
                        Some(after) => format!("; healthy {after:.1} s after"),
                        None => "; not healthy again within the run".to_owned(),
                    })
                    .unwrap_or_default();
                format!("{}{hold}{healthy}", fault.target)
            } else {
                format!("not injected: {}", fault.note)
            };
            let _ = writeln!(
                s,
                "    t={:>6.1}s  {:<18} {detail}",
                fault.at_s,
                fault.kind.name()
            );
        }
        for k in &self.faults_skipped {
            let _ = writeln!(s, "    skipped    {:<18} {}", k.kind.name(), k.reason);
        }
        let a = &self.alerts;
        let _ = writeln!(
            s,
            "  alerts        {} (the shipped rules, every duration ÷{})",
            a.status, a.time_compression
        );
        for e in &a.expected {
            let outcome = match e.fired_after_s {
                Some(after) => format!("fired {after:.1} s after"),
                None => "NOT RAISED".to_owned(),
            };
            let _ = writeln!(
                s,
                "    t={:>6.1}s  {:<18} {:<28} {outcome}",
                e.at_s, e.fault, e.alert
            );
        }
        for f in a.fired.iter().filter(|f| f.unexplained) {
            let _ = writeln!(
                s,
                "    also fired {:<28} {:.1}–{:.1} s (no fault expects it)",
                f.alert, f.first_s, f.last_s
            );
        }
        let _ = writeln!(s, "  {:<26}{:>8}", "invariant", "count");
        let _ = writeln!(
            s,
            "    {:<24}{:>8}",
            "orders_acknowledged", self.counts.orders_acknowledged
        );
        for (name, n) in self.counts.violations() {
            let mark = if n == 0 { "ok" } else { "VIOLATED" };
            let _ = writeln!(s, "    {name:<24}{n:>8}  {mark}");
        }
        for v in &self.violations {
            let _ = writeln!(s, "  ! {}: {}", v.invariant, v.detail);
        }
        for n in &self.notes {
            let _ = writeln!(s, "  note: {n}");
        }
        let verdict = if self.passed() {
            "PASS: every invariant held".to_owned()
        } else {
            format!("FAIL: violated {}", self.violated.join(", "))
        };
        let _ = writeln!(s, "verdict: {verdict}");
        s
    }

    /// One self-contained page: summary, charts with faults on the time axis, details.
    pub fn to_html(&self) -> String {
        let mut h = String::new();
        let title = format!(
            "holdfast drill: {} ({}, seed {})",
            self.verdict.to_uppercase(),
            self.backend,
            self.seed
        );
        let _ = write!(
            h,
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\
             <style>{CSS}</style></head><body>\n<h1>holdfast drill <span class=\"{}\">{}</span></h1>\n",
            esc(&title),
            self.verdict,
            self.verdict.to_uppercase()
        );
        let sabotage = self
            .sabotage
            .map(|k| format!(", <b>sabotage {}</b>", esc(k)))
            .unwrap_or_default();
        let _ = writeln!(
            h,
            "<p>{} · {} s · {} users · {} instances · {} workers · seed {}{sabotage}</p>",
            esc(self.backend),
            self.duration_s,
            self.users,
            self.instances,
            self.workers,
            self.seed
        );
        let l = &self.latency_ms;
        let f = &self.latency_under_faults_ms;
        let _ = writeln!(
            h,
            "<table class=\"kv\"><tr><th>requests</th><td>{} ({:.1}/s)</td></tr>\
             <tr><th>errors</th><td>4xx {} · 5xx {} · no answer {}</td></tr>\
             <tr><th>latency (ms)</th><td>p50 {:.1} · p95 {:.1} · p99 {:.1} · max {:.1}</td></tr>\
             <tr><th>under faults (ms)</th><td>p50 {:.1} · p95 {:.1} · p99 {:.1} · max {:.1}</td></tr>\
             <tr><th>orders acknowledged</th><td>{}</td></tr></table>",
            self.requests_total,
            self.requests_per_s,
            self.client_errors,
            self.server_errors,
            self.transport_errors,
            l.p50,
            l.p95,
            l.p99,
            l.max,
            f.p50,
            f.p95,
            f.p99,
            f.max,
            self.counts.orders_acknowledged
        );
        let t = |s: &Second| s.t_s as f64 + 0.5;
        let throughput = [
            Series {
                label: "2xx/s",
                color: "#2a7",
                points: self.timeline.iter().map(|s| (t(s), s.ok as f64)).collect(),
            },
            Series {
                label: "errors/s (4xx, 5xx, no answer)",
                color: "#d33",
                points: self
                    .timeline
                    .iter()
                    .map(|s| (t(s), (s.requests - s.ok) as f64))
                    .collect(),
            },
        ];
        // A second in which nothing completed has no latency: the line breaks there.
        let answered = || self.timeline.iter().filter(|s| s.requests > 0);
        let latency = [
            Series {
                label: "p50 ms",
                color: "#37c",
                points: answered().map(|s| (t(s), s.p50_ms)).collect(),
            },
            Series {
                label: "p99 ms",
                color: "#a3c",
                points: answered().map(|s| (t(s), s.p99_ms)).collect(),
            },
        ];
        let span = self
            .load_s
            .max(self.duration_s)
            .max(self.timeline.last().map_or(0.0, |s| s.t_s as f64 + 1.0));
        h.push_str("<h2>Throughput (requests per second)</h2>\n");
        h.push_str(&chart(&throughput, Scale::Linear, span, &self.faults));
        h.push_str("<h2>Latency per second (ms, log scale)</h2>\n");
        h.push_str(&chart(&latency, Scale::Log, span, &self.faults));

        h.push_str("<h2>Invariants (docs/INVARIANTS.md)</h2>\n<table><tr><th>check</th><th>count</th><th></th></tr>\n");
        for (name, n) in self.counts.violations() {
            let (class, mark) = if n == 0 {
                ("pass", "ok")
            } else {
                ("fail", "violated")
            };
            let _ = writeln!(
                h,
                "<tr><td>{name}</td><td class=\"num\">{n}</td><td class=\"{class}\">{mark}</td></tr>"
            );
        }
        h.push_str("</table>\n");
        if !self.violations.is_empty() {
            h.push_str("<h2>Violations (examples)</h2>\n<ul>\n");
            for v in &self.violations {
                let _ = writeln!(h, "<li><b>{}</b>: {}</li>", v.invariant, esc(&v.detail));
            }
            h.push_str("</ul>\n");
        }
        h.push_str("<h2>Faults</h2>\n<table><tr><th>t (s)</th><th>kind</th><th>target</th><th>held (s)</th></tr>\n");
        for fault in &self.faults {
            let target = if fault.applied {
                esc(&fault.target)
            } else {
                format!("<i>not injected: {}</i>", esc(&fault.note))
            };
            let _ = writeln!(
                h,
                "<tr><td class=\"num\">{:.1}</td><td>{}</td><td>{target}</td><td class=\"num\">{:.1}</td></tr>",
                fault.at_s,
                fault.kind.name(),
                fault.hold_s
            );
        }
        for k in &self.faults_skipped {
            let _ = writeln!(
                h,
                "<tr><td></td><td>{}</td><td><i>skipped: {}</i></td><td></td></tr>",
                k.kind.name(),
                esc(&k.reason)
            );
        }
        h.push_str("</table>\n");
        if !self.notes.is_empty() {
            h.push_str("<h2>Notes</h2>\n<ul>\n");
            for n in &self.notes {
                let _ = writeln!(h, "<li>{}</li>", esc(n));
            }
            h.push_str("</ul>\n");
        }
        h.push_str("</body></html>\n");
        h
    }
}

const CSS: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1040px}\
h1{font-size:22px}h2{font-size:16px;margin-top:28px}\
span.pass,td.pass{color:#fff;background:#2a7;padding:0 6px;border-radius:3px}\
span.fail,td.fail{color:#fff;background:#d33;padding:0 6px;border-radius:3px}\
table{border-collapse:collapse}td,th{padding:2px 10px;border-bottom:1px solid #eee;text-align:left}th,td:nth-child(2){white-space:nowrap}\
td.num{text-align:right;font-variant-numeric:tabular-nums}\
svg{background:#fcfcfc;border:1px solid #ddd}\
.legend{font-size:12px;margin:4px 0}.legend span{display:inline-block;width:14px;height:4px;margin:0 4px 3px 10px}svg text{font:11px system-ui,sans-serif;fill:#444}";

struct Series {
    label: &'static str,
    color: &'static str,
    points: Vec<(f64, f64)>,
}

#[derive(Clone, Copy, PartialEq)]
enum Scale {
    Linear,
    Log,
}

const W: f64 = 1000.0;
const H: f64 = 260.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 30.0;

/// An SVG line chart over `0..span` seconds, faults drawn as bands (pauses, cuts, slow links,
/// provider timeouts) or lines (kills, drains, restarts), each labelled with its kind.
fn chart(series: &[Series], scale: Scale, span: f64, faults: &[Injected]) -> String {
    let span = span.max(1.0);
    let max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0_f64, f64::max);
    let (lo, hi) = match scale {
        Scale::Linear => (0.0, nice_ceiling(max.max(1.0))),
        Scale::Log => (-1.0, max.max(1.0).log10().ceil().max(1.0)),
    };
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let x = |t: f64| LEFT + t / span * plot_w;
    let y = |v: f64| {
        let v = match scale {
            Scale::Linear => v,
            Scale::Log => v.max(0.1).log10(),
        };
        TOP + plot_h - (v - lo) / (hi - lo) * plot_h
    };
    let mut s = String::from("<div class=\"legend\">");
    for se in series {
        let _ = write!(
            s,
            "<span style=\"background:{}\"></span>{} ",
            se.color,
            esc(se.label)
        );
    }
    s.push_str("<span style=\"background:#f90;opacity:.5\"></span>fault in force</div>\n");
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\">"
    );
    // Y grid and ticks.
    let ticks: Vec<f64> = match scale {
        Scale::Linear => (0..=4).map(|i| hi * i as f64 / 4.0).collect(),
        Scale::Log => (lo as i32..=hi as i32).map(|e| 10f64.powi(e)).collect(),
    };
    for v in ticks {
        let yy = y(v);
        let _ = writeln!(
            s,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#e4e4e4\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 6.0,
            yy + 4.0,
            short(v)
        );
    }
    // X ticks every 5 or 10 seconds.
    let step = if span > 120.0 {
        30.0
    } else if span > 40.0 {
        10.0
    } else {
        5.0
    };
    let mut t = 0.0;
    while t <= span + 0.001 {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{t}s</text>",
            x(t),
            H - 10.0
        );
        t += step;
    }
    // Faults behind the data.
    for (n, f) in faults.iter().filter(|f| f.applied).enumerate() {
        let (x0, x1) = (x(f.at_s), x(f.at_s + f.hold_s));
        let label_y = 12.0 + (n % 3) as f64 * 10.0;
        let _ = writeln!(
            s,
            "<g><title>{} at {:.1} s: {}</title>\
             <rect x=\"{x0:.1}\" y=\"{TOP}\" width=\"{:.1}\" height=\"{plot_h}\" fill=\"#f90\" fill-opacity=\"0.18\"/>\
             <line x1=\"{x0:.1}\" x2=\"{x0:.1}\" y1=\"{:.1}\" y2=\"{}\" stroke=\"#e70\" stroke-width=\"1.5\"/>\
             <text x=\"{:.1}\" y=\"{label_y}\" style=\"fill:#c50\">{}</text></g>",
            f.kind.name(),
            f.at_s,
            esc(&f.target),
            (x1 - x0).max(0.0),
            label_y + 2.0,
            TOP + plot_h,
            x0 + 2.0,
            f.kind.name()
        );
    }
    for se in series {
        // One polyline per run of consecutive seconds.
        let mut runs: Vec<Vec<String>> = Vec::new();
        let mut prev: Option<f64> = None;
        for &(t, v) in &se.points {
            if prev.is_none_or(|p| t - p > 1.5) {
                runs.push(Vec::new());
            }
            prev = Some(t);
            if let Some(run) = runs.last_mut() {
                run.push(format!("{:.1},{:.1}", x(t), y(v)));
            }
        }
        for run in runs {
            let _ = writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.8\" points=\"{}\"/>",
                se.color,
                run.join(" ")
            );
        }
    }
    let _ = writeln!(
        s,
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" stroke=\"#bbb\"/></svg>"
    );
    s
}

/// 1, 2 or 5 times a power of ten, at least `v`.
fn nice_ceiling(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|&c| c >= v)
        .unwrap_or(10.0 * p)
}

fn short(v: f64) -> String {
    if v >= 1000.0 {
        format!("{}k", v / 1000.0)
    } else if v >= 1.0 || v == 0.0 {
        format!("{v}")
    } else {
        format!("{v:.1}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::FaultKind;

    fn sample(t_ms: u64, ms: u64, class: Class) -> Sample {
        Sample {
            t_ms,
            latency_us: ms * 1000,
            class,
            status: match class {
                Class::Ok => 200,
                Class::ClientError => 400,
                Class::ServerError => 500,
                Class::NoAnswer => 0,
            },
            checkout: false,
            op: "cart_read",
        }
    }

    fn report(verdict: Verdict) -> Report {
        let opts = DrillOptions::new("holdfast".into(), 42);
        let samples = [
            sample(100, 5, Class::Ok),
            sample(900, 7, Class::Ok),
            sample(1500, 900, Class::ServerError),
            sample(2500, 3, Class::ClientError),
            sample(2600, 4000, Class::NoAnswer),
            // Nothing completes in second 3.
            sample(4500, 6, Class::Ok),
        ];
        let injected = [Injected {
            kind: FaultKind::PauseInstance,
            at_s: 1.2,
            target: "web pid 7 <x>".into(),
            hold_s: 0.5,
            applied: true,
            note: String::new(),
        }];
        build(Inputs {
            opts: &opts,
            setup: Duration::from_secs(1),
            load_s: 3.0,
            settle: Duration::from_secs(1),
            samples: &samples,
            injected: &injected,
            skipped: &[],
            verdict,
            notes: vec![],
            active_users: 0,
            flood: Flood::default(),
            slow_clients: SlowClients::default(),
            peak_rss_kb: [(4242, 51_200)].into(),
            payouts_waiting: [(1, 3)].into(),
            alerts: crate::alerts::Alerts::not_checked("not checked: a unit test"),
            migration: None,
            uploads: None,
            restore: None,
            failover: None,
            replica_lost: None,
        })
    }

    /// The migration's goals are judged from the samples in its window: a 5xx inside it, a
    /// slow stretch and a slow rollback each show as missed; what lies outside does not count.
    #[test]
    fn the_migration_goals_see_a_planted_miss() {
        use crate::migration::{Observed, PhaseRun};
        let opts = DrillOptions::new("holdfast".into(), 42);
        let judge = |samples: &[Sample], rollback_ms: u64| {
            let injected = [Injected {
                kind: FaultKind::Migrate,
                at_s: 4.0,
                target: "shop change cart_lines".into(),
                hold_s: 2.0,
                applied: true,
                note: String::new(),
            }];
            let seen = Observed {
                phases: vec![PhaseRun {
                    phase: "expand",
                    span_s: [0.0, 1.0],
                    up_ms: 10,
                    rollback_ms: Some(rollback_ms),
                    lock_retries: 0,
                }],
                rolled: 2,
                roll_span_s: [1.0, 2.0],
                reader_held_s: Some(1.5),
                longest_lock_wait_ms: Some(480.0),
            };
            build(Inputs {
                opts: &opts,
                setup: Duration::from_secs(1),
                load_s: 8.0,
                settle: Duration::from_secs(1),
                samples,
                injected: &injected,
                skipped: &[],
                verdict: Verdict::default(),
                notes: vec![],
                active_users: 0,
                flood: Flood::default(),
                slow_clients: SlowClients::default(),
                peak_rss_kb: [].into(),
                payouts_waiting: [].into(),
                alerts: crate::alerts::Alerts::not_checked("not checked: a unit test"),
                migration: Some(seen),
                uploads: None,
                restore: None,
                failover: None,
                replica_lost: None,
            })
            .migration
            .expect("a migration section")
        };
        let met = |m: &Migration| m.goals.iter().map(|g| g.met).collect::<Vec<_>>();
        let steady: Vec<Sample> = (0..80)
            .map(|i| sample(2000 + i * 100, 10, Class::Ok))
            .collect();
        let clean = judge(&steady, 40);
        assert_eq!(met(&clean), [Some(true); 4], "{:?}", clean.goals);
        assert_eq!(clean.server_errors, 0);

        // A 5xx and a slow answer inside the window; a 5xx before it does not count.
        let mut bad = steady.clone();
        bad.push(sample(4500, 10, Class::ServerError));
        bad.push(sample(5000, 900, Class::Ok));
        bad.push(sample(3000, 10, Class::ServerError));
        let missed = judge(&bad, 6000);
        assert_eq!(missed.server_errors, 1);
        assert_eq!(
            met(&missed),
            [Some(false), Some(false), Some(true), Some(false)],
            "{:?}",
            missed.goals
        );
    }

    #[test]
    fn the_json_has_the_stable_keys() {
        let json: serde_json::Value =
            serde_json::from_str(&report(Verdict::default()).to_json()).unwrap();
        for key in STABLE_KEYS {
            assert!(json.get(key).is_some(), "{key} in {json:#}");
        }
        for q in ["p50", "p95", "p99", "max"] {
            assert!(json["latency_ms"][q].is_number(), "latency_ms.{q}");
        }
        let fault = &json["faults"][0];
        assert_eq!(fault["kind"], "pause-instance");
        assert_eq!(fault["at_s"], 1.2);
        assert_eq!(fault["target"], "web pid 7 <x>");
        assert_eq!(json["seed"], "42");
        assert_eq!(json["errors_by_op"]["cart_read"]["500"], 1, "{json:#}");
        assert_eq!(json["requests_total"], 6);
        assert_eq!(json["client_errors"], 1);
        assert_eq!(json["server_errors"], 1);
        assert_eq!(json["transport_errors"], 1);
        assert_eq!(json["latency_ms"]["max"], 4000.0);
        // Second 1 had a 5xx, second 2 an unanswered attempt, second 3 nothing: second 4 is
        // the first healthy one, 3.3 s after the pause ended at 1.7 s.
        assert_eq!(
            json["recovery"][0]["recovered_after_s"], 3.3,
            "{:#}",
            json["recovery"]
        );
        assert_eq!(json["warmup_s"], 2.0);
        assert_eq!(json["timeline"][1]["payouts_waiting"], 3);
        assert_eq!(
            json["timeline"][0]["payouts_waiting"],
            serde_json::Value::Null
        );
        assert_eq!(json["max_payouts_waiting"], 3);
        // Samples from 1.2 s to 1.7 s + the 2 s tail count as under faults.
        assert_eq!(json["requests_under_faults"], 3);
    }

    #[test]
    fn a_failed_verdict_names_the_violated_invariants() {
        let mut verdict = Verdict::default();
        verdict.counts.orders_acknowledged = 3;
        verdict.counts.orders_lost = 1;
        verdict.violations.push(Violation {
            invariant: "orders_lost",
            detail: "order o1 is gone".into(),
        });
        let r = report(verdict);
        assert_eq!(
            (r.verdict, r.violated.clone()),
            ("fail", vec!["orders_lost"])
        );
        assert!(r.table().contains("FAIL: violated orders_lost"));
        assert!(r.to_html().contains("order o1 is gone"));
    }

    #[test]
    fn the_html_is_self_contained_with_charts_and_faults() {
        let html = report(Verdict::default()).to_html();
        assert_eq!(html.matches("<svg").count(), 2);
        assert!(html.contains("<polyline"));
        assert!(html.contains("pause-instance"));
        assert!(html.contains("web pid 7 &lt;x&gt;"), "escaped");
        for external in ["<script", "http://", "https://", "<link"] {
            let outside_svg_ns = html.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
            assert!(!outside_svg_ns.contains(external), "no {external}");
        }
    }

    #[test]
    fn a_second_without_answers_is_a_gap() {
        let r = report(Verdict::default());
        let seconds: Vec<(u64, u64)> = r.timeline.iter().map(|s| (s.t_s, s.requests)).collect();
        assert_eq!(seconds, [(0, 2), (1, 1), (2, 2), (3, 0), (4, 1)]);
        // Throughput: two unbroken lines; latency: p50 and p99 each broken at second 3.
        assert_eq!(r.to_html().matches("<polyline").count(), 2 + 2 * 2);
    }

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(1.0), 1.0);
        assert_eq!(nice_ceiling(1.5), 2.0);
        assert_eq!(nice_ceiling(370.0), 500.0);
        assert_eq!(nice_ceiling(501.0), 1000.0);
    }
}
