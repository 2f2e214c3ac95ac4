//! The store's connection pool: connections lent to one user at a time, and taken back
//! without a round trip when their user says the connection is in a known state.
//!
//! sqlx's pool sends a ping (a round trip) every time a connection comes back to it, to
//! flush a rollback left behind by a dropped transaction and to catch a connection left in
//! an unknown state by a cancelled statement. That ping is not configurable, and it costs
//! the database a round trip for every statement the store runs; under a slow network it
//! also keeps the connection from its next user for that round trip. Here a connection
//! whose user finished normally ([`Lent::give_back`]) goes straight back to the idle list;
//! one dropped any other way (an error, a cancelled future, a transaction left open) is
//! rolled back and pinged first, as sqlx would, and closed if that fails.
//!
//! Lending: a connection back within [`LEND_UNPINGED_WITHIN`] is lent as it is; one idle
//! longer, or back since before the last connection failure the store saw
//! ([`LostConnections`]), is pinged first, and replaced if the ping fails. A borrower waits
//! its turn (first come, first served) up to `acquire_timeout`.
//!
//! Size: `max_connections` while connections come back quickly, and up to
//! `surplus_connections` more while they are held long ([`SLOW_HOLD`] on average). On a fast
//! link a statement is back within milliseconds, and the pool keeps the database's
//! concurrency where it was sized; on a slow link (every round trip 200 ms longer) each
//! statement holds its connection that much longer, so the same work needs more connections
//! at once (Little's law), and without them requests queue for the pool rather than for the
//! database. The surplus turns are withheld again once the average hold falls under
//! [`FAST_HOLD`], and a connection beyond `max_connections` is closed once it has sat idle
//! for [`SURPLUS_IDLE`].

use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::any::AnyConnectOptions;
use sqlx::{Any, AnyConnection, ConnectOptions, Connection, Database, TransactionManager};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A connection back from its last use within this long is lent without a ping; one idle
/// longer is pinged first (a dead one is replaced before a statement meets it).
pub(crate) const LEND_UNPINGED_WITHIN: Duration = Duration::from_secs(1);

/// An idle connection older than this is closed rather than lent (the server's resources
/// are given back when the load that needed them has gone).
const IDLE_FOR_AT_MOST: Duration = Duration::from_secs(600);

/// While connections are held this long on average, the surplus turns are open. Above what
/// a busy database on the same network gives (tens of milliseconds on a saturated machine,
/// where more connections would only add contention), below what a slow link gives (every
/// round trip 200 ms).
pub const SLOW_HOLD: Duration = Duration::from_millis(150);

/// Once connections are held less than this on average, the surplus turns are withheld.
const FAST_HOLD: Duration = Duration::from_millis(50);

/// How long the oldest idle connection may sit unused while more than `max_connections`
/// are open.
const SURPLUS_IDLE: Duration = Duration::from_secs(30);

/// The pauses between tries at opening a connection to a server out of reach: from 50 ms,
/// doubling, at most 400 ms, jittered (the borrower's lend timeout ends them).
const REOPEN: holdfast_core::retry::RetryPolicy = holdfast_core::retry::RetryPolicy {
    base: Duration::from_millis(50),
    cap: Duration::from_millis(400),
    max_attempts: u32::MAX,
    deadline: Duration::MAX,
};

/// Counts connections that failed to open or were found dead when lent. A cut link shorter
/// than the acquire timeout makes requests wait rather than fail, so no operation is retried
/// and only this shows it.
pub(crate) const CONNECTIONS_FAILED: &str = "holdfast_store_connections_failed_total";

/// Whether opening a connection failed in a way that passes where the server is: nothing
/// listening on its port (a restart under way) or a server still starting up (57P03). Any
/// other failure is the borrower's answer at once, a connection reset or cut on its way in
/// among them: through a proxy, that is how a server that died shows itself, and with
/// several hosts the store must hear it now and look for the primary elsewhere, not after
/// the borrower's whole wait.
fn out_of_reach(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(io) => io.kind() == std::io::ErrorKind::ConnectionRefused,
        sqlx::Error::Database(db) => db.code().as_deref() == Some("57P03"),
        _ => false,
    }
}

/// How long the check of a connection dropped in an unknown state may take before it is
/// closed instead.
const CHECK_WITHIN: Duration = Duration::from_secs(5);

/// What every new connection runs before it is lent (session settings, a role check).
pub(crate) type Setup = Arc<
    dyn for<'c> Fn(
            &'c mut AnyConnection,
        ) -> Pin<Box<dyn Future<Output = Result<(), sqlx::Error>> + Send + 'c>>
        + Send
        + Sync,
>;

/// The settings every pool of one store shares (a pool is made afresh when the primary moves).
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) max_connections: u32,
    pub(crate) surplus_connections: u32,
    pub(crate) acquire_timeout: Duration,
    pub(crate) setup: Setup,
    pub(crate) lost: Arc<LostConnections>,
}

/// When this store last saw a connection fail (broken, ended by the server, refused as
/// read-only): the pool pings every connection that went back to it before then, so after a
/// restart or a failover the first failure is the only one a dead connection causes.
#[derive(Debug)]
pub(crate) struct LostConnections {
    base: Instant,
    /// Milliseconds since `base`, plus one, of the last failure seen; 0 for none yet.
    last: AtomicU64,
}

impl LostConnections {
    pub(crate) fn new() -> Self {
        Self {
            base: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn millis_now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn saw_one(&self) {
        let at = self.millis_now().saturating_add(1);
        self.last.fetch_max(at, Ordering::Relaxed);
    }

    /// Whether a connection idle for `idle_for` went back to the pool at or before the last
    /// failure seen (to the millisecond, erring towards a ping).
    fn predate_last(&self, idle_for: Duration) -> bool {
        let last = self.last.load(Ordering::Relaxed);
        let idle = u64::try_from(idle_for.as_millis()).unwrap_or(u64::MAX);
        last != 0 && self.millis_now().saturating_sub(idle) <= last
    }
}

/// A pool of connections to one server. Cheap to clone; clones share the connections.
#[derive(Clone)]
pub(crate) struct Pool(Arc<Inner>);

struct Inner {
    connect: AnyConnectOptions,
    settings: Settings,
    /// One permit per connection lent, being opened or being checked: `max_connections`
    /// plus `surplus_connections`, of which the pool itself holds the surplus while
    /// connections come back quickly.
    permits: Arc<Semaphore>,
    /// The surplus turns, while withheld.
    withheld: Mutex<Option<OwnedSemaphorePermit>>,
    /// How long a connection is held, on average (exponentially weighted, in microseconds).
    hold_micros: AtomicU64,
    /// Whether the surplus turns are open (`withheld` is empty), read without its lock.
    surplus_open: AtomicBool,
    /// How many connections are open, and the signal that one came back or went.
    census: Arc<Census>,
    /// Connections nobody holds, the most recently used last (lent first).
    idle: Mutex<Vec<Idle>>,
    closed: AtomicBool,
}

struct Idle {
    conn: Counted,
    since: Instant,
}

impl Pool {
    /// A pool that opens its connections when they are first needed.
    pub(crate) fn lazy(connect: AnyConnectOptions, settings: Settings) -> Pool {
        let base = settings.max_connections.max(1) as usize;
        let surplus = settings.surplus_connections;
        let permits = Arc::new(Semaphore::new(base + surplus as usize));
        let withheld = (surplus > 0)
            .then(|| permits.clone().try_acquire_many_owned(surplus).ok())
            .flatten();
        Pool(Arc::new(Inner {
            connect,
            settings,
            permits,
            withheld: Mutex::new(withheld),
            hold_micros: AtomicU64::new(0),
            surplus_open: AtomicBool::new(false),
            census: Arc::new(Census::default()),
            idle: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
        }))
    }

    /// A pool with one connection opened now, so a server that cannot be reached fails here.
    pub(crate) async fn eager(
        connect: AnyConnectOptions,
        settings: Settings,
    ) -> Result<Pool, sqlx::Error> {
        let pool = Pool::lazy(connect, settings);
        pool.lend().await?.give_back();
        Ok(pool)
    }

    /// A connection for one user, waiting up to the pool's `acquire_timeout` for a turn.
    pub(crate) async fn lend(&self) -> Result<Lent, sqlx::Error> {
        match tokio::time::timeout(self.0.settings.acquire_timeout, self.lend_untimed()).await {
            Ok(lent) => lent,
            Err(_) => Err(sqlx::Error::PoolTimedOut),
        }
    }

    async fn lend_untimed(&self) -> Result<Lent, sqlx::Error> {
        let permit = self
            .0
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        if self.is_closed() {
            return Err(sqlx::Error::PoolClosed);
        }
        // Nothing idle: a connection is opened in a task of its own, which puts it on the idle
        // list, and this borrower takes whatever reaches the list first, that one or one
        // given back meanwhile. On a slow link opening takes several round trips and a
        // connection in use comes back within one.
        let mut opening: Option<tokio::task::JoinHandle<Result<(), sqlx::Error>>> = None;
        let mut reopened = 0;
        loop {
            if self.is_closed() {
                return Err(sqlx::Error::PoolClosed);
            }
            let returned = self.0.census.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if let Some(conn) = self.pop_usable().await {
                return Ok(self.lent(conn, permit));
            }
            if opening.is_none() && self.0.reserve_one() {
                opening = Some(tokio::spawn(open_into_idle(self.0.clone())));
            }
            // At the limit every connection is lent, idle or on its way back: wait for one.
            let Some(task) = opening.as_mut() else {
                returned.await;
                continue;
            };
            tokio::select! {
                () = &mut returned => {}
                opened = task => {
                    opening = None;
                    // It opened one that another borrower may have taken first, or it failed:
                    // a server out of reach (nothing listening, still starting) is tried again
                    // until the borrower's time is up (the lend's timeout); any other failure
                    // (a reset, a refusal of the login, a standby) is the answer.
                    match opened.map_err(|_| sqlx::Error::WorkerCrashed)? {
                        Err(e) if out_of_reach(&e) => {
                            tokio::time::sleep(REOPEN.delay(reopened)).await;
                            reopened += 1;
                        }
                        done => done?,
                    }
                }
            }
        }
    }

    /// The most recently used idle connection that is fit to lend, if any: one idle for a
    /// while, or since before the last failure seen, is pinged first, and closed if dead.
    async fn pop_usable(&self) -> Option<Counted> {
        while let Some(Idle { mut conn, since }) = self.pop_idle() {
            let idle_for = since.elapsed();
            if idle_for >= IDLE_FOR_AT_MOST {
                tokio::spawn(close_quietly(conn));
                continue;
            }
            let suspect =
                idle_for >= LEND_UNPINGED_WITHIN || self.0.settings.lost.predate_last(idle_for);
            let within = self.0.settings.acquire_timeout;
            if suspect && !matches!(tokio::time::timeout(within, conn.ping()).await, Ok(Ok(()))) {
                // Dead (a restarted server, a cut link): let it go and try the next.
                metrics::counter!(CONNECTIONS_FAILED).increment(1);
                drop(conn);
                continue;
            }
            return Some(conn);
        }
        None
    }

    fn lent(&self, conn: Counted, permit: OwnedSemaphorePermit) -> Lent {
        Lent {
            conn: Some(conn),
            home: self.0.clone(),
            permit: Some(permit),
            since: Instant::now(),
        }
    }

    fn pop_idle(&self) -> Option<Idle> {
        self.0
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
    }

    /// Connections open (lent, idle, or being opened or checked), and of them idle.
    pub(crate) fn stats(&self) -> (u32, usize) {
        let idle = self
            .0
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len();
        (
            u32::try_from(self.0.census.open.load(Ordering::SeqCst)).unwrap_or(u32::MAX),
            idle,
        )
    }

    /// Refuses every borrower from now on and closes the idle connections; a lent one is
    /// closed when it comes back.
    pub(crate) async fn close(&self) {
        self.0.closed.store(true, Ordering::SeqCst);
        self.0.permits.close();
        let idle = std::mem::take(
            &mut *self
                .0
                .idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for Idle { conn, .. } in idle {
            close_quietly(conn).await;
        }
        self.0.census.returned.notify_waiters();
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::SeqCst)
    }
}

/// Opens a connection onto the idle list, waking the borrowers waiting for one (also when it
/// fails: the one that started it reads why).
async fn open_into_idle(inner: Arc<Inner>) -> Result<(), sqlx::Error> {
    // Counted from here: dropped on failure, it gives back the place `reserve_one` took.
    let mut conn = Counted {
        conn: None,
        census: inner.census.clone(),
    };
    // Bounded: a connect into a cut link must not hold its place past the link's return.
    let opened = tokio::time::timeout(inner.settings.acquire_timeout, async {
        let mut raw = inner.connect.connect().await?;
        (inner.settings.setup)(&mut raw).await?;
        conn.conn = Some(raw);
        Ok(conn)
    })
    .await
    .unwrap_or(Err(sqlx::Error::PoolTimedOut));
    if opened.is_err() {
        metrics::counter!(CONNECTIONS_FAILED).increment(1);
    }
    let outcome = opened.map(|conn| {
        if let Some(closing) = inner.take_back(conn) {
            tokio::spawn(close_quietly(closing));
        }
    });
    inner.census.returned.notify_waiters();
    outcome
}

/// How many connections a pool has open (or being opened), and the signal its borrowers
/// wait on for one to come back or go.
#[derive(Default)]
struct Census {
    open: std::sync::atomic::AtomicUsize,
    returned: tokio::sync::Notify,
}

/// A connection, counted in its pool's [`Census`] until it is dropped or closed.
struct Counted {
    conn: Option<AnyConnection>,
    census: Arc<Census>,
}

impl Counted {
    async fn close(mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = conn.close().await;
        }
    }
}

/// `Deref`/`DerefMut` to the connection in an `Option` field that holds one until the value
/// is dropped or gives it up.
macro_rules! deref_to_connection {
    ($holder:ty, $why:literal) => {
        impl Deref for $holder {
            type Target = AnyConnection;

            fn deref(&self) -> &AnyConnection {
                self.conn.as_ref().expect($why)
            }
        }

        impl DerefMut for $holder {
            fn deref_mut(&mut self) -> &mut AnyConnection {
                self.conn.as_mut().expect($why)
            }
        }
    };
}

deref_to_connection!(Counted, "a counted connection is open until dropped");

impl Drop for Counted {
    fn drop(&mut self) {
        self.census.open.fetch_sub(1, Ordering::SeqCst);
        self.census.returned.notify_waiters();
    }
}

/// Closes a connection politely, within a bound (a hung server must not hold anyone up).
async fn close_quietly(conn: Counted) {
    let _ = tokio::time::timeout(CHECK_WITHIN, conn.close()).await;
}

impl Inner {
    /// The turns usable now: `max_connections`, and the surplus while it is open.
    fn usable_turns(&self) -> usize {
        let all = self.settings.max_connections.max(1) + self.settings.surplus_connections;
        let withheld = self
            .withheld
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits);
        (all as usize).saturating_sub(withheld)
    }

    /// Takes a place for one more connection if fewer are open than the turns usable now.
    fn reserve_one(&self) -> bool {
        if self.closed.load(Ordering::SeqCst) {
            return false;
        }
        let limit = self.usable_turns();
        self.census
            .open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    /// Counts a connection held for `held`, and opens or withholds the surplus turns as the
    /// average hold crosses [`SLOW_HOLD`] or [`FAST_HOLD`].
    fn held_for(&self, held: Duration) {
        let surplus = self.settings.surplus_connections as usize;
        if surplus == 0 {
            return;
        }
        // One long hold (a reaper's range delete) must not open the surplus by itself: each
        // counts as at most twice the threshold, so it takes a run of long holds.
        let slow_micros = u64::try_from(SLOW_HOLD.as_micros()).unwrap_or(u64::MAX);
        let sample = u64::try_from(held.as_micros())
            .unwrap_or(u64::MAX)
            .min(2 * slow_micros);
        let mut average = 0;
        let _ = self
            .hold_micros
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                average = old - old / 8 + sample / 8;
                Some(average)
            });
        let slow = average >= slow_micros;
        let fast = average < u64::try_from(FAST_HOLD.as_micros()).unwrap_or(0);
        let open = self.surplus_open.load(Ordering::Relaxed);
        if !(slow || fast && open) {
            return;
        }
        let mut withheld = self
            .withheld
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = withheld
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits);
        if slow {
            *withheld = None;
            // Borrowers waiting at the old limit may open one now.
            self.census.returned.notify_waiters();
        } else if before >= surplus {
            // Another give-back withheld the last one first.
        } else if let Ok(turn) = self.permits.clone().try_acquire_owned() {
            // Withheld again one free turn at a time: they free up as the load allows.
            match withheld.as_mut() {
                Some(all) => all.merge(turn),
                None => *withheld = Some(turn),
            }
        }
        let now_withheld = withheld
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits);
        self.surplus_open
            .store(now_withheld < surplus, Ordering::Relaxed);
    }

    /// Puts `conn` on the idle list and wakes the borrowers waiting for one; gives back what must be closed
    /// instead: `conn` itself when the pool is closed, else the oldest idle connection if it
    /// has outstayed its use.
    fn take_back(&self, conn: Counted) -> Option<Counted> {
        let open = self.census.open.load(Ordering::SeqCst);
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Under the lock `close` empties the list with: nothing lands on a closed pool's list.
        if self.closed.load(Ordering::SeqCst) {
            return Some(conn);
        }
        idle.push(Idle {
            conn,
            since: Instant::now(),
        });
        let oldest = idle.first().map(|i| i.since.elapsed())?;
        let surplus = open > self.settings.max_connections.max(1) as usize;
        let closing = (oldest >= IDLE_FOR_AT_MOST || (surplus && oldest >= SURPLUS_IDLE))
            .then(|| idle.remove(0).conn);
        drop(idle);
        self.census.returned.notify_waiters();
        closing
    }
}

/// A connection lent by a [`Pool`], for one user until it is given back or dropped.
pub(crate) struct Lent {
    conn: Option<Counted>,
    home: Arc<Inner>,
    /// Released once the connection is idle again or closed.
    permit: Option<OwnedSemaphorePermit>,
    /// When it was lent.
    since: Instant,
}

impl Lent {
    /// Back to the pool as it is, without a round trip: for a user whose last statement or
    /// transaction finished (its answer read in full, nothing left open).
    pub(crate) fn give_back(mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if <Any as Database>::TransactionManager::get_transaction_depth(&conn) > 0 {
            // Not in a known state after all: the drop path rolls it back.
            self.conn = Some(conn);
            return;
        }
        self.home.held_for(self.since.elapsed());
        if let Some(closing) = self.home.take_back(conn) {
            tokio::spawn(close_quietly(closing));
        }
        self.permit.take();
    }
}

deref_to_connection!(Lent, "a lent connection is held until it goes back");

/// Dropped without [`Lent::give_back`]: its state is unknown (an error, a cancelled
/// statement, a transaction left open), so any transaction is rolled back and the connection
/// pinged before it goes back, in a task of its own; one that fails that is closed.
impl Drop for Lent {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let permit = self.permit.take();
        let home = self.home.clone();
        home.held_for(self.since.elapsed());
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            // Asked whatever the depth reads now: each driver checks it itself, and SQLite's
            // worker also uses the call to settle a commit whose caller was cancelled.
            <Any as Database>::TransactionManager::start_rollback(&mut conn);
            // The ping flushes the queued rollback and reads whatever a cancelled statement
            // left unread. A connection still in a transaction after it is closed.
            let checked = tokio::time::timeout(CHECK_WITHIN, conn.ping()).await;
            let settled = <Any as Database>::TransactionManager::get_transaction_depth(&conn) == 0;
            if matches!(checked, Ok(Ok(()))) && settled {
                if let Some(closing) = home.take_back(conn) {
                    close_quietly(closing).await;
                }
            }
            drop(permit);
        });
    }
}

/// A transaction on a lent connection: rolled back if dropped before [`OpenTx::commit`], and
/// its connection given back without a round trip once it commits.
pub(crate) struct OpenTx {
    conn: Lent,
}

impl OpenTx {
    /// Begins a transaction with `begin` (`BEGIN`, `BEGIN IMMEDIATE`).
    pub(crate) async fn begin(mut conn: Lent, begin: &'static str) -> Result<OpenTx, sqlx::Error> {
        <Any as Database>::TransactionManager::begin(&mut conn, Some(begin.into())).await?;
        Ok(OpenTx { conn })
    }

    pub(crate) async fn commit(mut self) -> Result<(), sqlx::Error> {
        <Any as Database>::TransactionManager::commit(&mut self.conn).await?;
        self.conn.give_back();
        Ok(())
    }
}

impl Deref for OpenTx {
    type Target = AnyConnection;

    fn deref(&self) -> &AnyConnection {
        &self.conn
    }
}

impl DerefMut for OpenTx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.conn
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool of `url` with a lend timeout of `within`.
    fn pool_of(url: &str, within: Duration) -> Pool {
        sqlx::any::install_default_drivers();
        let settings = Settings {
            max_connections: 1,
            surplus_connections: 0,
            acquire_timeout: within,
            setup: Arc::new(|_| Box::pin(async { Ok(()) })),
            lost: Arc::new(LostConnections::new()),
        };
        Pool::lazy(url.parse().expect("a postgres url"), settings)
    }

    #[tokio::test]
    async fn a_connection_cut_on_its_way_in_is_the_answer_at_once() {
        // What a proxy in front of a dead server does: it takes the connection and drops it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port");
        let port = listener.local_addr().expect("bound").port();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                drop(socket);
            }
        });
        // This test's runtime runs every task on this thread: the opening's count lands here.
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let counts = recorder.handle();
        let _counting = metrics::set_default_local_recorder(&recorder);
        let within = Duration::from_secs(5);
        let pool = pool_of(&format!("postgres://u@127.0.0.1:{port}/db"), within);
        let started = Instant::now();
        let failed = pool.lend().await.err().expect("nothing to connect to");
        assert!(matches!(failed, sqlx::Error::Io(_)), "{failed:?}");
        assert!(started.elapsed() < within / 2, "{:?}", started.elapsed());
        // Seen by the operator even when nobody retries (the store's flaking alert).
        let page = counts.render();
        assert!(
            page.lines().any(|l| l == format!("{CONNECTIONS_FAILED} 1")),
            "{page}"
        );
    }

    #[tokio::test]
    async fn a_port_with_nothing_listening_is_tried_until_the_lend_times_out() {
        let port = {
            let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
            taken.local_addr().expect("bound").port()
        };
        let within = Duration::from_millis(600);
        let pool = pool_of(&format!("postgres://u@127.0.0.1:{port}/db"), within);
        let started = Instant::now();
        let failed = pool.lend().await.err().expect("nothing listens");
        assert!(matches!(failed, sqlx::Error::PoolTimedOut), "{failed:?}");
        assert!(started.elapsed() >= within, "{:?}", started.elapsed());
    }
}
