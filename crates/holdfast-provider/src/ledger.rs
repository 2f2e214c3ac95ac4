//! An append-only list of effects (charges or emails) with their idempotency keys.
//!
//! A key is claimed (`InFlight`) before the effect and committed (`Done`) with it; the claim
//! is the per-key lock. The ledger's mutex is held only for these in-memory steps, never
//! across an `.await`, so a slow request holds its key, not the ledger.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

pub(crate) struct Ledger<Req, Rec> {
    records: Vec<Rec>,
    keys: HashMap<String, Slot<Req>>,
}

enum Slot<Req> {
    InFlight(Req),
    Done { req: Req, index: usize },
}

/// The answer to "may this request act under this key?".
pub(crate) enum Claim<Rec> {
    /// The key is new (or absent) and is now held by this request.
    Fresh,
    /// The key already produced this record with the same payload.
    Replay(Rec),
    /// Another request with this key and this payload is still being processed.
    Busy,
    /// The key was used with a different payload.
    Mismatch,
}

impl<Req: PartialEq + Clone, Rec: Clone> Ledger<Req, Rec> {
    pub fn new() -> Self {
        Self {
            records: Vec::new(),
            keys: HashMap::new(),
        }
    }

    pub fn claim(&mut self, key: &str, req: &Req) -> Claim<Rec> {
        match self.keys.get(key) {
            None => {
                self.keys
                    .insert(key.to_owned(), Slot::InFlight(req.clone()));
                Claim::Fresh
            }
            Some(Slot::InFlight(held)) if held == req => Claim::Busy,
            Some(Slot::Done { req: done, index }) if done == req => {
                Claim::Replay(self.records[*index].clone())
            }
            Some(_) => Claim::Mismatch,
        }
    }

    /// Records the effect and, when it has a key, turns the key's claim into `Done`.
    pub fn commit(&mut self, key: Option<String>, req: Req, record: Rec) {
        if let Some(key) = key {
            let index = self.records.len();
            self.keys.insert(key, Slot::Done { req, index });
        }
        self.records.push(record);
    }

    /// Drops a claim that never committed, so the key can be used again.
    fn release(&mut self, key: &str) {
        if matches!(self.keys.get(key), Some(Slot::InFlight(_))) {
            self.keys.remove(key);
        }
    }

    /// Every record in creation order, or the one committed under `key`.
    pub fn list(&self, key: Option<&str>) -> Vec<Rec> {
        match key {
            None => self.records.clone(),
            Some(key) => match self.keys.get(key) {
                Some(Slot::Done { index, .. }) => vec![self.records[*index].clone()],
                _ => Vec::new(),
            },
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while a ledger is locked; if something ever did, its data is still a
    // consistent list, so carry on rather than take the provider down.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A claimed key; dropping it before [`Hold::disarm`] releases the claim (the request failed
/// or its client went away mid-latency), so a retry is not answered 409 forever.
pub(crate) struct Hold<'a, Req: PartialEq + Clone, Rec: Clone> {
    ledger: &'a Mutex<Ledger<Req, Rec>>,
    key: Option<String>,
}

impl<'a, Req: PartialEq + Clone, Rec: Clone> Hold<'a, Req, Rec> {
    pub fn new(ledger: &'a Mutex<Ledger<Req, Rec>>, key: String) -> Self {
        Self {
            ledger,
            key: Some(key),
        }
    }

    /// Hands the key over for [`Ledger::commit`].
    pub fn disarm(mut self) -> Option<String> {
        self.key.take()
    }
}

impl<Req: PartialEq + Clone, Rec: Clone> Drop for Hold<'_, Req, Rec> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            lock(self.ledger).release(&key);
        }
    }
}
