//! The edge without the shop: a tiny notes service built only on `holdfast_web::app`, its
//! accounts, [`Authed`] and [`Idempotent`], over a store schema of its own. It shows the pieces
//! compose for any application and holds them to the Idempotency-Key draft's rules.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use holdfast_store::{Migration, Schema, ScopedFutureExt, TxError};
use holdfast_testkit::app::{cookie_of, local, request, send, Reply, PASSWORD};
use holdfast_testkit::db::TempStore;
use holdfast_web::{
    json_response, AppError, AppResult, AppState, Authed, Idempotent, JsonBody, Required,
    WebOptions,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::Notify;

static NOTES: Schema = Schema {
    name: "notes",
    migrations: &[Migration::new(
        1,
        "crates/holdfast-web/tests/edge.rs",
        "CREATE TABLE notes (id BIGINT PRIMARY KEY, owner TEXT NOT NULL, text TEXT NOT NULL);",
    )],
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewNote {
    text: String,
}

#[derive(Serialize)]
struct Note {
    id: i64,
    text: String,
}

/// The application's own refusal, aborting its transaction.
struct Blank;

impl From<Blank> for AppError {
    fn from(_: Blank) -> Self {
        AppError::unprocessable("blank-note", "a note needs some text")
    }
}

async fn create(
    user: Authed,
    note: Idempotent<JsonBody<NewNote>, Required>,
) -> AppResult<Response> {
    let (JsonBody(new), claim) = (note.body, note.claim);
    claim
        .run(
            "note_create",
            |tx| {
                async {
                    if new.text.trim().is_empty() {
                        return Err(TxError::Abort(Blank));
                    }
                    let id: i64 = sqlx::query_scalar(
                        "INSERT INTO notes (id, owner, text) VALUES ((SELECT COALESCE(MAX(id), 0) + 1 FROM notes), $1, $2) RETURNING id",
                    )
                    .bind(&user.user_id)
                    .bind(&new.text)
                    .fetch_one(tx.conn())
                    .await?;
                    Ok(Note {
                        id,
                        text: new.text.clone(),
                    })
                }
                .scope_boxed()
            },
            |note| json_response(StatusCode::CREATED, note),
        )
        .await
}

async fn list(
    axum::extract::State(edge): axum::extract::State<AppState>,
    user: Authed,
) -> AppResult<Json<Vec<String>>> {
    let texts = edge
        .store()
        .read("notes", |c| {
            async {
                let rows: Vec<String> =
                    sqlx::query_scalar("SELECT text FROM notes WHERE owner = $1 ORDER BY id")
                        .bind(&user.user_id)
                        .fetch_all(c)
                        .await?;
                Ok::<_, TxError<Infallible>>(rows)
            }
            .scope_boxed()
        })
        .await?;
    Ok(Json(texts))
}

struct Notes {
    router: Router,
    _db: TempStore,
}

async fn notes_service() -> Notes {
    let db = TempStore::open(&[&NOTES]).await;
    let edge = db.edge(local());
    let routes = Router::new()
        .route("/api/notes", post(create))
        .route("/api/notes", get(list));
    Notes {
        router: holdfast_web::app(edge, routes),
        _db: db,
    }
}

impl Notes {
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        send(&self.router, request(method, path, body, headers)).await
    }

    async fn login(&self, email: &str) -> String {
        let creds = json!({ "email": email, "password": PASSWORD });
        let signup = self
            .call("POST", "/api/signup", Some(creds.clone()), &[])
            .await;
        assert_eq!(signup.status, StatusCode::CREATED);
        let login = self.call("POST", "/api/login", Some(creds), &[]).await;
        assert_eq!(login.status, StatusCode::OK);
        cookie_of(&login)
    }
}

/// A session cookie and an `Idempotency-Key`.
fn keyed<'a>(cookie: &'a str, key: &'a str) -> [(&'a str, &'a str); 2] {
    [("cookie", cookie), ("idempotency-key", key)]
}

#[tokio::test]
async fn any_application_gets_accounts_and_replayable_writes() {
    let app = notes_service().await;
    let ann = app.login("ann@example.com").await;
    let note = |text: &str| Some(json!({ "text": text }));
    let h = keyed(&ann, "n-1");

    let first = app.call("POST", "/api/notes", note("hi"), &h).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let again = app.call("POST", "/api/notes", note("hi"), &h).await;
    assert_eq!(
        (again.status, again.replayed()),
        (StatusCode::CREATED, true)
    );
    assert_eq!(again.json()["id"], first.json()["id"]);
    let other = app.call("POST", "/api/notes", note("other"), &h).await;
    assert_eq!(
        other.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "same key, different payload"
    );

    let cookie = [("cookie", ann.as_str())];
    let keyless = app.call("POST", "/api/notes", note("x"), &cookie).await;
    assert_eq!(
        keyless.status,
        StatusCode::BAD_REQUEST,
        "the route requires a key"
    );
    let anonymous = app
        .call(
            "POST",
            "/api/notes",
            note("x"),
            &[("idempotency-key", "n-9")],
        )
        .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);

    // The application's own refusal rolls back and gives the key back: a corrected retry with
    // the same key runs.
    let h2 = keyed(&ann, "n-2");
    let blank = app.call("POST", "/api/notes", note(" "), &h2).await;
    assert_eq!(blank.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(blank.json()["type"], "/problems/blank-note");
    let fixed = app.call("POST", "/api/notes", note("fixed"), &h2).await;
    assert_eq!(fixed.status, StatusCode::CREATED);

    // Keys and notes are per user.
    let bo = app.login("bo@example.com").await;
    let bos = app
        .call("POST", "/api/notes", note("bo's"), &keyed(&bo, "n-1"))
        .await;
    assert_eq!(bos.status, StatusCode::CREATED);
    assert_ne!(bos.json()["id"], first.json()["id"]);
    let mine = app.call("GET", "/api/notes", None, &cookie).await;
    assert_eq!(mine.json(), json!(["hi", "fixed"]));
}

#[tokio::test]
async fn accounts_take_small_bodies_while_the_application_keeps_its_own_limit() {
    let app = notes_service().await;
    let ann = app.login("ann@example.com").await;
    let big = "x".repeat(holdfast_web::ACCOUNT_BODY_LIMIT + 1);
    let login = json!({ "email": "ann@example.com", "password": big });
    let refused = app.call("POST", "/api/login", Some(login), &[]).await;
    assert_eq!(refused.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(refused.is_problem());
    let note = app
        .call(
            "POST",
            "/api/notes",
            Some(json!({ "text": big })),
            &keyed(&ann, "big-1"),
        )
        .await;
    assert_eq!(note.status, StatusCode::CREATED);
}

/// The notes service's state plus two signals: a request arrived, a request may go on.
#[derive(Clone)]
struct Paced {
    edge: AppState,
    arrived: tokio::sync::mpsc::UnboundedSender<()>,
    release: Arc<Notify>,
}

impl axum::extract::FromRef<Paced> for AppState {
    fn from_ref(paced: &Paced) -> AppState {
        paced.edge.clone()
    }
}

/// A note handler that stops before its transaction (which claims its key), until released.
async fn create_when_released(
    State(Paced {
        arrived, release, ..
    }): State<Paced>,
    user: Authed,
    note: Idempotent<JsonBody<NewNote>, Required>,
) -> AppResult<Response> {
    // Registered before saying so, so that a release right after the signal is not missed.
    let released = release.notified();
    tokio::pin!(released);
    released.as_mut().enable();
    let _ = arrived.send(());
    released.await;
    create(user, note).await
}

/// The notes service with [`create_when_released`] as its create route: the app, the
/// "arrived" signals, the release, and the edge state.
async fn paced_service(
    opts: WebOptions,
) -> (
    Notes,
    tokio::sync::mpsc::UnboundedReceiver<()>,
    Arc<Notify>,
    AppState,
) {
    let db = TempStore::open(&[&NOTES]).await;
    let edge = db.edge(opts);
    let (arrived_tx, arrived) = tokio::sync::mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let paced = Paced {
        edge: edge.clone(),
        arrived: arrived_tx,
        release: release.clone(),
    };
    let routes = Router::new()
        .route("/api/notes", post(create_when_released))
        .route("/api/notes", get(list));
    let app = Notes {
        router: holdfast_web::app(paced, routes),
        _db: db,
    };
    (app, arrived, release, edge)
}

#[tokio::test]
async fn a_retry_while_the_first_request_works_replays_its_answer_and_a_dead_claim_frees_within_its_lease(
) {
    let lease = std::time::Duration::from_millis(500);
    let (app, mut arrived, release, edge) = paced_service(WebOptions {
        secure_cookies: false,
        idempotency_lock_ttl: lease,
        ..WebOptions::default()
    })
    .await;
    let ann = app.login("ann@example.com").await;
    let h = keyed(&ann, "slow-1");
    let body = Some(json!({ "text": "slow" }));

    // Two tries with one key are both inside the handler before either writes (a client that
    // gave up on the first and retried). The key is claimed by the work's own transaction, so
    // one of them does the work and the other, waiting for that commit, replays its answer.
    let send_one = || {
        let req = request("POST", "/api/notes", body.clone(), &h);
        let router = app.router.clone();
        tokio::spawn(async move { send(&router, req).await })
    };
    let (first, retry) = (send_one(), send_one());
    for _ in 0..2 {
        arrived.recv().await.expect("both tries reach the handler");
    }
    release.notify_waiters();
    let (first, retry) = (first.await.unwrap(), retry.await.unwrap());
    assert_eq!(
        (first.status, retry.status),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    assert_eq!(
        [first.replayed(), retry.replayed()]
            .iter()
            .filter(|r| **r)
            .count(),
        1,
        "one did the work, the other replayed it"
    );
    assert_eq!(first.json(), retry.json(), "the same answer");
    let notes = app
        .call("GET", "/api/notes", None, &[("cookie", ann.as_str())])
        .await;
    assert_eq!(
        notes.json().as_array().map(Vec::len),
        Some(1),
        "written once: {:?}",
        notes.json()
    );

    // A claim committed on its own (made here directly, as an older build's killed instance
    // leaves it) stops blocking the key one lease later, and the retry does the work.
    let me = app
        .call("GET", "/api/me", None, &[("cookie", ann.as_str())])
        .await;
    let scope = me.json()["id"].as_str().unwrap().to_owned();
    let dead_body = json!({ "text": "orphan" });
    let key = holdfast_core::IdempotencyKey::parse(b"dead-1").unwrap();
    let fingerprint = holdfast_core::RequestFingerprint::of(
        "POST",
        "/api/notes",
        &holdfast_web::canonical_json(&dead_body),
    );
    let orphan = edge
        .store()
        .idem_claim(holdfast_store::IdemClaim {
            scope: &scope,
            key: &key,
            fingerprint: &fingerprint,
            now: holdfast_core::now_ms(),
            lock_ttl: lease,
        })
        .await
        .unwrap();
    assert!(matches!(
        orphan,
        holdfast_store::ClaimOutcome::Claimed { .. }
    ));
    let h = keyed(&ann, "dead-1");
    let (held, _) = tokio::join!(
        app.call("POST", "/api/notes", Some(dead_body.clone()), &h),
        async {
            arrived.recv().await;
            release.notify_one();
        }
    );
    assert_eq!(held.status, StatusCode::CONFLICT, "{:?}", held.json());
    tokio::time::sleep(lease + std::time::Duration::from_millis(50)).await;
    let (taken_over, _) =
        tokio::join!(app.call("POST", "/api/notes", Some(dead_body), &h), async {
            arrived.recv().await;
            release.notify_one();
        });
    assert_eq!(
        taken_over.status,
        StatusCode::CREATED,
        "{:?}",
        taken_over.json()
    );
}

#[tokio::test]
async fn past_the_in_flight_cap_a_request_is_refused_at_once() {
    let (app, mut arrived, release, _) = paced_service(WebOptions {
        secure_cookies: false,
        max_in_flight: 2,
        ..WebOptions::default()
    })
    .await;
    let ann = app.login("ann@example.com").await;
    let mut held = Vec::new();
    for i in 0..2 {
        let req = request(
            "POST",
            "/api/notes",
            Some(json!({ "text": "held" })),
            &keyed(&ann, &format!("held-{i}")),
        );
        let router = app.router.clone();
        held.push(tokio::spawn(async move { send(&router, req).await }));
        arrived.recv().await.expect("the request holds a slot");
    }
    let refused = app
        .call("GET", "/api/notes", None, &[("cookie", ann.as_str())])
        .await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers["retry-after"], "1");
    assert_eq!(refused.json()["type"], "/problems/overloaded");
    release.notify_waiters();
    for h in held {
        assert_eq!(h.await.unwrap().status, StatusCode::CREATED);
    }
    let served = app
        .call("GET", "/api/notes", None, &[("cookie", ann.as_str())])
        .await;
    assert_eq!(served.status, StatusCode::OK);
}

#[tokio::test]
async fn unparsable_requests_get_problems_not_empty_bodies() {
    let notes = notes_service().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = notes
        .router
        .clone()
        .into_make_service_with_connect_info::<std::net::SocketAddr>();
    tokio::spawn(async move { axum::serve(holdfast_web::public_listener(listener), app).await });
    holdfast_testkit::process::assert_unparsable_requests_get_problems(addr).await;
}
