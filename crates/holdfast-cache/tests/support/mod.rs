//! Origins for tests: they count their calls, can take (virtual) time, and can be held
//! until the test lets them answer.

#![allow(dead_code)] // each test binary uses a different part

use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, Semaphore};

pub type Answer<V> = Result<Option<V>, &'static str>;

/// Counts the origin calls made through it.
#[derive(Clone, Default)]
pub struct Origin {
    calls: Arc<AtomicUsize>,
}

impl Origin {
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// An origin that takes `latency`, then answers.
    pub fn answer<V: Send + 'static>(
        &self,
        latency: Duration,
        answer: Answer<V>,
    ) -> impl FnOnce() -> BoxFuture<'static, Answer<V>> + Send + 'static {
        let calls = Arc::clone(&self.calls);
        move || {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if !latency.is_zero() {
                    tokio::time::sleep(latency).await;
                }
                answer
            }
            .boxed()
        }
    }

    /// An origin that answers only once `gate` has a permit (one shared gate for many
    /// callers, when the test cannot know which caller's origin will be the one called).
    pub fn held<V: Send + 'static>(
        &self,
        gate: &Arc<Semaphore>,
        answer: Answer<V>,
    ) -> impl FnOnce() -> BoxFuture<'static, Answer<V>> + Send + 'static {
        let (calls, gate) = (Arc::clone(&self.calls), Arc::clone(gate));
        move || {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                let _permit = gate.acquire().await.expect("gate closed");
                answer
            }
            .boxed()
        }
    }

    /// An origin that tells the test when it starts, then waits for the gate to open.
    /// Dropping the gate's sender without sending keeps it waiting forever: a holder that
    /// never answers (as good as crashed).
    pub fn gated<V: Send + 'static>(
        &self,
        answer: Answer<V>,
    ) -> (
        impl FnOnce() -> BoxFuture<'static, Answer<V>> + Send + 'static,
        Gate,
    ) {
        let (started_tx, started) = oneshot::channel();
        let (open, open_rx) = oneshot::channel::<()>();
        let calls = Arc::clone(&self.calls);
        let origin = move || {
            calls.fetch_add(1, Ordering::SeqCst);
            let _ = started_tx.send(());
            async move {
                if open_rx.await.is_err() {
                    std::future::pending::<()>().await;
                }
                answer
            }
            .boxed()
        };
        (origin, Gate { started, open })
    }
}

pub struct Gate {
    started: oneshot::Receiver<()>,
    open: oneshot::Sender<()>,
}

impl Gate {
    /// Waits until the origin call has begun, returning the handle that lets it answer.
    pub async fn started(self) -> oneshot::Sender<()> {
        self.started
            .await
            .expect("the gated origin was never called");
        self.open
    }
}

/// `n` callers at once reading `key` from `cache`, each offering `origin.answer(latency,
/// answer)`; their results, in order.
pub async fn concurrent_gets(
    cache: &holdfast_cache::Cache<&'static str, u64>,
    n: usize,
    key: &'static str,
    origin: &Origin,
    latency: Duration,
    answer: Answer<u64>,
) -> Vec<Result<Option<u64>, holdfast_cache::Error>> {
    let callers: Vec<_> = (0..n)
        .map(|_| {
            let (cache, origin) = (cache.clone(), origin.answer(latency, answer));
            tokio::spawn(async move { cache.get_with(key, origin).await })
        })
        .collect();
    let mut results = Vec::with_capacity(n);
    for caller in callers {
        results.push(caller.await.expect("a caller panicked"));
    }
    results
}
