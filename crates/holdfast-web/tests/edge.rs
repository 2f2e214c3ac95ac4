//! The edge without the shop: a tiny notes service built only on `holdfast_web::app`, its
//! accounts, [`Authed`] and [`Idempotent`], over a store schema of its own. It shows the pieces
//! compose for any application and holds them to the Idempotency-Key draft's rules.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use holdfast_store::{Migration, Schema, ScopedFutureExt, Store, StoreOptions, TxError};
use holdfast_web::{
    json_response, AppError, AppResult, AppState, Authed, Idempotent, JsonBody, Required,
    WebOptions,
};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::convert::Infallible;
use tower::ServiceExt;

static NOTES: Schema = Schema {
    name: "notes",
    migrations: &[Migration {
        version: 1,
        file: "crates/holdfast-web/tests/edge.rs",
        sql: "CREATE TABLE notes (id BIGINT PRIMARY KEY, owner TEXT NOT NULL, text TEXT NOT NULL);",
        legacy: None,
    }],
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
    Idempotent {
        body: JsonBody(new),
        claim,
        ..
    }: Idempotent<JsonBody<NewNote>, Required>,
) -> AppResult<axum::response::Response> {
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
    _dir: tempfile::TempDir,
}

async fn notes_service() -> Notes {
    let dir = tempfile::tempdir().unwrap();
    let url = holdfast_store::testing::sqlite_url(dir.path());
    let store = Store::open(&StoreOptions::new(url).schema(&NOTES))
        .await
        .unwrap();
    let edge = AppState::new(
        store,
        WebOptions {
            secure_cookies: false,
            ..WebOptions::default()
        },
        None,
    );
    let routes = Router::new()
        .route("/api/notes", post(create))
        .route("/api/notes", get(list));
    Notes {
        router: holdfast_web::app(edge, routes),
        _dir: dir,
    }
}

impl Notes {
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value, Option<String>) {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "notes.test");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let body = match body {
            Some(v) => {
                b = b.header(header::CONTENT_TYPE, "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        let resp = self
            .router
            .clone()
            .oneshot(b.body(body).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let cookie = resp
            .headers()
            .get(header::SET_COOKIE)
            .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_owned());
        let replayed = resp.headers().contains_key("idempotent-replayed");
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let mut json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if replayed {
            json["replayed"] = json!(true);
        }
        (status, json, cookie)
    }

    async fn login(&self, email: &str) -> String {
        let creds = json!({ "email": email, "password": "correct horse battery" });
        let (s, _, _) = self
            .call("POST", "/api/signup", Some(creds.clone()), &[])
            .await;
        assert_eq!(s, StatusCode::CREATED);
        let (s, _, cookie) = self.call("POST", "/api/login", Some(creds), &[]).await;
        assert_eq!(s, StatusCode::OK);
        cookie.unwrap()
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
    let h = keyed(&ann, "n-1");

    let (s, first, _) = app
        .call("POST", "/api/notes", Some(json!({"text": "hi"})), &h)
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, again, _) = app
        .call("POST", "/api/notes", Some(json!({"text": "hi"})), &h)
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(
        (again["id"].clone(), again["replayed"].clone()),
        (first["id"].clone(), json!(true))
    );
    let (s, _, _) = app
        .call("POST", "/api/notes", Some(json!({"text": "other"})), &h)
        .await;
    assert_eq!(
        s,
        StatusCode::UNPROCESSABLE_ENTITY,
        "same key, different payload"
    );

    let cookie = [("cookie", ann.as_str())];
    let (s, _, _) = app
        .call("POST", "/api/notes", Some(json!({"text": "x"})), &cookie)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "the route requires a key");
    let (s, _, _) = app
        .call(
            "POST",
            "/api/notes",
            Some(json!({"text": "x"})),
            &[("idempotency-key", "n-9")],
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // The application's own refusal rolls back and gives the key back: a corrected retry with
    // the same key runs.
    let h2 = keyed(&ann, "n-2");
    let (s, problem, _) = app
        .call("POST", "/api/notes", Some(json!({"text": " "})), &h2)
        .await;
    assert_eq!(
        (s, problem["type"].as_str()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("/problems/blank-note")
        )
    );
    let (s, _, _) = app
        .call("POST", "/api/notes", Some(json!({"text": "fixed"})), &h2)
        .await;
    assert_eq!(s, StatusCode::CREATED);

    // Keys and notes are per user.
    let bo = app.login("bo@example.com").await;
    let hb = keyed(&bo, "n-1");
    let (s, bos, _) = app
        .call("POST", "/api/notes", Some(json!({"text": "bo's"})), &hb)
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_ne!(bos["id"], first["id"]);
    let (_, mine, _) = app.call("GET", "/api/notes", None, &cookie).await;
    assert_eq!(mine, json!(["hi", "fixed"]));
}
