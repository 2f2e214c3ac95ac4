//! The fault schedule: which faults, when, against what, and how each one is undone.
//!
//! A drill must be reproducible to be debuggable, so the schedule is a pure function of the
//! seed, the duration and the fault list, drawn from a small PRNG of our own (SplitMix64, no
//! global random state). What cannot be reproduced is the system's own timing: the *victim* of
//! a kill is chosen by a seeded index into the processes alive at that moment.
//!
//! Faults fall between 10% and 80% of the duration, so the system starts healthy and has the
//! last fifth of the run to show it recovered. Every fault with a duration is undone by the
//! injector itself — SIGCONT after a pause, the proxy re-enabled after a cut, the latency toxic
//! removed, provider faults cleared — and [`Control::clear_faults`] undoes all of them again
//! before the final state is read, whatever happened. Faults of one kind never overlap, so one
//! fault's recovery cannot end another early.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use holdfast_faultproxy::{Toxic, ToxicSpec};
use nix::sys::signal::Signal;
use serde::Serialize;
use serde_json::json;
use tokio::task::JoinSet;

use crate::system::{Control, DB_PROXY};
use crate::users::Clock;
use crate::{Backend, DrillOptions, Sabotage, Sessions};

/// One kind of fault the drill can inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// SIGKILL a web instance.
    KillInstance,
    /// SIGSTOP a web instance for a few seconds, then SIGCONT: a long GC pause.
    PauseInstance,
    /// SIGTERM a web instance: it drains and the supervisor starts another (a rolling restart).
    DrainInstance,
    /// SIGKILL a job worker.
    KillWorker,
    /// `pg_ctl restart -m fast` of the drill's own cluster.
    RestartDb,
    /// 200 ± 50 ms of latency on every database connection, for a few seconds.
    SlowDb,
    /// The database link cut (connections closed, new ones refused) for a few seconds.
    CutDb,
    /// The payment provider acts and then times out on 20% of calls, for a few seconds.
    ProviderTimeouts,
    /// SIGKILL the drill's own (non-persistent) redis-server and start it again on the same
    /// port: every session and cache key in Redis is gone. `--sessions redis` only.
    RestartRedis,
    /// `FLUSHDB` on the drill's Redis: sessions and any Redis cache keys gone, Redis up.
    /// `--sessions redis` only (the in-process caches cannot be flushed from outside).
    FlushCache,
    /// Rotate the cookie signing keys with rolling drains of the web instances, in two
    /// phases: the new key added verify-only, then made current (the old one verify-only).
    /// `--sessions cookie` only.
    RotateKeys,
    /// Abuse: 64 connections from 16 addresses posting wrong passwords as fast as answers
    /// come (see `abuse.rs`).
    LoginFlood,
    /// Abuse: 600 connections that send 2 of a declared 100 body bytes and then nothing.
    SlowClients,
    /// Abuse: a web instance SIGSTOPped for 8–10 s.
    FreezeInstance,
    /// The shop's change `cart_lines`, phase by phase, each rolled back once, with the web
    /// instances rolled from the release before it to this one and (on Postgres) a long reader
    /// on the old table (see `migration.rs`). Not part of `all`: name it.
    Migrate,
    /// Video reviews uploaded with tus through the balancer while the instance taking each
    /// PATCH is SIGKILLed (see `uploads.rs`). Not part of `all`: name it.
    KillMidUpload,
    /// The whole node lost: `up` and everything it runs SIGKILLed, its data directory
    /// destroyed; a fresh node restored from the continuous backup takes over the address
    /// (see `restore.rs`). Not part of `all`: name it.
    LosePrimary,
    /// The database's primary stopped at once under load and its streaming standby promoted;
    /// the instances, given both hosts, must follow (see `failover.rs`). Postgres. Not part of
    /// `all`: name it.
    PromoteStandby,
    /// The database's streaming standby, serving reads, stopped at once under load; reads
    /// must move to the primary without an error and without a stale read of one's own
    /// write (see `failover.rs`). Postgres. Not part of `all`: name it.
    FailReplica,
}

impl FaultKind {
    pub const ALL: [FaultKind; 11] = [
        FaultKind::KillInstance,
        FaultKind::PauseInstance,
        FaultKind::DrainInstance,
        FaultKind::KillWorker,
        FaultKind::RestartDb,
        FaultKind::SlowDb,
        FaultKind::CutDb,
        FaultKind::ProviderTimeouts,
        FaultKind::RestartRedis,
        FaultKind::FlushCache,
        FaultKind::RotateKeys,
    ];

    /// What `--faults abuse` means.
    /// Kinds that run only when named: each is a scenario of its own, not a random fault.
    pub const NAMED_ONLY: [FaultKind; 5] = [
        FaultKind::Migrate,
        FaultKind::KillMidUpload,
        FaultKind::LosePrimary,
        FaultKind::PromoteStandby,
        FaultKind::FailReplica,
    ];

    pub const ABUSE: [FaultKind; 3] = [
        FaultKind::LoginFlood,
        FaultKind::SlowClients,
        FaultKind::FreezeInstance,
    ];

    pub fn is_abuse(self) -> bool {
        Self::ABUSE.contains(&self)
    }

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillInstance => "kill-instance",
            FaultKind::PauseInstance => "pause-instance",
            FaultKind::DrainInstance => "drain-instance",
            FaultKind::KillWorker => "kill-worker",
            FaultKind::RestartDb => "restart-db",
            FaultKind::SlowDb => "slow-db",
            FaultKind::CutDb => "cut-db",
            FaultKind::ProviderTimeouts => "provider-timeouts",
            FaultKind::RestartRedis => "restart-redis",
            FaultKind::FlushCache => "flush-cache",
            FaultKind::RotateKeys => "rotate-keys",
            FaultKind::LoginFlood => "login-flood",
            FaultKind::SlowClients => "slow-clients",
            FaultKind::FreezeInstance => "freeze-instance",
            FaultKind::Migrate => "migrate",
            FaultKind::KillMidUpload => "kill-mid-upload",
            FaultKind::LosePrimary => "lose-primary",
            FaultKind::PromoteStandby => "promote-standby",
            FaultKind::FailReplica => "fail-replica",
        }
    }

    /// Why this fault cannot be injected on `backend`, if it cannot.
    pub fn unsupported_on(self, backend: Backend) -> Option<&'static str> {
        match (self, backend) {
            (FaultKind::PromoteStandby, Backend::Sqlite) => {
                Some("SQLite is a file on the node: it has no standby to promote")
            }
            (FaultKind::FailReplica, Backend::Sqlite) => {
                Some("SQLite is a file on the node: it has no standby to read from")
            }
            (FaultKind::RestartDb | FaultKind::SlowDb | FaultKind::CutDb, Backend::Sqlite) => {
                Some("SQLite is a file in each process, not a server: there is nothing to restart and no link to slow or cut")
            }
            _ => None,
        }
    }

    /// Why this fault cannot be injected in a drill with these options, if it cannot.
    pub fn unsupported(self, opts: &DrillOptions) -> Option<&'static str> {
        match (self, opts.sessions) {
            (FaultKind::RestartRedis, s) if s != Sessions::Redis => {
                Some("no Redis in this drill (it runs its own with --sessions redis)")
            }
            (FaultKind::FlushCache, s) if s != Sessions::Redis => Some(
                "no Redis in this drill (--sessions redis): the in-process caches cannot be \
                 flushed from outside",
            ),
            (FaultKind::RotateKeys, s) if s != Sessions::Cookie => {
                Some("no signing keys to rotate (--sessions cookie only)")
            }
            _ => self.unsupported_on(opts.backend),
        }
    }

    /// How long the fault lasts before it is undone (ms range); 0 for instant ones.
    fn hold_ms(self) -> (u64, u64) {
        match self {
            FaultKind::PauseInstance => (1500, 3000),
            FaultKind::SlowDb => (3000, 5000),
            FaultKind::CutDb => (2000, 3000),
            FaultKind::ProviderTimeouts => (4000, 7000),
            FaultKind::LoginFlood => (10_000, 15_000),
            // Longer than the balancer's 10 s body timeout, so slow clients are cut off.
            FaultKind::SlowClients => (12_000, 15_000),
            FaultKind::FreezeInstance => (8000, 10_000),
            FaultKind::KillInstance
            | FaultKind::DrainInstance
            | FaultKind::KillWorker
            | FaultKind::RestartDb
            | FaultKind::RestartRedis
            | FaultKind::FlushCache
            | FaultKind::RotateKeys
            | FaultKind::Migrate
            | FaultKind::LosePrimary
            | FaultKind::PromoteStandby
            | FaultKind::FailReplica => (0, 0),
            // Most of the load: uploads run and instances die throughout.
            FaultKind::KillMidUpload => (0, 0),
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The faults a drill may inject: `all` (every kind but the abuse ones), `none`, `abuse`
/// (the three abuse kinds), or a comma-separated list of kinds and `abuse`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultSet(pub Vec<FaultKind>);

impl FaultSet {
    pub fn all() -> Self {
        FaultSet(FaultKind::ALL.to_vec())
    }
}

impl FromStr for FaultSet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "all" => return Ok(FaultSet::all()),
            "none" | "" => return Ok(FaultSet(Vec::new())),
            _ => {}
        }
        let mut kinds = Vec::new();
        for name in s.split(',').map(str::trim) {
            let group: &[FaultKind] = match name {
                "abuse" => &FaultKind::ABUSE,
                "all" => &FaultKind::ALL,
                _ => &[],
            };
            if !group.is_empty() {
                for &kind in group {
                    if !kinds.contains(&kind) {
                        kinds.push(kind);
                    }
                }
                continue;
            }
            let kind = FaultKind::ALL
                .into_iter()
                .chain(FaultKind::ABUSE)
                .chain(FaultKind::NAMED_ONLY)
                .find(|k| k.name() == name)
                .ok_or_else(|| {
                    let known: Vec<&str> = FaultKind::ALL
                        .iter()
                        .chain(&FaultKind::ABUSE)
                        .chain(&FaultKind::NAMED_ONLY)
                        .map(|k| k.name())
                        .collect();
                    format!(
                        "unknown fault {name:?}; use all, none, abuse or a list of: {}",
                        known.join(", ")
                    )
                })?;
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        Ok(FaultSet(kinds))
    }
}

/// SplitMix64: tiny, fast, good enough to scatter faults and choices, and ours, so a seed
/// means the same schedule on every machine and every version of every dependency.
#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }

    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    /// An independent stream for `salt` (a user, a fault).
    pub fn fork(&self, salt: u64) -> Rng {
        let mut r = Rng(self.0 ^ salt.wrapping_mul(0xd1b5_4a32_d192_ed03));
        r.next_u64();
        r
    }
}

/// One fault of the schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Planned {
    pub kind: FaultKind,
    /// Since the load started.
    pub at: Duration,
    /// How long before it is undone (0: instant).
    pub hold: Duration,
    /// Chooses the victim among the processes alive at `at`, and seeds provider faults.
    pub pick: u64,
}

/// A fault that could not be injected at all in this drill.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Skipped {
    pub kind: FaultKind,
    pub reason: String,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Schedule {
    pub planned: Vec<Planned>,
    pub skipped: Vec<Skipped>,
    pub notes: Vec<String>,
}

/// How often the sabotage `ack-before-commit` kills an instance: a loss needs a kill between
/// an acknowledgement and its delayed commit, so it must be frequent to show reliably.
const DENSE_KILL_EVERY: Duration = Duration::from_millis(1500);
/// Roughly one fault per this much of the fault window, and at least one of each kind.
const FAULT_SPACING: Duration = Duration::from_secs(4);

/// The schedule for these options, with the faults the backend cannot take set aside.
pub(crate) fn schedule(opts: &DrillOptions, rng: &mut Rng) -> Schedule {
    let mut s = Schedule::default();
    let mut kinds = Vec::new();
    let mut wanted = opts.faults.0.clone();
    if opts.restart_redis_every.is_some() && !wanted.contains(&FaultKind::RestartRedis) {
        wanted.push(FaultKind::RestartRedis);
    }
    for &kind in &wanted {
        match kind.unsupported(opts) {
            Some(reason) => s.skipped.push(Skipped {
                kind,
                reason: reason.into(),
            }),
            None => kinds.push(kind),
        }
    }
    if opts.sabotage == Some(Sabotage::LedgerBypass)
        && !kinds.contains(&FaultKind::ProviderTimeouts)
    {
        kinds.push(FaultKind::ProviderTimeouts);
        s.notes.push(
            "sabotage ledger-bypass: provider-timeouts added, the fault that makes a bypassed \
             ledger charge twice"
                .into(),
        );
    }
    if opts.sabotage == Some(Sabotage::CorruptBackup) && !kinds.contains(&FaultKind::LosePrimary) {
        kinds.push(FaultKind::LosePrimary);
        s.notes.push(
            "sabotage corrupt-backup: lose-primary added, the fault that restores from the backup"
                .into(),
        );
    }
    let every = opts.restart_redis_every.filter(|d| !d.is_zero());
    let periodic = every.is_some() && kinds.contains(&FaultKind::RestartRedis);
    if periodic {
        kinds.retain(|&k| k != FaultKind::RestartRedis);
    }
    // The node is lost once, in the middle, so that shopping before and after it shows; so
    // is the primary (one or the other: each replaces the database).
    let lose = kinds.contains(&FaultKind::LosePrimary);
    kinds.retain(|&k| k != FaultKind::LosePrimary);
    let promote = kinds.contains(&FaultKind::PromoteStandby) && !lose;
    if kinds.contains(&FaultKind::PromoteStandby) && lose {
        s.skipped.push(Skipped {
            kind: FaultKind::PromoteStandby,
            reason: "lose-primary replaces the database already: name one of the two".into(),
        });
    }
    kinds.retain(|&k| k != FaultKind::PromoteStandby);
    // The standby fails once, in the middle; not with a promotion (which makes it the primary).
    let fail_replica = kinds.contains(&FaultKind::FailReplica) && !lose && !promote;
    if kinds.contains(&FaultKind::FailReplica) && !fail_replica {
        s.skipped.push(Skipped {
            kind: FaultKind::FailReplica,
            reason: "another fault replaces the database or promotes the standby: name one".into(),
        });
    }
    kinds.retain(|&k| k != FaultKind::FailReplica);
    // A rotation is two rolling restarts of every web instance: once per drill, mid-load.
    let rotate = kinds.contains(&FaultKind::RotateKeys);
    kinds.retain(|&k| k != FaultKind::RotateKeys);
    // A migration runs once, early enough for its phases and roll to finish under load.
    let migrate = kinds.contains(&FaultKind::Migrate);
    kinds.retain(|&k| k != FaultKind::Migrate);
    // Uploads run from 10% to 80% of the load, the killer with them.
    let uploads = kinds.contains(&FaultKind::KillMidUpload);
    kinds.retain(|&k| k != FaultKind::KillMidUpload);
    s.planned = plan(&kinds, opts.duration, rng);
    if uploads {
        s.planned.push(Planned {
            kind: FaultKind::KillMidUpload,
            at: opts.duration.mul_f64(0.1),
            hold: opts.duration.mul_f64(0.7),
            pick: rng.next_u64(),
        });
    }
    for (wanted, kind, at) in [
        (migrate, FaultKind::Migrate, 0.2),
        (rotate, FaultKind::RotateKeys, 0.3),
        (lose, FaultKind::LosePrimary, 0.4),
        (promote, FaultKind::PromoteStandby, 0.4),
        (fail_replica, FaultKind::FailReplica, 0.4),
    ] {
        if wanted {
            s.planned.push(Planned {
                kind,
                at: opts.duration.mul_f64(at),
                hold: Duration::ZERO,
                pick: rng.next_u64(),
            });
        }
    }
    s.planned.sort_by_key(|p| p.at);
    if let (true, Some(every)) = (periodic, every) {
        // Every `every` while the load runs, leaving the last 10% to show the recovery.
        let end = opts.duration.mul_f64(0.9);
        periodic_faults(
            &mut s.planned,
            FaultKind::RestartRedis,
            (every, end),
            every,
            rng,
        );
    }
    if opts.sabotage == Some(Sabotage::AckBeforeCommit) {
        let span = window(opts.duration);
        periodic_faults(
            &mut s.planned,
            FaultKind::KillInstance,
            span,
            DENSE_KILL_EVERY,
            rng,
        );
        s.notes.push(format!(
            "sabotage ack-before-commit: a denser schedule, kill-instance every {:.1} s, so that \
             kills land between acknowledgements and their delayed commits",
            DENSE_KILL_EVERY.as_secs_f64()
        ));
    }
    s
}

/// Faults fall in `[10%, 80%]` of the run (the first at 1 s at the earliest).
/// Adds an instant `kind` fault every `every` from `span.0` until `span.1`, keeping the plan in
/// time order.
fn periodic_faults(
    planned: &mut Vec<Planned>,
    kind: FaultKind,
    span: (Duration, Duration),
    every: Duration,
    rng: &mut Rng,
) {
    let mut at = span.0;
    while at < span.1 {
        let pick = rng.next_u64();
        planned.push(Planned {
            kind,
            at,
            hold: Duration::ZERO,
            pick,
        });
        at += every;
    }
    planned.sort_by_key(|p| p.at);
}

fn window(duration: Duration) -> (Duration, Duration) {
    let start = duration.mul_f64(0.1).max(Duration::from_secs(1));
    let end = duration.mul_f64(0.8).max(start);
    (start, end)
}

/// Spreads `kinds` over the fault window: every kind at least once (in a seeded order), more
/// picked at random while the window has room, one per slot at a seeded point in the slot.
/// A fault whose kind is still in force at its slot becomes a kill (or is dropped).
pub(crate) fn plan(kinds: &[FaultKind], duration: Duration, rng: &mut Rng) -> Vec<Planned> {
    if kinds.is_empty() {
        return Vec::new();
    }
    let (start, end) = window(duration);
    let span = end.saturating_sub(start);
    let n = (span.as_millis() / FAULT_SPACING.as_millis()).max(kinds.len() as u128) as usize;
    let mut order = kinds.to_vec();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    while order.len() < n {
        order.push(kinds[rng.below(kinds.len() as u64) as usize]);
    }
    let slot = span / n as u32;
    let mut busy_until: BTreeMap<FaultKind, Duration> = BTreeMap::new();
    let mut planned = Vec::with_capacity(n);
    for (i, kind) in order.into_iter().enumerate() {
        let offset = rng.below((slot.as_millis() / 2) as u64 + 1);
        let at = start + slot * i as u32 + Duration::from_millis(offset);
        let kind = if busy_until.get(&kind).is_some_and(|&until| at < until) {
            if !kinds.contains(&FaultKind::KillInstance) {
                continue;
            }
            FaultKind::KillInstance
        } else {
            kind
        };
        let (lo, hi) = kind.hold_ms();
        let hold = Duration::from_millis(rng.between(lo, hi)).min(end.saturating_sub(at));
        // Let the next fault of this kind wait for this one's recovery to settle, too.
        busy_until.insert(kind, at + hold + Duration::from_millis(500));
        planned.push(Planned {
            kind,
            at,
            hold,
            pick: rng.next_u64(),
        });
    }
    planned
}

/// A fault as it happened, for the report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Injected {
    pub kind: FaultKind,
    /// Seconds since the load started.
    pub at_s: f64,
    /// What was hit: `web pid 1234`, `worker pid 99`, `database`, `provider`.
    pub target: String,
    /// How long the fault was in force (0 for instant faults).
    pub hold_s: f64,
    /// Whether it could be injected; when not, `note` says why.
    pub applied: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// Runs the schedule in real time against the system and returns what happened, in order.
pub(crate) async fn inject(
    planned: Vec<Planned>,
    ctl: Arc<Control>,
    clock: Clock,
) -> Vec<Injected> {
    let mut tasks = JoinSet::new();
    for p in planned {
        let ctl = ctl.clone();
        tasks.spawn(async move {
            tokio::time::sleep(p.at.saturating_sub(clock.elapsed())).await;
            let at_s = clock.elapsed().as_secs_f64();
            let result = apply(&p, &ctl, clock).await;
            let hold_s = clock.elapsed().as_secs_f64() - at_s;
            let (target, applied, note) = match result {
                Ok(target) => (target, true, String::new()),
                Err(note) => (String::new(), false, note),
            };
            if applied {
                ctl.count_fault();
            }
            Injected {
                kind: p.kind,
                at_s,
                target,
                // A migration holds for as long as its phases and roll take.
                hold_s: if p.hold.is_zero() && p.kind != FaultKind::Migrate {
                    0.0
                } else {
                    hold_s
                },
                applied,
                note,
            }
        });
    }
    let mut done = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        if let Ok(injected) = joined {
            done.push(injected);
        }
    }
    done.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    done
}

/// Injects one fault and undoes it after its hold; the target, or why it could not be hit.
async fn apply(p: &Planned, ctl: &Control, clock: Clock) -> Result<String, String> {
    match p.kind {
        FaultKind::KillInstance => ctl.signal_one("web", p.pick, Signal::SIGKILL),
        FaultKind::DrainInstance => ctl.signal_one("web", p.pick, Signal::SIGTERM),
        FaultKind::KillWorker => ctl.signal_one("worker", p.pick, Signal::SIGKILL),
        FaultKind::PauseInstance | FaultKind::FreezeInstance => {
            let (pid, target) = ctl.pause_one(p.pick)?;
            tokio::time::sleep(p.hold).await;
            ctl.resume(pid);
            Ok(target)
        }
        FaultKind::LoginFlood => {
            crate::abuse::login_flood(&ctl.public_url(), p.hold, ctl.observed()).await
        }
        FaultKind::SlowClients => {
            crate::abuse::slow_clients(&ctl.public_url(), p.hold, ctl.observed()).await
        }
        FaultKind::RestartDb => {
            let db = ctl.db().ok_or("no database server in this drill")?;
            let took = db.restart().await.map_err(|e| e.to_string())?;
            Ok(format!("database (back after {:.1} s)", took.as_secs_f64()))
        }
        FaultKind::SlowDb => {
            let proxy = ctl.proxy().ok_or("no database proxy in this drill")?;
            let toxic = ToxicSpec::new(Toxic::Latency {
                latency: 200,
                jitter: 50,
            })
            .with_name("drill_slow");
            proxy
                .add_toxic(DB_PROXY, toxic)
                .await
                .map_err(|e| e.to_string())?;
            tokio::time::sleep(p.hold).await;
            proxy
                .remove_toxic(DB_PROXY, "drill_slow")
                .await
                .map_err(|e| e.to_string())?;
            Ok("database link (+200±50 ms)".into())
        }
        FaultKind::CutDb => {
            let proxy = ctl.proxy().ok_or("no database proxy in this drill")?;
            proxy
                .set_enabled(DB_PROXY, false)
                .await
                .map_err(|e| e.to_string())?;
            tokio::time::sleep(p.hold).await;
            ctl.reconnect_db().await?;
            Ok("database link (cut)".into())
        }
        FaultKind::RestartRedis => {
            let redis = ctl.redis().ok_or("no Redis in this drill")?;
            let took = redis.restart().await.map_err(|e| e.to_string())?;
            Ok(format!(
                "redis-server :{} (SIGKILL, back empty after {:.2} s)",
                redis.port,
                took.as_secs_f64()
            ))
        }
        FaultKind::FlushCache => {
            let redis = ctl.redis().ok_or("no Redis in this drill")?;
            redis.command("FLUSHDB").await.map_err(|e| e.to_string())?;
            Ok(format!("redis-server :{} (FLUSHDB)", redis.port))
        }
        FaultKind::RotateKeys => ctl.rotate_keys().await,
        FaultKind::Migrate => crate::migration::run(ctl).await,
        FaultKind::KillMidUpload => crate::uploads::run(ctl, p.hold, p.pick).await,
        FaultKind::LosePrimary => crate::restore::run(ctl, clock).await,
        FaultKind::PromoteStandby => crate::failover::run(ctl, clock).await,
        FaultKind::FailReplica => crate::failover::fail_replica(ctl).await,
        FaultKind::ProviderTimeouts => {
            let faults = json!({
                "act_then_timeout_rate": 0.2,
                "hang_ms": 1500,
                "seed": p.pick,
            });
            ctl.provider_faults(&faults).await?;
            tokio::time::sleep(p.hold).await;
            ctl.provider_faults(&json!({})).await?;
            Ok("provider (20% act, then time out)".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(faults: &str, backend: Backend, secs: u64) -> DrillOptions {
        let mut o = DrillOptions::new("holdfast".into(), 7);
        o.faults = faults.parse().unwrap();
        o.backend = backend;
        o.duration = Duration::from_secs(secs);
        o
    }

    #[test]
    fn fault_lists_parse() {
        assert_eq!("all".parse::<FaultSet>().unwrap(), FaultSet::all());
        assert_eq!("none".parse::<FaultSet>().unwrap(), FaultSet(vec![]));
        assert_eq!(
            "kill-worker, cut-db,kill-worker"
                .parse::<FaultSet>()
                .unwrap(),
            FaultSet(vec![FaultKind::KillWorker, FaultKind::CutDb])
        );
        let err = "kill-everything".parse::<FaultSet>().unwrap_err();
        assert!(err.contains("kill-instance"), "{err}");
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_another_seed_another() {
        let o = opts("all", Backend::Postgres, 60);
        let a = schedule(&o, &mut Rng::new(1)).planned;
        assert_eq!(a, schedule(&o, &mut Rng::new(1)).planned);
        assert_ne!(a, schedule(&o, &mut Rng::new(2)).planned);
    }

    #[test]
    fn every_kind_is_planned_inside_the_window_without_overlapping_itself() {
        for seed in 0..200 {
            for secs in [12, 30, 60, 300] {
                let o = opts("all", Backend::Postgres, secs);
                let planned = schedule(&o, &mut Rng::new(seed)).planned;
                let (start, end) = window(o.duration);
                for kind in FaultKind::ALL
                    .into_iter()
                    .filter(|k| k.unsupported(&o).is_none())
                {
                    assert!(planned.iter().any(|p| p.kind == kind), "{kind} planned");
                }
                let mut last_end: BTreeMap<FaultKind, Duration> = BTreeMap::new();
                for p in &planned {
                    assert!(p.at >= start && p.at + p.hold <= end, "{p:?} in window");
                    if let Some(&until) = last_end.get(&p.kind) {
                        assert!(p.at >= until, "{p:?} overlaps its own kind");
                    }
                    last_end.insert(p.kind, p.at + p.hold);
                }
            }
        }
    }

    #[test]
    fn sqlite_sets_database_server_faults_aside() {
        let s = schedule(&opts("all", Backend::Sqlite, 60), &mut Rng::new(3));
        let skipped: Vec<FaultKind> = s.skipped.iter().map(|k| k.kind).collect();
        assert_eq!(
            skipped,
            [
                FaultKind::RestartDb,
                FaultKind::SlowDb,
                FaultKind::CutDb,
                FaultKind::RestartRedis,
                FaultKind::FlushCache,
                FaultKind::RotateKeys
            ]
        );
        assert!(s
            .planned
            .iter()
            .all(|p| p.kind.unsupported_on(Backend::Sqlite).is_none()));
    }

    #[test]
    fn sabotage_brings_the_faults_it_needs() {
        let mut o = opts("none", Backend::Sqlite, 12);
        o.sabotage = Some(Sabotage::AckBeforeCommit);
        let s = schedule(&o, &mut Rng::new(4));
        let kills = s
            .planned
            .iter()
            .filter(|p| p.kind == FaultKind::KillInstance)
            .count();
        assert!(kills >= 5, "{kills} kills");
        assert_eq!(s.notes.len(), 1);
        o.sabotage = Some(Sabotage::LedgerBypass);
        let s = schedule(&o, &mut Rng::new(4));
        assert!(s
            .planned
            .iter()
            .any(|p| p.kind == FaultKind::ProviderTimeouts));
    }

    #[test]
    fn redis_faults_need_redis_sessions_and_restarts_can_be_periodic() {
        let mut o = opts("restart-redis,kill-instance", Backend::Sqlite, 60);
        let s = schedule(&o, &mut Rng::new(5));
        assert!(s.planned.iter().all(|p| p.kind == FaultKind::KillInstance));
        assert_eq!(s.skipped.len(), 1);
        o.sessions = Sessions::Redis;
        o.restart_redis_every = Some(Duration::from_secs(15));
        let s = schedule(&o, &mut Rng::new(5));
        let restarts: Vec<u64> = s
            .planned
            .iter()
            .filter(|p| p.kind == FaultKind::RestartRedis)
            .map(|p| p.at.as_secs())
            .collect();
        assert_eq!(restarts, [15, 30, 45]);
        assert!(s.planned.windows(2).all(|w| w[0].at <= w[1].at));
        o.sessions = Sessions::Cookie;
        o.faults = "rotate-keys".parse().unwrap();
        o.restart_redis_every = None;
        let s = schedule(&o, &mut Rng::new(5));
        assert_eq!(s.planned.len(), 1);
    }

    #[test]
    fn rng_ranges_hold() {
        let mut r = Rng::new(9);
        for _ in 0..10_000 {
            let x = r.between(3, 5);
            assert!((3..=5).contains(&x));
            assert!(r.below(7) < 7);
        }
        assert_eq!(r.below(0), 0);
        assert_ne!(r.fork(1).next_u64(), r.fork(2).next_u64());
    }
}
