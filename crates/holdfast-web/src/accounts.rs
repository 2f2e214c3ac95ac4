//! Accounts: sign up, log in (rotating the session id), log out, change the password (ending
//! every other session), and who am I. Every application built on the edge gets these routes.

use crate::body::JsonBody;
use crate::error::{AppError, AppResult};
use crate::session::{self, Authed};
use crate::AppState;
use axum::extract::{FromRef, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use holdfast_core::{Email, Password};
use serde::Deserialize;
use serde_json::json;

/// The accounts API, for any application state that holds an [`AppState`]; bodies of at most
/// `body_limit` bytes.
pub(crate) fn routes<S>(body_limit: usize) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    AppState: FromRef<S>,
{
    Router::new()
        .route("/api/signup", post(signup))
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .route("/api/password", post(password))
        .route("/api/me", get(me))
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Credentials {
    email: String,
    password: String,
}

async fn signup(
    State(st): State<AppState>,
    JsonBody(c): JsonBody<Credentials>,
) -> AppResult<Response> {
    let email = Email::parse(&c.email)?;
    let hash = st.passwords.hash(Password::parse(&c.password)?).await?;
    let user = st.store.user_create(&email, &hash).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": user.id, "email": user.email })),
    )
        .into_response())
}

async fn login(
    State(st): State<AppState>,
    headers: HeaderMap,
    JsonBody(c): JsonBody<Credentials>,
) -> AppResult<Response> {
    let denied = || {
        AppError::new(
            StatusCode::UNAUTHORIZED,
            "invalid-credentials",
            "wrong email or password",
        )
    };
    let (Ok(email), Ok(password)) = (Email::parse(&c.email), Password::parse(&c.password)) else {
        return Err(denied());
    };
    let creds = st.store.user_credentials(&email).await?;
    let stored_hash = creds.as_ref().map(|c| c.password_hash.clone());
    if !st.passwords.verify(password, stored_hash).await? {
        return Err(denied());
    }
    let user = creds.ok_or_else(denied)?.user;
    // Rotate: a session id known before login (fixation) never becomes an authenticated one.
    let previous = session::token_from_headers(&headers, st.opts.secure_cookies);
    let issued = st.sessions.login(&user.id, previous).await?;
    let mut resp = Json(json!({ "user": { "id": user.id, "email": user.email } })).into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, session::set_cookie(&issued, &st)?);
    Ok(resp)
}

/// Ends this session on every instance. (With signed-cookie sessions there is no server-side
/// session to end: the cookie is cleared, see `holdfast-sessions`.)
async fn logout(State(st): State<AppState>, headers: HeaderMap) -> AppResult<Response> {
    if let Some(token) = session::token_from_headers(&headers, st.opts.secure_cookies) {
        st.sessions.logout(token).await?;
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, session::clear_cookie(&st));
    Ok(resp)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordChange {
    current_password: String,
    new_password: String,
}

/// Changes the password and ends every session of the user, on every instance; the caller
/// gets a fresh session (a new id) in place of the one it used.
async fn password(
    State(st): State<AppState>,
    user: Authed,
    JsonBody(c): JsonBody<PasswordChange>,
) -> AppResult<Response> {
    let new = Password::parse(&c.new_password)?;
    let wrong = || {
        AppError::new(
            StatusCode::FORBIDDEN,
            "wrong-password",
            "the current password is wrong",
        )
    };
    let current = Password::parse(&c.current_password).map_err(|_| wrong())?;
    let account = st
        .store
        .user_get(&user.user_id)
        .await?
        .ok_or_else(AppError::unauthorized)?;
    let creds = st
        .store
        .user_credentials(&Email::parse(&account.email)?)
        .await?;
    if !st
        .passwords
        .verify(current, creds.map(|c| c.password_hash))
        .await?
    {
        return Err(wrong());
    }
    let hash = st.passwords.hash(new).await?;
    st.store.user_set_password(&user.user_id, &hash).await?;
    match st.sessions.logout_user(&user.user_id).await {
        Ok(()) => {}
        // The sessions are gone from the store; a Redis copy that could not be deleted dies
        // at its next touch. Failing here would leave the client unable to retry (the
        // password has changed), so this is logged, not returned.
        Err(e) if e.is_redis() => {
            tracing::warn!(error = %e, "password changed; redis copies of old sessions expire at their next use")
        }
        Err(e) => return Err(e.into()),
    }
    let issued = st.sessions.login(&user.user_id, None).await?;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, session::set_cookie(&issued, &st)?);
    Ok(resp)
}

async fn me(State(st): State<AppState>, user: Authed) -> AppResult<Response> {
    let u = st
        .store
        .user_get(&user.user_id)
        .await?
        .ok_or_else(AppError::unauthorized)?;
    Ok(Json(json!({ "id": u.id, "email": u.email })).into_response())
}
