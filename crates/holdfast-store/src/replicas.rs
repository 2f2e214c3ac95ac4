//! Reads that tolerate staleness, served by the standbys among the hosts a PostgreSQL URL
//! names, without ever showing a user an older state than one they were told about.
//!
//! Every host the URL names gets a small pool of its own, and a watcher asks each host every
//! [`WATCH_EVERY`] whether it is a standby and how much WAL it has replayed. A standby is *in
//! rotation* while it answers and its lag is within the bound: the lag is measured against the
//! primary's WAL positions the watcher saw, so it is "this standby had everything the primary
//! had N seconds ago", not the age of its last transaction (which grows on a quiet primary).
//!
//! A read says how fresh it must be ([`Freshness`]). `AtLeast(lsn)` — the caller wrote, and
//! was told about, everything up to `lsn` — is served by a standby in rotation only once that
//! standby has replayed `lsn`: at once if the watcher saw it there already, else after one
//! check (`pg_last_wal_replay_lsn()`), repeated for at most the read's wait bound; past it
//! the primary serves. A standby that fails a read (unreachable, a recovery conflict) is taken
//! out of rotation until the watcher sees it well again, and the read goes to the primary, so
//! losing a standby never fails a read.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyPool, ConnectOptions};

use crate::primary::{host_of, parse_lsn};

/// How often the watcher asks every host where it is.
pub const WATCH_EVERY: Duration = Duration::from_millis(200);

/// Why the primary is not in rotation.
const NOT_A_STANDBY: &str = "not a standby";

/// Why a standby is not in rotation yet, just after start: it lacks the primary's first
/// position seen, and too little time has passed to say how far behind it is.
const LAG_UNKNOWN: &str = "lag not measured yet";

/// How often a read waiting for a standby to replay its token asks again.
const RECHECK_EVERY: Duration = Duration::from_millis(2);

/// A position in PostgreSQL's write-ahead log (`X/Y` in its text form).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// A position no standby reaches: what a writer hands out when it could not learn the
    /// primary's, so its reader is served by the primary (at once, without waiting).
    pub const BEYOND: Lsn = Lsn(u64::MAX);
}

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl std::str::FromStr for Lsn {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        parse_lsn(s).map(Lsn).ok_or(())
    }
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Any standby in rotation will do: the reader was told about no write.
    Any,
    /// The reader was told about writes up to this position: a standby serves it only once
    /// it has replayed them.
    AtLeast(Lsn),
    /// Only the primary: the reader's claim could not be trusted (a token forged, expired or
    /// garbled), or the read must see the latest state.
    Latest,
}

/// Limits of replica reads.
#[derive(Debug, Clone)]
pub struct ReplicaOptions {
    /// A standby further behind than this is out of rotation.
    pub max_lag: Duration,
    /// How long a read with a token waits for a standby to replay it before the primary
    /// serves it instead.
    pub wait: Duration,
    /// Connections per standby.
    pub max_connections: u32,
    /// How long a read waits for a standby's connection before the primary serves it.
    pub acquire_timeout: Duration,
}

impl Default for ReplicaOptions {
    fn default() -> Self {
        Self {
            max_lag: Duration::from_secs(5),
            wait: Duration::from_millis(50),
            max_connections: 8,
            acquire_timeout: Duration::from_millis(250),
        }
    }
}

/// One host as the watcher last saw it.
struct Host {
    /// `host:port`, for logs and metrics.
    name: String,
    pool: AnyPool,
    /// A standby within the lag bound, answering: reads may go here.
    in_rotation: AtomicBool,
    /// The WAL it had replayed at the watcher's last look (0: unknown).
    replayed: AtomicU64,
    /// Its lag at the watcher's last look, in milliseconds (`u64::MAX`: unknown or not a
    /// standby).
    lag_ms: AtomicU64,
    /// Why it is out of rotation, as last logged (so each change is logged once).
    why_out: Mutex<Option<String>>,
}

/// The standbys a store reads from, and the watcher's view of them.
pub(crate) struct Replicas {
    hosts: Vec<Host>,
    next: AtomicUsize,
    opts: ReplicaOptions,
    /// The primary's WAL positions as the watcher saw them, oldest first.
    primary_seen: Mutex<VecDeque<(Instant, u64)>>,
    /// Closed with the store: the watcher stops.
    closed: AtomicBool,
}

/// Where one read was served, for the caller's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Served {
    Replica,
    Primary,
}

impl Replicas {
    /// A pool for each of `urls` (lazy: an unreachable host is found out by the watcher,
    /// reported, and skipped), and the watcher, which stops when the store is dropped.
    pub(crate) fn start(urls: &[String], opts: ReplicaOptions) -> Arc<Replicas> {
        let hosts = urls
            .iter()
            .filter_map(|url| {
                let options = url
                    .parse::<AnyConnectOptions>()
                    .ok()?
                    .log_statements(tracing::log::LevelFilter::Off);
                let pool = AnyPoolOptions::new()
                    .max_connections(opts.max_connections)
                    .acquire_timeout(opts.acquire_timeout)
                    .connect_lazy_with(options);
                Some(Host {
                    name: host_of(url),
                    pool,
                    in_rotation: AtomicBool::new(false),
                    replayed: AtomicU64::new(0),
                    lag_ms: AtomicU64::new(u64::MAX),
                    why_out: Mutex::new(None),
                })
            })
            .collect();
        let replicas = Arc::new(Replicas {
            hosts,
            next: AtomicUsize::new(0),
            opts,
            primary_seen: Mutex::new(VecDeque::new()),
            closed: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&replicas);
        tokio::spawn(watch(weak));
        replicas
    }

    /// A connection to a standby in rotation that has replayed `after` (waiting for that at
    /// most the wait bound), or `None`: the primary must serve.
    pub(crate) async fn connection(
        &self,
        after: Option<Lsn>,
    ) -> Option<(usize, PoolConnection<Any>)> {
        if after == Some(Lsn::BEYOND) {
            return None;
        }
        let n = self.hosts.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in (0..n).map(|k| (start + k) % n) {
            let host = &self.hosts[i];
            if !host.in_rotation.load(Ordering::Relaxed) {
                continue;
            }
            let mut conn = match host.pool.acquire().await {
                Ok(c) => c,
                Err(e) => {
                    self.failed(i, &e.to_string());
                    continue;
                }
            };
            let Some(lsn) = after.filter(|l| host.replayed.load(Ordering::Relaxed) < l.0) else {
                return Some((i, conn));
            };
            match self.wait_for(&mut conn, lsn).await {
                Ok(true) => return Some((i, conn)),
                Ok(false) => return None,
                Err(e) => self.failed(i, &e.to_string()),
            }
        }
        None
    }

    /// Whether the standby behind `conn` replays `lsn` within the wait bound.
    async fn wait_for(
        &self,
        conn: &mut PoolConnection<Any>,
        lsn: Lsn,
    ) -> Result<bool, sqlx::Error> {
        let deadline = Instant::now() + self.opts.wait;
        let target = lsn.to_string();
        loop {
            let reached: bool = sqlx::query_scalar(
                "SELECT coalesce(pg_wal_lsn_diff(pg_last_wal_replay_lsn(), $1::pg_lsn) >= 0, false)",
            )
            .bind(&target)
            .fetch_one(&mut **conn)
            .await?;
            if reached {
                return Ok(true);
            }
            if Instant::now() + RECHECK_EVERY > deadline {
                return Ok(false);
            }
            tokio::time::sleep(RECHECK_EVERY).await;
        }
    }

    /// Takes host `i` out of rotation after a failed read; the watcher puts it back.
    pub(crate) fn failed(&self, i: usize, why: &str) {
        self.set_out(&self.hosts[i], Some(format!("a read failed: {why}")));
    }

    fn set_out(&self, host: &Host, why: Option<String>) {
        host.in_rotation.store(why.is_none(), Ordering::Relaxed);
        let mut last = host.why_out.lock().unwrap_or_else(PoisonError::into_inner);
        if *last == why {
            return;
        }
        match &why {
            // The primary is among the hosts, and a standby is not read from until its lag is
            // known: neither is news.
            Some(why) if why == NOT_A_STANDBY || why == LAG_UNKNOWN => {}
            Some(why) => tracing::warn!(replica = %host.name, %why, "replica out of rotation"),
            None => tracing::info!(replica = %host.name, "replica in rotation"),
        }
        *last = why;
    }

    /// Each host's name, whether it is in rotation, and its lag as the watcher last saw it.
    pub(crate) fn rotation(&self) -> Vec<(String, bool, Option<Duration>)> {
        self.hosts
            .iter()
            .map(|h| {
                let lag = h.lag_ms.load(Ordering::Relaxed);
                (
                    h.name.clone(),
                    h.in_rotation.load(Ordering::Relaxed),
                    (lag != u64::MAX).then(|| Duration::from_millis(lag)),
                )
            })
            .collect()
    }

    /// One look at every host: roles, positions, lags, rotation.
    pub(crate) async fn look(&self) {
        let mut answers = Vec::with_capacity(self.hosts.len());
        for host in &self.hosts {
            let asked = async {
                let mut conn = host.pool.acquire().await?;
                sqlx::query_as::<_, (bool, Option<String>)>(
                    "SELECT pg_is_in_recovery(), (CASE WHEN pg_is_in_recovery() \
                     THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text",
                )
                .fetch_one(&mut *conn)
                .await
            };
            let answer = match tokio::time::timeout(self.opts.acquire_timeout * 2, asked).await {
                Ok(Ok((standby, at))) => Ok((standby, at.as_deref().and_then(parse_lsn))),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("no answer".to_owned()),
            };
            answers.push(answer);
        }
        let now = Instant::now();
        let history = {
            let mut seen = self
                .primary_seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(at) = answers.iter().find_map(|a| match a {
                Ok((false, Some(at))) => Some(*at),
                _ => None,
            }) {
                seen.push_back((now, at));
            }
            let keep = self.opts.max_lag + WATCH_EVERY * 5;
            while seen
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > keep)
            {
                seen.pop_front();
            }
            seen.clone()
        };
        for (host, answer) in self.hosts.iter().zip(answers) {
            let why = match answer {
                Err(e) => {
                    host.lag_ms.store(u64::MAX, Ordering::Relaxed);
                    Some(format!("unreachable: {e}"))
                }
                Ok((false, _)) => {
                    host.lag_ms.store(u64::MAX, Ordering::Relaxed);
                    Some(NOT_A_STANDBY.to_owned())
                }
                Ok((true, replayed)) => {
                    let replayed = replayed.unwrap_or(0);
                    host.replayed.store(replayed, Ordering::Relaxed);
                    let lag = lag(&history, replayed, now);
                    let lag_ms = lag.map_or(u64::MAX, |l| l.as_millis() as u64);
                    host.lag_ms.store(lag_ms, Ordering::Relaxed);
                    metrics::gauge!("holdfast_replica_read_lag_seconds", "host" => host.name.clone())
                        .set(lag.map_or(f64::INFINITY, |l| l.as_secs_f64()));
                    match lag {
                        Some(l) if l <= self.opts.max_lag => None,
                        Some(l) => Some(format!(
                            "{:.1} s behind (bound {:.1} s)",
                            l.as_secs_f64(),
                            self.opts.max_lag.as_secs_f64()
                        )),
                        None if history
                            .front()
                            .is_some_and(|(t, _)| now.duration_since(*t) < self.opts.max_lag) =>
                        {
                            Some(LAG_UNKNOWN.to_owned())
                        }
                        None => Some(format!(
                            "more than {:.1} s behind",
                            self.opts.max_lag.as_secs_f64()
                        )),
                    }
                }
            };
            metrics::gauge!("holdfast_replica_in_rotation", "host" => host.name.clone())
                .set(if why.is_none() { 1.0 } else { 0.0 });
            self.set_out(host, why);
        }
    }

    pub(crate) async fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for h in &self.hosts {
            h.pool.close().await;
        }
    }
}

/// How far behind a standby that replayed up to `replayed` is, given the primary's positions
/// seen at known times (oldest first): zero if it has everything the primary last showed,
/// else the time since the newest position it has; `None` if it lacks even the oldest (or
/// nothing was seen of the primary).
fn lag(seen: &VecDeque<(Instant, u64)>, replayed: u64, now: Instant) -> Option<Duration> {
    let (_, newest) = seen.back()?;
    if replayed >= *newest {
        return Some(Duration::ZERO);
    }
    // The first position it lacks was written after the last one it has: it is behind by at
    // most the time since that one.
    seen.iter()
        .rev()
        .find(|(_, at)| replayed >= *at)
        .map(|(t, _)| now.duration_since(*t))
}

/// Looks at every host every [`WATCH_EVERY`] until the replicas are dropped.
async fn watch(replicas: Weak<Replicas>) {
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(r) = replicas.upgrade() else { return };
        if r.closed.load(Ordering::SeqCst) {
            return;
        }
        r.look().await;
    }
}

/// Counts a replica read by where it was served.
pub(crate) fn count(served: Served) {
    let served = match served {
        Served::Replica => "replica",
        Served::Primary => "primary",
    };
    metrics::counter!("holdfast_store_replica_reads_total", "served" => served).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_the_time_since_the_newest_primary_position_the_standby_has() {
        let now = Instant::now();
        let seen: VecDeque<(Instant, u64)> = [
            (now - Duration::from_secs(3), 100),
            (now - Duration::from_secs(2), 200),
            (now - Duration::from_secs(1), 300),
        ]
        .into();
        assert_eq!(lag(&seen, 300, now), Some(Duration::ZERO));
        assert_eq!(lag(&seen, 350, now), Some(Duration::ZERO));
        assert_eq!(lag(&seen, 250, now), Some(Duration::from_secs(2)));
        assert_eq!(lag(&seen, 200, now), Some(Duration::from_secs(2)));
        assert_eq!(lag(&seen, 99, now), None);
        assert_eq!(lag(&VecDeque::new(), 10, now), None);
    }

    #[test]
    fn an_lsn_reads_and_prints_as_postgres_writes_it() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn, Lsn((0x16 << 32) | 0xB374_D848));
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert!("garbage".parse::<Lsn>().is_err());
        assert!("1/zz".parse::<Lsn>().is_err());
    }
}
