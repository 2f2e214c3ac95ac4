//! The history checker: a pure function from what the clients saw (the history) and what the
//! system holds at the end (the final state) to the violated invariants (`docs/INVARIANTS.md`).
//!
//! Jepsen style. Every client operation is recorded with when it was invoked and how it
//! completed: `ok` (acknowledged: a 2xx), `fail` (definitely not done: a 4xx, which a correct
//! server answers only when it did nothing — a retry of a key that did act replays instead),
//! or `unknown` (the client gave up without a definite answer: it may or may not have
//! happened). The checker only holds the system to what it promised: an ok checkout's order
//! must exist, an unknown one may or may not have made an order, so it widens what the final
//! state may hold instead of being blamed.
//!
//! What each count means (keys of the JSON report; every one must be 0 for a pass):
//! - §2.1 `orders_lost`: acknowledged orders absent from the final state;
//!   `orders_missing_on_read`: acknowledged orders their owner's later read did not find
//!   (even if they showed up afterwards: the acknowledgement came before the commit).
//! - §2.2 `orders_duplicated`: orders beyond one per checkout key — a key acknowledged with
//!   two different orders, or orders in the final state that no acknowledged or unknown
//!   checkout can account for; `replays_mismatched`: a retry of an acknowledged key answered
//!   with anything but the acknowledged order; `cart_items_duplicated`: cart quantity above
//!   what keyed adds can explain (an add applied twice).
//! - §2.3 per order in the final state: `charges_duplicated` (charges beyond one),
//!   `orders_unpaid` (not paid, or paid without a charge), `charges_wrong_amount`,
//!   `charges_orphaned` (a charge for an order that does not exist), `emails_duplicated`
//!   (receipts beyond one), `emails_missing` (a paid order without a receipt).
//! - §2.4 `sessions_lost`: a logged-in session refused (401) during the run or at the end
//!   (the ones during the run are also counted as `forced_relogins`, out of `logins`);
//!   `cart_items_lost`: acknowledged cart quantity missing from a later cart read, from the
//!   order that consumed the cart, or from the final cart.
//! - `final_state_unreadable`: an account whose final state could not be read (nothing can
//!   be judged about it); `no_progress`: no order was acknowledged at all, so nothing was shown.
//!
//! A drill that lost the node and restored it from its backup (`lose-primary`, [`Loss`])
//! holds the system to its backup's promise instead of to every acknowledgement: writes
//! acknowledged within the loss window before the loss may be gone — such an order is listed
//! in `orders_lost_to_restore` (not a violation), a session, cart line or checkout answer made
//! then may be forgotten, and a retry of such a checkout may place the order again — while
//! anything acknowledged earlier than the window must have survived like any other write.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

/// Quantity per SKU.
pub type Lines = BTreeMap<String, i64>;

/// One client operation, from invocation to completion.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Op {
    #[serde(flatten)]
    pub kind: OpKind,
    pub invoked_ms: u64,
    pub completed_ms: u64,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum OpKind {
    Signup,
    Login,
    CartAdd {
        key: String,
        sku: String,
        qty: i64,
    },
    CartRead,
    /// `late`: a re-send of an earlier, acknowledged key (a client's delayed retry).
    Checkout {
        key: String,
        late: bool,
    },
    OrderRead {
        order_id: String,
    },
}

impl OpKind {
    /// The operation's name, as in the history (`op`).
    pub fn name(&self) -> &'static str {
        match self {
            OpKind::Signup => "signup",
            OpKind::Login => "login",
            OpKind::CartAdd { .. } => "cart_add",
            OpKind::CartRead => "cart_read",
            OpKind::Checkout { .. } => "checkout",
            OpKind::OrderRead { .. } => "order_read",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Outcome {
    Ok { seen: Seen },
    Fail { status: u16, problem: String },
    Unknown { reason: String },
}

/// What an acknowledged operation returned, as far as the checks need it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Seen {
    Nothing,
    Cart(Lines),
    Order(OrderSeen),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OrderSeen {
    pub order_id: String,
    pub total_cents: i64,
    pub status: String,
    pub items: Lines,
}

/// The operations of one account, in order (one virtual user at a time drives an account).
#[derive(Clone, Debug, PartialEq)]
pub struct AccountHistory {
    pub email: String,
    pub ops: Vec<Op>,
}

/// One account at the end, read through the API.
#[derive(Clone, Debug, PartialEq)]
pub struct FinalAccount {
    pub email: String,
    /// `GET /api/me` with the account's last session was answered 200.
    pub session_valid: bool,
    /// `None`: could not be read.
    pub orders: Option<Vec<OrderSeen>>,
    pub cart: Option<Lines>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct Charge {
    pub order_id: String,
    pub amount_cents: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct Email {
    pub order_id: String,
    pub kind: String,
}

/// When an operation was invoked and when it completed (ms on the drill's clock).
type When = (u64, u64);

/// The node was lost at `at_ms` (the drill's clock) and restored from its backup: writes
/// acknowledged at most `window_ms` before may be gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loss {
    pub at_ms: u64,
    pub window_ms: u64,
}

impl Loss {
    /// Whether a write invoked and acknowledged at `(invoked_ms, completed_ms)` may have
    /// been lost with the node: acknowledged before the loss, and begun inside the window (a
    /// write begun earlier may have committed earlier, whenever its answer came).
    fn may_lose(self, (invoked_ms, completed_ms): When) -> bool {
        completed_ms <= self.at_ms && invoked_ms + self.window_ms >= self.at_ms
    }

    /// Whether an answer received at `completed_ms` came from the restored node (the loss's
    /// moment is taken once every process of the old node is dead; an operation invoked
    /// before it may have been retried onto the new node).
    fn after(self, completed_ms: u64) -> bool {
        completed_ms > self.at_ms
    }
}

/// The system at the end. `accounts[i]` belongs to `histories[i]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FinalState {
    pub accounts: Vec<FinalAccount>,
    pub charges: Vec<Charge>,
    /// Refunds the provider made, each read as the charge it gave back. Only a refund of an
    /// order a restore lost inside its window cancels its charge (the reconciliation's job);
    /// any other refunded charge still counts.
    pub refunds: Vec<Charge>,
    pub emails: Vec<Email>,
    /// Orders the drill's other clients placed (the reviewers of `kill-mid-upload`), read
    /// back as existing: a charge for one is not an orphan.
    pub elsewhere: BTreeSet<String>,
    /// Set when the node was lost and restored during the run.
    pub loss: Option<Loss>,
}

/// Acknowledged orders, and how often each invariant was violated.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub orders_acknowledged: u64,
    /// Not a violation: acknowledged orders gone with a lost node, acknowledged within the
    /// loss window (each is listed in [`Verdict::lost_to_restore`]).
    pub orders_lost_to_restore: u64,
    pub orders_lost: u64,
    pub orders_missing_on_read: u64,
    pub orders_duplicated: u64,
    pub replays_mismatched: u64,
    pub charges_duplicated: u64,
    pub charges_wrong_amount: u64,
    pub charges_orphaned: u64,
    pub emails_duplicated: u64,
    pub emails_missing: u64,
    pub orders_unpaid: u64,
    pub sessions_lost: u64,
    /// Not an invariant of its own (each one is also a `sessions_lost`): how often a logged-in
    /// user was refused (401) during the run without having logged out, and had to log in
    /// again; `logins` (acknowledged) is what it is a share of.
    pub forced_relogins: u64,
    pub logins: u64,
    pub cart_items_lost: u64,
    pub cart_items_duplicated: u64,
    pub final_state_unreadable: u64,
    pub no_progress: u64,
    /// Alerts a fault should have raised that did not fire (see `alerts.rs`).
    pub alerts_missed: u64,
    /// Alerts that fired in a drill without faults: noise.
    pub alerts_on_clean_run: u64,
    /// `kill-mid-upload`: complete uploads whose bytes are not the ones sent (or unreadable).
    pub uploads_corrupted: u64,
    /// `kill-mid-upload`: an acknowledged offset that went back.
    pub upload_offsets_backwards: u64,
    /// `kill-mid-upload`: a resume that had to send more than one chunk again.
    pub upload_resent_over_chunk: u64,
    /// `kill-mid-upload`: uploads not complete after the faults stopped.
    pub uploads_unfinished: u64,
    /// `lose-primary`: the node could not be restored from its backup, or the restore's
    /// integrity check did not say `ok`.
    pub restore_failed: u64,
}

impl Counts {
    /// Every violation count by its report key (`orders_acknowledged` is not one).
    pub fn violations(&self) -> [(&'static str, u64); 22] {
        [
            ("orders_lost", self.orders_lost),
            ("orders_missing_on_read", self.orders_missing_on_read),
            ("orders_duplicated", self.orders_duplicated),
            ("replays_mismatched", self.replays_mismatched),
            ("charges_duplicated", self.charges_duplicated),
            ("charges_wrong_amount", self.charges_wrong_amount),
            ("charges_orphaned", self.charges_orphaned),
            ("emails_duplicated", self.emails_duplicated),
            ("emails_missing", self.emails_missing),
            ("orders_unpaid", self.orders_unpaid),
            ("sessions_lost", self.sessions_lost),
            ("cart_items_lost", self.cart_items_lost),
            ("cart_items_duplicated", self.cart_items_duplicated),
            ("final_state_unreadable", self.final_state_unreadable),
            ("no_progress", self.no_progress),
            ("alerts_missed", self.alerts_missed),
            ("alerts_on_clean_run", self.alerts_on_clean_run),
            ("uploads_corrupted", self.uploads_corrupted),
            ("upload_offsets_backwards", self.upload_offsets_backwards),
            ("upload_resent_over_chunk", self.upload_resent_over_chunk),
            ("uploads_unfinished", self.uploads_unfinished),
            ("restore_failed", self.restore_failed),
        ]
    }

    /// The report keys of the violated invariants.
    pub fn violated(&self) -> Vec<&'static str> {
        self.violations()
            .into_iter()
            .filter(|&(_, n)| n > 0)
            .map(|(name, _)| name)
            .collect()
    }
}

/// One concrete violation, for the report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub invariant: &'static str,
    pub detail: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub counts: Counts,
    pub violations: Vec<Violation>,
    /// The orders a restore lost within its window.
    pub lost_to_restore: Vec<LostToRestore>,
}

/// An acknowledged order a restore lost inside its window (not a violation: the backup's
/// promise; listed in the report by id).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LostToRestore {
    pub account: String,
    pub order_id: String,
    pub key: String,
    /// How long before the loss it was acknowledged.
    pub before_loss_ms: u64,
    /// Inside the loss window: the backup's promise. Outside it, also an `orders_lost`.
    pub excused: bool,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.counts.violated().is_empty()
    }

    /// The `lose-primary` fault could not bring the node back (its restore failed or was not
    /// checked): `why`, from `holdfast restore`.
    pub fn add_restore_failure(&mut self, why: String) {
        self.add("restore_failed", 1, || why);
    }

    /// The `kill-mid-upload` fault's violations (see `uploads::judge`).
    pub fn add_upload_violations(&mut self, found: Vec<Violation>) {
        for v in found {
            self.add(v.invariant, 1, || v.detail);
        }
    }

    fn add(&mut self, invariant: &'static str, n: u64, detail: impl FnOnce() -> String) {
        if n == 0 {
            return;
        }
        let c = &mut self.counts;
        let count = match invariant {
            "orders_lost" => &mut c.orders_lost,
            "orders_missing_on_read" => &mut c.orders_missing_on_read,
            "orders_duplicated" => &mut c.orders_duplicated,
            "replays_mismatched" => &mut c.replays_mismatched,
            "charges_duplicated" => &mut c.charges_duplicated,
            "charges_wrong_amount" => &mut c.charges_wrong_amount,
            "charges_orphaned" => &mut c.charges_orphaned,
            "emails_duplicated" => &mut c.emails_duplicated,
            "emails_missing" => &mut c.emails_missing,
            "orders_unpaid" => &mut c.orders_unpaid,
            "sessions_lost" => &mut c.sessions_lost,
            "cart_items_lost" => &mut c.cart_items_lost,
            "cart_items_duplicated" => &mut c.cart_items_duplicated,
            "final_state_unreadable" => &mut c.final_state_unreadable,
            "no_progress" => &mut c.no_progress,
            "uploads_corrupted" => &mut c.uploads_corrupted,
            "upload_offsets_backwards" => &mut c.upload_offsets_backwards,
            "upload_resent_over_chunk" => &mut c.upload_resent_over_chunk,
            "uploads_unfinished" => &mut c.uploads_unfinished,
            "restore_failed" => &mut c.restore_failed,
            other => unreachable!("unknown invariant {other}"),
        };
        *count += n;
        self.violations.push(Violation {
            invariant,
            detail: detail(),
        });
    }
}

/// Checks every invariant; see the module docs for what each count means.
pub fn check(histories: &[AccountHistory], fin: &FinalState) -> Verdict {
    let mut v = Verdict::default();
    let mut all_orders: BTreeMap<&str, (&str, &OrderSeen)> = BTreeMap::new();
    let mut all_readable = true;
    for (i, h) in histories.iter().enumerate() {
        let account = fin.accounts.get(i).filter(|a| a.email == h.email);
        check_account(h, account, fin.loss, &mut v);
        match account.and_then(|a| a.orders.as_ref()) {
            Some(orders) => {
                for o in orders {
                    all_orders.insert(&o.order_id, (&h.email, o));
                }
            }
            None => all_readable = false,
        }
    }
    let lost: BTreeSet<String> = v
        .lost_to_restore
        .iter()
        .filter(|l| l.excused)
        .map(|l| l.order_id.clone())
        .collect();
    check_payments(fin, &all_orders, &lost, all_readable, &mut v);
    if v.counts.orders_acknowledged == 0 {
        v.add("no_progress", 1, || {
            "no checkout was acknowledged: the drill showed nothing".into()
        });
    }
    v
}

/// What an account's cart may hold: `min` is what acknowledged adds guarantee, `max` what
/// adds with an unknown outcome may also have put there. A shortfall or excess is reported
/// once per cart (until a checkout empties it), however many later reads still show it.
#[derive(Default)]
struct CartModel {
    min: Lines,
    max: Lines,
    reported_lost: Lines,
    reported_extra: Lines,
}

impl CartModel {
    fn add(&mut self, sku: &str, qty: i64, certain: bool) {
        if certain {
            *self.min.entry(sku.to_owned()).or_default() += qty;
        }
        *self.max.entry(sku.to_owned()).or_default() += qty;
    }

    /// (quantity newly found missing below `min`, newly found above `max`) in `seen`.
    fn compare(&mut self, seen: &Lines) -> (i64, i64) {
        let skus: BTreeSet<String> = self.max.keys().chain(seen.keys()).cloned().collect();
        let (mut lost, mut extra) = (0, 0);
        for sku in skus {
            let got = seen.get(&sku).copied().unwrap_or(0);
            let lo = self.min.get(&sku).copied().unwrap_or(0);
            let hi = self.max.get(&sku).copied().unwrap_or(0);
            let shown = self.reported_lost.entry(sku.clone()).or_default();
            lost += (lo - got - *shown).max(0);
            *shown = (*shown).max(lo - got);
            let shown = self.reported_extra.entry(sku).or_default();
            extra += (got - hi - *shown).max(0);
            *shown = (*shown).max(got - hi);
        }
        (lost, extra)
    }

    /// A read settles what the unknown adds did, within what they could have done.
    fn observe(&mut self, seen: &Lines) {
        for (sku, hi) in &mut self.max {
            let lo = self.min.get(sku).copied().unwrap_or(0);
            let got = seen.get(sku).copied().unwrap_or(0).clamp(lo, *hi);
            *hi = got;
            self.min.insert(sku.clone(), got);
        }
    }

    /// A checkout consumed the cart.
    fn empty(&mut self) {
        *self = CartModel::default();
    }

    /// A checkout may have consumed the cart, or not.
    fn maybe_emptied(&mut self) {
        self.min.clear();
    }

    /// An acknowledged add may have been lost with the node.
    fn forget(&mut self, sku: &str, qty: i64) {
        if let Some(lo) = self.min.get_mut(sku) {
            *lo = (*lo - qty).max(0);
        }
    }

    /// A checkout lost with the node: what it consumed may be back in the cart.
    fn may_return(&mut self, items: &Lines) {
        for (sku, qty) in items {
            *self.max.entry(sku.clone()).or_default() += qty;
        }
    }
}

fn check_account(
    h: &AccountHistory,
    fin: Option<&FinalAccount>,
    loss: Option<Loss>,
    v: &mut Verdict,
) {
    let who = &h.email;
    let mut cart = CartModel::default();
    let mut logged_in = false;
    let may_lose = |when: When| loss.is_some_and(|l| l.may_lose(when));
    let after_loss = |completed_ms: u64| loss.is_some_and(|l| l.after(completed_ms));
    // When the session in use was acknowledged (a login).
    let mut login: When = (0, 0);
    // Since the cart was last emptied, acknowledged adds and checkouts that a loss may undo,
    // applied to the cart model once the history crosses the loss.
    let mut recent_adds: Vec<(&str, i64, When)> = Vec::new();
    let mut recent_checkouts: Vec<(&Lines, When)> = Vec::new();
    // Failed retries after the loss of a checkout answered in the window: excused only if its
    // order is indeed gone at the end (key, first order, when, status, problem).
    let mut excused_failures: Vec<(&str, &str, f64, u16, &str)> = Vec::new();
    let mut crossed = false;
    // Every acknowledged order: id -> (key, when acknowledged).
    let mut acked: BTreeMap<&str, (&str, When)> = BTreeMap::new();
    let mut ids_by_key: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut first_answer: BTreeMap<&str, &OrderSeen> = BTreeMap::new();
    let mut unknown_keys: BTreeSet<&str> = BTreeSet::new();
    let cart_check = |v: &mut Verdict, cart: &mut CartModel, seen: &Lines, when: String| {
        let (lost, extra) = cart.compare(seen);
        v.add("cart_items_lost", lost as u64, || {
            format!("{who}: {lost} acknowledged cart item(s) missing from {when}")
        });
        v.add("cart_items_duplicated", extra as u64, || {
            format!("{who}: {extra} cart item(s) beyond the acknowledged adds in {when}")
        });
    };
    for op in &h.ops {
        let at = op.completed_ms as f64 / 1000.0;
        if !crossed && after_loss(op.completed_ms) {
            crossed = true;
            for (sku, qty, when) in recent_adds.drain(..) {
                if may_lose(when) {
                    cart.forget(sku, qty);
                }
            }
            for (items, when) in recent_checkouts.drain(..) {
                if may_lose(when) {
                    cart.may_return(items);
                }
            }
        }
        if let Outcome::Fail { status: 401, .. } = op.outcome {
            if logged_in && after_loss(op.completed_ms) && may_lose(login) {
                // The login was made in the loss window: the restore forgot it.
                logged_in = false;
                v.counts.forced_relogins += 1;
            } else if logged_in && !matches!(op.kind, OpKind::Signup | OpKind::Login) {
                logged_in = false;
                v.counts.forced_relogins += 1;
                v.add("sessions_lost", 1, || {
                    format!("{who}: session refused (401) at {at:.1} s")
                });
            }
            continue;
        }
        match (&op.kind, &op.outcome) {
            (OpKind::Login, Outcome::Ok { .. }) => {
                logged_in = true;
                login = (op.invoked_ms, op.completed_ms);
                v.counts.logins += 1;
            }
            (OpKind::CartAdd { sku, qty, .. }, Outcome::Ok { .. }) => {
                cart.add(sku, *qty, true);
                recent_adds.push((sku, *qty, (op.invoked_ms, op.completed_ms)));
            }
            (OpKind::CartAdd { sku, qty, .. }, Outcome::Unknown { .. }) => {
                cart.add(sku, *qty, false)
            }
            (
                OpKind::CartRead,
                Outcome::Ok {
                    seen: Seen::Cart(lines),
                },
            ) => {
                cart_check(v, &mut cart, lines, format!("the cart read at {at:.1} s"));
                cart.observe(lines);
            }
            (
                OpKind::Checkout { key, late },
                Outcome::Ok {
                    seen: Seen::Order(o),
                },
            ) => {
                let id = o.order_id.as_str();
                acked
                    .entry(id)
                    .or_insert((key, (op.invoked_ms, op.completed_ms)));
                ids_by_key.entry(key).or_default().insert(id);
                // A retry, on the restored node, of a checkout answered in the loss window:
                // the restore may have forgotten it, and then it runs again.
                let forgotten = |first: &OrderSeen| {
                    after_loss(op.completed_ms) && answered_in_window(&acked, &first.order_id, loss)
                };
                match first_answer.get(key.as_str()) {
                    Some(first) if *late && first.order_id != o.order_id && forgotten(first) => {
                        first_answer.insert(key, o);
                        cart.empty();
                        recent_adds.clear();
                        recent_checkouts.clear();
                    }
                    Some(first) if *late => {
                        if *first != o {
                            v.add("replays_mismatched", 1, || {
                                format!(
                                    "{who}: retry of key {key} at {at:.1} s answered order {id}, \
                                     not the acknowledged {}",
                                    first.order_id
                                )
                            });
                            if first.order_id != o.order_id {
                                // It ran again, on whatever the cart held then.
                                cart.empty();
                            }
                        }
                    }
                    _ => {
                        first_answer.insert(key, o);
                        let when = format!("order {id} (checkout at {at:.1} s)");
                        cart_check(v, &mut cart, &o.items, when);
                        cart.empty();
                        recent_adds.clear();
                        // Every checkout the loss may undo gives its items back, not only
                        // the last one.
                        recent_checkouts.push((&o.items, (op.invoked_ms, op.completed_ms)));
                    }
                }
            }
            (OpKind::Checkout { key, late }, Outcome::Fail { status, problem })
                if *late
                    && after_loss(op.completed_ms)
                    && first_answer
                        .get(key.as_str())
                        .is_some_and(|first| answered_in_window(&acked, &first.order_id, loss)) =>
            {
                // Its order may have been forgotten with the node, and so, maybe, its cart:
                // judged once the final state shows whether the order is gone.
                let first = first_answer[key.as_str()].order_id.as_str();
                excused_failures.push((key, first, at, *status, problem));
            }
            (OpKind::Checkout { key, late }, Outcome::Fail { status, problem }) if *late => {
                v.add("replays_mismatched", 1, || {
                    format!("{who}: retry of acknowledged key {key} at {at:.1} s failed: {status} {problem}")
                });
            }
            (OpKind::Checkout { key, .. }, Outcome::Unknown { .. }) => {
                unknown_keys.insert(key);
                cart.maybe_emptied();
            }
            (OpKind::OrderRead { order_id }, Outcome::Fail { status: 404, .. }) => {
                let forgotten = |when: When| after_loss(op.completed_ms) && may_lose(when);
                if let Some((key, (_, acked_ms))) = acked
                    .get(order_id.as_str())
                    .filter(|(_, when)| !forgotten(*when))
                {
                    let acked_s = *acked_ms as f64 / 1000.0;
                    v.add("orders_missing_on_read", 1, || {
                        format!(
                            "{who}: order {order_id} (key {key}) acknowledged at {acked_s:.1} s \
                             was not found at {at:.1} s"
                        )
                    });
                }
            }
            _ => {}
        }
    }
    v.counts.orders_acknowledged += acked.len() as u64;

    let Some(fin) = fin else {
        v.add("final_state_unreadable", 1, || {
            format!("{who}: no final state was read")
        });
        return;
    };
    if logged_in && !fin.session_valid && !may_lose(login) {
        v.add("sessions_lost", 1, || {
            format!("{who}: session refused at the end")
        });
    }
    if let Some(lines) = &fin.cart {
        cart_check(v, &mut cart, lines, "the final cart".into());
    }
    let Some(orders) = &fin.orders else {
        v.add("final_state_unreadable", 1, || {
            format!("{who}: the final orders could not be read")
        });
        return;
    };
    let present: BTreeSet<&str> = orders.iter().map(|o| o.order_id.as_str()).collect();
    let mut lost_to_restore: BTreeSet<&str> = BTreeSet::new();
    for (id, (key, when)) in &acked {
        if present.contains(id) {
            continue;
        }
        let s = when.1 as f64 / 1000.0;
        if let Some(loss) = loss.filter(|l| when.1 <= l.at_ms) {
            let excused = loss.may_lose(*when);
            v.lost_to_restore.push(LostToRestore {
                account: who.clone(),
                order_id: (*id).to_owned(),
                key: (*key).to_owned(),
                before_loss_ms: loss.at_ms - when.1,
                excused,
            });
            if excused {
                lost_to_restore.insert(id);
                v.counts.orders_lost_to_restore += 1;
                continue;
            }
        }
        v.add("orders_lost", 1, || {
            format!(
                "{who}: order {id} acknowledged at {s:.1} s (key {key}) is not in the final state"
            )
        });
    }
    for (key, first, at, status, problem) in excused_failures {
        if present.contains(first) {
            v.add("replays_mismatched", 1, || {
                format!("{who}: retry of acknowledged key {key} at {at:.1} s failed: {status} {problem}")
            });
        }
    }
    for (key, ids) in &ids_by_key {
        let ids: BTreeSet<&str> = ids.difference(&lost_to_restore).copied().collect();
        let extra = (ids.len() as u64).saturating_sub(1);
        v.add("orders_duplicated", extra, || {
            format!(
                "{who}: key {key} was answered with {} different orders: {ids:?}",
                ids.len()
            )
        });
    }
    // Orders nobody was told about: each unknown checkout key may account for one.
    let explained: BTreeSet<&str> = ids_by_key.values().flatten().copied().collect();
    let unexplained: Vec<&str> = present.difference(&explained).copied().collect();
    let allowance = unknown_keys
        .iter()
        .filter(|k| !ids_by_key.contains_key(*k))
        .count();
    let extra = unexplained.len().saturating_sub(allowance) as u64;
    v.add("orders_duplicated", extra, || {
        format!(
            "{who}: {} order(s) no acknowledged checkout made, only {allowance} checkout(s) with \
             an unknown outcome to account for them: {unexplained:?}",
            unexplained.len()
        )
    });
}

/// Whether the order `id` was acknowledged inside `loss`'s window.
fn answered_in_window(acked: &BTreeMap<&str, (&str, When)>, id: &str, loss: Option<Loss>) -> bool {
    acked
        .get(id)
        .is_some_and(|&(_, when)| loss.is_some_and(|l| l.may_lose(when)))
}

fn check_payments(
    fin: &FinalState,
    orders: &BTreeMap<&str, (&str, &OrderSeen)>,
    lost: &BTreeSet<String>,
    all_readable: bool,
    v: &mut Verdict,
) {
    let mut charges: BTreeMap<&str, Vec<&Charge>> = BTreeMap::new();
    for c in &fin.charges {
        charges.entry(&c.order_id).or_default().push(c);
    }
    // A lost order's charge, refunded, is no charge; every other refund changes nothing.
    for r in fin.refunds.iter().filter(|r| lost.contains(&r.order_id)) {
        if let Some(mine) = charges.get_mut(r.order_id.as_str()) {
            if let Some(i) = mine.iter().position(|c| *c == r) {
                mine.remove(i);
            }
            if mine.is_empty() {
                charges.remove(r.order_id.as_str());
            }
        }
    }
    let mut receipts: BTreeMap<&str, usize> = BTreeMap::new();
    for e in fin.emails.iter().filter(|e| e.kind == "receipt") {
        *receipts.entry(&e.order_id).or_default() += 1;
    }
    for (id, (who, o)) in orders {
        let mine = charges.get(id).map(Vec::as_slice).unwrap_or_default();
        let n = mine.len() as u64;
        v.add("charges_duplicated", n.saturating_sub(1), || {
            format!("{who}: order {id} was charged {n} times")
        });
        for c in mine.iter().filter(|c| c.amount_cents != o.total_cents) {
            v.add("charges_wrong_amount", 1, || {
                format!(
                    "{who}: order {id} totals {} cents but was charged {}",
                    o.total_cents, c.amount_cents
                )
            });
        }
        if o.status != "paid" {
            v.add("orders_unpaid", 1, || {
                format!("{who}: order {id} is still {:?}", o.status)
            });
        } else if n == 0 {
            v.add("orders_unpaid", 1, || {
                format!("{who}: order {id} is paid but was never charged")
            });
        }
        let r = receipts.get(id).copied().unwrap_or(0) as u64;
        v.add("emails_duplicated", r.saturating_sub(1), || {
            format!("{who}: order {id} got {r} receipts")
        });
        if o.status == "paid" && r == 0 {
            v.add("emails_missing", 1, || {
                format!("{who}: paid order {id} got no receipt")
            });
        }
    }
    // Only when every account was read can a charge be said to belong to no order.
    if all_readable {
        for (id, mine) in &charges {
            if !orders.contains_key(id) && !fin.elsewhere.contains(*id) {
                v.add("charges_orphaned", mine.len() as u64, || {
                    format!(
                        "{} charge(s) for order {id}, which does not exist",
                        mine.len()
                    )
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WHO: &str = "a@drill.example";

    fn op(kind: OpKind, t: u64, outcome: Outcome) -> Op {
        Op {
            kind,
            invoked_ms: t,
            completed_ms: t + 5,
            outcome,
        }
    }

    fn ok(seen: Seen) -> Outcome {
        Outcome::Ok { seen }
    }

    fn fail(status: u16) -> Outcome {
        Outcome::Fail {
            status,
            problem: "x".into(),
        }
    }

    fn unknown() -> Outcome {
        Outcome::Unknown {
            reason: "gave up".into(),
        }
    }

    fn lines(items: &[(&str, i64)]) -> Lines {
        items.iter().map(|&(s, q)| (s.to_owned(), q)).collect()
    }

    fn order(id: &str, items: &[(&str, i64)], status: &str) -> OrderSeen {
        OrderSeen {
            order_id: id.into(),
            total_cents: items.iter().map(|(_, q)| q * 100).sum(),
            status: status.into(),
            items: lines(items),
        }
    }

    fn add(key: &str, sku: &str, qty: i64) -> OpKind {
        OpKind::CartAdd {
            key: key.into(),
            sku: sku.into(),
            qty,
        }
    }

    fn checkout(key: &str, late: bool) -> OpKind {
        OpKind::Checkout {
            key: key.into(),
            late,
        }
    }

    /// A clean run of one account: two orders, a faithful late replay, a pending cart item;
    /// every order paid, charged and receipted once.
    fn clean() -> (Vec<AccountHistory>, FinalState) {
        let o1 = order("o1", &[("ROPE", 2), ("HELMET", 1)], "pending");
        let o2 = order("o2", &[("CHALK", 1)], "pending");
        let ops = vec![
            op(OpKind::Signup, 0, ok(Seen::Nothing)),
            op(OpKind::Login, 10, ok(Seen::Nothing)),
            op(add("a1", "ROPE", 2), 20, ok(Seen::Nothing)),
            op(add("a2", "HELMET", 1), 30, ok(Seen::Nothing)),
            op(
                OpKind::CartRead,
                40,
                ok(Seen::Cart(lines(&[("ROPE", 2), ("HELMET", 1)]))),
            ),
            op(checkout("c1", false), 50, ok(Seen::Order(o1.clone()))),
            op(
                OpKind::OrderRead {
                    order_id: "o1".into(),
                },
                60,
                ok(Seen::Order(o1.clone())),
            ),
            op(add("a3", "CHALK", 1), 70, ok(Seen::Nothing)),
            op(checkout("c1", true), 80, ok(Seen::Order(o1.clone()))),
            op(checkout("c2", false), 90, ok(Seen::Order(o2.clone()))),
            op(add("a4", "HELMET", 3), 100, ok(Seen::Nothing)),
        ];
        let paid = |o: &OrderSeen| OrderSeen {
            status: "paid".into(),
            ..o.clone()
        };
        let fin = FinalState {
            accounts: vec![FinalAccount {
                email: WHO.into(),
                session_valid: true,
                orders: Some(vec![paid(&o1), paid(&o2)]),
                cart: Some(lines(&[("HELMET", 3)])),
            }],
            charges: vec![
                Charge {
                    order_id: "o1".into(),
                    amount_cents: o1.total_cents,
                },
                Charge {
                    order_id: "o2".into(),
                    amount_cents: o2.total_cents,
                },
            ],
            emails: ["o1", "o2"]
                .map(|id| Email {
                    order_id: id.into(),
                    kind: "receipt".into(),
                })
                .into(),
            elsewhere: BTreeSet::new(),
            refunds: Vec::new(),
            loss: None,
        };
        let h = vec![AccountHistory {
            email: WHO.into(),
            ops,
        }];
        (h, fin)
    }

    /// Plants a fault into the clean run and checks that exactly `expect` is reported.
    fn check_planted(plant: impl FnOnce(&mut Vec<Op>, &mut FinalState), expect: &[(&str, u64)]) {
        let (mut h, mut fin) = clean();
        plant(&mut h[0].ops, &mut fin);
        let verdict = check(&h, &fin);
        let got: Vec<(&str, u64)> = verdict
            .counts
            .violations()
            .into_iter()
            .filter(|&(_, n)| n > 0)
            .collect();
        assert_eq!(got, expect, "violations: {:#?}", verdict.violations);
        for (name, _) in expect {
            assert!(
                verdict.violations.iter().any(|x| x.invariant == *name),
                "{name} has a detail"
            );
        }
    }

    fn final_orders(fin: &mut FinalState) -> &mut Vec<OrderSeen> {
        fin.accounts[0].orders.as_mut().unwrap()
    }

    /// The node lost at 100 ms: the second order (acknowledged at 95 ms) is gone from the
    /// final state with its charge and receipt, as a restore to before it leaves things.
    fn lose_o2(window_ms: u64) -> (Vec<AccountHistory>, FinalState) {
        let (h, mut fin) = clean();
        final_orders(&mut fin).retain(|o| o.order_id != "o2");
        fin.charges.retain(|c| c.order_id != "o2");
        fin.emails.retain(|e| e.order_id != "o2");
        fin.loss = Some(Loss {
            at_ms: 100,
            window_ms,
        });
        (h, fin)
    }

    #[test]
    fn a_restore_may_lose_only_what_was_acknowledged_inside_its_window() {
        let (h, fin) = lose_o2(10);
        let verdict = check(&h, &fin);
        assert!(verdict.passed(), "{:#?}", verdict.violations);
        assert_eq!(verdict.counts.orders_lost_to_restore, 1);
        assert_eq!(verdict.lost_to_restore[0].order_id, "o2");
        assert_eq!(verdict.lost_to_restore[0].before_loss_ms, 5);
        // Acknowledged 5 ms before the loss but begun 10 ms before it, and the window is
        // 9 ms: it may have committed before the window, so losing it is a real loss.
        let (h, fin) = lose_o2(9);
        let verdict = check(&h, &fin);
        assert_eq!(verdict.counts.violated(), ["orders_lost"]);
        assert_eq!(verdict.counts.orders_lost_to_restore, 0);
        assert!(!verdict.lost_to_restore[0].excused);
    }

    #[test]
    fn only_a_refund_of_an_order_lost_inside_the_window_cancels_its_charge() {
        let o2_charge = Charge {
            order_id: "o2".into(),
            amount_cents: 100,
        };
        // The lost order's charge is still at the provider, and was refunded: nothing owed.
        let (h, mut fin) = lose_o2(10);
        fin.charges.push(o2_charge.clone());
        fin.refunds.push(o2_charge.clone());
        let verdict = check(&h, &fin);
        assert!(verdict.passed(), "{:#?}", verdict.violations);
        // Not refunded: a charge for an order that does not exist.
        fin.refunds.clear();
        assert_eq!(check(&h, &fin).counts.violated(), ["charges_orphaned"]);
        // A refund of an order that was not lost cancels nothing: o1 charged twice is still
        // charged twice.
        let (h, mut fin) = lose_o2(10);
        let o1_charge = fin.charges[0].clone();
        fin.charges.push(o1_charge.clone());
        fin.refunds.push(o1_charge);
        assert_eq!(check(&h, &fin).counts.violated(), ["charges_duplicated"]);
    }

    #[test]
    fn a_failed_retry_after_the_loss_is_excused_only_if_its_order_is_gone() {
        let retry_fails = |h: &mut Vec<AccountHistory>| {
            h[0].ops.push(op(checkout("c2", true), 110, fail(422)));
        };
        let (mut h, fin) = lose_o2(10);
        retry_fails(&mut h);
        let verdict = check(&h, &fin);
        assert!(verdict.passed(), "{:#?}", verdict.violations);
        // The order survived the restore: its key's retry had to replay it.
        let (mut h, mut fin) = clean();
        fin.loss = Some(Loss {
            at_ms: 100,
            window_ms: 10,
        });
        retry_fails(&mut h);
        assert_eq!(check(&h, &fin).counts.violated(), ["replays_mismatched"]);
    }

    #[test]
    fn a_retry_after_a_restore_that_lost_its_order_places_it_once_more() {
        let o3 = order("o3", &[("CHALK", 1)], "paid");
        let retry = |h: &mut Vec<AccountHistory>, fin: &mut FinalState| {
            // On the restored node the cart holds the chalk again; the retry takes it, and
            // the helmets are added after.
            let helmets = h[0].ops.pop().expect("the last add");
            h[0].ops
                .push(op(checkout("c2", true), 110, ok(Seen::Order(o3.clone()))));
            h[0].ops.push(Op {
                invoked_ms: 120,
                completed_ms: 125,
                ..helmets
            });
            final_orders(fin).push(o3.clone());
            fin.charges.push(Charge {
                order_id: "o3".into(),
                amount_cents: o3.total_cents,
            });
            fin.emails.push(Email {
                order_id: "o3".into(),
                kind: "receipt".into(),
            });
        };
        let (mut h, mut fin) = lose_o2(10);
        retry(&mut h, &mut fin);
        let verdict = check(&h, &fin);
        assert!(verdict.passed(), "{:#?}", verdict.violations);
        // The same retry without a loss to explain it: a replay that made a new order.
        let (mut h, mut fin) = lose_o2(10);
        fin.loss = None;
        retry(&mut h, &mut fin);
        let violated = check(&h, &fin).counts.violated();
        assert!(
            violated.contains(&"replays_mismatched") && violated.contains(&"orders_lost"),
            "{violated:?}"
        );
    }

    #[test]
    fn a_clean_run_passes() {
        let (h, fin) = clean();
        let verdict = check(&h, &fin);
        assert!(verdict.passed(), "{:#?}", verdict.violations);
        assert_eq!(verdict.counts.orders_acknowledged, 2);
    }

    #[test]
    fn an_acknowledged_order_missing_at_the_end_is_lost() {
        check_planted(
            |_, fin| {
                final_orders(fin).retain(|o| o.order_id != "o2");
                fin.charges.retain(|c| c.order_id != "o2");
                fin.emails.retain(|e| e.order_id != "o2");
            },
            &[("orders_lost", 1)],
        );
    }

    #[test]
    fn an_acknowledged_order_not_found_by_a_later_read_is_reported() {
        check_planted(
            |ops, _| {
                let read = OpKind::OrderRead {
                    order_id: "o2".into(),
                };
                ops.push(op(read, 200, fail(404)));
            },
            &[("orders_missing_on_read", 1)],
        );
    }

    #[test]
    fn a_key_answered_with_a_second_order_is_a_duplicate_and_a_bad_replay() {
        // The late retry of c1 ran again on the cart {CHALK: 1} instead of replaying o1.
        check_planted(
            |ops, fin| {
                let o3 = order("o3", &[("CHALK", 1)], "pending");
                ops[8] = op(checkout("c1", true), 80, ok(Seen::Order(o3.clone())));
                // c2 then found the cart empty.
                ops[9] = op(checkout("c2", false), 90, fail(422));
                final_orders(fin).retain(|o| o.order_id != "o2");
                final_orders(fin).push(OrderSeen {
                    status: "paid".into(),
                    ..o3
                });
                for c in &mut fin.charges {
                    c.order_id = c.order_id.replace("o2", "o3");
                }
                for e in &mut fin.emails {
                    e.order_id = e.order_id.replace("o2", "o3");
                }
            },
            &[("orders_duplicated", 1), ("replays_mismatched", 1)],
        );
    }

    #[test]
    fn an_order_no_checkout_accounts_for_is_a_duplicate_unless_a_checkout_is_unknown() {
        let plant_extra = |fin: &mut FinalState| {
            final_orders(fin).push(order("o9", &[("ROPE", 1)], "paid"));
            fin.charges.push(Charge {
                order_id: "o9".into(),
                amount_cents: 100,
            });
            fin.emails.push(Email {
                order_id: "o9".into(),
                kind: "receipt".into(),
            });
        };
        // c2 was answered 422 after an attempt that did commit: the key ran twice.
        check_planted(
            |ops, fin| {
                ops.push(op(add("a5", "ROPE", 1), 110, ok(Seen::Nothing)));
                ops.push(op(checkout("c3", false), 120, fail(422)));
                plant_extra(fin);
                fin.accounts[0].cart = Some(lines(&[("HELMET", 3)]));
            },
            &[("orders_duplicated", 1), ("cart_items_lost", 1)],
        );
        // The same order is fine when a checkout's outcome is unknown: it may have made it.
        check_planted(
            |ops, fin| {
                ops.push(op(add("a5", "ROPE", 1), 110, ok(Seen::Nothing)));
                ops.push(op(checkout("c3", false), 120, unknown()));
                plant_extra(fin);
                fin.accounts[0].cart = Some(lines(&[("HELMET", 3)]));
            },
            &[],
        );
    }

    #[test]
    fn a_late_retry_that_fails_is_a_bad_replay() {
        check_planted(
            |ops, _| ops[8] = op(checkout("c1", true), 80, fail(422)),
            &[("replays_mismatched", 1)],
        );
    }

    #[test]
    fn a_second_charge_for_an_order_is_a_duplicate() {
        check_planted(
            |_, fin| {
                let again = fin.charges[0].clone();
                fin.charges.push(again);
            },
            &[("charges_duplicated", 1)],
        );
    }

    #[test]
    fn a_charge_of_the_wrong_amount_is_reported() {
        check_planted(
            |_, fin| fin.charges[1].amount_cents += 1,
            &[("charges_wrong_amount", 1)],
        );
    }

    #[test]
    fn a_charge_for_an_order_that_does_not_exist_is_orphaned() {
        check_planted(
            |_, fin| {
                fin.charges.push(Charge {
                    order_id: "ghost".into(),
                    amount_cents: 100,
                })
            },
            &[("charges_orphaned", 1)],
        );
    }

    #[test]
    fn a_second_receipt_is_a_duplicate() {
        check_planted(
            |_, fin| {
                let again = fin.emails[1].clone();
                fin.emails.push(again);
            },
            &[("emails_duplicated", 1)],
        );
    }

    #[test]
    fn a_paid_order_without_a_receipt_is_reported() {
        check_planted(
            |_, fin| fin.emails.retain(|e| e.order_id != "o1"),
            &[("emails_missing", 1)],
        );
    }

    #[test]
    fn an_order_never_paid_or_never_charged_is_unpaid() {
        check_planted(
            |_, fin| {
                final_orders(fin)[0].status = "pending".into();
                fin.charges.retain(|c| c.order_id != "o1");
            },
            &[("orders_unpaid", 1)],
        );
        check_planted(
            |_, fin| fin.charges.retain(|c| c.order_id != "o2"),
            &[("orders_unpaid", 1)],
        );
    }

    #[test]
    fn a_refused_session_is_lost_during_the_run_and_at_the_end() {
        check_planted(
            |ops, _| {
                ops.insert(7, op(OpKind::CartRead, 65, fail(401)));
                ops.insert(8, op(OpKind::Login, 66, ok(Seen::Nothing)));
            },
            &[("sessions_lost", 1)],
        );
        check_planted(
            |_, fin| fin.accounts[0].session_valid = false,
            &[("sessions_lost", 1)],
        );
    }

    #[test]
    fn acknowledged_cart_items_missing_later_are_lost() {
        // From a cart read.
        check_planted(
            |ops, _| ops[4] = op(OpKind::CartRead, 40, ok(Seen::Cart(lines(&[("ROPE", 2)])))),
            &[("cart_items_lost", 1)],
        );
        // Still missing from the order that consumed that cart: the same item, counted once.
        check_planted(
            |ops, fin| {
                ops[4] = op(OpKind::CartRead, 40, ok(Seen::Cart(lines(&[("ROPE", 2)]))));
                let short = order("o1", &[("ROPE", 2)], "pending");
                ops[5] = op(checkout("c1", false), 50, ok(Seen::Order(short.clone())));
                ops[8] = op(checkout("c1", true), 80, ok(Seen::Order(short)));
                final_orders(fin)[0].items.remove("HELMET");
            },
            &[("cart_items_lost", 1)],
        );
        // From the order that consumed the cart (no read in between).
        check_planted(
            |ops, fin| {
                let short = order("o2", &[], "pending");
                ops[9] = op(checkout("c2", false), 90, ok(Seen::Order(short)));
                final_orders(fin)[1].items.clear();
            },
            &[("cart_items_lost", 1)],
        );
        // From the final cart.
        check_planted(
            |_, fin| fin.accounts[0].cart = Some(lines(&[("HELMET", 1)])),
            &[("cart_items_lost", 2)],
        );
    }

    #[test]
    fn an_add_with_an_unknown_outcome_may_or_may_not_be_in_the_cart() {
        let plant = |present: bool| {
            move |ops: &mut Vec<Op>, fin: &mut FinalState| {
                ops.push(op(add("a5", "ROPE", 4), 110, unknown()));
                let cart = if present {
                    lines(&[("HELMET", 3), ("ROPE", 4)])
                } else {
                    lines(&[("HELMET", 3)])
                };
                fin.accounts[0].cart = Some(cart);
            }
        };
        check_planted(plant(true), &[]);
        check_planted(plant(false), &[]);
    }

    #[test]
    fn cart_quantity_beyond_the_adds_is_a_duplicated_add() {
        check_planted(
            |_, fin| fin.accounts[0].cart = Some(lines(&[("HELMET", 6)])),
            &[("cart_items_duplicated", 3)],
        );
    }

    #[test]
    fn an_unreadable_account_cannot_pass() {
        check_planted(
            |_, fin| fin.accounts[0].orders = None,
            &[("final_state_unreadable", 1)],
        );
    }

    #[test]
    fn a_run_without_acknowledged_orders_shows_nothing() {
        let fin = FinalState::default();
        let verdict = check(&[], &fin);
        assert_eq!(verdict.counts.violated(), ["no_progress"]);
    }
}
