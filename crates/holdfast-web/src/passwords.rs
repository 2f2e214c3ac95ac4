//! argon2id password hashing on a bounded pool.
//!
//! One argon2id hash holds 19 MiB for tens of milliseconds of CPU. Run on tokio's blocking
//! pool without a bound, a login flood starts hundreds of them at once: memory grows by
//! gigabytes and every login slows down together. Even with a bound, hashes spread over
//! ever-new blocking threads leave 19 MiB in each thread's malloc arena. Here hashes run on
//! `concurrency` threads of their own (so at most that many arenas ever hold a hash's memory),
//! at most `queue` more wait, and a request past that is refused at once with a 503 and
//! `Retry-After` — so an instance's hashing memory stays near `concurrency × 19 MiB` whatever
//! the load.

use crate::error::{AppError, AppResult};
use argon2::password_hash::{
    self, rand_core::OsRng, Output, ParamsString, PasswordHash, PasswordHasher, Salt, SaltString,
};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use axum::http::StatusCode;
use holdfast_core::Password;
use std::cell::RefCell;
use std::sync::{mpsc, Arc, LazyLock, Mutex, PoisonError};
use tokio::sync::{oneshot, Semaphore};

type Job = Box<dyn FnOnce() + Send>;

/// argon2id with the crate's defaults (m = 19 MiB, t = 2, p = 1: the OWASP baseline).
fn hasher() -> Argon2<'static> {
    Argon2::default()
}

thread_local! {
    /// A hashing thread's argon2 memory (19 MiB with the defaults), kept between hashes: the
    /// pool's threads never allocate it twice, so the allocator never strands copies of it.
    static BLOCKS: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

/// argon2 of `password` with `salt`, in this thread's reused memory, as a PHC string's parts.
fn argon2_reusing_memory<'a>(
    algorithm: Algorithm,
    version: Version,
    params: &Params,
    password: &[u8],
    salt: Salt<'a>,
) -> password_hash::Result<PasswordHash<'a>> {
    let mut salt_bytes = [0u8; 64];
    let salt_bytes = salt.decode_b64(&mut salt_bytes)?;
    let argon = Argon2::new(algorithm, version, params.clone());
    let len = params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN);
    let need = params.block_count();
    let output = BLOCKS.with_borrow_mut(|blocks| {
        if blocks.len() < need {
            blocks.resize(need, Block::default());
        }
        Output::init_with(len, |out| {
            Ok(argon.hash_password_into_with_memory(
                password,
                salt_bytes,
                out,
                &mut blocks[..need],
            )?)
        })
    })?;
    Ok(PasswordHash {
        algorithm: algorithm.ident(),
        version: Some(version.into()),
        params: ParamsString::try_from(params)?,
        salt: Some(salt),
        hash: Some(output),
    })
}

/// Whether `password` matches the PHC string `stored` (any argon2 variant and parameters).
fn matches(password: &[u8], stored: &str) -> bool {
    let check = || -> password_hash::Result<bool> {
        let stored = PasswordHash::new(stored)?;
        let (Some(salt), Some(expected)) = (stored.salt, stored.hash) else {
            return Ok(false);
        };
        let algorithm = Algorithm::try_from(stored.algorithm)?;
        let version = stored
            .version
            .map(Version::try_from)
            .transpose()?
            .unwrap_or_default();
        let params = Params::try_from(&stored)?;
        let computed = argon2_reusing_memory(algorithm, version, &params, password, salt)?;
        // `Output`'s equality is constant-time.
        Ok(computed.hash == Some(expected))
    };
    check().unwrap_or(false)
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

/// The bounded pool; cheap to clone. Its threads end when the last clone is dropped.
#[derive(Clone)]
pub struct PasswordPool {
    /// Hashes running or waiting; `try_acquire` on it is the admission check.
    admitted: Arc<Semaphore>,
    jobs: mpsc::Sender<Job>,
}

impl PasswordPool {
    /// At most `concurrency` hashes at once (at least 1), on as many threads; at most `queue`
    /// waiting.
    pub fn new(concurrency: usize, queue: usize) -> Self {
        let concurrency = concurrency.max(1);
        let (jobs, inbox) = mpsc::channel::<Job>();
        let inbox = Arc::new(Mutex::new(inbox));
        for i in 0..concurrency {
            let inbox = Arc::clone(&inbox);
            let spawned = std::thread::Builder::new()
                .name(format!("password-hash-{i}"))
                .spawn(move || loop {
                    let next = inbox.lock().unwrap_or_else(PoisonError::into_inner).recv();
                    match next {
                        Ok(job) => job(),
                        Err(mpsc::RecvError) => return,
                    }
                });
            if let Err(e) = spawned {
                // Fewer threads only means fewer hashes at once; with none, `run` says so.
                tracing::error!(error = %e, "could not start a password hashing thread");
            }
        }
        Self {
            admitted: Arc::new(Semaphore::new(concurrency + queue)),
            jobs,
        }
    }

    pub async fn hash(&self, p: Password) -> AppResult<String> {
        self.run(move || {
            let salt = SaltString::generate(&mut OsRng);
            argon2_reusing_memory(
                Algorithm::Argon2id,
                Version::V0x13,
                &Params::default(),
                p.expose().as_bytes(),
                salt.as_salt(),
            )
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
            let ok = matches(p.expose().as_bytes(), &hash);
            known && ok
        })
        .await
    }

    /// Admits `work` or refuses it (503) when the queue is full; runs it on the pool's threads.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> AppResult<T> {
        let admitted = Arc::clone(&self.admitted)
            .try_acquire_owned()
            .map_err(|_| busy())?;
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _admitted = admitted;
            let _ = reply.send(work());
        });
        self.jobs
            .send(job)
            .map_err(|_| AppError::internal("no password hashing thread is running"))?;
        answer
            .await
            .map_err(|_| AppError::internal("a password hash was abandoned"))
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
        let full = Arc::clone(&pool.admitted)
            .try_acquire_many_owned(2)
            .unwrap();
        let refused = pool.hash(password()).await.unwrap_err();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        drop(full);
        let hash = pool.hash(password()).await.unwrap();
        assert!(pool.verify(password(), Some(hash)).await.unwrap());
        assert!(!pool.verify(password(), None).await.unwrap());
    }

    #[tokio::test]
    async fn hashes_agree_with_the_stock_argon2_both_ways() {
        let pool = PasswordPool::new(1, 1);
        let salt = SaltString::generate(&mut OsRng);
        let stock = hasher()
            .hash_password(password().expose().as_bytes(), &salt)
            .unwrap()
            .to_string();
        assert!(pool.verify(password(), Some(stock.clone())).await.unwrap());
        let wrong = Password::parse("not the password").unwrap();
        assert!(!pool.verify(wrong, Some(stock)).await.unwrap());
        let ours = pool.hash(password()).await.unwrap();
        let parsed = PasswordHash::new(&ours).unwrap();
        use argon2::password_hash::PasswordVerifier;
        assert!(hasher()
            .verify_password(password().expose().as_bytes(), &parsed)
            .is_ok());
        assert!(
            ours.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{ours}"
        );
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
