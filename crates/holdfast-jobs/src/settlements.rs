//! Group commit for settlements on PostgreSQL. Each settlement is a handful of small writes,
//! and alone it costs a statement, a round trip and a durable commit. The writes are cheap,
//! so the statement and the commit are most of the cost. So settlements of one job kind that
//! arrive while an earlier statement of that kind is being written wait for it to finish,
//! then go together in the next one. A lone settlement is written at once.
//!
//! Each kind has one writer task. Per kind, only one statement is in flight at a time in this
//! process. Every settlement in a shared statement has its own steps under its own names, so
//! each is fenced by its own claim: a stale attempt writes nothing, just as it would alone.
//! When a shared statement fails, its members settle one by one instead, so that one bad
//! settlement cannot fail the others.

use holdfast_store::{Statement, Store};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use tokio::sync::{mpsc, watch};

/// Settlements in one statement at most. The job slots of a worker bound them already (32 a
/// queue by default); this bounds the statement's size and its placeholders for any number of
/// slots. A settlement that finds the next statement full is written alone, at once.
const MAX_MEMBERS: usize = 64;

/// How the statement a settlement joined ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Shared {
    /// It committed. (A member whose claim was no longer current wrote nothing, and that
    /// counts as settled, as it does alone.)
    Committed,
    /// It did not commit, and it held other settlements too; or it was full: settle alone.
    SettleAlone,
    /// It held this settlement only, and failed with this error.
    Failed(String),
}

/// The open statements, one per job kind. Cheap to share.
#[derive(Default)]
pub(crate) struct Settlements {
    kinds: Mutex<HashMap<String, Arc<Kind>>>,
}

/// One job kind's settlements: the statement that arrivals join, and a wake-up for its writer.
struct Kind {
    open: Mutex<Option<Open>>,
    wake: mpsc::UnboundedSender<()>,
}

/// A statement that is still taking settlements.
struct Open {
    stmt: Statement,
    /// The step whose rows say the statement did its work.
    answers_for: String,
    members: usize,
    done: watch::Sender<Option<Shared>>,
}

impl Settlements {
    /// Adds one settlement to the next statement for job kind `name`, and waits for that
    /// statement (or answers [`Shared::SettleAlone`] at once when it is full). `add` writes
    /// the settlement's steps into it. It is given a number that no other member of that
    /// statement has, so that it can name its steps apart. `answers_for` names the step the
    /// statement answers for (its first member's, which `add` wrote given 0).
    pub(crate) async fn join(
        &self,
        store: &Store,
        name: &str,
        answers_for: impl FnOnce() -> String,
        add: impl FnOnce(&mut Statement, usize),
    ) -> Shared {
        let kind = self.kind(store, name);
        let mut done = {
            let mut open = lock(&kind.open);
            let open = open.get_or_insert_with(|| Open {
                stmt: Statement::new(),
                answers_for: answers_for(),
                members: 0,
                done: watch::channel(None).0,
            });
            if open.members >= MAX_MEMBERS {
                return Shared::SettleAlone;
            }
            add(&mut open.stmt, open.members);
            open.members += 1;
            open.done.subscribe()
        };
        if kind.wake.send(()).is_err() {
            // The writer is gone: the runtime it was started on shut down. Dropping the open
            // statement tells every member to settle alone, and the next settlement of this
            // kind starts a new writer.
            lock(&kind.open).take();
            let mut kinds = lock(&self.kinds);
            if kinds.get(name).is_some_and(|k| Arc::ptr_eq(k, &kind)) {
                kinds.remove(name);
            }
        }
        let ended = done.wait_for(Option::is_some).await;
        match ended.as_deref() {
            Ok(Some(shared)) => shared.clone(),
            // The statement was dropped unwritten (its writer is gone).
            _ => Shared::SettleAlone,
        }
    }

    /// `name`'s statements, and their writer (started on first use).
    fn kind(&self, store: &Store, name: &str) -> Arc<Kind> {
        let mut kinds = lock(&self.kinds);
        if let Some(kind) = kinds.get(name) {
            return kind.clone();
        }
        let (wake, woken) = mpsc::unbounded_channel();
        let kind = Arc::new(Kind {
            open: Mutex::new(None),
            wake,
        });
        tokio::spawn(write(store.clone(), Arc::downgrade(&kind), woken));
        kinds.insert(name.to_owned(), kind.clone());
        kind
    }
}

/// One kind's writer: on each wake-up, takes the open statement (everything that joined it
/// so far) and writes it. It stops when its [`Kind`] is dropped with the [`Settlements`].
async fn write(store: Store, kind: Weak<Kind>, mut woken: mpsc::UnboundedReceiver<()>) {
    while woken.recv().await.is_some() {
        // Every member that joined before the take is in the statement taken next; a later
        // one opens a new statement and wakes this task again.
        while woken.try_recv().is_ok() {}
        let Some(open) = kind.upgrade().and_then(|k| lock(&k.open).take()) else {
            continue;
        };
        let written = store
            .run_statement("effect_settle", &open.stmt, &open.answers_for)
            .await;
        let shared = match written {
            Ok(_) => Shared::Committed,
            Err(e) if open.members == 1 => Shared::Failed(e.to_string()),
            Err(e) => {
                tracing::debug!(members = open.members, error = %e, "a shared settlement failed; its members settle alone");
                Shared::SettleAlone
            }
        };
        open.done.send_replace(Some(shared));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use holdfast_store::StoreOptions;
    use std::time::Duration;

    /// A writer dies with the runtime it was started on. A settlement that finds it gone
    /// does not wait for it: it settles alone, and the next one starts a new writer.
    #[test]
    fn a_writer_gone_with_its_runtime_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let lasting = tokio::runtime::Runtime::new().unwrap();
        // SQLite refuses a composed statement at once, without I/O: the writer's answer is
        // its refusal, which is all this test needs of it.
        let url = holdfast_store::testing::sqlite_url(dir.path());
        let store = lasting
            .block_on(Store::open(&StoreOptions::new(&url)))
            .unwrap();
        let settlements = Settlements::default();
        let settle = || async {
            let joined = settlements.join(&store, "pay", String::new, |_, _| {});
            tokio::time::timeout(Duration::from_secs(10), joined).await
        };
        let short_lived = tokio::runtime::Runtime::new().unwrap();
        let first = short_lived.block_on(settle()).unwrap();
        assert!(matches!(first, Shared::Failed(_)), "{first:?}");
        drop(short_lived);

        let orphaned = lasting
            .block_on(settle())
            .expect("waited for a writer that is gone");
        assert_eq!(orphaned, Shared::SettleAlone);
        let next = lasting.block_on(settle()).unwrap();
        assert!(
            matches!(next, Shared::Failed(_)),
            "a new writer answers: {next:?}"
        );
    }
}
