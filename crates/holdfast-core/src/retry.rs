//! When and how long to wait before trying again.
//!
//! Three brakes, all needed: **full jitter** (`rand(0, min(cap, base·2ⁿ))`) so a fleet that
//! failed together does not retry together; a **deadline** so a caller never waits longer than
//! its own client will; and a **retry budget** shared by all callers of one instance so that a
//! dependency that is down gets a trickle of retries, not a multiple of normal load.
//! The async loop that sleeps lives next to the I/O (see `holdfast-store`); this is the policy.

use rand::Rng;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub base: Duration,
    pub cap: Duration,
    /// Attempts in all, the first one included.
    pub max_attempts: u32,
    /// No retry starts after this much time since the first attempt.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(1000),
            max_attempts: 8,
            deadline: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// Full-jitter delay before retry number `retry` (0 for the first retry).
    pub fn delay(&self, retry: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32.checked_shl(retry.min(30)).unwrap_or(u32::MAX));
        let ceiling = exp.min(self.cap);
        let nanos = ceiling.as_nanos().min(u128::from(u64::MAX)) as u64;
        Duration::from_nanos(if nanos == 0 {
            0
        } else {
            rand::thread_rng().gen_range(0..=nanos)
        })
    }

    /// Whether another attempt may start, given how many were made and when the first began.
    /// The wait that would follow is included, so the retry itself starts before the deadline.
    pub fn next_delay(&self, attempts_made: u32, started: Instant) -> Option<Duration> {
        if attempts_made >= self.max_attempts {
            return None;
        }
        let d = self.delay(attempts_made.saturating_sub(1));
        (started.elapsed() + d < self.deadline).then_some(d)
    }
}

/// A token bucket shared by every caller of one process: each first attempt deposits
/// `ratio` of a token, each retry withdraws one. With ratio 0.1 retries add at most 10% load
/// once the initial `reserve` is spent.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    inner: Arc<BudgetInner>,
}

#[derive(Debug)]
struct BudgetInner {
    /// Tokens in thousandths, so deposits of a fraction need no float atomics.
    milli_tokens: AtomicI64,
    deposit_milli: i64,
    max_milli: i64,
}

impl RetryBudget {
    pub fn new(ratio: f64, reserve: u32) -> Self {
        let max = i64::from(reserve) * 1000;
        Self {
            inner: Arc::new(BudgetInner {
                milli_tokens: AtomicI64::new(max),
                deposit_milli: (ratio * 1000.0) as i64,
                max_milli: max,
            }),
        }
    }

    pub fn record_attempt(&self) {
        let i = &self.inner;
        let _ = i
            .milli_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some((t + i.deposit_milli).min(i.max_milli))
            });
    }

    /// Takes one token for a retry; `false` means the budget is spent and the caller must fail.
    pub fn try_withdraw(&self) -> bool {
        self.inner
            .milli_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                (t >= 1000).then_some(t - 1000)
            })
            .is_ok()
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new(0.1, 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_jitter_stays_under_the_exponential_ceiling_and_the_cap() {
        let p = RetryPolicy {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(100),
            ..Default::default()
        };
        for retry in 0..40 {
            let ceiling = Duration::from_millis(10 * 2u64.pow(retry.min(20))).min(p.cap);
            for _ in 0..50 {
                assert!(p.delay(retry) <= ceiling);
            }
        }
        // Jitter actually spreads: 200 draws of the capped delay are not all equal.
        let draws: std::collections::HashSet<_> = (0..200).map(|_| p.delay(10)).collect();
        assert!(draws.len() > 50);
    }

    #[test]
    fn attempts_and_deadline_stop_retries() {
        let p = RetryPolicy {
            max_attempts: 3,
            ..Default::default()
        };
        let t = Instant::now();
        assert!(p.next_delay(1, t).is_some());
        assert!(p.next_delay(2, t).is_some());
        assert!(p.next_delay(3, t).is_none());
        let p = RetryPolicy {
            deadline: Duration::ZERO,
            ..Default::default()
        };
        assert!(p.next_delay(1, t).is_none());
    }

    #[test]
    fn budget_limits_retries_to_a_share_of_attempts() {
        let b = RetryBudget::new(0.1, 2);
        assert!(b.try_withdraw() && b.try_withdraw());
        assert!(!b.try_withdraw(), "reserve spent");
        for _ in 0..10 {
            b.record_attempt();
        }
        assert!(b.try_withdraw(), "ten attempts earn one retry");
        assert!(!b.try_withdraw());
    }
}
