//! The session cookie and its checks. Where a session lives is `holdfast-sessions`' business
//! (the store, Redis backed by the store, or the signed cookie itself); this module moves its
//! token between the cookie and [`Sessions`](holdfast_sessions::Sessions) and sets the
//! cookie's flags. Whatever the tier, a session holds a pointer (the user id), never the
//! user's data, and no instance keeps one in memory, so any instance can serve any user and a
//! SIGKILL loses nothing.
//!
//! Also here: the CSRF rule for cookie-authenticated writes.

use crate::error::{AppError, AppResult};
use crate::AppState;
use axum::extract::{FromRef, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use holdfast_sessions::Issued;
use std::sync::{Arc, Mutex, PoisonError};

/// Cookie name. With `Secure` the `__Host-` prefix also pins it to this host and path `/`.
pub fn cookie_name(secure: bool) -> &'static str {
    if secure {
        "__Host-holdfast_session"
    } else {
        "holdfast_session"
    }
}

/// Longer cookie values are not ours (a signed cookie is about 170 bytes).
const MAX_TOKEN: usize = 1024;

/// The session token from the request's cookies, if there is one. Whether it names a live
/// session is for the tier to say; a tampered or garbage value is simply no session.
pub fn token_from_headers(headers: &HeaderMap, secure: bool) -> Option<&str> {
    cookie_value(headers, cookie_name(secure))
}

/// The value of the cookie `name`, if the request has one of a plausible length.
pub(crate) fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
        .filter(|v| !v.is_empty() && v.len() <= MAX_TOKEN)
}

/// The `Set-Cookie` for a session, living until the session's absolute expiry.
pub fn set_cookie(issued: &Issued, state: &AppState) -> AppResult<HeaderValue> {
    let o = state.options();
    let secure = if o.secure_cookies { "; Secure" } else { "" };
    let max_age = (issued.expires_at - holdfast_core::now_ms()).max(0) / 1000;
    let v = format!(
        "{}={}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}{secure}",
        cookie_name(o.secure_cookies),
        issued.token(),
    );
    HeaderValue::from_str(&v).map_err(AppError::internal)
}

pub fn clear_cookie(state: &AppState) -> HeaderValue {
    let secure = state.options().secure_cookies;
    let v = format!(
        "{}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0{}",
        cookie_name(secure),
        if secure { "; Secure" } else { "" }
    );
    HeaderValue::from_str(&v).expect("cookie is ASCII")
}

/// The authenticated user of a request. Extracting it is the authorization check: every
/// handler that touches a user's records takes one and passes its id to the store, or gets
/// one from its [`Claim`](crate::Claim) (`user`, or `user_in` for a statement that checks
/// the session itself).
#[derive(Debug, Clone)]
pub struct Authed {
    pub user_id: String,
}

impl<S> FromRequestParts<S> for Authed
where
    S: Send + Sync,
    AppState: FromRef<S>,
{
    type Rejection = AppError;

    /// Loads the session once per request: a second extraction (a handler's `Authed` and an
    /// [`Idempotent`](crate::Idempotent) scoping its key) reuses the first.
    async fn from_request_parts(parts: &mut Parts, state: &S) -> AppResult<Self> {
        if let Some(authed) = parts.extensions.get::<Authed>() {
            return Ok(authed.clone());
        }
        let state = AppState::from_ref(state);
        let token = token_from_headers(&parts.headers, state.options().secure_cookies)
            .ok_or_else(AppError::unauthorized)?;
        let loaded = state
            .sessions
            .load(token)
            .await?
            .ok_or_else(AppError::unauthorized)?;
        if let (Some(issued), Some(slot)) = (&loaded.reissue, parts.extensions.get::<Reissue>()) {
            slot.put(set_cookie(issued, &state)?);
        }
        let authed = Authed {
            user_id: loaded.user_id,
        };
        parts.extensions.insert(authed.clone());
        Ok(authed)
    }
}

/// Where [`Authed`] leaves a re-issued cookie (a signed cookie re-signed with the current key
/// or refreshed for the idle timeout) for [`reissue_cookie`] to put on the response.
#[derive(Clone, Default)]
struct Reissue(Arc<Mutex<Option<HeaderValue>>>);

impl Reissue {
    fn put(&self, v: HeaderValue) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(v);
    }
    fn take(&self) -> Option<HeaderValue> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// Adds a re-issued session cookie to the response, unless the handler set the cookie itself
/// (login, logout, password change). Only the cookie tier ever re-issues.
pub async fn reissue_cookie(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    if state.sessions.tier_name() != "cookie" {
        return next.run(req).await;
    }
    let slot = Reissue::default();
    req.extensions_mut().insert(slot.clone());
    let mut resp = next.run(req).await;
    if let Some(v) = slot.take() {
        if !resp.headers().contains_key(header::SET_COOKIE) {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    resp
}

/// CSRF protection for every unsafe request. Browsers say where a request comes from; a
/// cross-site one is refused. Non-browser clients send neither header and pass, which is
/// safe because they do not carry a victim's ambient cookies.
/// - `Sec-Fetch-Site` present: only `same-origin` or `none` (typed URL, bookmark) pass.
/// - otherwise `Origin` present: it must name this host (`null` never does).
pub async fn csrf_guard(
    State(_state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, AppError> {
    if !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        let h = req.headers();
        let refuse = || {
            AppError::new(
                StatusCode::FORBIDDEN,
                "cross-site-request",
                "cross-site requests cannot change state",
            )
        };
        if let Some(site) = h.get("sec-fetch-site") {
            if !matches!(site.as_bytes(), b"same-origin" | b"none") {
                return Err(refuse());
            }
        } else if let Some(origin) = h.get(header::ORIGIN) {
            let host = h
                .get(header::HOST)
                .map(HeaderValue::as_bytes)
                .unwrap_or_default();
            let origin_host = origin
                .to_str()
                .ok()
                .and_then(|o| o.split_once("://"))
                .map(|(_, rest)| rest.as_bytes());
            if host.is_empty() || origin_host != Some(host) {
                return Err(refuse());
            }
        }
    }
    Ok(next.run(req).await)
}
