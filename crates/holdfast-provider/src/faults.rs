//! The fault configuration and the dice that turn it into per-request decisions.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Faults injected into `POST /charges` and `POST /emails`; `Default` injects none.
///
/// A field left out of a `PUT /_faults` body takes its default, so `{}` clears every fault.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added before acting, while the request's idempotency key is held (so a concurrent
    /// request with the same key meets a 409).
    pub latency_ms: u64,
    /// Probability (0..=1) of answering 503 without acting.
    pub fail_rate: f64,
    /// Probability (0..=1) of acting, then not answering for `hang_ms`, then closing the
    /// connection without a response.
    pub act_then_timeout_rate: f64,
    /// How long an act-then-timeout request hangs before its connection is closed.
    pub hang_ms: u64,
    /// Makes the sequence of decisions reproducible; `None` draws from the OS.
    pub seed: Option<u64>,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            latency_ms: 0,
            fail_rate: 0.0,
            act_then_timeout_rate: 0.0,
            hang_ms: 30_000,
            seed: None,
        }
    }
}

impl Faults {
    /// Checks that both rates are probabilities.
    pub fn validate(&self) -> Result<(), String> {
        for (name, rate) in [
            ("fail_rate", self.fail_rate),
            ("act_then_timeout_rate", self.act_then_timeout_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{name} must be between 0 and 1, got {rate}"));
            }
        }
        Ok(())
    }
}

/// What one request suffers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Decision {
    pub latency: Duration,
    pub fail: bool,
    /// `Some(hang)`: act, then hang and close the connection unanswered.
    pub hang: Option<Duration>,
}

/// The current faults and the generator that draws from them, replaced together.
pub(crate) struct Dice {
    faults: Faults,
    rng: StdRng,
}

impl Dice {
    pub fn new(faults: Faults) -> Self {
        let rng = match faults.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        };
        Self { faults, rng }
    }

    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Draws one decision. Every request consumes exactly two numbers whatever the rates,
    /// so a seed fixes the n-th request's fate.
    pub fn roll(&mut self) -> Decision {
        let fail_draw: f64 = self.rng.gen();
        let hang_draw: f64 = self.rng.gen();
        let fail = fail_draw < self.faults.fail_rate;
        Decision {
            latency: Duration::from_millis(self.faults.latency_ms),
            fail,
            hang: (!fail && hang_draw < self.faults.act_then_timeout_rate)
                .then(|| Duration::from_millis(self.faults.hang_ms)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(faults: &Faults) -> Vec<Decision> {
        let mut dice = Dice::new(faults.clone());
        (0..64).map(|_| dice.roll()).collect()
    }

    #[test]
    fn rates_at_the_edges_are_certain() {
        let never = pattern(&Faults::default());
        assert!(never.iter().all(|d| !d.fail && d.hang.is_none()));
        let fail = Faults {
            fail_rate: 1.0,
            act_then_timeout_rate: 1.0,
            ..Faults::default()
        };
        assert!(pattern(&fail).iter().all(|d| d.fail && d.hang.is_none()));
        let hang = Faults {
            act_then_timeout_rate: 1.0,
            hang_ms: 7,
            ..Faults::default()
        };
        assert!(pattern(&hang)
            .iter()
            .all(|d| !d.fail && d.hang == Some(Duration::from_millis(7))));
    }

    #[test]
    fn a_seed_fixes_the_sequence() {
        let faults = Faults {
            fail_rate: 0.5,
            act_then_timeout_rate: 0.5,
            seed: Some(7),
            ..Faults::default()
        };
        let first = pattern(&faults);
        assert_eq!(first, pattern(&faults));
        assert!(first.iter().any(|d| d.fail) && first.iter().any(|d| !d.fail));
    }

    #[test]
    fn validate_rejects_non_probabilities() {
        for bad in [-0.1, 1.5, f64::NAN] {
            let f = Faults {
                fail_rate: bad,
                ..Faults::default()
            };
            assert!(f.validate().is_err(), "{bad}");
        }
        assert!(Faults::default().validate().is_ok());
    }
}
