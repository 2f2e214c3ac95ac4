//! Holdfast's shared vocabulary, with no I/O in it.
//!
//! What every service built on Holdfast parses at its boundary (an email, a password, a
//! session id, an `Idempotency-Key`) becomes a newtype here that can only hold a valid value,
//! so the store and the web tier never juggle raw strings. Which database engine holds the
//! state is a [`Backend`]. The crate also owns the retry policy (full-jitter backoff, a retry budget and a
//! deadline) because it is a rule about time and failure, not about any particular backend.
//!
//! Architecture invariant: this crate knows nothing about axum, sqlx, tokio or HTTP.

/// A unit-only enum whose variants have command-line names, with `ALL`, `name()`, `Display`
/// and `FromStr` (which names the valid choices when it refuses).
macro_rules! named_variants {
    ($(#[$meta:meta])* pub enum $ty:ident { $($(#[$vmeta:meta])* $variant:ident => $name:literal),+ $(,)? }) => {
        $(#[$meta])*
        pub enum $ty {
            $($(#[$vmeta])* $variant),+
        }

        impl $ty {
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The name on the command line.
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $ty::ALL.iter().copied().find(|v| v.name() == s).ok_or_else(|| {
                    let names: Vec<&str> = $ty::ALL.iter().map(|v| v.name()).collect();
                    format!("{s:?}: expected one of {}", names.join(", "))
                })
            }
        }
    };
}

mod backend;
mod ids;
pub mod retry;
pub mod sabotage;

pub use backend::{debian_postgres_bin_dirs, Backend};
pub use ids::{
    DeviceToken, Email, IdempotencyKey, Password, RequestFingerprint, SessionId, UserId,
};
pub use sabotage::Sabotage;

/// A value from outside failed to parse. The message is safe to show to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ParseError {
    pub field: &'static str,
    pub reason: String,
}

impl ParseError {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// `500ms`, `20s`, `30m`, `12h`, `7d`: one whole number and one unit.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit, e.g. 30s"))?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: unit must be one of ms, s, m, h, d")),
    };
    n.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?}: too long"))
}

/// An error and every cause under it, `outer: inner: root` — where "connection reset" lives.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Milliseconds since the Unix epoch: the one time unit the store persists.
pub fn now_ms() -> i64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One metric family a crate exports: what `# HELP` says, and the label sets that exist at 0
/// from the start (so a query for a counter that has not happened yet finds 0, not nothing).
/// Each crate lists its families in a `METRICS` catalog; the binary describes them all when it
/// installs its recorder.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: MetricKind,
    pub help: &'static str,
    /// Label sets registered at 0 (counters and gauges); empty: one unlabeled series.
    pub zero: &'static [&'static [(&'static str, &'static str)]],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl Metric {
    pub const fn counter(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            kind: MetricKind::Counter,
            help,
            zero: &[],
        }
    }
    pub const fn gauge(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            kind: MetricKind::Gauge,
            help,
            zero: &[],
        }
    }
    pub const fn histogram(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            kind: MetricKind::Histogram,
            help,
            zero: &[],
        }
    }
    /// The label sets that exist at 0 from the start.
    pub const fn at_zero(
        mut self,
        zero: &'static [&'static [(&'static str, &'static str)]],
    ) -> Self {
        self.zero = zero;
        self
    }
}

/// The `n`th distinct source address on the loopback network (127.1.0.0/16 onwards; Linux
/// answers all of 127.0.0.0/8 on `lo`). Load generators and test clients bind one per
/// simulated user, so that per-address rate limits see many users, as they would in
/// production, instead of one 127.0.0.1 doing everything.
pub fn loopback_source(n: u64) -> std::net::IpAddr {
    let n = n % (250 * 250 * 250);
    let octet = |k: u64| ((n / k) % 250) as u8 + 1;
    std::net::IpAddr::from([127, octet(250 * 250), octet(250), octet(1)])
}

#[cfg(test)]
mod tests {
    use super::{parse_duration, Backend, Sabotage};
    use std::time::Duration;

    #[test]
    fn named_variants_round_trip_and_refuse_the_rest() {
        fn check<T>(all: &[T], bad: &str)
        where
            T: Copy
                + PartialEq
                + std::fmt::Debug
                + std::fmt::Display
                + std::str::FromStr<Err = String>,
        {
            for &v in all {
                assert_eq!(v.to_string().parse::<T>(), Ok(v));
            }
            let refused = bad.parse::<T>().unwrap_err();
            assert!(refused.contains(&all[0].to_string()), "{refused}");
        }
        check(Backend::ALL, "mysql");
        check(Sabotage::ALL, "nothing");
    }

    #[test]
    fn durations() {
        let check = |s: &str, want: Option<Duration>| assert_eq!(parse_duration(s).ok(), want);
        check("500ms", Some(Duration::from_millis(500)));
        check("20s", Some(Duration::from_secs(20)));
        check("30m", Some(Duration::from_secs(1800)));
        check("12h", Some(Duration::from_secs(43_200)));
        check("1d", Some(Duration::from_secs(86_400)));
        check("0s", Some(Duration::ZERO));
        check("10", None);
        check("s", None);
        check("1.5s", None);
        check("-1s", None);
        check("5 s", None);
    }
}
