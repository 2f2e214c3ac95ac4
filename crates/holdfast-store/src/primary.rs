//! Where writes go on PostgreSQL: the primary, found among the hosts the URL names, and found
//! again when it moves.
//!
//! sqlx takes one host per URL, so a URL that names several (`postgres://u@h1:5432,h2:5432/db`,
//! as libpq writes it) is split into one URL per host here. At open, and after any failure
//! that says the primary may have moved (a write refused as read-only, 25006; the server
//! shutting down, 57P0x; a broken or refused connection, 08xxx), each host is asked
//! whether it takes writes (`pg_is_in_recovery()`, `transaction_read_only`), again and again
//! up to the acquire timeout while none does (a promotion under way), and the first that does
//! gets a fresh pool; the old pool is
//! closed, so no connection to a demoted node is used again. Every new connection checks too,
//! so a pool can never hold a connection to a standby: when every host is a standby the store
//! is unavailable, which the edge answers with 503 and `Retry-After`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use sqlx::any::AnyConnectOptions;
use sqlx::{ConnectOptions, Connection};

use crate::pool::{Pool, Settings};
use crate::{Error, Result};

/// Whether the server a connection reached takes no writes: a standby (in recovery), or a
/// primary set read-only (`default_transaction_read_only`, as some failover tools demote).
pub(crate) const READ_ONLY: &str =
    "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only')::bool";

/// What a connection to a standby is refused with (classified as transient and uncommitted).
pub(crate) const STANDBY_REFUSED: &str = "holdfast: connected to a standby (read-only)";

/// The URLs of the hosts a Postgres URL names, one host each; a URL of one host is itself.
pub(crate) fn hosts(url: &str) -> Vec<String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return vec![url.to_owned()];
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (userinfo, hostlist) = match authority.rsplit_once('@') {
        Some((user, hosts)) => (format!("{user}@"), hosts),
        None => (String::new(), authority),
    };
    let hosts: Vec<&str> = hostlist.split(',').filter(|h| !h.is_empty()).collect();
    if hosts.len() <= 1 {
        return vec![url.to_owned()];
    }
    hosts
        .into_iter()
        .map(|host| format!("{scheme}://{userinfo}{host}{tail}"))
        .collect()
}

/// The pool writes use, and how to make another.
pub(crate) struct Primary {
    /// The pool, and the URL of the host it connects to.
    current: RwLock<(Pool, String)>,
    /// One URL per host to find the primary among (one entry for a single host).
    hosts: Vec<String>,
    /// Sizes, timeouts and the per-connection setup, for each pool made.
    settings: Settings,
    /// Bumped as each search finishes, so failures seen before then do not start another.
    generation: AtomicU64,
    searching: tokio::sync::Mutex<()>,
    acquire_timeout: Duration,
    /// Closed for good ([`Primary::close`]): nothing is retried any more.
    closed: std::sync::atomic::AtomicBool,
}

impl Primary {
    /// Finds the primary among `hosts` (on PostgreSQL: even one host is asked, so a standby
    /// is refused with its reason) and connects to it.
    pub(crate) async fn open(
        hosts: Vec<String>,
        postgres: bool,
        settings: Settings,
    ) -> Result<Primary> {
        let acquire_timeout = settings.acquire_timeout;
        let first = match hosts.as_slice() {
            [one] if !postgres => one.clone(),
            _ => find(&hosts, acquire_timeout).await?,
        };
        let pool = Pool::eager(first.parse()?, settings.clone()).await?;
        Ok(Primary {
            current: RwLock::new((pool, first)),
            hosts,
            settings,
            generation: AtomicU64::new(0),
            searching: tokio::sync::Mutex::new(()),
            acquire_timeout,
            closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Each host's role and lag, asked now.
    pub(crate) async fn nodes(&self) -> Vec<Node> {
        nodes(&self.hosts, self.acquire_timeout).await
    }

    /// Whether the URL named several hosts.
    pub(crate) fn several_hosts(&self) -> bool {
        self.hosts.len() > 1
    }

    /// The pool writes use now.
    pub(crate) fn pool(&self) -> Pool {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .clone()
    }

    /// The URL of the host the pool connects to.
    pub(crate) fn url(&self) -> String {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1
            .clone()
    }

    /// Where the search stands: pass it to [`Primary::search`] after a failure.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// After a failure seen at `seen` that says the primary may have moved: unless a search
    /// has finished since, finds the primary and, if it is another host or the failure said
    /// this one is `read_only` now, gives it a fresh pool (the old pool is closed: no
    /// connection to a demoted node is used again). With several hosts and none a primary
    /// yet (a promotion under way), the hosts are asked again with backoff for up to the
    /// acquire timeout: the failures that arrive meanwhile wait for this search, then use
    /// what it found, rather than spend their attempts on a node that is gone. A search that
    /// finds none leaves the pool as it was (its connections check for themselves); the
    /// operation's retries go on until their deadline.
    pub(crate) async fn search(&self, seen: u64, read_only: bool) {
        let _one = self.searching.lock().await;
        if self.generation() != seen {
            return;
        }
        let found = match self.hosts.as_slice() {
            [one] => Ok(one.clone()),
            hosts => self.find_while_promoting(hosts).await,
        };
        self.generation.fetch_add(1, Ordering::SeqCst);
        let Ok(url) = found else {
            tracing::warn!("no primary among the store's hosts");
            return;
        };
        let same = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1
            == url;
        if same && !read_only {
            return;
        }
        let Ok(options) = url.parse::<AnyConnectOptions>() else {
            return;
        };
        let fresh = Pool::lazy(options, self.settings.clone());
        let (old, _) = std::mem::replace(
            &mut *self
                .current
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            (fresh, url.clone()),
        );
        metrics::counter!("holdfast_store_primary_searches_total").increment(1);
        tracing::warn!(primary = %redact(&url), "writes go to the primary found now");
        tokio::spawn(async move { old.close().await });
    }

    /// [`find`], asked again with backoff while no host is a primary, for up to the
    /// acquire timeout (a promotion takes from a tenth of a second to a few seconds).
    async fn find_while_promoting(&self, hosts: &[String]) -> Result<String> {
        // From 20 ms, doubling, at most 250 ms, jittered: the instances of a fleet that
        // lost the primary together do not ask together.
        let asking = holdfast_core::retry::RetryPolicy {
            base: Duration::from_millis(20),
            cap: Duration::from_millis(250),
            max_attempts: u32::MAX,
            deadline: self.acquire_timeout,
        };
        let started = std::time::Instant::now();
        let mut asked = 0;
        loop {
            let found = find(hosts, self.acquire_timeout).await;
            asked += 1;
            let pause = asking.next_delay(asked, started);
            let (Err(_), false, Some(pause)) = (&found, self.is_closed(), pause) else {
                return found;
            };
            tokio::time::sleep(pause).await;
        }
    }

    pub(crate) async fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.pool().close().await;
    }

    /// Whether the store was closed for good.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

/// One connection to `url`, its statements not logged (the store's pools log slow ones).
async fn connect_quietly(url: &str) -> Result<sqlx::AnyConnection, sqlx::Error> {
    url.parse::<AnyConnectOptions>()?
        .log_statements(tracing::log::LevelFilter::Off)
        .connect()
        .await
}

/// The first host that answers as a primary.
async fn find(hosts: &[String], timeout: Duration) -> Result<String> {
    let mut why = Vec::new();
    for url in hosts {
        let asked = async {
            let mut conn = connect_quietly(url).await?;
            let standby: bool = sqlx::query_scalar(READ_ONLY).fetch_one(&mut conn).await?;
            let _ = conn.close().await;
            Ok::<bool, sqlx::Error>(standby)
        };
        match tokio::time::timeout(timeout, asked).await {
            Ok(Ok(false)) => return Ok(url.clone()),
            Ok(Ok(true)) => why.push(format!("{} is a standby (read-only)", redact(url))),
            Ok(Err(e)) => why.push(format!("{}: {e}", redact(url))),
            Err(_) => why.push(format!("{}: no answer", redact(url))),
        }
    }
    Err(Error::NoPrimary(why.join("; ")))
}

/// `url` without its password.
fn redact(url: &str) -> String {
    match url.split_once("://").and_then(|(s, rest)| {
        let (user, host) = rest.split_once('@')?;
        Some(format!(
            "{s}://{}@{host}",
            user.split(':').next().unwrap_or("")
        ))
    }) {
        Some(shown) => shown,
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_of_several_hosts_becomes_one_url_per_host() {
        assert_eq!(
            hosts("postgres://app:pw@a:5432,b:5433/shop?sslmode=disable"),
            vec![
                "postgres://app:pw@a:5432/shop?sslmode=disable",
                "postgres://app:pw@b:5433/shop?sslmode=disable"
            ]
        );
        assert_eq!(
            hosts("postgres://a,b/shop"),
            vec!["postgres://a/shop", "postgres://b/shop"]
        );
        assert_eq!(
            hosts("postgres://app@a:5432/shop"),
            vec!["postgres://app@a:5432/shop"]
        );
        assert_eq!(hosts("sqlite:/tmp/x.sqlite"), vec!["sqlite:/tmp/x.sqlite"]);
        assert_eq!(
            redact("postgres://app:pw@a:5432/shop"),
            "postgres://app@a:5432/shop"
        );
    }
}

/// One host the store's URL names, as it answered just now.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Node {
    /// `host:port`.
    pub host: String,
    /// `primary`, `standby`, or `unreachable: <why>`.
    pub role: String,
    /// A standby's distance behind the primary's WAL, in bytes.
    pub lag_bytes: Option<u64>,
    /// A standby's distance behind in time: 0 when it has replayed everything, else the age
    /// of the last transaction it replayed.
    pub lag_seconds: Option<f64>,
}

/// What one host answered: whether it is a standby, its WAL position, the age of its last
/// replayed transaction; or why it did not answer.
type Answer = Result<(bool, Option<u64>, Option<f64>), String>;

/// Each host's role and, for standbys, how far behind the primary it is.
pub(crate) async fn nodes(hosts: &[String], timeout: Duration) -> Vec<Node> {
    // (host, standby?, its WAL position: written on a primary, replayed on a standby, the
    // age of its last replayed transaction) or why it did not answer.
    let mut answers: Vec<(String, Answer)> = Vec::new();
    for url in hosts {
        let asked = async {
            let mut conn = connect_quietly(url).await?;
            let answer: (bool, Option<String>, Option<f64>) = sqlx::query_as(
                "SELECT pg_is_in_recovery(), \
                 (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                  ELSE pg_current_wal_lsn() END)::text, \
                 (CASE WHEN pg_is_in_recovery() \
                  THEN extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END)::float8",
            )
            .fetch_one(&mut conn)
            .await?;
            let _ = conn.close().await;
            Ok::<_, sqlx::Error>(answer)
        };
        let answer = match tokio::time::timeout(timeout, asked).await {
            Ok(Ok((standby, lsn, age))) => Ok((standby, lsn.as_deref().and_then(parse_lsn), age)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer".to_owned()),
        };
        answers.push((host_of(url), answer));
    }
    let primary_at = answers.iter().find_map(|(_, a)| match a {
        Ok((false, at, _)) => *at,
        _ => None,
    });
    answers
        .into_iter()
        .map(|(host, answer)| match answer {
            Ok((false, _, _)) => Node {
                host,
                role: "primary".into(),
                lag_bytes: None,
                lag_seconds: None,
            },
            Ok((true, at, age)) => {
                let lag_bytes = match (primary_at, at) {
                    (Some(p), Some(at)) => Some(p.saturating_sub(at)),
                    _ => None,
                };
                Node {
                    host,
                    role: "standby".into(),
                    lag_bytes,
                    lag_seconds: match lag_bytes {
                        Some(0) => Some(0.0),
                        _ => age,
                    },
                }
            }
            Err(why) => Node {
                host,
                role: format!("unreachable: {why}"),
                lag_bytes: None,
                lag_seconds: None,
            },
        })
        .collect()
}

/// `X/Y` (a WAL position) as a number.
pub(crate) fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// The `host:port` of a one-host URL.
pub(crate) fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    rest.split(['/', '?']).next().unwrap_or(rest).to_owned()
}
