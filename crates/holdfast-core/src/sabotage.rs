//! Deliberately broken builds, for proving that the tests and the drill catch what they claim
//! to catch. One type names them all: the drill's `--sabotage KIND` and the system's hidden
//! `--unsafe-sabotage KIND` take the same names. What each one breaks is implemented in one
//! place, `holdfast-shop`'s `sabotage` module. Never set in production.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sabotage {
    /// Web instances ignore `Idempotency-Key`: every retry of a checkout runs again.
    NoIdempotency,
    /// Web instances answer a checkout 201 at once and commit it a moment later: an instance
    /// that dies in between has acknowledged an order that never existed.
    AckBeforeCommit,
    /// Workers skip the effect ledger and call the provider with a fresh idempotency key on
    /// every attempt: redelivered payouts charge twice.
    LedgerBypass,
}

impl Sabotage {
    pub const ALL: [Sabotage; 3] = [
        Sabotage::NoIdempotency,
        Sabotage::AckBeforeCommit,
        Sabotage::LedgerBypass,
    ];

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Sabotage::NoIdempotency => "no-idempotency",
            Sabotage::AckBeforeCommit => "ack-before-commit",
            Sabotage::LedgerBypass => "ledger-bypass",
        }
    }
}

impl fmt::Display for Sabotage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Sabotage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Sabotage::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Sabotage::ALL.iter().map(|k| k.name()).collect();
                format!("{s:?}: expected one of {}", names.join(", "))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::Sabotage;

    #[test]
    fn names_round_trip() {
        for k in Sabotage::ALL {
            assert_eq!(k.name().parse::<Sabotage>(), Ok(k));
        }
        assert!("nothing".parse::<Sabotage>().is_err());
    }
}
