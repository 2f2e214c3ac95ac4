//! Deliberately broken builds, for proving that the tests and the drill catch what they claim
//! to catch. One type names them all: the drill's `--sabotage KIND` and the system's hidden
//! `--unsafe-sabotage KIND` take the same names. What each one breaks is implemented in one
//! place, `holdfast-shop`'s `sabotage` module. Never set in production.

named_variants! {
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum Sabotage {
        /// Web instances ignore `Idempotency-Key`: every retry of a checkout runs again.
        NoIdempotency => "no-idempotency",
        /// Web instances answer a checkout 201 at once and commit it a moment later: an
        /// instance that dies in between has acknowledged an order that never existed.
        AckBeforeCommit => "ack-before-commit",
        /// Workers skip the effect ledger and call the provider with a fresh idempotency key
        /// on every attempt: redelivered payouts charge twice.
        LedgerBypass => "ledger-bypass",
        /// The backup is damaged: bytes flipped in every file the continuous backup wrote,
        /// just before the `lose-primary` fault restores from it (a failing disk, a bad copy).
        /// Done by the drill to the files, not by a build: the restore must refuse.
        CorruptBackup => "corrupt-backup",
    }
}
