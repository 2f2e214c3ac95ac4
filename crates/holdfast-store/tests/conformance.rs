//! Store conformance suite: one set of cases, run against SQLite and PostgreSQL.
//!
//! Every case below runs twice, as `sqlite::<case>` and `postgres::<case>`, each on a brand-new
//! database. Passing on both proves that the one `Store` API behaves identically on either
//! engine: migrations are safe to race, are recorded with checksums that refuse a changed file,
//! and adopt a database made before schemas were split; a composed transaction commits all or
//! nothing, keeps a caller's abort apart from a database failure and re-runs only what may be
//! re-run; users and sessions (absolute and idle expiry, throttled touches) behave as
//! documented; the two-phase idempotency protocol answers Claimed / InFlight / Mismatch / Replay
//! correctly, fences a stalled claimant out by its token so its effect never commits, and is
//! scoped; reaping removes exactly the dead records; 50 racers on one key across several pools
//! cause one effect; jobs are claimed once, fenced forever by their claim, and the ledger
//! settles once. Error predicates are checked on real engine errors.
//!
//! The effect these cases commit under an idempotency key is the store's own generic record,
//! a job: the application's records (the shop's orders) have their own suite in
//! `holdfast-shop`. Time is passed explicitly (`now` in ms) wherever the API takes it, so
//! expiry is tested without sleeping. Postgres cases need `DATABASE_URL`; without it they skip
//! with a note, except under `CI=true`, where they fail.

use futures::future::join_all;
use holdfast_core::{DeviceToken, Email, IdempotencyKey, RequestFingerprint, SessionId, UserId};
use holdfast_store::{
    Backend,
    ClaimOutcome::{self, InFlight, Mismatch, Replay},
    Error, IdemClaim, IdemLock, JobFence, JobInsert, JobRow, Quota, Refused, Rerun,
    ScopedFutureExt, SessionCreate, SessionRecord, Store, StoreOptions, StoredResponse, TxError,
};
use holdfast_testkit::db::race_one_key;
use sqlx::{Connection, Executor, Row};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

// ---- harness -----------------------------------------------------------------------------

holdfast_testkit::conformance! {
    open = open;
    url   "current_thread" reopening_is_a_no_op,
    url   "multi_thread"   concurrent_opens_migrate_once,
    url   "current_thread" a_changed_migration_is_refused_by_name,
    url   "current_thread" a_database_from_before_the_split_is_adopted,
    opened "current_thread" a_transaction_commits_all_or_nothing,
    opened "current_thread" a_transaction_reruns_only_what_may_rerun,
    opened "current_thread" users,
    opened "current_thread" session_absolute_expiry,
    opened "current_thread" session_idle_expiry_and_touch_throttle,
    opened "current_thread" session_delete,
    opened "current_thread" session_touch_many_moves_last_use_forward,
    opened "current_thread" password_change_ends_every_session_of_the_user,
    opened "current_thread" session_blobs,
    opened "current_thread" idem_claim_finish_replay,
    opened "current_thread" idem_expired_lock_fences_old_token,
    opened "current_thread" idem_release_and_scope,
    opened "current_thread" reap_removes_only_dead_records,
    url   "multi_thread"   fifty_racers_one_key_one_effect,
    url   "multi_thread"   error_predicates,
    opened "current_thread" job_lifecycle,
    opened "current_thread" job_attempts_are_fenced,
    opened "current_thread" fences_are_unique_forever,
    url   "multi_thread"   concurrent_claimers_never_share_a_job,
    opened "current_thread" ledger_settles_once,
    opened "current_thread" a_claim_begins_the_effect_its_job_names,
    opened "current_thread" rate_quota_bursts_then_refills,
    url   "multi_thread"   rate_quota_holds_across_racing_instances,
    opened "current_thread" known_devices,
    url   "multi_thread"   a_stalled_transaction_does_not_hold_its_locks_for_long,
}

async fn open(url: &str) -> Store {
    Store::open(&StoreOptions::new(url))
        .await
        .unwrap_or_else(|e| panic!("open {url}: {e}"))
}

async fn raw(url: &str) -> sqlx::AnyConnection {
    sqlx::any::install_default_drivers();
    sqlx::AnyConnection::connect(url)
        .await
        .expect("raw connect")
}

/// One integer from a raw query (for facts the API does not expose, like migration rows).
async fn scalar(url: &str, sql: &str) -> i64 {
    raw(url).await.fetch_one(sql).await.expect(sql).get(0)
}

// ---- fixtures ----------------------------------------------------------------------------

/// An arbitrary fixed "now" (ms); expiry is driven by offsets from it.
const T0: i64 = 1_700_000_000_000;
const LOCK: Duration = Duration::from_secs(30);
const HOUR: Duration = Duration::from_secs(3600);
/// How many migrations a fresh database records: every one of the store's own schema.
const MIGRATIONS: i64 = holdfast_store::STORE_SCHEMA.migrations.len() as i64;
/// The queue the idempotent effects of these cases enqueue on.
const EFFECTS: &str = "effects";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
fn email(s: &str) -> Email {
    Email::parse(s).unwrap()
}
fn key(s: &str) -> IdempotencyKey {
    IdempotencyKey::parse(s.as_bytes()).unwrap()
}
fn fp(body: &str) -> RequestFingerprint {
    RequestFingerprint::of("POST", "/effects", body.as_bytes())
}

async fn user(store: &Store, name: &str) -> String {
    let e = email(&format!("{name}@example.com"));
    store.user_create(&e, "argon2id$fake").await.unwrap().id
}

/// The answer an idempotent request keeps: not valid UTF-8, to prove the bytes are opaque.
fn render(n: i64) -> StoredResponse {
    let mut body = vec![0xff, 0x00];
    body.extend(n.to_string().into_bytes());
    StoredResponse { status: 201, body }
}

async fn claim(
    store: &Store,
    scope: &str,
    k: &IdempotencyKey,
    f: &RequestFingerprint,
    now: i64,
    ttl: Duration,
) -> ClaimOutcome {
    let c = IdemClaim {
        scope,
        key: k,
        fingerprint: f,
        now,
        lock_ttl: ttl,
    };
    store.idem_claim(c).await.unwrap()
}

fn token(outcome: ClaimOutcome) -> String {
    match outcome {
        ClaimOutcome::Claimed { token } => token,
        other => panic!("expected Claimed, got {other:?}"),
    }
}

/// Phase two under `token`: effect number `n` (a job) and its answer, in one transaction.
async fn effect(
    store: &Store,
    scope: &str,
    k: &IdempotencyKey,
    token: &str,
    n: i64,
) -> Result<StoredResponse, Error> {
    let lock = IdemLock {
        scope,
        key: k,
        token,
    };
    store
        .transaction("effect", Rerun::Always, |tx| {
            async move {
                tx.job_enqueue(&[job(EFFECTS, n)]).await?;
                let answer = render(n);
                tx.idem_finish(lock, &answer).await?;
                Ok(answer)
            }
            .scope_boxed()
        })
        .await
        .map_err(TxError::<Infallible>::into_db)
}

/// How many effects were committed (jobs on the effects queue, in any state).
async fn effects(store: &Store) -> i64 {
    let counts = store.job_counts().await.unwrap();
    counts
        .iter()
        .filter(|c| c.queue == EFFECTS)
        .map(|c| c.count)
        .sum()
}

/// The stored password hash of the user with this email, if there is one.
async fn password_hash(store: &Store, address: &str) -> Option<String> {
    let creds = store.user_credentials(&email(address)).await.unwrap();
    creds.map(|c| c.password_hash)
}

fn err_kind<T: std::fmt::Debug>(r: Result<T, Error>) -> String {
    format!("{:?}", r.expect_err("expected an error"))
}

// ---- migrations --------------------------------------------------------------------------

async fn reopening_is_a_no_op(url: String) {
    let first = open(&url).await;
    let u = user(&first, "keep").await;
    first.close().await;

    let second = open(&url).await;
    let third = open(&url).await;
    assert!(second.user_get(&u).await.unwrap().is_some());
    assert!(third.user_get(&u).await.unwrap().is_some());
    assert_eq!(
        scalar(&url, "SELECT COUNT(*) FROM holdfast_schema_migrations").await,
        MIGRATIONS
    );
}

/// Several instances starting at once on one fresh database (on SQLite: separate pools on one
/// file, as separate processes would be): the migration lock makes exactly one of them migrate.
async fn concurrent_opens_migrate_once(url: String) {
    let opens = (0..4).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { Store::open(&StoreOptions::new(&url)).await })
    });
    for (i, res) in join_all(opens).await.into_iter().enumerate() {
        let store = res
            .unwrap()
            .unwrap_or_else(|e| panic!("concurrent open #{i}: {e}"));
        user(&store, &format!("opener{i}")).await;
    }
    assert_eq!(scalar(&url, "SELECT COUNT(*) FROM users").await, 4);
    assert_eq!(
        scalar(&url, "SELECT COUNT(*) FROM holdfast_schema_migrations").await,
        MIGRATIONS
    );
}

/// A database that ran a migration whose file this build has with other contents refuses to
/// open, and the error names the file.
async fn a_changed_migration_is_refused_by_name(url: String) {
    open(&url).await.close().await;
    raw(&url)
        .await
        .execute("UPDATE holdfast_schema_migrations SET checksum = 'edited' WHERE schema_name = 'store' AND version = 2")
        .await
        .unwrap();
    let refused = Store::open(&StoreOptions::new(&url)).await;
    let Err(e) = refused else {
        panic!("a changed migration was accepted")
    };
    assert!(
        matches!(&e, Error::MigrationChanged { file, .. } if *file == "crates/holdfast-store/migrations/0002_jobs.sql"),
        "{e:?}"
    );
    let said = e.to_string();
    assert!(
        said.contains("crates/holdfast-store/migrations/0002_jobs.sql")
            && said.contains("append-only"),
        "{said}"
    );
}

/// A database made when all migrations were one list (`holdfast_migrations`, versions 1 to 3)
/// is adopted: those migrations are recorded, not run again (they would fail: their tables
/// exist), the newer ones run, and the data stays.
async fn a_database_from_before_the_split_is_adopted(url: String) {
    let store = open(&url).await;
    let u = user(&store, "old-timer").await;
    store.close().await;
    holdfast_testkit::db::rewind_to_legacy_layout(&url).await;
    let store = open(&url).await;
    assert!(store.user_get(&u).await.unwrap().is_some(), "data kept");
    assert_eq!(
        scalar(&url, "SELECT COUNT(*) FROM holdfast_schema_migrations").await,
        MIGRATIONS
    );
    assert_eq!(
        scalar(
            &url,
            "SELECT COUNT(*) FROM holdfast_schema_migrations WHERE applied_at <= 3"
        )
        .await,
        3,
        "the legacy versions keep their dates"
    );
    // The migration that came after the split ran: claims have their fence column.
    store.job_enqueue(&job("q", 1)).await.unwrap();
    let claimed = store.job_claim("q", "w", 1, T0, LEASE).await.unwrap();
    assert_eq!(claimed[0].claim, 1);
    open(&url).await;
}

// ---- transactions ------------------------------------------------------------------------

/// What the caller composes commits together or not at all, and its own abort comes back as
/// `Abort`, apart from database failures.
async fn a_transaction_commits_all_or_nothing(store: Store) {
    #[derive(Debug, PartialEq)]
    struct Changed;
    let u = user(&store, "tx").await;
    let aborted = store
        .transaction("abort", Rerun::Always, |tx| {
            async {
                tx.job_enqueue(&[job(EFFECTS, 1)]).await?;
                sqlx::query("UPDATE users SET password_hash = 'new' WHERE id = $1")
                    .bind(&u)
                    .execute(tx.conn())
                    .await?;
                Err::<(), _>(TxError::Abort(Changed))
            }
            .scope_boxed()
        })
        .await;
    assert!(matches!(aborted, Err(TxError::Abort(Changed))));
    assert_eq!(effects(&store).await, 0, "the job rolled back");
    let hash = password_hash(&store, "tx@example.com").await;
    assert_eq!(
        hash.as_deref(),
        Some("argon2id$fake"),
        "the update rolled back"
    );

    let failed = store
        .transaction("bad_sql", Rerun::Always, |tx| {
            async {
                tx.job_enqueue(&[job(EFFECTS, 2)]).await?;
                sqlx::query("INSERT INTO no_such_table VALUES (1)")
                    .execute(tx.conn())
                    .await?;
                Ok::<_, TxError<Infallible>>(())
            }
            .scope_boxed()
        })
        .await;
    assert!(
        matches!(&failed, Err(TxError::Db(e)) if !e.is_retryable()),
        "{failed:?}"
    );
    assert_eq!(effects(&store).await, 0);

    let ids = store
        .transaction("both", Rerun::IfUncommitted, |tx| {
            async {
                let ids = tx.job_enqueue(&[job(EFFECTS, 3), job(EFFECTS, 4)]).await?;
                tx.ledger_begin("effect:3", "ext-3").await?;
                Ok::<_, TxError<Infallible>>(ids)
            }
            .scope_boxed()
        })
        .await
        .unwrap();
    assert_eq!(ids.len(), 2);
    assert_eq!(effects(&store).await, 2);
    assert!(store.ledger_get("effect:3").await.unwrap().is_some());
}

/// A transient failure re-runs the body (from a fresh transaction). One inside the body
/// (before `COMMIT` was sent) committed nothing, so even a body that must not run twice runs
/// again. (A failure at `COMMIT` itself may have committed: `Error::is_retryable_uncommitted`
/// decides, as the store's unit tests show for a single statement.)
async fn a_transaction_reruns_only_what_may_rerun(store: Store) {
    let timed_out = || Error::Db(sqlx::Error::PoolTimedOut);
    let reset = || Error::Db(sqlx::Error::Io(std::io::ErrorKind::ConnectionReset.into()));

    let (r, runs) = flaky(&store, Rerun::IfUncommitted, timed_out).await;
    assert!(r.is_ok());
    assert_eq!(
        (runs, effects(&store).await),
        (2, 1),
        "re-run once, committed once"
    );

    let (r, runs) = flaky(&store, Rerun::IfUncommitted, reset).await;
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(
        (runs, effects(&store).await),
        (2, 2),
        "a connection lost before COMMIT: a plain write re-runs, and commits once"
    );

    let (r, runs) = flaky(&store, Rerun::Always, reset).await;
    assert!(r.is_ok());
    assert_eq!((runs, effects(&store).await), (2, 3));

    let refused = || Error::Db(sqlx::Error::RowNotFound);
    let (r, runs) = flaky(&store, Rerun::IfUncommitted, refused).await;
    assert!(matches!(r, Err(TxError::Db(_))), "{r:?}");
    assert_eq!(
        (runs, effects(&store).await),
        (1, 3),
        "a failure that is not transient is not re-run, and left nothing"
    );
}

/// A transaction that enqueues an effect and then fails with `fail()` on its first run only;
/// how it ended and how many times the body ran.
async fn flaky(
    store: &Store,
    rerun: Rerun,
    fail: fn() -> Error,
) -> (Result<(), TxError<Infallible>>, u32) {
    let runs = AtomicU32::new(0);
    let r = store
        .transaction("flaky", rerun, |tx| {
            let runs = &runs;
            async move {
                tx.job_enqueue(&[job(EFFECTS, 1)]).await?;
                if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Err(TxError::Db(fail()));
                }
                Ok(())
            }
            .scope_boxed()
        })
        .await;
    (r, runs.load(Ordering::SeqCst))
}

// ---- users -------------------------------------------------------------------------------

async fn users(store: Store) {
    let ann = store
        .user_create(&email(" Ann@Example.COM "), "hash-1")
        .await
        .unwrap();
    assert_eq!(ann.email, "ann@example.com");
    assert!(UserId::parse(&ann.id).is_ok());

    let dup = store.user_create(&email("ann@example.com"), "hash-2").await;
    assert_eq!(err_kind(dup), "EmailTaken");

    let creds = store
        .user_credentials(&email("ANN@example.com"))
        .await
        .unwrap();
    assert_eq!(creds.map(|c| c.user), Some(ann.clone()));
    assert_eq!(
        password_hash(&store, "ANN@example.com").await.as_deref(),
        Some("hash-1")
    );
    assert_eq!(password_hash(&store, "bob@example.com").await, None);

    assert_eq!(store.user_get(&ann.id).await.unwrap(), Some(ann));
    let nobody = UserId::generate().to_string();
    assert_eq!(store.user_get(&nobody).await.unwrap(), None);
}

// ---- sessions ----------------------------------------------------------------------------

async fn new_session(store: &Store, user_id: &str, now: i64, absolute_ttl: Duration) -> SessionId {
    let id = SessionId::generate();
    store
        .session_create(SessionCreate {
            id: &id,
            user_id,
            now,
            absolute_ttl,
        })
        .await
        .unwrap();
    id
}

async fn session_absolute_expiry(store: Store) {
    let u = user(&store, "abs").await;
    let sid = new_session(&store, &u, T0, ms(1000)).await;
    // Re-creating the same id (a retried insert) is not an error.
    store
        .session_create(SessionCreate {
            id: &sid,
            user_id: &u,
            now: T0,
            absolute_ttl: ms(1000),
        })
        .await
        .unwrap();

    let get = |now| store.session_get(&sid, now, HOUR, HOUR);
    let want = SessionRecord {
        user_id: u.clone(),
        created_at: T0,
        expires_at: T0 + 1000,
        last_seen_at: T0,
    };
    assert_eq!(get(T0).await.unwrap(), Some(want.clone()));
    assert_eq!(get(T0 + 999).await.unwrap(), Some(want));
    assert_eq!(get(T0 + 1000).await.unwrap(), None);
    // Deleted, not merely hidden: even an earlier clock no longer finds it.
    assert_eq!(get(T0).await.unwrap(), None);
    assert_eq!(
        store
            .session_get(&SessionId::generate(), T0, HOUR, HOUR)
            .await
            .unwrap(),
        None
    );
}

/// idle_ttl 100 ms, touch_every 60 ms: a read refreshes last use only if the previous refresh is
/// at least 60 ms old, so whether a later read survives reveals whether an earlier one touched.
async fn session_idle_expiry_and_touch_throttle(store: Store) {
    let u = user(&store, "idle").await;
    let cases: &[(&str, &[(i64, bool)])] = &[
        (
            "untouched read does not extend",
            &[(50, true), (100, false)],
        ),
        ("idle boundary", &[(99, true), (198, true), (298, false)]),
        (
            "touched reads extend",
            &[(60, true), (159, true), (258, true), (358, false)],
        ),
        (
            "throttled read in between",
            &[(60, true), (100, true), (159, true), (259, false)],
        ),
    ];
    for (what, steps) in cases {
        let sid = new_session(&store, &u, T0, HOUR).await;
        for &(at, alive) in *steps {
            let got = store
                .session_get(&sid, T0 + at, ms(100), ms(60))
                .await
                .unwrap();
            assert_eq!(got.is_some(), alive, "{what}: read at +{at}ms");
        }
    }
}

async fn session_delete(store: Store) {
    let u = user(&store, "del").await;
    let sid = new_session(&store, &u, T0, HOUR).await;
    store.session_delete(&sid).await.unwrap();
    assert_eq!(store.session_get(&sid, T0, HOUR, HOUR).await.unwrap(), None);
    store.session_delete(&sid).await.unwrap(); // deleting twice is fine
}

/// The Redis tier's batched backstop writes: last use only moves forward, a deleted session
/// is reported gone and never resurrected, and batches larger than one statement work.
async fn session_touch_many_moves_last_use_forward(store: Store) {
    let u = user(&store, "touch").await;
    let (a, b) = (
        new_session(&store, &u, T0, HOUR).await,
        new_session(&store, &u, T0, HOUR).await,
    );
    store.session_delete(&b).await.unwrap();
    let never = SessionId::generate();
    let mut touches = vec![
        (a.clone(), T0 + 50),
        (a.clone(), T0 + 40),
        (b.clone(), T0 + 50),
    ];
    touches.push((never.clone(), T0 + 50));
    let strangers: Vec<SessionId> = (0..600).map(|_| SessionId::generate()).collect();
    touches.extend(strangers.iter().map(|s| (s.clone(), T0)));
    let gone = store.session_touch_many(&touches).await.unwrap();
    assert_eq!(gone.len(), 602, "b, never and the 600 strangers");
    assert!(gone.contains(&b) && gone.contains(&never) && !gone.contains(&a));
    assert_eq!(
        store.session_get(&b, T0, HOUR, HOUR).await.unwrap(),
        None,
        "not resurrected"
    );
    // An older touch does not move last use back.
    assert!(store
        .session_touch_many(&[(a.clone(), T0 + 10)])
        .await
        .unwrap()
        .is_empty());
    let get = |now| store.session_get(&a, now, ms(100), HOUR);
    assert_eq!(
        get(T0 + 149).await.unwrap().map(|r| r.last_seen_at),
        Some(T0 + 50)
    );
    assert_eq!(get(T0 + 150).await.unwrap(), None);
}

async fn password_change_ends_every_session_of_the_user(store: Store) {
    let (u, v) = (user(&store, "pw").await, user(&store, "other").await);
    let (s1, s2, s3) = (
        new_session(&store, &u, T0, HOUR).await,
        new_session(&store, &u, T0, HOUR).await,
        new_session(&store, &v, T0, HOUR).await,
    );
    store.user_set_password(&u, "argon2id$new").await.unwrap();
    let hash = password_hash(&store, "pw@example.com").await;
    assert_eq!(hash.as_deref(), Some("argon2id$new"));
    assert!(matches!(
        store
            .user_set_password(&UserId::generate().to_string(), "x")
            .await,
        Err(Error::NotFound)
    ));
    assert_eq!(store.user_sessions_valid_after(&u).await.unwrap(), Some(0));

    let mut gone = store.session_delete_user(&u, T0 + 5).await.unwrap();
    gone.sort();
    let mut want = vec![s1.storage_hash(), s2.storage_hash()];
    want.sort();
    assert_eq!(gone, want, "exactly the user's sessions, by hash");
    for s in [&s1, &s2] {
        assert_eq!(store.session_get(s, T0, HOUR, HOUR).await.unwrap(), None);
    }
    assert!(store
        .session_get(&s3, T0, HOUR, HOUR)
        .await
        .unwrap()
        .is_some());
    assert_eq!(
        store.user_sessions_valid_after(&u).await.unwrap(),
        Some(T0 + 5)
    );
    assert_eq!(store.user_sessions_valid_after(&v).await.unwrap(), Some(0));
    // The epoch never moves back; a second call finds nothing left to delete.
    assert!(store.session_delete_user(&u, T0).await.unwrap().is_empty());
    assert_eq!(
        store.user_sessions_valid_after(&u).await.unwrap(),
        Some(T0 + 5)
    );
    let nobody = UserId::generate().to_string();
    assert_eq!(
        store.user_sessions_valid_after(&nobody).await.unwrap(),
        None
    );
}

/// Opaque blobs (the tower-sessions adapter's table): create refuses a taken id, put
/// replaces, expired blobs are invisible and reaped.
async fn session_blobs(store: Store) {
    assert!(store
        .session_blob_insert("h1", b"\xff\x00one", T0 + 100)
        .await
        .unwrap());
    assert!(!store
        .session_blob_insert("h1", b"other", T0 + 100)
        .await
        .unwrap());
    assert_eq!(
        store.session_blob_get("h1", T0).await.unwrap(),
        Some((b"\xff\x00one".to_vec(), T0 + 100))
    );
    store
        .session_blob_put("h1", b"two", T0 + 200)
        .await
        .unwrap();
    store.session_blob_put("h2", b"new", T0 + 50).await.unwrap();
    assert_eq!(
        store.session_blob_get("h1", T0 + 100).await.unwrap(),
        Some((b"two".to_vec(), T0 + 200))
    );
    assert_eq!(
        store.session_blob_get("h2", T0 + 50).await.unwrap(),
        None,
        "expired"
    );
    assert_eq!(store.session_blob_reap(T0 + 50).await.unwrap(), 1);
    assert_eq!(store.session_blob_reap(T0 + 50).await.unwrap(), 0);
    store.session_blob_delete("h1").await.unwrap();
    store.session_blob_delete("h1").await.unwrap();
    assert_eq!(store.session_blob_get("h1", T0).await.unwrap(), None);
}

// ---- idempotency -------------------------------------------------------------------------

async fn idem_claim_finish_replay(store: Store) {
    let u = user(&store, "idem").await;
    let (k, f, g) = (key("effect-1"), fp(r#"{"a":1}"#), fp(r#"{"a":2}"#));

    let tok = token(claim(&store, &u, &k, &f, T0, LOCK).await);
    assert_eq!(claim(&store, &u, &k, &f, T0 + 1, LOCK).await, InFlight);
    assert_eq!(claim(&store, &u, &k, &g, T0 + 1, LOCK).await, Mismatch);

    let stored = effect(&store, &u, &k, &tok, 1).await.unwrap();
    assert_eq!(stored, render(1));
    // Replays return the exact bytes, and a done key never expires by its lock.
    for now in [T0 + 2, T0 + 10 * 3_600_000] {
        assert_eq!(
            claim(&store, &u, &k, &f, now, LOCK).await,
            Replay(stored.clone())
        );
    }
    assert_eq!(claim(&store, &u, &k, &g, T0 + 2, LOCK).await, Mismatch);

    // A re-run of the attempt that already committed (an ambiguous commit retried) is fenced,
    // and its effect rolls back.
    assert_eq!(
        err_kind(effect(&store, &u, &k, &tok, 2).await),
        "IdempotencyLockLost"
    );
    assert_eq!(effects(&store).await, 1);
}

async fn idem_expired_lock_fences_old_token(store: Store) {
    let u = user(&store, "stall").await;
    let (k, f) = (key("slow-1"), fp("{}"));

    // Claims with a 1 s lock, at T0 + `at` ms.
    let at = |at: i64| claim(&store, &u, &k, &f, T0 + at, ms(1000));
    let old = token(at(0).await);
    assert_eq!(at(999).await, InFlight);
    let new = token(at(1000).await);
    assert_ne!(old, new);
    assert_eq!(at(1001).await, InFlight);

    // The stalled claimant can neither free the key nor commit under it.
    store
        .idem_release(IdemLock {
            scope: &u,
            key: &k,
            token: &old,
        })
        .await
        .unwrap();
    assert_eq!(at(1002).await, InFlight);
    assert_eq!(
        err_kind(effect(&store, &u, &k, &old, 1).await),
        "IdempotencyLockLost"
    );
    assert_eq!(effects(&store).await, 0, "fenced");

    let stored = effect(&store, &u, &k, &new, 2).await.unwrap();
    assert_eq!(at(1003).await, Replay(stored));
    assert_eq!(effects(&store).await, 1);
}

async fn idem_release_and_scope(store: Store) {
    let (u, v) = (user(&store, "rel-u").await, user(&store, "rel-v").await);
    let (k, f, g) = (key("\"shared key\""), fp("x"), fp("y"));

    let tok = token(claim(&store, &u, &k, &f, T0, LOCK).await);
    let release = |scope, token| {
        store.idem_release(IdemLock {
            scope,
            key: &k,
            token,
        })
    };
    release(&u, "not-the-token").await.unwrap();
    assert_eq!(claim(&store, &u, &k, &f, T0, LOCK).await, InFlight);
    release(&u, &tok).await.unwrap();
    // Released means gone: even a different payload may now claim it.
    let tok2 = token(claim(&store, &u, &k, &g, T0, LOCK).await);
    assert_ne!(tok, tok2);

    // Keys are scoped: the same key is free for someone else.
    let vtok = token(claim(&store, &v, &k, &f, T0, LOCK).await);
    let stored = effect(&store, &v, &k, &vtok, 1).await.unwrap();
    // Releasing a done key does nothing.
    release(&v, &vtok).await.unwrap();
    assert_eq!(claim(&store, &v, &k, &f, T0, LOCK).await, Replay(stored));
    assert_eq!(claim(&store, &u, &k, &g, T0, LOCK).await, InFlight);
}

async fn reap_removes_only_dead_records(store: Store) {
    let (idle, retention) = (ms(100), ms(1000));
    let r = T0 + 10_000; // the reaper's now
    let u = user(&store, "reap").await;

    let live = new_session(&store, &u, r - 10, HOUR).await;
    new_session(&store, &u, r - 50, ms(40)).await; // absolute expiry at r-10, not idle
    new_session(&store, &u, r - 100, HOUR).await; // idle exactly idle_ttl

    let f = fp("reap");
    let done = |k: &'static str, now: i64| {
        let (store, u, f) = (&store, &u, &f);
        async move {
            let k = key(k);
            let tok = token(claim(store, u, &k, f, now, LOCK).await);
            effect(store, u, &k, &tok, now).await.unwrap();
        }
    };
    done("old-done", r - 2000).await;
    done("young-done", r - 10).await;
    token(claim(&store, &u, &key("old-expired"), &f, r - 2000, ms(500)).await);
    token(claim(&store, &u, &key("old-live"), &f, r - 2000, HOUR).await);

    let reap = || async {
        (
            store.session_reap(r, idle).await.unwrap(),
            store.idem_reap(r, retention).await.unwrap(),
        )
    };
    assert_eq!(reap().await, (2, 2));
    assert_eq!(reap().await, (0, 0));
    assert!(store
        .session_get(&live, r, idle, idle)
        .await
        .unwrap()
        .is_some());

    // A surviving key answers a different payload with Mismatch; a reaped one is free again.
    let g = fp("other");
    for (k, survives) in [
        ("old-done", false),
        ("old-expired", false),
        ("old-live", true),
        ("young-done", true),
    ] {
        let got = claim(&store, &u, &key(k), &g, r, LOCK).await;
        assert_eq!(got == Mismatch, survives, "{k}: {got:?}");
    }
}

// ---- concurrency -------------------------------------------------------------------------

/// 50 requests with one key and payload, spread over three stores (three pools) on one
/// database: exactly one causes its effect; the others see InFlight or replay its answer.
async fn fifty_racers_one_key_one_effect(url: String) {
    let stores: Vec<Store> = join_all((0..3).map(|_| open(&url))).await;
    let u = user(&stores[0], "racer").await;
    race_one_key(&stores, 50, &u, |store, won, i| async move {
        let answer = effect(&store, &won.scope, &won.key, &won.token, i as i64).await?;
        Ok::<_, Error>(((), answer))
    })
    .await;
    assert_eq!(effects(&stores[1]).await, 1);
}

// ---- error predicates --------------------------------------------------------------------

/// What the predicates say: (is_retryable, is_retryable_uncommitted, is_unavailable).
type Class = (bool, bool, bool);
/// Transient and certainly not committed: even a plain write may re-run.
const ROLLED_BACK: Class = (true, true, true);
/// Transient, but the write may have committed: only idempotent work may re-run.
const MAYBE_COMMITTED: Class = (true, false, true);
/// The database refused for good.
const PERMANENT: Class = (false, false, true);
/// The caller's mistake or a domain outcome, not the store's health.
const DOMAIN: Class = (false, false, false);

fn class(e: &Error) -> Class {
    (
        e.is_retryable(),
        e.is_retryable_uncommitted(),
        e.is_unavailable(),
    )
}

fn db_code(e: &sqlx::Error) -> Option<String> {
    e.as_database_error().and_then(|d| d.code()).map(Into::into)
}

async fn error_predicates(url: String) {
    let store = open(&url).await;
    let mut cases: Vec<(String, Error, Class)> = vec![
        ("NotFound".into(), Error::NotFound, DOMAIN),
        ("EmailTaken".into(), Error::EmailTaken, DOMAIN),
        ("JobLost".into(), Error::JobLost, DOMAIN),
        ("LockLost".into(), Error::IdempotencyLockLost, DOMAIN),
        (
            "PoolTimedOut".into(),
            sqlx::Error::PoolTimedOut.into(),
            ROLLED_BACK,
        ),
        (
            "Io".into(),
            sqlx::Error::Io(std::io::Error::other("reset")).into(),
            MAYBE_COMMITTED,
        ),
    ];
    let bad = Store::open(&StoreOptions::new("mysql://localhost/x")).await;
    cases.push((
        "UnsupportedUrl".into(),
        bad.err().expect("mysql refused"),
        DOMAIN,
    ));

    match store.backend() {
        Backend::Sqlite => {
            use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
            use sqlx::ConnectOptions;
            use std::str::FromStr;
            // A real SQLITE_BUSY: one connection holds the write lock, another will not wait.
            let mut holder = SqliteConnection::connect(&url).await.unwrap();
            holder.execute("BEGIN IMMEDIATE").await.unwrap();
            let opts = SqliteConnectOptions::from_str(&url).unwrap();
            let mut impatient = opts.busy_timeout(Duration::ZERO).connect().await.unwrap();
            let busy = impatient.execute("BEGIN IMMEDIATE").await.unwrap_err();
            assert_eq!(db_code(&busy).as_deref(), Some("5"), "{busy:?}");
            cases.push(("SQLITE_BUSY".into(), busy.into(), ROLLED_BACK));
            holder.execute("ROLLBACK").await.unwrap();
            let dup = "INSERT INTO users (id, email, password_hash, created_at) VALUES ('u', 'u@x', 'h', 0)";
            impatient.execute(dup).await.unwrap();
            let dup = impatient.execute(dup).await.unwrap_err();
            cases.push(("SQLITE_CONSTRAINT".into(), dup.into(), PERMANENT));
        }
        Backend::Postgres => {
            // Real server errors with chosen SQLSTATEs, through the Any driver the store uses.
            let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
            for (code, want) in [
                ("40001", ROLLED_BACK),     // serialization_failure
                ("40P01", ROLLED_BACK),     // deadlock_detected
                ("57P01", MAYBE_COMMITTED), // admin_shutdown
                ("08006", MAYBE_COMMITTED), // connection_failure
                ("23505", PERMANENT),       // unique_violation
                ("42501", PERMANENT),       // insufficient_privilege (low byte 5, like BUSY)
                ("22012", PERMANENT),       // division_by_zero
            ] {
                let sql =
                    format!("DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = '{code}'; END $$");
                let e = conn.execute(sql.as_str()).await.unwrap_err();
                assert_eq!(db_code(&e).as_deref(), Some(code), "{e:?}");
                cases.push((code.into(), e.into(), want));
            }
        }
    }
    for (what, e, want) in cases {
        assert_eq!(class(&e), want, "{what}: {e:?}");
    }
}

// ---- jobs and the effect ledger -------------------------------------------------------

const LEASE: Duration = Duration::from_secs(10);

/// A job due since long ago, so claims at any "now" of the test may take it.
fn job(queue: &str, n: i64) -> JobInsert {
    JobInsert {
        run_at: T0,
        ..JobInsert::new(queue, "noop", format!("{{\"n\":{n}}}"))
    }
}

fn fences(jobs: &[JobRow]) -> Vec<JobFence> {
    jobs.iter().map(JobRow::fence).collect()
}

fn count(counts: &[holdfast_store::QueueCount], queue: &str, state: &str) -> i64 {
    counts
        .iter()
        .find(|c| c.queue == queue && c.state == state)
        .map_or(0, |c| c.count)
}

async fn job_lifecycle(store: Store) {
    let now = holdfast_core::now_ms();
    // Unique keys: the second enqueue is a no-op.
    assert!(store
        .job_enqueue(&job("q", 1).unique("only-once"))
        .await
        .unwrap()
        .is_some());
    assert!(store
        .job_enqueue(&job("q", 1).unique("only-once"))
        .await
        .unwrap()
        .is_none());
    // Priority first, then due time; a scheduled job waits for its time.
    let urgent = JobInsert {
        priority: 0,
        ..job("q", 2)
    };
    let later = JobInsert {
        run_at: now + 60_000,
        ..job("q", 3)
    };
    store
        .job_enqueue_many(&[urgent, later, job("other", 4)])
        .await
        .unwrap();
    let first = store.job_claim("q", "w1", 1, now, LEASE).await.unwrap();
    assert_eq!(
        first[0].args, r#"{"n":2}"#,
        "the most urgent job goes first"
    );
    let rest = store.job_claim("q", "w1", 10, now, LEASE).await.unwrap();
    assert_eq!(rest.len(), 1, "the scheduled job is not due");
    assert_eq!(rest[0].args, r#"{"n":1}"#);
    let got = [first, rest].concat();
    assert!(got.iter().all(|j| j.attempt == 1 && j.claim == 1));
    assert_eq!(
        store.job_next_run_at("q").await.unwrap(),
        Some(now + 60_000)
    );
    // Complete one; fail the other with a retry, then for good.
    assert_eq!(store.job_complete(&[got[0].fence()], now).await.unwrap(), 1);
    assert!(store
        .job_fail(got[1].fence(), "boom", Some(now + 5), now)
        .await
        .unwrap());
    assert!(
        store
            .job_claim("q", "w1", 10, now, LEASE)
            .await
            .unwrap()
            .is_empty(),
        "not due yet"
    );
    let again = store.job_claim("q", "w1", 1, now + 5, LEASE).await.unwrap();
    assert_eq!((again[0].id, again[0].attempt), (got[1].id, 2));
    assert!(store
        .job_fail(again[0].fence(), "boom again", None, now)
        .await
        .unwrap());
    let dead = store.job_dead(10).await.unwrap();
    assert_eq!(
        (dead.len(), dead[0].last_error.as_deref()),
        (1, Some("boom again"))
    );
    // Redrive: available again with a fresh budget (and a new claim).
    assert_eq!(
        store.job_redrive(Some(dead[0].job.id), now).await.unwrap(),
        1
    );
    let redriven = store.job_claim("q", "w1", 1, now, LEASE).await.unwrap();
    assert_eq!(
        (redriven[0].id, redriven[0].attempt, redriven[0].claim),
        (dead[0].job.id, 1, 3)
    );
    // Release (drain) gives the attempt back without counting it.
    assert_eq!(store.job_release(&fences(&redriven)).await.unwrap(), 1);
    let released = store.job_claim("q", "w1", 1, now, LEASE).await.unwrap();
    assert_eq!((released[0].attempt, released[0].claim), (1, 4));
    let counts = store.job_counts().await.unwrap();
    assert_eq!(
        (
            count(&counts, "q", "completed"),
            count(&counts, "q", "running"),
            count(&counts, "other", "available")
        ),
        (1, 1, 1)
    );
    // Pruning removes finished jobs only.
    assert_eq!(store.job_prune(now + 1, 100).await.unwrap(), 1);
    assert_eq!(
        count(&store.job_counts().await.unwrap(), "q", "completed"),
        0
    );
}

async fn job_attempts_are_fenced(store: Store) {
    let now = holdfast_core::now_ms();
    store.job_enqueue(&job("q", 1)).await.unwrap();
    let first = store
        .job_claim("q", "stalled", 1, now, LEASE)
        .await
        .unwrap()
        .remove(0);
    // The worker stops heartbeating; its lease lapses and the rescuer frees the job.
    assert_eq!(
        store.job_rescue(now + 1).await.unwrap(),
        (0, 0),
        "lease still live"
    );
    assert_eq!(
        store
            .job_rescue(now + LEASE.as_millis() as i64 + 1)
            .await
            .unwrap(),
        (1, 0)
    );
    let second = store
        .job_claim("q", "fresh", 1, now + 20_000, LEASE)
        .await
        .unwrap()
        .remove(0);
    assert_eq!((second.id, second.attempt), (first.id, 2));
    // The stalled attempt comes back: everything it tries is refused.
    assert_stale(&store, first.fence(), now).await;
    assert!(
        store.ledger_get("e:stale").await.unwrap().is_none(),
        "a fenced settlement writes nothing"
    );
    // The current attempt still owns it.
    assert_eq!(
        store
            .job_heartbeat(&[second.fence()], now + 99_999)
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.job_complete(&[second.fence()], now).await.unwrap(), 1);
    // A job whose last attempt lapses is dead, not retried forever.
    store
        .job_enqueue(&JobInsert {
            max_attempts: 1,
            ..job("q", 2)
        })
        .await
        .unwrap();
    store.job_claim("q", "w", 1, now, LEASE).await.unwrap();
    assert_eq!(store.job_rescue(now + 60_000).await.unwrap(), (0, 1));
}

/// A claim number is never handed out twice for one job, whatever happened in between: a
/// worker that stalled before a redrive or a release cannot settle a later attempt. (With
/// `(id, attempt)` as the fence, a redrive restarted at attempt 1 and a release gave the
/// attempt number back, so an old fence matched again.)
async fn fences_are_unique_forever(store: Store) {
    let now = holdfast_core::now_ms();
    store.job_enqueue(&job("q", 1)).await.unwrap();
    let claim = || async {
        store
            .job_claim("q", "w", 1, now, LEASE)
            .await
            .unwrap()
            .remove(0)
    };
    let mut seen = vec![];

    let first = claim().await;
    seen.push(first.fence());
    // Dies for good (stalled past its lease meanwhile); an operator redrives it.
    assert!(store
        .job_fail(first.fence(), "boom", None, now)
        .await
        .unwrap());
    assert_eq!(store.job_redrive(Some(first.id), now).await.unwrap(), 1);
    let after_redrive = claim().await;
    assert_eq!(after_redrive.attempt, 1, "a fresh budget");
    seen.push(after_redrive.fence());
    // A draining worker gives it back; the next claim must not reuse the fence either.
    assert_eq!(
        store.job_release(&[after_redrive.fence()]).await.unwrap(),
        1
    );
    let after_release = claim().await;
    seen.push(after_release.fence());
    let mut unique = seen.clone();
    unique.sort_by_key(|f| f.claim);
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "fences reused: {seen:?}");

    for &stale in &seen[..2] {
        assert_stale(&store, stale, now).await;
    }
    assert_eq!(
        store
            .job_complete(&[after_release.fence()], now)
            .await
            .unwrap(),
        1
    );
}

/// Everything a claim that is no longer current tries is refused: heartbeat, completion,
/// failure, settlement.
async fn assert_stale(store: &Store, stale: JobFence, now: i64) {
    assert_eq!(
        store.job_heartbeat(&[stale], now + 99_999).await.unwrap(),
        0
    );
    assert_eq!(store.job_complete(&[stale], now).await.unwrap(), 0);
    assert!(!store.job_fail(stale, "late", None, now).await.unwrap());
    let settled = settle(store, stale, "e:stale", "x").await;
    assert_eq!(err_kind(settled), "JobLost");
}

/// Settles `effect_key` as `external_id` for the claim `fence`, with a follow-up job: what the
/// effect ledger's last step composes, on each engine in its form (one statement on
/// PostgreSQL, a transaction on SQLite). A claim that is no longer current is `JobLost`.
async fn settle(
    store: &Store,
    fence: JobFence,
    effect_key: &str,
    external_id: &str,
) -> Result<(), Error> {
    let followup =
        JobInsert::new("followup", "next", "{}".into()).unique(format!("followup:{effect_key}"));
    if store.backend() == holdfast_store::Backend::Postgres {
        let mut stmt = holdfast_store::Statement::new();
        stmt.complete_job("completed", fence);
        stmt.settle_effect("settled", effect_key, external_id, "completed");
        stmt.enqueue_jobs("followup", &[followup], "completed");
        return match store.run_statement("settle", &stmt, "completed").await? {
            true => Ok(()),
            false => Err(Error::JobLost),
        };
    }
    let followup = &followup;
    store
        .transaction("settle", Rerun::Always, |tx| {
            async move {
                tx.job_settle_effect(fence, effect_key, external_id).await?;
                tx.job_enqueue(std::slice::from_ref(followup)).await?;
                Ok::<_, TxError<Infallible>>(())
            }
            .scope_boxed()
        })
        .await
        .map_err(TxError::into_db)
}

async fn concurrent_claimers_never_share_a_job(url: String) {
    let stores = join_all((0..3).map(|_| open(&url))).await;
    let inserts: Vec<JobInsert> = (0..300).map(|n| job("q", n)).collect();
    stores[0].job_enqueue_many(&inserts).await.unwrap();
    let claimers = (0..6).map(|i| {
        let store = stores[i % 3].clone();
        tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = store
                    .job_claim("q", &format!("w{i}"), 7, holdfast_core::now_ms(), LEASE)
                    .await
                    .unwrap();
                if got.is_empty() {
                    return mine;
                }
                store
                    .job_complete(&fences(&got), holdfast_core::now_ms())
                    .await
                    .unwrap();
                mine.extend(got.into_iter().map(|j| j.id));
            }
        })
    });
    let mut all: Vec<i64> = join_all(claimers)
        .await
        .into_iter()
        .flat_map(|r| r.unwrap())
        .collect();
    let claimed = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(
        (claimed, all.len()),
        (300, 300),
        "every job claimed exactly once"
    );
}

async fn ledger_settles_once(store: Store) {
    store
        .job_enqueue(&JobInsert::new("payments", "pay", "{}".into()))
        .await
        .unwrap();
    let payout = store
        .job_claim("payments", "w", 1, holdfast_core::now_ms() + 1, LEASE)
        .await
        .unwrap()
        .remove(0);
    let effect_key = "charge:o1";
    let (entry, fresh) = store.ledger_begin(effect_key, "ext-key-1").await.unwrap();
    assert!(fresh && entry.state == "pending" && entry.external_key == "ext-key-1");
    let (again, fresh) = store.ledger_begin(effect_key, "ext-key-2").await.unwrap();
    assert!(
        !fresh && again.external_key == "ext-key-1",
        "a later attempt reuses the first key"
    );
    settle(&store, payout.fence(), effect_key, "ch_9")
        .await
        .unwrap();
    let done = store.ledger_get(effect_key).await.unwrap().unwrap();
    assert_eq!(
        (done.state.as_str(), done.external_id.as_deref()),
        ("done", Some("ch_9"))
    );
    // Settling the same claim twice is refused, and writes nothing: the follow-up exists once.
    assert_eq!(
        err_kind(settle(&store, payout.fence(), effect_key, "ch_10").await),
        "JobLost"
    );
    assert_eq!(
        store
            .ledger_get(effect_key)
            .await
            .unwrap()
            .unwrap()
            .external_id
            .as_deref(),
        Some("ch_9")
    );
    assert_eq!(
        count(&store.job_counts().await.unwrap(), "followup", "available"),
        1
    );
}

// ---- rate limits and known devices --------------------------------------------------------

const SECOND: Duration = Duration::from_secs(1);

/// A quota of 3 then one a second: three pass at once, the fourth is refused with the wait
/// until the next unit; after that wait exactly one more passes. A refused request charges
/// nothing, to its own key or to the keys after it; keys are independent.
/// The effect a job names is begun by the claim that hands the job out: created pending with
/// the job's key by the first claim (`fresh`: nothing can have been called yet), found with
/// the first key by every later one (not fresh: an earlier attempt may have called), done
/// once settled. A job that names no effect gets none; two jobs naming one effect share it.
async fn a_claim_begins_the_effect_its_job_names(store: Store) {
    let now = holdfast_core::now_ms();
    let effect = |n: i64, key: &str, external: &str| job("q", n).effect(key, external);
    store
        .job_enqueue_many(&[
            effect(1, "charge:o1", "key-1"),
            job("q", 2),
            effect(3, "mail:o2", "mail-key"),
            effect(4, "mail:o2", "mail-key-again"),
        ])
        .await
        .unwrap();
    // An entry begun elsewhere (by `ledger_begin`) is not fresh to a claim either.
    store.ledger_begin("refund:o3", "refund-key").await.unwrap();
    store
        .job_enqueue(&effect(5, "refund:o3", "other-key"))
        .await
        .unwrap();
    let claimed = store.job_claim("q", "w", 10, now, LEASE).await.unwrap();
    let begun: Vec<Option<(String, String, String, bool)>> = claimed
        .iter()
        .map(|j| {
            j.effect.as_ref().map(|b| {
                (
                    b.entry.effect_key.clone(),
                    b.entry.state.clone(),
                    b.entry.external_key.clone(),
                    b.fresh,
                )
            })
        })
        .collect();
    let entry = |key: &str, state: &str, external: &str, fresh: bool| {
        Some((key.into(), state.into(), external.into(), fresh))
    };
    assert_eq!(
        begun,
        vec![
            entry("charge:o1", "pending", "key-1", true),
            None,
            entry("mail:o2", "pending", "mail-key", true),
            entry("mail:o2", "pending", "mail-key", true),
            entry("refund:o3", "pending", "refund-key", false),
        ]
    );
    let pending = store.ledger_get("charge:o1").await.unwrap().unwrap();
    assert_eq!(
        (pending.state.as_str(), pending.external_key.as_str()),
        ("pending", "key-1"),
        "the intent is recorded by the claim's commit"
    );

    // The attempt fails with its outcome unknown; the next claim finds the entry it began.
    assert!(store
        .job_fail(claimed[0].fence(), "timeout", Some(now), now)
        .await
        .unwrap());
    let retry = store.job_claim("q", "w", 10, now, LEASE).await.unwrap();
    let again = retry[0].effect.clone().expect("begun");
    assert!(
        !again.fresh && again.entry.external_key == "key-1",
        "a later attempt is told an earlier one may have called: {again:?}"
    );

    // Once settled, a claim of another job naming the effect finds it done.
    settle(&store, retry[0].fence(), "charge:o1", "ch_1")
        .await
        .unwrap();
    store
        .job_enqueue(&effect(6, "charge:o1", "key-6"))
        .await
        .unwrap();
    let late = store.job_claim("q", "w", 10, now, LEASE).await.unwrap();
    let done = late[0].effect.clone().expect("begun").entry;
    assert_eq!(
        (
            done.state.as_str(),
            done.external_id.as_deref(),
            done.external_key.as_str()
        ),
        ("done", Some("ch_1"), "key-1")
    );
}

async fn rate_quota_bursts_then_refills(store: Store) {
    let q = Quota::new(3, SECOND);
    for i in 0..3 {
        assert_eq!(
            store.rate_take(&[("a", q)], T0).await.unwrap(),
            None,
            "take {i}"
        );
    }
    let refused = store
        .rate_take(&[("a", q), ("b", q)], T0 + 100)
        .await
        .unwrap();
    assert_eq!(
        refused,
        Some(Refused {
            index: 0,
            retry_after: Duration::from_millis(900)
        })
    );
    // "b" was not charged for the refused request: its three are all there.
    for i in 0..3 {
        assert_eq!(
            store.rate_take(&[("b", q)], T0).await.unwrap(),
            None,
            "b take {i}"
        );
    }
    assert!(store.rate_take(&[("b", q)], T0).await.unwrap().is_some());
    assert_eq!(store.rate_take(&[("a", q)], T0 + 1000).await.unwrap(), None);
    assert!(store
        .rate_take(&[("a", q)], T0 + 1000)
        .await
        .unwrap()
        .is_some());
    // A later key refusing reports its own index.
    let refused = store
        .rate_take(&[("c", q), ("a", q)], T0 + 1000)
        .await
        .unwrap();
    assert_eq!(refused.map(|r| r.index), Some(1));
    // Idle long enough, a key is whole again, and the reaper may drop its cell.
    assert_eq!(store.rate_reap(T0 + 10_000).await.unwrap(), 3);
    for i in 0..3 {
        assert_eq!(
            store.rate_take(&[("a", q)], T0 + 10_000).await.unwrap(),
            None,
            "again {i}"
        );
    }
}

/// Twenty takes from separate pools (instances) at one instant on a quota of five: exactly
/// five pass.
async fn rate_quota_holds_across_racing_instances(url: String) {
    let first = open(&url).await;
    let mut stores = vec![first];
    for _ in 0..3 {
        stores.push(open(&url).await);
    }
    let q = Quota::new(5, Duration::from_secs(60));
    let takes = (0..20).map(|i| {
        let store = stores[i % stores.len()].clone();
        async move { store.rate_take(&[("shared", q)], T0).await.unwrap() }
    });
    let passed = join_all(takes).await.iter().filter(|r| r.is_none()).count();
    assert_eq!(passed, 5);
}

async fn known_devices(store: Store) {
    let (mine, stranger) = (DeviceToken::generate(), DeviceToken::generate());
    store.device_remember(&mine, "u1", T0).await.unwrap();
    // Remembering twice is harmless and does not move the owner.
    store.device_remember(&mine, "u2", T0).await.unwrap();
    assert_eq!(
        store.device_owner(&mine).await.unwrap().as_deref(),
        Some("u1")
    );
    assert_eq!(store.device_owner(&stranger).await.unwrap(), None);
    assert_eq!(store.device_reap(T0).await.unwrap(), 0);
    assert_eq!(store.device_reap(T0 + 1).await.unwrap(), 1);
    assert_eq!(store.device_owner(&mine).await.unwrap(), None);
}

/// A process stopped mid-transaction (SIGSTOP, a partition) must not hold its locks until it
/// dies. On Postgres the server ends such a session after `idle_in_transaction_timeout`: a
/// writer queued behind it proceeds, and the stalled transaction cannot commit. (SQLite's
/// lock is the file's: there the supervisor kills a stopped instance, see `holdfast up
/// --kill-unresponsive-after`.)
async fn a_stalled_transaction_does_not_hold_its_locks_for_long(url: String) {
    if Backend::of_url(&url) != Some(Backend::Postgres) {
        return;
    }
    let opts = StoreOptions {
        idle_in_transaction_timeout: Duration::from_millis(300),
        ..StoreOptions::new(&url)
    };
    let stalled = Store::open(&opts).await.unwrap();
    let other = Store::open(&opts).await.unwrap();
    let u = user(&stalled, "locked").await;
    let (locked, locked_rx) = tokio::sync::oneshot::channel::<()>();
    let locked = std::sync::Mutex::new(Some(locked));
    let holder = stalled.transaction("stall", Rerun::IfUncommitted, |tx| {
        let (u, locked) = (u.clone(), &locked);
        async move {
            sqlx::query("UPDATE users SET password_hash = 'stalled' WHERE id = $1")
                .bind(&u)
                .execute(tx.conn())
                .await?;
            if let Some(tx) = locked.lock().unwrap().take() {
                let _ = tx.send(());
            }
            // Stopped, as far as the server can tell.
            tokio::time::sleep(Duration::from_secs(2)).await;
            Ok::<_, TxError<Infallible>>(())
        }
        .scope_boxed()
    });
    let queued = async {
        locked_rx.await.unwrap();
        let started = std::time::Instant::now();
        other.user_set_password(&u, "fresh").await.unwrap();
        started.elapsed()
    };
    let (held, waited) = tokio::join!(holder, queued);
    assert!(held.is_err(), "the stalled transaction must not commit");
    assert!(
        waited < Duration::from_millis(1500),
        "the writer waited {waited:?}"
    );
    let hash: String = raw(&url)
        .await
        .fetch_one(sqlx::query("SELECT password_hash FROM users WHERE id = $1").bind(&u))
        .await
        .unwrap()
        .get(0);
    assert_eq!(hash, "fresh");
}
