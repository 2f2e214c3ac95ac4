//! argon2id password hashing on a bounded pool.
//!
//! One argon2id hash holds 19 MiB for tens of milliseconds of CPU. Run on tokio's blocking
//! pool without a bound, a login flood starts hundreds of them at once: memory grows by
//! gigabytes and every login slows down together. Here at most `concurrency` hashes run, at
//! most `queue` more wait, and a request past that is refused at once with a 503 and
//! `Retry-After` — so an instance's hashing memory is bounded by `concurrency × 19 MiB`
//! whatever the load.

use crate::error::{AppError, AppResult};
use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use axum::http::StatusCode;
use holdfast_core::Password;
use std::sync::{Arc, LazyLock};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// argon2id with the crate's defaults (m = 19 MiB, t = 2, p = 1: the OWASP baseline).
fn hasher() -> Argon2<'static> {
    Argon2::default()
}

/// A real hash of a random password, verified against when the email is unknown so that
/// "no such user" and "wrong password" take the same time.
static DUMMY_HASH: LazyLock<String> = LazyLock::new(|| {
    let salt = SaltString::generate(&mut OsRng);
    hasher()
        .hash_password(b"not-a-real-password", &salt)
        .map(|h| h.to_string())
        .unwrap_or_default()
});

/// The bounded pool; cheap to clone.
#[derive(Clone)]
pub struct PasswordPool {
    /// Hashes running or waiting; `try_acquire` on it is the admission check.
    admitted: Arc<Semaphore>,
    /// Hashes running.
    running: Arc<Semaphore>,
}

impl PasswordPool {
    /// At most `concurrency` hashes at once (at least 1), at most `queue` waiting.
    pub fn new(concurrency: usize, queue: usize) -> Self {
        let concurrency = concurrency.max(1);
        Self {
            admitted: Arc::new(Semaphore::new(concurrency + queue)),
            running: Arc::new(Semaphore::new(concurrency)),
        }
    }

    pub async fn hash(&self, p: Password) -> AppResult<String> {
        self.run(move || {
            let salt = SaltString::generate(&mut OsRng);
            hasher()
                .hash_password(p.expose().as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(AppError::internal)
        })
        .await?
    }

    /// Whether `p` matches `stored`; with no stored hash (no such account) a dummy hash is
    /// checked anyway and the answer is `false`.
    pub async fn verify(&self, p: Password, stored: Option<String>) -> AppResult<bool> {
        self.run(move || {
            let known = stored.is_some();
            let hash = stored.unwrap_or_else(|| DUMMY_HASH.clone());
            let ok = PasswordHash::new(&hash)
                .is_ok_and(|h| hasher().verify_password(p.expose().as_bytes(), &h).is_ok());
            known && ok
        })
        .await
    }

    /// Admits `work` or refuses it (503) when the queue is full; runs it off the async threads.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> AppResult<T> {
        let admitted = Arc::clone(&self.admitted)
            .try_acquire_owned()
            .map_err(|_| busy())?;
        let running = Arc::clone(&self.running)
            .acquire_owned()
            .await
            .map_err(AppError::internal)?;
        let permits: (OwnedSemaphorePermit, OwnedSemaphorePermit) = (admitted, running);
        tokio::task::spawn_blocking(move || {
            let _held = permits;
            work()
        })
        .await
        .map_err(AppError::internal)
    }
}

fn busy() -> AppError {
    metrics::counter!("holdfast_password_hash_refused_total").increment(1);
    AppError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "busy",
        "too many sign-ins at once; retry shortly",
    )
    .retry_after(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn password() -> Password {
        Password::parse("correct horse battery").expect("valid")
    }

    #[tokio::test]
    async fn a_full_queue_refuses_instead_of_waiting() {
        let pool = PasswordPool::new(1, 1);
        // Hold the only running slot and the only queue slot.
        let running = Arc::clone(&pool.running).acquire_owned().await.unwrap();
        let queued = Arc::clone(&pool.admitted)
            .try_acquire_many_owned(2)
            .unwrap();
        let refused = pool.hash(password()).await.unwrap_err();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        drop((running, queued));
        let hash = pool.hash(password()).await.unwrap();
        assert!(pool.verify(password(), Some(hash)).await.unwrap());
        assert!(!pool.verify(password(), None).await.unwrap());
    }

    #[tokio::test]
    async fn no_more_than_concurrency_hashes_run_at_once() {
        let pool = PasswordPool::new(2, 64);
        let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let now = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let (pool, peak, now) = (pool.clone(), peak.clone(), now.clone());
            tasks.spawn(async move {
                pool.run(move || {
                    use std::sync::atomic::Ordering::SeqCst;
                    let n = now.fetch_add(1, SeqCst) + 1;
                    peak.fetch_max(n, SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    now.fetch_sub(1, SeqCst);
                })
                .await
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap().unwrap();
        }
        assert!(peak.load(std::sync::atomic::Ordering::SeqCst) <= 2);
    }
}
