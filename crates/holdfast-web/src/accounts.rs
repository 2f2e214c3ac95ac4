//! Accounts: sign up, log in (rotating the session id), log out, change the password (ending
//! every other session), and who am I. Every application built on the edge gets these routes,
//! and their rate limits (see `limits.rs`): every quota is taken before a password is hashed.

use crate::body::JsonBody;
use crate::error::{AppError, AppResult};
use crate::limits::{self, ClientAddr, Limit};
use crate::session::{self, Authed};
use crate::AppState;
use axum::extract::{FromRef, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use holdfast_core::{DeviceToken, Email, Password};
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
    client: ClientAddr,
    JsonBody(c): JsonBody<Credentials>,
) -> AppResult<Response> {
    let email = Email::parse(&c.email)?;
    let password = Password::parse(&c.password)?;
    let quota = st.opts.rate_limits.signup_per_address;
    let limit = Limit {
        name: "signup-address",
        key: format!("signup-address:{client}"),
        quota,
    };
    limits::take(&st, &[limit], client).await?;
    let hash = st.passwords.hash(password).await?;
    let user = st.store.user_create(&email, &hash).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": user.id, "email": user.email })),
    )
        .into_response())
}

/// The cookie that marks a browser as one that logged in to an account before.
fn device_cookie_name(secure: bool) -> &'static str {
    if secure {
        "__Host-holdfast_device"
    } else {
        "holdfast_device"
    }
}

async fn login(
    State(st): State<AppState>,
    client: ClientAddr,
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
    let q = &st.opts.rate_limits;
    let by_address = Limit {
        name: "login-address",
        key: format!("login-address:{client}"),
        quota: q.login_per_address,
    };
    // A flood this instance already refuses costs no reads.
    limits::refused_already(&st, &[&by_address], client)?;
    let (Ok(email), Ok(password)) = (Email::parse(&c.email), Password::parse(&c.password)) else {
        limits::take(&st, &[by_address], client).await?;
        return Err(denied());
    };
    let creds = st.store.user_credentials(&email).await?;
    let secure = st.opts.secure_cookies;
    let device = session::cookie_value(&headers, device_cookie_name(secure))
        .and_then(|v| DeviceToken::parse(v).ok());
    let known_device = match (&device, &creds) {
        (Some(token), Some(c)) => {
            st.store.device_owner(token).await?.as_deref() == Some(c.user.id.as_str())
        }
        _ => false,
    };
    let by_account = match &device {
        Some(token) if known_device => Limit {
            name: "login-device",
            key: format!("login-device:{}", token.storage_hash()),
            quota: q.login_per_device,
        },
        // Keyed by the email asked for, account or not: the quota says nothing about which
        // emails have accounts.
        _ => Limit {
            name: "login-account",
            key: format!("login-account:{}", email.as_str()),
            quota: q.login_per_account,
        },
    };
    limits::take(&st, &[by_address, by_account], client).await?;
    let stored_hash = creds.as_ref().map(|c| c.password_hash.clone());
    if !st.passwords.verify(password, stored_hash).await? {
        tracing::info!(target: "security", event = "login-failed", %client, known_device, "wrong email or password");
        return Err(denied());
    }
    let user = creds.ok_or_else(denied)?.user;
    // Rotate: a session id known before login (fixation) never becomes an authenticated one.
    let previous = session::token_from_headers(&headers, secure);
    let issued = st.sessions.login(&user.id, previous).await?;
    let mut resp = Json(json!({ "user": { "id": user.id, "email": user.email } })).into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, session::set_cookie(&issued, &st)?);
    if !known_device {
        let token = DeviceToken::generate();
        st.store
            .device_remember(&token, &user.id, holdfast_core::now_ms())
            .await?;
        let v = format!(
            "{}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
            device_cookie_name(secure),
            token.expose(),
            st.opts.known_device_ttl.as_secs(),
            if secure { "; Secure" } else { "" },
        );
        resp.headers_mut().append(
            header::SET_COOKIE,
            HeaderValue::from_str(&v).map_err(AppError::internal)?,
        );
    }
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
    client: ClientAddr,
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
    let limit = Limit {
        name: "password-change",
        key: format!("password-change:{}", user.user_id),
        quota: st.opts.rate_limits.password_change_per_user,
    };
    limits::take(&st, &[limit], client).await?;
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
