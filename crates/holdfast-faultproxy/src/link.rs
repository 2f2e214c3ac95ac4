//! The data plane: accepting connections and pumping bytes through the toxics.
//!
//! Each proxied connection is one task that owns both sockets and runs two pumps, one per
//! [`Stream`]. A pump has a reader that timestamps chunks as they arrive and a writer that
//! delivers them through the toxics of its stream. The writer watches the proxy's toxic list,
//! so adding, updating or removing a toxic changes live connections at once, even in the
//! middle of a delayed or paced chunk.

use std::future::{pending, Future};
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep, sleep_until, Instant};

use crate::toxic::{Stream, Toxic, ToxicSpec};

/// A toxic as the data plane sees it. `rev` changes on every update, which re-draws the
/// toxicity on live connections (as Toxiproxy does) but keeps `limit_data`'s byte count.
#[derive(Clone, Debug)]
pub(crate) struct ActiveToxic {
    pub id: u64,
    pub rev: u64,
    pub spec: ToxicSpec,
}

pub(crate) type Toxics = Arc<[ActiveToxic]>;

const READ_BUF: usize = 16 * 1024;
const CHUNKS_IN_FLIGHT: usize = 64;

/// An enabled proxy: its listener and every connection accepted from it.
pub(crate) struct Run {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Run {
    pub fn start(listener: TcpListener, upstream: String, toxics: watch::Receiver<Toxics>) -> Run {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(accept(listener, upstream, toxics, stopped));
        Run {
            stop: Some(stop),
            task,
        }
    }

    /// Closes the listener and every connection; returns once they are closed, so a
    /// connect attempt made afterwards is refused.
    pub async fn stop(mut self) {
        self.stop.take();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(
    listener: TcpListener,
    upstream: String,
    toxics: watch::Receiver<Toxics>,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    connections.spawn(connection(client, upstream.clone(), toxics.clone()));
                }
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "fault proxy: accept failed");
                    sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

/// How one direction (or the whole connection) ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The source closed; the close was passed on. The other direction carries on.
    Eof,
    /// A socket failed; close everything.
    Error,
    /// A toxic closes the connection (`timeout`, `limit_data`).
    Close,
    /// A toxic resets the connection (`reset_peer`).
    Reset,
}

async fn connection(mut client: TcpStream, upstream: String, toxics: watch::Receiver<Toxics>) {
    let mut server = match TcpStream::connect(&upstream).await {
        Ok(server) => server,
        Err(error) => {
            tracing::debug!(%upstream, %error, "fault proxy: upstream unreachable, closing client");
            return;
        }
    };
    // Like Toxiproxy (Go's default), so small writes such as slices leave at once.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let end = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        both(
            Pump::new(Stream::Upstream, toxics.clone()).run(client_read, server_write),
            Pump::new(Stream::Downstream, toxics).run(server_read, client_write),
        )
        .await
    };
    match end {
        End::Reset => {
            let _ = client.set_zero_linger();
            let _ = server.set_zero_linger();
        }
        End::Close => {
            let _ = client.shutdown().await;
            let _ = server.shutdown().await;
        }
        End::Eof | End::Error => {}
    }
}

/// Runs both directions; ends when both reached EOF or as soon as one ends otherwise.
async fn both(up: impl Future<Output = End>, down: impl Future<Output = End>) -> End {
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        let end = tokio::select! {
            end = &mut up, if !up_done => { up_done = true; end }
            end = &mut down, if !down_done => { down_done = true; end }
        };
        if end != End::Eof {
            return end;
        }
    }
    End::Eof
}

struct Chunk {
    data: Bytes,
    at: Instant,
}

/// What this connection knows about one toxic of its stream.
struct State {
    id: u64,
    rev: u64,
    /// The toxicity draw for this connection.
    applies: bool,
    /// When the toxic (this revision) started acting on this connection.
    since: Instant,
    /// Bytes delivered since the toxic was added (for `limit_data`).
    sent: u64,
    holds: bool,
}

/// The combined effect of the toxics that apply to a stream right now.
#[derive(Default)]
struct Effects {
    /// `timeout`: drop data.
    hold: bool,
    close_at: Option<Instant>,
    reset_after: Option<Duration>,
    latency: Duration,
    /// Bytes per second.
    rate: Option<u64>,
    /// (average size, variation, delay µs).
    slice: Option<(u64, u64, u64)>,
    limit_left: Option<u64>,
    slow_close: Duration,
}

struct Pump {
    stream: Stream,
    toxics: watch::Receiver<Toxics>,
    current: Toxics,
    states: Vec<State>,
    /// `bandwidth`: when the next piece may go.
    next_send: Option<Instant>,
}

impl Pump {
    fn new(stream: Stream, toxics: watch::Receiver<Toxics>) -> Self {
        let current = toxics.borrow().clone();
        let mut pump = Pump {
            stream,
            toxics,
            current,
            states: Vec::new(),
            next_send: None,
        };
        pump.refresh();
        pump
    }

    async fn run(mut self, mut src: ReadHalf<'_>, mut dst: WriteHalf<'_>) -> End {
        let (tx, mut rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
        let read = async move {
            let mut buf = vec![0; READ_BUF];
            loop {
                let msg = match src.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => Ok(Chunk {
                        data: Bytes::copy_from_slice(&buf[..n]),
                        at: Instant::now(),
                    }),
                    Err(e) => Err(e),
                };
                let failed = msg.is_err();
                if tx.send(msg).await.is_err() || failed {
                    return;
                }
            }
        };
        let forward = self.forward(&mut rx, &mut dst);
        tokio::pin!(read, forward);
        let mut reading = true;
        loop {
            tokio::select! {
                () = &mut read, if reading => reading = false,
                end = &mut forward => return end,
            }
        }
    }

    async fn forward(
        &mut self,
        rx: &mut mpsc::Receiver<io::Result<Chunk>>,
        dst: &mut WriteHalf<'_>,
    ) -> End {
        loop {
            if let Some(end) = self.refresh() {
                return end;
            }
            let close_at = self.effects().close_at;
            tokio::select! {
                msg = rx.recv() => match msg {
                    None => return self.finish(dst).await,
                    Some(Err(_)) => return End::Error,
                    Some(Ok(chunk)) => {
                        if let Some(end) = self.deliver(chunk, dst).await {
                            return end;
                        }
                    }
                },
                () = changed(&mut self.toxics) => {}
                () = sleep_until_some(close_at) => return End::Close,
            }
        }
    }

    /// Delivers one chunk through the toxics, re-planning whenever they change.
    async fn deliver(&mut self, chunk: Chunk, dst: &mut WriteHalf<'_>) -> Option<End> {
        let Chunk { mut data, at } = chunk;
        let mut due = None;
        while !data.is_empty() {
            if let Some(end) = self.refresh() {
                return Some(end);
            }
            let fx = self.effects();
            if fx.hold {
                return None;
            }
            if let Some(after) = fx.reset_after {
                sleep(after).await;
                return Some(End::Reset);
            }
            if fx.limit_left == Some(0) {
                return Some(End::Close);
            }
            if !self.wait_until(*due.get_or_insert(at + fx.latency)).await {
                due = None;
                continue;
            }
            match fx.rate {
                Some(0) => {
                    changed(&mut self.toxics).await;
                    due = None;
                    continue;
                }
                Some(_) => {
                    if let Some(next) = self.next_send {
                        if !self.wait_until(next).await {
                            due = None;
                            continue;
                        }
                    }
                }
                None => self.next_send = None,
            }

            let mut n = data.len();
            if let Some(rate) = fx.rate {
                // Pieces of 100 ms worth, as Toxiproxy does.
                n = n.min((rate / 10).max(1) as usize);
            }
            if let Some((average, variation, _)) = fx.slice {
                n = n.min(slice_size(average, variation));
            }
            if let Some(left) = fx.limit_left {
                n = n.min(usize::try_from(left).unwrap_or(usize::MAX));
            }
            let piece = data.split_to(n);
            if dst.write_all(&piece).await.is_err() {
                return Some(End::Error);
            }
            for state in self.states.iter_mut().filter(|s| s.applies) {
                state.sent += n as u64;
            }
            if fx.limit_left == Some(n as u64) {
                return Some(End::Close);
            }
            if let Some(rate) = fx.rate {
                let start = self
                    .next_send
                    .map_or(Instant::now(), |t| t.max(Instant::now()));
                self.next_send = Some(start + Duration::from_secs_f64(n as f64 / rate as f64));
            }
            if let Some((_, _, delay)) = fx.slice {
                if delay > 0 && !data.is_empty() {
                    self.wait_until(Instant::now() + Duration::from_micros(delay))
                        .await;
                }
            }
        }
        None
    }

    /// The source closed: pass the close on, `slow_close` permitting.
    async fn finish(&mut self, dst: &mut WriteHalf<'_>) -> End {
        let eof_at = Instant::now();
        loop {
            if let Some(end) = self.refresh() {
                return end;
            }
            if self.wait_until(eof_at + self.effects().slow_close).await {
                break;
            }
        }
        let _ = dst.shutdown().await;
        End::Eof
    }

    /// Sleeps until `at`; false if the toxics changed first and the caller should re-plan.
    async fn wait_until(&mut self, at: Instant) -> bool {
        if at <= Instant::now() {
            return true;
        }
        tokio::select! {
            () = sleep_until(at) => true,
            () = changed(&mut self.toxics) => false,
        }
    }

    /// Takes the latest toxic list. Returns `Close` when a `timeout` toxic that was holding
    /// this connection is gone: its data was dropped, so the stream cannot resume (Toxiproxy
    /// closes such connections too).
    fn refresh(&mut self) -> Option<End> {
        self.current = self.toxics.borrow_and_update().clone();
        let (current, stream, now) = (&self.current, self.stream, Instant::now());
        let mut released = false;
        self.states.retain(|s| {
            let kept = current.iter().any(|t| t.id == s.id);
            released |= !kept && s.applies && s.holds;
            kept
        });
        for toxic in current.iter().filter(|t| t.spec.stream == stream) {
            match self.states.iter_mut().find(|s| s.id == toxic.id) {
                Some(state) if state.rev == toxic.rev => {}
                Some(state) => {
                    state.rev = toxic.rev;
                    state.applies = draw(toxic.spec.toxicity);
                    state.since = now;
                    state.holds = matches!(toxic.spec.toxic, Toxic::Timeout { .. });
                }
                None => self.states.push(State {
                    id: toxic.id,
                    rev: toxic.rev,
                    applies: draw(toxic.spec.toxicity),
                    since: now,
                    sent: 0,
                    holds: matches!(toxic.spec.toxic, Toxic::Timeout { .. }),
                }),
            }
        }
        released.then_some(End::Close)
    }

    fn effects(&self) -> Effects {
        let mut fx = Effects::default();
        for toxic in self.current.iter() {
            let Some(state) = self.states.iter().find(|s| s.id == toxic.id && s.applies) else {
                continue;
            };
            match toxic.spec.toxic {
                Toxic::Latency { latency, jitter } => fx.latency += jittered(latency, jitter),
                Toxic::Bandwidth { rate } => {
                    let bps = rate.saturating_mul(1000);
                    fx.rate = Some(fx.rate.map_or(bps, |r| r.min(bps)));
                }
                Toxic::Timeout { timeout } => {
                    fx.hold = true;
                    if timeout > 0 {
                        let at = state.since + Duration::from_millis(timeout);
                        fx.close_at = Some(fx.close_at.map_or(at, |c| c.min(at)));
                    }
                }
                Toxic::ResetPeer { timeout } => {
                    let after = Duration::from_millis(timeout);
                    fx.reset_after = Some(fx.reset_after.map_or(after, |r| r.min(after)));
                }
                Toxic::SlowClose { delay } => {
                    fx.slow_close = fx.slow_close.max(Duration::from_millis(delay));
                }
                Toxic::Slicer {
                    average_size,
                    size_variation,
                    delay,
                } => fx.slice = Some((average_size, size_variation, delay)),
                Toxic::LimitData { bytes } => {
                    let left = bytes.saturating_sub(state.sent);
                    fx.limit_left = Some(fx.limit_left.map_or(left, |l| l.min(left)));
                }
            }
        }
        fx
    }
}

/// Waits for the toxic list to change; forever once the proxy is gone.
async fn changed(toxics: &mut watch::Receiver<Toxics>) {
    if toxics.changed().await.is_err() {
        pending::<()>().await;
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => pending().await,
    }
}

/// The per-connection toxicity draw: 0 never applies, 1 always does.
fn draw(toxicity: f64) -> bool {
    rand::thread_rng().gen::<f64>() < toxicity
}

fn jittered(latency: u64, jitter: u64) -> Duration {
    let ms = if jitter == 0 {
        latency
    } else {
        let jitter = jitter.min(i64::MAX as u64) as i64;
        let offset = rand::thread_rng().gen_range(-jitter..=jitter);
        latency.saturating_add_signed(offset)
    };
    Duration::from_millis(ms)
}

/// `slicer` piece size: `average ± variation`, at least one byte; `average: 0` disables it.
fn slice_size(average: u64, variation: u64) -> usize {
    if average == 0 {
        return usize::MAX;
    }
    let low = average.saturating_sub(variation).max(1);
    let high = average.saturating_add(variation).max(low);
    usize::try_from(rand::thread_rng().gen_range(low..=high)).unwrap_or(usize::MAX)
}
